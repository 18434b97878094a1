//! Training on one CUDA device: the f32 training kernels (the `*_f32` symbols of each op's
//! `kernels/<op>.cu`, and `kernels/adamw.cu`; contract in `kernels/ABI.md`) and cuBLAS GEMMs (f32,
//! or bf16 tensor-core compute on f32 data), launched on a [`CudaBackend`]'s context, stream
//! and cuBLAS handle.
//!
//! - [`CudaOps`]: [`TrainOps`] on the device, one launcher per op of [`super::ops`] (same shapes,
//!   same argument meaning), each validating buffer lengths and every host-known id / row /
//!   position before launching.
//! - [`DeviceParams`] + [`forward_backward`]: the whole model, the same math and order as
//!   [`super::model::forward_backward`].
//! - [`CudaTrainState`]: parameters, gradients and AdamW moments resident on the device; the
//!   optimizer step ([`CudaTrainState::adamw_step`]) and the global gradient norm run there.
//!
//! Precision ([`TrainPrecision`], set with [`CudaOps::set_precision`]): in f32 storage
//! ([`CudaOps`] as [`TrainOps`]) storage is **f32**
//! throughout — master weights, AdamW moments, activations, gradients — and every non-GEMM
//! kernel (norms, RoPE, attention, SwiGLU, cross-entropy, AdamW) computes in f32 whatever the
//! setting. Only the GEMMs (`cublasGemmEx`, `CUDA_R_32F` A/B/C, f32 host `alpha`/`beta`)
//! change:
//! - [`TrainPrecision::F32`] (the default): `CUBLAS_COMPUTE_32F` — full f32, no TF32, no bf16;
//!   matches the f32 CPU reference to f32 rounding.
//! - [`TrainPrecision::Bf16`]: `CUBLAS_COMPUTE_32F_FAST_16BF` — cuBLAS may down-convert A and B
//!   to bf16 inside the GEMM and multiply them on the tensor cores, accumulating in f32
//!   (products of two bf16 values are exact in f32); C and the outputs stay f32. This is the
//!   `bf16 compute, f32 master weights` of mixed-precision training, without bf16 storage: no
//!   activation memory is saved, and the conversion's rounding direction is cuBLAS's (not
//!   documented; the CPU model of it, [`super::ops::linear_bf16`], rounds to nearest even and
//!   the parity tests use inputs on which round-to-nearest and truncation agree). cuBLAS is
//!   *allowed*, not forced, to use bf16: tests/cuda_train.rs checks that it does at the sizes
//!   it tests.
//!
//! bf16 storage ([`CudaTrainState::set_storage`], `--storage bf16`; what is stored in which dtype
//! is [`super::mixed`]'s): [`CudaBf16`] (`stored.rs`) runs the same pass over dtype-tagged
//! buffers ([`SBuf`]) with the `*_bf16s` kernels and bf16 cuBLAS GEMMs (`CUDA_R_16BF` A/B,
//! `CUBLAS_COMPUTE_32F`), from bf16 working weights that every AdamW step refreshes; master
//! weights, moments and weight gradients stay f32 here. Its parity test against the CPU
//! reference (`tests/cuda_bf16_storage.rs`) has not run on a GPU yet.
//!
//! Memory (f32 storage): 16 bytes per parameter (weights, gradients, two moments) plus f32 activations of
//! every layer, so one 80 GB GPU trains models up to roughly 3–4 B parameters at short
//! sequences; the 8B preset does not fit on one GPU. Several GPUs train data parallel
//! ([`super::dist`]): every GPU holds the whole state, so that does not raise the limit.
//! LoRA ([`CudaLoraState`], `lora.rs`) keeps the frozen base in bf16 (2 bytes per parameter)
//! and f32 state only for the adapters: the 8B preset fits one GPU there
//! ([`super::lora::lora_memory`]).
//!
//! Kernel launches are asynchronous; a fault surfaces at the next read-back.

