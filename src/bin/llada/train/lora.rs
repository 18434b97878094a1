//! `llada train --lora-rank R`, and `llada train --resume DIR` of a LoRA run's checkpoint
//! (`llada::train::lora_checkpoint`): a frozen base, the adapter trained on the trainer's step,
//! one process or data parallel (the adapters' gradients summed over the ranks; ZeRO is refused:
//! the adapters' optimizer state is small).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use llada::engine::{ModelSpec, Opened};
use llada::lora::train::{init_adapter, select_modules, LoraAdamW};
use llada::lora::Adapter;
use llada::train::checkpoint::{self, TrainerState};
use llada::train::cuda::{CudaLoraState, CudaOps};
use llada::train::dist::{checksum_f32, DistEnv, HostGroup};
use llada::train::lora::{lora_memory, LoraStep};
use llada::train::lora_checkpoint::{self as lck, BaseModel, LoraRun};
use llada::train::model::Params;
use llada::train::optim::{AdamW, AdamWConfig};
use llada::train::{StepState, StepStats, Trainer};

use super::steps::{run_steps, Report, RunState};
use super::{activation_note, load_samples, resumed_options, tokenizer_for, TrainArgs};

/// The default of `--lora-alpha` and `--lora-targets` for a new run.
pub const DEFAULT_ALPHA: f64 = 16.0;
pub const DEFAULT_TARGETS: &str = "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out";

/// `--lora-targets` as a list.
fn target_list(s: &str) -> Result<Vec<String>> {
    let v: Vec<String> = s
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if v.is_empty() {
        bail!("--lora-targets is empty");
    }
    Ok(v)
}

/// The base model of a resume: `--model`/`--preset` when given, else the one recorded.
fn base_spec(a: &TrainArgs, dir: &Path, run: &LoraRun) -> Result<ModelSpec> {
    if a.model.model.is_some() || a.model.preset.is_some() {
        return a.model.spec();
    }
    match (&run.base.model, &run.base.preset) {
        (Some(m), _) => {
            if !m.is_dir() {
                bail!(
                    "the base model of the LoRA checkpoint {}, {}, is not a folder here: pass \
                     --model DIR (the same model, moved)",
                    dir.display(),
                    m.display()
                );
            }
            Ok(ModelSpec::Dir(m.clone()))
        }
        (None, Some(p)) => Ok(ModelSpec::Preset {
            name: p.clone(),
            seed: run.base.weights_seed,
        }),
        (None, None) => bail!(
            "the LoRA checkpoint {} records no base model: pass --model or --preset",
            dir.display()
        ),
    }
}

/// The `--lora-*` flags given on a resume must be the checkpoint's (a resume continues the
/// same adapter); each mismatch is named.
fn check_resume_flags(
    a: &TrainArgs,
    run: &LoraRun,
    cfg: &llada::hf::config::ModelConfig,
) -> Result<()> {
    let ck = "the LoRA checkpoint's";
    let hint = "a resume continues the same adapter: drop the flag, or start a new run";
    if let Some(r) = a.lora_rank.filter(|&r| r != run.rank) {
        bail!(
            "--lora-rank {r} differs from {ck} rank {} ({hint})",
            run.rank
        );
    }
    if let Some(x) = a.lora_alpha.filter(|&x| x != run.alpha) {
        bail!(
            "--lora-alpha {x} differs from {ck} alpha {} ({hint})",
            run.alpha
        );
    }
    if a.lora_rslora && !run.rslora {
        bail!("--lora-rslora: {ck} adapter uses alpha / rank scaling ({hint})");
    }
    if let Some(t) = &a.lora_targets {
        let given = select_modules(cfg, &target_list(t)?)?;
        if given != select_modules(cfg, &run.targets)? {
            bail!(
                "--lora-targets {t} selects other modules than {ck} targets {} ({hint})",
                run.targets.join(",")
            );
        }
    }
    Ok(())
}

