//! bf16 storage (`llada train --storage bf16`), its CPU reference: every value the GPU would
//! store in bf16 is a bf16 value (an op refuses one that is not), weight gradients stay f32,
//! the loss follows the f32 run's within bf16 rounding, and a run is deterministic, resumes
//! bit for bit, recomputes bit for bit and stops on NaN. Also the memory model of bf16 storage
//! and the CLI flags.

use llada::hf::config::ModelConfig;
use llada::hf::dtype::DType;
use llada::hf::presets::{preset_checkpoint, preset_config};
use llada::train::backend::HostOps;
use llada::train::backend::Storage;
use llada::train::data::Sample;
use llada::train::memory::plan;
use llada::train::mixed::{bf16_weights, forward_backward_stored};
use llada::train::model::{
    activation_floats, forward_backward_with, stat_floats, Batch, Params, PassOptions, PassStats,
};
use llada::train::{TrainOptions, Trainer};

mod common;

use common::cli::{err_of, llada, ok, ok_run, read_json, run, stderr, TempDir};

/// How far (relative) a bf16-storage loss may sit from the f32 one on the same weights and
/// batch. Each stored value carries an RNE error ≤ u = 2^-8 relative (8 significant bits),
/// uniform in ±u/2·ulp-ish, standard deviation ≈ u/√3; a logit sits behind m ≈ 4 roundings
/// per layer plus 3 (embedding row, final norm, logits), m = 11 for the 2-layer tiny model,
/// so it moves by ≈ √m·u/√3 ≈ 0.75 % (1σ; the worst, aligned case m·u ≈ 4.3 %), and the loss,
/// a weighted mean over many rows and logits with independent errors, moves by less than one
/// logit: 1 %. Measured: under 0.1 %, over the 20 steps of the curve test too.
const LOSS_REL: f64 = 0.01;

/// The `tiny` preset's f32 weights, its norms (all ones) given structure.
fn tiny() -> (ModelConfig, Params<f32>) {
    let (cfg, seed) = (preset_config("tiny").unwrap(), 7);
    let ck = preset_checkpoint("tiny", seed, DType::F32).unwrap();
    let mut p = Params::<f32>::from_checkpoint(&cfg, &ck).unwrap();
    let vectors = p.shapes.iter().map(|s| s.len() == 1).collect::<Vec<_>>();
    for (d, _) in p.data.iter_mut().zip(vectors).filter(|(_, v)| *v) {
        let f = |j: usize| 1.0 + 0.02 * ((j * 5) % 11) as f32;
        d.iter_mut().enumerate().for_each(|(j, x)| *x = f(j));
    }
    (cfg, p)
}

/// Micro-batch 0 of optimizer step `step` of the test run (2 × 16 tokens, about half masked).
fn batch(p: &Params<f32>, step: u64) -> Batch {
    trainer(p, Storage::F32, step + 1)
        .micro_batch(step, 0)
        .unwrap()
}

fn is_bf16(x: f32) -> bool {
    x.to_bits() & 0xffff == 0
}

/// `n` sequences of `t` token ids in 1..500 (no pattern to learn: the test compares runs).
fn samples(n: usize, t: usize) -> Vec<Sample> {
    let seq = |s: usize| (0..t).map(move |i| 1 + ((s * 17 + i * 7) % 499) as u32);
    let sample = |s| Sample {
        ids: seq(s).collect(),
        prompt_len: 0,
    };
    (0..n).map(sample).collect()
}

/// 2 × 16 tokens, 2 micro-batches a step, constant learning rate 3e-3 after 1 warm-up step.
fn trainer(p: &Params<f32>, storage: Storage, steps: u64) -> Trainer {
    let cfg = preset_config("tiny").unwrap();
    let mut o = TrainOptions::default();
    (o.steps, o.batch_size, o.accum, o.seq_len) = (steps, 2, 2, 16);
    (o.lr, o.warmup, o.seed, o.truncate) = (3e-3, 1, 2, false);
    let mut t = Trainer::new(cfg, p.clone(), o, samples(6, 16)).unwrap();
    t.storage = storage;
    t
}

/// One pass over `b` from the master weights `p` in `storage`: the loss and the gradients.
fn pass(p: &Params<f32>, b: &Batch, storage: Storage, recompute: bool) -> (PassStats, Params<f32>) {
    let cfg = preset_config("tiny").unwrap();
    let mut g = Params::<f32>::zeros(&cfg);
    let o = PassOptions::recomputing(recompute);
    let s = forward_backward_stored(&cfg, storage, p, b, &mut g, o).unwrap();
    (s, g)
}

