//! FP8 linear layers on CUDA (`--weights fp8 --device cuda`): E4M3 weights with per-output-channel
//! scales resident on the device, activations quantized per token by `kernels/fp8_quant.cu`
//! (`fp8_quant_bf16`), and a cuBLASLt FP8 GEMM with per-row / per-column scale vectors
//! (`CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F`), f32 accumulation and bf16 output.
//!
//! The math is exactly the CPU reference [`crate::quant::fp8::matmul`] up to the order of the f32
//! sum: `out[i, j] = bf16(s_x[i] · s_w[j] · Σ_k e4m3(x̂[i, k]) · e4m3(ŵ[j, k]))`.
//! Hopper's FP8 tensor cores accumulate in reduced precision unless cuBLASLt promotes the partial
//! sums; `CUBLASLT_MATMUL_DESC_FAST_ACCUM` is left off (the default), so it does.
//!
//! Supported: sm_89 (Ada) and sm_90 (Hopper) only; elsewhere loading an FP8 weight fails with an
//! error naming the GPU. Row-major `out[N, M] = x[N, K] · Wᵀ` is column-major `Wᵀ·x` with `W` the
//! "A" operand transposed and `x` the "B" operand (the TN layout FP8 GEMMs require); K and M must
//! be multiples of 16 (16-byte leading dimensions).
//!
//! **Status: compiled, never run.** No GPU has executed this file or `fp8_quant.cu`; the parity
//! test `tests/cuda_fp8.rs` skips without one. Only `--weights fp8` on a CUDA device reaches it.
//!
//! Memory: the activation codes and scales live in a scratch allocated once on the first FP8
//! weight load (64 MiB of codes); a GEMM whose `N·K` exceeds it runs in groups of rows, so a
//! forward pass allocates nothing and stays capturable into a CUDA graph.

use std::cell::RefCell;
use std::ffi::c_void;

use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::sys as ltsys;
use cudarc::driver::{result as dres, sys as dsys, CudaSlice, CudaStream};
use half::bf16;

use super::launch::{dptr, dptr_mut};
use super::lt::{self, Desc, Handle, Layout, LT_WORKSPACE};
use super::{check_len, check_lens, CudaBackend, CudaWeight};
use crate::backend::MatMul;
use crate::quant::fp8::Fp8Weight;

/// Bytes of the activation-code scratch (rows are processed in groups that fit).
const XQ_BYTES: usize = 64 << 20;
/// Threads per block of `fp8_quant_bf16`.
const QUANT_THREADS: u32 = 256;

