//! Training ops on the host: forward passes that keep what their backward needs, and the
//! backward passes, written once over [`Real`] so the same code runs in f32 (training) and f64
//! (finite-difference checks on tiny shapes).
//!
//! Training math is plain f32 with f32 accumulation: no bf16 rounding is emulated here (the
//! inference ops in [`crate::backend::cpu`] emulate PyTorch's bf16 rounding; training keeps
//! f32 master weights and f32 activations, which is what PyTorch autograd in f32 computes).
//!
//! Shapes: activations are row-major `[N, width]`; a linear weight is `[M, K]` (PyTorch
//! `nn.Linear` layout) and computes `y = x · Wᵀ`. Gradients of weights are *accumulated*
//! (`+=`), so micro-batches and several uses add up; gradients of activations are written.

use rayon::prelude::*;

/// The float types the ops run in (f32 for training, f64 for gradient checks).
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + 'static
{
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn zero() -> Self {
        Self::default()
    }
    fn one() -> Self {
        Self::from_f64(1.0)
    }
    fn neg_infinity() -> Self {
        Self::from_f64(f64::NEG_INFINITY)
    }
    fn max(self, o: Self) -> Self {
        if o > self {
            o
        } else {
            self
        }
    }
}

/// [`Real`] for a primitive float type.
macro_rules! real_float {
    ($t:ident) => {
        impl Real for $t {
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                $t::exp(self)
            }
            fn ln(self) -> Self {
                $t::ln(self)
            }
            fn sqrt(self) -> Self {
                $t::sqrt(self)
            }
        }
    };
}

real_float!(f32);
real_float!(f64);

/// The shapes shared with the inference ops: `N` rows of width `C` ([`Rows`]) and one linear's
/// sizes, `x` `[N, K]`, `w` `[M, K]`, `y` `[N, M]` ([`MatMul`]).
pub use crate::backend::shape::{MatMul, Rows};

/// The inputs of a linear's backward pass.
#[derive(Clone, Copy, Debug)]
pub struct LinearBwd<'a, T> {
    pub dy: &'a [T],
    pub x: &'a [T],
    pub w: &'a [T],
    pub d: MatMul,
}

impl<'a, T> LinearBwd<'a, T> {
    pub fn new(dy: &'a [T], x: &'a [T], w: &'a [T], d: MatMul) -> Self {
        LinearBwd { dy, x, w, d }
    }
}

/// `Σ a[i]·b[i]`, i ascending.
#[inline]
pub(crate) fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut s = T::zero();
    for (&x, &y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// `y[N, M] = x[N, K] · wᵀ`, `w` `[M, K]`.
pub fn linear<T: Real>(y: &mut [T], x: &[T], w: &[T], n: usize, k: usize, m: usize) {
    debug_assert!(y.len() >= n * m && x.len() >= n * k && w.len() >= m * k);
    y[..n * m]
        .par_chunks_mut(m)
        .zip(x[..n * k].par_chunks(k))
        .for_each(|(yr, xr)| {
            for (o, wr) in yr.iter_mut().zip(w.chunks_exact(k)) {
                *o = dot(xr, wr);
            }
        });
}

/// Backward of [`linear`]: `dx = dy · w` (written, when given; [`linear_dx`]) and
/// `dw += dyᵀ · x`.
pub fn linear_bwd<T: Real>(dx: Option<&mut [T]>, dw: &mut [T], a: LinearBwd<'_, T>) {
    let LinearBwd { dy, x, d, .. } = a;
    let MatMul { n, k, m } = d;
    if let Some(dx) = dx {
        linear_dx(dx, a);
    }
    // dw[j, :] += Σ_i dy[i, j] · x[i, :]
    dw[..m * k]
        .par_chunks_mut(k)
        .enumerate()
        .for_each(|(j, dwr)| {
            for i in 0..n {
                let g = dy[i * m + j];
                if g != T::zero() {
                    for (o, &xv) in dwr.iter_mut().zip(&x[i * k..(i + 1) * k]) {
                        *o += g * xv;
                    }
                }
            }
        });
}

/// The input gradient of [`linear`] alone: `dx[N, K] = dy[N, M] · w[M, K]` (written), the
/// `dx` of [`linear_bwd`] (a frozen weight's backward).
pub fn linear_dx<T: Real>(dx: &mut [T], a: LinearBwd<'_, T>) {
    let LinearBwd { dy, w, d, .. } = a;
    let MatMul { n, k, m } = d;
    dx[..n * k]
        .par_chunks_mut(k)
        .zip(dy[..n * m].par_chunks(m))
        .for_each(|(dxr, dyr)| {
            dxr.fill(T::zero());
            for (&g, wr) in dyr.iter().zip(w.chunks_exact(k)) {
                for (o, &wv) in dxr.iter_mut().zip(wr) {
                    *o += g * wv;
                }
            }
        });
}

/// f64 copies of `v` rounded to bf16 (round-to-nearest-even).
fn bf16_f64(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| crate::hf::dtype::DType::BF16.round(x) as f64)
        .collect()
}

