//! The FP8 E4M3 format and the CPU reference of the FP8 linear layer (weights per output
//! channel, activations per token, f32 accumulation).
//!
//! **E4M3** (OCP "E4M3FN", NVIDIA `__nv_fp8_e4m3`, ml_dtypes `float8_e4m3fn`): 1 sign, 4 exponent
//! (bias 7), 3 mantissa bits; no infinities; `S.1111.111` is NaN (codes `0x7F`, `0xFF`).
//! Normals `±(1 + m/8)·2^(e−7)` for `e` 1..15 up to `±448` (`0x7E`); subnormals `±m/8·2^−6`,
//! the smallest `2^−9` (`0x01`).
//!
//! **f32 → E4M3** ([`f32_to_e4m3`]) rounds to nearest, ties to even, and **saturates**: every
//! finite value beyond ±448 and ±∞ become ±448; NaN stays NaN (`0x7F` or `0xFF`, keeping the
//! sign). This is CUDA's `__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)`, the conversion the
//! GPU path uses, and it matches ml_dtypes (which overflows to NaN instead) everywhere below 464.
//! Saturation is the safe choice for quantization: a scale is chosen so that `|x|/s ≤ 448`, and
//! the only values beyond are rounding slop of the scale, which must not turn into NaN.
//!
//! **Scales.** A weight row (output channel) `w[j, :]` is stored as codes `q = e4m3(w / s_j)`
//! with `s_j = amax_j / 448` (`amax_j = max |w[j, k]|`; an all-zero row gets `s_j = 1`). An
//! activation row (token) is quantized the same way on the fly: `s_i = amax_i / 448`,
//! `q = e4m3(x / s_i)` — one f32 division per element, correctly rounded (so the GPU kernel,
//! compiled without fast math, gives the same codes). A non-finite activation makes its token's
//! scale non-finite and that token's outputs NaN, so a NaN is never hidden.
//!
//! **Matmul** ([`matmul`]): `out[i, j] = round_dt((s_i · s_j) · Σ_k x̂[i, k] · ŵ[j, k])` where
//! `x̂`, `ŵ` are the E4M3 values; each product is exact in f32 (4-bit mantissas) and the sum is
//! f32 (8 interleaved partial sums, fixed order, as the CPU backend's `dot`). This is what
//! cuBLASLt computes for an FP8 GEMM with per-row / per-column (outer-vector) scales and a bf16
//! output, up to the order of the f32 sum.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use crate::backend::cpu::check::need;
use crate::backend::cpu::dot::dot;
use crate::backend::shape::MatMul;
use crate::hf::checkpoint::WeightSource;
use crate::hf::dtype::DType;

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Smallest positive (subnormal) E4M3 value, `2^−9`.
pub const E4M3_MIN_SUBNORMAL: f32 = 1.0 / 512.0;
/// Smallest positive normal E4M3 value, `2^−6`.
pub const E4M3_MIN_NORMAL: f32 = 1.0 / 64.0;
/// The canonical NaN code (the sign bit may be set too: `0xFF`).
pub const E4M3_NAN: u8 = 0x7F;

/// f32 → E4M3, round to nearest (ties to even), saturating to ±448 (±∞ too); NaN → NaN.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = ((x.to_bits() >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | E4M3_NAN;
    }
    let a = x.abs();
    if a > E4M3_MAX {
        return sign | 0x7E;
    }
    if a < E4M3_MIN_NORMAL {
        // Subnormal range: value = q · 2^−9 with q in 0..=8 (q = 8 is the smallest normal,
        // whose code 0x08 is exactly exponent field 1, mantissa 0). `a · 512` is exact.
        let q = (a * 512.0).round_ties_even() as u8;
        return sign | q;
    }
    let bits = a.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127; // -6..=8
    let mant = bits & 0x7F_FFFF;
    let mut m = mant >> 20;
    let rem = mant & 0xF_FFFF;
    const HALF: u32 = 0x8_0000;
    if rem > HALF || (rem == HALF && (m & 1) == 1) {
        m += 1;
        if m == 8 {
            m = 0;
            e += 1;
        }
    }
    let ef = (e + 7) as u32; // 1..=15 (a ≤ 448 keeps (15, 7) out: that would be 480)
    if ef > 15 || (ef == 15 && m == 7) {
        return sign | 0x7E;
    }
    sign | ((ef << 3) as u8) | (m as u8)
}

/// E4M3 → f32 (exact). `0x7F`/`0xFF` give NaN.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let neg = b & 0x80 != 0;
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    let v = if e == 15 && (b & 7) == 7 {
        f32::NAN
    } else if e == 0 {
        m * E4M3_MIN_SUBNORMAL
    } else {
        (1.0 + m / 8.0) * (2.0f32).powi(e - 7)
    };
    if neg {
        -v
    } else {
        v
    }
}

