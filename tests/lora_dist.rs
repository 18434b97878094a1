//! Data-parallel LoRA training: `llada train --lora-rank` as two CPU processes (ranks from
//! `RANK`/`WORLD_SIZE`, the TCP group of `llada::train::dist`) against one process with the same
//! global batch, the adapters' gradients the only tensors summed; a two-rank LoRA checkpoint
//! resumed by one process; `--zero 1` refused.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/cmp.rs"]
mod cmp;
#[path = "common/ranks.rs"]
mod ranks;

use std::path::Path;

use cli::{losses, ok_stderr as ok, path_str as s, stderr, tiny, tmpdir};
use llada::lora::Adapter;
use ranks::{in_ranks, train_cmd, train_ranks};

const FLAGS: &str = "--steps 3 --warmup 1 --lr 1e-2 --seq-len 16 --accum 2 --no-truncate \
                     --device cpu --lora-rank 4 --lora-alpha 8 --lora-targets q_proj,v_proj,ff_out";

/// All factors of an adapter folder, in module order.
fn factors(dir: &Path, cfg: &llada::hf::config::ModelConfig) -> Vec<f32> {
    let ad = Adapter::open(dir, cfg).unwrap();
    ad.modules
        .values()
        .flat_map(|m| m.a.iter().chain(&m.b).copied())
        .collect()
}

