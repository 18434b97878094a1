//! `llada train`: pretraining or SFT (reference §6) on the CPU or CUDA GPUs (f32, bf16 GEMMs
//! with `--precision bf16`, or bf16 mixed precision with `--storage bf16`: see
//! `llada::train::mixed` and `llada::train::cuda`), saving Hugging Face folders that
//! `llada generate` loads, with exact resume. Data parallel over several processes (one per
//! GPU) when the environment gives ranks (`srun`, or `RANK`/`WORLD_SIZE`; see
//! `llada::train::dist`). LoRA runs (`--lora-rank`, or `--resume` of a LoRA checkpoint) are in
//! `train/lora.rs`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use llada::engine::device::DeviceChoice;
use llada::engine::{ModelSpec, Opened};
use llada::hf::tokenizer::Tokenizer;
use llada::train::backend::Storage;
use llada::train::checkpoint;
use llada::train::cuda::{CudaOps, CudaTrainState, CudaZeroState, TrainPrecision};
use llada::train::data::{load_pretrain_with, load_sft, Sample};
use llada::train::dist::{DistEnv, HostGroup};
use llada::train::memory::{plan, render};
use llada::train::model::Params;
use llada::train::zero::ZeroStep;
use llada::train::{StepStats, TrainOptions, Trainer};

use crate::ModelArgs;

