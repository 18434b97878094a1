//! ZeRO-1 on CUDA GPUs ([`CudaZeroState`]): the step of [`crate::train::zero`] with the
//! weights, gradients and this rank's shard of the AdamW moments resident on the device, and the
//! collectives through NCCL ([`crate::train::nccl::NcclComm::ranges_f32`]: one `ncclReduce` to
//! each range's owner for the gradient's reduce-scatter, one `ncclBroadcast` from it for the
//! weights' all-gather, grouped).
//!
//! The shard layout is [`ShardLayout`]'s, so a GPU rank updates exactly the values a CPU rank
//! would; the moments are one device buffer per tensor holding this rank's piece of it (a
//! one-value placeholder where it has none). The global gradient norm is the sum over the
//! ranks, through the host group, of each shard's `sumsq_f32`; clipping is folded into the
//! update as a gradient scale, as in [`CudaTrainState`]. NCCL sums in its own order, so the
//! result equals the unsharded GPU run up to f32 sum order (not bit for bit, unlike the TCP
//! group's).
//!
//! Memory per rank: the whole f32 weights and gradient, `8/N` bytes per parameter of moments
//! (see [`crate::train::memory`]). Not run on a GPU yet.

use super::*;
use crate::train::dist::HostGroup;
use crate::train::nccl::RangeOp;
use crate::train::zero::{Piece, ShardStore, Sharded, Update};
use crate::train::StepState;

/// The GPU's [`ShardStore`]: the whole weights and gradient resident on the device; `m` and `v`
/// hold this rank's piece of every tensor (a one-value placeholder where it has none).
pub struct CudaShard {
    pub gpu: CudaTrainState,
}

/// ZeRO-1 on one GPU.
pub type CudaZeroState = Sharded<CudaShard>;

impl CudaZeroState {
    /// Upload `params` and this rank's shard of the moments of `opt` (rank `rank` of `world`).
    pub fn new(
        ops: CudaOps,
        params: &Params<f32>,
        opt: &AdamW,
        world: usize,
        rank: usize,
    ) -> Result<CudaZeroState> {
        let sizes: Vec<usize> = params.data.iter().map(Vec::len).collect();
        let layout = crate::train::zero::ShardLayout::new(&sizes, world, rank)?;
        let bounds: Vec<Vec<usize>> = (0..sizes.len()).map(|i| layout.tensor_bounds(i)).collect();
        // This rank's piece of every tensor of `full`, as a tensor of its own.
        let piece = |full: &Params<f32>| -> Result<Params<f32>> {
            ensure!(
                full.data.len() == sizes.len()
                    && full.data.iter().zip(&sizes).all(|(d, &n)| d.len() == n),
                "the optimizer state does not have the model's tensors"
            );
            let ranges = bounds.iter().map(|b| b[rank]..b[rank + 1]);
            Ok(Params {
                names: full.names.clone(),
                shapes: ranges.clone().map(|r| vec![r.len()]).collect(),
                data: ranges.zip(&full.data).map(|(r, d)| d[r].to_vec()).collect(),
            })
        };
        let gpu = CudaTrainState::new(ops, params, &piece(&opt.m)?, &piece(&opt.v)?)?;
        Sharded::with_store(CudaShard { gpu }, &sizes, world, rank)
    }

    /// The whole weights, and this rank's shard of the moments (flat, in shard order) for
    /// [`crate::train::Trainer::save_shards`].
    pub fn download(&self) -> Result<(Params<f32>, Vec<f32>, Vec<f32>)> {
        let g = &self.store.gpu;
        let params = g.params.download(&g.ops)?;
        let flat = |d: &DeviceParams| -> Result<Vec<f32>> {
            let mut out = Vec::with_capacity(self.layout.shard_len());
            for p in &self.pieces {
                out.extend(g.ops.download(&d.data[p.tensor], p.range.len())?);
            }
            Ok(out)
        };
        Ok((params, flat(&g.m)?, flat(&g.v)?))
    }
}

impl CudaShard {
    /// `op` over every tensor's ranges (`bounds`) of the gradient (`grads`) or the weights,
    /// then wait for it (the watchdog of [`CudaTrainState`]).
    fn collective(
        &mut self,
        op: RangeOp,
        grads: bool,
        bounds: &[Vec<usize>],
        what: &str,
    ) -> Result<()> {
        let g = &mut self.gpu;
        g.ops.bind()?;
        {
            let comm = g
                .nccl
                .as_ref()
                .ok_or_else(|| anyhow!("ZeRO-1 on CUDA needs NCCL: attach_nccl was not called"))?;
            let bufs = if grads { &mut g.grad } else { &mut g.params };
            let ptrs: Vec<u64> = bufs.data.iter_mut().map(|d| g.ops.ptr_mut(d)).collect();
            let tensors: Vec<(u64, &[usize])> = ptrs
                .iter()
                .zip(bounds)
                .map(|(&p, b)| (p, b.as_slice()))
                .collect();
            let stream = g.ops.be.stream();
            // SAFETY: every pointer is a live buffer of its tensor's length on this device,
            // used only by the training stream, on which the collective is queued.
            unsafe { comm.ranges_f32(op, &tensors, stream.cu_stream() as *mut c_void) }?;
        }
        g.wait_for_nccl(what)
    }
}

impl ShardStore for CudaShard {
    fn whole(&mut self) -> &mut dyn StepState {
        &mut self.gpu
    }
    /// One `ncclReduce` per range onto its owner.
    fn reduce_scatter(&mut self, _group: &mut HostGroup, bounds: &[Vec<usize>]) -> Result<()> {
        let what = "the gradient reduce-scatter";
        self.collective(RangeOp::SumToOwner, true, bounds, what)
    }
    fn sumsq(&mut self, pieces: &[Piece]) -> Result<f64> {
        let g = &mut self.gpu;
        let mut sq = 0f64;
        for p in pieces {
            let d = &g.grad.data[p.tensor];
            sq += g
                .ops
                .sumsq_at(d, p.range.start, p.range.len(), &mut g.partial)?;
        }
        Ok(sq)
    }
    /// `adamw_f32` on each piece at its offset, the clip folded in as a gradient scale.
    fn update(&mut self, pieces: &[Piece], u: &Update) -> Result<()> {
        let g = &mut self.gpu;
        // The sharded update writes no bf16 working weights (`p_bf16` is `None`): bf16 storage
        // would train on stale weights, so it is refused here as well as by the CLI.
        ensure!(
            g.work.is_none(),
            "ZeRO-1 on CUDA keeps no bf16 working weights: use f32 storage with --zero 1"
        );
        let h = AdamWScalars::new(&u.cfg, u.t, u.lr, u.clip.unwrap_or(1.0));
        for p in pieces {
            let i = p.tensor;
            let decay = AdamWScalars::decay(&u.cfg, u.lr, &g.params.shapes[i]);
            let mv = (&mut g.m.data[i], &mut g.v.data[i]);
            let (w, grad) = ((&mut g.params.data[i], None), &g.grad.data[i]);
            g.ops.adamw(w, mv, grad, p.range.clone(), &h, decay)?;
        }
        Ok(())
    }
    /// One `ncclBroadcast` per range from its owner.
    fn all_gather(&mut self, _group: &mut HostGroup, bounds: &[Vec<usize>]) -> Result<()> {
        self.collective(RangeOp::FromOwner, false, bounds, "the weights' all-gather")
    }
}
