//! Training on one CUDA device: the f32 training kernels (the `*_f32` symbols of each op's
//! `kernels/<op>.cu`, and `kernels/adamw.cu`; contract in `kernels/ABI.md`) and cuBLAS GEMMs (f32,
//! or bf16 tensor-core compute on f32 data), launched on a [`CudaBackend`]'s context, stream
//! and cuBLAS handle.
//!
//! - [`CudaOps`]: one launcher per op of [`super::ops`] (same shapes, same argument meaning),
//!   each validating buffer lengths and every host-known id / row / position before launching.
//! - [`DeviceParams`] + [`forward_backward`]: the whole model, the same math and order as
//!   [`super::model::forward_backward`].
//! - [`CudaTrainState`]: parameters, gradients and AdamW moments resident on the device; the
//!   optimizer step ([`CudaTrainState::adamw_step`]) and the global gradient norm run there.
//!
//! Precision ([`TrainPrecision`], set with [`CudaOps::set_precision`]): storage is **f32**
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
//! Memory: 16 bytes per parameter (weights, gradients, two moments) plus f32 activations of
//! every layer, so one 80 GB GPU trains models up to roughly 3–4 B parameters at short
//! sequences; the 8B preset does not fit on one GPU. Several GPUs train data parallel
//! ([`super::dist`]): every GPU holds the whole state, so that does not raise the limit.
//!
//! Kernel launches are asynchronous; a fault surfaces at the next read-back.

use crate::backend::cuda::{
    check_dyn_smem, check_len, driver_err, grid_yz, int, stride_blocks, Gemm, Geom,
};
use std::ffi::c_void;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas;
use cudarc::driver::{sys as dsys, CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::model::{i_block, Batch, Params, I_WTE};
use super::ops::AttnDims;
use super::optim::AdamWConfig;
use crate::backend::cuda::CudaBackend;
use crate::backend::rope_tables;
use crate::config::ModelConfig;

/// An f32 device buffer.
pub type Buf = CudaSlice<f32>;

/// An int buffer on the device with its host copy (for bounds checks before launches).
pub struct DevInts {
    pub buf: CudaSlice<i32>,
    pub host: Vec<i32>,
}

struct TrainKernels {
    embedding: dsys::CUfunction,
    rms_norm_fwd: dsys::CUfunction,
    rope: dsys::CUfunction,
    swiglu_fwd: dsys::CUfunction,
    add: dsys::CUfunction,
    gather_rows: dsys::CUfunction,
    scatter_add_rows: dsys::CUfunction,
    attention_fwd: dsys::CUfunction,
    rms_norm_bwd: dsys::CUfunction,
    rms_norm_bwd_dw: dsys::CUfunction,
    swiglu_bwd: dsys::CUfunction,
    embedding_bwd: dsys::CUfunction,
    cross_entropy: dsys::CUfunction,
    attention_bwd_dq: dsys::CUfunction,
    attention_bwd_dkv: dsys::CUfunction,
    adamw: dsys::CUfunction,
    sumsq: dsys::CUfunction,
}

/// Blocks of 256 for the grid-stride kernels, capped (they loop).
fn stride_grid(numel: usize) -> u32 {
    stride_blocks(numel, 4096)
}

/// Blocks of `sumsq_f32` (fixed, so the partial sums and their order are deterministic).
const SUMSQ_BLOCKS: usize = 512;
/// Threads per block of `attention_*_f32` (the kernels assume a multiple of 32).
const ATT_THREADS: u32 = 128;

/// Every one of the first `n` host values lies in `[0, hi)`.
fn check_ints(op: &str, arg: &str, v: &DevInts, n: usize, hi: usize, what: &str) -> Result<()> {
    check_len(op, arg, v.host.len().min(v.buf.len()), n)?;
    if let Some((i, &x)) = v
        .host
        .iter()
        .take(n)
        .enumerate()
        .find(|(_, &x)| x < 0 || x as usize >= hi)
    {
        bail!("{op}: {arg}[{i}] = {x} is outside {what} (0..{hi})");
    }
    Ok(())
}

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
        match self {
            TrainPrecision::F32 => "f32",
            TrainPrecision::Bf16 => "bf16",
        }
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

impl std::str::FromStr for TrainPrecision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<TrainPrecision> {
        match s {
            "f32" => Ok(TrainPrecision::F32),
            "bf16" => Ok(TrainPrecision::Bf16),
            _ => bail!("unknown training precision `{s}` (expected f32 or bf16)"),
        }
    }
}