#[test]
fn two_processes_train_the_adapter_like_one_with_the_global_batch() {
    let dir = tmpdir("two");
    let model = tiny(&dir);
    let data = cli::text_corpus(&dir.join("corpus.jsonl"), 24, |i| {
        format!("a cat sat on the mat {i} times. ")
    });
    let (one, two) = (dir.join("one"), dir.join("two"));
    let common = ["--model", s(&model), "--data", s(&data)];
    let args = |out: &Path, b: &'static str| -> Vec<String> {
        let mut v: Vec<String> = common.iter().map(|x| x.to_string()).collect();
        v.extend(["--out", s(out), "--batch-size", b].map(String::from));
        v.extend(FLAGS.split_whitespace().map(String::from));
        v
    };
    let a1 = args(&one, "4");
    let log1 = ok(
        &train_cmd(&a1.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap(),
    );
    let a2 = args(&two, "2");
    let r = train_ranks(&a2.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    let (log0, log_1) = (ok(&r[0]), ok(&r[1]));
    assert!(log0.contains("data parallel LoRA"), "{log0}");
    assert!(log0.contains("global batch 4 × 2"), "{log0}");
    assert!(losses(&log_1).is_empty(), "only rank 0 reports: {log_1}");
    let cfg = llada::engine::Opened::open(&llada::engine::ModelSpec::Dir(model.clone()))
        .unwrap()
        .cfg;
    let (x, y) = (factors(&one, &cfg), factors(&two, &cfg));
    assert_eq!(x.len(), y.len());
    let worst = cmp::nan_max(0.0, cmp::max_abs_diff(&y, &x));
    // Tolerance. Both runs sum the same per-row terms of each adapter gradient in another
    // grouping: one process adds the n = 4·16·2 = 128 rows of a step in one f32 chain, two
    // ranks add 64 each and rank 0 adds the two partial sums in f64 (rounded once to f32).
    // A chain's error is at most γ_n·Σ|terms| with γ_n ≈ n·2⁻²⁴ ≈ 7.6e-6, so two gradients
    // differ by at most 2γ_n·κ relative to |g|, where κ = Σ|terms|/|g| is the sum's
    // cancellation (≈ √n ≈ 11 for terms of random sign): ρ ≈ 1.7e-4. AdamW's step
    // lr·m̂/(√v̂+ε) is scale-free in g for |g| ≫ ε, so a relative change ρ moves a factor by at
    // most ~2ρ·lr per step, 6ρ·lr ≈ 1e-3·lr over the 3 steps: the bound below (seen:
    // ~2e-4·lr, rounding errors are rarely worst-case). A wrong split (another row, mask or
    // normaliser) moves the factors by ~lr.
    let lr = 1e-2f32;
    eprintln!("LoRA data parallel ×2: worst factor difference {worst:e} (lr {lr})");
    assert!(worst <= 1e-3 * lr, "adapters differ by {worst}");
    assert!(x.iter().any(|&v| v != 0.0) && x.iter().all(|v| v.is_finite()));
    let (l1, l2) = (losses(&log1), losses(&log0));
    assert_eq!((l1.len(), l2.len()), (3, 3), "{log1}\n{log0}");
    for (a, b) in l1.iter().zip(&l2) {
        // Printed to 4 decimals: one unit of print rounding (1e-4) plus the losses' own
        // difference (f64 sums of f32 rows in another grouping, ≤ 1e-6 relative of a loss ≈ 6).
        assert!(
            cmp::abs_diff64(*a, *b) <= 1e-4 + 1e-5,
            "loss {b} (2 ranks) vs {a} (one process): {l1:?} {l2:?}"
        );
    }
    // The two-rank checkpoint resumes in one process (the same global batch, re-split).
    let resumed = dir.join("resumed");
    let o = train_cmd(&["--resume", s(&two)])
        .args(["--data", s(&data)])
        .args(["--out", s(&resumed)])
        .args(["--steps", "4"])
        .output()
        .unwrap();
    let e = ok(&o);
    assert!(
        e.contains("splits the same global batch over 1 ranks × 4"),
        "{e}"
    );
    assert!(e.contains("step 4/4"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lora_with_zero_1_is_refused_with_the_reason() {
    let dir = tmpdir("zero");
    let data = cli::text_corpus(&dir.join("c.jsonl"), 4, |i| format!("the dog {i}"));
    let out = dir.join("o");
    let mut a = cli::words("--preset tiny --batch-size 2 --zero 1");
    a.extend(["--data", s(&data), "--out", s(&out)]);
    for r in train_ranks(
        &[&a[..], &FLAGS.split_whitespace().collect::<Vec<_>>()].concat(),
        2,
    ) {
        let e = stderr(&r);
        assert_eq!(r.status.code(), Some(1), "{e}");
        assert!(e.contains("--zero 1 with LoRA"), "{e}");
        assert!(e.contains("not sharded"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// In-process ranks (threads over a localhost group), for the exact statistics the CLI prints
/// rounded: every rank ends with the same adapter and moments bit for bit (rank 0's sums are
/// sent to all), and each step's loss and gradient norm equal one process's up to the f32/f64
/// summation order (relative 1e-5 and 1e-4, as the full-model check in tests/train.rs: the
/// grouping changes rounding at ~1e-7 relative, a wrong split moves them by percents).
#[test]
fn in_process_ranks_hold_identical_adapters_and_match_one_process() {
    use llada::lora::train::init_adapter;
    use llada::train::data::Sample;
    use llada::train::dist::{fnv1a, HostGroup, FNV_START};
    use llada::train::lora::LoraStep;
    use llada::train::model::Params;
    use llada::train::optim::AdamWConfig;
    use llada::train::{StepStats, TrainOptions, Trainer};
    let cfg = llada::hf::presets::preset_config("tiny").unwrap();
    let ck = llada::hf::presets::preset_checkpoint("tiny", 5, llada::hf::dtype::DType::BF16);
    let params = Params::<f32>::from_checkpoint(&cfg, &ck.unwrap()).unwrap();
    let samples: Vec<Sample> = (0..7u32)
        .map(|k| Sample {
            ids: (0..16).map(|i| 7 + (i * 3 + k * 11) % 31).collect(),
            prompt_len: 0,
        })
        .collect();
    let opts = |b: usize, world: usize| TrainOptions {
        steps: 3,
        batch_size: b,
        world,
        accum: 2,
        seq_len: 16,
        lr: 1e-2,
        warmup: 1,
        truncate: false,
        ..TrainOptions::default()
    };
    let targets: Vec<String> = ["k_proj", "up_proj", "ff_out"].map(String::from).to_vec();
    let run = move |o: TrainOptions, group: Option<HostGroup>| {
        let ad = init_adapter(&cfg, &targets, 3, 6.0, false, 2).unwrap();
        let mut st = LoraStep::new(params.clone(), ad, AdamWConfig::default());
        let mut tr = Trainer::new(cfg.clone(), Params::default(), o, samples.clone()).unwrap();
        if let Some(g) = group {
            tr.join_group(g).unwrap();
        }
        let stats: Vec<StepStats> = (0..3).map(|_| tr.train_step_on(&mut st).unwrap()).collect();
        (stats, st.adapter, st.opt)
    };
    // The rendezvous fingerprint (Trainer::options_fingerprint of the ranks' options).
    let fp = fnv1a(FNV_START, &serde_json::to_vec(&opts(2, 2)).unwrap());
    let r = run.clone();
    let mut both = in_ranks(2, fp, move |_, g| r(opts(2, 2), Some(g)));
    let (b, a) = (both.pop().unwrap(), both.pop().unwrap());
    assert_eq!(a.0, b.0, "rank statistics");
    assert_eq!(a.1.modules, b.1.modules, "rank adapters");
    assert_eq!(a.2, b.2, "rank moments");
    let one = run(opts(4, 1), None);
    for (x, y) in a.0.iter().zip(&one.0) {
        let msg = format!("{x:?} vs one process {y:?}");
        assert_eq!(
            (x.step, x.tokens, x.masked),
            (y.step, y.tokens, y.masked),
            "{msg}"
        );
        assert!(cmp::rel_close(x.loss, y.loss, 1e-5), "{msg}");
        assert!(cmp::rel_close(x.grad_norm, y.grad_norm, 1e-4), "{msg}");
    }
}
