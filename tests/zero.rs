//! ZeRO-1 (`llada train --zero 1`): the sharded collectives, the shard layout, a sharded run
//! against the unsharded data-parallel run (bit for bit) and one process (f32 sum order), the
//! checkpoint gather and a resume on another number of ranks, `llada train` as processes, and
//! the memory model against hand-computed bytes.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/cmp.rs"]
mod cmp;
#[path = "common/ranks.rs"]
mod ranks;

use std::process::Output;

use cli::tmpdir;
use llada::hf::config::ModelConfig;
use llada::train::backend::Storage;
use llada::train::data::Sample;
use llada::train::memory::plan;
use llada::train::model::Params;
use llada::train::zero::{parse_stage, Piece, ShardLayout};
use llada::train::{checkpoint, StepStats, TrainOptions, Trainer};
use ranks::{in_ranks, ok_ranks, train_cmd};

#[test]
fn zero_stages_parse_with_clear_errors() {
    assert_eq!(parse_stage("0").unwrap(), 0);
    assert_eq!(parse_stage("off").unwrap(), 0);
    assert_eq!(parse_stage("1").unwrap(), 1);
    let e = parse_stage("2").unwrap_err().to_string();
    assert!(
        e.contains("stage 2") && e.contains("not implemented"),
        "{e}"
    );
    let e = parse_stage("one").unwrap_err().to_string();
    assert!(e.contains("expected 0 (off) or 1"), "{e}");
}

#[test]
fn shards_are_aligned_cut_tensors_and_may_be_empty() {
    // P = 117 over 3 ranks: ⌈117/3⌉ = 39, rounded up to 64 values → [0, 64), [64, 117), ∅.
    let sizes = [10, 100, 7];
    let l = |r| ShardLayout::new(&sizes, 3, r).unwrap();
    assert_eq!(l(0).bounds, vec![0, 64, 117, 117]);
    assert_eq!(
        (l(0).shard_len(), l(1).shard_len(), l(2).shard_len()),
        (64, 53, 0)
    );
    let piece = |tensor, range: std::ops::Range<usize>, at| Piece { tensor, range, at };
    assert_eq!(l(0).pieces(), vec![piece(0, 0..10, 0), piece(1, 0..54, 10)]);
    assert_eq!(
        l(1).pieces(),
        vec![piece(1, 54..100, 0), piece(2, 0..7, 46)]
    );
    assert!(l(2).pieces().is_empty());
    assert_eq!(l(0).tensor_bounds(1), vec![0, 54, 100, 100]);
    assert_eq!(l(0).tensor_bounds(2), vec![0, 0, 7, 7]);
    assert!(ShardLayout::new(&sizes, 3, 3).is_err());
}

#[test]
fn reduce_scatter_gives_the_all_reduce_bits_and_gathers_reassemble() {
    // Over a window boundary, with an empty middle range and a range across the boundary.
    let n = llada::train::dist::SHARD_WINDOW + 37;
    let splits = [vec![0, 5, 5, n], vec![0, n - 40, n - 30, n]];
    let out = in_ranks(3, 1, move |rank, mut g| {
        let local = |i: usize| ((i * 31 + rank * 7) % 1000) as f32 * 1e-3 + rank as f32 * 0.3;
        let x: Vec<f32> = (0..n).map(local).collect();
        let mut want = x.clone();
        g.all_reduce_f32(&mut want).unwrap();
        let mut res = Vec::new();
        for b in &splits {
            let mut rs = x.clone();
            g.reduce_scatter_f32(&mut rs, b).unwrap();
            let own = b[rank]..b[rank + 1];
            // This rank's range: the all-reduce's bits; elsewhere untouched.
            for i in 0..n {
                let expect = if own.contains(&i) { want[i] } else { x[i] };
                assert_eq!(rs[i].to_bits(), expect.to_bits(), "rank {rank} value {i}");
            }
            // Every rank puts `rank + i` in its range; the all-gather assembles them.
            let mut ag = vec![f32::NAN; n];
            for i in own.clone() {
                ag[i] = (rank * n + i) as f32;
            }
            g.all_gather_f32(&mut ag, b).unwrap();
            let mine: Vec<f32> = own.clone().map(|i| (rank * n + i) as f32).collect();
            let mut gathered = if rank == 0 { vec![f32::NAN; n] } else { vec![] };
            g.gather_f32(&mine, b, &mut gathered).unwrap();
            res.push((ag, gathered));
        }
        res
    });
    for (k, b) in [vec![0, 5, 5, n], vec![0, n - 40, n - 30, n]]
        .iter()
        .enumerate()
    {
        let owner = |i: usize| (0..3).find(|&r| b[r] <= i && i < b[r + 1]).unwrap();
        let expect: Vec<f32> = (0..n).map(|i| (owner(i) * n + i) as f32).collect();
        for (r, res) in out.iter().enumerate() {
            assert_eq!(res[k].0, expect, "all-gather on rank {r}, split {k}");
        }
        assert_eq!(out[0][k].1, expect, "gather on rank 0, split {k}");
    }
    // A split that does not cover the tensor is an error, not a short read.
    let e = in_ranks(2, 1, |_, mut g| {
        g.reduce_scatter_f32(&mut [1.0; 8], &[0, 4, 7])
            .unwrap_err()
            .to_string()
    });
    assert!(e[0].contains("do not split 8 values"), "{}", e[0]);
}

