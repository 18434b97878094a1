//! [`CudaOps`]: the training launchers' state (the backend, the f32 kernels, the GEMM
//! precision), device buffers, the GEMMs, and the f32 scalars of an AdamW step.

use super::*;

/// An f32 device buffer.
pub type Buf = CudaSlice<f32>;

crate::backend::cuda::kernel_table!(
    /// One handle per training kernel: the f32 ones named as their symbol without `_f32` (one
    /// name per op), the bf16-storage ones with `_bf16s`.
    TrainKernels {
        embedding: "embedding_f32",
        rms_norm_fwd: "rms_norm_fwd_f32",
        rope: "rope_f32",
        swiglu_fwd: "swiglu_fwd_f32",
        add: "add_f32",
        gather_rows: "gather_rows_f32",
        scatter_add_rows: "scatter_add_rows_f32",
        attention_fwd: "attention_fwd_f32",
        rms_norm_bwd: "rms_norm_bwd_f32",
        rms_norm_bwd_dw: "rms_norm_bwd_dw_f32",
        swiglu_bwd: "swiglu_bwd_f32",
        embedding_bwd: "embedding_bwd_f32",
        cross_entropy: "cross_entropy_f32",
        attention_bwd_dq: "attention_bwd_dq_f32",
        attention_bwd_dkv: "attention_bwd_dkv_f32",
        adamw: "adamw_f32",
        sumsq: "sumsq_f32",
        // bf16 storage (`stored.rs`): the `_bf16s` twins (bf16 activations and weights, f32
        // statistics and weight gradients), and the bf16 copies the inference path shares.
        embedding_bf16s: "embedding_bf16",
        rms_norm_fwd_bf16s: "rms_norm_fwd_bf16s",
        rope_bf16s: "rope_bf16s",
        swiglu_fwd_bf16s: "swiglu_fwd_bf16s",
        add_bf16s: "add_bf16",
        gather_rows_bf16s: "gather_rows_bf16",
        scatter_add_rows_bf16s: "scatter_add_rows_bf16s",
        attention_fwd_bf16s: "attention_fwd_bf16s",
        rms_norm_bwd_bf16s: "rms_norm_bwd_bf16s",
        rms_norm_bwd_dw_bf16s: "rms_norm_bwd_dw_bf16s",
        swiglu_bwd_bf16s: "swiglu_bwd_bf16s",
        embedding_bwd_bf16s: "embedding_bwd_bf16s",
        cross_entropy_bf16s: "cross_entropy_bf16s",
        attention_bwd_dq_bf16s: "attention_bwd_dq_bf16s",
        attention_bwd_dkv_bf16s: "attention_bwd_dkv_bf16s",
        f32_to_bf16: "f32_to_bf16",
    }
);

/// Blocks of 256 for the grid-stride kernels, capped (they loop).
pub(super) fn stride_grid(numel: usize) -> u32 {
    stride_blocks(numel, 4096)
}

/// Blocks of `sumsq_f32` (fixed, so the partial sums and their order are deterministic).
pub(super) const SUMSQ_BLOCKS: usize = 512;
/// Threads per block of `attention_*_f32` (the kernels assume a multiple of 32).
pub(super) const ATT_THREADS: u32 = 128;

/// The training launchers over one [`CudaBackend`].
pub struct CudaOps {
    pub be: CudaBackend,
    pub(super) k: TrainKernels,
    pub(super) precision: TrainPrecision,
    /// LoRA training over a frozen bf16 base ([`super::lora`]): when set, every linear and the
    /// embedding read the base through it.
    pub(super) lora: Option<Box<super::lora::CudaLora>>,
    /// The opt-in tiled kernels ([`super::tiled`], `LLADA_TRAIN_KERNELS=tiled`) when selected.
    pub(super) tiled: Option<Box<super::tiled::Tiled>>,
}

/// The backend's `launch!` on this state's stream, after binding the backend's context.
macro_rules! launch {
    ($self:expr, $($rest:tt)+) => {{
        $self.bind()?;
        crate::backend::cuda::launch!($self.be.stream(), $($rest)+)
    }};
}

impl CudaOps {
    /// Open CUDA device `device` and look up every training kernel.
    pub fn new(device: usize) -> Result<CudaOps> {
        let be = CudaBackend::new(device)?;
        CudaOps::from_backend(be)
    }

