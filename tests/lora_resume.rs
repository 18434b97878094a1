//! `llada train --resume` of a LoRA run (`llada::train::lora_checkpoint`): N steps straight
//! equal k steps, a stop and a resume of N − k, bit for bit (adapter file, optimizer state and
//! losses, in the CLI and in the library); a resume with other LoRA flags or on another base
//! model is refused naming the difference; hostile checkpoint files are clear errors, never
//! panics.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/probe.rs"]
mod probe;

use std::path::{Path, PathBuf};
use std::process::Output;

use cli::{copy_dir, edit_json, llada, logged_losses, run, stderr, tiny, tmpdir};
use cli::{file_bytes as bytes, ok_stderr as ok, path_str as s};
use llada::hf::dtype::DType;
use llada::hf::write::{write_safetensors, HostTensor};
use llada::lora::train::{init_adapter, LoraAdamW};
use llada::lora::Adapter;
use llada::train::checkpoint::read_state;
use llada::train::data::Sample;
use llada::train::lora::LoraStep;
use llada::train::lora_checkpoint::{self as lck, BaseModel, LoraRun};
use llada::train::model::Params;
use llada::train::optim::{AdamW, AdamWConfig};
use llada::train::{StepState, StepStats, TrainOptions, Trainer};

/// Token-id data for the tiny preset: 8 sequences of 16 ids.
fn ids_data(dir: &Path) -> PathBuf {
    let p = dir.join("ids.jsonl");
    let mut s = String::new();
    for k in 0..8u32 {
        let ids: Vec<u32> = (0..16).map(|i| 5 + (i * 7 + k * 3) % 23).collect();
        s += &format!("{{\"ids\": {ids:?}}}\n");
    }
    std::fs::write(&p, s).unwrap();
    p
}

/// The flags of every run here: a warmup that crosses the stop (step 3 of 6), accumulation, three
/// targets (the LM head included).
const FLAGS: &str = "--batch-size 2 --accum 2 --seq-len 16 --lr 1e-2 --warmup 4 \
                     --schedule constant --no-truncate --device cpu --no-dist";
const LORA: &str = "--lora-rank 4 --lora-alpha 8 --lora-targets q_proj,v_proj,ff_out";

fn train(args: &[&str], flags: &str) -> Output {
    run(llada()
        .arg("train")
        .args(args)
        .args(flags.split_whitespace()))
}