mod lora;
mod steps;

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Continue from a checkpoint written by `llada train` (its options are reused): a full
    /// model folder, or a LoRA run's --out (adapter + moments; its base model is the recorded
    /// one unless --model/--preset names it, and --lora-* flags given must match the
    /// checkpoint's).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Training data: plain text, or JSONL lines `{"text": "..."}` or `{"ids": [token ids]}`
    /// (pretraining; `ids` needs no tokenizer, e.g. for the random-weight presets); JSONL
    /// `{"prompt", "response"}` or `{"messages"}` with --sft.
    #[arg(long, required_unless_present = "memory_plan")]
    data: Option<PathBuf>,
    /// Supervised fine-tuning loss (the prompt is never masked).
    #[arg(long)]
    sft: bool,
    /// Folder to save checkpoints to (a Hugging Face model folder + optimizer state; for LoRA,
    /// the PEFT adapter + its optimizer state).
    #[arg(long, required_unless_present = "memory_plan")]
    out: Option<PathBuf>,
    /// Total optimizer steps (on --resume: defaults to the checkpoint's).
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per micro-batch on each process (data parallel: the global batch is this
    /// times the number of ranks).
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accum: usize,
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// constant | linear | wsd (warmup–stable–decay, decay over the last 10 %)
    #[arg(long, default_value = "constant")]
    schedule: String,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Turn off upstream's 1 % random-length truncation of pretraining batches.
    #[arg(long)]
    no_truncate: bool,
    /// Save every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// Save nothing (benchmarks: a large model's checkpoint takes long to write).
    #[arg(long, conflicts_with = "save_every")]
    no_save: bool,
    /// What the GPU's GEMMs compute in: f32, or bf16 (tensor cores, f32 accumulation; with
    /// --storage f32 the weights, moments and activations stay f32) [default: bf16 with
    /// --storage bf16, else f32]. On the CPU only as part of --storage bf16.
    #[arg(long = "precision", value_name = "PRECISION")]
    precision_flag: Option<TrainPrecision>,
    /// The run's GEMM precision (--precision, or what --storage implies).
    #[arg(skip)]
    precision: TrainPrecision,
    /// What weights and activations are stored in: f32, or bf16 (bf16 working weights,
    /// activations and activation gradients, bf16 GEMMs with f32 accumulation; f32 master
    /// weights, AdamW moments and weight gradients) [default: f32; on --resume, the
    /// checkpoint's]. Full fine-tuning; on CUDA it has not run on a GPU yet.
    #[arg(long)]
    storage: Option<Storage>,
    /// Peak FLOP/s of the device in TFLOP/s, for the model FLOP utilisation column.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// cpu | cuda | cuda:N (auto means cpu: the CPU is the reference; CUDA trains in f32 or
    /// --precision bf16). Data parallel, `cuda` means GPU `LOCAL_RANK mod <visible GPUs>`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Ignore RANK/WORLD_SIZE and SLURM task variables: train as one process.
    #[arg(long)]
    no_dist: bool,
    /// Shard the optimizer state over the data-parallel ranks: 0 (off) or 1 (ZeRO-1: each rank
    /// keeps the f32 master weights and AdamW moments of 1/N of the parameters; the weights are
    /// bit-identical to the unsharded run on the CPU). Needs 2 or more ranks; on CUDA the sharded
    /// step compiles but has not run on a GPU yet. Not with LoRA (its optimizer state is small).
    #[arg(long, default_value = "0")]
    zero: String,
    /// Print the memory per rank by category (weights, master weights, moments, gradients,
    /// activations) for these options and stop: no weights are loaded, nothing is trained.
    #[arg(long)]
    memory_plan: bool,
    /// With --memory-plan: the number of data-parallel ranks to plan for (a run takes it from
    /// RANK/WORLD_SIZE or srun).
    #[arg(long, requires = "memory_plan")]
    world_size: Option<usize>,
    /// Train a LoRA adapter of this rank on the frozen model instead of the full model (on
    /// CUDA the base stays bf16 on the GPU, only the adapters and their optimizer state are
    /// f32); --out receives the adapter in PEFT's format (`llada generate --lora`) with its
    /// AdamW moments and trainer state, so `--resume OUT` continues it exactly. Data parallel
    /// like full training (the adapters' gradients are summed over the ranks); --zero 1 is
    /// refused (the adapters' optimizer state is small).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha (scale alpha / rank, or alpha / √rank with --lora-rslora) [default: 16].
    #[arg(long, requires = "lora_rank")]
    lora_alpha: Option<f64>,
    /// Comma-separated module-name suffixes to adapt (PEFT `target_modules`; `ff_out` also
    /// selects the LM head) [default: q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out].
    #[arg(long, requires = "lora_rank")]
    lora_targets: Option<String>,
    /// rsLoRA scaling (alpha / √rank).
    #[arg(long, requires = "lora_rank")]
    lora_rslora: bool,
    /// Recompute each layer's activations in the backward pass instead of keeping them all:
    /// activation memory becomes every layer's input plus one layer's activations (the same
    /// losses and weights bit for bit, for about one more forward pass of compute).
    #[arg(long)]
    recompute: bool,
    /// Debugging and parity: write every micro-batch (model input ids with the mask applied,
    /// loss rows, targets, per-sequence mask probability `p`, loss weights) before its step,
    /// and each step's loss, learning rate and gradient norm after it, as JSON lines to this
    /// file (`bench/torch_reference.py --train-replay` replays them). Pretraining, one process.
    #[arg(long, conflicts_with_all = ["sft", "lora_rank"])]
    dump_batches: Option<PathBuf>,
}

