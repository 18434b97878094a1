//! Training: the masked-diffusion losses of reference §6, backward passes, AdamW, data and
//! checkpoints — a CPU reference in f32.
//!
//! - [`ops`]: every op's forward (keeping what the backward needs) and backward, generic over
//!   f32/f64 ([`ops::Real`]) so gradients are checked by finite differences in f64.
//! - [`backend`]: [`backend::TrainOps`], the training ops as one interface, on the host
//!   ([`backend::HostOps`], over [`ops`]) and on CUDA ([`cuda::CudaOps`]).
//! - [`model`]: whole-model forward + backward over the checkpoint's tensor names ([`Params`]),
//!   written once over [`backend::TrainOps`] ([`model::forward_backward_on`]).
//! - [`loss`]: pretraining / SFT masking and loss weights, counter-based RNG streams 16–19.
//! - [`optim`]: AdamW (f32 master weights and moments), schedules, clipping.
//! - [`data`]: text / JSONL loading, packing, SFT formatting, deterministic sample order.
//! - [`checkpoint`]: Hugging Face folder + optimizer state; exact resume ([`lora_checkpoint`]:
//!   a LoRA run's, the PEFT adapter + its moments).
//! - [`Trainer`]: one optimizer step = `accum` micro-batches of `batch_size` sequences, written
//!   once over [`StepState`] (the host's tensors, [`HostStep`], or a GPU's resident state).
//!
//! - [`cuda`]: the same step on one CUDA GPU (f32 kernels + cuBLAS f32 GEMMs, AdamW on the
//!   device), driven by [`Trainer::train_step_cuda`]; the CPU path stays the reference.
//! - [`dist`] + [`nccl`]: data parallelism, one process per GPU (or CPU process): each rank
//!   computes the gradient of its rows of the global batch, the gradients are summed (NCCL on
//!   the GPU, TCP on the CPU) and every rank takes the same AdamW step
//!   ([`Trainer::join_group`]).
//! - [`zero`]: ZeRO-1, the optimizer state sharded over those ranks
//!   ([`Trainer::shard_optimizer`]); [`memory`]: bytes per rank of a run, by category.
//! - [`mixed`]: bf16 storage (`--storage bf16`: bf16 weights and activations, f32 master
//!   weights, moments and weight gradients), what each buffer holds, its CPU reference.

pub mod backend;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod dist;
pub mod dist_auth;
pub mod dist_env;
pub mod lora;
pub mod lora_checkpoint;
pub mod loss;
pub mod memory;
pub mod mixed;
pub mod model;
pub mod nccl;
pub mod ops;
pub mod optim;
pub mod zero;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use crate::hf::config::ModelConfig;
use backend::Storage;
use data::Sample;
use model::{Batch, Params, PassOptions};
use optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule};

/// The options of a run (saved in the checkpoint; a resume reuses them).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    /// Total optimizer steps.
    pub steps: u64,
    /// Sequences per micro-batch on each rank (the global micro-batch is `batch_size·world`).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    pub accum: usize,
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup: u64,
    /// `constant`, `linear` or `wsd`.
    pub schedule: String,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
    pub seed: u64,
    /// SFT loss (prompt never masked) instead of pretraining.
    pub sft: bool,
    /// Pretraining: cut 1 % of the batches to a random length (upstream); tests turn it off.
    pub truncate: bool,
    /// Data-parallel ranks the batch is split over (1: one process).
    #[serde(default = "one")]
    pub world: usize,
}

fn one() -> usize {
    1
}

impl TrainOptions {
    /// The sequences of one global micro-batch (all ranks).
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.world
    }

    /// The same global batch split over `world` ranks instead (a resume on another number of
    /// GPUs): errors unless it divides evenly.
    pub fn rescale_world(&mut self, world: usize) -> Result<()> {
        let global = self.global_batch();
        ensure!(world > 0, "a world of 0 ranks");
        ensure!(
            global % world == 0,
            "the run's global batch of {global} sequences ({} per rank × {} ranks) does not \
             split over {world} ranks",
            self.batch_size,
            self.world
        );
        self.batch_size = global / world;
        self.world = world;
        Ok(())
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 100,
            batch_size: 4,
            accum: 1,
            seq_len: 128,
            lr: 1e-3,
            warmup: 10,
            schedule: "constant".into(),
            weight_decay: 0.1,
            clip: 1.0,
            seed: 0,
            sft: false,
            truncate: true,
            world: 1,
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// Optimizer step just completed (1-based).
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed (all micro-batches).
    pub tokens: usize,
    /// Masked (loss) rows.
    pub masked: usize,
    /// Model FLOPs of the step (estimate, see [`step_flops`]).
    pub flops: f64,
}

