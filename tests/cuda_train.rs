//! GPU training parity: every f32 training kernel of `llada::train::cuda` against the CPU
//! reference op of `llada::train::ops` (f32 on both sides, same inputs), then one whole-model
//! training step and a few optimizer steps against the CPU trainer.
//!
//! The op and whole-pass test bodies are written once over [`TrainOps`] (`*_on<B: TrainOps>`)
//! and run twice by `on_each_device!`: on `HostOps<f32>` (the trait's host path against the
//! `ops` reference; runs everywhere) and on `CudaOps`. The optimizer, the trainer and the bf16
//! GEMM tests are device-only.
//!
//! Notation: u = 2^-24 (f32 unit roundoff). Both sides compute in f32 from identical inputs, so
//! each differs from the exact result by at most the classic rounding-error bound of its own
//! evaluation order, and their difference by at most twice that. Tolerances, per element:
//! - bit-exact where both sides do the same IEEE operations in the same order (the kernels use
//!   explicit `__fmul_rn`/`__fadd_rn`, so nvcc cannot contract FMAs): embedding (fwd, bwd: CSR,
//!   no atomics), gather / scatter-add rows, add, RoPE (fwd, bwd), RMSNorm's `dw`, AdamW.
//! - sums in another order (cuBLAS GEMMs, tree reductions): a sum of K products is within
//!   (K+2)·u·Σ|terms| of the exact value on each side, so **|Δ| ≤ 2(K+2)·u·Σ|terms|**, Σ|terms|
//!   evaluated in f64 on absolute values.
//! - `expf` (CUDA, ≤ 2 ulp) vs libm `exp` (≤ 1 ulp) in swiglu, softmax, cross-entropy: each
//!   transcendental contributes ≤ 4u relative; the bounds per op are written next to its test.
//!
//! bf16 compute ([`TrainPrecision::Bf16`]) is checked twice: each GEMM against the CPU model
//! of what it computes (`ops::linear_bf16`: bf16 inputs, exact sums), and one whole training
//! pass against the f32 CPU reference with tolerances loose enough for bf16 inputs.
//!
//! LoRA over a frozen bf16 base (`CudaLoraState`) is checked against the CPU's LoRA step
//! (`LoraStep`) on the same bf16-valued weights, with the bf16 bounds of the activations'
//! rounding (derived beside the test).
//!
//! Without a usable GPU every test prints `SKIP: <why>` and passes, unless
//! `LLADA_REQUIRE_GPU=1`, which turns the skip into a failure.

#[path = "common/cmp.rs"]
mod cmp;
#[path = "common/probe.rs"]
mod probe;

/// Element-wise within an allowed |difference| per element (NaN anywhere fails), naming the
/// worst element.
use cmp::within as compare;

use llada::hf::config::ModelConfig;
use llada::rng;
use llada::train::backend::{
    AttnGrad, Dx, HostOps, LinearGrad, MatMul, Norm, NormGrad, Qkv, QkvGrads, Rope, RowIds, Rows,
    SwigluGrad, Targets, TrainOps,
};
use llada::train::cuda::{
    self, AdamWScalars, CudaOps, CudaTrainState, DeviceParams, TrainPrecision,
};
use llada::train::data::Sample;
use llada::train::model::{forward_backward, forward_backward_on, Batch, Params};
use llada::train::model::{forward_backward_with, PassOptions};
use llada::train::ops::{self, AttnShape, LinearBwd};
use llada::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use llada::train::{StepState, TrainOptions, Trainer};

const U: f64 = 1.0 / 16_777_216.0; // 2^-24

// ---------------------------------------------------------------------------------------------
// Harness

/// Run the test body `$body` (generic over [`TrainOps`]) on the host ops — the CPU
/// instantiation: the trait's host path against the `ops` reference, same assertions and
/// tolerances — then on the GPU. Evaluates to the GPU's ops (`None` after a printed SKIP) for
/// the checks only the device launchers make.
macro_rules! on_each_device {
    ($body:ident) => {{
        $body(&HostOps::<f32>::new());
        let g = gpu();
        if let Some(g) = &g {
            $body(g);
        }
        g
    }};
}

fn gpu() -> Option<CudaOps> {
    probe::device_or_skip(|| CudaOps::new(0))
}

/// Deterministic f32 values uniform in [-scale, scale), distinct per `tag`.
fn rand_vec(tag: u64, len: usize, scale: f32) -> Vec<f32> {
    let key = rng::cell_key(0x7A1, 9, tag, 0, 0);
    (0..len)
        .map(|i| scale * (2.0 * rng::uniform(rng::bits(key, i as u64)) as f32 - 1.0))
        .collect()
}

fn rand_ids(tag: u64, len: usize, hi: usize) -> Vec<u32> {
    let key = rng::cell_key(0x7A1, 10, tag, 0, 0);
    (0..len)
        .map(|i| ((rng::uniform(rng::bits(key, i as u64)) * hi as f64) as usize).min(hi - 1) as u32)
        .collect()
}

/// The cases of a parity test with their seeds: `base + 10·i` for case `i`.
fn seeded<T: Copy>(base: u64, cases: &[T]) -> impl Iterator<Item = (u64, T)> + '_ {
    let seed = move |i: usize| base + 10 * i as u64;
    cases.iter().enumerate().map(move |(i, &c)| (seed(i), c))
}

/// [`compare`] of `cpu` with the first `cpu.len()` values of the device buffer `dev`.
fn compare_on<B: TrainOps>(
    g: &B,
    what: &str,
    cpu: &[f32],
    dev: &B::Buf,
    tol: impl Fn(usize) -> f64,
) {
    compare(what, cpu, &g.download(dev, cpu.len()).unwrap(), tol);
}

/// [`exact`] of `cpu` with the first `cpu.len()` values of the device buffer `dev`.
fn exact_on<B: TrainOps>(g: &B, what: &str, cpu: &[f32], dev: &B::Buf) {
    compare_on(g, what, cpu, dev, |_| 0.0);
}

fn exact(what: &str, cpu: &[f32], gpu: &[f32]) {
    compare(what, cpu, gpu, |_| 0.0);
}

/// The CPU linear and its backward (`dx` written, `dw` added to `dw0`) in f32, or as the CPU
/// model of the bf16 GEMM (`bf16`): `y`, `dx`, `dw`.
fn linear_cpu(bf16: bool, [x, w, dy]: [&[f32]; 3], dw0: &[f32], d: MatMul) -> [Vec<f32>; 3] {
    let MatMul { n, k, m } = d;
    let (mut y, mut dx, mut dw) = (vec![0f32; n * m], vec![0f32; n * k], dw0.to_vec());
    let a = LinearBwd { dy, x, w, d };
    if bf16 {
        ops::linear_bf16(&mut y, x, w, n, k, m);
        ops::linear_bwd_bf16(Some(&mut dx), &mut dw, a);
    } else {
        ops::linear(&mut y, x, w, n, k, m);
        ops::linear_bwd(Some(&mut dx), &mut dw, a);
    }
    [y, dx, dw]
}

/// Upload `x`, `w`, `dy` and run the linear and its backward on `g` (`dx` written, `dw` added to
/// `dw0`): the device inputs, and `y`, `dx`, `dw` downloaded.
fn linear_on<B: TrainOps>(
    g: &B,
    [x, w, dy]: [&[f32]; 3],
    dw0: &[f32],
    (n, k, m): (usize, usize, usize),
) -> ([B::Buf; 3], [Vec<f32>; 3]) {
    let [xd, wd, dyd] = [x, w, dy].map(|v| g.upload(v).unwrap());
    let mut yd = g.upload(&vec![f32::NAN; n * m]).unwrap();
    let d = MatMul { n, k, m };
    g.linear(&mut yd, &xd, &wd, d).unwrap();
    let mut dxd = g.upload(&vec![f32::NAN; n * k]).unwrap();
    let mut dwd = g.upload(dw0).unwrap();
    let a = LinearGrad::new(&dyd, &xd, &wd, d);
    g.linear_bwd(Dx::Write(&mut dxd), Some(&mut dwd), a)
        .unwrap();
    let got =
        [(yd, n * m), (dxd, n * k), (dwd, m * k)].map(|(b, len)| g.download(&b, len).unwrap());
    ([xd, wd, dyd], got)
}

/// Error bounds of a linear `y[N, M] = x[N, K]·wᵀ` and its backward from the absolute inputs
/// (`Σ|terms|` in f64): `2·(terms + 2)·u·Σ|terms|` per element; `dw = dw0 + Σ_i dy·x` adds the
/// initial value as one more term.
struct LinearBounds<'a> {
    ax: Vec<f64>,
    aw: Vec<f64>,
    ady: Vec<f64>,
    dw0: &'a [f32],
    nkm: (usize, usize, usize),
}

impl LinearBounds<'_> {
    /// The bounds for `x`, `w`, `dy` (as `abs` makes them absolute) and the initial `dw0`.
    fn new<'a>(
        abs: fn(&[f32]) -> Vec<f64>,
        [x, w, dy]: [&[f32]; 3],
        dw0: &'a [f32],
        nkm: (usize, usize, usize),
    ) -> LinearBounds<'a> {
        let (ax, aw, ady) = (abs(x), abs(w), abs(dy));
        LinearBounds {
            ax,
            aw,
            ady,
            dw0,
            nkm,
        }
    }
    fn y(&self, i: usize) -> f64 {
        let (_, k, m) = self.nkm;
        let s = strided_dot((&self.ax[i / m * k..], 1), (&self.aw[i % m * k..], 1), k);
        2.0 * (k as f64 + 2.0) * U * s
    }
    fn dx(&self, i: usize) -> f64 {
        let (_, k, m) = self.nkm;
        let s = strided_dot((&self.ady[i / k * m..], 1), (&self.aw[i % k..], k), m);
        2.0 * (m as f64 + 2.0) * U * s
    }
    fn dw(&self, e: usize) -> f64 {
        let (n, k, m) = self.nkm;
        let s = strided_dot((&self.ady[e / k..], m), (&self.ax[e % k..], k), n);
        2.0 * (n as f64 + 3.0) * U * (s + self.dw0[e].abs() as f64)
    }
}