use crate::backend::cuda::{
    check_dyn_smem, check_ints, check_len, driver_err, grid_yz, int, stride_blocks, DevBuf, Gemm,
    Geom,
};
use std::ffi::c_void;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas;
use cudarc::driver::{sys as dsys, CudaSlice};
use half::bf16;

use super::backend::Storage;
use super::backend::{
    AttnGrad, Dx, LinearGrad, MatMul, Norm, NormGrad, Qkv, QkvGrads, Rope, RowIds, Rows,
    SwigluGrad, Targets, TrainOps,
};
use super::model::{forward_backward_on, Batch, Params, PassOptions};
use super::ops::AttnShape;
use super::optim::{AdamW, AdamWConfig};
use crate::backend::cuda::CudaBackend;
use crate::hf::config::ModelConfig;

// device: CudaOps (backend, kernels, precision), buffers, GEMMs; launchers: one f32 launcher
// per training op; pass: the model's forward and backward pass on the device.
#[macro_use]
mod device;
mod launchers;
mod lora;
mod pass;
mod raw;
mod stored;
mod tiled;
mod zero;

pub use crate::backend::cuda::DevInts;
use device::*;
pub use device::{AdamWScalars, Buf, CudaOps};
use lora::clip_scale;
pub use lora::CudaLoraState;
pub use pass::{forward_backward, DeviceParams};
pub use stored::{bf16_weights, forward_backward_bf16, CudaBf16, SBuf};
pub use tiled::{
    row_chunks, ScatterPlan, TrainKernelImpl, ATT_TILED_HD_MAX, SCATTER_PIECE_ROWS,
    TRAIN_KERNELS_ENV,
};
pub use zero::{CudaShard, CudaZeroState};

/// What the training GEMMs compute in (see the module docs); storage is f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrainPrecision {
    /// `CUBLAS_COMPUTE_32F`: full f32.
    #[default]
    F32,
    /// `CUBLAS_COMPUTE_32F_FAST_16BF`: f32 data, bf16 tensor-core products, f32 accumulation.
    Bf16,
}

impl TrainPrecision {
    pub fn name(self) -> &'static str {
        crate::names::name_of(TRAIN_PRECISIONS, &self)
    }

    /// One line for logs: what is stored and what the GEMMs compute in.
    pub fn describe(self) -> &'static str {
        match self {
            TrainPrecision::F32 => "f32 weights, activations and GEMMs",
            TrainPrecision::Bf16 => {
                "f32 weights and activations, bf16 tensor-core GEMMs with f32 accumulation"
            }
        }
    }

    fn compute_type(self) -> cublas::sys::cublasComputeType_t {
        use cublas::sys::cublasComputeType_t as C;
        match self {
            TrainPrecision::F32 => C::CUBLAS_COMPUTE_32F,
            TrainPrecision::Bf16 => C::CUBLAS_COMPUTE_32F_FAST_16BF,
        }
    }
}

/// The `--precision` names, for parsing and printing.
const TRAIN_PRECISIONS: &[(&str, TrainPrecision)] =
    &[("f32", TrainPrecision::F32), ("bf16", TrainPrecision::Bf16)];

crate::names::named_enum!(TrainPrecision, "training precision", TRAIN_PRECISIONS);

/// Parameters, gradients and AdamW moments of a run, resident on one GPU.
pub struct CudaTrainState {
    pub ops: CudaOps,
    pub params: DeviceParams,
    pub grad: DeviceParams,
    pub m: DeviceParams,
    pub v: DeviceParams,
    partial: CudaSlice<f64>,
    /// The data-parallel communicator, when this GPU is one rank of several.
    nccl: Option<super::nccl::NcclComm>,
    /// Recorded after each gradient all-reduce, polled by its watchdog.
    reduced: Option<cudarc::driver::CudaEvent>,
    /// bf16 storage's working weights (bf16 copies of `params`, refreshed by every AdamW
    /// step; [`CudaTrainState::set_storage`]); `None` in f32 storage.
    work: Option<Vec<SBuf>>,
}