/// The `--dump-batches` lines of optimizer step `trainer.step`'s micro-batches (one process:
/// global row = row).
fn dump_micro_batches(trainer: &mut Trainer, out: &mut impl Write) -> Result<()> {
    let (step, o) = (trainer.step, trainer.opts.clone());
    for k in 0..o.accum {
        let b = trainer.micro_batch(step, k)?;
        let micro = step * o.accum as u64 + k as u64;
        let p: Vec<f64> = (0..b.b as u64)
            .map(|row| llada::train::loss::mask_prob(o.seed, micro, row))
            .collect();
        let line = serde_json::json!({
            "step": step, "micro": k, "b": b.b, "t": b.t, "ids": b.ids, "rows": b.rows,
            "targets": b.targets, "p": p, "weights": b.weights,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The start-of-run line on activation memory: the peak of one micro-batch of `b × t` tokens
/// (at most every token a loss row), with and without recomputation, in f32.
fn activation_note(cfg: &llada::hf::config::ModelConfig, b: usize, t: usize, on: bool) -> String {
    activation_note_in(cfg, (b, t), on, Storage::F32)
}

/// [`activation_note`] in `storage`.
fn activation_note_in(
    cfg: &llada::hf::config::ModelConfig,
    (b, t): (usize, usize),
    on: bool,
    storage: Storage,
) -> String {
    let bytes = llada::train::memory::activation_bytes(cfg, b, t, storage);
    let mib = |r: bool| if r { bytes.1 } else { bytes.0 } as f64 / (1u64 << 20) as f64;
    format!(
        "activations per micro-batch of {b} × {t} tokens in {storage} storage: at most {:.1} \
         MiB with --recompute, {:.1} MiB without ({})",
        mib(true),
        mib(false),
        if on { "recomputing" } else { "keeping all" }
    )
}

/// The model's tokenizer; `None` for a model without one (only token-id data then).
impl TrainArgs {
    /// The trainer's options for a run over `world` processes (`steps` defaults to 100).
    fn options(&self, world: usize) -> TrainOptions {
        let a = self;
        TrainOptions {
            steps: a.steps.unwrap_or(100),
            batch_size: a.batch_size,
            accum: a.accum,
            seq_len: a.seq_len,
            lr: a.lr,
            warmup: a.warmup,
            schedule: a.schedule.clone(),
            weight_decay: a.weight_decay,
            clip: a.clip,
            seed: a.seed,
            sft: a.sft,
            truncate: !a.no_truncate,
            world,
        }
    }
}

fn tokenizer_for(
    opened_tok: Option<Tokenizer>,
    tiny: bool,
    out: &Path,
    cfg: &llada::hf::config::ModelConfig,
    lead: bool,
) -> Result<Option<Tokenizer>> {
    if let Some(t) = opened_tok {
        return Ok(Some(t));
    }
    if tiny && !lead {
        // Only rank 0 writes into --out; the others build the same tokenizer privately.
        let tmp = std::env::temp_dir().join(format!("llada-tiny-tok-{}", std::process::id()));
        llada::hf::tiny::write_tiny_tokenizer(&tmp)?;
        let t = Tokenizer::from_dir(&tmp, cfg);
        let _ = std::fs::remove_dir_all(&tmp);
        return t.map(Some);
    }
    if tiny {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        llada::hf::tiny::write_tiny_tokenizer(out)?;
        return Tokenizer::from_dir(out, cfg).map(Some);
    }
    Ok(None)
}

/// The run's samples: SFT needs a tokenizer; pretraining data may be token ids without one.
fn load_samples(
    data: &Path,
    sft: bool,
    tok: Option<&Tokenizer>,
    cfg: &llada::hf::config::ModelConfig,
    seq_len: usize,
) -> Result<Vec<Sample>> {
    match (sft, tok) {
        (true, Some(t)) => load_sft(data, t, seq_len),
        (true, None) => bail!("the model has no tokenizer.json; --sft data cannot be tokenized"),
        (false, t) => load_pretrain_with(
            data,
            t,
            t.map_or(cfg.eos_token_id, |t| t.special.eos),
            seq_len,
        ),
    }
}

/// The options of a run resumed from `dir` (`state`'s, with --steps and the world size of this
/// run; a note when either changes), checked.
fn resumed_options(
    a: &TrainArgs,
    dir: &Path,
    state: &checkpoint::TrainerState,
    cfg: &llada::hf::config::ModelConfig,
    world: usize,
    lead: bool,
) -> Result<TrainOptions> {
    let mut opts: TrainOptions = serde_json::from_value(state.options.clone())
        .with_context(|| format!("{}: trainer_state.json options", dir.display()))?;
    if let Some(s) = a.steps {
        if s != opts.steps && lead {
            eprintln!(
                "note: --steps {s} differs from the checkpoint's {}: the schedule changes, \
                 so this is not the run the checkpoint came from",
                opts.steps
            );
        }
        opts.steps = s;
    }
    if opts.world != world {
        let before = (opts.batch_size, opts.world);
        opts.rescale_world(world)?;
        if lead {
            eprintln!(
                "note: the checkpoint ran on {} ranks × {} sequences; this run splits the same \
                 global batch over {} ranks × {}",
                before.1, before.0, opts.world, opts.batch_size
            );
        }
    }
    checkpoint::check_options(&opts, cfg)
        .with_context(|| format!("{}: trainer_state.json options", dir.display()))?;
    Ok(opts)
}

pub fn cmd_train(mut a: TrainArgs) -> Result<()> {
    a.model.require_f32_compute("llada train")?;
    let zero = llada::train::zero::parse_stage(&a.zero)?;
    if a.memory_plan {
        if let Some(rank) = a.lora_rank {
            crate::train_plan::check_storage_lora(a.storage)?;
            return lora::print_memory_plan(&a, rank);
        }
        let (model, resume, shape) = (&a.model, &a.resume, a.plan_shape());
        return crate::train_plan::print_memory_plan(model, resume, shape, zero, a.storage);
    }
    let dist = if a.no_dist {
        None
    } else {
        DistEnv::from_env()?
    };
    if dist.is_some() {
        // The job secret is checked before any work, so a rank without one stops at once.
        llada::train::dist::JobKey::from_env()?;
    }
    let world = dist.as_ref().map_or(1, |d| d.world);
    let rank = dist.as_ref().map_or(0, |d| d.rank);
    // Rank 0 speaks for the run; the others only report their errors.
    let lead = rank == 0;
    let cuda_device = match a.device.parse::<DeviceChoice>()? {
        DeviceChoice::Cpu | DeviceChoice::Auto => None,
        DeviceChoice::Cuda(i) => {
            llada::engine::device::cuda_available()
                .map_err(|e| anyhow::anyhow!("--device {}: CUDA unavailable: {e}", a.device))?;
            let bare = matches!(
                a.device.trim().to_ascii_lowercase().as_str(),
                "cuda" | "gpu"
            );
            match &dist {
                Some(d) if bare => {
                    let n = llada::backend::cuda::device_count()
                        .map_err(|e| anyhow::anyhow!("counting CUDA devices: {e}"))?;
                    anyhow::ensure!(n > 0, "--device cuda: no CUDA device is visible");
                    Some(d.local_rank % n)
                }
                _ => Some(i),
            }
        }
    };
    // A LoRA run: --lora-rank, or the resume of a LoRA run's checkpoint.
    let resumed = match a.resume.as_deref() {
        Some(dir) => Some(checkpoint::read_state(dir)?),
        None => None,
    };
    let lora_resume = resumed.as_ref().is_some_and(|s| s.lora.is_some());
    if let (Some(dir), false) = (a.resume.as_deref(), lora_resume) {
        if a.lora_rank.is_some() {
            bail!(
                "--lora-rank with --resume {}: that is a full fine-tuning checkpoint (resume it \
                 without --lora-*, or start a LoRA run from a model)",
                dir.display()
            );
        }
        if a.model.model.is_some() || a.model.preset.is_some() {
            bail!(
                "--resume {} is a full fine-tuning checkpoint: the model comes from it (drop \
                 --model/--preset; they name the base model of a LoRA run's checkpoint)",
                dir.display()
            );
        }
    }
    let lora_run = lora_resume || a.lora_rank.is_some();
    if dist.is_some() && cuda_device.is_some() && !lora_run {
        // Every rank checks before the rendezvous, so a missing library is one clear error
        // per rank rather than peers waiting for a rank that already stopped.
        llada::train::nccl::version()
            .context("data-parallel training on CUDA sums gradients with NCCL")?;
    }
    if let Some(d) = &dist {
        if lead {
            eprintln!(
                "data parallel: {} ranks ({}), rendezvous at {}:{}",
                d.world, d.source, d.master_addr, d.master_port
            );
        }
    }
    let flags = (a.storage, a.precision_flag);
    let on = (resumed.as_ref().map(|s| s.storage), cuda_device.is_some());
    let (storage, precision) = crate::train_plan::storage_and_precision(flags, on, lora_run)?;
    a.precision = precision;
    if lora_run {
        return lora::train_lora(&a, cuda_device, dist.as_ref(), zero);
    }
    if zero == 1 {
        crate::train_plan::check_zero(world)?;
    }
    crate::train_plan::check_zero_storage(zero, cuda_device.is_some(), storage)?;
    let (mut trainer, tok, tok_src, tiny) = if let Some(dir) = &a.resume {
        let r = checkpoint::load(dir)?;
        let opts = resumed_options(&a, dir, &r.state, &r.cfg, world, lead)?;
        let tok = if dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_dir(dir, &r.cfg)?)
        } else {
            None
        };
        let samples = load_samples(a.data(), opts.sft, tok.as_ref(), &r.cfg, opts.seq_len)?;
        if lead {
            eprintln!(
                "resuming {} at step {}/{} ({storage} storage, {} GEMMs)",
                dir.display(),
                r.state.step,
                opts.steps,
                a.precision
            );
        }
        let t = Trainer::with_state(r.cfg, r.params, r.opt, r.state.step, opts, samples)?;
        (t, tok, Some(dir.clone()), false)
    } else {
        let spec = a.model.spec()?;
        let tiny = matches!(&spec, ModelSpec::Preset { name, .. } if name == "tiny");
        let src = match &spec {
            ModelSpec::Dir(d) => Some(d.clone()),
            _ => None,
        };
        let opened = Opened::open(&spec)?;
        let cfg = opened.cfg.clone();
        let params = Params::<f32>::from_checkpoint(&cfg, &opened.ckpt)?;
        let tok = tokenizer_for(opened.tokenizer, tiny, a.out(), &cfg, lead)?;
        let opts = a.options(world);
        checkpoint::check_options(&opts, &cfg)?;
        let samples = load_samples(a.data(), a.sft, tok.as_ref(), &cfg, a.seq_len)?;
        if lead {
            eprintln!(
                "training {} ({} parameters) on {} sequences of {} tokens, {} {} storage, {} \
                 GEMMs, global batch {} × {} accumulation",
                opened.label,
                params.numel(),
                samples.len(),
                a.seq_len,
                if cuda_device.is_some() { "CUDA" } else { "CPU" },
                storage,
                a.precision,
                a.batch_size * world,
                a.accum
            );
        }
        (Trainer::new(cfg, params, opts, samples)?, tok, src, tiny)
    };
    let _ = &tok;
    trainer.recompute = a.recompute;
    trainer.storage = storage;
    if lead {
        let o = &trainer.opts;
        let shape = (o.batch_size, o.seq_len);
        let note = activation_note_in(&trainer.cfg, shape, a.recompute, storage);
        eprintln!("{note}");
        let p = plan(&trainer.cfg, shape.0, shape.1, world, zero, storage)?;
        eprint!(
            "memory per rank (estimate, llada train --memory-plan):\n{}",
            render(&[p])
        );
    }
    let mut gpu_zero = None;
    let mut gpu = match cuda_device {
        Some(i) => {
            let mut ops = CudaOps::new(i)?;
            ops.set_precision(a.precision);
            eprintln!(
                "{}device: cuda:{i} ({}), precision {}: {}",
                if dist.is_some() {
                    format!("rank {rank}: ")
                } else {
                    String::new()
                },
                ops.be.device_name(),
                a.precision,
                crate::train_plan::describe(storage, a.precision)
            );
            if zero == 1 {
                // Only this rank's shard of the moments goes to the GPU.
                let z = CudaZeroState::new(ops, &trainer.params, &trainer.opt, world, rank)?;
                gpu_zero = Some(z);
                None
            } else {
                let mut st =
                    CudaTrainState::new(ops, &trainer.params, &trainer.opt.m, &trainer.opt.v)?;
                st.set_storage(storage)?;
                Some(st)
            }
        }
        None => None,
    };
    let mut sharded = None;
    if let Some(d) = &dist {
        let group = HostGroup::join(d, trainer.options_fingerprint()?)?;
        trainer.join_group(group)?;
        if let Some(g) = trainer.group() {
            g.check_same("--zero stages", zero as u64)?;
        }
        if zero == 1 && gpu_zero.is_none() {
            sharded = Some(trainer.shard_optimizer()?);
        } else if zero == 1 {
            // The GPU holds the state: the host's whole moments are not needed any more.
            trainer.opt.m = Params::default();
            trainer.opt.v = Params::default();
        }
        let resident = match (gpu.as_mut(), gpu_zero.as_mut()) {
            (Some(g), _) => Some(g),
            (None, Some(z)) => Some(&mut z.store.gpu),
            (None, None) => None,
        };
        if let Some(g) = resident {
            // Rank 0 makes the NCCL id; the TCP group hands it to everyone.
            let mut id = if rank == 0 {
                llada::train::nccl::unique_id()?.to_bytes()
            } else {
                Vec::new()
            };
            let group = trainer
                .group()
                .ok_or_else(|| anyhow::anyhow!("no process group after joining"))?;
            group.broadcast(&mut id)?;
            let id = llada::train::nccl::UniqueId::from_bytes(&id)?;
            g.attach_nccl(&id, rank, world)?;
            if lead {
                let (v, path) = llada::train::nccl::version()?;
                eprintln!("NCCL {v} ({path}): gradients summed on the GPUs");
            }
        }
    }
    let save = |t: &Trainer| -> Result<()> {
        if !lead {
            return Ok(());
        }
        checkpoint::save(
            a.out(),
            &t.cfg,
            &t.params,
            &t.opt,
            &t.state()?,
            tok_src.as_deref(),
            tiny,
        )
    };
    let mut run = FullRun {
        gpu,
        gpu_zero,
        sharded,
        lead,
        save,
    };
    let r = steps::Report {
        lead,
        world,
        full: true,
    };
    if steps::run_steps(&a, &mut trainer, &mut run, r)? && lead {
        eprintln!("saved {} (step {})", a.out().display(), trainer.step);
    }
    Ok(())
}

/// A full fine-tuning run's step state for [`steps::run_steps`]: the GPU's resident state
/// (whole, or ZeRO-1 sharded), the host's sharded optimizer, or (all `None`) the trainer's own
/// tensors; `save` writes the checkpoint on rank 0.
struct FullRun<F> {
    gpu: Option<CudaTrainState>,
    gpu_zero: Option<CudaZeroState>,
    sharded: Option<ZeroStep>,
    lead: bool,
    save: F,
}

impl<F: Fn(&Trainer) -> Result<()>> steps::RunState for FullRun<F> {
    fn step(&mut self, trainer: &mut Trainer) -> Result<StepStats> {
        match (
            self.gpu.as_mut(),
            self.gpu_zero.as_mut(),
            self.sharded.as_mut(),
        ) {
            (Some(g), _, _) => trainer.train_step_cuda(g),
            (None, Some(z), _) => trainer.train_step_on(z),
            (None, None, Some(z)) => trainer.train_step_on(z),
            (None, None, None) => trainer.train_step(),
        }
    }

    fn save(&mut self, trainer: &mut Trainer) -> Result<()> {
        let save = &self.save;
        if let Some(z) = &self.sharded {
            // Every rank sends its shard of the moments to rank 0, which saves.
            trainer.save_sharded(z, save)
        } else if let Some(z) = &self.gpu_zero {
            let (p, m, v) = z.download()?;
            trainer.save_shards(&p, &z.layout, &m, &v, save)
        } else if self.lead {
            if let Some(g) = &self.gpu {
                trainer.pull_from_cuda(g)?;
            }
            save(trainer)
        } else {
            Ok(())
        }
    }
}

impl TrainArgs {
    /// --data (clap requires it unless --memory-plan).
    fn data(&self) -> &Path {
        self.data.as_deref().unwrap_or(Path::new(""))
    }
    /// --out (clap requires it unless --memory-plan).
    fn out(&self) -> &Path {
        self.out.as_deref().unwrap_or(Path::new(""))
    }
    /// (batch size, sequence length, world size) for --memory-plan.
    fn plan_shape(&self) -> (usize, usize, usize) {
        (self.batch_size, self.seq_len, self.world_size.unwrap_or(1))
    }
}