// ---------------------------------------------------------------------------------------------
// Training: sharded vs unsharded vs one process.

/// A small model with GQA whose 17,888 parameters split unevenly: not divisible by 3, and over
/// 2 ranks the 64-value alignment gives shards of 8,960 and 8,928 values (a shard boundary
/// inside layer 1's `q_proj`).
fn small() -> ModelConfig {
    ModelConfig {
        d_model: 32,
        n_heads: 2,
        n_kv_heads: 1,
        n_layers: 2,
        mlp_hidden_size: 48,
        vocab_size: 37,
        embedding_size: 37,
        max_sequence_length: 64,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        mask_token_id: 36,
        eos_token_id: 0,
        pad_token_id: 0,
    }
}

fn small_params() -> Params<f32> {
    let mut p = Params::<f32>::zeros(&small());
    for (t, d) in p.data.iter_mut().enumerate() {
        for (i, x) in d.iter_mut().enumerate() {
            let u = llada::rng::uniform(llada::rng::bits(t as u64 + 77, i as u64));
            *x = (u as f32 - 0.5) * 0.3 + if p.shapes[t].len() == 1 { 1.0 } else { 0.0 };
        }
    }
    p
}

fn samples() -> Vec<Sample> {
    (0..13)
        .map(|s| Sample {
            ids: (0..20).map(|i| 1 + ((s * 3 + i * 2) % 35) as u32).collect(),
            prompt_len: 0,
        })
        .collect()
}

fn options(world: usize, batch_size: usize, steps: u64) -> TrainOptions {
    TrainOptions {
        steps,
        batch_size,
        accum: 2,
        seq_len: 20,
        lr: 5e-3,
        warmup: 1,
        schedule: "linear".into(),
        weight_decay: 0.1,
        // Small enough that every step clips (checked below): the global norm matters.
        clip: 0.05,
        seed: 5,
        sft: false,
        truncate: false,
        world,
    }
}

/// What a rank ends with: its statistics, weights, and (rank 0) the state a checkpoint saves.
struct RankRun {
    stats: Vec<StepStats>,
    params: Params<f32>,
    saved: Option<(Params<f32>, Params<f32>, Params<f32>)>,
}

/// Where a resumed run starts: weights, `exp_avg`, `exp_avg_sq`, step, AdamW step.
type Start = (Params<f32>, Params<f32>, Params<f32>, u64, u64);

/// `steps` steps of a run over `o.world` ranks, sharded or not, starting from `start` (fresh
/// when `None`): (params, m, v, step).
fn run(o: TrainOptions, zero: bool, steps: u64, start: Option<Start>) -> Vec<RankRun> {
    in_ranks(o.world, 1, move |_, g| {
        let mut tr = match start.clone() {
            None => Trainer::new(small(), small_params(), o.clone(), samples()).unwrap(),
            Some((p, m, v, step, t)) => {
                let mut tr = Trainer::new(small(), p, o.clone(), samples()).unwrap();
                (tr.opt.m, tr.opt.v, tr.opt.t, tr.step) = (m, v, t, step);
                tr
            }
        };
        tr.join_group(g).unwrap();
        let mut saved = None;
        if zero {
            let mut z = tr.shard_optimizer().unwrap();
            assert!(tr.opt.m.data.is_empty(), "the whole moments were kept");
            let stats = (0..steps)
                .map(|_| tr.train_step_on(&mut z).unwrap())
                .collect();
            tr.save_sharded(&z, |t| {
                saved = Some((t.params.clone(), t.opt.m.clone(), t.opt.v.clone()));
                Ok(())
            })
            .unwrap();
            RankRun {
                stats,
                params: z.store.host.params,
                saved,
            }
        } else {
            let stats = (0..steps).map(|_| tr.train_step().unwrap()).collect();
            RankRun {
                stats,
                saved: Some((tr.params.clone(), tr.opt.m.clone(), tr.opt.v.clone())),
                params: tr.params,
            }
        }
    })
}