/// Equal bit patterns, every value finite.
fn same_bits(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite(), "{what}[{i}] = {x}");
        assert!(x.to_bits() == y.to_bits(), "{what}[{i}]: {x:e} vs {y:e}");
    }
}

/// One whole-model pass in bf16 storage: every op checked its bf16 operands (an unrounded one
/// is an error), the working weights are the master's RNE, the weight gradients are f32 (not
/// rounded), and the loss and gradients are near the f32 pass's.
#[test]
fn a_bf16_pass_reads_only_bf16_values_and_adds_f32_gradients() {
    let (cfg, p) = tiny();
    let b = batch(&p, 0);
    let w = bf16_weights(&p);
    for (i, d) in w.data.iter().enumerate() {
        for (j, (&x, &m)) in d.iter().zip(&p.data[i]).enumerate() {
            assert!(is_bf16(x), "{}[{j}] = {x:e}", w.names[i]);
            // RNE: within half a bf16 ulp (2^-8 relative) of the master.
            assert!(
                (x - m).abs() <= m.abs() * 2f32.powi(-8),
                "{}[{j}]",
                w.names[i]
            );
        }
    }
    let (s16, g16) = pass(&p, &b, Storage::Bf16, false);
    let (s32, g32) = pass(&p, &b, Storage::F32, false);
    assert!(s16.loss.is_finite() && s32.loss.is_finite());
    assert_ne!(s16.loss, s32.loss, "bf16 storage rounded nothing");
    let rel = (s16.loss - s32.loss).abs() / s32.loss;
    assert!(
        rel < LOSS_REL,
        "loss {} (bf16) vs {} (f32)",
        s16.loss,
        s32.loss
    );
    let mut unrounded = 0;
    for (i, name) in g16.names.iter().enumerate() {
        let (a, r) = (&g16.data[i], &g32.data[i]);
        assert!(a.iter().all(|x| x.is_finite()), "{name}");
        unrounded += a.iter().filter(|&&x| !is_bf16(x)).count();
        // Direction: the bf16 gradient of each tensor points where the f32 one does
        // (cosine > 0.9; rounding noise of relative size ~(layers·u) cannot flip it).
        let dot: f64 = a.iter().zip(r).map(|(&x, &y)| x as f64 * y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        if n(r) > 0.0 {
            let cos = dot / (n(a) * n(r));
            assert!(
                cos > 0.9,
                "{name}: cosine {cos} between bf16 and f32 gradients"
            );
        }
    }
    assert!(
        unrounded > 1000,
        "the weight gradients look rounded to bf16"
    );

    // An operand the device would hold in bf16 that is not a bf16 value is refused by name.
    let ops = HostOps::<f32>::new().with_storage(Storage::Bf16);
    let mut g = Params::<f32>::zeros(&cfg);
    let e = forward_backward_with(
        &ops,
        &cfg,
        PassOptions::recomputing(false),
        &p.data,
        &b,
        &mut g.data,
    )
    .unwrap_err();
    assert!(e.to_string().contains("is not a bf16 value"), "{e}");
    assert!(e.to_string().starts_with("embedding: `wte`"), "{e}");
}

/// The loss of 20 optimizer steps in bf16 storage follows the f32 run's.
#[test]
fn twenty_bf16_steps_follow_the_f32_loss_curve() {
    let (_, p) = tiny();
    let run = |s: Storage| {
        let mut t = trainer(&p, s, 20);
        (0..20)
            .map(|_| t.train_step().unwrap().loss)
            .collect::<Vec<f64>>()
    };
    let (a, b) = (run(Storage::Bf16), run(Storage::F32));
    assert!(a.iter().chain(&b).all(|l| l.is_finite()), "{a:?} {b:?}");
    // Per step the pass's roundings move the loss by < LOSS_REL; the runs' weights also drift
    // apart, but AdamW's update normalises the gradient, so where both gradients agree in
    // sign (all but rounding-noise-sized ones) both runs take the same ±lr step: the drift
    // stays at rounding level and LOSS_REL holds on every step. The batches differ from step
    // to step (losses 3–6), so following them is not a flat line matched by chance.
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let rel = (x - y).abs() / y;
        assert!(
            rel < LOSS_REL,
            "step {}: loss {x} (bf16) vs {y} (f32)",
            i + 1
        );
    }
    assert_ne!(a, b, "bf16 storage rounded nothing");
}