/// Model FLOPs of one forward + backward over `batch`: `6·(matrix params per token)` for the
/// transformer blocks on every token, `6·V·C` per loss row for the LM head, and
/// `12·L·B·T²·NH·HD` for attention (scores and weighted sum, forward ×3).
pub fn step_flops(cfg: &ModelConfig, b: usize, t: usize, rows: usize) -> f64 {
    let (c, hd, f) = (
        cfg.d_model as f64,
        cfg.head_dim() as f64,
        cfg.mlp_hidden_size as f64,
    );
    let (qw, kw) = (cfg.n_heads as f64 * hd, cfg.n_kv_heads as f64 * hd);
    let l = cfg.n_layers as f64;
    let per_tok = l * (c * (qw + 2.0 * kw) + qw * c + 3.0 * c * f);
    let n = (b * t) as f64;
    6.0 * per_tok * n
        + 6.0 * cfg.embedding_size as f64 * c * rows as f64
        + 12.0 * l * b as f64 * (t * t) as f64 * qw
}

/// Where a step's gradients and update live: the trainer's host tensors ([`HostStep`]) or a
/// GPU's resident state ([`cuda::CudaTrainState`]). [`Trainer`]'s step is written once over it.
pub trait StepState {
    /// Clear the gradients before the step's micro-batches.
    fn zero_grad(&mut self) -> Result<()>;
    /// [`model::forward_backward_on`] of `b` with the run's pass options (`o`: per-layer
    /// recomputation), adding into the gradients; returns the loss.
    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64>;
    /// Sum the gradients over the data-parallel ranks (`group` on the host, NCCL on the GPU).
    fn all_reduce_grads(&mut self, group: &mut dist::HostGroup) -> Result<()>;
    /// Clip to the global norm `max_norm` (0 = off) and take AdamW update number `opt.t + 1`
    /// at `lr` (advancing `opt.t`). Returns the gradient norm before clipping.
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64>;
    /// [`StepState::clip_and_step`] within the run's data-parallel `group` (a sharded
    /// optimizer, [`zero::ZeroStep`], needs it for the global norm and the weights' all-gather).
    fn clip_and_step_in(
        &mut self,
        group: Option<&mut dist::HostGroup>,
        opt: &mut AdamW,
        lr: f64,
        max_norm: f64,
    ) -> Result<f64> {
        let _ = group;
        self.clip_and_step(opt, lr, max_norm)
    }
}

/// The host's step state: f32 parameters (the master weights in bf16 storage) and
/// gradients, AdamW's moments in the [`AdamW`].
pub struct HostStep {
    pub params: Params<f32>,
    pub grad: Params<f32>,
    /// What the pass stores its weights and activations in ([`mixed`]).
    pub storage: Storage,
}

impl StepState for HostStep {
    fn zero_grad(&mut self) -> Result<()> {
        self.grad.fill_zero();
        Ok(())
    }
    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64> {
        let (p, g) = (&self.params, &mut self.grad);
        Ok(mixed::forward_backward_stored(cfg, self.storage, p, b, g, o)?.loss)
    }
    fn all_reduce_grads(&mut self, group: &mut dist::HostGroup) -> Result<()> {
        for d in &mut self.grad.data {
            group.all_reduce_f32(d)?;
        }
        Ok(())
    }
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = clip_grad_norm(&mut self.grad, max_norm);
        opt.step(&mut self.params, &self.grad, lr);
        Ok(norm)
    }
}

/// A training run on the host.
pub struct Trainer {
    pub cfg: ModelConfig,
    pub params: Params<f32>,
    pub opt: AdamW,
    pub grad: Params<f32>,
    /// Optimizer steps completed.
    pub step: u64,
    pub opts: TrainOptions,
    samples: Vec<Sample>,
    schedule: Schedule,
    order: Option<(u64, Vec<usize>)>,
    /// This process's rank (0 without data parallelism).
    pub rank: usize,
    group: Option<dist::HostGroup>,
    /// Recompute each layer's activations in the backward pass of the host step
    /// ([`PassOptions::recompute`]; the same results, less memory).
    pub recompute: bool,
    /// The storage of the host step's weights and activations ([`mixed`]; saved in the
    /// checkpoint's trainer state, so a resume continues in it).
    pub storage: Storage,
}

impl Trainer {
    /// A fresh run from `params`.
    pub fn new(
        cfg: ModelConfig,
        params: Params<f32>,
        opts: TrainOptions,
        samples: Vec<Sample>,
    ) -> Result<Trainer> {
        let opt = AdamW::new(
            AdamWConfig {
                weight_decay: opts.weight_decay,
                ..AdamWConfig::default()
            },
            &params,
        );
        Trainer::with_state(cfg, params, opt, 0, opts, samples)
    }