/// The 256 decoded values, indexed by code.
pub fn e4m3_table() -> &'static [f32; 256] {
    static T: OnceLock<[f32; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0.0f32; 256];
        for (i, v) in t.iter_mut().enumerate() {
            *v = e4m3_to_f32(i as u8);
        }
        t
    })
}

/// The E4M3 value nearest to `x` (saturating), as f32: `e4m3_to_f32(f32_to_e4m3(x))`.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    e4m3_table()[f32_to_e4m3(x) as usize]
}

/// `max |x|` over a row, or NaN if any element is NaN (`f32::max` would drop it).
pub fn amax(xs: &[f32]) -> f32 {
    let mut m = 0.0f32;
    for &x in xs {
        if x.is_nan() {
            return f32::NAN;
        }
        m = m.max(x.abs());
    }
    m
}

/// The scale of a row with this `amax`: `amax / 448`, or 1 for an all-zero row.
#[inline]
pub fn scale_for(amax: f32) -> f32 {
    if amax == 0.0 {
        1.0
    } else {
        amax / E4M3_MAX
    }
}

/// Quantize one row: returns its scale and writes the E4M3 values (as f32) of `x / s` to `out`.
pub fn quantize_row_values(x: &[f32], out: &mut [f32]) -> f32 {
    let s = scale_for(amax(x));
    for (o, &v) in out.iter_mut().zip(x) {
        *o = round_e4m3(v / s);
    }
    s
}

/// Quantize one row into codes; returns its scale.
pub fn quantize_row_codes(x: &[f32], out: &mut [u8]) -> f32 {
    let s = scale_for(amax(x));
    for (o, &v) in out.iter_mut().zip(x) {
        *o = f32_to_e4m3(v / s);
    }
    s
}

/// Where the codes of an [`Fp8Weight`] live.
#[derive(Clone, Debug)]
pub enum Fp8Codes {
    /// Quantized at load.
    Owned(Arc<Vec<u8>>),
    /// A memory-mapped `F8_E4M3` safetensors tensor (byte range checked at load).
    Mapped {
        mmap: Arc<memmap2::Mmap>,
        start: usize,
        end: usize,
    },
}

/// One FP8 linear weight `[rows, cols]` (`nn.Linear` layout `[out, in]`): E4M3 codes and one f32
/// scale per row (output channel). Values are `e4m3_to_f32(code[j, k]) · scale[j]`.
#[derive(Clone, Debug)]
pub struct Fp8Weight {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    codes: Fp8Codes,
    scale: Arc<Vec<f32>>,
}

impl Fp8Weight {
    /// A weight from codes and scales, validated: `rows·cols` codes, no NaN code, `rows` finite
    /// positive scales. Errors name the tensor.
    pub fn new(
        name: &str,
        rows: usize,
        cols: usize,
        codes: Fp8Codes,
        scale: Vec<f32>,
    ) -> Result<Fp8Weight> {
        let numel = rows
            .checked_mul(cols)
            .ok_or_else(|| anyhow::anyhow!("tensor `{name}`: shape [{rows}, {cols}] overflows"))?;
        let w = Fp8Weight {
            name: name.to_string(),
            rows,
            cols,
            codes,
            scale: Arc::new(scale),
        };
        if let Fp8Codes::Mapped { mmap, start, end } = &w.codes {
            ensure!(
                start <= end && *end <= mmap.len(),
                "tensor `{name}`: byte range {start}..{end} lies outside its file ({} bytes)",
                mmap.len()
            );
        }
        let c = w.codes();
        ensure!(
            c.len() == numel,
            "tensor `{name}`: {} E4M3 bytes, its shape [{rows}, {cols}] needs {numel}",
            c.len()
        );
        ensure!(
            w.scale.len() == rows,
            "tensor `{name}_scale`: {} scales for {rows} output channels",
            w.scale.len()
        );
        if let Some((j, s)) = w
            .scale
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            bail!("tensor `{name}_scale`: scale[{j}] = {s} is not a finite positive number");
        }
        if let Some(i) = c.iter().position(|&b| b & 0x7F == E4M3_NAN) {
            bail!(
                "tensor `{name}`: element {i} (row {}, column {}) is an E4M3 NaN",
                i / cols.max(1),
                i % cols.max(1)
            );
        }
        Ok(w)
    }

    /// Quantize a 2-D weight per output row (see the module docs). A non-finite weight is an
    /// error naming the tensor and the element.
    pub fn quantize(src: &WeightSource) -> Result<Fp8Weight> {
        let name = src.name();
        let (rows, cols) = match src.shape() {
            [r, c] => (*r, *c),
            s => bail!("tensor `{name}`: FP8 quantization needs a 2-D weight, got shape {s:?}"),
        };
        let mut codes = vec![0u8; rows * cols];
        let mut scale = vec![0.0f32; rows];
        if cols > 0 {
            let bad = std::sync::Mutex::new(None::<(usize, usize, f32)>);
            codes
                .par_chunks_mut(cols)
                .zip(scale.par_iter_mut())
                .enumerate()
                .for_each(|(j, (q, s))| {
                    let mut row = vec![0.0f32; cols];
                    src.read_range(j * cols, (j + 1) * cols, &mut row);
                    if let Some(k) = row.iter().position(|v| !v.is_finite()) {
                        let mut b = bad.lock().unwrap_or_else(|e| e.into_inner());
                        if b.map_or(true, |(bj, _, _)| j < bj) {
                            *b = Some((j, k, row[k]));
                        }
                        *s = 1.0;
                        return;
                    }
                    *s = quantize_row_codes(&row, q);
                });
            if let Some((j, k, v)) = bad.into_inner().unwrap_or_else(|e| e.into_inner()) {
                bail!("tensor `{name}`: element [{j}, {k}] = {v} is not finite; cannot quantize");
            }
        } else {
            scale.fill(1.0);
        }
        Fp8Weight::new(name, rows, cols, Fp8Codes::Owned(Arc::new(codes)), scale)
    }

    /// The `rows·cols` E4M3 codes, row-major.
    pub fn codes(&self) -> &[u8] {
        match &self.codes {
            Fp8Codes::Owned(v) => v,
            Fp8Codes::Mapped { mmap, start, end } => &mmap[*start..*end],
        }
    }

    /// The per-row scales.
    pub fn scale(&self) -> &[f32] {
        &self.scale
    }

    /// Dequantized row `r` into `out` (`cols` values): `e4m3(code) · scale[r]`.
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let t = e4m3_table();
        let s = self.scale[r];
        for (o, &b) in out
            .iter_mut()
            .zip(&self.codes()[r * self.cols..(r + 1) * self.cols])
        {
            *o = t[b as usize] * s;
        }
    }
}