/// `Σ_{t < len} a[t·sa]·b[t·sb]`, t ascending.
fn strided_dot((a, sa): (&[f64], usize), (b, sb): (&[f64], usize), len: usize) -> f64 {
    (0..len).map(|t| a[t * sa] * b[t * sb]).sum()
}

fn abs(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| (x as f64).abs()).collect()
}

// ---------------------------------------------------------------------------------------------
// GEMMs

#[test]
fn linear_fwd_bwd() {
    on_each_device!(linear_fwd_bwd_on);
}

fn linear_fwd_bwd_on<B: TrainOps>(g: &B) {
    for (tag, (n, k, m)) in seeded(100, &[(3, 5, 4), (17, 33, 9), (64, 128, 96), (1, 1, 1)]) {
        let x = rand_vec(tag, n * k, 1.0);
        let w = rand_vec(tag + 1, m * k, 1.0);
        let dy = rand_vec(tag + 2, n * m, 1.0);
        let dw0 = rand_vec(tag + 3, m * k, 0.5);
        // CPU
        let d = MatMul { n, k, m };
        let [y, dx, dw] = linear_cpu(false, [&x, &w, &dy], &dw0, d);
        // GPU
        let ([xd, wd, dyd], [gy_, gdx_, gdw_]) = linear_on(g, [&x, &w, &dy], &dw0, (n, k, m));
        // Σ|terms| in f64.
        let b = LinearBounds::new(abs, [&x, &w, &dy], &dw0, (n, k, m));
        let (gy, gdx, gdw) = (|i| b.y(i), |i| b.dx(i), |e| b.dw(e));
        compare(&format!("linear y {n}x{k}x{m}"), &y, &gy_, gy);
        compare(&format!("linear dx {n}x{k}x{m}"), &dx, &gdx_, gdx);
        compare(&format!("linear dw {n}x{k}x{m}"), &dw, &gdw_, gdw);
        // dx accumulation (beta = 1): dx2 = dx + dy·w, one more addition per element.
        let mut dx2 = g.upload(&dx).unwrap();
        let mut scratch = g.zeros(m * k).unwrap();
        let a = LinearGrad::new(&dyd, &xd, &wd, d);
        g.linear_bwd(Dx::Add(&mut dx2), Some(&mut scratch), a)
            .unwrap();
        let want: Vec<f32> = dx.iter().map(|&a| 2.0 * a).collect();
        compare(
            &format!("linear dx accumulate {n}x{k}x{m}"),
            &want,
            &g.download(&dx2, n * k).unwrap(),
            |i| 2.0 * gdx(i) + 2.0 * U * want[i].abs() as f64,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

#[test]
fn rms_norm_fwd_bwd() {
    on_each_device!(rms_norm_fwd_bwd_on);
}

fn rms_norm_fwd_bwd_on<B: TrainOps>(g: &B) {
    let eps = 1e-5f32;
    for (tag, (n, c)) in seeded(200, &[(1, 1), (3, 7), (5, 128), (9, 1000), (2, 4096)]) {
        let x = rand_vec(tag, n * c, 2.0);
        let w = rand_vec(tag + 1, c, 1.5);
        let dy = rand_vec(tag + 2, n * c, 1.0);
        let dw0 = rand_vec(tag + 3, c, 0.3);
        let mut y = vec![0f32; n * c];
        let mut r = vec![0f32; n];
        let d = Rows { n, c };
        ops::rms_norm(&mut y, &mut r, &x, &w, d, eps as f64);
        let mut dx = vec![0f32; n * c];
        let mut dw = dw0.clone();
        ops::rms_norm_bwd(&mut dx, &mut dw, &dy, &x, &r, &w, d);

        let (xd, wd, dyd) = (
            g.upload(&x).unwrap(),
            g.upload(&w).unwrap(),
            g.upload(&dy).unwrap(),
        );
        let mut yd = g.zeros(n * c).unwrap();
        let mut rd = g.zeros(n).unwrap();
        g.rms_norm(&mut yd, &mut rd, Norm::new(&xd, &wd, d, eps))
            .unwrap();
        // Forward: Σx² has only positive terms, so each side's sum is within (C+2)u relative;
        // r = 1/sqrt(ms + eps) halves that and adds ≤ 3 roundings: |Δr| ≤ (C + 8)u·r.
        // y = w·(x·r) adds 2 roundings per side: |Δy| ≤ (C + 12)u·|y|.
        let gr = g.download(&rd, n).unwrap();
        compare(&format!("rms_norm r {n}x{c}"), &r, &gr, |i| {
            (c as f64 + 8.0) * U * r[i] as f64
        });
        compare(
            &format!("rms_norm y {n}x{c}"),
            &y,
            &g.download(&yd, n * c).unwrap(),
            |i| (c as f64 + 12.0) * U * y[i].abs() as f64,
        );
        // Backward from the CPU's r (identical inputs).
        let rdc = g.upload(&r).unwrap();
        let mut dxd = g.upload(&vec![f32::NAN; n * c]).unwrap();
        let mut dwd = g.upload(&dw0).unwrap();
        let a = NormGrad::new(&dyd, &xd, &rdc, &wd, d);
        g.rms_norm_bwd(&mut dxd, Some(&mut dwd), a).unwrap();
        // dx = r·w·dy − x·coef, coef = r³·gx/C, gx = Σ dy·w·x. With S = Σ|dy·w·x| each side's gx
        // is within (C+3)u·S, and coef adds 4 roundings: |Δcoef| ≤ r³/C·(2(C+3)·S + 8|gx|)·u
        // ≤ r³/C·(2C+14)·u·S. Plus ≤ 4 roundings per side of each product term:
        // |Δdx| ≤ (8·r|w·dy| + 8|x·coef|)·u + |x|·r³/C·(2C+14)·u·S.
        let gdx = |e: usize| {
            let (i, j) = (e / c, e % c);
            let ri = r[i] as f64;
            let s: f64 = (0..c)
                .map(|t| (dy[i * c + t] as f64 * w[t] as f64 * x[i * c + t] as f64).abs())
                .sum();
            let coef = ri * ri * ri * s / c as f64;
            let xv = (x[e] as f64).abs();
            8.0 * U * (ri * (w[j] as f64 * dy[e] as f64).abs() + xv * coef)
                + xv * ri * ri * ri / c as f64 * (2.0 * c as f64 + 14.0) * U * s
        };
        compare(
            &format!("rms_norm dx {n}x{c}"),
            &dx,
            &g.download(&dxd, n * c).unwrap(),
            gdx,
        );
        exact_on(g, &format!("rms_norm dw {n}x{c}"), &dw, &dwd);
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

#[test]
fn swiglu_fwd_bwd() {
    on_each_device!(swiglu_fwd_bwd_on);
}

fn swiglu_fwd_bwd_on<B: TrainOps>(gp: &B) {
    for (tag, len) in seeded(300, &[1usize, 7, 1000, 65_537]) {
        let g = rand_vec(tag, len, 6.0);
        let u = rand_vec(tag + 1, len, 2.0);
        let dm = rand_vec(tag + 2, len, 1.0);
        let mut m = vec![0f32; len];
        ops::swiglu(&mut m, &g, &u);
        let mut dg = vec![0f32; len];
        let mut du = vec![0f32; len];
        ops::swiglu_bwd(&mut dg, &mut du, &dm, &g, &u);
        let (gd, ud, dmd) = (
            gp.upload(&g).unwrap(),
            gp.upload(&u).unwrap(),
            gp.upload(&dm).unwrap(),
        );
        let mut md = gp.zeros(len).unwrap();
        gp.swiglu(&mut md, &gd, &ud, len).unwrap();
        let mut dgd = gp.upload(&vec![f32::NAN; len]).unwrap();
        let mut dud = gp.upload(&vec![f32::NAN; len]).unwrap();
        let a = SwigluGrad::new(&dmd, &gd, &ud, len);
        gp.swiglu_bwd(&mut dgd, &mut dud, a).unwrap();
        // s = 1/(1 + exp(−g)): exp ≤ 2 ulp (CUDA) / 1 ulp (libm) plus 2 roundings, so each
        // side's s is within 4u relative, the pair 8u. m = (g·s)·u adds 2 roundings per side:
        // |Δm| ≤ 12u·|g·s·u| ≤ 12u·|g·u|.
        compare(
            &format!("swiglu m {len}"),
            &m,
            &gp.download(&md, len).unwrap(),
            |i| 12.0 * U * (g[i] as f64 * u[i] as f64).abs(),
        );
        // du = (dm·g)·s: 8u (s) + 4u (roundings) relative.
        compare(
            &format!("swiglu du {len}"),
            &du,
            &gp.download(&dud, len).unwrap(),
            |i| 12.0 * U * (dm[i] as f64 * g[i] as f64).abs(),
        );
        // dg = ((dm·u)·s)·(1 + g(1 − s)): (1 − s) has absolute error ≤ 8u·s + u ≤ 9u, so
        // g(1 − s) carries ≤ (9 + 2)u·|g| and 1 + g(1−s) another u: the factor's absolute error
        // is ≤ (11|g| + 2)u; the other factors are ≤ 12u relative. With |s| ≤ 1 and
        // |1 + g(1 − s)| ≤ 1 + |g|: |Δdg| ≤ |dm·u|·(12(1 + |g|) + 11|g| + 2)·u.
        compare(
            &format!("swiglu dg {len}"),
            &dg,
            &gp.download(&dgd, len).unwrap(),
            |i| {
                let ag = (g[i] as f64).abs();
                (dm[i] as f64 * u[i] as f64).abs() * (14.0 + 23.0 * ag) * U
            },
        );
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE, embedding, rows, add: bit-exact

#[test]
fn rope_fwd_bwd_exact() {
    let Some(g) = on_each_device!(rope_fwd_bwd_exact_on) else {
        return;
    };
    // A position outside the tables is refused on the host.
    let (cos, sin) = llada::backend::rope_tables(10000.0, 4, 3);
    let (cos, sin) = (g.upload(&cos).unwrap(), g.upload(&sin).unwrap());
    let pos = g.upload_ints(&[0, 3]).unwrap();
    let mut xd = g.zeros(2 * 4).unwrap();
    let t = Rope::<CudaOps> {
        pos,
        cos,
        sin,
        n: 2,
        hd: 4,
    };
    let e = g.rope(&mut xd, &t, 1, false).unwrap_err();
    assert!(format!("{e:#}").contains("pos[1] = 3"), "{e:#}");
}

fn rope_fwd_bwd_exact_on<B: TrainOps>(g: &B) {
    for (tag, (n, heads, hd)) in seeded(400, &[(1, 1, 2), (5, 3, 64), (7, 2, 128), (4, 5, 10)]) {
        let max_pos = 37;
        let (cos, sin) = llada::backend::rope_tables(10000.0, hd, max_pos);
        let pos: Vec<u32> = rand_ids(tag, n, max_pos);
        let x = rand_vec(tag + 1, n * heads * hd, 3.0);
        let (cd, sd) = (g.upload(&cos).unwrap(), g.upload(&sin).unwrap());
        let t = Rope::<B> {
            pos: g.ints(&pos).unwrap(),
            cos: cd,
            sin: sd,
            n,
            hd,
        };
        for inverse in [false, true] {
            let mut want = x.clone();
            ops::rope(&mut want, &pos, (&cos, &sin), heads, hd, inverse);
            let mut xd = g.upload(&x).unwrap();
            g.rope(&mut xd, &t, heads, inverse).unwrap();
            exact_on(
                g,
                &format!("rope inverse={inverse} {n}x{heads}x{hd}"),
                &want,
                &xd,
            );
        }
    }
}

#[test]
fn embedding_rows_add_exact() {
    let Some(g) = on_each_device!(embedding_rows_add_exact_on) else {
        return;
    };
    // Ids outside the table are refused on the host, naming the index.
    let wd = g.upload(&[0.0; 6]).unwrap();
    let idd = g.upload_ints(&[1, 3]).unwrap();
    let mut xd = g.zeros(4).unwrap();
    let e = g
        .embedding(&mut xd, &wd, RowIds::new(&idd, Rows { n: 2, c: 2 }))
        .unwrap_err();
    assert!(format!("{e:#}").contains("ids[1] = 3"), "{e:#}");
    let mut dwd = g.zeros(6).unwrap();
    let idd = g.upload_ints(&[0, 7]).unwrap();
    let e = g
        .embedding_bwd(&mut dwd, &xd, RowIds::new(&idd, Rows { n: 2, c: 2 }))
        .unwrap_err();
    assert!(format!("{e:#}").contains("ids[1] = 7"), "{e:#}");
}

fn embedding_rows_add_exact_on<B: TrainOps>(g: &B) {
    for (tag, (n, v, c)) in seeded(500, &[(1, 1, 1), (9, 5, 7), (64, 50, 128), (300, 3, 33)]) {
        let wte = rand_vec(tag, v * c, 1.0);
        let ids = rand_ids(tag + 1, n, v); // many repeats when n > v
        let dx = rand_vec(tag + 2, n * c, 1.0);
        let dw0 = rand_vec(tag + 3, v * c, 1.0);
        let mut x = vec![0f32; n * c];
        ops::embedding(&mut x, &wte, &ids, c);
        let mut dwte = dw0.clone();
        ops::embedding_bwd(&mut dwte, &dx, &ids, c);
        let idd = g.ints(&ids).unwrap();
        let wd = g.upload(&wte).unwrap();
        let mut xd = g.upload(&vec![f32::NAN; n * c]).unwrap();
        g.embedding(&mut xd, &wd, RowIds::new(&idd, Rows { n, c }))
            .unwrap();
        exact_on(g, &format!("embedding {n}x{v}x{c}"), &x, &xd);
        let dxd = g.upload(&dx).unwrap();
        let mut dwd = g.upload(&dw0).unwrap();
        g.embedding_bwd(&mut dwd, &dxd, RowIds::new(&idd, Rows { n, c }))
            .unwrap();
        exact_on(g, &format!("embedding_bwd {n}x{v}x{c}"), &dwte, &dwd);

        // gather rows / scatter-add rows (repeated rows add up in order), add.
        let r = n.div_ceil(2) + 1;
        let rows = rand_ids(tag + 4, r, n);
        let mut want_g = vec![0f32; r * c];
        for (i, &row) in rows.iter().enumerate() {
            want_g[i * c..(i + 1) * c]
                .copy_from_slice(&x[row as usize * c..(row as usize + 1) * c]);
        }
        let rd = g.ints(&rows).unwrap();
        let mut god = g.upload(&vec![f32::NAN; r * c]).unwrap();
        g.gather_rows(&mut god, &xd, RowIds::new(&rd, Rows { n: r, c }))
            .unwrap();
        exact_on(g, &format!("gather_rows {r}x{c}"), &want_g, &god);
        let src = rand_vec(tag + 5, r * c, 1.0);
        let mut want_s = dx.clone();
        for (i, &row) in rows.iter().enumerate() {
            for j in 0..c {
                want_s[row as usize * c + j] += src[i * c + j];
            }
        }
        let mut sd = g.upload(&dx).unwrap();
        let srcd = g.upload(&src).unwrap();
        g.scatter_add_rows(&mut sd, &srcd, RowIds::new(&rd, Rows { n: r, c }))
            .unwrap();
        exact_on(g, &format!("scatter_add_rows {r}x{c}"), &want_s, &sd);
        let want_a: Vec<f32> = x.iter().zip(&dx).map(|(a, b)| a + b).collect();
        g.add(&mut xd, &dxd, n * c).unwrap();
        exact_on(g, &format!("add {n}x{c}"), &want_a, &xd);
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy

#[test]
fn cross_entropy() {
    on_each_device!(cross_entropy_on);
}

fn cross_entropy_on<B: TrainOps>(g: &B) {
    for (tag, (r, v)) in seeded(600, &[(1, 1), (3, 50), (17, 512), (5, 1001), (2, 126_464)]) {
        let z0 = rand_vec(tag, r * v, 8.0);
        let targets = rand_ids(tag + 1, r, v);
        let weights: Vec<f32> = rand_vec(tag + 2, r, 1.0)
            .iter()
            .map(|w| w.abs() + 0.01)
            .collect();
        let mut z = z0.clone();
        let loss = ops::cross_entropy(&mut z, &targets, &weights, v);
        let mut zd = g.upload(&z0).unwrap();
        let mut lr = g.zeros(r).unwrap();
        let td = g.ints(&targets).unwrap();
        let wd = g.upload(&weights).unwrap();
        let t = Targets::new(&td, &wd, Rows { n: r, c: v });
        let gl = g.cross_entropy(&mut zd, &mut lr, t).unwrap();
        // lse = max + ln Σ exp(z − max): the sum of V positive terms is within (V+2)u relative
        // per side plus ≤ 4u from exp: ln adds ≤ (V+6)u absolute plus its own 2u, and the final
        // addition u·|lse|. Per row E = 2((V + 8) + |lse|)u bounds the lse difference.
        // Gradient w·exp(z − lse): relative error ≤ E + 2u(|z − lse|) + 8u, then − w at the
        // target adds 2u·|w|. Loss: w·(lse − z_t) within |w|·(E + 4u(|lse| + |z_t|)).
        let mut lse = vec![0f64; r];
        for i in 0..r {
            let row = &z0[i * v..(i + 1) * v];
            let mx = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            lse[i] = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        }
        let e_row = |i: usize| 2.0 * ((v as f64 + 8.0) + lse[i].abs()) * U;
        let tol = |e: usize| {
            let (i, j) = (e / v, e % v);
            let w = weights[i] as f64;
            let zl = z0[e] as f64 - lse[i];
            let p = zl.exp();
            w * p * (e_row(i) + 2.0 * U * zl.abs() + 8.0 * U)
                + if j == targets[i] as usize {
                    2.0 * U * w
                } else {
                    0.0
                }
        };
        compare(
            &format!("cross_entropy grad {r}x{v}"),
            &z,
            &g.download(&zd, r * v).unwrap(),
            tol,
        );
        let ltol: f64 = (0..r)
            .map(|i| {
                let zt = z0[i * v + targets[i] as usize] as f64;
                weights[i] as f64 * (e_row(i) + 4.0 * U * (lse[i].abs() + zt.abs()))
            })
            .sum();
        eprintln!("cross_entropy loss {r}x{v}: cpu {loss} gpu {gl} tol {ltol:e}");
        assert!(
            (loss - gl).abs() <= ltol,
            "cross_entropy loss {r}x{v}: cpu {loss} gpu {gl} (tol {ltol:e})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Attention

struct AttnCase {
    d: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn attn_case(tag: u64, d: AttnShape) -> AttnCase {
    let n = d.b * d.t;
    AttnCase {
        d,
        q: rand_vec(tag, n * d.nh * d.hd, 1.0),
        k: rand_vec(tag + 1, n * d.nkv * d.hd, 1.0),
        v: rand_vec(tag + 2, n * d.nkv * d.hd, 1.0),
    }
}

/// An attention shape `(B, T, NH, NKV, HD)`.
type Shape5 = (usize, usize, usize, usize, usize);

const ATTN_SHAPES: [Shape5; 6] = [
    (1, 1, 1, 1, 64),
    (1, 5, 2, 2, 64),
    (2, 33, 4, 2, 64),
    (1, 70, 2, 1, 128),
    (2, 17, 3, 3, 128),
    (1, 9, 2, 2, 6),
];

/// (score bound per side ES[b,h,i,j] = (HD + 2)u·scale·Σ|q||k|, exact P[b,h,i,j]) in f64.
fn attn_terms(a: &AttnCase, lse: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, nh, nkv, hd } = a.d;
    let scale = 1.0 / (hd as f64).sqrt();
    let (qw, kw) = (nh * hd, nkv * hd);
    let mut es = vec![0f64; b * nh * t * t];
    let mut p = vec![0f64; b * nh * t * t];
    for bi in 0..b {
        for h in 0..nh {
            let kh = h / (nh / nkv);
            for i in 0..t {
                let qo = (bi * t + i) * qw + h * hd;
                for j in 0..t {
                    let ko = (bi * t + j) * kw + kh * hd;
                    let (mut s, mut sa) = (0f64, 0f64);
                    for c in 0..hd {
                        s += a.q[qo + c] as f64 * a.k[ko + c] as f64;
                        sa += (a.q[qo + c] as f64 * a.k[ko + c] as f64).abs();
                    }
                    let e = ((bi * nh + h) * t + i) * t + j;
                    es[e] = (hd as f64 + 2.0) * U * scale * sa;
                    p[e] = (s * scale - lse[(bi * t + i) * nh + h] as f64).exp();
                }
            }
        }
    }
    (es, p)
}

/// [`attn_case`] `tag` and the CPU forward's `o` and `lse`.
fn attn_cpu(tag: u64, d: AttnShape) -> (AttnCase, Vec<f32>, Vec<f32>) {
    let a = attn_case(tag, d);
    let n = d.b * d.t;
    let mut o = vec![0f32; n * d.nh * d.hd];
    let mut lse = vec![0f32; n * d.nh];
    ops::attention(&mut o, &mut lse, &a.q, &a.k, &a.v, d);
    (a, o, lse)
}

#[test]
fn attention_fwd_bwd() {
    on_each_device!(attention_fwd_bwd_on);
}

/// Every shape of [`ATTN_SHAPES`]: the forward (seeds 700, 710, …) and the backward (seeds 800,
/// 810, …), each from its own inputs.
fn attention_fwd_bwd_on<B: TrainOps>(g: &B) {
    for (tag, shape) in seeded(700, &ATTN_SHAPES) {
        attention_fwd_case(g, tag, shape);
        attention_bwd_case(g, tag + 100, shape);
    }
}

fn attention_fwd_case<B: TrainOps>(g: &B, tag: u64, shape: Shape5) {
    let (b, t, nh, nkv, hd) = shape;
    let d = AttnShape { b, t, nh, nkv, hd };
    let (a, o, lse) = attn_cpu(tag, d);
    let (qd, kd, vd) = (
        g.upload(&a.q).unwrap(),
        g.upload(&a.k).unwrap(),
        g.upload(&a.v).unwrap(),
    );
    let mut od = g.upload(&vec![f32::NAN; o.len()]).unwrap();
    let mut ld = g.upload(&vec![f32::NAN; lse.len()]).unwrap();
    g.attention(&mut od, &mut ld, Qkv::new(&qd, &kd, &vd, d))
        .unwrap();
    let (es, p) = attn_terms(&a, &lse);
    // Per side, s_j is within ES_j; exp(s − max) then carries 2ES + 4u relative, the sum
    // 2ES + (T + 4)u, each p_j = e_j/Σ: 4·ES + (T + 10)u with ES = max_j ES_j, and
    // o = Σ p_j v_j adds (T + 2)u·Σ p|v|. Both sides: |Δo| ≤ 2(4ES + (2T + 12)u)·Σ_j p_j|v_j|.
    // lse = max + ln Σ: |Δlse| ≤ 2(ES + (T + 6)u) + 2u|lse|.
    let es_row = |bi: usize, h: usize, i: usize| {
        let e0 = ((bi * nh + h) * t + i) * t;
        es[e0..e0 + t].iter().cloned().fold(0.0, f64::max)
    };
    let kw = nkv * hd;
    let tol_o = |e: usize| {
        let (row, col) = (e / (nh * hd), e % (nh * hd));
        let (bi, i, h, c) = (row / t, row % t, col / hd, col % hd);
        let kh = h / (nh / nkv);
        let e0 = ((bi * nh + h) * t + i) * t;
        let m: f64 = (0..t)
            .map(|j| p[e0 + j] * (a.v[(bi * t + j) * kw + kh * hd + c] as f64).abs())
            .sum();
        2.0 * (4.0 * es_row(bi, h, i) + (2.0 * t as f64 + 12.0) * U) * m
    };
    let tol_l = |e: usize| {
        let (row, h) = (e / nh, e % nh);
        2.0 * (es_row(row / t, h, row % t) + (t as f64 + 6.0) * U) + 2.0 * U * (lse[e] as f64).abs()
    };
    let tag = format!("{b}x{t}x{nh}/{nkv}x{hd}");
    compare_on(g, &format!("attention o {tag}"), &o, &od, tol_o);
    compare_on(g, &format!("attention lse {tag}"), &lse, &ld, tol_l);
}

fn attention_bwd_case<B: TrainOps>(g: &B, tag: u64, shape: Shape5) {
    let (b, t, nh, nkv, hd) = shape;
    let d = AttnShape { b, t, nh, nkv, hd };
    let (a, o, lse) = attn_cpu(tag, d);
    let n = b * t;
    let (qw, kw) = (nh * hd, nkv * hd);
    let dout = rand_vec(tag + 5, n * qw, 1.0);
    let mut dq = vec![0f32; n * qw];
    let mut dk = vec![0f32; n * kw];
    let mut dv = vec![0f32; n * kw];
    let dqkv = (&mut dq[..], &mut dk[..], &mut dv[..]);
    let saved = (&dout[..], &o[..], &lse[..]);
    ops::attention_bwd(dqkv, saved, (&a.q, &a.k, &a.v), d);
    // GPU from identical inputs (the CPU's o and lse).
    let up = |x: &[f32]| g.upload(x).unwrap();
    let (qd, kd, vd, od, ld, dod) = (up(&a.q), up(&a.k), up(&a.v), up(&o), up(&lse), up(&dout));
    let mut dqd = up(&vec![f32::NAN; dq.len()]);
    let mut dkd = up(&vec![f32::NAN; dk.len()]);
    let mut dvd = up(&vec![f32::NAN; dv.len()]);
    let mut delta = g.zeros(n * nh).unwrap();
    let (dq_, dk_, dv_) = (&mut dqd, &mut dkd, &mut dvd);
    let grads = QkvGrads::new(dq_, dk_, dv_, &mut delta);
    let saved = AttnGrad::new(&dod, Qkv::new(&qd, &kd, &vd, d), &od, &ld);
    g.attention_bwd(grads, saved).unwrap();
    // Per side: P = exp(s − lse) has relative error ε_P = ES + 4u (lse is shared input);
    // dP = dO·v within e_dP = (HD + 2)u·Σ|dO||v|; δ = dO·O within e_δ = (HD + 2)u·Σ|dO||O|;
    // dS = (P(dP − δ))·scale adds 3 roundings:
    //   |ΔdS| ≤ scale·P·(|dP − δ|(ε_P + 3u) + e_dP + e_δ).
    // dQ_i = Σ_j dS_ij k_j: Σ_j |ΔdS||k| + (T + 2)u·Σ_j |dS||k|; dK_j, dV_j likewise over the
    // G·T (head, query) pairs of the kv head, dV with P's ε_P. Both sides: twice that.
    let (es, p) = attn_terms(&a, &lse);
    let scale = 1.0 / (hd as f64).sqrt();
    let group = nh / nkv;
    let dot_abs = |x: &[f32], y: &[f32]| -> (f64, f64) {
        let mut s = 0f64;
        let mut sa = 0f64;
        for (&u, &w) in x.iter().zip(y) {
            s += u as f64 * w as f64;
            sa += (u as f64 * w as f64).abs();
        }
        (s, sa)
    };
    // Per (b, h, i, j): dS, its error bound, and P's relative error.
    let mut ds = vec![0f64; b * nh * t * t];
    let mut dds = vec![0f64; b * nh * t * t];
    let mut ep = vec![0f64; b * nh * t * t];
    for bi in 0..b {
        for h in 0..nh {
            let kh = h / group;
            for i in 0..t {
                let qo = (bi * t + i) * qw + h * hd;
                let (dl, dla) = dot_abs(&dout[qo..qo + hd], &o[qo..qo + hd]);
                for j in 0..t {
                    let ko = (bi * t + j) * kw + kh * hd;
                    let (dp, dpa) = dot_abs(&dout[qo..qo + hd], &a.v[ko..ko + hd]);
                    let e = ((bi * nh + h) * t + i) * t + j;
                    ep[e] = es[e] + 4.0 * U;
                    ds[e] = p[e] * (dp - dl) * scale;
                    dds[e] = scale
                        * p[e]
                        * ((dp - dl).abs() * (ep[e] + 3.0 * U)
                            + (hd as f64 + 2.0) * U * (dpa + dla));
                }
            }
        }
    }
    let tol_dq = |e: usize| {
        let (row, col) = (e / qw, e % qw);
        let (bi, i, h, c) = (row / t, row % t, col / hd, col % hd);
        let kh = h / group;
        let e0 = ((bi * nh + h) * t + i) * t;
        let (mut s1, mut s2) = (0f64, 0f64);
        for j in 0..t {
            let kv = (a.k[(bi * t + j) * kw + kh * hd + c] as f64).abs();
            s1 += dds[e0 + j] * kv;
            s2 += ds[e0 + j].abs() * kv;
        }
        2.0 * (s1 + (t as f64 + 2.0) * U * s2)
    };
    let tol_kv = |e: usize, want_v: bool| {
        let (row, col) = (e / kw, e % kw);
        let (bi, j, kh, c) = (row / t, row % t, col / hd, col % hd);
        let (mut s1, mut s2) = (0f64, 0f64);
        for h in kh * group..(kh + 1) * group {
            for i in 0..t {
                let el = ((bi * nh + h) * t + i) * t + j;
                let qo = (bi * t + i) * qw + h * hd + c;
                if want_v {
                    let g_ = (dout[qo] as f64).abs();
                    s1 += p[el] * ep[el] * g_;
                    s2 += p[el] * g_;
                } else {
                    let qv = (a.q[qo] as f64).abs();
                    s1 += dds[el] * qv;
                    s2 += ds[el].abs() * qv;
                }
            }
        }
        2.0 * (s1 + ((group * t) as f64 + 2.0) * U * s2)
    };
    let tag = format!("{b}x{t}x{nh}/{nkv}x{hd}");
    compare_on(g, &format!("attention dq {tag}"), &dq, &dqd, tol_dq);
    compare_on(g, &format!("attention dk {tag}"), &dk, &dkd, |e| {
        tol_kv(e, false)
    });
    compare_on(g, &format!("attention dv {tag}"), &dv, &dvd, |e| {
        tol_kv(e, true)
    });
}

// ---------------------------------------------------------------------------------------------
// AdamW and the gradient norm

fn small_params(tag: u64, scale: f32) -> Params<f32> {
    Params {
        names: vec!["w".into(), "norm".into(), "odd".into()],
        shapes: vec![vec![7, 13], vec![13], vec![1, 1001]],
        data: vec![
            rand_vec(tag, 91, scale),
            rand_vec(tag + 1, 13, scale),
            rand_vec(tag + 2, 1001, scale),
        ],
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn adamw_exact_and_grad_norm() {
    let Some(g) = gpu() else { return };
    let cfg = AdamWConfig::default();
    let p0 = small_params(900, 1.0);
    let mut cpu_p = p0.clone();
    let mut opt = AdamW::new(cfg, &p0);
    let mut dp = DeviceParams::upload(&g, &p0).unwrap();
    let mut dm = DeviceParams::upload(&g, &opt.m).unwrap();
    let mut dv = DeviceParams::upload(&g, &opt.v).unwrap();
    let mut bf: Vec<_> = p0
        .data
        .iter()
        .map(|d| g.be.stream().alloc_zeros::<half::bf16>(d.len()).unwrap())
        .collect();
    let mut partial = g.be.stream().alloc_zeros::<f64>(512).unwrap();
    // Three steps; the second clips (max_norm far below the norm), the others do not.
    for (step, &(lr, clip)) in [(1e-2, 0.0), (3e-3, 0.05), (1e-3, 1e9)].iter().enumerate() {
        let mut grad = small_params(950 + step as u64, 2.0);
        // Gradient norm: f64 sums of the same f32 squares in another order: relative 1e-12.
        let mut gnorm_gpu = 0.0f64;
        let gd = DeviceParams::upload(&g, &grad).unwrap();
        for d in &gd.data {
            gnorm_gpu += g.sumsq(d, d.len(), &mut partial).unwrap();
        }
        let gnorm_gpu = gnorm_gpu.sqrt();
        let norm = clip_grad_norm(&mut grad, clip);
        assert!(
            (norm - gnorm_gpu).abs() <= 1e-12 * norm,
            "grad norm cpu {norm} gpu {gnorm_gpu}"
        );
        let gscale = if clip > 0.0 && clip / (norm + 1e-6) < 1.0 {
            (clip / (norm + 1e-6)) as f32
        } else {
            1.0
        };
        opt.step(&mut cpu_p, &grad, lr);
        let h = AdamWScalars::new(&cfg, opt.t, lr, gscale);
        for i in 0..p0.data.len() {
            let len = p0.data[i].len();
            let decay = AdamWScalars::decay(&cfg, lr, &p0.shapes[i]);
            let (p, mv) = (
                (&mut dp.data[i], Some(&mut bf[i])),
                (&mut dm.data[i], &mut dv.data[i]),
            );
            g.adamw(p, mv, &gd.data[i], 0..len, &h, decay).unwrap();
        }
        let (gp, gm, gv) = (
            dp.download(&g).unwrap(),
            dm.download(&g).unwrap(),
            dv.download(&g).unwrap(),
        );
        for i in 0..p0.data.len() {
            let w = format!("adamw step {} `{}`", step + 1, p0.names[i]);
            exact(&format!("{w} p"), &cpu_p.data[i], &gp.data[i]);
            exact(&format!("{w} m"), &opt.m.data[i], &gm.data[i]);
            exact(&format!("{w} v"), &opt.v.data[i], &gv.data[i]);
            let b: Vec<f32> =
                g.be.stream()
                    .clone_dtoh(&bf[i])
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32())
                    .collect();
            g.sync().unwrap();
            let want: Vec<f32> = cpu_p.data[i]
                .iter()
                .map(|&x| llada::hf::dtype::DType::BF16.round(x))
                .collect();
            exact(&format!("{w} bf16 copy"), &want, &b);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Whole model

fn tiny() -> ModelConfig {
    llada::hf::presets::preset_config("tiny").unwrap()
}

/// Random f32 parameters (matrices ±0.1, norms around 1), so the loss is O(ln V).
fn tiny_params(cfg: &ModelConfig) -> Params<f32> {
    let mut p = Params::<f32>::zeros(cfg);
    for (i, d) in p.data.iter_mut().enumerate() {
        let r = rand_vec(1000 + i as u64, d.len(), 0.1);
        if p.shapes[i].len() == 1 {
            *d = r.iter().map(|x| 1.0 + x).collect();
        } else {
            *d = r;
        }
    }
    p
}

fn tiny_batch(cfg: &ModelConfig, b: usize, t: usize) -> Batch {
    let clean = rand_ids(1100, b * t, 500);
    llada::train::loss::pretrain_batch(
        &clean,
        b,
        t,
        false,
        llada::train::loss::Draw::new(cfg.mask_token_id, 3, 0, 1.0),
    )
    .unwrap()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// One forward/backward of the tiny preset (C 128, 2 layers, HD 64, V 512), B 2 × T 40.
/// Every op differs from the CPU by a few f32 roundings per accumulated term (bounds above:
/// at most ~2(K + 2)u relative to the absolute sums, K ≤ 320 here, i.e. ≤ 4e-5 worst case and
/// ~1e-6 typically, since the rounding errors of random data add up like √K). The loss passes
/// through ~12 such ops: relative 1e-4 bounds it with margin; the gradients through ~35 and
/// are compared normwise (‖Δ‖/‖g‖, which cancellations in single elements cannot inflate):
/// 1e-3. A wrong term (index, transposition, missing accumulation) gives O(1) errors.
#[test]
fn model_step_matches_cpu() {
    on_each_device!(model_step_matches_cpu_on);
}

/// Every tensor of `p` as buffers of `g`.
fn upload_params<B: TrainOps>(g: &B, p: &Params<f32>) -> Vec<B::Buf> {
    p.data.iter().map(|d| g.upload(d).unwrap()).collect()
}

/// Every buffer of `d` back, shaped like `like`.
fn download_params<B: TrainOps>(g: &B, d: &[B::Buf], like: &Params<f32>) -> Params<f32> {
    let mut out = like.clone();
    for (o, b) in out.data.iter_mut().zip(d) {
        *o = g.download(b, o.len()).unwrap();
    }
    out
}

fn model_step_matches_cpu_on<B: TrainOps>(g: &B) {
    let cfg = tiny();
    let p = tiny_params(&cfg);
    let batch = tiny_batch(&cfg, 2, 40);
    assert!(!batch.rows.is_empty());
    let mut grad = Params::<f32>::zeros(&cfg);
    let loss = forward_backward(&cfg, &p, &batch, &mut grad).unwrap();
    let dp = upload_params(g, &p);
    let mut dg = upload_params(g, &Params::<f32>::zeros(&cfg));
    let gl = forward_backward_on(g, &cfg, &dp, &batch, &mut dg).unwrap();
    eprintln!("tiny loss: cpu {loss} gpu {gl}");
    assert!(
        (loss - gl).abs() <= 1e-4 * loss.abs(),
        "loss cpu {loss} gpu {gl}"
    );
    let gg = download_params(g, &dg, &grad);
    for (i, name) in grad.names.iter().enumerate() {
        let e = rel_err(&grad.data[i], &gg.data[i]);
        eprintln!("grad `{name}`: relative error {e:.2e}");
        assert!(e <= 1e-3, "gradient of `{name}`: relative error {e:e}");
    }
    // Gradients accumulate: a second pass doubles them.
    let gl2 = forward_backward_on(g, &cfg, &dp, &batch, &mut dg).unwrap();
    assert_eq!(gl, gl2, "the GPU pass is deterministic");
    let gg2 = download_params(g, &dg, &grad);
    for i in 0..gg.data.len() {
        let twice: Vec<f32> = gg.data[i].iter().map(|x| 2.0 * x).collect();
        let e = rel_err(&twice, &gg2.data[i]);
        // The second pass is bit-identical (asserted above), so the accumulator holds g + g,
        // which f32 computes exactly (a doubling): only a lost or partial accumulation differs,
        // by O(1). 1e-6 leaves room for nothing else but is not 0 to keep the message useful.
        assert!(
            e <= 1e-6,
            "gradient `{}` does not accumulate: {e:e}",
            gg.names[i]
        );
    }
}

/// Five optimizer steps of the CPU and the GPU trainer from the same start (tiny preset,
/// batch 2 × 32, accum 2, lr 1e-3, clip 1). AdamW's step is ≈ lr per parameter whatever the
/// gradient's scale, so per-step gradient differences of ~1e-4 relative (above) move a
/// parameter by far less than lr except where m/√v is near a sign change; the losses of the
/// two runs must stay within 1 % of each other (a broken update or gradient diverges by O(1)).
#[test]
fn n_steps_loss_close_to_cpu() {
    let Some(g) = gpu() else { return };
    let cfg = tiny();
    let samples: Vec<Sample> = (0..6)
        .map(|s| Sample {
            ids: rand_ids(1200 + s, 32, 500),
            prompt_len: 0,
        })
        .collect();
    let opts = TrainOptions {
        steps: 5,
        batch_size: 2,
        accum: 2,
        seq_len: 32,
        lr: 1e-3,
        warmup: 2,
        schedule: "constant".into(),
        weight_decay: 0.1,
        clip: 1.0,
        seed: 5,
        sft: false,
        truncate: false,
        world: 1,
    };
    let mut cpu_t = Trainer::new(
        cfg.clone(),
        tiny_params(&cfg),
        opts.clone(),
        samples.clone(),
    )
    .unwrap();
    let mut gpu_t = Trainer::new(cfg.clone(), tiny_params(&cfg), opts, samples).unwrap();
    let mut st = CudaTrainState::new(g, &gpu_t.params, &gpu_t.opt.m, &gpu_t.opt.v).unwrap();
    for _ in 0..5 {
        let a = cpu_t.train_step().unwrap();
        let b = gpu_t.train_step_cuda(&mut st).unwrap();
        eprintln!(
            "step {}: loss cpu {:.6} gpu {:.6}, grad norm cpu {:.6} gpu {:.6}",
            a.step, a.loss, b.loss, a.grad_norm, b.grad_norm
        );
        assert_eq!((a.step, a.masked, a.tokens), (b.step, b.masked, b.tokens));
        assert!(
            (a.loss - b.loss).abs() <= 1e-2 * a.loss.abs(),
            "step {}: loss cpu {} gpu {}",
            a.step,
            a.loss,
            b.loss
        );
        assert!(
            (a.grad_norm - b.grad_norm).abs() <= 1e-2 * a.grad_norm,
            "step {}: grad norm cpu {} gpu {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
    }
    gpu_t.pull_from_cuda(&st).unwrap();
    assert_eq!(gpu_t.opt.t, 5);
    for i in 0..cpu_t.params.data.len() {
        let e = rel_err(&cpu_t.params.data[i], &gpu_t.params.data[i]);
        assert!(
            e <= 1e-2,
            "parameter `{}` after 5 steps: relative difference {e:e}",
            cpu_t.params.names[i]
        );
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 compute (TrainPrecision::Bf16)

/// `v` with bit 15 of every f32 cleared: the 16 bits a conversion to bf16 drops are then below
/// half a bf16 ulp, so round-to-nearest-even, round-to-nearest-away and truncation all give the
/// same bf16 value (the top 16 bits). cuBLAS does not document how `..._FAST_16BF` converts;
/// on such inputs the CPU model (RNE) is exact whichever of those it does.
fn bf16_unambiguous(v: Vec<f32>) -> Vec<f32> {
    v.into_iter()
        .map(|x| f32::from_bits(x.to_bits() & !0x8000))
        .collect()
}

fn bf16_abs(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| (llada::hf::dtype::DType::BF16.round(x) as f64).abs())
        .collect()
}

/// How many elements of `other` lie outside `tol` of `want`.
fn outside(want: &[f32], other: &[f32], tol: impl Fn(usize) -> f64) -> usize {
    (0..want.len())
        .filter(|&i| (want[i] as f64 - other[i] as f64).abs() > tol(i))
        .count()
}

/// `linear` / `linear_bwd` in bf16 mode against `ops::linear_bf16` / `ops::linear_bwd_bf16`
/// (inputs rounded to bf16, products exact, sums in f64, one final rounding to f32), at odd and
/// at aligned sizes.
///
/// Tolerance: the two sides round their inputs identically (see [`bf16_unambiguous`]), and a
/// product of two bf16 values (8-bit significands) is exact in f32, so they differ only in how
/// the K products are summed. The CPU sum is exact to f64 precision, then rounded once (≤ u
/// relative). The GPU adds in f32 in some order (tensor-core blocks, split-K, the `beta·C`
/// epilogue): ≤ K + 1 additions, each off by at most one ulp of its result even where the
/// tensor core truncates instead of rounding (≤ 2u relative), so to first order
/// |Δ| ≤ (K + 1)·2u·Σ|terms| + u·|y| ≤ **2(K + 2)·u·Σ|terms|** (Σ over the bf16-rounded
/// inputs; for `dw` the f32 start value counts as one more term) — the bound of the f32 test.
///
/// The test can fail: rounding the inputs moves each product by up to 2^-7 relative, ~√K·2^-9
/// of Σ|terms| after cancellation, far above 2(K + 2)u = 8e-6 for K = 67; the f32 GEMM of the
/// unrounded inputs is checked (on the CPU) to fall outside the tolerance for most elements,
/// so a GPU that ignored the setting (or a cuBLAS that chose an f32 kernel) fails here.
#[test]
fn linear_bf16_fwd_bwd() {
    let mut g = gpu();
    if let Some(g) = g.as_mut() {
        g.set_precision(TrainPrecision::Bf16);
        assert_eq!(g.precision(), TrainPrecision::Bf16);
    }
    for (tag, (n, k, m)) in seeded(300, &[(37, 67, 29), (64, 128, 96)]) {
        let x = bf16_unambiguous(rand_vec(tag, n * k, 1.0));
        let w = bf16_unambiguous(rand_vec(tag + 1, m * k, 1.0));
        let dy = bf16_unambiguous(rand_vec(tag + 2, n * m, 1.0));
        // `dw`'s start value is cuBLAS's C operand: f32, never rounded.
        let dw0 = rand_vec(tag + 3, m * k, 0.5);
        // CPU model of bf16 mode, and what full f32 would give (must be told apart).
        let d = MatMul { n, k, m };
        let [y, dx, dw] = linear_cpu(true, [&x, &w, &dy], &dw0, d);
        let [y32, dx32, dw32] = linear_cpu(false, [&x, &w, &dy], &dw0, d);
        let b = LinearBounds::new(bf16_abs, [&x, &w, &dy], &dw0, (n, k, m));
        let (gy, gdx, gdw) = (|i| b.y(i), |i| b.dx(i), |e| b.dw(e));
        for (what, want, f32_result, len, tol) in [
            ("y", &y, &y32, n * m, &gy as &dyn Fn(usize) -> f64),
            ("dx", &dx, &dx32, n * k, &gdx),
            ("dw", &dw, &dw32, m * k, &gdw),
        ] {
            let out = outside(want, f32_result, tol);
            eprintln!(
                "bf16 {what} {n}x{k}x{m}: the f32 GEMM is outside the tolerance at {out} of {len}"
            );
            assert!(
                2 * out > len,
                "{what} {n}x{k}x{m}: the tolerance cannot tell bf16 from f32 ({out} of {len} apart)"
            );
        }
        let Some(g) = g.as_ref() else { continue };
        let ([xd, wd, dyd], [gy_, gdx_, gdw_]) = linear_on(g, [&x, &w, &dy], &dw0, (n, k, m));
        // FAST_16BF allows bf16 but does not force it: at the odd size (unaligned rows),
        // cuBLAS may pick an f32 kernel. There a result that is the f32 GEMM's is accepted (and
        // said); at the aligned size (the model's shapes) it must be the bf16 one.
        let mut chose_f32 = false;
        for (what, want, f32_result, got, tol) in [
            ("y", &y, &y32, &gy_, &gy as &dyn Fn(usize) -> f64),
            ("dx", &dx, &dx32, &gdx_, &gdx),
            ("dw", &dw, &dw32, &gdw_, &gdw),
        ] {
            let is_f32 = outside(f32_result, got, tol) * 10 < got.len()
                && outside(want, got, tol) * 10 >= got.len();
            if is_f32 && tag == 300 {
                eprintln!(
                    "NOTE: bf16 linear {what} {n}x{k}x{m}: cuBLAS computed this unaligned GEMM \
                     in f32 (allowed under CUBLAS_COMPUTE_32F_FAST_16BF)"
                );
                chose_f32 = true;
                compare(
                    &format!("bf16-mode linear {what} {n}x{k}x{m} (f32 kernel)"),
                    f32_result,
                    got,
                    tol,
                );
                continue;
            }
            assert!(
                !is_f32,
                "bf16 linear {what} {n}x{k}x{m}: the GPU computed the f32 GEMM, not the bf16 one \
                 at an aligned size: --precision bf16 is not reaching cuBLAS"
            );
            compare(&format!("bf16 linear {what} {n}x{k}x{m}"), want, got, tol);
        }
        // dx accumulation (beta = 1, C = the f32 dx, unrounded): dx + dy·w ≈ 2·dx.
        let mut dx2 = g.upload(&dx).unwrap();
        let mut scratch = g.zeros(m * k).unwrap();
        let a = LinearGrad::new(&dyd, &xd, &wd, d);
        g.linear_bwd(Dx::Add(&mut dx2), Some(&mut scratch), a)
            .unwrap();
        let want: Vec<f32> = if chose_f32 {
            dx.iter().zip(&dx32).map(|(&a, &b)| a + b).collect()
        } else {
            dx.iter().map(|&a| 2.0 * a).collect()
        };
        compare(
            &format!("bf16 linear dx accumulate {n}x{k}x{m}"),
            &want,
            &g.download(&dx2, n * k).unwrap(),
            |i| 2.0 * gdx(i) + 2.0 * U * want[i].abs() as f64,
        );
    }
    // Back to f32: the same handle computes the f32 GEMM again (bound of `linear_fwd_bwd`).
    let Some(mut g) = g else { return };
    g.set_precision(TrainPrecision::F32);
    let (n, k, m) = (37, 67, 29);
    let x = rand_vec(390, n * k, 1.0);
    let w = rand_vec(391, m * k, 1.0);
    let mut y = vec![0f32; n * m];
    ops::linear(&mut y, &x, &w, n, k, m);
    let (xd, wd) = (g.upload(&x).unwrap(), g.upload(&w).unwrap());
    let mut yd = g.zeros(n * m).unwrap();
    g.linear(&mut yd, &xd, &wd, MatMul { n, k, m }).unwrap();
    let (ax, aw) = (abs(&x), abs(&w));
    compare(
        "f32 linear after bf16",
        &y,
        &g.download(&yd, n * m).unwrap(),
        |i| {
            let (r, j) = (i / m, i % m);
            let s: f64 = (0..k).map(|t| ax[r * k + t] * aw[j * k + t]).sum();
            2.0 * (k as f64 + 2.0) * U * s
        },
    );
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}

/// One forward/backward of the tiny preset (as `model_step_matches_cpu`) with bf16 GEMMs,
/// against the **f32** CPU reference: this shows bf16 mode is wired through the whole model,
/// not that it is as accurate as f32.
///
/// Tolerances: every GEMM input is rounded to bf16 (≤ 2^-9 relative with round-to-nearest,
/// ≤ 2^-8 with truncation), so each GEMM output moves by ~2^-8 relative (random signs) and the
/// ~50 GEMMs of the pass add up to percent-level normwise gradient differences; the loss, a
/// mean of log-softmax terms over the masked rows, moves much less. A CPU emulation of exactly
/// this test (inputs of every GEMM rounded, by RNE or by truncation, everything else f32) gave:
/// loss relative error 1.1e-4 (RNE) / 6.6e-4 (truncation); gradient normwise relative errors
/// 6e-3 … 2.6e-2 and cosine similarities ≥ 0.99975 for every tensor. Bounds, with ≥ 4× margin:
/// loss ≤ 5e-3 relative; per tensor, relative error ≤ 0.1 and cosine ≥ 0.995 (scale-free:
/// truncation shrinks magnitudes slightly but does not turn directions). A wiring error (wrong
/// operand, transposition, lost accumulation) gives O(1) errors and cosines far from 1.
/// And bf16 must be in effect: the same GPU pass in f32 differs from the bf16 one by more than
/// the f32 parity bound (1e-3 normwise) for at least half of the tensors (emulation: ≥ 6e-3
/// for every tensor).
#[test]
fn model_step_bf16_close_to_cpu() {
    let Some(mut g) = gpu() else { return };
    let cfg = tiny();
    let p = tiny_params(&cfg);
    let batch = tiny_batch(&cfg, 2, 40);
    let mut grad = Params::<f32>::zeros(&cfg);
    let loss = forward_backward(&cfg, &p, &batch, &mut grad).unwrap();
    let dp = DeviceParams::upload(&g, &p).unwrap();
    g.set_precision(TrainPrecision::Bf16);
    let mut dg = DeviceParams::upload(&g, &Params::<f32>::zeros(&cfg)).unwrap();
    let gl = cuda::forward_backward(&g, &cfg, &dp, &batch, &mut dg).unwrap();
    let gb = dg.download(&g).unwrap();
    g.set_precision(TrainPrecision::F32);
    let mut dg32 = DeviceParams::upload(&g, &Params::<f32>::zeros(&cfg)).unwrap();
    let gl32 = cuda::forward_backward(&g, &cfg, &dp, &batch, &mut dg32).unwrap();
    let g32 = dg32.download(&g).unwrap();
    eprintln!("tiny loss: cpu f32 {loss}, gpu bf16 {gl}, gpu f32 {gl32}");
    assert!(
        (loss - gl).abs() <= 5e-3 * loss.abs(),
        "loss cpu {loss} gpu bf16 {gl}"
    );
    let mut differs = 0;
    for (i, name) in grad.names.iter().enumerate() {
        let (e, c) = (
            rel_err(&grad.data[i], &gb.data[i]),
            cosine(&grad.data[i], &gb.data[i]),
        );
        let from_f32 = rel_err(&g32.data[i], &gb.data[i]);
        eprintln!(
            "bf16 grad `{name}`: relative error {e:.2e}, cosine {c:.6}, vs GPU f32 {from_f32:.2e}"
        );
        assert!(
            e <= 0.1 && c >= 0.995,
            "bf16 gradient of `{name}`: relative error {e:e}, cosine {c}"
        );
        if from_f32 > 1e-3 {
            differs += 1;
        }
    }
    assert!(
        2 * differs >= grad.names.len(),
        "bf16 mode changed only {differs} of {} gradients beyond f32 rounding: is it in effect?",
        grad.names.len()
    );
}

/// Activation recomputation (`--recompute`) on each device: the same ops on the same inputs in
/// the same order, so the loss and every gradient equal the kept-activation pass's bit for bit
/// (the GPU's kernels and GEMMs are deterministic: see `model_step_matches_cpu`), with fewer
/// activation floats held.
#[test]
fn model_step_recompute_is_bit_identical() {
    on_each_device!(model_step_recompute_is_bit_identical_on);
}

fn model_step_recompute_is_bit_identical_on<B: TrainOps>(g: &B) {
    let cfg = tiny();
    let p = tiny_params(&cfg);
    let batch = tiny_batch(&cfg, 2, 40);
    let dp = upload_params(g, &p);
    let zeros = Params::<f32>::zeros(&cfg);
    let run = |recompute: bool| {
        let mut dg = upload_params(g, &zeros);
        let o = PassOptions::recomputing(recompute);
        let s = forward_backward_with(g, &cfg, o, &dp, &batch, &mut dg).unwrap();
        (s, download_params(g, &dg, &zeros))
    };
    let (keep, gk) = run(false);
    let (rec, gr) = run(true);
    assert!(keep.loss.is_finite(), "loss {}", keep.loss);
    assert_eq!(keep.loss.to_bits(), rec.loss.to_bits(), "loss");
    assert!(rec.activation_floats < keep.activation_floats);
    for (i, name) in gk.names.iter().enumerate() {
        assert!(
            gk.data[i].iter().all(|x| x.is_finite()),
            "`{name}`: non-finite"
        );
        let bad = gk.data[i]
            .iter()
            .zip(&gr.data[i])
            .position(|(a, b)| a.to_bits() != b.to_bits());
        if let Some(j) = bad {
            panic!(
                "gradient `{name}`[{j}]: {} kept vs {} recomputed",
                gk.data[i][j], gr.data[i][j]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LoRA over a frozen bf16 base

/// The tiny preset's random parameters rounded to bf16, as a checkpoint of bf16 tensors (what
/// the GPU's LoRA run uploads as is) and as the f32 parameters of the CPU reference (the same
/// values exactly).
fn tiny_bf16_model(cfg: &ModelConfig) -> (llada::hf::checkpoint::Checkpoint, Params<f32>) {
    use llada::hf::checkpoint::{Checkpoint, WeightSource};
    use llada::hf::dtype::DType;
    let mut p = tiny_params(cfg);
    let mut map = std::collections::HashMap::new();
    for (i, d) in p.data.iter_mut().enumerate() {
        for x in d.iter_mut() {
            *x = DType::BF16.round(*x);
        }
        let name = p.names[i].clone();
        let src = WeightSource::Host {
            data: std::sync::Arc::new(d.clone()),
            dtype: DType::BF16,
            shape: p.shapes[i].clone(),
            name: name.clone(),
        };
        map.insert(name, src);
    }
    let mut ck = Checkpoint::from_sources(map);
    ck.check_against(cfg).unwrap();
    let back = Params::<f32>::from_checkpoint(cfg, &ck).unwrap();
    assert_eq!(
        back.data, p.data,
        "bf16 values survive the checkpoint exactly"
    );
    (ck, p)
}

/// A rank-4 adapter on every default target with `B` random too (PEFT starts it at zero, which
/// would make every `dA` zero and hide its errors).
fn tiny_adapter(cfg: &ModelConfig) -> llada::lora::Adapter {
    let targets: Vec<String> = "q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out"
        .split(',')
        .map(String::from)
        .collect();
    let mut ad = llada::lora::train::init_adapter(cfg, &targets, 4, 8.0, false, 7).unwrap();
    for (j, m) in ad.modules.values_mut().enumerate() {
        m.b = rand_vec(1300 + j as u64, m.b.len(), 0.05);
    }
    ad
}

/// One LoRA step's pass on `s` (the trainer's step state: the CPU's `LoraStep` or the GPU's
/// `CudaLoraState`): loss and adapter gradients of the tiny batch, then the same pass again
/// without clearing, whose gradients must be exactly twice the first (a deterministic pass
/// accumulating: f32 doubles exactly).
fn lora_pass_on<S: StepState>(
    s: &mut S,
    grads: impl Fn(&S) -> llada::lora::train::LoraGrads,
) -> (f64, llada::lora::train::LoraGrads) {
    let cfg = tiny();
    let batch = tiny_batch(&cfg, 2, 40);
    s.zero_grad().unwrap();
    let loss = s
        .forward_backward(&cfg, &batch, PassOptions::default())
        .unwrap();
    let g = grads(s);
    let loss2 = s
        .forward_backward(&cfg, &batch, PassOptions::default())
        .unwrap();
    assert_eq!(loss.to_bits(), loss2.to_bits(), "the pass is deterministic");
    let g2 = grads(s);
    for (name, (a, b)) in &g.modules {
        let (a2, b2) = &g2.modules[name];
        for (what, one, two) in [("A", a, a2), ("B", b, b2)] {
            assert!(
                one.iter().all(|x| x.is_finite()),
                "d{what} of {name}: non-finite"
            );
            let twice: Vec<f32> = one.iter().map(|x| 2.0 * x).collect();
            let e = rel_err(&twice, two);
            assert!(e <= 1e-6, "d{what} of {name} does not accumulate: {e:e}");
        }
    }
    (loss, g)
}

/// LoRA training on the GPU (`CudaLoraState`: frozen bf16 base, f32 adapters) against the CPU's
/// (`LoraStep`: `HostOps` with the LoRA linears, f32) on the same bf16-valued base, adapter and
/// batch. The body runs on each: the CPU instance checks the harness (determinism,
/// accumulation) and gives the reference.
///
/// Tolerances: the weights are bf16 values on both sides, so the only difference beyond f32
/// rounding is that every base GEMM on the GPU rounds its activation operand (`x` forward,
/// `dy` backward) to bf16 (RNE, ≤ 2^-9 relative per element). That is one of the two rounded
/// operands of `model_step_bf16_close_to_cpu`, whose CPU emulation gave loss errors ≤ 6.6e-4
/// relative and per-tensor normwise gradient errors ≤ 2.6e-2 with cosines ≥ 0.99975; the same
/// bounds with ≥ 4× margin hold here: loss ≤ 5e-3 relative, each `dA` / `dB` relative error ≤
/// 0.1 and cosine ≥ 0.995. The adapter GEMMs are f32. A wiring error (a transposed factor, a
/// missing scale, a lost accumulation, the wrong module) gives O(1) errors; NaN fails (every
/// comparison with NaN is false, and the body checks finiteness).
#[test]
fn lora_step_bf16_base_close_to_cpu() {
    use llada::train::lora::LoraStep;
    let cfg = tiny();
    let (ck, p) = tiny_bf16_model(&cfg);
    let ad = tiny_adapter(&cfg);
    let mut cpu = LoraStep::new(p, ad.clone(), AdamWConfig::default());
    let (loss, want) = lora_pass_on(&mut cpu, |s| s.grads.clone());
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(
        want.modules
            .values()
            .all(|(a, b)| a.iter().any(|&x| x != 0.0) && b.iter().any(|&x| x != 0.0)),
        "every dA and dB is nonzero (B is not zero)"
    );
    let Some(g) = gpu() else { return };
    let mut st = cuda::CudaLoraState::new(g, &cfg, &ck, &ad).unwrap();
    // The base is resident as bf16: 2 bytes per matrix element, 4 per norm element.
    let (mats, norms): (usize, usize) = (ck.names().map(|n| ck.get(n).unwrap()))
        .map(|t| (t.shape().len(), t.numel()))
        .fold(
            (0, 0),
            |(m, v), (d, n)| if d == 2 { (m + n, v) } else { (m, v + n) },
        );
    assert_eq!(st.base_bytes().unwrap(), 2 * mats + 4 * norms);
    let (gl, got) = lora_pass_on(&mut st, |s| s.grads(&ad).unwrap());
    let peak = st.peak_bytes().unwrap();
    assert!(peak >= st.base_bytes().unwrap(), "peak {peak} B sampled");
    eprintln!("tiny LoRA loss: cpu f32 {loss}, gpu bf16 base {gl}");
    assert!(
        (loss - gl).abs() <= 5e-3 * loss.abs(),
        "loss cpu {loss} gpu {gl}"
    );
    for (name, (a, b)) in &want.modules {
        let (ga, gb) = &got.modules[name];
        for (what, w, x) in [("A", a, ga), ("B", b, gb)] {
            let (e, c) = (rel_err(w, x), cosine(w, x));
            eprintln!("d{what} of {name}: relative error {e:.2e}, cosine {c:.6}");
            assert!(
                e <= 0.1 && c >= 0.995,
                "d{what} of {name}: relative error {e:e}, cosine {c}"
            );
        }
    }
    // One update each: the adapters stay finite and move (same AdamW on both sides).
    let mut o = AdamW::new(AdamWConfig::default(), &Params::<f32>::default());
    let n_cpu = cpu.clip_and_step(&mut o, 1e-2, 1.0).unwrap();
    let mut o = AdamW::new(AdamWConfig::default(), &Params::<f32>::default());
    let n_gpu = st.clip_and_step(&mut o, 1e-2, 1.0).unwrap();
    assert!(
        (n_cpu - n_gpu).abs() <= 0.1 * n_cpu,
        "grad norm cpu {n_cpu} gpu {n_gpu}"
    );
    let mut moved = ad.clone();
    st.download_adapter(&mut moved).unwrap();
    for (name, m) in &moved.modules {
        assert!(
            m.a.iter().chain(&m.b).all(|x| x.is_finite()),
            "{name}: non-finite"
        );
        assert_ne!(m.b, ad.modules[name].b, "{name}: B did not move");
    }
}

/// One LoRA linear (layer 0's `q_proj`, forward and backward) and the embedding of
/// `CudaLoraState`'s ops against the CPU's `lora_linear` / `lora_linear_bwd` / `ops::embedding`
/// on the same bf16-valued weights. The inputs `x`, `dy` are bf16 values too, so the GPU's
/// rounding of them to bf16 is exact and only f32 summation order differs:
/// - each side computes a sum of products within (terms + 2)·u·Σ|terms| of the exact value,
///   and `u = x·Aᵀ` carries its own (K + 2)·u·Σ|x||A| into the adapter term; so per element
///   |Δy| ≤ 2(K + r + 4)·u·(Σ|x||W| + |s|·Σ_q Σ|x||A|·|B|), and alike for `dx` (over M and r),
///   `dB = s·dyᵀ·u` (over N, plus `u`'s K) and `dA = s·(dy·B)ᵀ·x` (over N, plus `dy·B`'s M),
///   the Σ|terms| evaluated in f64 on absolute values;
/// - the embedding converts bf16 to f32, which is exact: bit for bit.
#[test]
fn lora_linear_and_embedding_on_bf16_base() {
    use llada::hf::dtype::DType;
    use llada::lora::train::{lora_linear, lora_linear_bwd, Factors};
    use llada::train::backend::{LinearBwd, MatMul};
    let cfg = tiny();
    let (ck, p) = tiny_bf16_model(&cfg);
    let ad = tiny_adapter(&cfg);
    let iq = p
        .names
        .iter()
        .position(|n| n.ends_with("q_proj.weight"))
        .unwrap();
    let module = p.names[iq].strip_suffix(".weight").unwrap();
    let md = &ad.modules[module];
    let ([m, k], n, r) = (md.base_shape, 40, md.rank);
    let s = md.scale(ad.config.use_rslora) as f32;
    let bf = |v: Vec<f32>| {
        v.into_iter()
            .map(|x| DType::BF16.round(x))
            .collect::<Vec<f32>>()
    };
    let (x, dy, w) = (
        bf(rand_vec(1400, n * k, 1.0)),
        bf(rand_vec(1401, n * m, 1.0)),
        &p.data[iq],
    );
    let (f, d) = (
        Factors {
            a: &md.a,
            b: &md.b,
            s,
            r,
        },
        MatMul { n, k, m },
    );
    let (mut y, mut u) = (vec![0f32; n * m], vec![0f32; n * r]);
    lora_linear(&mut y, &mut u, &x, w, f, d);
    let mut dx = vec![0f32; n * k];
    let (mut da, mut db) = (vec![0f32; md.a.len()], vec![0f32; md.b.len()]);
    let io = LinearBwd {
        dy: &dy,
        x: &x,
        w,
        d,
    };
    lora_linear_bwd(Some(&mut dx), (&mut da, &mut db), &u, f, io);
    // Σ|terms| (f64, absolute values).
    let ab = |v: &[f32]| v.iter().map(|&z| (z as f64).abs()).collect::<Vec<f64>>();
    let (xa, dya, wa, aa, ba, sa) = (ab(&x), ab(&dy), ab(w), ab(&md.a), ab(&md.b), s.abs() as f64);
    let ua: Vec<f64> = (0..n * r)
        .map(|e| strided_dot((&xa[e / r * k..], 1), (&aa[e % r * k..], 1), k))
        .collect();
    let ea: Vec<f64> = (0..n * r)
        .map(|e| strided_dot((&dya[e / r * m..], 1), (&ba[e % r..], r), m))
        .collect();
    let ty: Vec<f64> = (0..n * m)
        .map(|e| {
            let (i, o) = (e / m, e % m);
            strided_dot((&xa[i * k..], 1), (&wa[o * k..], 1), k)
                + sa * strided_dot((&ua[i * r..], 1), (&ba[o * r..], 1), r)
        })
        .collect();
    let tdx: Vec<f64> = (0..n * k)
        .map(|e| {
            let (i, j) = (e / k, e % k);
            strided_dot((&dya[i * m..], 1), (&wa[j..], k), m)
                + sa * strided_dot((&ea[i * r..], 1), (&aa[j..], k), r)
        })
        .collect();
    let tdb: Vec<f64> = (0..m * r)
        .map(|e| sa * strided_dot((&dya[e / r..], m), (&ua[e % r..], r), n))
        .collect();
    let tda: Vec<f64> = (0..r * k)
        .map(|e| sa * strided_dot((&ea[e / k..], r), (&xa[e % k..], k), n))
        .collect();
    // The bound holds for the CPU side against y in f64 (half of it: one side's error).
    let f64s = |v: &[f32]| v.iter().map(|&z| z as f64).collect::<Vec<f64>>();
    let (x6, w6, a6, b6) = (f64s(&x), f64s(w), f64s(&md.a), f64s(&md.b));
    for e in 0..n * m {
        let (i, o) = (e / m, e % m);
        let uq = |q: usize| strided_dot((&x6[i * k..], 1), (&a6[q * k..], 1), k);
        let exact_y = strided_dot((&x6[i * k..], 1), (&w6[o * k..], 1), k)
            + s as f64 * (0..r).map(|q| uq(q) * b6[o * r + q]).sum::<f64>();
        let bound = (k + r + 4) as f64 * U * ty[e];
        assert!(
            (y[e] as f64 - exact_y).abs() <= bound,
            "CPU y[{e}] outside its own bound"
        );
    }
    let Some(g) = gpu() else { return };
    let st = cuda::CudaLoraState::new(g, &cfg, &ck, &ad).unwrap();
    let o = &st.ops;
    let wd = &st.params()[iq];
    let (xd, dyd) = (o.upload(&x).unwrap(), o.upload(&dy).unwrap());
    let mut yd = o.zeros(n * m).unwrap();
    let d = MatMul { n, k, m };
    o.linear(&mut yd, &xd, wd, d).unwrap();
    let mut dxd = o.zeros(n * k).unwrap();
    let a = LinearGrad::new(&dyd, &xd, wd, d);
    o.linear_bwd(Dx::Write(&mut dxd), None, a).unwrap();
    let gg = st.grads(&ad).unwrap();
    let (gda, gdb) = &gg.modules[module];
    let c = |terms: usize| 2.0 * (terms + 4) as f64 * U;
    compare("lora y", &y, &o.download(&yd, n * m).unwrap(), |e| {
        c(k + r) * ty[e]
    });
    compare("lora dx", &dx, &o.download(&dxd, n * k).unwrap(), |e| {
        c(m + r) * tdx[e]
    });
    compare("lora dB", &db, gdb, |e| c(n + k) * tdb[e]);
    compare("lora dA", &da, gda, |e| c(n + m) * tda[e]);
    // The embedding from the bf16 table.
    let iw = p.index_of(llada::hf::checkpoint::WTE).unwrap();
    let ch = cfg.d_model;
    let ids = rand_ids(1402, n, cfg.embedding_size);
    let mut want = vec![0f32; n * ch];
    ops::embedding(&mut want, &p.data[iw], &ids, ch);
    let mut out = o.zeros(n * ch).unwrap();
    let idd = o.ints(&ids).unwrap();
    let rows = RowIds::new(&idd, Rows { n, c: ch });
    o.embedding(&mut out, &st.params()[iw], rows).unwrap();
    exact("lora embedding", &want, &o.download(&out, n * ch).unwrap());
}