impl std::fmt::Display for TrainPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The training launchers over one [`CudaBackend`].
pub struct CudaOps {
    pub be: CudaBackend,
    k: TrainKernels,
    precision: TrainPrecision,
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
        let f = |s: &str| be.function(s);
        let k = TrainKernels {
            embedding: f("embedding_f32")?,
            rms_norm_fwd: f("rms_norm_fwd_f32")?,
            rope: f("rope_f32")?,
            swiglu_fwd: f("swiglu_fwd_f32")?,
            add: f("add_f32")?,
            gather_rows: f("gather_rows_f32")?,
            scatter_add_rows: f("scatter_add_rows_f32")?,
            attention_fwd: f("attention_fwd_f32")?,
            rms_norm_bwd: f("rms_norm_bwd_f32")?,
            rms_norm_bwd_dw: f("rms_norm_bwd_dw_f32")?,
            swiglu_bwd: f("swiglu_bwd_f32")?,
            embedding_bwd: f("embedding_bwd_f32")?,
            cross_entropy: f("cross_entropy_f32")?,
            attention_bwd_dq: f("attention_bwd_dq_f32")?,
            attention_bwd_dkv: f("attention_bwd_dkv_f32")?,
            adamw: f("adamw_f32")?,
            sumsq: f("sumsq_f32")?,
        };
        Ok(CudaOps {
            be,
            k,
            precision: TrainPrecision::F32,
        })
    }

    /// What the GEMMs compute in from now on (the default is [`TrainPrecision::F32`]).
    pub fn set_precision(&mut self, p: TrainPrecision) {
        self.precision = p;
    }

    pub fn precision(&self) -> TrainPrecision {
        self.precision
    }

    fn bind(&self) -> Result<()> {
        self.be
            .stream()
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        // Event tracking is disabled on the backend's context: the guard records nothing.
        s.device_ptr(self.be.stream()).0
    }

    fn ptr_mut<T>(&self, s: &mut CudaSlice<T>) -> u64 {
        s.device_ptr_mut(self.be.stream()).0
    }

    // ---- buffers ----

    /// `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<Buf> {
        self.be
            .stream()
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| driver_err(format!("allocating {len} f32 on the GPU"), e))
    }

    pub fn upload(&self, host: &[f32]) -> Result<Buf> {
        let mut b = self.zeros(host.len())?;
        if !host.is_empty() {
            self.be
                .stream()
                .memcpy_htod(host, &mut b)
                .map_err(|e| driver_err(format!("host→device copy of {} f32", host.len()), e))?;
        }
        Ok(b)
    }

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

    pub fn upload_ints(&self, host: &[i32]) -> Result<DevInts> {
        let mut buf = self
            .be
            .stream()
            .alloc_zeros::<i32>(host.len().max(1))
            .map_err(|e| driver_err(format!("allocating {} ints on the GPU", host.len()), e))?;
        if !host.is_empty() {
            self.be
                .stream()
                .memcpy_htod(host, &mut buf)
                .map_err(|e| driver_err(format!("host→device copy of {} ints", host.len()), e))?;
        }
        Ok(DevInts {
            buf,
            host: host.to_vec(),
        })
    }

    /// The first `n` elements of `src` (synchronizes the stream).
    pub fn download(&self, src: &Buf, n: usize) -> Result<Vec<f32>> {
        check_len("download", "src", src.len(), n)?;
        let mut out = vec![0f32; n];
        if n > 0 {
            self.be
                .stream()
                .memcpy_dtoh(&src.slice(..n), &mut out)
                .map_err(|e| driver_err("device→host copy".into(), e))?;
        }
        self.sync()?;
        Ok(out)
    }

    pub fn sync(&self) -> Result<()> {
        self.be.stream().synchronize().map_err(|e| {
            driver_err(
                "CUDA stream synchronize failed (an earlier training kernel faulted?)".into(),
                e,
            )
        })
    }

    fn zero_fill(&self, b: &mut Buf) -> Result<()> {
        self.be
            .stream()
            .memset_zeros(b)
            .map_err(|e| driver_err("clearing a GPU buffer".into(), e))
    }

    // ---- GEMMs (cuBLAS, f32 data) ----

    /// Column-major `C[m×n] = op(A)·op(B) + beta·C`, f32 operands, computed in
    /// `self.precision` (f32, or bf16 products with f32 accumulation).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: &str,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
    ) -> Result<()> {
        let precision = self.precision;
        self.bind()?;
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            a,
            lda,
            b,
            ldb,
            beta,
            c,
            ldc,
            data: cublas::sys::cudaDataType_t::CUDA_R_32F,
            compute: precision.compute_type(),
        }
        .run(op, self.be.blas_handle())
        .with_context(|| format!("{op}: f32 data, {precision} compute"))
    }

    /// `y[N, M] = x[N, K]·wᵀ` ([`super::ops::linear`]). Row-major buffers read column-major
    /// are transposes: `yᵀ = W·xᵀ` with `W` stored `[M, K]` = column-major `K×M`, so
    /// `op(A) = Aᵀ` (lda K), `B = xᵀ` (ldb K), ldc M.
    pub fn linear(
        &self,
        y: &mut Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let op = "linear";
        check_len(op, "y", y.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        check_len(op, "w", w.len(), m * k)?;
        let (yp, xp, wp) = (self.ptr_mut(y), self.ptr(x), self.ptr(w));
        self.gemm(op, true, false, (m, n, k), wp, k, xp, k, 0.0, yp, m)
    }

    /// Backward of [`CudaOps::linear`] ([`super::ops::linear_bwd`]): `dx = dy·w` (written, or
    /// added when `dx_accumulate`), `dw += dyᵀ·x`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_bwd(
        &self,
        dx: Option<&mut Buf>,
        dx_accumulate: bool,
        dw: &mut Buf,
        dy: &Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let op = "linear_bwd";
        check_len(op, "dw", dw.len(), m * k)?;
        check_len(op, "dy", dy.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        check_len(op, "w", w.len(), m * k)?;
        let (dyp, xp, wp) = (self.ptr(dy), self.ptr(x), self.ptr(w));
        if let Some(dx) = dx {
            check_len(op, "dx", dx.len(), n * k)?;
            let dxp = self.ptr_mut(dx);
            // dxᵀ (K×N) = Wᵀ (col-major K×M, as stored) · dyᵀ (M×N, as stored).
            let beta = if dx_accumulate { 1.0 } else { 0.0 };
            if k > 0 && n > 0 && m == 0 && !dx_accumulate {
                self.zero_fill(dx)?;
            } else {
                self.gemm(op, false, false, (k, n, m), wp, k, dyp, m, beta, dxp, k)?;
            }
        }
        // dWᵀ (K×M) += xᵀ (col-major K×N, as stored) · dy (N×M = transpose of the stored M×N).
        let dwp = self.ptr_mut(dw);
        if n > 0 {
            self.gemm(op, false, true, (k, m, n), xp, k, dyp, m, 1.0, dwp, k)?;
        }
        Ok(())
    }

    // ---- element-wise and row ops ----

    pub fn embedding(
        &self,
        out: &mut Buf,
        wte: &Buf,
        ids: &DevInts,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "embedding";
        check_len(op, "out", out.len(), n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        check_ints(op, "ids", ids, n, wte.len() / c, "the embedding rows")?;
        if n == 0 {
            return Ok(());
        }
        let (o, w, i) = (self.ptr_mut(out), self.ptr(wte), self.ptr(&ids.buf));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.embedding, Geom::new((n as u32, 1, 1), 256, 0); o, w, i, n_, c_)
    }

    /// Backward of the embedding: `dwte[ids[i]] += dx[i]` (rows in ascending order; the CSR
    /// grouping is built here from the host ids, no atomics: deterministic, bit-exact).
    pub fn embedding_bwd(&self, dwte: &mut Buf, dx: &Buf, ids: &[u32], c: usize) -> Result<()> {
        let op = "embedding_bwd";
        let n = ids.len();
        check_len(op, "dx", dx.len(), n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        let v = dwte.len() / c;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &x)| x as usize >= v) {
            bail!("{op}: ids[{i}] = {id} is outside the {v} embedding rows");
        }
        if n == 0 {
            return Ok(());
        }
        let mut order: Vec<i32> = (0..n as i32).collect();
        order.sort_by_key(|&i| (ids[i as usize], i)); // stable in i within one id
        let (mut uniq, mut off) = (Vec::new(), Vec::new());
        for (e, &i) in order.iter().enumerate() {
            let id = ids[i as usize] as i32;
            if uniq.last() != Some(&id) {
                uniq.push(id);
                off.push(e as i32);
            }
        }
        off.push(n as i32);
        let (u, o, ord) = (
            self.upload_ints(&uniq)?,
            self.upload_ints(&off)?,
            self.upload_ints(&order)?,
        );
        let nu = uniq.len();
        let (dp, xp, up, op_, orp) = (
            self.ptr_mut(dwte),
            self.ptr(dx),
            self.ptr(&u.buf),
            self.ptr(&o.buf),
            self.ptr(&ord.buf),
        );
        let (nu_, c_) = (int(op, "nuniq", nu)?, int(op, "c", c)?);
        launch!(self, op, self.k.embedding_bwd, Geom::new((nu as u32, 1, 1), 256, 0); dp, xp, up,
            op_, orp, nu_, c_)?;
        // The index buffers are freed on drop: finish the launch first.
        self.sync()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        y: &mut Buf,
        r: &mut Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm";
        check_len(op, "y", y.len(), n * c)?;
        check_len(op, "r", r.len(), n)?;
        check_len(op, "x", x.len(), n * c)?;
        check_len(op, "w", w.len(), c)?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (yp, rp, xp, wp) = (self.ptr_mut(y), self.ptr_mut(r), self.ptr(x), self.ptr(w));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.rms_norm_fwd, Geom::new((n as u32, 1, 1), 256, 0); yp, rp, xp, wp,
            n_, c_, eps)
    }

    /// [`super::ops::rms_norm_bwd`]: `dx` written, `dw` accumulated.
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_bwd(
        &self,
        dx: &mut Buf,
        dw: &mut Buf,
        dy: &Buf,
        x: &Buf,
        r: &Buf,
        w: &Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "rms_norm_bwd";
        check_len(op, "dx", dx.len(), n * c)?;
        check_len(op, "dw", dw.len(), c)?;
        check_len(op, "dy", dy.len(), n * c)?;
        check_len(op, "x", x.len(), n * c)?;
        check_len(op, "r", r.len(), n)?;
        check_len(op, "w", w.len(), c)?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (dxp, dwp, dyp, xp, rp, wp) = (
            self.ptr_mut(dx),
            self.ptr_mut(dw),
            self.ptr(dy),
            self.ptr(x),
            self.ptr(r),
            self.ptr(w),
        );
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.rms_norm_bwd, Geom::new((n as u32, 1, 1), 256, 0); dxp, dyp, xp,
            rp, wp, n_, c_)?;
        launch!(self, op, self.k.rms_norm_bwd_dw, Geom::new((c.div_ceil(256) as u32, 1, 1), 256, 0);
            dwp, dyp, xp, rp, n_, c_)
    }

    /// RoPE in place on `x` `[N, heads·hd]` (`inverse`: the backward rotation).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut Buf,
        pos: &DevInts,
        cos: &Buf,
        sin: &Buf,
        n: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        let op = "rope";
        ensure!(
            hd > 0 && hd % 2 == 0,
            "{op}: head dim {hd} must be even and positive"
        );
        check_len(op, "x", x.len(), n * heads * hd)?;
        ensure!(
            cos.len() == sin.len() && cos.len() >= hd / 2,
            "{op}: tables `cos` ({}) and `sin` ({}) must be [max_pos, HD/2 = {}]",
            cos.len(),
            sin.len(),
            hd / 2
        );
        let max_pos = cos.len() / (hd / 2);
        check_ints(op, "pos", pos, n, max_pos, "the RoPE tables")?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let (xp, cp, sp, pp) = (
            self.ptr_mut(x),
            self.ptr(cos),
            self.ptr(sin),
            self.ptr(&pos.buf),
        );
        let (n_, h_, hd_) = (
            int(op, "n", n)?,
            int(op, "heads", heads)?,
            int(op, "hd", hd)?,
        );
        // +1 rotates, −1 rotates back (the kernel multiplies sin by it: exact either way).
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        let f = self.k.rope;
        launch!(self, op, f, Geom::new((n as u32, 1, 1), 256, 0); xp, cp, sp, pp, n_, h_, hd_,
            sign)
    }

    pub fn swiglu(&self, m: &mut Buf, g: &Buf, u: &Buf, len: usize) -> Result<()> {
        let op = "swiglu";
        check_len(op, "m", m.len(), len)?;
        check_len(op, "g", g.len(), len)?;
        check_len(op, "u", u.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let (mp, gp, up) = (self.ptr_mut(m), self.ptr(g), self.ptr(u));
        let numel = len as i64;
        launch!(self, op, self.k.swiglu_fwd, Geom::new((stride_grid(len), 1, 1), 256, 0); mp, gp,
            up, numel)
    }

    pub fn swiglu_bwd(
        &self,
        dg: &mut Buf,
        du: &mut Buf,
        dm: &Buf,
        g: &Buf,
        u: &Buf,
        len: usize,
    ) -> Result<()> {
        let op = "swiglu_bwd";
        for (a, l) in [
            ("dg", dg.len()),
            ("du", du.len()),
            ("dm", dm.len()),
            ("g", g.len()),
            ("u", u.len()),
        ] {
            check_len(op, a, l, len)?;
        }
        if len == 0 {
            return Ok(());
        }
        let (dgp, dup, dmp, gp, up) = (
            self.ptr_mut(dg),
            self.ptr_mut(du),
            self.ptr(dm),
            self.ptr(g),
            self.ptr(u),
        );
        let numel = len as i64;
        launch!(self, op, self.k.swiglu_bwd, Geom::new((stride_grid(len), 1, 1), 256, 0); dgp, dup,
            dmp, gp, up, numel)
    }

    /// `x += d` over `len` elements.
    pub fn add(&self, x: &mut Buf, d: &Buf, len: usize) -> Result<()> {
        let op = "add";
        check_len(op, "x", x.len(), len)?;
        check_len(op, "d", d.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let (xp, dp) = (self.ptr_mut(x), self.ptr(d));
        let numel = len as i64;
        launch!(self, op, self.k.add, Geom::new((stride_grid(len), 1, 1), 256, 0); xp, dp, numel)
    }

    pub fn gather_rows(
        &self,
        out: &mut Buf,
        x: &Buf,
        rows: &DevInts,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        let op = "gather_rows";
        ensure!(c > 0, "{op}: C must be positive");
        check_len(op, "out", out.len(), nrows * c)?;
        check_ints(op, "rows", rows, nrows, x.len() / c, "the rows of `x`")?;
        if nrows == 0 {
            return Ok(());
        }
        let (o, xp, r) = (self.ptr_mut(out), self.ptr(x), self.ptr(&rows.buf));
        let (nr, c_) = (int(op, "nrows", nrows)?, int(op, "c", c)?);
        launch!(self, op, self.k.gather_rows, Geom::new((nrows as u32, 1, 1), 256, 0); o, xp, r,
            nr, c_)
    }

    /// `dx[rows[i]] += src[i]`, i ascending (repeated rows add up).
    pub fn scatter_add_rows(
        &self,
        dx: &mut Buf,
        src: &Buf,
        rows: &DevInts,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        let op = "scatter_add_rows";
        ensure!(c > 0, "{op}: C must be positive");
        check_len(op, "src", src.len(), nrows * c)?;
        check_ints(op, "rows", rows, nrows, dx.len() / c, "the rows of `dx`")?;
        if nrows == 0 {
            return Ok(());
        }
        let (d, s, r) = (self.ptr_mut(dx), self.ptr(src), self.ptr(&rows.buf));
        let (nr, c_) = (int(op, "nrows", nrows)?, int(op, "c", c)?);
        launch!(self, op, self.k.scatter_add_rows, Geom::new((c.div_ceil(256) as u32, 1, 1), 256, 0);
            d, s, r, nr, c_)
    }

    fn attn_checks(op: &str, d: AttnDims) -> Result<()> {
        let AttnDims { b, nh, nkv, hd, .. } = d;
        ensure!(
            nkv > 0 && nh % nkv == 0,
            "{op}: NH = {nh} must be a positive multiple of NKV = {nkv}"
        );
        ensure!(hd > 0, "{op}: head dim must be positive");
        grid_yz(op, "b", b)?;
        grid_yz(op, "nh", nh)?;
        Ok(())
    }

    /// [`super::ops::attention`]: `o`, and `lse` `[N, NH]` for the backward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        o: &mut Buf,
        lse: &mut Buf,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        d: AttnDims,
    ) -> Result<()> {
        let op = "attention";
        Self::attn_checks(op, d)?;
        let AttnDims { b, t, nh, nkv, hd } = d;
        let n = b * t;
        check_len(op, "o", o.len(), n * nh * hd)?;
        check_len(op, "lse", lse.len(), n * nh)?;
        check_len(op, "q", q.len(), n * nh * hd)?;
        check_len(op, "k", k.len(), n * nkv * hd)?;
        check_len(op, "v", v.len(), n * nkv * hd)?;
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem = check_dyn_smem(op, self.k.attention_fwd, (t + hd) * 4, &what)?;
        if n == 0 || nh == 0 {
            return Ok(());
        }
        let (op_, lp, qp, kp, vp) = (
            self.ptr_mut(o),
            self.ptr_mut(lse),
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
        );
        let (b_, t_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "t", t)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        launch!(self, op, self.k.attention_fwd, Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem);
            op_, lp, qp, kp, vp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`super::ops::attention_bwd`]: writes `dq`, `dk`, `dv`; `delta` is scratch `[N, NH]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        &self,
        dq: &mut Buf,
        dk: &mut Buf,
        dv: &mut Buf,
        delta: &mut Buf,
        dout: &Buf,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        o: &Buf,
        lse: &Buf,
        d: AttnDims,
    ) -> Result<()> {
        let op = "attention_bwd";
        Self::attn_checks(op, d)?;
        let AttnDims { b, t, nh, nkv, hd } = d;
        let n = b * t;
        let (qw, kw) = (nh * hd, nkv * hd);
        for (a, l, need) in [
            ("dq", dq.len(), n * qw),
            ("dk", dk.len(), n * kw),
            ("dv", dv.len(), n * kw),
            ("delta", delta.len(), n * nh),
            ("dout", dout.len(), n * qw),
            ("q", q.len(), n * qw),
            ("k", k.len(), n * kw),
            ("v", v.len(), n * kw),
            ("o", o.len(), n * qw),
            ("lse", lse.len(), n * nh),
        ] {
            check_len(op, a, l, need)?;
        }
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem_q = check_dyn_smem(op, self.k.attention_bwd_dq, (t + 2 * hd) * 4, &what)?;
        let smem_kv = check_dyn_smem(op, self.k.attention_bwd_dkv, (2 * t + 4 * hd) * 4, &what)?;
        if n == 0 {
            return Ok(());
        }
        if nh == 0 {
            self.zero_fill(dk)?;
            return self.zero_fill(dv);
        }
        let (dqp, dkp, dvp, dlp) = (
            self.ptr_mut(dq),
            self.ptr_mut(dk),
            self.ptr_mut(dv),
            self.ptr_mut(delta),
        );
        let (dop, qp, kp, vp, opp, lp) = (
            self.ptr(dout),
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(o),
            self.ptr(lse),
        );
        let (b_, t_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "t", t)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        launch!(self, op, self.k.attention_bwd_dq, Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem_q);
            dqp, dlp, dop, qp, kp, vp, opp, lp, b_, t_, nh_, nkv_, hd_)?;
        launch!(self, op, self.k.attention_bwd_dkv, Geom::new((t as u32, nkv as u32, b as u32), ATT_THREADS, smem_kv);
            dkp, dvp, dlp, dop, qp, kp, vp, lp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`super::ops::cross_entropy`] on the first `r` rows of `z` `[R, V]` (overwritten
    /// with the gradient); returns `Σ_r loss_r` summed on the host in f64, in row order (as the
    /// CPU does). `loss_rows` is scratch `[R]`.
    pub fn cross_entropy(
        &self,
        z: &mut Buf,
        loss_rows: &mut Buf,
        targets: &DevInts,
        weights: &Buf,
        r: usize,
        v: usize,
    ) -> Result<f64> {
        let op = "cross_entropy";
        check_len(op, "z", z.len(), r * v)?;
        check_len(op, "loss_rows", loss_rows.len(), r)?;
        check_len(op, "weights", weights.len(), r)?;
        check_ints(op, "targets", targets, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(0.0);
        }
        let (zp, lp, tp, wp) = (
            self.ptr_mut(z),
            self.ptr_mut(loss_rows),
            self.ptr(&targets.buf),
            self.ptr(weights),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        launch!(self, op, self.k.cross_entropy, Geom::new((r as u32, 1, 1), 1024, 0); zp, lp, tp,
            wp, r_, v_)?;
        let rows = self.download(loss_rows, r)?;
        Ok(rows.iter().map(|&x| x as f64).sum())
    }

    /// Σ x² over the first `len` elements, f64 (fixed partial-sum grid: deterministic).
    pub fn sumsq(&self, x: &Buf, len: usize, partial: &mut CudaSlice<f64>) -> Result<f64> {
        let op = "sumsq";
        check_len(op, "x", x.len(), len)?;
        check_len(op, "partial", partial.len(), SUMSQ_BLOCKS)?;
        if len == 0 {
            return Ok(0.0);
        }
        let (pp, xp) = (self.ptr_mut(partial), self.ptr(x));
        let numel = len as i64;
        launch!(self, op, self.k.sumsq, Geom::new((SUMSQ_BLOCKS as u32, 1, 1), 256, 0); pp, xp,
            numel)?;
        let mut h = vec![0f64; SUMSQ_BLOCKS];
        self.be
            .stream()
            .memcpy_dtoh(&partial.slice(..SUMSQ_BLOCKS), &mut h)
            .map_err(|e| driver_err(format!("{op}: device→host copy"), e))?;
        self.sync()?;
        Ok(h.iter().sum())
    }

    /// One AdamW update of one tensor (`adamw_f32`, see [`super::optim::AdamW::step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        p: &mut Buf,
        m: &mut Buf,
        v: &mut Buf,
        p_bf16: Option<&mut CudaSlice<bf16>>,
        g: &Buf,
        len: usize,
        h: &AdamWScalars,
        decay: f32,
        gscale: f32,
    ) -> Result<()> {
        let op = "adamw";
        for (a, l) in [
            ("p", p.len()),
            ("m", m.len()),
            ("v", v.len()),
            ("g", g.len()),
        ] {
            check_len(op, a, l, len)?;
        }
        let pb: u64 = match p_bf16 {
            Some(b) => {
                check_len(op, "p_bf16", b.len(), len)?;
                self.ptr_mut(b)
            }
            None => 0,
        };
        if len == 0 {
            return Ok(());
        }
        let (pp, mp, vp, gp) = (
            self.ptr_mut(p),
            self.ptr_mut(m),
            self.ptr_mut(v),
            self.ptr(g),
        );
        let numel = len as i64;
        let AdamWScalars {
            b1,
            omb1,
            b2,
            omb2,
            step_size,
            bc2_sqrt,
            eps,
        } = *h;
        launch!(self, op, self.k.adamw, Geom::new((stride_grid(len), 1, 1), 256, 0); pp, mp, vp,
            pb, gp, numel, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps, decay, gscale)
    }
}

