//! ZeRO stage 1: the optimizer state sharded over the data-parallel ranks (`llada train
//! --zero 1`).
//!
//! Every rank still holds the whole model and its whole gradient (it computes the gradient of
//! its rows of the global batch, as in [`super::dist`]), but the f32 master weights it updates
//! and the AdamW moments exist for its shard only: `1/N` of the parameters. A step:
//!
//! 1. forward + backward of this rank's rows, as without sharding;
//! 2. **reduce-scatter** of the gradient: each rank receives the sum over all ranks on its
//!    shard ([`super::dist::HostGroup::reduce_scatter_f32`]; rank 0 adds in rank order in f64
//!    and rounds once, the very bits the unsharded all-reduce gives there);
//! 3. the global gradient norm: each rank's f64 sum of squares of its shard, summed over the
//!    ranks in rank order (an all-reduce of the shard norms), then clipping with PyTorch's
//!    factor on the shard;
//! 4. AdamW ([`super::optim::adamw_update`], element-wise, the tensor's own decay) on the shard;
//! 5. **all-gather** of the updated weights ([`super::dist::HostGroup::all_gather_f32`]).
//!
//! Steps 2, 4 and 5 are element-wise the unsharded step, so the weights are bit-identical to
//! the unsharded data-parallel run's. The one difference is the f64 summation order of the
//! gradient norm (per shard, then across ranks, instead of one pass): the reported norm may
//! differ in its last bits, and the clip factor, rounded to f32, with it only when that f64
//! difference crosses an f32 rounding boundary (tests/zero.rs checks the weights bit for bit).
//!
//! The shards: the parameters are laid end to end in [`Params`] order (`P` values); rank `r`
//! owns flat values `r·S .. min((r+1)·S, P)` with `S = ⌈P/N⌉` rounded up to [`SHARD_ALIGN`]
//! values, so a shard may cut a tensor and the last shard is shorter (or empty).
//!
//! Checkpoints keep the unsharded format ([`super::checkpoint`]): before a save every rank
//! sends its shard of the moments to rank 0 ([`Trainer::save_sharded`]), which writes the
//! usual `optimizer.safetensors`, so a run resumes sharded or not, on any number of ranks.
//! Rank 0 holds the gathered moments (8 bytes per parameter) in host memory while it saves.

use anyhow::{bail, ensure, Context, Result};

use super::dist::HostGroup;
use super::model::{Batch, Params};
use super::optim::{adamw_update, AdamW, AdamWStep};
use super::{HostStep, StepState, Trainer};
use crate::hf::config::ModelConfig;

/// Shard sizes are multiples of this many values (256 bytes of f32: aligned device copies).
pub const SHARD_ALIGN: usize = 64;

/// What `--zero` asks for: 0 (off) or 1 (optimizer state sharded); anything else is an error
/// that says what exists.
pub fn parse_stage(s: &str) -> Result<u8> {
    match s.trim() {
        "0" | "off" => Ok(0),
        "1" => Ok(1),
        "2" | "3" => bail!(
            "--zero {s}: ZeRO stage {s} (sharded gradients{}) is not implemented; stage 1 shards \
             the master weights and AdamW moments",
            if s.trim() == "3" { " and weights" } else { "" }
        ),
        _ => {
            bail!("--zero {s:?}: expected 0 (off) or 1 (shard the optimizer state over the ranks)")
        }
    }
}

/// One rank's piece of a tensor: tensor `tensor`, values `range` of it, stored from `at` in
/// the rank's shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub tensor: usize,
    pub range: std::ops::Range<usize>,
    pub at: usize,
}

/// How `P` parameters in tensors of the given sizes split over `world` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardLayout {
    pub world: usize,
    pub rank: usize,
    /// Flat offset of every tensor, and `P` last.
    pub offsets: Vec<usize>,
    /// Flat offset of every rank's shard, and `P` last.
    pub bounds: Vec<usize>,
}

impl ShardLayout {
    pub fn new(sizes: &[usize], world: usize, rank: usize) -> Result<ShardLayout> {
        ensure!(world >= 1, "a world of 0 ranks");
        ensure!(rank < world, "rank {rank} of a world of {world}");
        let mut offsets = Vec::with_capacity(sizes.len() + 1);
        let mut p = 0usize;
        for &s in sizes {
            offsets.push(p);
            p = p.checked_add(s).context("parameter count overflows")?;
        }
        offsets.push(p);
        let s = p.div_ceil(world).div_ceil(SHARD_ALIGN) * SHARD_ALIGN;
        let bounds = (0..=world).map(|r| (r * s).min(p)).collect();
        Ok(ShardLayout {
            world,
            rank,
            offsets,
            bounds,
        })
    }