/// Where the base of a new run came from, for the checkpoint's record.
fn base_record(a: &TrainArgs, fingerprint: u64) -> BaseModel {
    let abs = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
    BaseModel {
        model: a.model.model.as_ref().map(abs),
        preset: a.model.preset.clone(),
        weights_seed: a.model.weights_seed,
        fingerprint: lck::fingerprint_hex(fingerprint),
    }
}

/// A hash of the adapter and its optimizer state (every rank must start from the same).
fn adapter_checksum(ad: &Adapter, opt: &LoraAdamW) -> u64 {
    let mut h = opt.t;
    for st in [None, Some(&opt.m), Some(&opt.v)] {
        let t: Vec<Vec<f32>> = match st {
            None => ad.tensors().into_iter().map(|t| t.3).collect(),
            Some(g) => g
                .modules
                .values()
                .flat_map(|(a, b)| [a.clone(), b.clone()])
                .collect(),
        };
        h = h.rotate_left(1) ^ checksum_f32(&t);
    }
    h
}

/// `llada train --lora-rank R --memory-plan`: the device memory of one rank's LoRA run over
/// micro-batches of `batch × seq` tokens ([`lora_memory`]: the frozen bf16 base, the adapters with
/// their f32 moments, activations with and without `--recompute`). The config and the adapter's
/// shapes only; no weights are read.
pub(super) fn print_memory_plan(a: &TrainArgs, rank: usize) -> Result<()> {
    let (cfg, label) = crate::train_plan::plan_config(&a.model)?;
    let (batch, seq, world) = (a.batch_size, a.seq_len, a.world_size.unwrap_or(1));
    if seq == 0 || batch == 0 {
        bail!("--batch-size and --seq-len must be positive");
    }
    let alpha = a.lora_alpha.unwrap_or(DEFAULT_ALPHA);
    let targets = target_list(a.lora_targets.as_deref().unwrap_or(DEFAULT_TARGETS))?;
    let adapter = init_adapter(&cfg, &targets, rank, alpha, a.lora_rslora, a.seed)
        .context("--lora-rank / --lora-targets")?;
    let n: usize = adapter
        .modules
        .values()
        .map(|m| m.a.len() + m.b.len())
        .sum();
    println!(
        "LoRA memory plan: {label}, rank {rank}, {} modules ({n} adapter parameters), \
         micro-batch {batch} × {seq} tokens per rank",
        adapter.modules.len()
    );
    for (what, recompute) in [("all activations kept", false), ("--recompute", true)] {
        let m = lora_memory(&cfg, &adapter, batch, seq, recompute);
        println!("{what}: {}", m.describe());
    }
    println!(
        "Every rank holds all of it ({world} rank{}: data parallel does not shard a LoRA run); the \
         CUDA context and cuBLAS workspace (a few hundred MiB) are not included.",
        if world == 1 { "" } else { "s" }
    );
    Ok(())
}