/// Two bf16 runs are bit-identical, and recomputation changes nothing (pass and steps).
#[test]
fn bf16_runs_are_deterministic_and_recompute_bit_identically() {
    let (_, p) = tiny();
    let b = batch(&p, 3);
    let (sk, gk) = pass(&p, &b, Storage::Bf16, false);
    let (sr, gr) = pass(&p, &b, Storage::Bf16, true);
    assert_eq!(sk.loss.to_bits(), sr.loss.to_bits());
    for (i, name) in gk.names.iter().enumerate() {
        same_bits(name, &gk.data[i], &gr.data[i]);
    }
    let steps = |recompute: bool| {
        let mut t = trainer(&p, Storage::Bf16, 3);
        t.recompute = recompute;
        let l: Vec<f64> = (0..3).map(|_| t.train_step().unwrap().loss).collect();
        (l, t.params, t.opt)
    };
    let (l1, p1, o1) = steps(false);
    let (l2, p2, _) = steps(false);
    let (l3, p3, o3) = steps(true);
    assert_eq!(l1, l2);
    assert_eq!(l1, l3);
    for (i, name) in p1.names.iter().enumerate() {
        same_bits(name, &p1.data[i], &p2.data[i]);
        same_bits(name, &p1.data[i], &p3.data[i]);
        same_bits(name, &o1.v.data[i], &o3.v.data[i]);
    }
    // The master weights stay f32: AdamW's updates are not rounded to bf16.
    assert!(p1.data[1].iter().any(|&x| !is_bf16(x)));
}

/// A bf16 run saved after 3 steps and resumed is the uninterrupted 6-step run, bit for bit;
/// the checkpoint records the storage.
#[test]
fn a_bf16_run_resumes_exactly() {
    let (cfg, p) = tiny();
    let mut full = trainer(&p, Storage::Bf16, 6);
    let mut part = trainer(&p, Storage::Bf16, 6);
    for _ in 0..6 {
        full.train_step().unwrap();
    }
    for _ in 0..3 {
        part.train_step().unwrap();
    }
    let dir = TempDir::new("bf16-resume");
    let st = part.state().unwrap();
    let ck = llada::train::checkpoint::save;
    ck(dir.path(), &cfg, &part.params, &part.opt, &st, None, false).unwrap();
    let r = llada::train::checkpoint::load(dir.path()).unwrap();
    assert_eq!(r.state.storage, Storage::Bf16);
    let o: TrainOptions = serde_json::from_value(r.state.options.clone()).unwrap();
    let mut resumed = Trainer::with_state(r.cfg, r.params, r.opt, 3, o, samples(6, 16)).unwrap();
    resumed.storage = r.state.storage;
    for _ in 0..3 {
        resumed.train_step().unwrap();
    }
    for (i, name) in full.params.names.iter().enumerate() {
        same_bits(name, &resumed.params.data[i], &full.params.data[i]);
        same_bits(name, &resumed.opt.m.data[i], &full.opt.m.data[i]);
        same_bits(name, &resumed.opt.v.data[i], &full.opt.v.data[i]);
    }
    // An f32 run's state omits the field, and reads back as f32.
    let f32_state = trainer(&p, Storage::F32, 1).state().unwrap();
    let j = serde_json::to_value(&f32_state).unwrap();
    assert!(j.get("storage").is_none(), "{j}");
}

/// A NaN weight stops a bf16 step with an error instead of training on.
#[test]
fn a_nan_stops_a_bf16_step() {
    let (_, mut p) = tiny();
    p.data[2][5] = f32::NAN;
    let mut t = trainer(&p, Storage::Bf16, 2);
    let e = t.train_step().unwrap_err().to_string();
    assert!(e.contains("the loss is NaN"), "{e}");
}

/// The memory model of bf16 storage against the pass's own counts: 2 bytes per activation
/// value, 4 for the per-row statistics, which are counted by hand here.
#[test]
fn bf16_activation_bytes_count_the_f32_statistics() {
    let cfg = preset_config("tiny").unwrap();
    let (b, t) = (3, 8);
    let n = b * t;
    for recompute in [false, true] {
        // Per kept layer r1, r2 (n each) and lse (n·NH = 2n); the head's r and loss rows (n
        // each, every token a loss row); attention's delta (2n).
        let layers = if recompute { 1 } else { 2 };
        let hand = layers * 4 * n + 2 * n + 2 * n;
        assert_eq!(stat_floats(&cfg, b, t, n, recompute), hand);
        let pf = plan(&cfg, b, t, 1, 0, Storage::F32).unwrap();
        let pb = plan(&cfg, b, t, 1, 0, Storage::Bf16).unwrap();
        let a = activation_floats(&cfg, b, t, n, recompute) as u64;
        let (f, bf) = if recompute {
            (pf.activations_recompute, pb.activations_recompute)
        } else {
            (pf.activations_kept, pb.activations_kept)
        };
        assert_eq!(f, 4 * a);
        assert_eq!(bf, 2 * a + 2 * hand as u64);
    }
    // The pass allocates exactly activation_floats (so the plan's split covers every buffer).
    let (cfg, p) = tiny();
    let bt = batch(&p, 1);
    let (s, _) = pass(&p, &bt, Storage::Bf16, false);
    let want = activation_floats(&cfg, 2, 16, bt.rows.len(), false);
    assert_eq!(s.activation_floats, want);
}

