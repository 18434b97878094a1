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
//! The step is written once ([`Sharded`]'s [`StepState`]) over a [`ShardStore`]: the host's
//! tensors ([`HostShard`], the TCP group's collectives) or a GPU's
//! ([`super::cuda::CudaShard`], NCCL; compiles, not run on a GPU yet).
//!
//! Checkpoints keep the unsharded format ([`super::checkpoint`]): before a save every rank
//! sends its shard of the moments to rank 0 ([`Trainer::save_sharded`]), which writes the
//! usual `optimizer.safetensors`, so a run resumes sharded or not, on any number of ranks.
//! Rank 0 holds the gathered moments (8 bytes per parameter) in host memory while it saves.

use anyhow::{bail, ensure, Context, Result};

use super::dist::HostGroup;
use super::model::{Batch, Params, PassOptions};
use super::optim::{adamw_update, AdamW, AdamWConfig, AdamWStep};
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
    pub rank: usize,
    /// Flat offset of every tensor, and `P` last.
    pub offsets: Vec<usize>,
    /// Flat offset of every rank's shard, and `P` last (`world + 1` entries).
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
            rank,
            offsets,
            bounds,
        })
    }

    /// The number of ranks the parameters split over.
    pub fn world(&self) -> usize {
        self.bounds.len() - 1
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

/// Where a sharded step's tensors live (the host, [`HostShard`]; a GPU,
/// [`super::cuda::CudaShard`]): what [`Sharded`]'s step, written once, asks of them.
pub trait ShardStore {
    /// The whole weights and gradient as an unsharded step state (its `zero_grad` and
    /// `forward_backward` are the sharded step's).
    fn whole(&mut self) -> &mut dyn StepState;
    /// Tensor `i`'s range `bounds[i][r]..bounds[i][r + 1]` of the gradient summed over the
    /// ranks onto rank `r`.
    fn reduce_scatter(&mut self, group: &mut HostGroup, bounds: &[Vec<usize>]) -> Result<()>;
    /// f64 `Σ g²` over this rank's `pieces` of the gradient.
    fn sumsq(&mut self, pieces: &[Piece]) -> Result<f64>;
    /// The AdamW update `u` of this rank's `pieces`.
    fn update(&mut self, pieces: &[Piece], u: &Update) -> Result<()>;
    /// Every rank's ranges of the weights to every rank.
    fn all_gather(&mut self, group: &mut HostGroup, bounds: &[Vec<usize>]) -> Result<()>;
}

/// One AdamW update of a shard: number `t` (1-based) at learning rate `lr`, the gradient
/// scaled by `clip` first when it is set.
pub struct Update {
    pub cfg: AdamWConfig,
    pub t: u64,
    pub lr: f64,
    pub clip: Option<f32>,
}

/// A rank's step state under ZeRO-1: the tensors in a [`ShardStore`], this rank's place in the
/// [`ShardLayout`].
pub struct Sharded<S> {
    pub store: S,
    pub layout: ShardLayout,
    pub pieces: Vec<Piece>,
    /// [`ShardLayout::tensor_bounds`] of every tensor.
    pub bounds: Vec<Vec<usize>>,
}

impl<S> Sharded<S> {
    /// Rank `rank` of `world` over tensors of `sizes` values, the tensors in `store`.
    pub fn with_store(store: S, sizes: &[usize], world: usize, rank: usize) -> Result<Sharded<S>> {
        let layout = ShardLayout::new(sizes, world, rank)?;
        Ok(Sharded {
            store,
            pieces: layout.pieces(),
            bounds: (0..sizes.len()).map(|i| layout.tensor_bounds(i)).collect(),
            layout,
        })
    }
}

/// The host's [`ShardStore`]: the whole weights and gradient ([`HostStep`]), the AdamW moments
/// of this rank's shard (flat, in shard order).
pub struct HostShard {
    pub host: HostStep,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// ZeRO-1 on the host.
pub type ZeroStep = Sharded<HostShard>;

impl ZeroStep {
    /// The state of rank `rank` of `world` from the whole `params` and moments `opt` (only the
    /// shard of the moments is kept).
    pub fn new(params: Params<f32>, opt: &AdamW, world: usize, rank: usize) -> Result<ZeroStep> {
        let sizes: Vec<usize> = params.data.iter().map(Vec::len).collect();
        let layout = ShardLayout::new(&sizes, world, rank)?;
        let (m, v) = (layout.shard_of(&opt.m)?, layout.shard_of(&opt.v)?);
        let mut grad = params.clone();
        grad.fill_zero();
        let storage = Default::default();
        let host = HostStep {
            params,
            grad,
            storage,
        };
        Sharded::with_store(HostShard { host, m, v }, &sizes, world, rank)
    }
}

impl ShardStore for HostShard {
    fn whole(&mut self) -> &mut dyn StepState {
        &mut self.host
    }
    fn reduce_scatter(&mut self, group: &mut HostGroup, bounds: &[Vec<usize>]) -> Result<()> {
        for (d, b) in self.host.grad.data.iter_mut().zip(bounds) {
            group.reduce_scatter_f32(d, b)?;
        }
        Ok(())
    }
    fn sumsq(&mut self, pieces: &[Piece]) -> Result<f64> {
        Ok(pieces
            .iter()
            .flat_map(|p| self.host.grad.data[p.tensor][p.range.clone()].iter())
            .map(|&x| (x as f64) * (x as f64))
            .sum())
    }
    fn update(&mut self, pieces: &[Piece], u: &Update) -> Result<()> {
        let s = AdamWStep::new(&u.cfg, u.t, u.lr);
        let HostStep { params, grad, .. } = &mut self.host;
        for p in pieces {
            let (i, r, n) = (p.tensor, p.range.clone(), p.range.len());
            // PyTorch clip_grad_norm_, as optim::clip_grad_norm, on the piece.
            if let Some(coef) = u.clip {
                grad.data[i][r.clone()].iter_mut().for_each(|x| *x *= coef);
            }
            adamw_update(
                &mut params.data[i][r.clone()],
                &grad.data[i][r],
                &mut self.m[p.at..p.at + n],
                &mut self.v[p.at..p.at + n],
                s.decay(params.shapes[i].len()),
                &s,
            );
        }
        Ok(())
    }
    fn all_gather(&mut self, group: &mut HostGroup, bounds: &[Vec<usize>]) -> Result<()> {
        for (d, b) in self.host.params.data.iter_mut().zip(bounds) {
            group.all_gather_f32(d, b)?;
        }
        Ok(())
    }
}

impl<S: ShardStore> StepState for Sharded<S> {
    fn zero_grad(&mut self) -> Result<()> {
        self.store.whole().zero_grad()
    }
    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64> {
        self.store.whole().forward_backward(cfg, b, o)
    }
    /// The reduce-scatter: this rank's shard of the gradient summed over the ranks.
    fn all_reduce_grads(&mut self, group: &mut HostGroup) -> Result<()> {
        self.store.reduce_scatter(group, &self.bounds)
    }
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        self.clip_and_step_in(None, opt, lr, max_norm)
    }
    /// The global norm from the shards' (an all-reduce of their sums of squares, in rank
    /// order), clipping and AdamW on the shard, then the weights' all-gather.
    fn clip_and_step_in(
        &mut self,
        group: Option<&mut HostGroup>,
        opt: &mut AdamW,
        lr: f64,
        max_norm: f64,
    ) -> Result<f64> {
        let group =
            group.context("a sharded optimizer (ZeRO-1) steps inside its data-parallel group")?;
        ensure!(
            group.world == self.layout.world() && group.rank == self.layout.rank,
            "the optimizer is sharded for rank {} of {}, the group is rank {} of {}",
            self.layout.rank,
            self.layout.world(),
            group.rank,
            group.world
        );
        let mut sq = [self.store.sumsq(&self.pieces)?];
        group.all_reduce_f64(&mut sq)?;
        let norm = sq[0].sqrt();
        let coef = max_norm / (norm + 1e-6);
        let clip = (max_norm > 0.0 && coef < 1.0).then_some(coef as f32);
        let u = Update {
            cfg: opt.cfg,
            t: opt.t + 1,
            lr,
            clip,
        };
        self.store.update(&self.pieces, &u)?;
        opt.t += 1;
        self.store.all_gather(group, &self.bounds)?;
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
        let mut z = ZeroStep::new(std::mem::take(&mut self.params), &self.opt, world, rank)?;
        z.store.host.storage = self.storage;
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
        let h = &z.store;
        self.save_shards(&h.host.params, &z.layout, &h.m, &h.v, save)
    }

    /// [`Trainer::save_sharded`] from the parts: the whole `params`, and this rank's shard of
    /// the moments `m`, `v` (flat, in the shard order of `layout`), e.g. downloaded from a GPU
    /// ([`super::cuda::CudaZeroState::download`]).
    pub fn save_shards(
        &mut self,
        params: &Params<f32>,
        layout: &ShardLayout,
        m: &[f32],
        v: &[f32],
        save: impl FnOnce(&Trainer) -> Result<()>,
    ) -> Result<()> {
        let group = self
            .group
            .as_mut()
            .context("a sharded optimizer is saved within its group")?;
        ensure!(
            m.len() == layout.shard_len() && v.len() == layout.shard_len(),
            "the moments hold {} and {} values, the shard {}",
            m.len(),
            v.len(),
            layout.shard_len()
        );
        let (rank, lead) = (layout.rank, group.rank == 0);
        let mut full = [Params::default(), Params::default()];
        if lead {
            for f in &mut full {
                *f = params.clone();
                f.fill_zero();
            }
        }
        for (f, shard) in full.iter_mut().zip([m, v]) {
            for i in 0..layout.offsets.len() - 1 {
                let b = layout.tensor_bounds(i);
                let (lo, hi) = (b[rank], b[rank + 1]);
                let at = (layout.offsets[i] + lo).saturating_sub(layout.bounds[rank]);
                let mine = if lo < hi {
                    &shard[at..at + hi - lo]
                } else {
                    &[][..]
                };
                let out: &mut [f32] = if lead { &mut f.data[i] } else { &mut [] };
                group.gather_f32(mine, &b, out)?;
            }
        }
        if !lead {
            return Ok(());
        }
        let [fm, fv] = full;
        self.params = params.clone();
        (self.opt.m, self.opt.v) = (fm, fv);
        let r = save(self);
        self.params = Params::default();
        self.opt.m = Params::default();
        self.opt.v = Params::default();
        r
    }
}