/// An FP8 linear weight on the device: E4M3 codes `[M, K]` and f32 scales `[M]`.
pub struct Fp8DeviceWeight {
    pub codes: CudaSlice<u8>,
    pub scale: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Per-backend FP8 state, created on the first FP8 weight load.
#[derive(Default)]
pub struct Fp8State {
    inner: RefCell<Option<Inner>>,
}

struct Inner {
    lt: Handle,
    /// Activation codes `[rows, K]` of the current group of rows.
    xq: CudaSlice<u8>,
    /// Activation scales, one per row of the group.
    xs: CudaSlice<f32>,
    ws: CudaSlice<u8>,
    quant: dsys::CUfunction,
}

/// Whether this GPU runs the FP8 path (sm_89 or sm_90), or the error saying why not.
pub fn check_arch(be: &CudaBackend) -> Result<()> {
    let (maj, min) = be.compute_capability()?;
    if (maj, min) != (8, 9) && (maj, min) != (9, 0) {
        bail!(
            "FP8 GEMMs (--weights fp8) need an sm_89 (Ada) or sm_90 (Hopper) GPU; {} is \
             sm_{maj}{min}. Use --weights checkpoint (bf16) on this GPU",
            be.device_name()
        );
    }
    Ok(())
}

fn init(be: &CudaBackend) -> Result<Inner> {
    check_arch(be)?;
    let stream = be.stream();
    let lt = Handle::new()?;
    let alloc = || -> Result<(CudaSlice<u8>, CudaSlice<f32>, CudaSlice<u8>)> {
        Ok((
            stream.alloc_zeros::<u8>(XQ_BYTES)?,
            stream.alloc_zeros::<f32>(XQ_BYTES / 16)?,
            stream.alloc_zeros::<u8>(LT_WORKSPACE)?,
        ))
    };
    let (xq, xs, ws) = alloc().map_err(|e| e.context("allocating the FP8 scratch"))?;
    let quant = be.function("fp8_quant_bf16")?;
    Ok(Inner {
        lt,
        xq,
        xs,
        ws,
        quant,
    })
}

/// Upload FP8 parts stacked by rows ([`crate::backend::Backend::load_weight_fp8`]). The returned
/// weight has no bf16 data (`rows = cols = 0`, so every bf16 op refuses it); `matmul` sees `fp8`.
pub fn load_weight(be: &CudaBackend, parts: &[Fp8Weight]) -> Result<CudaWeight> {
    let state = &be.fp8;
    if parts.is_empty() {
        bail!("load_weight_fp8: no parts given");
    }
    {
        let mut st = state.inner.borrow_mut();
        if st.is_none() {
            *st = Some(init(be)?);
        }
    }
    let cols = parts[0].cols;
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    let name = parts
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join("|");
    let mut codes = Vec::with_capacity(rows * cols);
    let mut scale = Vec::with_capacity(rows);
    for p in parts {
        if p.cols != cols {
            bail!(
                "load_weight_fp8: tensor `{}` has {} columns, the first part `{}` has {cols}",
                p.name,
                p.cols,
                parts[0].name
            );
        }
        codes.extend_from_slice(p.codes());
        scale.extend_from_slice(p.scale());
    }
    if cols % 16 != 0 || rows % 16 != 0 {
        bail!(
            "load_weight_fp8: `{name}` is [{rows}, {cols}]; FP8 GEMMs need both dimensions to be \
             multiples of 16"
        );
    }
    let stream = be.stream();
    let d = Fp8DeviceWeight {
        codes: stream
            .clone_htod(&codes)
            .map_err(|e| anyhow!("uploading FP8 `{name}`: {e:?}"))?,
        scale: stream
            .clone_htod(&scale)
            .map_err(|e| anyhow!("uploading the scales of `{name}`: {e:?}"))?,
        rows,
        cols,
    };
    let placeholder = stream
        .alloc_zeros::<bf16>(1)
        .map_err(|e| anyhow!("allocating `{name}`: {e:?}"))?;
    Ok(CudaWeight {
        buf: placeholder,
        rows: 0,
        cols: 0,
        name,
        fp8: Some(Box::new(d)),
    })
}

/// `out[N, M] = x[N, K] · Wᵀ` with `W` FP8 (see the module docs); `name` names the weight.
pub fn matmul(
    be: &CudaBackend,
    out: &mut CudaSlice<bf16>,
    x: &CudaSlice<bf16>,
    w: &Fp8DeviceWeight,
    name: &str,
    s: MatMul,
) -> Result<()> {
    let (op, MatMul { n, k, m }) = ("matmul_fp8", s);
    if w.rows != m || w.cols != k {
        bail!(
            "{op}: weight `{name}` is [{}, {}], expected [M={m}, K={k}]",
            w.rows,
            w.cols
        );
    }
    check_lens(op, &[("out", out.len(), n * m), ("x", x.len(), n * k)])?;
    if n == 0 || m == 0 {
        return Ok(());
    }
    let mut st = be.fp8.inner.borrow_mut();
    let inner = st
        .as_mut()
        .ok_or_else(|| anyhow!("{op}: FP8 state not initialised (no FP8 weight was loaded)"))?;
    let stream = be.stream().clone();
    let group = (XQ_BYTES / k).min(inner.xs.len()).max(1);
    let i32_of = |v: usize, arg: &str| {
        i32::try_from(v).map_err(|_| anyhow!("{op}: `{arg}` = {v} exceeds 32-bit int range"))
    };
    let (k_, m_) = (i32_of(k, "k")?, i32_of(m, "m")?);
    let (wp, wsp) = (dptr(&w.codes, &stream), dptr(&w.scale, &stream));
    let (xp, op_) = (dptr(x, &stream), dptr_mut(out, &stream));
    let (xqp, xsp) = (
        dptr_mut(&mut inner.xq, &stream),
        dptr_mut(&mut inner.xs, &stream),
    );
    let wsp_lt = dptr_mut(&mut inner.ws, &stream);
    let mut r0 = 0;
    while r0 < n {
        let nr = group.min(n - r0);
        let nr_ = i32_of(nr, "n")?;
        // 1. Quantize the rows [r0, r0 + nr) of x into the scratch.
        let xrow = xp + (r0 * k * 2) as u64;
        // SAFETY: `xq` holds ≥ nr·K bytes and `xs` ≥ nr floats (group size), x ≥ (r0 + nr)·K
        // (checked).
        unsafe { launch_quant(inner, &stream, [xqp, xsp, xrow], nr_, k_) }
            .map_err(|e| anyhow!("{op}: fp8_quant_bf16 launch failed: {e:?}"))?;
        // 2. D[M, nr] (col-major, ld M) = (A = W: [K, M] col-major, transposed) · (B = x̂: [K, nr]).
        let dp = op_ + (r0 * m * 2) as u64;
        let g = LtGemm {
            a: (wp, wsp),
            b: (xqp, xsp),
            d: dp,
            ws: wsp_lt,
            mnk: (m_, nr_, k_),
        };
        g.run(inner.lt.0, &stream)
            .map_err(|e| anyhow!("{op}: `{name}` [N={nr}, K={k}] x [M={m}, K={k}]^T: {e}"))?;
        r0 += nr;
    }
    Ok(())
}

/// Launch `fp8_quant_bf16(u8* q, f32* scale, const bf16* x, int n, int k)` (ABI.md) on the
/// device pointers `[q, scale, x]`, one block per row.
///
/// # Safety
/// `q` must hold `n·k` bytes, `scale` `n` floats and `x` `n·k` bf16 values.
unsafe fn launch_quant(
    inner: &Inner,
    stream: &CudaStream,
    [q, scale, x]: [u64; 3],
    n: i32,
    k: i32,
) -> Result<(), dres::DriverError> {
    let mut args: Vec<*mut c_void> = vec![
        &q as *const u64 as *mut c_void,
        &scale as *const u64 as *mut c_void,
        &x as *const u64 as *mut c_void,
        &n as *const i32 as *mut c_void,
        &k as *const i32 as *mut c_void,
    ];
    dres::launch_kernel(
        inner.quant,
        (n as u32, 1, 1),
        (QUANT_THREADS, 1, 1),
        0,
        stream.cu_stream(),
        &mut args,
    )
}

/// One cuBLASLt FP8 GEMM `D[M, N] = (A: FP8 [K, M] col-major, transposed) · (B: FP8 [K, N])`,
/// bf16 output (device addresses): `a`, `b` are (codes, per-column f32 scales), `ws` the
/// workspace of [`LT_WORKSPACE`] bytes, `mnk` the sizes.
struct LtGemm {
    a: (u64, u64),
    b: (u64, u64),
    d: u64,
    ws: u64,
    mnk: (i32, i32, i32),
}

impl LtGemm {
    fn run(&self, handle: ltsys::cublasLtHandle_t, stream: &CudaStream) -> Result<()> {
        let LtGemm {
            a: (a, a_scale),
            b: (b, b_scale),
            d,
            ws,
            mnk: (m, n, k),
        } = *self;
        use ltsys::cublasLtMatmulDescAttributes_t as A;
        use ltsys::cudaDataType_t as T;
        let desc: Desc = lt::desc_32f(true, false)?;
        let vec = ltsys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
        lt::set_desc(&desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &vec)?;
        lt::set_desc(&desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec)?;
        lt::set_desc(&desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale)?;
        lt::set_desc(&desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale)?;
        let (m, n, k) = (m as usize, n as usize, k as usize);
        let la: Layout = lt::layout(T::CUDA_R_8F_E4M3, k, m, k)?;
        let lb = lt::layout(T::CUDA_R_8F_E4M3, k, n, k)?;
        let ld = lt::layout(T::CUDA_R_16BF, m, n, m)?;
        let algo = lt::heuristic(handle, &desc, [&la, &lb, &ld], &[]).map_err(|e| {
            anyhow!("FP8 GEMM with per-channel/per-token scales for this shape: {e}")
        })?;
        // SAFETY: a, b, d, the scale vectors and the workspace are live device allocations of the
        // sizes the layouts describe (checked by the caller); alpha/beta are host f32 (scale type).
        unsafe {
            lt::matmul(
                handle,
                &desc,
                [&la, &lb, &ld],
                [a, b, d],
                [1.0, 0.0],
                &algo,
                ws,
                stream,
            )
        }
    }
}

/// Run `fp8_quant_bf16` alone (parity tests): quantize `x` `[N, K]` into codes and scales.
pub fn quantize_act(
    be: &CudaBackend,
    x: &CudaSlice<bf16>,
    n: usize,
    k: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    let op = "fp8_quant";
    check_len(op, "x", x.len(), n * k)?;
    {
        let mut st = be.fp8.inner.borrow_mut();
        if st.is_none() {
            *st = Some(init(be)?);
        }
    }
    let st = be.fp8.inner.borrow();
    let inner = st.as_ref().ok_or_else(|| anyhow!("{op}: no FP8 state"))?;
    let stream = be.stream().clone();
    let mut q = stream.alloc_zeros::<u8>(n * k)?;
    let mut s = stream.alloc_zeros::<f32>(n)?;
    let (qp, sp, xp) = (
        dptr_mut(&mut q, &stream),
        dptr_mut(&mut s, &stream),
        dptr(x, &stream),
    );
    let n_ = i32::try_from(n)?;
    let k_ = i32::try_from(k)?;
    if n > 0 {
        // SAFETY: q holds N·K bytes, s N floats, x N·K bf16 (checked).
        unsafe { launch_quant(inner, &stream, [qp, sp, xp], n_, k_) }
            .map_err(|e| anyhow!("{op}: launch failed: {e:?}"))?;
    }
    let qh = stream.clone_dtoh(&q)?;
    let sh = stream.clone_dtoh(&s)?;
    Ok((qh, sh))
}