impl CudaTrainState {
    /// Upload `params` and the optimizer moments `m`, `v`; gradients start at zero.
    pub fn new(
        ops: CudaOps,
        params: &Params<f32>,
        m: &Params<f32>,
        v: &Params<f32>,
    ) -> Result<CudaTrainState> {
        let dp = DeviceParams::upload(&ops, params)?;
        let mut grad = DeviceParams::upload(&ops, params)?;
        grad.fill_zero(&ops)?;
        let dm = DeviceParams::upload(&ops, m)?;
        let dv = DeviceParams::upload(&ops, v)?;
        let partial = ops.sumsq_partials()?;
        Ok(CudaTrainState {
            ops,
            params: dp,
            grad,
            m: dm,
            v: dv,
            partial,
            nccl: None,
            reduced: None,
            work: None,
        })
    }

    /// Train in `s` from now on: in bf16 storage ([`crate::train::mixed`]) the pass runs
    /// [`CudaBf16`] on bf16 copies of the f32 master weights (RNE), which every AdamW step
    /// refreshes (`adamw_f32`'s `p_bf16`); f32 storage drops them.
    pub fn set_storage(&mut self, s: Storage) -> Result<()> {
        self.work = match s {
            Storage::F32 => None,
            Storage::Bf16 => {
                CudaBf16::new(&self.ops)?;
                Some(bf16_weights(&self.ops, &self.params.data)?)
            }
        };
        Ok(())
    }

    /// bf16 storage's working weights as f32 values, one vector per tensor (a device
    /// synchronizes); `None` in f32 storage. Every AdamW step makes them `bf16(params)` (RNE).
    pub fn working_weights(&self) -> Result<Option<Vec<Vec<f32>>>> {
        let Some(work) = &self.work else {
            return Ok(None);
        };
        let ops = CudaBf16::new(&self.ops)?;
        let w = work.iter().map(|b| ops.download(b, b.len()));
        Ok(Some(w.collect::<Result<_>>()?))
    }

    /// Join the NCCL communicator of rank `rank` of `world` (every rank calls this with the
    /// same `id`; it blocks until all have).
    pub fn attach_nccl(
        &mut self,
        id: &super::nccl::UniqueId,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        self.ops.bind()?;
        self.nccl = Some(super::nccl::NcclComm::init(id, rank, world)?);
        Ok(())
    }