    /// A run continued from a checkpoint (`step` steps done, optimizer state `opt`).
    pub fn with_state(
        cfg: ModelConfig,
        params: Params<f32>,
        opt: AdamW,
        step: u64,
        opts: TrainOptions,
        samples: Vec<Sample>,
    ) -> Result<Trainer> {
        ensure!(!samples.is_empty(), "no training samples");
        ensure!(
            opts.batch_size > 0 && opts.accum > 0 && opts.world > 0,
            "--batch-size, --accum and the world size must be positive"
        );
        ensure!(
            opts.seq_len <= cfg.max_sequence_length,
            "--seq-len {} exceeds the model's max_sequence_length {}",
            opts.seq_len,
            cfg.max_sequence_length
        );
        for (i, s) in samples.iter().enumerate() {
            ensure!(
                s.ids.len() == opts.seq_len,
                "sample {i} has {} tokens, expected --seq-len {}",
                s.ids.len(),
                opts.seq_len
            );
            if let Some(&id) = s.ids.iter().find(|&&id| id as usize >= cfg.embedding_size) {
                anyhow::bail!(
                    "sample {i} holds token id {id}, outside the model's {} embedding rows",
                    cfg.embedding_size
                );
            }
        }
        let schedule = Schedule::parse(&opts.schedule, opts.steps)?;
        let grad = {
            let mut g = params.clone();
            g.fill_zero();
            g
        };
        Ok(Trainer {
            cfg,
            params,
            opt,
            grad,
            step,
            opts,
            samples,
            schedule,
            order: None,
            rank: 0,
            group: None,
            recompute: false,
            storage: Storage::F32,
        })
    }

    /// Take part in a data-parallel run as `group.rank` of `group.world` (= `opts.world`):
    /// checks that every rank has the same options, data and starting weights, then each step
    /// computes this rank's rows of the global batch and sums gradients and statistics over the
    /// group ([`Trainer::train_step`] on the CPU; on the GPU the gradients go through the
    /// state's NCCL communicator, [`cuda::CudaTrainState::attach_nccl`]).
    pub fn join_group(&mut self, mut group: dist::HostGroup) -> Result<()> {
        ensure!(
            group.world == self.opts.world,
            "the group has {} ranks, the options say {}",
            group.world,
            self.opts.world
        );
        group.check_same("training options", self.options_fingerprint()?)?;
        group.check_same("training data", self.data_fingerprint())?;
        group.check_same(
            "starting weights or optimizer state",
            dist::checksum_f32(&self.params.data)
                ^ dist::checksum_f32(&self.opt.m.data).rotate_left(1)
                ^ dist::checksum_f32(&self.opt.v.data).rotate_left(2)
                ^ self.step.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        )?;
        self.rank = group.rank;
        self.group = Some(group);
        Ok(())
    }

    /// The group of a data-parallel run, if any.
    pub fn group(&mut self) -> Option<&mut dist::HostGroup> {
        self.group.as_mut()
    }

    /// A hash of the options (what every rank must agree on).
    pub fn options_fingerprint(&self) -> Result<u64> {
        let j = serde_json::to_vec(&self.opts)?;
        let h = dist::fnv1a(dist::FNV_START, &j);
        Ok(dist::fnv1a(h, self.storage.name().as_bytes()))
    }

    /// A hash of the training samples.
    pub fn data_fingerprint(&self) -> u64 {
        let mut h = dist::FNV_START;
        for s in &self.samples {
            h = dist::fnv1a(h, bytemuck::cast_slice(&s.ids));
            h = dist::fnv1a(h, &(s.prompt_len as u64).to_le_bytes());
        }
        h
    }

    /// This rank's rows of the masked micro-batch `k` of optimizer step `step`: global rows
    /// `rank·B .. (rank+1)·B` of the `B·world` rows (see [`dist`]).
    pub fn micro_batch(&mut self, step: u64, k: usize) -> Result<Batch> {
        let o = &self.opts;
        let (b, t) = (o.batch_size, o.seq_len);
        let span = loss::RowSpan {
            first: self.rank * b,
            global: o.global_batch(),
        };
        let micro = step * o.accum as u64 + k as u64;
        let mut clean = Vec::with_capacity(b * t);
        let mut prompt_lens = Vec::with_capacity(b);
        for i in 0..b {
            let g = micro * span.global as u64 + (span.first + i) as u64;
            let idx = data::sample_index(o.seed, g, self.samples.len(), &mut self.order);
            clean.extend_from_slice(&self.samples[idx].ids);
            prompt_lens.push(self.samples[idx].prompt_len);
        }
        let d = loss::Draw {
            span: Some(span),
            ..loss::Draw::new(self.cfg.mask_token_id, o.seed, micro, 1.0 / o.accum as f64)
        };
        if o.sft {
            loss::sft_batch(&clean, &prompt_lens, b, t, d)
        } else {
            loss::pretrain_batch(&clean, b, t, o.truncate, d)
        }
    }