fn assert_finite(p: &Params<f32>, what: &str) {
    for (name, d) in p.names.iter().zip(&p.data) {
        assert!(
            d.iter().all(|x| x.is_finite()),
            "{what}: `{name}` is not finite"
        );
    }
}

/// Bit-for-bit equal tensors (a NaN is never equal), naming the first difference.
fn assert_same_bits(a: &Params<f32>, b: &Params<f32>, what: &str) {
    assert_eq!(a.data.len(), b.data.len(), "{what}: tensor count");
    for ((name, x), y) in a.names.iter().zip(&a.data).zip(&b.data) {
        assert_eq!(x.len(), y.len(), "{what}: `{name}` length");
        if let Some(i) = (0..x.len()).find(|&i| x[i].to_bits() != y[i].to_bits()) {
            panic!("{what}: `{name}`[{i}] is {} vs {}", x[i], y[i]);
        }
    }
}

fn check_against_unsharded(world: usize) {
    let steps = 3;
    let o = options(world, 2, steps);
    let sharded = run(o.clone(), true, steps, None);
    let plain = run(o.clone(), false, steps, None);
    for (r, z) in sharded.iter().enumerate() {
        assert_finite(&z.params, "sharded weights");
        assert_same_bits(
            &z.params,
            &sharded[0].params,
            &format!("rank {r} vs rank 0"),
        );
        assert_eq!(z.stats, sharded[0].stats, "rank {r}'s statistics");
    }
    for (a, b) in sharded[0].stats.iter().zip(&plain[0].stats) {
        assert!(b.grad_norm > o.clip, "step {}: no clipping", b.step);
        // Everything but the norm is the same computation; the norm's f64 sum is grouped by
        // shard (relative rounding ~P·2⁻⁵³ ≈ 2e-12 at most for 17,888 squares).
        assert_eq!(
            (a.step, a.loss, a.lr, a.tokens, a.masked, a.flops),
            (b.step, b.loss, b.lr, b.tokens, b.masked, b.flops)
        );
        assert!(
            cmp::abs_diff64(a.grad_norm, b.grad_norm) <= 1e-12 * b.grad_norm,
            "step {}: norm {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
    assert_same_bits(
        &sharded[0].params,
        &plain[0].params,
        "sharded vs unsharded weights",
    );
    // What rank 0 saves: the unsharded run's weights and moments, bit for bit.
    let (zp, zm, zv) = sharded[0].saved.as_ref().unwrap();
    let (pp, pm, pv) = plain[0].saved.as_ref().unwrap();
    assert_same_bits(zp, pp, "saved weights");
    assert_same_bits(zm, pm, "saved exp_avg");
    assert_same_bits(zv, pv, "saved exp_avg_sq");
    assert!(sharded[1].saved.is_none(), "rank 1 saved");
    // One process with the global batch: f32 sum order only (see tests/train.rs).
    let mut one = Trainer::new(
        small(),
        small_params(),
        options(1, 2 * world, steps),
        samples(),
    )
    .unwrap();
    let stats: Vec<StepStats> = (0..steps).map(|_| one.train_step().unwrap()).collect();
    for (a, b) in sharded[0].stats.iter().zip(&stats) {
        assert!(
            cmp::abs_diff64(a.loss, b.loss) <= 1e-5 * b.loss.abs(),
            "step {}: loss {} vs one process {}",
            a.step,
            a.loss,
            b.loss
        );
    }
    let mut worst = 0f32;
    for (x, y) in sharded[0].params.data.iter().zip(&one.params.data) {
        worst = cmp::nan_max(worst, cmp::max_abs_diff(x, y));
    }
    // AdamW moves a weight ~lr per step; gradients differing by f32 rounding move it by far
    // less than lr/100, one wrong row or shard by ~lr.
    assert!(worst < 1e-2 * o.lr as f32, "vs one process: {worst}");
    eprintln!("ZeRO-1 over {world} ranks: bit-identical to unsharded; vs one process {worst:e}");
}

#[test]
fn zero1_over_two_ranks_is_the_unsharded_run_bit_for_bit() {
    check_against_unsharded(2);
}

#[test]
fn zero1_over_three_ranks_is_the_unsharded_run_bit_for_bit() {
    check_against_unsharded(3);
}

#[test]
fn a_sharded_checkpoint_resumes_on_another_number_of_ranks() {
    // 2 steps on 3 sharded ranks (global batch 6), saved in the unsharded format, then 2 more
    // on 2 ranks, sharded and not: the two continuations are the same bits.
    let first = run(options(3, 2, 4), true, 2, None);
    let (p, m, v) = first[0].saved.clone().unwrap();
    let dir = std::env::temp_dir().join(format!("llada-zero-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut tr = Trainer::new(small(), p, options(3, 2, 4), samples()).unwrap();
    (tr.opt.m, tr.opt.v, tr.opt.t, tr.step) = (m, v, 2, 2);
    let st = tr.state().unwrap();
    checkpoint::save(&dir, &small(), &tr.params, &tr.opt, &st, None, false).unwrap();
    let r = checkpoint::load(&dir).unwrap();
    assert_same_bits(&r.opt.m, &tr.opt.m, "reloaded exp_avg");
    let mut o = options(3, 2, 4);
    o.rescale_world(2).unwrap();
    let start = Some((r.params, r.opt.m, r.opt.v, r.state.step, r.opt.t));
    let sharded = run(o.clone(), true, 2, start.clone());
    let plain = run(o, false, 2, start);
    assert_eq!(sharded[0].stats.last().unwrap().step, 4);
    assert_finite(&sharded[0].params, "resumed weights");
    assert_same_bits(
        &sharded[0].params,
        &plain[0].params,
        "resumed: sharded vs not",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sharded_step_without_its_group_is_an_error() {
    let mut tr = Trainer::new(small(), small_params(), options(1, 2, 2), samples()).unwrap();
    let e = tr.shard_optimizer().err().unwrap().to_string();
    assert!(e.contains("this run is one process"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// `llada train --zero 1` as processes.

/// Run `world` ranks of `llada train ARGS` to the end, each asserted to succeed; rank 0's
/// output first.
fn train_ranks(args: &[&str], world: usize) -> Vec<Output> {
    ok_ranks(ranks::train_ranks(args, world))
}

#[test]
fn cli_zero1_on_three_processes_saves_the_unsharded_checkpoint_and_resumes_on_two() {
    let dir = tmpdir("cli");
    let data = dir.join("corpus.jsonl");
    let text: String = (0..20)
        .map(|i| format!("{{\"text\": \"the sharded moments of step {i} add up. \"}}\n"))
        .collect();
    std::fs::write(&data, text).unwrap();
    let data = data.to_str().unwrap().to_string();
    let out = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let first = |o: &str, zero: &str| -> Vec<String> {
        let flags = "--preset tiny --steps 3 --warmup 1 --lr 3e-3 --seq-len 16 --batch-size 2 \
                     --accum 2 --no-truncate --clip 0.1 --device cpu";
        let mut v: Vec<String> = flags.split_whitespace().map(String::from).collect();
        for x in ["--zero", zero, "--data", &data, "--out", o] {
            v.push(x.to_string());
        }
        v
    };
    let strs = |v: &[String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (z3, p3) = (out("z3"), out("p3"));
    let a = strs(&first(&z3, "1"));
    let logs = train_ranks(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), 3);
    let log0 = String::from_utf8_lossy(&logs[0].stderr);
    assert!(log0.contains("memory per rank"), "{log0}");
    assert!(log0.contains("AdamW moments (f32, 1/3 shard)"), "{log0}");
    let a = strs(&first(&p3, "0"));
    train_ranks(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), 3);
    let (z, p) = (
        checkpoint::load(dir.join("z3").as_path()).unwrap(),
        checkpoint::load(dir.join("p3").as_path()).unwrap(),
    );
    assert_eq!((z.state.step, z.opt.t), (3, 3));
    assert_finite(&z.params, "ZeRO-1 checkpoint");
    assert_same_bits(&z.params, &p.params, "3 ranks: master weights");
    assert_same_bits(&z.opt.m, &p.opt.m, "3 ranks: exp_avg");
    assert_same_bits(&z.opt.v, &p.opt.v, "3 ranks: exp_avg_sq");
    // Resumed on 2 ranks (the global batch of 6 re-split 2 × 3), sharded and not.
    let resume = |from: &str, to: &str, zero: &str| {
        let a = [
            "--resume", from, "--steps", "5", "--data", &data, "--out", to, "--device", "cpu",
            "--zero", zero,
        ];
        train_ranks(&a, 2)
    };
    let logs = resume(&z3, &out("z2"), "1");
    let log0 = String::from_utf8_lossy(&logs[0].stderr);
    assert!(log0.contains("over 2 ranks × 3"), "{log0}");
    resume(&p3, &out("p2"), "0");
    let (z, p) = (
        checkpoint::load(dir.join("z2").as_path()).unwrap(),
        checkpoint::load(dir.join("p2").as_path()).unwrap(),
    );
    assert_eq!(z.state.step, 5);
    assert_same_bits(&z.params, &p.params, "resumed on 2 ranks: master weights");
    assert_same_bits(&z.opt.v, &p.opt.v, "resumed on 2 ranks: exp_avg_sq");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cli_zero_flags_are_checked() {
    let err = |args: &str| {
        let args: Vec<&str> = args.split_whitespace().collect();
        let o = train_cmd(&args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let base = "--preset tiny --data /nonexistent --out /nonexistent";
    let e = err(&format!("{base} --zero 1 --device cpu"));
    assert!(e.contains("this run is one process"), "{e}");
    let e = err(&format!("{base} --zero 2"));
    assert!(e.contains("ZeRO stage 2"), "{e}");
    let e = err("--preset tiny --memory-plan --zero 1");
    assert!(e.contains("must be 2 or more"), "{e}");
    let e = err("--preset tiny --world-size 2 --data x --out y");
    assert!(e.contains("--memory-plan"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The memory model.

#[test]
fn the_memory_model_matches_hand_computed_bytes_for_tiny() {
    let cfg = llada::hf::presets::preset_config("tiny").unwrap();
    // tiny: C 128, NH = NKV 2, HD 64 (QW = KW = 128), F 320, V 512, L 2.
    // P = 512·128 (wte) + 2·(2·128 + 4·128² + 3·128·320) + 128 + 512·128 (LM head)
    //   = 65,536 + 2·188,672 + 128 + 65,536 = 508,544.
    // 3 ranks: ⌈508,544 / 3⌉ = 169,515 → 169,536 (a multiple of 64) per shard.
    let f = plan(&cfg, 2, 16, 3, 1, Storage::F32).unwrap();
    assert_eq!((f.params, f.shard), (508_544, 169_536));
    assert_eq!(f.weights, 4 * 508_544);
    assert_eq!(f.master, 0);
    assert_eq!(f.moments, 8 * 169_536);
    assert_eq!(f.gradients, 4 * 508_544);
    // n = 2·16 = 32 tokens, R = n loss rows.
    // layer = 32·(4·128 + 2·128 + 2·128 + 2 + 2 + 3·320) = 32·1,988 = 63,616;
    // rest = 2·32·128 + 32·(4·128 + 2 + 512) + 32·(2·128 + 3·320 + 2·128 + 2·128 + 2)
    //      = 8,192 + 32,832 + 55,360 = 96,384;
    // kept = 2·63,616 + 96,384 = 223,616; with recomputation the layers' inputs and one layer
    // beyond its input: 2·32·128 + (63,616 − 32·128) + 96,384 = 164,096.
    assert_eq!(f.activations_kept, 4 * 223_616);
    assert_eq!(f.activations_recompute, 4 * 164_096);
    assert_eq!(
        f.total(true),
        4 * 508_544 + 8 * 169_536 + 4 * 508_544 + 4 * 164_096
    );
    let b = plan(&cfg, 2, 16, 3, 1, Storage::Bf16).unwrap();
    assert_eq!(
        (b.weights, b.master, b.moments, b.gradients),
        (2 * 508_544, 4 * 169_536, 8 * 169_536, 4 * 508_544)
    );
    // bf16 storage: 2 bytes a value, and 2 more for the f32 per-row statistics S: per kept
    // layer n·(2 + NH) = 32·4 = 128, beside 2R + n·NH = 64 + 64 = 128; kept S = 2·128 + 128 =
    // 384, recomputing (one layer's) S = 128 + 128 = 256.
    assert_eq!(
        (b.activations_kept, b.activations_recompute),
        (2 * 223_616 + 2 * 384, 2 * 164_096 + 2 * 256)
    );
    // Unsharded: the whole moments (and, in bf16 storage, master weights) on every rank.
    let u = plan(&cfg, 2, 16, 3, 0, Storage::Bf16).unwrap();
    assert_eq!(
        (u.shard, u.master, u.moments),
        (508_544, 4 * 508_544, 8 * 508_544)
    );
    assert!(plan(&cfg, 2, 16, 1, 1, Storage::F32).is_err());
}

#[test]
fn full_8b_sft_fits_eight_80gb_gpus_with_zero1() {
    let cfg = llada::hf::presets::preset_config("llada-8b").unwrap();
    let gpu = 81_559u64 << 20; // an H100 80GB, in bytes
    let z = plan(&cfg, 1, 2048, 8, 1, Storage::F32).unwrap();
    assert_eq!(z.params, 8_015_581_184);
    assert_eq!(z.shard, 1_001_947_648);
    // 4P + 4P + 8P/8 = 9P = 72.1 GB of state, + activations with per-layer recomputation.
    assert_eq!(z.state(), 9 * 8_015_581_184);
    assert!(z.total(true) < gpu, "{} bytes", z.total(true));
    // Unsharded, the moments alone (8P = 64 GB) break it.
    let u = plan(&cfg, 1, 2048, 8, 0, Storage::F32).unwrap();
    assert!(u.state() > gpu);
}

#[test]
fn cli_memory_plan_prints_without_loading_anything() {
    let args = "--preset llada-8b --world-size 8 --zero 1 --memory-plan --batch-size 1 \
                --seq-len 2048";
    let args: Vec<&str> = args.split_whitespace().collect();
    let o = train_cmd(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("8015581184 parameters, 8 ranks, ZeRO-1"), "{s}");
    assert!(s.contains("AdamW moments (f32, 1/8 shard)"), "{s}");
    // 8·1,001,947,648 bytes = 7.47 GiB; 4P = 29.86 GiB.
    let line = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .unwrap_or("")
            .to_string()
    };
    assert!(line("AdamW moments").contains("7.47 GiB"), "{s}");
    assert!(line("weights (whole model)").contains("29.86 GiB"), "{s}");
}

/// The weights after `steps` sharded steps of 2 ranks, each trainer set up by `set`.
fn sharded_with(o: TrainOptions, steps: u64, set: fn(&mut Trainer)) -> Vec<Params<f32>> {
    in_ranks(2, 1, move |_, g| {
        let mut tr = Trainer::new(small(), small_params(), o.clone(), samples()).unwrap();
        set(&mut tr);
        tr.join_group(g).unwrap();
        let mut z = tr.shard_optimizer().unwrap();
        for _ in 0..steps {
            tr.train_step_on(&mut z).unwrap();
        }
        z.store.host.params
    })
}

#[test]
fn zero1_with_recompute_takes_the_same_steps() {
    // The trainer hands its --recompute to the sharded state's pass (StepState::forward_backward
    // takes the pass options): the same steps, bit for bit.
    let o = options(2, 2, 2);
    let kept = run(o.clone(), true, 2, None);
    let recomputed = sharded_with(o, 2, |tr| tr.recompute = true);
    assert_same_bits(&recomputed[0], &kept[0].params, "--recompute vs all kept");
}

#[test]
fn zero1_in_bf16_storage_is_the_unsharded_bf16_run() {
    // The trainer hands its storage to the sharded state (`shard_optimizer`): sharding changes
    // nothing in bf16 storage either, and the storage does change the steps.
    let o = options(2, 2, 2);
    let sharded = sharded_with(o.clone(), 2, |tr| tr.storage = Storage::Bf16);
    let unsharded = in_ranks(2, 1, move |_, g| {
        let mut tr = Trainer::new(small(), small_params(), o.clone(), samples()).unwrap();
        tr.storage = Storage::Bf16;
        tr.join_group(g).unwrap();
        for _ in 0..2 {
            tr.train_step().unwrap();
        }
        tr.params
    });
    assert_finite(&sharded[0], "bf16 storage, sharded");
    assert_same_bits(
        &sharded[0],
        &unsharded[0],
        "bf16 storage: sharded vs unsharded",
    );
    assert_same_bits(&sharded[1], &unsharded[1], "bf16 storage: rank 1");
    let f32_run = sharded_with(options(2, 2, 2), 2, |_| {});
    assert!(
        sharded[0].data != f32_run[0].data,
        "the sharded run ignored bf16 storage"
    );
}