    pub fn from_backend(be: CudaBackend) -> Result<CudaOps> {
        let k = TrainKernels::load(|sym| be.function(sym))?;
        let mut ops = CudaOps {
            be,
            k,
            precision: TrainPrecision::F32,
            lora: None,
            tiled: None,
        };
        ops.set_train_kernels(super::TrainKernelImpl::from_env()?)?;
        Ok(ops)
    }

    /// What the GEMMs compute in from now on (the default is [`TrainPrecision::F32`]).
    pub fn set_precision(&mut self, p: TrainPrecision) {
        self.precision = p;
    }

    pub fn precision(&self) -> TrainPrecision {
        self.precision
    }

    pub(super) fn bind(&self) -> Result<()> {
        self.be
            .stream()
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }

    pub(super) fn ptr<B: DevBuf>(&self, s: &B) -> u64 {
        self.be.ptr(s)
    }

    pub(super) fn ptr_mut<B: DevBuf>(&self, s: &mut B) -> u64 {
        self.be.ptr_mut(s)
    }

    // ---- buffers ----

    /// Overwrite the first `host.len()` elements of `dst`.
    pub fn write(&self, dst: &mut Buf, host: &[f32]) -> Result<()> {
        check_len("write", "dst", dst.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(..host.len());
        self.be
            .stream()
            .memcpy_htod(host, &mut view)
            .map_err(|e| driver_err(format!("host→device copy of {} f32", host.len()), e))
    }

    /// An int buffer holding `host` (its values known to the launchers' checks).
    pub fn upload_ints(&self, host: &[i32]) -> Result<DevInts> {
        self.bind()?;
        let mut d = self.be.alloc_dev_ints(host.len())?;
        self.be.write_dev_ints(&mut d, host)?;
        Ok(d)
    }

    pub fn sync(&self) -> Result<()> {
        self.be.stream().synchronize().map_err(|e| {
            driver_err(
                "CUDA stream synchronize failed (an earlier training kernel faulted?)".into(),
                e,
            )
        })
    }

    pub(super) fn zero_fill(&self, b: &mut Buf) -> Result<()> {
        self.be
            .stream()
            .memset_zeros(b)
            .map_err(|e| driver_err("clearing a GPU buffer".into(), e))
    }

    // ---- GEMMs (cuBLAS, f32 data) ----

    /// Run `g` (column-major `C[m×n] = op(A)·op(B) + beta·C` on f32 operands; its `data` and
    /// `compute` are set here) in `self.precision` (f32, or bf16 products with f32
    /// accumulation).
    pub(super) fn gemm(&self, op: &str, g: Gemm) -> Result<()> {
        let precision = self.precision;
        self.bind()?;
        Gemm {
            data: cublas::sys::cudaDataType_t::CUDA_R_32F,
            compute: precision.compute_type(),
            ..g
        }
        .run(op, self.be.blas_handle())
        .with_context(|| format!("{op}: f32 data, {precision} compute"))
    }
}

/// The f32 scalars of one AdamW step, computed exactly as [`crate::train::optim::AdamW::step`] does.
#[derive(Clone, Copy, Debug)]
pub struct AdamWScalars {
    pub b1: f32,
    pub omb1: f32,
    pub b2: f32,
    pub omb2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// The gradients' scale (clipping folded in; 1 = none).
    pub gscale: f32,
}

impl AdamWScalars {
    /// Scalars of update number `t` (1-based) at learning rate `lr`, gradients scaled by `gscale`.
    pub fn new(c: &AdamWConfig, t: u64, lr: f64, gscale: f32) -> AdamWScalars {
        let s = crate::train::optim::AdamWStep::new(c, t, lr);
        AdamWScalars {
            b1: s.b1,
            omb1: 1.0 - s.b1,
            b2: s.b2,
            omb2: 1.0 - s.b2,
            step_size: s.step_size,
            bc2_sqrt: s.bc2_sqrt,
            eps: s.eps,
            gscale,
        }
    }

    /// The decoupled weight-decay factor of a tensor of shape `shape` (matrices only).
    pub fn decay(c: &AdamWConfig, lr: f64, shape: &[usize]) -> f32 {
        if shape.len() >= 2 {
            1.0 - (lr * c.weight_decay) as f32
        } else {
            1.0
        }
    }
}