    /// One optimizer step: accumulate the micro-batches' gradients, clip, AdamW.
    pub fn train_step(&mut self) -> Result<StepStats> {
        // The host state is the trainer's own tensors: lent to the step, returned even on error.
        let mut host = HostStep {
            params: std::mem::take(&mut self.params),
            grad: std::mem::take(&mut self.grad),
            storage: self.storage,
        };
        let stats = self.step_on(&mut host);
        (self.params, self.grad) = (host.params, host.grad);
        stats
    }

    /// [`Trainer::train_step`] on the GPU: forward/backward, gradient norm, clipping and AdamW
    /// run on `gpu`'s resident parameters and moments (same micro-batches, schedule and
    /// hyper-parameters). The host copies in `self.params` / `self.opt` go stale until
    /// [`Trainer::pull_from_cuda`].
    pub fn train_step_cuda(&mut self, gpu: &mut cuda::CudaTrainState) -> Result<StepStats> {
        self.step_on(gpu)
    }

    /// Copy the GPU's parameters and AdamW moments into `self.params` / `self.opt` (before a
    /// checkpoint is saved).
    pub fn pull_from_cuda(&mut self, gpu: &cuda::CudaTrainState) -> Result<()> {
        gpu.params.download_into(&gpu.ops, &mut self.params)?;
        gpu.m.download_into(&gpu.ops, &mut self.opt.m)?;
        gpu.v.download_into(&gpu.ops, &mut self.opt.v)
    }

    /// [`Trainer::train_step`] over another step state, e.g. a LoRA run's
    /// [`lora::LoraStep`] (the trainer's own parameters are then unused and may be empty).
    pub fn train_step_on<S: StepState>(&mut self, state: &mut S) -> Result<StepStats> {
        self.step_on(state)
    }

    fn step_on<S: StepState>(&mut self, state: &mut S) -> Result<StepStats> {
        ensure!(
            self.step < self.opts.steps,
            "the run is complete ({} steps)",
            self.opts.steps
        );
        state.zero_grad()?;
        let pass = PassOptions::recomputing(self.recompute);
        let (mut loss, mut tokens, mut masked, mut flops) = (0.0, 0, 0, 0.0);
        for k in 0..self.opts.accum {
            let batch = self.micro_batch(self.step, k)?;
            loss += state.forward_backward(&self.cfg, &batch, pass)?;
            tokens += batch.b * batch.t;
            masked += batch.rows.len();
            flops += step_flops(&self.cfg, batch.b, batch.t, batch.rows.len());
        }
        if let Some(group) = self.group.as_mut() {
            // Every rank's share, summed: the global batch's loss and gradient.
            let mut st = [loss, tokens as f64, masked as f64, flops];
            group.all_reduce_f64(&mut st)?;
            loss = st[0];
            tokens = st[1] as usize;
            masked = st[2] as usize;
            flops = st[3];
            state.all_reduce_grads(group)?;
        }
        ensure!(
            loss.is_finite(),
            "step {}: the loss is {loss} (lower --lr, or resume from an earlier checkpoint)",
            self.step + 1
        );
        let lr = self
            .schedule
            .lr(self.opts.lr, self.opts.warmup, self.step, self.opts.steps);
        let grad_norm =
            state.clip_and_step_in(self.group.as_mut(), &mut self.opt, lr, self.opts.clip)?;
        self.step += 1;
        Ok(StepStats {
            step: self.step,
            loss,
            lr,
            grad_norm,
            tokens,
            masked,
            flops,
        })
    }

    /// The non-tensor state to save.
    pub fn state(&self) -> Result<checkpoint::TrainerState> {
        Ok(checkpoint::TrainerState {
            step: self.step,
            adam_t: self.opt.t,
            beta1: self.opt.cfg.beta1,
            beta2: self.opt.cfg.beta2,
            eps: self.opt.cfg.eps,
            weight_decay: self.opt.cfg.weight_decay,
            options: serde_json::to_value(&self.opts)?,
            storage: self.storage,
            lora: None,
        })
    }
}