thread_local! {
    /// Per-thread scratch of [`matmul`] (quantized activation rows and decoded weight rows);
    /// grows once, so a forward pass allocates nothing after the first.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The FP8 linear layer, CPU reference: `out[N, M] = x[N, K] · wᵀ` with the weight given as
/// row-stacked FP8 parts (`Σ rows = M`, each `[rows_p, K]`), activations quantized per token
/// (module docs), f32 accumulation, each output rounded once to `dt`.
pub fn matmul(dt: DType, out: &mut [f32], x: &[f32], parts: &[Fp8Weight], s: MatMul) -> Result<()> {
    const OP: &str = "matmul_fp8";
    let MatMul { n, k, m } = s;
    need(OP, "out", out.len(), n * m)?;
    need(OP, "x", x.len(), n * k)?;
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    if let Some(p) = parts.iter().find(|p| p.cols != k) {
        bail!(
            "{OP}: weight `{}` has {} columns, expected K = {k}",
            p.name,
            p.cols
        );
    }
    ensure!(
        rows == m,
        "{OP}: the weight parts have {rows} rows, expected M = {m}"
    );
    if n == 0 || m == 0 {
        return Ok(());
    }
    if k == 0 {
        out[..n * m].fill(0.0);
        return Ok(());
    }
    let table = e4m3_table();
    let rpt = n.div_ceil(rayon::current_num_threads().max(1)).max(1);
    const TM: usize = 8;
    out[..n * m]
        .par_chunks_mut(rpt * m)
        .zip(x[..n * k].par_chunks(rpt * k))
        .for_each(|(o, xs)| {
            let nr = xs.len() / k;
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let (xq, wd) = &mut *s;
                if xq.len() < nr * k + nr {
                    xq.resize(nr * k + nr, 0.0);
                }
                if wd.len() < TM * k {
                    wd.resize(TM * k, 0.0);
                }
                let (xv, xs_scale) = xq.split_at_mut(nr * k);
                for i in 0..nr {
                    xs_scale[i] =
                        quantize_row_values(&xs[i * k..(i + 1) * k], &mut xv[i * k..(i + 1) * k]);
                }
                let mut j0 = 0;
                let mut pi = 0;
                let mut p0 = 0; // first output column of part `pi`
                while j0 < m {
                    while j0 >= p0 + parts[pi].rows {
                        p0 += parts[pi].rows;
                        pi += 1;
                    }
                    let p = &parts[pi];
                    let tm = TM.min(p0 + p.rows - j0);
                    let codes = p.codes();
                    for t in 0..tm {
                        let lr = j0 - p0 + t;
                        for (d, &b) in wd[t * k..(t + 1) * k]
                            .iter_mut()
                            .zip(&codes[lr * k..(lr + 1) * k])
                        {
                            *d = table[b as usize];
                        }
                    }
                    for i in 0..nr {
                        let xr = &xv[i * k..(i + 1) * k];
                        let sx = xs_scale[i];
                        for t in 0..tm {
                            let sw = p.scale[j0 - p0 + t];
                            let acc = dot(xr, &wd[t * k..(t + 1) * k]);
                            o[i * m + j0 + t] = dt.round((sx * sw) * acc);
                        }
                    }
                    j0 += tm;
                }
            })
        });
    Ok(())
}