    /// All parameters, `P`.
    pub fn numel(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Values in this rank's shard.
    pub fn shard_len(&self) -> usize {
        self.bounds[self.rank + 1] - self.bounds[self.rank]
    }

    /// The split of tensor `i` over the ranks: `world + 1` offsets into the tensor.
    pub fn tensor_bounds(&self, i: usize) -> Vec<usize> {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        self.bounds.iter().map(|&x| x.clamp(a, b) - a).collect()
    }

    /// This rank's pieces, in flat order.
    pub fn pieces(&self) -> Vec<Piece> {
        let (lo, hi) = (self.bounds[self.rank], self.bounds[self.rank + 1]);
        let mut out = Vec::new();
        for i in 0..self.offsets.len() - 1 {
            let (a, b) = (self.offsets[i].max(lo), self.offsets[i + 1].min(hi));
            if a < b {
                out.push(Piece {
                    tensor: i,
                    range: a - self.offsets[i]..b - self.offsets[i],
                    at: a - lo,
                });
            }
        }
        out
    }

    /// This rank's shard of `full` (tensors in [`Params`] order), flat.
    pub fn shard_of(&self, full: &Params<f32>) -> Result<Vec<f32>> {
        ensure!(
            full.data.len() + 1 == self.offsets.len()
                && full
                    .data
                    .iter()
                    .enumerate()
                    .all(|(i, d)| d.len() == self.offsets[i + 1] - self.offsets[i]),
            "the optimizer state does not have the model's tensors"
        );
        let mut out = Vec::with_capacity(self.shard_len());
        for p in self.pieces() {
            out.extend_from_slice(&full.data[p.tensor][p.range]);
        }
        Ok(out)
    }
}

/// A rank's step state under ZeRO-1 on the host: the whole model and gradient, the AdamW
/// moments of its shard only.
pub struct ZeroStep {
    /// The whole weights (identical on every rank after each step) and gradient.
    pub host: HostStep,
    pub layout: ShardLayout,
    pieces: Vec<Piece>,
    tensor_bounds: Vec<Vec<usize>>,
    /// AdamW moments of this rank's shard (flat, in shard order).
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl ZeroStep {
    /// The state of rank `rank` of `world` from the whole `params` and moments `opt` (only the
    /// shard of the moments is kept).
    pub fn new(params: Params<f32>, opt: &AdamW, world: usize, rank: usize) -> Result<ZeroStep> {
        let sizes: Vec<usize> = params.data.iter().map(Vec::len).collect();
        let layout = ShardLayout::new(&sizes, world, rank)?;
        let (m, v) = (layout.shard_of(&opt.m)?, layout.shard_of(&opt.v)?);
        let mut grad = params.clone();
        grad.fill_zero();
        Ok(ZeroStep {
            pieces: layout.pieces(),
            tensor_bounds: (0..sizes.len()).map(|i| layout.tensor_bounds(i)).collect(),
            host: HostStep { params, grad },
            layout,
            m,
            v,
        })
    }

    /// The f64 sum of squares of this rank's shard of the gradient.
    fn shard_sumsq(&self) -> f64 {
        self.pieces
            .iter()
            .flat_map(|p| self.host.grad.data[p.tensor][p.range.clone()].iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum()
    }
}

impl StepState for ZeroStep {
    fn zero_grad(&mut self) -> Result<()> {
        self.host.zero_grad()
    }
    fn forward_backward(&mut self, cfg: &ModelConfig, batch: &Batch) -> Result<f64> {
        self.host.forward_backward(cfg, batch)
    }
    /// The reduce-scatter: this rank's shard of the gradient summed over the ranks.
    fn all_reduce_grads(&mut self, group: &mut HostGroup) -> Result<()> {
        for (d, b) in self.host.grad.data.iter_mut().zip(&self.tensor_bounds) {
            group.reduce_scatter_f32(d, b)?;
        }
        Ok(())
    }
    fn clip_and_step(&mut self, _opt: &mut AdamW, _lr: f64, _max_norm: f64) -> Result<f64> {
        bail!("a sharded optimizer (ZeRO-1) steps inside its data-parallel group")
    }
    /// Global norm from the shard norms, clip and AdamW on the shard, all-gather the weights.
    fn clip_and_step_in(
        &mut self,
        group: Option<&mut HostGroup>,
        opt: &mut AdamW,
        lr: f64,
        max_norm: f64,
    ) -> Result<f64> {
        let group = group.context("a sharded optimizer (ZeRO-1) needs its data-parallel group")?;
        ensure!(
            group.world == self.layout.world && group.rank == self.layout.rank,
            "the optimizer is sharded for rank {} of {}, the group is rank {} of {}",
            self.layout.rank,
            self.layout.world,
            group.rank,
            group.world
        );
        let mut sq = [self.shard_sumsq()];
        group.all_reduce_f64(&mut sq)?;
        let norm = sq[0].sqrt();
        // PyTorch clip_grad_norm_, as optim::clip_grad_norm, on the shard.
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                for p in &self.pieces {
                    for x in &mut self.host.grad.data[p.tensor][p.range.clone()] {
                        *x *= coef as f32;
                    }
                }
            }
        }
        opt.t += 1;
        let s = AdamWStep::new(&opt.cfg, opt.t, lr);
        let HostStep { params, grad } = &mut self.host;
        for p in &self.pieces {
            let (i, n) = (p.tensor, p.range.len());
            adamw_update(
                &mut params.data[i][p.range.clone()],
                &grad.data[i][p.range.clone()],
                &mut self.m[p.at..p.at + n],
                &mut self.v[p.at..p.at + n],
                s.decay(params.shapes[i].len()),
                &s,
            );
        }
        for (d, b) in params.data.iter_mut().zip(&self.tensor_bounds) {
            group.all_gather_f32(d, b)?;
        }
        Ok(norm)
    }
}

impl Trainer {
    /// Shard this data-parallel run's optimizer (ZeRO-1); every rank calls it after
    /// [`Trainer::join_group`]. The weights and gradients move into the returned state
    /// (`self.params` is left empty), this rank keeps its shard of the moments and frees the
    /// rest (`self.opt` keeps the step count and hyper-parameters). Train with
    /// [`Trainer::train_step_on`]; save with [`Trainer::save_sharded`].
    pub fn shard_optimizer(&mut self) -> Result<ZeroStep> {
        let g = self.group.as_ref().context(
            "--zero 1 shards the optimizer state over data-parallel ranks, and this run is one \
             process (start it with torchrun-style RANK/WORLD_SIZE or srun)",
        )?;
        ensure!(
            g.world >= 2,
            "--zero 1 needs at least 2 data-parallel ranks, the world has {}",
            g.world
        );
        let (world, rank) = (g.world, g.rank);
        let z = ZeroStep::new(std::mem::take(&mut self.params), &self.opt, world, rank)?;
        self.grad = Params::default();
        self.opt.m = Params::default();
        self.opt.v = Params::default();
        Ok(z)
    }