/// The CPU model of a bf16 GEMM on f32 data ([`crate::train::cuda::TrainPrecision::Bf16`]):
/// [`linear`] with `x` and `w` rounded to bf16 (RNE), the products (exact) summed in f64 and
/// the result rounded once to f32 — the exact value of the bf16-input GEMM, which an f32
/// accumulation approaches within its own rounding error.
pub fn linear_bf16(y: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    let (xd, wd) = (bf16_f64(&x[..n * k]), bf16_f64(&w[..m * k]));
    let mut yd = vec![0f64; n * m];
    linear(&mut yd, &xd, &wd, n, k, m);
    for (o, v) in y[..n * m].iter_mut().zip(&yd) {
        *o = *v as f32;
    }
}

/// [`linear_bwd`] as [`linear_bf16`] models it: `dy`, `x` and `w` rounded to bf16, `dw`'s
/// previous (f32) value added unrounded, sums in f64, each output rounded once to f32.
pub fn linear_bwd_bf16(dx: Option<&mut [f32]>, dw: &mut [f32], a: LinearBwd<'_, f32>) {
    let LinearBwd { dy, x, w, d } = a;
    let MatMul { n, k, m } = d;
    let (dyd, xd, wd) = (
        bf16_f64(&dy[..n * m]),
        bf16_f64(&x[..n * k]),
        bf16_f64(&w[..m * k]),
    );
    let mut dwd: Vec<f64> = dw[..m * k].iter().map(|&v| v as f64).collect();
    let (dy, x, w) = (&dyd[..], &xd[..], &wd[..]);
    let bwd = LinearBwd { dy, x, w, d };
    match dx {
        Some(dx) => {
            let mut dxd = vec![0f64; n * k];
            linear_bwd(Some(&mut dxd), &mut dwd, bwd);
            for (o, v) in dx[..n * k].iter_mut().zip(&dxd) {
                *o = *v as f32;
            }
        }
        None => linear_bwd(None, &mut dwd, bwd),
    }
    for (o, v) in dw[..m * k].iter_mut().zip(&dwd) {
        *o = *v as f32;
    }
}

/// `y[i, :] = w ⊙ x[i, :] · r_i`, `r_i = 1/√(mean(x[i]²) + eps)`; writes `r` (`[N]`) for the
/// backward pass.
pub fn rms_norm<T: Real>(y: &mut [T], r: &mut [T], x: &[T], w: &[T], d: Rows, eps: f64) {
    let Rows { n, c } = d;
    for i in 0..n {
        let xr = &x[i * c..(i + 1) * c];
        let ms = dot(xr, xr) / T::from_f64(c as f64);
        let ri = T::one() / (ms + T::from_f64(eps)).sqrt();
        r[i] = ri;
        for ((o, &xv), &wv) in y[i * c..(i + 1) * c].iter_mut().zip(xr).zip(w) {
            *o = wv * (xv * ri);
        }
    }
}

/// Backward of [`rms_norm`]: with `g = w ⊙ dy`, `dx = r·g − x·r³·(g·x)/C` (written) and
/// `dw += Σ_i dy[i] ⊙ x[i]·r_i`.
pub fn rms_norm_bwd<T: Real>(
    dx: &mut [T],
    dw: &mut [T],
    dy: &[T],
    x: &[T],
    r: &[T],
    w: &[T],
    d: Rows,
) {
    rms_norm_dx(dx, dy, x, r, w, d);
    let Rows { n, c } = d;
    for i in 0..n {
        let (xr, dyr, ri) = (&x[i * c..(i + 1) * c], &dy[i * c..(i + 1) * c], r[i]);
        for j in 0..c {
            dw[j] += dyr[j] * xr[j] * ri;
        }
    }
}

/// The input gradient of [`rms_norm`] alone (`dx` of [`rms_norm_bwd`], written): a frozen
/// weight's backward.
pub fn rms_norm_dx<T: Real>(dx: &mut [T], dy: &[T], x: &[T], r: &[T], w: &[T], d: Rows) {
    let Rows { n, c } = d;
    for i in 0..n {
        let (xr, dyr, ri) = (&x[i * c..(i + 1) * c], &dy[i * c..(i + 1) * c], r[i]);
        let mut gx = T::zero();
        for ((&g, &wv), &xv) in dyr.iter().zip(w).zip(xr) {
            gx += g * wv * xv;
        }
        let coef = ri * ri * ri * gx / T::from_f64(c as f64);
        for j in 0..c {
            dx[i * c + j] = ri * w[j] * dyr[j] - xr[j] * coef;
        }
    }
}