/// `llada train` of a LoRA adapter (module docs): a new one (`--lora-rank`) or a resumed one.
pub(super) fn train_lora(
    a: &TrainArgs,
    cuda: Option<usize>,
    dist: Option<&DistEnv>,
    zero: u8,
) -> Result<()> {
    if zero != 0 {
        bail!(
            "--zero {zero} with LoRA: the adapters' optimizer state is small (two f32 moments per \
             adapter parameter), so it is not sharded; use --zero 0 (each rank keeps a whole copy)"
        );
    }
    if a.dump_batches.is_some() {
        bail!("--dump-batches is for full pretraining runs, not LoRA");
    }
    let (world, rank) = dist.map_or((1, 0), |d| (d.world, d.rank));
    let lead = rank == 0;
    let resumed = match &a.resume {
        Some(dir) => {
            let state = checkpoint::read_state(dir)?;
            let run = state.lora.clone().with_context(|| {
                format!(
                    "{}: not a LoRA checkpoint (no `lora` record)",
                    dir.display()
                )
            })?;
            Some((dir, run))
        }
        None => None,
    };
    let spec = match &resumed {
        Some((dir, run)) => base_spec(a, dir, run)?,
        None => a.model.spec()?,
    };
    let tiny = matches!(&spec, ModelSpec::Preset { name, .. } if name == "tiny");
    let opened = Opened::open(&spec)?;
    let cfg = opened.cfg.clone();
    let fp = lck::base_fingerprint(&cfg, &opened.ckpt)?;
    let (adapter, lopt, step, opts, run) = match &resumed {
        Some((dir, run)) => {
            check_resume_flags(a, run, &cfg)?;
            if run.base.fingerprint != lck::fingerprint_hex(fp) {
                bail!(
                    "the base model {} is not the one the LoRA checkpoint {} was trained on \
                     ({}): the weights differ (fingerprint {} vs {})",
                    opened.label,
                    dir.display(),
                    run.base.describe(),
                    lck::fingerprint_hex(fp),
                    run.base.fingerprint
                );
            }
            let r = lck::load(dir, &cfg)?;
            let opts = resumed_options(a, dir, &r.state, &cfg, world, lead)?;
            if lead {
                eprintln!(
                    "resuming the LoRA run {} at step {}/{} on {}",
                    dir.display(),
                    r.state.step,
                    opts.steps,
                    opened.label
                );
            }
            (r.adapter, r.opt, r.state.step, opts, r.run)
        }
        None => {
            let rank = a
                .lora_rank
                .context("--lora-rank is required for a new LoRA run")?;
            let alpha = a.lora_alpha.unwrap_or(DEFAULT_ALPHA);
            if !(alpha.is_finite() && alpha > 0.0) {
                bail!("--lora-alpha must be a positive number, got {alpha}");
            }
            let targets = target_list(a.lora_targets.as_deref().unwrap_or(DEFAULT_TARGETS))?;
            let adapter = init_adapter(&cfg, &targets, rank, alpha, a.lora_rslora, a.seed)
                .context("--lora-rank / --lora-targets")?;
            let adam = AdamWConfig {
                weight_decay: a.weight_decay,
                ..AdamWConfig::default()
            };
            let opts = a.options(world);
            checkpoint::check_options(&opts, &cfg)?;
            let run = LoraRun {
                rank,
                alpha,
                rslora: a.lora_rslora,
                targets,
                base: base_record(a, fp),
            };
            let lopt = LoraAdamW::new(adam, &adapter);
            (adapter, lopt, 0, opts, run)
        }
    };
    let tok = tokenizer_for(opened.tokenizer, tiny, a.out(), &cfg, lead)?;
    let samples = load_samples(a.data(), opts.sft, tok.as_ref(), &cfg, opts.seq_len)?;
    let (b, t) = (opts.batch_size, opts.seq_len);
    if lead {
        let n_lora: usize = adapter
            .modules
            .values()
            .map(|m| m.a.len() + m.b.len())
            .sum();
        let base_numel: usize = opened
            .ckpt
            .names()
            .filter_map(|n| opened.ckpt.get(n).ok())
            .map(|t| t.numel())
            .sum();
        eprintln!(
            "training a rank-{} LoRA adapter ({} modules, {n_lora} parameters) on {} (frozen, \
             {base_numel} parameters), {} sequences of {t} tokens, {}, {}batch {} × {} \
             accumulation",
            run.rank,
            adapter.modules.len(),
            opened.label,
            samples.len(),
            match cuda {
                Some(_) => format!(
                    "CUDA: bf16 base, f32 adapters, {} adapter GEMMs",
                    a.precision
                ),
                None => "CPU f32".to_string(),
            },
            if world > 1 { "global " } else { "" },
            opts.global_batch(),
            opts.accum
        );
        eprintln!("{}", activation_note(&cfg, b, t, a.recompute));
        eprintln!(
            "LoRA GPU memory (computed from the shapes, per micro-batch of {b} × {t}): {} with \
             --recompute; {} without",
            lora_memory(&cfg, &adapter, b, t, true).describe(),
            lora_memory(&cfg, &adapter, b, t, false).describe()
        );
    }
    // The trainer only schedules and batches: its own (full-model) tensors stay empty; its
    // AdamW only counts the updates.
    let mut counter = AdamW::new(lopt.cfg, &Params::default());
    counter.t = lopt.t;
    let mut trainer =
        Trainer::with_state(cfg.clone(), Params::default(), counter, step, opts, samples)?;
    trainer.recompute = a.recompute;
    if let Some(d) = dist {
        let group = HostGroup::join(d, trainer.options_fingerprint()?)?;
        trainer.join_group(group)?;
        let g = trainer.group().context("no process group after joining")?;
        g.check_same("--zero stages", zero as u64)?;
        g.check_same("base model weights", fp)?;
        g.check_same(
            "LoRA adapter or its optimizer state",
            adapter_checksum(&adapter, &lopt),
        )?;
        if lead {
            eprintln!("data parallel LoRA: the adapters' gradients are summed over {world} ranks");
        }
    }
    let out = a.out().to_path_buf();
    let record = |tr: &Trainer, lopt: &LoraAdamW| -> Result<TrainerState> {
        let mut s = tr.state()?;
        s.adam_t = lopt.t;
        s.lora = Some(run.clone());
        Ok(s)
    };
    match cuda {
        Some(i) => {
            let mut ops = CudaOps::new(i)?;
            ops.set_precision(a.precision);
            let name = ops.be.device_name();
            eprintln!("rank {rank}: device: cuda:{i} ({name})");
            let mut state = CudaLoraState::new(ops, &cfg, &opened.ckpt, &adapter)?;
            state.upload_moments(&lopt)?;
            let (mut host, mut hopt) = (adapter, lopt);
            lora_loop(a, trainer, &mut state, lead, |st, tr| {
                st.download_adapter(&mut host)?;
                st.download_moments(&mut hopt)?;
                hopt.t = tr.opt.t;
                lck::save(&out, &cfg, &host, &hopt, &record(tr, &hopt)?)
            })?;
            let (_, total) = state.ops.be.mem_info()?;
            eprintln!(
                "peak GPU memory in use: {:.2} GiB of {:.2} GiB (cuMemGetInfo total − free, \
                 sampled in the backward passes)",
                state.peak_bytes()? as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
            Ok(())
        }
        None => {
            let params = Params::<f32>::from_checkpoint(&cfg, &opened.ckpt)?;
            let mut state = LoraStep::new(params, adapter, lopt.cfg);
            state.opt = lopt;
            lora_loop(a, trainer, &mut state, lead, |st, tr| {
                lck::save(&out, &cfg, &st.adapter, &st.opt, &record(tr, &st.opt)?)
            })
        }
    }
}

/// A LoRA run's step state for [`run_steps`]: `state`, with rank 0 saving the checkpoint
/// through `save`.
struct LoraRunState<'s, S, F> {
    state: &'s mut S,
    lead: bool,
    save: F,
}