/// The f32 scalars of one AdamW step, computed exactly as [`super::optim::AdamW::step`] does.
#[derive(Clone, Copy, Debug)]
pub struct AdamWScalars {
    pub b1: f32,
    pub omb1: f32,
    pub b2: f32,
    pub omb2: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamWScalars {
    /// Scalars of update number `t` (1-based) at learning rate `lr`.
    pub fn new(c: &AdamWConfig, t: u64, lr: f64) -> AdamWScalars {
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        AdamWScalars {
            b1,
            omb1: 1.0 - b1,
            b2,
            omb2: 1.0 - b2,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
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

/// Every parameter (or gradient, or moment) of a model on the device, in the order of
/// [`Params`].
pub struct DeviceParams {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Buf>,
}

impl DeviceParams {
    pub fn upload(ops: &CudaOps, p: &Params<f32>) -> Result<DeviceParams> {
        let data = p
            .data
            .iter()
            .zip(&p.names)
            .map(|(d, n)| ops.upload(d).with_context(|| format!("uploading `{n}`")))
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceParams {
            names: p.names.clone(),
            shapes: p.shapes.clone(),
            data,
        })
    }

    /// Copy every tensor back into `p` (same layout).
    pub fn download_into(&self, ops: &CudaOps, p: &mut Params<f32>) -> Result<()> {
        ensure!(
            p.data.len() == self.data.len(),
            "download: {} tensors on the device, {} on the host",
            self.data.len(),
            p.data.len()
        );
        for (i, d) in p.data.iter_mut().enumerate() {
            *d = ops.download(&self.data[i], d.len())?;
        }
        Ok(())
    }

    pub fn download(&self, ops: &CudaOps) -> Result<Params<f32>> {
        let mut p = Params {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            data: self
                .shapes
                .iter()
                .map(|s| vec![0f32; s.iter().product()])
                .collect(),
        };
        self.download_into(ops, &mut p)?;
        Ok(p)
    }

    pub fn fill_zero(&mut self, ops: &CudaOps) -> Result<()> {
        for d in &mut self.data {
            ops.zero_fill(d)?;
        }
        Ok(())
    }

    fn lm_head(&self) -> usize {
        self.data.len() - 1
    }
    fn ln_f(&self) -> usize {
        self.data.len() - 2
    }
}

const ATTN_NORM: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const ATTN_OUT: usize = 4;
const FF_NORM: usize = 5;
const GATE: usize = 6;
const UP: usize = 7;
const DOWN: usize = 8;

/// What one layer's forward pass keeps for the backward pass (as in `model.rs`).
struct Saved {
    x_in: Buf,
    r1: Buf,
    h1: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    lse: Buf,
    a: Buf,
    x_mid: Buf,
    r2: Buf,
    h2: Buf,
    g: Buf,
    u: Buf,
    m: Buf,
}

fn copy(ops: &CudaOps, dst: &mut Buf, src: &Buf) -> Result<()> {
    ops.bind()?;
    ops.be
        .stream()
        .memcpy_dtod(src, dst)
        .map_err(|e| driver_err("device copy".into(), e))
}

/// Loss of `batch` under `p` on the GPU, with every parameter's gradient **added** to `grad`:
/// [`super::model::forward_backward`] step by step (same ops, same order), f32 throughout.
/// Activation buffers are allocated per call (stream-ordered) and freed at the end.
pub fn forward_backward(
    ops: &CudaOps,
    cfg: &ModelConfig,
    p: &DeviceParams,
    batch: &Batch,
    grad: &mut DeviceParams,
) -> Result<f64> {
    batch.validate(cfg)?;
    ensure!(
        p.data.len() == 3 + 9 * cfg.n_layers && grad.data.len() == p.data.len(),
        "forward_backward (cuda): parameter sets do not match the config's {} layers",
        cfg.n_layers
    );
    let (b, t) = (batch.b, batch.t);
    let n = b * t;
    let (c, nh, nkv, hd, f, v) = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim(),
        cfg.mlp_hidden_size,
        cfg.embedding_size,
    );
    let (qw, kw) = (nh * hd, nkv * hd);
    let eps = cfg.rms_norm_eps;
    let dims = AttnDims { b, t, nh, nkv, hd };
    let (cos_h, sin_h) = rope_tables(cfg.rope_theta, hd, t.max(1));
    let (cos, sin) = (ops.upload(&cos_h)?, ops.upload(&sin_h)?);
    let pos: Vec<i32> = (0..n).map(|i| (i % t.max(1)) as i32).collect();
    let pos = ops.upload_ints(&pos)?;
    let ids: Vec<i32> = batch.ids.iter().map(|&x| x as i32).collect();
    let ids_d = ops.upload_ints(&ids)?;
    let z = |len: usize| ops.zeros(len);

    // ---- forward ----
    let mut x = z(n * c)?;
    ops.embedding(&mut x, &p.data[I_WTE], &ids_d, n, c)?;
    let mut saved: Vec<Saved> = Vec::with_capacity(cfg.n_layers);
    let mut tmp_c = z(n * c)?;
    for l in 0..cfg.n_layers {
        let w = |part: usize| &p.data[i_block(l, part)];
        let mut s = Saved {
            x_in: z(n * c)?,
            r1: z(n)?,
            h1: z(n * c)?,
            q: z(n * qw)?,
            k: z(n * kw)?,
            v: z(n * kw)?,
            lse: z(n * nh)?,
            a: z(n * qw)?,
            x_mid: z(n * c)?,
            r2: z(n)?,
            h2: z(n * c)?,
            g: z(n * f)?,
            u: z(n * f)?,
            m: z(n * f)?,
        };
        copy(ops, &mut s.x_in, &x)?;
        ops.rms_norm(&mut s.h1, &mut s.r1, &x, w(ATTN_NORM), n, c, eps)?;
        ops.linear(&mut s.q, &s.h1, w(Q), n, c, qw)?;
        ops.linear(&mut s.k, &s.h1, w(K), n, c, kw)?;
        ops.linear(&mut s.v, &s.h1, w(V), n, c, kw)?;
        ops.rope(&mut s.q, &pos, &cos, &sin, n, nh, hd, false)?;
        ops.rope(&mut s.k, &pos, &cos, &sin, n, nkv, hd, false)?;
        ops.attention(&mut s.a, &mut s.lse, &s.q, &s.k, &s.v, dims)?;
        ops.linear(&mut tmp_c, &s.a, w(ATTN_OUT), n, qw, c)?;
        ops.add(&mut x, &tmp_c, n * c)?;
        copy(ops, &mut s.x_mid, &x)?;
        ops.rms_norm(&mut s.h2, &mut s.r2, &x, w(FF_NORM), n, c, eps)?;
        ops.linear(&mut s.g, &s.h2, w(GATE), n, c, f)?;
        ops.linear(&mut s.u, &s.h2, w(UP), n, c, f)?;
        ops.swiglu(&mut s.m, &s.g, &s.u, n * f)?;
        ops.linear(&mut tmp_c, &s.m, w(DOWN), n, f, c)?;
        ops.add(&mut x, &tmp_c, n * c)?;
        saved.push(s);
    }
    let r = batch.rows.len();
    let rows: Vec<i32> = batch.rows.iter().map(|&x| x as i32).collect();
    let rows_d = ops.upload_ints(&rows)?;
    let mut xr = z(r * c)?;
    ops.gather_rows(&mut xr, &x, &rows_d, r, c)?;
    let mut rf = z(r)?;
    let mut hf = z(r * c)?;
    let (i_lm, i_lnf) = (p.lm_head(), p.ln_f());
    ops.rms_norm(&mut hf, &mut rf, &xr, &p.data[i_lnf], r, c, eps)?;
    let mut logits = z(r * v)?;
    ops.linear(&mut logits, &hf, &p.data[i_lm], r, c, v)?;
    let weights: Vec<f32> = batch.weights.iter().map(|&w| w as f32).collect();
    let weights_d = ops.upload(&weights)?;
    let tg: Vec<i32> = batch.targets.iter().map(|&x| x as i32).collect();
    let tg_d = ops.upload_ints(&tg)?;
    let mut loss_rows = z(r)?;
    let loss = ops.cross_entropy(&mut logits, &mut loss_rows, &tg_d, &weights_d, r, v)?;

    // ---- backward ----
    let mut dhf = z(r * c)?;
    ops.linear_bwd(
        Some(&mut dhf),
        false,
        &mut grad.data[i_lm],
        &logits,
        &hf,
        &p.data[i_lm],
        r,
        c,
        v,
    )?;
    let mut dxr = z(r * c)?;
    ops.rms_norm_bwd(
        &mut dxr,
        &mut grad.data[i_lnf],
        &dhf,
        &xr,
        &rf,
        &p.data[i_lnf],
        r,
        c,
    )?;
    let mut dx = z(n * c)?;
    ops.scatter_add_rows(&mut dx, &dxr, &rows_d, r, c)?;
    let mut dm = z(n * f)?;
    let mut dg = z(n * f)?;
    let mut du = z(n * f)?;
    let mut dh = z(n * c)?;
    let mut da = z(n * qw)?;
    let mut dq = z(n * qw)?;
    let mut dk = z(n * kw)?;
    let mut dv = z(n * kw)?;
    let mut delta = z(n * nh)?;
    for l in (0..cfg.n_layers).rev() {
        let s = &saved[l];
        let gi = |part: usize| i_block(l, part);
        let w = |part: usize| &p.data[i_block(l, part)];
        // x_out = x_mid + m·W_downᵀ
        ops.linear_bwd(
            Some(&mut dm),
            false,
            &mut grad.data[gi(DOWN)],
            &dx,
            &s.m,
            w(DOWN),
            n,
            f,
            c,
        )?;
        ops.swiglu_bwd(&mut dg, &mut du, &dm, &s.g, &s.u, n * f)?;
        ops.linear_bwd(
            Some(&mut dh),
            false,
            &mut grad.data[gi(GATE)],
            &dg,
            &s.h2,
            w(GATE),
            n,
            c,
            f,
        )?;
        ops.linear_bwd(
            Some(&mut dh),
            true,
            &mut grad.data[gi(UP)],
            &du,
            &s.h2,
            w(UP),
            n,
            c,
            f,
        )?;
        ops.rms_norm_bwd(
            &mut tmp_c,
            &mut grad.data[gi(FF_NORM)],
            &dh,
            &s.x_mid,
            &s.r2,
            w(FF_NORM),
            n,
            c,
        )?;
        ops.add(&mut dx, &tmp_c, n * c)?;
        // x_mid = x_in + a·W_oᵀ
        ops.linear_bwd(
            Some(&mut da),
            false,
            &mut grad.data[gi(ATTN_OUT)],
            &dx,
            &s.a,
            w(ATTN_OUT),
            n,
            qw,
            c,
        )?;
        ops.attention_bwd(
            &mut dq, &mut dk, &mut dv, &mut delta, &da, &s.q, &s.k, &s.v, &s.a, &s.lse, dims,
        )?;
        ops.rope(&mut dq, &pos, &cos, &sin, n, nh, hd, true)?;
        ops.rope(&mut dk, &pos, &cos, &sin, n, nkv, hd, true)?;
        ops.linear_bwd(
            Some(&mut dh),
            false,
            &mut grad.data[gi(Q)],
            &dq,
            &s.h1,
            w(Q),
            n,
            c,
            qw,
        )?;
        ops.linear_bwd(
            Some(&mut dh),
            true,
            &mut grad.data[gi(K)],
            &dk,
            &s.h1,
            w(K),
            n,
            c,
            kw,
        )?;
        ops.linear_bwd(
            Some(&mut dh),
            true,
            &mut grad.data[gi(V)],
            &dv,
            &s.h1,
            w(V),
            n,
            c,
            kw,
        )?;
        ops.rms_norm_bwd(
            &mut tmp_c,
            &mut grad.data[gi(ATTN_NORM)],
            &dh,
            &s.x_in,
            &s.r1,
            w(ATTN_NORM),
            n,
            c,
        )?;
        ops.add(&mut dx, &tmp_c, n * c)?;
    }
    ops.embedding_bwd(&mut grad.data[I_WTE], &dx, &batch.ids, c)?;
    // Every buffer above is freed on return: make sure the work using them is done (and
    // surface a kernel fault here, naming the step).
    ops.sync().context("the GPU forward/backward pass")?;
    Ok(loss)
}

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
        let partial = ops
            .be
            .stream()
            .alloc_zeros::<f64>(SUMSQ_BLOCKS)
            .map_err(|e| driver_err("allocating the gradient-norm partials".into(), e))?;
        Ok(CudaTrainState {
            ops,
            params: dp,
            grad,
            m: dm,
            v: dv,
            partial,
            nccl: None,
            reduced: None,
        })
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

    /// Sum the gradients over the data-parallel ranks, in place on the device (one grouped NCCL
    /// all-reduce on the training stream). Without a communicator: an error.
    ///
    /// A watchdog waits for the all-reduce: a peer that died or hangs would otherwise block
    /// this rank forever at its next read-back. It polls the stream and NCCL's asynchronous
    /// error; on an error, or after `LLADA_DIST_TIMEOUT` seconds, it aborts the communicator
    /// and returns an error.
    pub fn all_reduce_grads(&mut self) -> Result<()> {
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
                Err(e) => break Some(anyhow!("the gradient all-reduce failed on the GPU: {e:?}")),
            }
            if let Err(e) = comm.async_error() {
                break Some(e.context("the gradient all-reduce (a peer may have stopped)"));
            }
            if t0.elapsed() > limit {
                break Some(anyhow!(
                    "the gradient all-reduce did not finish within {:.0} s (LLADA_DIST_TIMEOUT): \
                     a peer is stuck or gone",
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

    pub fn zero_grad(&mut self) -> Result<()> {
        self.grad.fill_zero(&self.ops)
    }

    /// [`forward_backward`] adding into the resident gradients.
    pub fn forward_backward(&mut self, cfg: &ModelConfig, batch: &Batch) -> Result<f64> {
        forward_backward(&self.ops, cfg, &self.params, batch, &mut self.grad)
    }

    /// Global L2 norm of the gradients (f64).
    pub fn grad_norm(&mut self) -> Result<f64> {
        let mut s = 0.0f64;
        for d in &self.grad.data {
            s += self.ops.sumsq(d, d.len(), &mut self.partial)?;
        }
        Ok(s.sqrt())
    }

    /// Clip (PyTorch `clip_grad_norm_`, folded into the update as a gradient scale) and take
    /// AdamW update number `t` at learning rate `lr`. Returns the norm before clipping.
    pub fn clip_and_step(
        &mut self,
        cfg: &AdamWConfig,
        t: u64,
        lr: f64,
        max_norm: f64,
    ) -> Result<f64> {
        let norm = self.grad_norm()?;
        let mut gscale = 1.0f32;
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                gscale = coef as f32;
            }
        }
        self.adamw_step(cfg, t, lr, gscale)?;
        Ok(norm)
    }

    /// AdamW update number `t` (1-based) of every tensor, gradients scaled by `gscale`.
    pub fn adamw_step(&mut self, cfg: &AdamWConfig, t: u64, lr: f64, gscale: f32) -> Result<()> {
        let h = AdamWScalars::new(cfg, t, lr);
        for i in 0..self.params.data.len() {
            let decay = AdamWScalars::decay(cfg, lr, &self.params.shapes[i]);
            let len = self.params.data[i].len();
            self.ops.adamw(
                &mut self.params.data[i],
                &mut self.m.data[i],
                &mut self.v.data[i],
                None,
                &self.grad.data[i],
                len,
                &h,
                decay,
                gscale,
            )?;
        }
        Ok(())
    }
}