/// Half-rotation RoPE in place on `heads` heads of width `hd` per row (`x` `[N, heads·hd]`,
/// `N = pos.len()`), row `i` at position `pos[i]`, tables `[max_pos, hd/2]` from
/// [`crate::backend::rope_tables`] (f32, or the same values in `T`).
/// `inverse` applies the transposed rotation, which is the backward pass (a rotation's
/// Jacobian is the rotation itself).
pub fn rope<T: Real, F: Real>(
    x: &mut [T],
    pos: &[u32],
    (cos, sin): (&[F], &[F]),
    heads: usize,
    hd: usize,
    inverse: bool,
) {
    let half = hd / 2;
    for (i, &p) in pos.iter().enumerate() {
        let p = p as usize;
        for h in 0..heads {
            let base = i * heads * hd + h * hd;
            for j in 0..half {
                let c = T::from_f64(cos[p * half + j].to_f64());
                let s = T::from_f64(sin[p * half + j].to_f64());
                let s = if inverse { -s } else { s };
                let (a, b) = (x[base + j], x[base + j + half]);
                x[base + j] = a * c - b * s;
                x[base + j + half] = b * c + a * s;
            }
        }
    }
}

/// Training attention takes the inference shape type: `b` rows of `t` tokens, `nh` query heads,
/// `nkv` key/value heads (GQA: query head `h` reads kv head `h / (nh/nkv)`), head dim `hd`.
pub use crate::backend::AttnShape;

/// The row widths of `q` (`NH·HD`) and `k`, `v` (`NKV·HD`), and the score scale 1/√HD.
fn attn_sizes<T: Real>(d: AttnShape) -> ([usize; 2], T) {
    let AttnShape { nh, nkv, hd, .. } = d;
    ([nh * hd, nkv * hd], T::from_f64(1.0 / (hd as f64).sqrt()))
}

/// Every (batch row `bi`, query head `h`, its kv head `kh`, token row `row`) of an attention
/// shape, batch rows outermost, tokens innermost: the order both passes visit (and so add) in.
fn attn_rows(d: AttnShape) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let AttnShape { b, t, nh, nkv, .. } = d;
    let group = nh / nkv;
    (0..b).flat_map(move |bi| {
        (0..nh).flat_map(move |h| (0..t).map(move |i| (bi, h, h / group, bi * t + i)))
    })
}

/// Bidirectional attention without a mask (upstream pretraining/SFT pass none), scale 1/√HD.
/// `q` `[N, NH·HD]`, `k`, `v` `[N, NKV·HD]`, `o` `[N, NH·HD]`; writes the log-sum-exp of every
/// (row, head) score row to `lse` (`[N, NH]`) so the backward pass recomputes the
/// probabilities instead of storing `[T, T]` per head (flash-attention style).
pub fn attention<T: Real>(o: &mut [T], lse: &mut [T], q: &[T], k: &[T], v: &[T], d: AttnShape) {
    let AttnShape { t, nh, hd, .. } = d;
    let ([qw, kw], scale) = attn_sizes::<T>(d);
    let mut s = vec![T::zero(); t];
    for (bi, h, kh, row) in attn_rows(d) {
        let qi = &q[row * qw + h * hd..row * qw + (h + 1) * hd];
        let mut mx = T::neg_infinity();
        for (j, sj) in s.iter_mut().enumerate() {
            let kr = (bi * t + j) * kw + kh * hd;
            *sj = dot(qi, &k[kr..kr + hd]) * scale;
            mx = mx.max(*sj);
        }
        let mut sum = T::zero();
        for sj in s.iter_mut() {
            *sj = (*sj - mx).exp();
            sum += *sj;
        }
        lse[row * nh + h] = mx + sum.ln();
        let out = &mut o[row * qw + h * hd..row * qw + (h + 1) * hd];
        out.fill(T::zero());
        for (j, &pj) in s.iter().enumerate() {
            let p = pj / sum;
            let vr = (bi * t + j) * kw + kh * hd;
            for (ov, &vv) in out.iter_mut().zip(&v[vr..vr + hd]) {
                *ov += p * vv;
            }
        }
    }
}