impl<S: StepState, F: FnMut(&S, &Trainer) -> Result<()>> RunState for LoraRunState<'_, S, F> {
    fn step(&mut self, trainer: &mut Trainer) -> Result<StepStats> {
        trainer.train_step_on(self.state)
    }

    fn save(&mut self, trainer: &mut Trainer) -> Result<()> {
        if self.lead {
            (self.save)(self.state, trainer)?;
        }
        Ok(())
    }
}

/// The steps of a LoRA run on `state` ([`run_steps`]); rank 0 reports and saves the checkpoint
/// through `save`.
fn lora_loop<S: StepState>(
    a: &TrainArgs,
    mut trainer: Trainer,
    state: &mut S,
    lead: bool,
    save: impl FnMut(&S, &Trainer) -> Result<()>,
) -> Result<()> {
    let mut run = LoraRunState { state, lead, save };
    let r = Report {
        lead,
        world: trainer.opts.world,
        full: false,
    };
    if run_steps(a, &mut trainer, &mut run, r)? && lead {
        eprintln!(
            "saved the LoRA adapter to {} (step {}; load it with llada generate --lora {}, or \
             continue with llada train --resume {})",
            a.out().display(),
            trainer.step,
            a.out().display(),
            a.out().display()
        );
    }
    Ok(())
}