    /// Wait for the NCCL collective just queued on the training stream (`what` names it): a
    /// peer that died or hangs would otherwise block this rank forever at its next read-back.
    /// Polls the stream and NCCL's asynchronous error; on an error, or after
    /// `LLADA_DIST_TIMEOUT` seconds, aborts the communicator and returns an error.
    pub(super) fn wait_for_nccl(&mut self, what: &str) -> Result<()> {
        let comm = self
            .nccl
            .as_ref()
            .ok_or_else(|| anyhow!("{what}: no NCCL communicator"))?;
        let stream = self.ops.be.stream();
        if self.reduced.is_none() {
            self.reduced = Some(
                stream
                    .context()
                    .new_event(None)
                    .map_err(|e| anyhow!("creating the all-reduce event: {e:?}"))?,
            );
        }
        let ev = self.reduced.as_ref().ok_or_else(|| anyhow!("no event"))?;
        ev.record(stream)
            .map_err(|e| anyhow!("recording the all-reduce event: {e:?}"))?;
        let (limit, _) = super::dist::timeouts()?;
        let t0 = std::time::Instant::now();
        let failure = loop {
            match ev.try_is_complete() {
                Ok(true) => break None,
                Ok(false) => {}
                Err(e) => break Some(anyhow!("{what} failed on the GPU: {e:?}")),
            }
            if let Err(e) = comm.async_error() {
                break Some(e.context(format!("{what} (a peer may have stopped)")));
            }
            if t0.elapsed() > limit {
                break Some(anyhow!(
                    "{what} did not finish within {:.0} s (LLADA_DIST_TIMEOUT): a peer is stuck \
                     or gone",
                    limit.as_secs_f64()
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        };
        match failure {
            None => Ok(()),
            Some(e) => {
                if let Some(c) = self.nccl.take() {
                    c.abort();
                }
                Err(e)
            }
        }
    }

    /// Global L2 norm of the gradients (f64).
    pub fn grad_norm(&mut self) -> Result<f64> {
        let mut s = 0.0f64;
        for d in &self.grad.data {
            s += self.ops.sumsq(d, d.len(), &mut self.partial)?;
        }
        Ok(s.sqrt())
    }

    /// AdamW update number `t` (1-based) of every tensor, gradients scaled by `gscale`.
    pub fn adamw_step(&mut self, cfg: &AdamWConfig, t: u64, lr: f64, gscale: f32) -> Result<()> {
        let h = AdamWScalars::new(cfg, t, lr, gscale);
        for i in 0..self.params.data.len() {
            let decay = AdamWScalars::decay(cfg, lr, &self.params.shapes[i]);
            let (p, g) = (&mut self.params.data[i], &self.grad.data[i]);
            let (mv, len) = ((&mut self.m.data[i], &mut self.v.data[i]), p.len());
            let pb = match self.work.as_mut().map(|w| &mut w[i]) {
                Some(SBuf::Bf16(b)) => Some(b),
                _ => None,
            };
            self.ops.adamw((p, pb), mv, g, 0..len, &h, decay)?;
        }
        Ok(())
    }
}

/// The resident state as [`super::Trainer`]'s step target ([`super::Trainer::train_step_cuda`]).
impl super::StepState for CudaTrainState {
    /// Sum the gradients over the data-parallel ranks (the NCCL communicator, not `group`), in place on the device (one grouped NCCL
    /// all-reduce on the training stream). Without a communicator: an error.
    ///
    /// A watchdog waits for the all-reduce: a peer that died or hangs would otherwise block
    /// this rank forever at its next read-back. It polls the stream and NCCL's asynchronous
    /// error; on an error, or after `LLADA_DIST_TIMEOUT` seconds, it aborts the communicator
    /// and returns an error.
    fn all_reduce_grads(&mut self, _group: &mut super::dist::HostGroup) -> Result<()> {
        let Some(comm) = self.nccl.as_ref() else {
            bail!("data-parallel training on CUDA needs NCCL: attach_nccl was not called");
        };
        self.ops.bind()?;
        let mut bufs = Vec::with_capacity(self.grad.data.len());
        for d in &mut self.grad.data {
            let len = d.len();
            bufs.push((self.ops.ptr_mut(d), len));
        }
        let stream = self.ops.be.stream();
        // SAFETY: every pointer is a live gradient buffer of its length on this device, used
        // only by the training stream, on which the all-reduce is queued.
        unsafe { comm.all_reduce_sum_f32(&bufs, stream.cu_stream() as *mut c_void) }?;
        self.wait_for_nccl("the gradient all-reduce")
    }

    fn zero_grad(&mut self) -> Result<()> {
        self.grad.fill_zero(&self.ops)
    }

    /// [`forward_backward`] adding into the resident gradients (in bf16 storage from the bf16
    /// working weights, the f32 gradients lent to the pass as [`SBuf::F32`]).
    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64> {
        let Some(work) = &self.work else {
            let (p, g) = (&self.params.data, &mut self.grad.data);
            return Ok(super::model::forward_backward_with(&self.ops, cfg, o, p, b, g)?.loss);
        };
        let g = &mut self.grad.data;
        Ok(forward_backward_bf16(&self.ops, cfg, o, work, b, g)?.loss)
    }

    /// Clip (PyTorch `clip_grad_norm_`, folded into the update as a gradient scale) and take
    /// AdamW update number `opt.t + 1` at learning rate `lr`. Returns the norm before clipping.
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        let gscale = clip_scale(norm, max_norm);
        self.adamw_step(&opt.cfg, opt.t + 1, lr, gscale)?;
        opt.t += 1;
        Ok(norm)
    }
}