/// Backward of [`attention`]: `P = exp(S − lse)`, `dV = Pᵀ·dO`, `dP = dO·Vᵀ`,
/// `dS = P ⊙ (dP − rowsum(dO ⊙ O))`, `dQ = dS·K·scale`, `dK = dSᵀ·Q·scale`. Writes `dq`, `dk`,
/// `dv` (GQA heads sharing a kv head add up) from the output gradient `dout` and the forward's
/// `o` and `lse`.
pub fn attention_bwd<T: Real>(
    (dq, dk, dv): (&mut [T], &mut [T], &mut [T]),
    (dout, o, lse): (&[T], &[T], &[T]),
    (q, k, v): (&[T], &[T], &[T]),
    d: AttnShape,
) {
    let AttnShape { b, t, nh, hd, .. } = d;
    let ([qw, kw], scale) = attn_sizes::<T>(d);
    dq[..b * t * qw].fill(T::zero());
    dk[..b * t * kw].fill(T::zero());
    dv[..b * t * kw].fill(T::zero());
    let mut p = vec![T::zero(); t];
    for (bi, h, kh, row) in attn_rows(d) {
        let qo = row * qw + h * hd;
        let qi = &q[qo..qo + hd];
        let doi = &dout[qo..qo + hd];
        let delta = dot(doi, &o[qo..qo + hd]);
        let l = lse[row * nh + h];
        for (j, pj) in p.iter_mut().enumerate() {
            let kr = (bi * t + j) * kw + kh * hd;
            *pj = (dot(qi, &k[kr..kr + hd]) * scale - l).exp();
        }
        for (j, &pj) in p.iter().enumerate() {
            let kr = (bi * t + j) * kw + kh * hd;
            // dV[j] += P[i,j]·dO[i]
            for (dvv, &g) in dv[kr..kr + hd].iter_mut().zip(doi) {
                *dvv += pj * g;
            }
            let dp = dot(doi, &v[kr..kr + hd]);
            let ds = pj * (dp - delta) * scale;
            for c in 0..hd {
                dq[qo + c] += ds * k[kr + c];
                dk[kr + c] += ds * qi[c];
            }
        }
    }
}

#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// `m = silu(g) ⊙ u` over `len` elements.
pub fn swiglu<T: Real>(m: &mut [T], g: &[T], u: &[T]) {
    for ((o, &gv), &uv) in m.iter_mut().zip(g).zip(u) {
        *o = gv * sigmoid(gv) * uv;
    }
}

/// Backward of [`swiglu`]: `dg = dm·u·σ(g)(1 + g(1 − σ(g)))`, `du = dm·silu(g)` (written).
pub fn swiglu_bwd<T: Real>(dg: &mut [T], du: &mut [T], dm: &[T], g: &[T], u: &[T]) {
    for i in 0..dm.len() {
        let s = sigmoid(g[i]);
        dg[i] = dm[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
        du[i] = dm[i] * g[i] * s;
    }
}

/// `x[i, :] = wte[ids[i], :]`.
pub fn embedding<T: Real>(x: &mut [T], wte: &[T], ids: &[u32], c: usize) {
    for (i, &id) in ids.iter().enumerate() {
        let r = id as usize * c;
        x[i * c..(i + 1) * c].copy_from_slice(&wte[r..r + c]);
    }
}

/// Backward of [`embedding`]: `dwte[ids[i], :] += dx[i, :]` (repeated ids add up).
pub fn embedding_bwd<T: Real>(dwte: &mut [T], dx: &[T], ids: &[u32], c: usize) {
    for (i, &id) in ids.iter().enumerate() {
        let r = id as usize * c;
        for (o, &g) in dwte[r..r + c].iter_mut().zip(&dx[i * c..(i + 1) * c]) {
            *o += g;
        }
    }
}

/// Weighted cross-entropy over `R` logit rows `[R, V]`: returns
/// `Σ_r weight[r]·(logsumexp(z_r) − z_r[target[r]])` and overwrites `z` with its gradient
/// `weight[r]·(softmax(z_r) − onehot(target[r]))`.
pub fn cross_entropy<T: Real>(z: &mut [T], targets: &[u32], weights: &[T], v: usize) -> f64 {
    let mut loss = 0.0f64;
    for (r, zr) in z.chunks_exact_mut(v).enumerate() {
        let mx = zr.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
        let mut sum = T::zero();
        for &x in zr.iter() {
            sum += (x - mx).exp();
        }
        let lse = mx + sum.ln();
        let tgt = targets[r] as usize;
        let w = weights[r];
        loss += (w * (lse - zr[tgt])).to_f64();
        for x in zr.iter_mut() {
            *x = w * (*x - lse).exp();
        }
        zr[tgt] -= w;
    }
    loss
}