    /// Save a sharded run: every rank calls it; the moments are gathered to rank 0, which
    /// (with the weights, identical on every rank) fills `self.params` / `self.opt` in the
    /// unsharded layout, runs `save`, and frees them again. Elsewhere `save` is not called.
    pub fn save_sharded(
        &mut self,
        z: &ZeroStep,
        save: impl FnOnce(&Trainer) -> Result<()>,
    ) -> Result<()> {
        let group = self
            .group
            .as_mut()
            .context("a sharded optimizer is saved within its group")?;
        let lead = group.rank == 0;
        let mut full = [Params::default(), Params::default()];
        if lead {
            for f in &mut full {
                *f = z.host.params.clone();
                f.fill_zero();
            }
        }
        for (f, shard) in full.iter_mut().zip([&z.m, &z.v]) {
            for (i, b) in z.tensor_bounds.iter().enumerate() {
                let (lo, hi) = (b[z.layout.rank], b[z.layout.rank + 1]);
                let at = (z.layout.offsets[i] + lo).saturating_sub(z.layout.bounds[z.layout.rank]);
                let mine = &shard[at.min(shard.len())..(at + hi - lo).min(shard.len())];
                let out: &mut [f32] = if lead { &mut f.data[i] } else { &mut [] };
                group.gather_f32(mine, b, out)?;
            }
        }
        if !lead {
            return Ok(());
        }
        let [m, v] = full;
        self.params = z.host.params.clone();
        (self.opt.m, self.opt.v) = (m, v);
        let r = save(self);
        self.params = Params::default();
        self.opt.m = Params::default();
        self.opt.v = Params::default();
        r
    }
}