/// The CLI: `llada train --storage bf16` trains on the CPU, records the storage and resumes
/// in it bit for bit; contradictory flags are refused; `llada grad --storage bf16` differs from
/// f32; `--memory-plan --storage bf16` prints that column only.
#[test]
fn cli_storage_bf16_trains_resumes_and_refuses_contradictions() {
    let dir = TempDir::new("bf16-cli");
    let d = dir.path();
    let data = d.join("d.jsonl");
    let docs: Vec<String> = (0..6)
        .map(|i| {
            let ids: Vec<String> = (1..30).map(|j| ((i * 11 + j) % 400).to_string()).collect();
            format!("{{\"ids\": [{}]}}", ids.join(","))
        })
        .collect();
    std::fs::write(&data, docs.join("\n")).unwrap();
    let base = ["--seq-len", "16", "--batch-size", "2", "--no-dist"];
    // The output folder and the run's log (stderr).
    let train_log = |out: &str, extra: &[&str]| {
        let o = d.join(out);
        let mut c = llada();
        c.args(["train", "--data"]).arg(&data).arg("--out").arg(&o);
        let r = run(c.args(base).args(extra));
        ok(&r);
        (o, stderr(&r))
    };
    let train = |out: &str, extra: &[&str]| train_log(out, extra).0;
    let bf16 = ["--preset", "tiny", "--device", "cpu", "--storage", "bf16"];
    let (full, log) = train_log("full", &[&bf16[..], &["--steps", "4"]].concat());
    // The start-of-run memory plan and activation line are the storage's.
    assert!(
        log.contains("bf16 storage") && !log.contains("f32 storage"),
        "{log}"
    );
    assert!(log.contains("tokens in bf16 storage"), "{log}");
    let st = read_json(&full.join("trainer_state.json"));
    assert_eq!(st["storage"], "bf16", "{st}");
    let half = train("half", &[&bf16[..], &["--steps", "2"]].concat());
    let h = half.to_str().unwrap();
    // No --storage: the checkpoint's.
    let (resumed, log) = train_log("resumed", &["--resume", h, "--steps", "4"]);
    assert!(log.contains("(bf16 storage, bf16 GEMMs)"), "{log}");
    let read = |o: &std::path::Path| {
        ["model.safetensors", "optimizer.safetensors"].map(|f| std::fs::read(o.join(f)).unwrap())
    };
    assert!(
        read(&full) == read(&resumed),
        "the resumed bf16 run differs"
    );
    let f32run = train("f32", &["--preset", "tiny", "--steps", "4"]);
    assert!(
        read(&full) != read(&f32run),
        "--storage bf16 changed nothing"
    );

    let fails = |args: &[&str], want: &str| {
        let mut c = llada();
        c.args(["train", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(d.join("x"));
        let e = err_of(
            c.args(base)
                .args(["--preset", "tiny", "--steps", "1"])
                .args(args),
        );
        assert!(e.contains(want), "{args:?}: {e}");
    };
    let contra = "--precision f32 contradicts it";
    fails(&["--storage", "bf16", "--precision", "f32"], contra);
    let lora = "--storage bf16 applies to full fine-tuning";
    fails(&["--storage", "bf16", "--lora-rank", "2"], lora);
    fails(&["--storage", "f16"], "unknown storage \"f16\"");
    fails(
        &["--precision", "bf16"],
        "its reference of bf16 training is --storage bf16",
    );

    let plan = [
        "train",
        "--preset",
        "tiny",
        "--memory-plan",
        "--storage",
        "bf16",
    ];
    let out = ok_run(llada().args(plan));
    assert!(
        out.contains("bf16 storage") && !out.contains(" f32 storage "),
        "{out}"
    );

    let grad = |storage: &str| {
        let out = d.join(format!("g-{storage}.safetensors"));
        let args = ["grad", "--preset", "tiny", "--ids", "5,17,42,99,3,150,17,8"];
        let rest = ["--masked", "1,4,6", "--p-mask", "0.4", "--storage", storage];
        ok_run(llada().args(args).args(rest).arg("--out").arg(&out));
        std::fs::read(&out).unwrap()
    };
    let (g16, g32) = (grad("bf16"), grad("f32"));
    assert!(g16.len() > 1000 && g16.len() == g32.len());
    assert!(
        g16 != g32,
        "llada grad --storage bf16 wrote the f32 gradients"
    );
}