#[test]
fn cli_resume_equals_the_uninterrupted_run_bit_for_bit() {
    let dir = tmpdir("cli");
    let (model, data) = (tiny(&dir), ids_data(&dir));
    let (straight, first, resumed) = (dir.join("a6"), dir.join("b3"), dir.join("c6"));
    let base = ["--model", s(&model), "--data", s(&data)];
    let with = |out: &Path, steps: &str| {
        let mut v = base.to_vec();
        v.extend(["--out", s(out), "--steps", steps]);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let flags = format!("{FLAGS} {LORA}");
    let args = with(&straight, "6");
    let la = ok(&train(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &flags,
    ));
    let args = with(&first, "3");
    let lb = ok(&train(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &flags,
    ));
    // The resume: the base model and the options come from the checkpoint.
    let lc = ok(&train(
        &[
            "--resume",
            s(&first),
            "--data",
            s(&data),
            "--out",
            s(&resumed),
            "--steps",
            "6",
        ],
        "--device cpu --no-dist",
    ));
    assert!(lc.contains("resuming the LoRA run"), "{lc}");
    assert!(lc.contains("step 4/6"), "{lc}");
    for f in [
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "adapter_config.json",
    ] {
        let (x, y) = (bytes(&straight.join(f)), bytes(&resumed.join(f)));
        assert!(
            x == y,
            "{f}: the resumed run differs from the uninterrupted one"
        );
    }
    // The adapter moved (a test of equal zeros would test nothing).
    assert_ne!(
        bytes(&first.join("adapter_model.safetensors")),
        bytes(&straight.join("adapter_model.safetensors"))
    );
    let (a, b, c) = (logged_losses(&la), logged_losses(&lb), logged_losses(&lc));
    assert_eq!(a.len(), 6, "{la}");
    assert_eq!((b.len(), c.len()), (3, 3), "{lb}\n{lc}");
    let joined: Vec<_> = b.iter().chain(&c).cloned().collect();
    assert_eq!(joined, a, "logged losses: stop + resume vs straight");
    assert!(a
        .iter()
        .all(|(_, l)| l.parse::<f64>().is_ok_and(f64::is_finite)));
    let st = read_state(&resumed).unwrap();
    assert_eq!((st.step, st.adam_t), (6, 6));
    let run = st.lora.unwrap();
    assert_eq!((run.rank, run.alpha, run.rslora), (4, 8.0, false));
    assert_eq!(run.base.model, Some(std::fs::canonicalize(&model).unwrap()));
    // The checkpoint is a PEFT adapter `generate --lora` loads.
    let g = run_gen(&model, &resumed);
    assert!(g.status.success(), "{}", stderr(&g));
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_gen(model: &Path, lora: &Path) -> Output {
    run(llada()
        .args(["generate", "--model", s(model), "--lora", s(lora)])
        .args(cli::words(
            "--prompt-ids 5,6,7 --gen-length 8 --steps 8 --block-length 8 --device cpu",
        )))
}

/// The library runs: the tiny preset (bf16 weights, seed 3), 5 samples, a linear schedule
/// with warmup, accumulation, a rank-2 rsLoRA adapter on `q_proj` and the head.
struct Lib {
    cfg: llada::hf::config::ModelConfig,
    ck: llada::hf::checkpoint::Checkpoint,
    samples: Vec<Sample>,
    opts: TrainOptions,
    targets: Vec<String>,
    adam: AdamWConfig,
}

impl Lib {
    fn new() -> Lib {
        let samples: Vec<Sample> = (0..5u32)
            .map(|k| (0..16).map(|i| 5 + (i * 5 + k) % 29).collect())
            .map(|ids| Sample { ids, prompt_len: 0 })
            .collect();
        let mut opts = TrainOptions {
            schedule: "linear".into(),
            truncate: false,
            ..TrainOptions::default()
        };
        (opts.steps, opts.warmup, opts.lr) = (5, 2, 1e-2);
        (opts.batch_size, opts.accum, opts.seq_len) = (2, 2, 16);
        Lib {
            cfg: llada::hf::presets::preset_config("tiny").unwrap(),
            ck: llada::hf::presets::preset_checkpoint("tiny", 3, DType::BF16).unwrap(),
            samples,
            adam: AdamWConfig {
                weight_decay: opts.weight_decay,
                ..AdamWConfig::default()
            },
            opts,
            targets: ["q_proj", "ff_out"].map(String::from).to_vec(),
        }
    }
    fn adapter(&self) -> Adapter {
        init_adapter(&self.cfg, &self.targets, 2, 4.0, true, 9).unwrap()
    }
    /// A trainer at `step` with `t` updates taken (0, 0: a fresh run).
    fn trainer(&self, step: u64, t: u64) -> Trainer {
        let mut counter = AdamW::new(self.adam, &Params::default());
        counter.t = t;
        let (cfg, o, smp) = (self.cfg.clone(), self.opts.clone(), self.samples.clone());
        Trainer::with_state(cfg, Params::default(), counter, step, o, smp).unwrap()
    }
}

fn steps<S: StepState>(tr: &mut Trainer, st: &mut S, n: usize) -> Vec<StepStats> {
    (0..n).map(|_| tr.train_step_on(st).unwrap()).collect()
}

/// Loss, gradient norm and learning rate of each step, as bits (after a finiteness check).
fn bits(v: &[StepStats]) -> Vec<[u64; 3]> {
    assert!(v
        .iter()
        .all(|s| s.loss.is_finite() && s.grad_norm.is_finite()));
    v.iter()
        .map(|s| [s.loss.to_bits(), s.grad_norm.to_bits(), s.lr.to_bits()])
        .collect()
}

/// A stopped-and-resumed run through the library: losses, gradient norms and learning rates
/// bit for bit, and the adapter and moments after the save/load round trip.
#[test]
fn library_resume_gives_the_same_step_statistics_bit_for_bit() {
    let dir = tmpdir("lib");
    let lib = Lib::new();
    let (cfg, adam) = (&lib.cfg, lib.adam);
    let params = Params::<f32>::from_checkpoint(cfg, &lib.ck).unwrap();
    let (mut tr, mut st) = (
        lib.trainer(0, 0),
        LoraStep::new(params.clone(), lib.adapter(), adam),
    );
    let straight = steps(&mut tr, &mut st, 5);
    let (mut tr2, mut st2) = (
        lib.trainer(0, 0),
        LoraStep::new(params.clone(), lib.adapter(), adam),
    );
    let mut stats = steps(&mut tr2, &mut st2, 2);
    let run = LoraRun {
        rank: 2,
        alpha: 4.0,
        rslora: true,
        targets: lib.targets.clone(),
        base: BaseModel {
            model: None,
            preset: Some("tiny".into()),
            weights_seed: 3,
            fingerprint: lck::fingerprint_hex(lck::base_fingerprint(cfg, &lib.ck).unwrap()),
        },
    };
    let mut state = tr2.state().unwrap();
    state.lora = Some(run.clone());
    lck::save(&dir, cfg, &st2.adapter, &st2.opt, &state).unwrap();
    let r = lck::load(&dir, cfg).unwrap();
    assert_eq!(r.run, run);
    assert_eq!(r.opt, st2.opt, "moments and step count round-trip exactly");
    assert_eq!(r.adapter.modules, st2.adapter.modules);
    let o: TrainOptions = serde_json::from_value(r.state.options.clone()).unwrap();
    assert_eq!(o, lib.opts);
    let mut tr3 = lib.trainer(r.state.step, r.opt.t);
    let mut st3 = LoraStep::new(params, r.adapter, adam);
    st3.opt = r.opt;
    stats.extend(steps(&mut tr3, &mut st3, 3));
    assert_eq!(bits(&stats), bits(&straight));
    assert_eq!(st3.adapter.modules, st.adapter.modules);
    assert_eq!(st3.opt, st.opt);
    let _ = std::fs::remove_dir_all(&dir);
}

/// On CUDA (skipped with a printed reason without a GPU; it has never run: no GPU here): the
/// moments and update count go device → host → a fresh device state, and 2 steps + that
/// resume + 3 steps equal 5 straight steps bit for bit (same kernels in the same order on the
/// same device; the step statistics, adapter and moments compared exactly).
#[test]
fn cuda_lora_resume_continues_bit_for_bit() {
    use llada::train::cuda::{CudaLoraState, CudaOps};
    let lib = Lib::new();
    let Some(ops) = probe::device_or_skip(|| CudaOps::new(0)) else {
        return;
    };
    let state =
        |ops: CudaOps, ad: &Adapter| CudaLoraState::new(ops, &lib.cfg, &lib.ck, ad).unwrap();
    let ad0 = lib.adapter();
    let (mut tr, mut st) = (lib.trainer(0, 0), state(ops, &ad0));
    let straight = steps(&mut tr, &mut st, 5);
    let (mut tr2, mut st2) = (lib.trainer(0, 0), state(CudaOps::new(0).unwrap(), &ad0));
    let mut stats = steps(&mut tr2, &mut st2, 2);
    let (mut ad, mut opt) = (ad0.clone(), LoraAdamW::new(lib.adam, &ad0));
    st2.download_adapter(&mut ad).unwrap();
    st2.download_moments(&mut opt).unwrap();
    // The update count is the trainer's (one source of truth), not the GPU state's.
    opt.t = tr2.opt.t;
    assert_eq!(opt.t, 2);
    drop(st2);
    let mut st3 = state(CudaOps::new(0).unwrap(), &ad);
    st3.upload_moments(&opt).unwrap();
    let mut tr3 = lib.trainer(2, opt.t);
    stats.extend(steps(&mut tr3, &mut st3, 3));
    assert_eq!(bits(&stats), bits(&straight));
    let (mut a, mut b) = (ad0.clone(), ad0.clone());
    st.download_adapter(&mut a).unwrap();
    st3.download_adapter(&mut b).unwrap();
    assert_eq!(a.modules, b.modules);
    let (mut ma, mut mb) = (opt.clone(), opt);
    st.download_moments(&mut ma).unwrap();
    st3.download_moments(&mut mb).unwrap();
    assert_eq!(ma, mb);
}

/// A LoRA checkpoint of 3 steps of the flags above, for the refusal tests.
fn checkpoint(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (model, data) = (tiny(dir), ids_data(dir));
    let ck = dir.join("ck");
    let args = [
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&ck),
        "--steps",
        "3",
    ];
    ok(&train(&args, &format!("{FLAGS} {LORA}")));
    (model, data, ck)
}

/// Resume `ck` with `extra` flags: must fail with exit code 1 (an error, not a panic), naming
/// `want`, before any step.
fn refused(ck: &Path, data: &Path, out: &Path, extra: &str, want: &str) {
    let o = train(
        &[
            "--resume",
            s(ck),
            "--data",
            s(data),
            "--out",
            s(out),
            "--steps",
            "5",
        ],
        &format!("--device cpu --no-dist {extra}"),
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{extra}: {e}");
    assert!(!e.contains("panicked"), "{extra}: {e}");
    assert!(e.contains(want), "{extra}: want {want:?} in: {e}");
    assert!(!e.contains("step 4/5"), "{extra}: a step ran: {e}");
}

#[test]
fn a_resume_with_other_lora_flags_or_another_base_is_refused_by_name() {
    let dir = tmpdir("mismatch");
    let (model, data, ck) = checkpoint(&dir);
    let out = dir.join("out");
    refused(
        &ck,
        &data,
        &out,
        "--lora-rank 8",
        "--lora-rank 8 differs from the LoRA checkpoint's rank 4",
    );
    refused(
        &ck,
        &data,
        &out,
        "--lora-rank 4 --lora-alpha 16",
        "--lora-alpha 16 differs from the LoRA checkpoint's alpha 8",
    );
    refused(&ck, &data, &out, "--lora-rank 4 --lora-targets q_proj", "--lora-targets q_proj selects other modules than the LoRA checkpoint's targets q_proj,v_proj,ff_out");
    refused(
        &ck,
        &data,
        &out,
        "--lora-rank 4 --lora-rslora",
        "--lora-rslora: the LoRA checkpoint's adapter uses alpha / rank scaling",
    );
    // Another base: the preset with other weights, and a folder of another seed.
    refused(
        &ck,
        &data,
        &out,
        "--preset tiny --weights-seed 7",
        "is not the one the LoRA checkpoint",
    );
    let other = dir.join("other");
    llada::hf::init::write_preset_folder("tiny", &other, 4, DType::F32, 1).unwrap();
    refused(
        &ck,
        &data,
        &out,
        &format!("--model {}", s(&other)),
        "the weights differ",
    );
    // ZeRO has nothing to shard.
    refused(&ck, &data, &out, "--zero 1", "--zero 1 with LoRA");
    // The recorded base moved: named, with the way out.
    let moved = dir.join("moved");
    std::fs::rename(&model, &moved).unwrap();
    refused(&ck, &data, &out, "", "pass --model DIR");
    // Given explicitly, the moved base is accepted (same weights).
    let o = train(
        &[
            "--resume",
            s(&ck),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "4",
        ],
        &format!("--device cpu --no-dist --model {} --lora-rank 4", s(&moved)),
    );
    let e = ok(&o);
    assert!(e.contains("step 4/4"), "{e}");
    // A full fine-tuning checkpoint with --lora-rank, and a LoRA checkpoint read as a full one.
    let full = dir.join("full");
    let args = [
        "--preset",
        "tiny",
        "--data",
        s(&data),
        "--out",
        s(&full),
        "--steps",
        "1",
    ];
    ok(&train(&args, FLAGS));
    refused(
        &full,
        &data,
        &out,
        "--lora-rank 4",
        "is a full fine-tuning checkpoint",
    );
    refused(&full, &data, &out, "--preset tiny", "drop --model/--preset");
    let err = llada::train::checkpoint::load(&ck).err().unwrap();
    assert!(
        format!("{err:#}").contains("a LoRA run's checkpoint"),
        "{err:#}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tensor of `optimizer.safetensors` replaced by `f(name, shape, values)`.
fn rewrite_optimizer(ck: &Path, f: impl Fn(&mut HostTensor)) {
    let p = ck.join("optimizer.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut out: Vec<HostTensor> = names
        .iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n.clone(), DType::F32, t.shape().to_vec(), v)
        })
        .collect();
    for t in out.iter_mut() {
        f(t);
    }
    write_safetensors(&p, &out).unwrap();
}

#[test]
fn hostile_lora_checkpoints_are_clear_errors() {
    let dir = tmpdir("hostile");
    let (_, data, ck) = checkpoint(&dir);
    type Spoil = Box<dyn Fn(&Path)>;
    let truncate = |file: &'static str| -> Spoil {
        Box::new(move |c: &Path| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(c.join(file))
                .unwrap();
            f.set_len(f.metadata().unwrap().len() / 2).unwrap();
        })
    };
    let remove = |file: &'static str| -> Spoil {
        Box::new(move |c: &Path| std::fs::remove_file(c.join(file)).unwrap())
    };
    let is_a = |n: &str| n.starts_with("exp_avg.") && n.ends_with("q_proj.lora_A.weight");
    let cases: Vec<(&str, Spoil, &str)> = vec![
        (
            "truncated optimizer",
            truncate("optimizer.safetensors"),
            "truncated, or from another adapter",
        ),
        (
            "missing optimizer",
            remove("optimizer.safetensors"),
            "a resume needs it",
        ),
        (
            "truncated adapter",
            truncate("adapter_model.safetensors"),
            "adapter_model.safetensors",
        ),
        (
            "missing adapter",
            remove("adapter_model.safetensors"),
            "adapter_model.safetensors",
        ),
        (
            "truncated state",
            truncate("trainer_state.json"),
            "trainer_state.json",
        ),
        (
            "transposed moment",
            Box::new(move |c: &Path| {
                rewrite_optimizer(c, |t| {
                    if is_a(&t.0) {
                        t.2.reverse();
                    }
                })
            }),
            "expected F32 [4, 128]",
        ),
        (
            "NaN moment",
            Box::new(move |c: &Path| {
                rewrite_optimizer(c, |t| {
                    if is_a(&t.0) {
                        t.3[5] = f32::NAN;
                    }
                })
            }),
            "holds NaN at index 5",
        ),
        (
            "negative second moment",
            Box::new(move |c: &Path| {
                rewrite_optimizer(c, |t| {
                    if t.0.starts_with("exp_avg_sq.") {
                        t.3[0] = -1.0;
                    }
                })
            }),
            "must be finite and ≥ 0",
        ),
        (
            "renamed moment",
            Box::new(move |c: &Path| {
                rewrite_optimizer(c, |t| {
                    if is_a(&t.0) {
                        t.0 = t.0.replace("exp_avg.", "exp_avg_other.");
                    }
                })
            }),
            "missing",
        ),
        (
            "record of another rank",
            Box::new(|c: &Path| {
                edit_json(&c.join("trainer_state.json"), |o| {
                    o["lora"]["rank"] = serde_json::json!(8);
                })
            }),
            "the adapter does not match the run's `lora` record",
        ),
        (
            "record of other targets",
            Box::new(|c: &Path| {
                edit_json(&c.join("trainer_state.json"), |o| {
                    o["lora"]["targets"] = serde_json::json!(["q_proj"]);
                })
            }),
            "the adapter does not match the run's `lora` record",
        ),
        (
            "AdamW step off",
            Box::new(|c: &Path| {
                edit_json(&c.join("trainer_state.json"), |o| {
                    o["adam_t"] = serde_json::json!(2);
                })
            }),
            "AdamW step 2 differs from the step 3",
        ),
        (
            "hostile options",
            Box::new(|c: &Path| {
                edit_json(&c.join("trainer_state.json"), |o| {
                    o["options"]["seq_len"] = serde_json::json!(1u64 << 40);
                })
            }),
            "--seq-len 1099511627776",
        ),
    ];
    for (what, spoil, want) in cases {
        let c = dir.join("bad");
        copy_dir(&ck, &c);
        spoil(&c);
        eprintln!("case: {what}");
        refused(&c, &data, &dir.join("resumed"), "", want);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
