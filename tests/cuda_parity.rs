//! GPU parity: every CUDA kernel against the CPU reference backend, on fresh random inputs
//! (bf16-representable), at odd and real shapes.
//!
//! Each op body is written once over the [`Backend`] trait (`run_*<B: Backend>`) and run on both
//! `CpuBackend::new(BF16)` and `CudaBackend`. Outputs are poisoned (NaN) before every kernel, so an
//! element the kernel forgot to write shows up as a NaN mismatch. On a failure the worst element,
//! its index and both values are printed.
//!
//! Tolerances (bf16 has 8 significant bits, ulp(x) = 2^(⌊log2|x|⌋−7)):
//! - pure copies and single-rounding elementwise ops whose f32 math is written op by op in both
//!   implementations (embedding, gather, add, rope, init, convert, cfg mixing): **bit-exact**.
//! - rms_norm, add_rms_norm: the sum of squares is reduced in another order (tree vs sequential),
//!   so `r` may differ by an f32 ulp; that can flip the first bf16 rounding (x·r) by 1 ulp, and
//!   the product with w (relative change ≤ 2^-7) can then round to a neighbour once more:
//!   **≤ 2 bf16 ulps**.
//! - swiglu: CUDA `expf` vs libm `exp` differ by ≤ 2 f32 ulps, which can flip the bf16 rounding of
//!   silu by 1 ulp, then the product's rounding once more: **≤ 2 bf16 ulps**.
//! - matmul: both accumulate exact bf16 products in f32 (cuBLAS with reduced-precision reductions
//!   disallowed), in different orders: each f32 result is within K·2^-24·Σ|x_k w_k| of the exact
//!   sum, and each side's bf16 rounding adds half an ulp: **|Δ| ≤ ulp(out) + 2·K·2^-24·Σ|x_k w_k|**.
//! - attention: flash attention rounds the probabilities P to bf16 for the P·V tensor-core
//!   product (relative error ≤ 2^-9 per term) and rescales online; the softmax weights of the two
//!   implementations differ by at most that per term, and the normaliser too, so with
//!   `o = Σ p_j v_j / Σ p_j`: **|Δ| ≤ ulp(o) + 2·2^-8·Σ_j (p_j/Σp)·|v_j|** (terms from an f64
//!   recomputation here).
//! - select: tokens **identical** (integer logits force ties; Gumbel noise is the bit-exact
//!   counter RNG in f64); confidence **≤ 1 bf16 ulp** (its softmax sum order and `expf` differ).
//! - top-k / threshold selection: **identical** to `head::top_k` / `head::threshold_select`.
//! - rope_kv_store (fused RoPE + cache store): **bit-exact** against `rope` then `kv_store`
//!   (the same f32 operations, rounded once); a cached generation with it equals the unfused one.
//! - the step's commit selection (`commit_select`, quota / threshold / factor): **identical** to
//!   `commit::commit_rows` (integer ranks and copied tokens; f64 compares of f32 values); and a
//!   whole generation with the selection on the GPU equals the host-selected one in every mode.
//! - the step graph's ops (`step_advance`, the head with its RNG step in device memory):
//!   **identical** to `step::step_advance_ref` and to the head given that step; a whole
//!   generation in step graphs (`LLADA_STEP_GRAPH=1`) equals the host-selected one.
//!
//! Without a usable GPU (no driver, no device, binary built without kernels) every test prints
//! `SKIP: <why>` and passes, unless `LLADA_REQUIRE_GPU=1`, which turns the skip into a failure.

mod common;

use common::select::Select;

use std::sync::Arc;

use llada::backend::commit::{CommitRule, CommitShape};
use llada::backend::cpu::CpuBackend;
use llada::backend::head::{self, Remasking, SelectParams};
use llada::backend::step::{self, StepShape};
use llada::backend::{rope_tables, AttnShape, Backend, CachedAttnShape, CommitIn, Gather};
use llada::backend::{HeadDims, Kv, LogProb, MatMul, Norm, Rope, Rows, SelectIo, StepIn};
use llada::engine::model::{Model, Span, Tokens};
use llada::hf::checkpoint::WeightSource;
use llada::hf::dtype::DType;
use llada::rng;

use common::{gpu, host_bf16 as host};

// ---------------------------------------------------------------------------------------------
// Harness

/// The error of a call that must fail, as text.
fn err<T, E: std::fmt::Display>(r: Result<T, E>) -> String {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(e) => e.to_string(),
    }
}

fn cpu() -> CpuBackend {
    CpuBackend::new(DType::BF16)
}

/// Deterministic bf16-representable values uniform in [-scale, scale), distinct per `tag`.
fn rand_vec(tag: u64, len: usize, scale: f32) -> Vec<f32> {
    common::rand_bf16(0xC0DA, tag, len, scale)
}

fn ints<B: Backend>(b: &B, v: &[i32]) -> B::Ints {
    let mut x = b.alloc_ints(v.len()).unwrap();
    b.write_ints(&mut x, v).unwrap();
    x
}

fn f32s<B: Backend>(b: &B, v: &[f32]) -> B::F32s {
    let mut x = b.alloc_f32s(v.len()).unwrap();
    b.write_f32s(&mut x, v).unwrap();
    x
}

/// An activation buffer `[rows, cols]` holding `data`, through the trait only: a host weight
/// gathered by `embedding` with ids `0..rows` (a pure copy, itself checked bit-exact below).
fn act<B: Backend>(b: &B, data: &[f32], rows: usize, cols: usize) -> B::Act {
    assert_eq!(data.len(), rows * cols);
    let w = b
        .load_weight(&[host("act", &[rows, cols], data.to_vec())])
        .unwrap();
    let ids = ints(b, &(0..rows as i32).collect::<Vec<_>>());
    let mut a = b.alloc_act(rows * cols).unwrap();
    b.embedding(&mut a, &w, Gather::new(&ids, rows, cols))
        .unwrap();
    a
}

/// An output buffer filled with NaN, so unwritten elements show.
fn poisoned<B: Backend>(b: &B, len: usize) -> B::Act {
    act(b, &vec![f32::NAN; len], 1, len)
}

fn ulp_bf16(x: f32) -> f32 {
    let a = x.abs().max(1e-30);
    2f32.powi(a.log2().floor() as i32 - 7)
}

/// Compare element-wise; `tol(i, cpu, gpu)` is the allowed |difference| at `i`. NaN must match
/// NaN. Panics with the worst element (largest |diff|/tol).
fn compare(what: &str, cpu: &[f32], gpu: &[f32], tol: impl Fn(usize, f32, f32) -> f32) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths differ");
    let mut worst: Option<(f32, usize)> = None;
    let mut bad = 0usize;
    for (i, (&c, &g)) in cpu.iter().zip(gpu).enumerate() {
        let (ratio, fail) = if c.is_nan() || g.is_nan() {
            if c.is_nan() && g.is_nan() {
                (0.0, false)
            } else {
                (f32::INFINITY, true)
            }
        } else if c == g {
            (0.0, false)
        } else {
            let t = tol(i, c, g);
            let d = (c - g).abs();
            (if t > 0.0 { d / t } else { f32::INFINITY }, d > t)
        };
        if fail {
            bad += 1;
        }
        if worst.map_or(true, |(r, _)| ratio > r) {
            worst = Some((ratio, i));
        }
    }
    if bad > 0 {
        let (r, i) = worst.unwrap();
        panic!(
            "{what}: {bad} of {} elements out of tolerance; worst at index {i}: cpu {:e} gpu {:e} (|diff| {:e}, tol {:e}, ratio {r:.2})",
            cpu.len(),
            cpu[i],
            gpu[i],
            (cpu[i] - gpu[i]).abs(),
            tol(i, cpu[i], gpu[i])
        );
    }
}

fn exact(what: &str, cpu: &[f32], gpu: &[f32]) {
    compare(what, cpu, gpu, |_, _, _| 0.0);
}

fn ulps(what: &str, cpu: &[f32], gpu: &[f32], k: f32) {
    compare(what, cpu, gpu, |_, c, g| k * ulp_bf16(c.abs().max(g.abs())));
}

// ---------------------------------------------------------------------------------------------
// One body per op, generic over the backend.

fn run_embedding<B: Backend>(b: &B, wte: &[f32], v: usize, c: usize, ids: &[i32]) -> Vec<f32> {
    let w = b
        .load_weight(&[host("wte", &[v, c], wte.to_vec())])
        .unwrap();
    let n = ids.len();
    let ids = ints(b, ids);
    let mut out = poisoned(b, n * c);
    b.embedding(&mut out, &w, Gather { idx: &ids, n, c })
        .unwrap();
    b.read_act(&out, n * c).unwrap()
}

fn run_rms_norm<B: Backend>(b: &B, x: &[f32], w: &[f32], n: usize, c: usize, eps: f32) -> Vec<f32> {
    let wt = b.load_weight(&[host("norm", &[c], w.to_vec())]).unwrap();
    let xa = act(b, x, n, c);
    let mut out = poisoned(b, n * c);
    b.rms_norm(&mut out, &xa, &wt, Norm { n, c, eps }).unwrap();
    b.read_act(&out, n * c).unwrap()
}

/// Returns (out, updated x).
fn run_add_rms_norm<B: Backend>(
    b: &B,
    x: &[f32],
    d: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>) {
    let wt = b.load_weight(&[host("norm", &[c], w.to_vec())]).unwrap();
    let mut xa = act(b, x, n, c);
    let da = act(b, d, n, c);
    let mut out = poisoned(b, n * c);
    b.add_rms_norm(&mut out, &mut xa, &da, &wt, Norm { n, c, eps: 1e-5 })
        .unwrap();
    (
        b.read_act(&out, n * c).unwrap(),
        b.read_act(&xa, n * c).unwrap(),
    )
}

fn run_add<B: Backend>(b: &B, x: &[f32], d: &[f32], n: usize, c: usize) -> Vec<f32> {
    let mut xa = act(b, x, n, c);
    let da = act(b, d, n, c);
    b.add(&mut xa, &da, Rows { n, c }).unwrap();
    b.read_act(&xa, n * c).unwrap()
}

fn run_matmul<B: Backend>(
    b: &B,
    x: &[f32],
    parts: &[(usize, Vec<f32>)],
    n: usize,
    k: usize,
) -> Vec<f32> {
    let srcs: Vec<WeightSource> = parts
        .iter()
        .enumerate()
        .map(|(i, (rows, d))| host(&format!("w{i}"), &[*rows, k], d.clone()))
        .collect();
    let m: usize = parts.iter().map(|p| p.0).sum();
    let w = b.load_weight(&srcs).unwrap();
    let xa = act(b, x, n, k);
    let mut out = poisoned(b, n * m);
    b.matmul(&mut out, &xa, &w, MatMul { n, k, m }).unwrap();
    b.read_act(&out, n * m).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn run_rope<B: Backend>(
    b: &B,
    qkv: &[f32],
    pos: &[i32],
    cos: &[f32],
    sin: &[f32],
    nh: usize,
    nkv: usize,
    hd: usize,
) -> Vec<f32> {
    let n = pos.len();
    let width = (nh + 2 * nkv) * hd;
    let mut q = act(b, qkv, n, width);
    let (p, c, s) = (ints(b, pos), f32s(b, cos), f32s(b, sin));
    b.rope(
        &mut q,
        Rope::new(&p, &c, &s),
        AttnShape::new(1, n, nh, nkv, hd),
    )
    .unwrap();
    b.read_act(&q, n * width).unwrap()
}

fn run_attention<B: Backend>(b: &B, qkv: &[f32], kv: Option<&[i32]>, s: AttnShape) -> Vec<f32> {
    let rows = s.b * s.t;
    let q = act(b, qkv, rows, (s.nh + 2 * s.nkv) * s.hd);
    let kvb = kv.map(|k| ints(b, k));
    let mut out = poisoned(b, rows * s.nh * s.hd);
    b.attention(&mut out, &q, kvb.as_ref(), s).unwrap();
    b.read_act(&out, rows * s.nh * s.hd).unwrap()
}

fn run_swiglu<B: Backend>(b: &B, gu: &[f32], n: usize, f: usize) -> Vec<f32> {
    let g = act(b, gu, n, 2 * f);
    let mut out = poisoned(b, n * f);
    b.swiglu(&mut out, &g, Rows { n, c: f }).unwrap();
    b.read_act(&out, n * f).unwrap()
}

fn run_gather<B: Backend>(b: &B, x: &[f32], n: usize, c: usize, rows: &[i32]) -> Vec<f32> {
    let xa = act(b, x, n, c);
    let r = ints(b, rows);
    let mut out = poisoned(b, rows.len() * c);
    b.gather_rows(&mut out, &xa, Gather::new(&r, rows.len(), c))
        .unwrap();
    b.read_act(&out, rows.len() * c).unwrap()
}

fn run_select<B: Backend>(
    b: &B,
    logits: &[f32],
    keys: &[i32],
    r: usize,
    v: usize,
    p: &SelectParams,
) -> (Vec<i32>, Vec<f32>) {
    let lrows = logits.len() / v;
    let mut l = act(b, logits, lrows, v);
    let k = ints(b, keys);
    let mut tok = ints(b, &vec![-7; r]);
    let mut conf = f32s(b, &vec![f32::NAN; r]);
    b.select(
        SelectIo::new(&mut tok, &mut conf, &mut l, &k),
        HeadDims { r, v },
        p,
    )
    .unwrap();
    (
        b.read_ints(&tok, r).unwrap(),
        b.read_f32s(&conf, r).unwrap(),
    )
}

/// The weight's rows read back through `embedding`.
fn run_load<B: Backend>(b: &B, parts: &[WeightSource], rows: usize, cols: usize) -> Vec<f32> {
    let w = b.load_weight(parts).unwrap();
    let ids = ints(b, &(0..rows as i32).collect::<Vec<_>>());
    let mut out = poisoned(b, rows * cols);
    b.embedding(&mut out, &w, Gather::new(&ids, rows, cols))
        .unwrap();
    b.read_act(&out, rows * cols).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

const NS: [usize; 4] = [1, 7, 33, 384];
const CS: [usize; 3] = [64, 96, 4096];

#[test]
fn embedding_and_gather_are_exact() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    for (ci, &c) in CS.iter().chain(&[5]).enumerate() {
        let v = 1000;
        let wte = rand_vec(10 + ci as u64, v * c, 2.0);
        for &n in &NS {
            let ids: Vec<i32> = (0..n).map(|i| ((i * 7919 + 13) % v) as i32).collect();
            let a = run_embedding(&c0, &wte, v, c, &ids);
            exact(
                &format!("embedding n={n} c={c}"),
                &a,
                &run_embedding(&g, &wte, v, c, &ids),
            );
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| wte[i as usize * c..][..c].to_vec())
                .collect();
            exact("embedding vs direct copy", &want, &a);
            let x = rand_vec(20 + n as u64, n * c, 3.0);
            let rows: Vec<i32> = (0..(n as i32 + 3) / 2)
                .map(|r| (r * 5 + 1) % n as i32)
                .collect();
            exact(
                &format!("gather_rows n={n} c={c}"),
                &run_gather(&c0, &x, n, c, &rows),
                &run_gather(&g, &x, n, c, &rows),
            );
        }
    }
    // Out-of-range ids are caught by the launcher (host-written ids are known).
    let w = g
        .load_weight(&[host("wte", &[4, 64], vec![0.0; 256])])
        .unwrap();
    let ids = ints(&g, &[0, 4]);
    let mut out = g.alloc_act(128).unwrap();
    let e = err(g.embedding(&mut out, &w, Gather::new(&ids, 2, 64)));
    assert!(e.contains("ids[1] = 4"), "{e}");
}

#[test]
fn norms_add_and_swiglu_match() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    for &c in &CS {
        let w = rand_vec(30 + c as u64, c, 1.5);
        for &n in &NS {
            let x = rand_vec(31 + (n * c) as u64, n * c, 4.0);
            let d = rand_vec(32 + (n * c) as u64, n * c, 4.0);
            let tag = format!("n={n} c={c}");
            ulps(
                &format!("rms_norm {tag}"),
                &run_rms_norm(&c0, &x, &w, n, c, 1e-5),
                &run_rms_norm(&g, &x, &w, n, c, 1e-5),
                2.0,
            );
            let (oc, xc) = run_add_rms_norm(&c0, &x, &d, &w, n, c);
            let (og, xg) = run_add_rms_norm(&g, &x, &d, &w, n, c);
            exact(&format!("add_rms_norm residual {tag}"), &xc, &xg);
            ulps(&format!("add_rms_norm out {tag}"), &oc, &og, 2.0);
            exact(
                &format!("add {tag}"),
                &run_add(&c0, &x, &d, n, c),
                &run_add(&g, &x, &d, n, c),
            );
        }
    }
    // Odd width (scalar paths) and a big-magnitude row.
    let (n, c) = (3, 37);
    let x: Vec<f32> = rand_vec(40, n * c, 300.0);
    let w = rand_vec(41, c, 1.0);
    ulps(
        "rms_norm odd c",
        &run_rms_norm(&c0, &x, &w, n, c, 1e-6),
        &run_rms_norm(&g, &x, &w, n, c, 1e-6),
        2.0,
    );
    exact(
        "add odd",
        &run_add(&c0, &x, &w.repeat(n), n, c),
        &run_add(&g, &x, &w.repeat(n), n, c),
    );
    for &(n, f) in &[(1, 64), (7, 96), (33, 4096), (384, 1376), (5, 37)] {
        let gu = rand_vec(50 + (n * f) as u64, n * 2 * f, 8.0);
        ulps(
            &format!("swiglu n={n} f={f}"),
            &run_swiglu(&c0, &gu, n, f),
            &run_swiglu(&g, &gu, n, f),
            2.0,
        );
    }
}

/// |Δ| ≤ ulp(out) + 2·K·2^-24·Σ_k |x_k w_k| (see the file header).
#[test]
fn matmul_matches_within_f32_accumulation_bound() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    // (n, k, row counts of the stacked parts)
    let cases: &[(usize, usize, &[usize])] = &[
        (1, 64, &[96]),
        (7, 96, &[64]),
        (3, 7, &[5]),
        (33, 4096, &[96]),
        (37, 4096, &[64, 16, 16]),
        (384, 4096, &[512]),
        (5, 1376, &[4096]),
    ];
    for (ci, &(n, k, parts)) in cases.iter().enumerate() {
        let (x, parts, m, mag) = matmul_inputs([60, 70], ci as u64, (n, k), parts);
        let a = run_matmul(&c0, &x, &parts, n, k);
        let b = run_matmul(&g, &x, &parts, n, k);
        let gamma = 2.0 * k as f32 * 2f32.powi(-24);
        compare(&format!("matmul n={n} k={k} m={m}"), &a, &b, |i, c, gv| {
            ulp_bf16(c.abs().max(gv.abs())) + gamma * mag[i]
        });
    }
    // Shape errors name the weight.
    let w = g
        .load_weight(&[host("w_q", &[4, 8], vec![0.0; 32])])
        .unwrap();
    let x = g.alloc_act(16).unwrap();
    let mut o = g.alloc_act(16).unwrap();
    let e = err(g.matmul(&mut o, &x, &w, MatMul { n: 2, k: 8, m: 5 }));
    assert!(e.contains("w_q"), "{e}");
    let e = err(g.matmul(&mut o, &x, &w, MatMul { n: 3, k: 8, m: 4 }));
    assert!(e.contains("`x`"), "{e}");
}

#[test]
fn rope_is_exact() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    for &(hd, nh, nkv) in &[(64, 4, 4), (128, 8, 2), (128, 32, 32)] {
        let max_pos = 700;
        let (cos, sin) = rope_tables(500000.0, hd, max_pos);
        for &n in &[1usize, 7, 385] {
            let width = (nh + 2 * nkv) * hd;
            let qkv = rand_vec(80 + (n * hd) as u64, n * width, 3.0);
            let pos: Vec<i32> = (0..n).map(|i| ((i * 37 + 5) % max_pos) as i32).collect();
            let a = run_rope(&c0, &qkv, &pos, &cos, &sin, nh, nkv, hd);
            let b = run_rope(&g, &qkv, &pos, &cos, &sin, nh, nkv, hd);
            exact(&format!("rope n={n} hd={hd} nh={nh} nkv={nkv}"), &a, &b);
            // V is untouched.
            for i in 0..n {
                let v = (nh + nkv) * hd..width;
                exact(
                    "rope leaves v",
                    &qkv[i * width..][v.clone()],
                    &b[i * width..][v],
                );
            }
        }
    }
}

#[allow(clippy::needless_range_loop)]
/// f64 softmax weights for the attention tolerance: returns Σ_j (p_j/Σp)·|v_j| per output element.
fn attention_magnitude(qkv: &[f32], kv: Option<&[i32]>, s: AttnShape) -> Vec<f32> {
    attention_magnitude_rows(qkv, kv, s, 0, s.t)
}

/// [`attention_magnitude`] of query rows `q0..q0 + tq` of each batch row only: `[b·tq, nh·hd]`.
#[allow(clippy::needless_range_loop)]
fn attention_magnitude_rows(
    qkv: &[f32],
    kv: Option<&[i32]>,
    s: AttnShape,
    q0: usize,
    tq: usize,
) -> Vec<f32> {
    let AttnShape { b, t, nh, nkv, hd } = s;
    let width = (nh + 2 * nkv) * hd;
    let mut mag = vec![0f32; b * tq * nh * hd];
    let scale = 1.0 / (hd as f64).sqrt();
    let mut p = vec![0f64; t];
    for bi in 0..b {
        for i in q0..q0 + tq {
            let qi = bi * t + i;
            let oi = bi * tq + i - q0;
            for h in 0..nh {
                let kh = h / (nh / nkv);
                let q = &qkv[qi * width + h * hd..][..hd];
                let mut mx = f64::NEG_INFINITY;
                for j in 0..t {
                    let kj = bi * t + j;
                    p[j] = if kv.map_or(true, |m| m[kj] != 0) {
                        let k = &qkv[kj * width + (nh + kh) * hd..][..hd];
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    } else {
                        f64::NEG_INFINITY
                    };
                    mx = mx.max(p[j]);
                }
                if mx == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = p.iter().map(|&s| (s - mx).exp()).sum();
                for j in 0..t {
                    let w = (p[j] - mx).exp() / sum;
                    if w == 0.0 {
                        continue;
                    }
                    let v = &qkv[(bi * t + j) * width + (nh + nkv + kh) * hd..][..hd];
                    for (d, &vv) in v.iter().enumerate() {
                        mag[oi * nh * hd + h * hd + d] += (w * vv.abs() as f64) as f32;
                    }
                }
            }
        }
    }
    mag
}

/// One dense attention case of [`attention_cases`]: its label, shape, qkv and mask.
struct AttnCase<'a> {
    what: String,
    s: AttnShape,
    qkv: Vec<f32>,
    kv: Option<&'a [i32]>,
}

/// Every (HD ∈ {64, 128}) × (NH, NKV) ∈ {(8, 2), (4, 4)} × `shapes` (b, t) × (unmasked, masked
/// by `mask(b, t)`) case, with fresh random qkv (tags from `tag`), passed to `f`.
fn attention_cases(
    tag: u64,
    shapes: &[(usize, usize)],
    mask: impl Fn(usize, usize) -> Vec<i32>,
    mut f: impl FnMut(AttnCase<'_>),
) {
    let mut case = tag;
    for &hd in &[64usize, 128] {
        for &(nh, nkv) in &[(8usize, 2usize), (4, 4)] {
            for &(b, t) in shapes {
                let m = mask(b, t);
                for masked in [false, true] {
                    case += 1;
                    f(AttnCase {
                        what: format!("b={b} t={t} nh={nh} nkv={nkv} hd={hd} masked={masked}"),
                        s: AttnShape { b, t, nh, nkv, hd },
                        qkv: rand_vec(case, b * t * (nh + 2 * nkv) * hd, 2.0),
                        kv: masked.then_some(m.as_slice()),
                    });
                }
            }
        }
    }
}

/// (b, t) of the dense attention tests: one key, partial tiles, one and several tiles or chunks.
const DENSE_SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (2, 5),
    (1, 37),
    (2, 128),
    (1, 192),
    (2, 200),
    (1, 385),
];

#[test]
fn attention_matches_within_bound() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    // t > 192 takes the split-KV path (chunks of 96 keys; 385 and 200 leave partial ones).
    let shapes = DENSE_SHAPES;
    // Mask: every 3rd key padded; batch row 1 (when present) fully masked.
    let mask = |b: usize, t: usize| -> Vec<i32> {
        (0..b * t)
            .map(|j| i32::from(j % 3 != 1 && j / t != 1))
            .collect()
    };
    attention_cases(100, &shapes, mask, |c| {
        let a = run_attention(&c0, &c.qkv, c.kv, c.s);
        let r = run_attention(&g, &c.qkv, c.kv, c.s);
        let mag = attention_magnitude(&c.qkv, c.kv, c.s);
        compare(&format!("attention {}", c.what), &a, &r, |i, c, gv| {
            ulp_bf16(c.abs().max(gv.abs())) + 2.0 * 2f32.powi(-8) * mag[i]
        });
    });
    assert_rejects_head_dim_96(&g);
}

/// Unsupported head dim: a clear error, not a launch.
fn assert_rejects_head_dim_96<B: Backend>(g: &B) {
    let q = g.alloc_act(3 * 96).unwrap();
    let mut o = g.alloc_act(96).unwrap();
    let s = AttnShape::new(1, 1, 1, 1, 96);
    let e = err(g.attention(&mut o, &q, None, s));
    assert!(e.contains("head dim 96"), "{e}");
}

/// Rows `[q0, q0 + tq)` of every batch row of a `[b·l, w]` matrix.
fn span_rows(x: &[f32], b: usize, l: usize, w: usize, q0: usize, tq: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|bi| x[(bi * l + q0) * w..(bi * l + q0 + tq) * w].to_vec())
        .collect()
}

/// kv_store of the span rows of `full` into poisoned caches (rows outside the span stay NaN),
/// then attention_cached of the span queries. Returns (k_cache, v_cache, out).
fn run_cached<B: Backend>(
    be: &B,
    full: &[f32],
    kv: Option<&[i32]>,
    s: CachedAttnShape,
    q0: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, tq, l, nh, nkv, hd) = s.dims();
    let w = (nh + 2 * nkv) * hd;
    let kw = nkv * hd;
    let mut kc = poisoned(be, b * l * kw);
    let mut vc = poisoned(be, b * l * kw);
    // Fill every row first (a full span), then overwrite the span from a second buffer holding
    // the same rows: exercises both q0 = 0 and q0 > 0.
    let all = act(be, full, b * l, w);
    let sfull = CachedAttnShape { tq: l, ..s };
    be.kv_store(
        Kv::new(&mut kc, &mut vc),
        &all,
        CachedAttnShape { q0: 0, ..sfull },
    )
    .unwrap();
    let span = span_rows(full, b, l, w, q0, tq);
    let q = act(be, &span, b * tq, w);
    be.kv_store(Kv::new(&mut kc, &mut vc), &q, CachedAttnShape { q0, ..s })
        .unwrap();
    let kvb = kv.map(|k| ints(be, k));
    let mut out = poisoned(be, b * tq * nh * hd);
    be.attention_cached(&mut out, &q, Kv { k: &kc, v: &vc }, kvb.as_ref(), s)
        .unwrap();
    (
        be.read_act(&kc, b * l * kw).unwrap(),
        be.read_act(&vc, b * l * kw).unwrap(),
        be.read_act(&out, b * tq * nh * hd).unwrap(),
    )
}

#[test]
fn kv_store_and_cached_attention_match() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    let mut case = 0u64;
    for &hd in &[64usize, 128] {
        for &(nh, nkv) in &[(8usize, 2usize), (4, 4)] {
            // (b, l, q0, tq): a dual-cache block, a prefix-cache suffix, odd sizes, full span.
            // l > 192: split-KV path (several TQ at the same L, odd sizes, a lone query).
            for &(b, l, q0, tq) in &[
                (1usize, 384usize, 128usize, 32usize),
                (2, 384, 0, 384),
                (2, 200, 37, 61),
                (1, 193, 192, 1),
                (3, 290, 7, 64),
                (2, 37, 5, 32),
                (1, 385, 100, 285),
                (2, 19, 0, 19),
                (1, 7, 6, 1),
            ] {
                for masked in [false, true] {
                    case += 1;
                    let s = cached_shape([b, tq, l, nh, nkv, hd]);
                    let w = (nh + 2 * nkv) * hd;
                    let full = rand_vec(500 + case, b * l * w, 2.0);
                    let kv: Vec<i32> = (0..b * l).map(|j| i32::from(j % 3 != 1)).collect();
                    let kv = masked.then_some(kv.as_slice());
                    let (ck, cv, co) = run_cached(&c0, &full, kv, s, q0);
                    let (gk, gv, go) = run_cached(&g, &full, kv, s, q0);
                    let what = format!(
                        "b={b} l={l} q0={q0} tq={tq} nh={nh} nkv={nkv} hd={hd} masked={masked}"
                    );
                    exact(&format!("kv_store k {what}"), &ck, &gk);
                    exact(&format!("kv_store v {what}"), &cv, &gv);
                    // The cached queries see the same keys as full attention over `full`: each
                    // backend's cached rows equal its own full attention rows bit for bit (same
                    // code / kernel, rows independent), and CPU vs GPU is within the flash bound.
                    let dense = AttnShape::new(b, l, nh, nkv, hd);
                    for (name, be_out, full_out) in [
                        ("cpu", &co, run_attention(&c0, &full, kv, dense)),
                        ("gpu", &go, run_attention(&g, &full, kv, dense)),
                    ] {
                        let want = span_rows(&full_out, b, l, nh * hd, q0, tq);
                        exact(
                            &format!("{name} cached vs full attention {what}"),
                            &want,
                            be_out,
                        );
                    }
                    let mag = span_rows(
                        &attention_magnitude(&full, kv, dense),
                        b,
                        l,
                        nh * hd,
                        q0,
                        tq,
                    );
                    compare(&format!("attention_cached {what}"), &co, &go, |i, c, gv| {
                        ulp_bf16(c.abs().max(gv.abs())) + 2.0 * 2f32.powi(-8) * mag[i]
                    });
                }
            }
        }
    }
    // Bad spans and head dims: clear errors, not launches.
    let s = CachedAttnShape {
        b: 1,
        tq: 4,
        l: 8,
        q0: 0,
        nh: 1,
        nkv: 1,
        hd: 64,
    };
    let q = g.alloc_act(4 * 3 * 64).unwrap();
    let mut kc = g.alloc_act(8 * 64).unwrap();
    let mut vc = g.alloc_act(8 * 64).unwrap();
    let e = err(g.kv_store(
        Kv::new(&mut kc, &mut vc),
        &q,
        CachedAttnShape { q0: 6, ..s },
    ));
    assert!(e.contains("exceed the cache length"), "{e}");
    let mut o = g.alloc_act(4 * 96).unwrap();
    let bad = CachedAttnShape { hd: 96, ..s };
    let e = err(g.attention_cached(&mut o, &q, Kv { k: &kc, v: &vc }, None, bad));
    assert!(e.contains("head dim 96"), "{e}");
}

#[test]
fn select_matches_head_reference() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    let mut case = 0u64;
    for &(r, v) in &[(1usize, 64usize), (7, 1000), (33, 4099), (4, 126464)] {
        for &temperature in &[0.0, 0.7] {
            for &cfg_scale in &[0.0, 1.5] {
                for remasking in [Remasking::LowConfidence, Remasking::Random] {
                    case += 1;
                    let lrows = if cfg_scale > 0.0 { 2 * r } else { r };
                    // Integer-valued logits in [-4, 4]: many exact ties (lowest id must win).
                    let logits: Vec<f32> = rand_vec(200 + case, lrows * v, 4.0)
                        .iter()
                        .map(|x| x.round())
                        .collect();
                    let keys: Vec<i32> = (0..r)
                        .flat_map(|i| [(i % 3) as i32, (128 + i * 5) as i32])
                        .collect();
                    let p = SelectParams {
                        temperature,
                        cfg_scale,
                        remasking,
                        seed: 1234 + case,
                        step: case * 3,
                        forbid: (case % 2 == 0).then_some((v - 1) as u32),
                        conf_suppress: if case % 3 == 0 {
                            [Some(0), Some(2)]
                        } else {
                            [None, None]
                        },
                        dtype: DType::BF16,
                    };
                    let (tc, cc) = run_select(&c0, &logits, &keys, r, v, &p);
                    let (tg, cg) = run_select(&g, &logits, &keys, r, v, &p);
                    let what =
                        format!("select r={r} v={v} T={temperature} cfg={cfg_scale} {remasking:?}");
                    if let Some(i) = (0..r).find(|&i| tc[i] != tg[i]) {
                        panic!(
                            "{what}: token differs at row {i}: cpu {} gpu {}",
                            tc[i], tg[i]
                        );
                    }
                    ulps(&format!("{what} conf"), &cc, &cg, 1.0);
                }
            }
        }
    }
}

#[test]
fn topk_and_threshold_match_head_reference() {
    let Some(g) = gpu() else { return };
    for &(nrows, ncols) in &[(1usize, 1usize), (3, 32), (8, 256), (2, 1000), (32, 33)] {
        // Confidences on a coarse grid (ties) with some NaNs.
        let conf: Vec<f32> = rand_vec(300 + ncols as u64, nrows * ncols, 1.0)
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if i % 17 == 5 {
                    f32::NAN
                } else {
                    (x.abs() * 8.0).round() / 8.0
                }
            })
            .collect();
        let kk: Vec<i32> = (0..nrows)
            .map(|r| ((r * 7 + 1) % (ncols + 1)) as i32)
            .collect();
        let cb = f32s(&g, &conf);
        let kb = ints(&g, &kk);
        let mut sel = ints(&g, &vec![-9; nrows * ncols]);
        g.topk_select(&mut sel, &cb, &kb, Rows { n: nrows, c: ncols })
            .unwrap();
        let got_k = g.read_ints(&sel, nrows * ncols).unwrap();
        for &thr in &[0.5f32, 2.0] {
            let mut sel = ints(&g, &vec![-9; nrows * ncols]);
            g.threshold_select(&mut sel, &cb, thr, Rows { n: nrows, c: ncols })
                .unwrap();
            let got_t = g.read_ints(&sel, nrows * ncols).unwrap();
            let mut out = Vec::new();
            for row in 0..nrows {
                let cands: Vec<(f32, usize)> =
                    (0..ncols).map(|j| (conf[row * ncols + j], j)).collect();
                head::threshold_select(&cands, thr, &mut out);
                let mut want = vec![-1; ncols];
                for (o, &j) in want.iter_mut().zip(&out) {
                    *o = j as i32;
                }
                assert_eq!(
                    &got_t[row * ncols..][..ncols],
                    &want[..],
                    "threshold_select {nrows}x{ncols} thr={thr} row {row}"
                );
            }
        }
        let mut out = Vec::new();
        for row in 0..nrows {
            let cands: Vec<(f32, usize)> = (0..ncols).map(|j| (conf[row * ncols + j], j)).collect();
            head::top_k(&cands, kk[row] as usize, &mut out);
            let mut want = vec![-1; ncols];
            for (o, &j) in want.iter_mut().zip(&out) {
                *o = j as i32;
            }
            assert_eq!(
                &got_k[row * ncols..][..ncols],
                &want[..],
                "topk_select {nrows}x{ncols} k={} row {row}",
                kk[row]
            );
        }
    }
}

/// The host inputs of one `commit_select` call: tok, conf, rows, ids, plan.
type CommitIo<'a> = (&'a [i32], &'a [f32], &'a [i32], &'a [i32], &'a [i32]);

/// One `commit_select` call on `be`, returning `commit` (poisoned with -9 first, so an unwritten
/// row shows).
fn run_commit_select<B: Backend>(
    be: &B,
    (tok, conf, rows, ids, plan): CommitIo<'_>,
    s: CommitShape,
) -> Vec<i32> {
    let mut commit = ints(be, &vec![-9; s.r]);
    let (tb, cb, rb, ib, pb) = (
        ints(be, tok),
        f32s(be, conf),
        ints(be, rows),
        ints(be, ids),
        ints(be, plan),
    );
    be.commit_select(
        &mut commit,
        CommitIn {
            tok: &tb,
            conf: &cb,
            rows: &rb,
            ids: &ib,
            plan: &pb,
        },
        s,
    )
    .unwrap();
    be.read_ints(&commit, s.r).unwrap()
}

#[test]
fn commit_select_matches_reference() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mask = 7i32;
    // Segment sizes per case: odd, empty, one row, and one past the 4096-key shared-memory sort
    // (the rank-counting path).
    let cases: [&[usize]; 5] = [
        &[1],
        &[33, 0, 5],
        &[257, 100, 1, 64],
        &[1000; 3],
        &[4099, 2],
    ];
    for (ci, segs) in cases.iter().enumerate() {
        let b = segs.len();
        let r: usize = segs.iter().sum();
        let n = r + 3;
        // Confidences on a coarse grid (ties), NaN, ±0, −inf, +inf; tokens distinct; about a
        // quarter of the rows no longer masked (their token is not the mask id).
        let raw = rand_vec(900 + ci as u64, r, 1.0);
        let conf: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, &x)| match i % 23 {
                3 => f32::NAN,
                7 => -0.0,
                8 => 0.0,
                11 => f32::NEG_INFINITY,
                19 => f32::INFINITY,
                _ => (x.abs() * 8.0).round() / 8.0,
            })
            .collect();
        let tok: Vec<i32> = (0..r as i32).map(|i| 1000 + i).collect();
        // rows[i] = i + 3 over ids of n tokens; ids[0..3] are never requested.
        let rows: Vec<i32> = (3..n as i32).collect();
        let ids: Vec<i32> = (0..n)
            .map(|i| if (i * 7) % 4 == 2 { 2 } else { mask })
            .collect();
        let mut plan = vec![0i32];
        for &k in segs.iter() {
            plan.push(plan.last().unwrap() + k as i32);
        }
        for (br, &k) in segs.iter().enumerate() {
            plan.push(((br * 5 + 3) % (k + 2)) as i32);
        }
        let mut committed = 0;
        for rule in [
            CommitRule::Quota,
            CommitRule::Threshold(0.5),
            CommitRule::Threshold(2.0),
            CommitRule::Threshold(-1.0),
            CommitRule::Factor(0.5),
            CommitRule::Factor(1.0),
            CommitRule::Factor(3.0),
        ] {
            let s = CommitShape {
                r,
                b,
                n,
                mask_id: mask as u32,
                rule,
            };
            let io = (&tok[..], &conf[..], &rows[..], &ids[..], &plan[..]);
            let want = run_commit_select(&c, io, s);
            let got = run_commit_select(&g, io, s);
            committed += want.iter().filter(|&&x| x >= 0).count();
            if let Some(i) = (0..r).find(|&i| got[i] != want[i]) {
                panic!(
                    "commit_select case {ci} segs {segs:?} {rule:?}: row {i} got {} want {} (conf {}, ids {})",
                    got[i], want[i], conf[i], ids[rows[i] as usize]
                );
            }
        }
        assert!(
            committed > 0,
            "case {ci}: the reference committed nothing (weak case)"
        );
    }
}

/// The sharp tiny model on the GPU, two prompts (one holding a `[MASK]`) and 24 tokens in blocks
/// of 8 steps 12: asserts the selection `sel` agrees with the host's in every decoding mode, and
/// returns the model, prompts and parameters; `None` without a GPU.
fn gpu_paths_agree(sel: Select) -> Option<(Model<CudaBackend>, Vec<Vec<u32>>, GenerateParams)> {
    let m = common::sharp_tiny(gpu()?);
    let mut prompts = vec![vec![5, 17, 3, 9, 250, 12, 40], vec![31, 8, 77]];
    prompts[0][2] = m.cfg.mask_token_id;
    let base = common::gen_params(&m.cfg, 12, 24, 8);
    let n = common::select::assert_paths_agree(&m, &prompts, &base, sel);
    assert!(n > 0);
    Some((m, prompts, base))
}

/// A whole generation with the commit selection on the GPU (`LLADA_DEVICE_SELECT=1`) against
/// the same GPU model selecting on the host: identical in every decoding mode.
#[test]
fn device_select_generation_equals_host_select() {
    gpu_paths_agree(Select::Device);
}

/// Whole steps on the GPU (`LLADA_STEP_GRAPH=1`: one graph replay per step, the schedule, step
/// counter and tokens in device memory) against the same GPU model selecting on the host:
/// identical in every decoding mode (Fast-dLLM's whole-step blocks ask the LM head for the rows
/// of the block's first device step every step, where the host path asks for the masks left:
/// identical only if a row's logits do not depend on the head GEMM's row count), and the steps
/// were replayed from graphs.
#[test]
fn step_graph_generation_equals_host_select() {
    let Some((m, prompts, base)) = gpu_paths_agree(Select::StepGraph) else {
        return;
    };
    let mut sampled = common::gen_params(&m.cfg, 9, 24, 8);
    (sampled.temperature, sampled.seed) = (0.7, 3);
    sampled.row_keys = Some(vec![5, 6]);
    let n = common::select::assert_paths_agree(&m, &prompts, &sampled, Select::StepGraph);
    assert!(n > 0);
    let mut pred = ModelPredictor::new(&m);
    pred.set_step_graph(true);
    generate(&mut pred, &prompts, &base, None).unwrap();
    let (captures, replays) = pred.graph_stats();
    assert!(
        captures >= 1 && replays >= 12 - 1 - captures,
        "step graphs: {captures} captured, {replays} replays in 12 steps"
    );
}

/// `step_advance` on the GPU against `backend::step::step_advance_ref`: the same tokens, step
/// state and next plan, with and without the CFG mirror, at one row, odd sizes and more rows
/// than threads, a schedule running out (quota 1 past it), about a third of the requested rows
/// already committed and a third of the commits −1.
#[test]
fn step_advance_matches_reference() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mask = 5i32;
    for (ci, &(b, t, r, mirror_on, steps, done)) in [
        (1usize, 5usize, 3usize, false, 2usize, 0i32),
        (3, 40, 60, true, 7, 6),
        (8, 300, 1500, false, 33, 2),
        (2, 2000, 2500, true, 5, 4),
    ]
    .iter()
    .enumerate()
    {
        let mirror = if mirror_on { b * t } else { 0 };
        let n = if mirror_on { 2 * b * t } else { b * t };
        // r distinct sorted token indices below b·t (every (b·t)/r-th token, about).
        let rows: Vec<i32> = (0..r).map(|j| (j * (b * t) / r) as i32).collect();
        let ids: Vec<i32> = (0..n as i32)
            .map(|i| if i % 3 == 1 { 100 + i } else { mask })
            .collect();
        let commit: Vec<i32> = (0..r as i32)
            .map(|j| if j % 3 == 2 { -1 } else { 1000 + j })
            .collect();
        let sched: Vec<i32> = (0..b * steps).map(|i| ((i * 7) % 5) as i32).collect();
        let (s, e) = (t / 3, t - t / 4);
        let mut state = step::initial_state((7 << 32) | 3, (s, e)).unwrap().to_vec();
        state[step::STATE_STEP] = done;
        let plan: Vec<i32> = (0..2 * b + 1).map(|i| i as i32).collect();
        let shape = StepShape {
            r,
            b,
            t,
            n,
            mirror,
            mask_id: mask as u32,
            steps,
        };
        let run = |be: &dyn Fn() -> (Vec<i32>, Vec<i32>, Vec<i32>)| be();
        let on = |cb: bool| {
            if cb {
                run_step_advance(&c, (&ids, &state, &plan), (&commit, &rows, &sched), shape)
            } else {
                run_step_advance(&g, (&ids, &state, &plan), (&commit, &rows, &sched), shape)
            }
        };
        let want = run(&|| on(true));
        let got = run(&|| on(false));
        assert_ne!(want.0, ids, "case {ci}: nothing was written (weak case)");
        assert!(
            want.1[step::STATE_LEFT_ROWS] > 0,
            "case {ci}: no mask left (weak case)"
        );
        for (name, w, gv) in [
            ("ids", &want.0, &got.0),
            ("state", &want.1, &got.1),
            ("plan", &want.2, &got.2),
        ] {
            if let Some(i) = (0..w.len()).find(|&i| w[i] != gv[i]) {
                panic!(
                    "step_advance case {ci} {name}[{i}]: gpu {} want {}",
                    gv[i], w[i]
                );
            }
        }
    }
}

/// One `step_advance` on `be`; returns (ids, state, plan).
fn run_step_advance<B: Backend>(
    be: &B,
    (ids, state, plan): (&[i32], &[i32], &[i32]),
    (commit, rows, sched): (&[i32], &[i32], &[i32]),
    s: StepShape,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let (mut ib, mut sb, mut pb) = (ints(be, ids), ints(be, state), ints(be, plan));
    let (cb, rb, schb) = (ints(be, commit), ints(be, rows), ints(be, sched));
    let c = StepIn {
        commit: &cb,
        rows: &rb,
        sched: &schb,
    };
    be.step_advance((&mut ib, &mut sb, &mut pb), c, s).unwrap();
    (
        be.read_ints(&ib, ids.len()).unwrap(),
        be.read_ints(&sb, state.len()).unwrap(),
        be.read_ints(&pb, plan.len()).unwrap(),
    )
}

/// The head with the RNG step read from a step state (`head_select_step_bf16`) equals the head
/// given that step as an argument, bit for bit (tokens and confidences), on the GPU and on the
/// CPU; and the step matters (another step draws other tokens).
#[test]
fn select_at_step_equals_select_with_that_step() {
    let (r, v) = (9usize, 4099usize);
    let logits = rand_vec(777, r * v, 2.0);
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    let keys: Vec<i32> = (0..r).flat_map(|i| [i as i32 % 2, 40 + i as i32]).collect();
    let mut state = step::initial_state((5 << 32) | 0xFFFF_FFFE, (0, 1)).unwrap();
    state[step::STATE_STEP] = 3; // carries into the high word
    let step_now = step::rng_step(&state);
    assert_eq!(step_now, (6 << 32) | 1);
    for remasking in [Remasking::LowConfidence, Remasking::Random] {
        let p = SelectParams {
            temperature: 0.9,
            remasking,
            seed: 42,
            step: step_now,
            dtype: DType::BF16,
            ..SelectParams::default()
        };
        let ignored = SelectParams {
            step: 1,
            ..p.clone()
        };
        for (name, want, got) in [
            (
                "gpu",
                run_select(&g, &logits, &keys, r, v, &p),
                run_select_at(&g, &logits, &keys, (r, v), &ignored, &state),
            ),
            (
                "cpu",
                run_select(&c0, &logits, &keys, r, v, &p),
                run_select_at(&c0, &logits, &keys, (r, v), &ignored, &state),
            ),
        ] {
            assert_eq!(want.0, got.0, "{name} {remasking:?}: tokens differ");
            let bits = |x: &[f32]| x.iter().map(|c| c.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&want.1),
                bits(&got.1),
                "{name} {remasking:?}: confidences differ"
            );
        }
        let other = run_select(&g, &logits, &keys, r, v, &ignored);
        let now = run_select(&g, &logits, &keys, r, v, &p);
        assert_ne!(
            other, now,
            "{remasking:?}: the step changed nothing (weak case)"
        );
    }
}

/// [`run_select`] with the RNG step read from the step state `state`.
fn run_select_at<B: Backend>(
    b: &B,
    logits: &[f32],
    keys: &[i32],
    (r, v): (usize, usize),
    p: &SelectParams,
    state: &[i32],
) -> (Vec<i32>, Vec<f32>) {
    let lrows = logits.len() / v;
    let mut l = act(b, logits, lrows, v);
    let (k, st) = (ints(b, keys), ints(b, state));
    let mut tok = ints(b, &vec![-7; r]);
    let mut conf = f32s(b, &vec![f32::NAN; r]);
    let io = SelectIo::new(&mut tok, &mut conf, &mut l, &k).at_step(&st);
    b.select(io, HeadDims { r, v }, p).unwrap();
    (
        b.read_ints(&tok, r).unwrap(),
        b.read_f32s(&conf, r).unwrap(),
    )
}

/// The host inputs of one RoPE + cache store: qkv, k_cache, v_cache, pos, cos, sin.
type RopeKvIo<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [i32],
    &'a [f32],
    &'a [f32],
);

/// `rope_kv_store` (`fused`) or `rope` then `kv_store` on `be`; returns (qkv, k_cache, v_cache).
fn run_rope_kv<B: Backend>(
    be: &B,
    fused: bool,
    (qkv, kc0, vc0, pos, cos, sin): RopeKvIo<'_>,
    q0: usize,
    s: CachedAttnShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, tq, l, nh, nkv, hd) = s.dims();
    let (w, kw) = ((nh + 2 * nkv) * hd, nkv * hd);
    let mut x = act(be, qkv, b * tq, w);
    let mut kc = act(be, kc0, b * l, kw);
    let mut vc = act(be, vc0, b * l, kw);
    let (p, cs, sn) = (ints(be, pos), f32s(be, cos), f32s(be, sin));
    if fused {
        be.rope_kv_store(
            &mut x,
            Kv::new(&mut kc, &mut vc),
            Rope::new(&p, &cs, &sn),
            CachedAttnShape { q0, ..s },
        )
        .unwrap();
    } else {
        be.rope(&mut x, Rope::new(&p, &cs, &sn), s.queries())
            .unwrap();
        be.kv_store(Kv::new(&mut kc, &mut vc), &x, CachedAttnShape { q0, ..s })
            .unwrap();
    }
    (
        be.read_act(&x, b * tq * w).unwrap(),
        be.read_act(&kc, b * l * kw).unwrap(),
        be.read_act(&vc, b * l * kw).unwrap(),
    )
}

/// `rope_kv_store` (one pass) against the CPU's default, `rope` then `kv_store`: the rotated
/// qkv and both caches bit-exact, at odd shapes, spans at the start, middle and end of the cache;
/// cache rows outside the span keep their (random) values.
#[test]
fn rope_kv_store_matches_rope_then_kv_store() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    for &(b, tq, l, q0, nh, nkv, hd) in &[
        (1usize, 1usize, 1usize, 0usize, 1usize, 1usize, 2usize),
        (2, 5, 13, 4, 3, 1, 10),
        (3, 7, 7, 0, 4, 2, 64),
        (2, 32, 97, 65, 8, 8, 128),
    ] {
        let s = cached_shape([b, tq, l, nh, nkv, hd]);
        let w = (nh + 2 * nkv) * hd;
        let kw = nkv * hd;
        let qkv = rand_vec(1200 + hd as u64, b * tq * w, 2.0);
        let kc0 = rand_vec(1300 + l as u64, b * l * kw, 1.0);
        let vc0 = rand_vec(1400 + l as u64, b * l * kw, 1.0);
        let (cos, sin) = rope_tables(10000.0, hd, l);
        let pos: Vec<i32> = (0..b).flat_map(|_| (q0 as i32)..(q0 + tq) as i32).collect();
        let io = (&qkv[..], &kc0[..], &vc0[..], &pos[..], &cos[..], &sin[..]);
        let want = run_rope_kv(&c, true, io, q0, s);
        if q0 + tq > 1 {
            assert_ne!(want.0, qkv, "RoPE changed nothing (weak case)");
        }
        for fused in [false, true] {
            let got = run_rope_kv(&g, fused, io, q0, s);
            let what = format!("rope_kv_store fused={fused} {s:?} q0={q0}");
            for (name, gv, wv) in [
                ("qkv", &got.0, &want.0),
                ("k_cache", &got.1, &want.1),
                ("v_cache", &got.2, &want.2),
            ] {
                if let Some(i) = (0..wv.len()).find(|&i| gv[i].to_bits() != wv[i].to_bits()) {
                    panic!("{what} {name}[{i}]: got {} want {}", gv[i], wv[i]);
                }
            }
        }
    }
}

/// A whole cached generation with the fused glue on the GPU (`LLADA_FUSED=1`) against the
/// unfused ops on the same GPU: identical in every decoding mode.
#[test]
fn fused_generation_equals_unfused() {
    let Some(g) = gpu() else { return };
    let Some(g2) = gpu() else { return };
    let plain = common::sharp_tiny(g);
    let mut fused = common::sharp_tiny(g2);
    fused.set_fused(true);
    let prompts = vec![vec![5, 17, 3, 9, 250, 12, 40], vec![31, 8, 77]];
    let base = common::gen_params(&plain.cfg, 12, 24, 8);
    let n = common::select::assert_runs_agree(
        (&plain, Select::Host),
        (&fused, Select::Device),
        &prompts,
        &base,
    );
    assert!(n > 0);
}

/// Weight upload: random/const generation on the device, f32/f16/bf16 mapped files converted on
/// upload, parts stacked by rows: all bit-exact against the CPU backend's view of the same sources.
#[test]
fn load_weight_matches_cpu() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    let (rows, cols) = (37usize, 96usize);
    let vals = rand_vec(400, rows * cols, 3.0);
    // A "safetensors-like" file: the same values as f32, f16 and bf16 at odd offsets.
    let mut bytes = vec![0u8; 6];
    let mut mapped = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let start = bytes.len();
        for &v in &vals {
            match dt {
                DType::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
                DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        mapped.push((dt, start, bytes.len()));
        bytes.push(0);
    }
    let path = std::env::temp_dir().join(format!("llada-cuda-parity-{}.bin", std::process::id()));
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: the file is private to this test and not modified while mapped.
    let mmap = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
    let mut sources = Vec::new();
    for (dt, start, end) in mapped {
        sources.push(WeightSource::Mapped {
            mmap: mmap.clone(),
            start,
            end,
            dtype: dt,
            shape: vec![rows, cols],
            name: format!("mapped_{dt}"),
        });
    }
    for dt in [DType::BF16, DType::F32, DType::F16] {
        sources.push(WeightSource::Random {
            seed: 99,
            std: 0.02,
            dtype: dt,
            shape: vec![rows, cols],
            name: format!("random_{dt}"),
        });
    }
    sources.push(WeightSource::Const {
        value: 1.0 / 3.0,
        dtype: DType::F32,
        shape: vec![rows, cols],
        name: "const".into(),
    });
    for s in &sources {
        let one = std::slice::from_ref(s);
        exact(
            &format!("load_weight {}", s.name()),
            &run_load(&c0, one, rows, cols),
            &run_load(&g, one, rows, cols),
        );
    }
    // All stacked into one [rows·len, cols] weight.
    let total = rows * sources.len();
    exact(
        "load_weight stacked",
        &run_load(&c0, &sources, total, cols),
        &run_load(&g, &sources, total, cols),
    );
    // Mismatched columns: an error naming both tensors.
    let bad = [
        host("a", &[2, 8], vec![0.0; 16]),
        host("b", &[2, 9], vec![0.0; 18]),
    ];
    let e = err(g.load_weight(&bad));
    assert!(e.contains("`b`") && e.contains("`a`"), "{e}");
    drop(mmap);
    let _ = std::fs::remove_file(&path);
}

/// A captured graph replays the same launches: the result equals the eager one.
#[test]
fn graph_capture_replays_eagerly_computed_result() {
    let Some(g) = gpu() else { return };
    let (n, c) = (7, 4096);
    let x = rand_vec(500, n * c, 2.0);
    let d = rand_vec(501, n * c, 2.0);
    let w = rand_vec(502, c, 1.0);
    let (eager, _) = run_add_rms_norm(&g, &x, &d, &w, n, c);
    let wt = g.load_weight(&[host("norm", &[c], w)]).unwrap();
    let mut xa = act(&g, &x, n, c);
    let da = act(&g, &d, n, c);
    let mut out = poisoned(&g, n * c);
    g.synchronize().unwrap();
    let graph = g
        .capture(|b| b.add_rms_norm(&mut out, &mut xa, &da, &wt, Norm { n, c, eps: 1e-5 }))
        .unwrap();
    // Nothing ran during capture.
    assert!(
        g.read_act(&out, n * c).unwrap().iter().all(|v| v.is_nan()),
        "capture executed work"
    );
    let t = g.timer().unwrap();
    t.start().unwrap();
    g.replay(&graph).unwrap();
    let ms = t.stop_ms().unwrap();
    assert!(ms >= 0.0 && ms.is_finite(), "timer {ms}");
    exact("graph replay", &eager, &g.read_act(&out, n * c).unwrap());
    eprintln!(
        "{} ({:?}), driver {:?}, mem {:?}",
        g.device_name(),
        g.compute_capability().unwrap(),
        llada::backend::cuda::driver_version().unwrap(),
        g.mem_info().unwrap()
    );
}

#[test]
fn launchers_name_bad_arguments() {
    let Some(g) = gpu() else { return };
    let x = g.alloc_act(10).unwrap();
    let mut o = g.alloc_act(10).unwrap();
    let e = err(g.swiglu(&mut o, &x, Rows { n: 2, c: 5 }));
    assert!(e.contains("swiglu") && e.contains("gate_up"), "{e}");
    let p = SelectParams {
        dtype: DType::F32,
        ..Default::default()
    };
    let mut tok = g.alloc_ints(1).unwrap();
    let mut conf = g.alloc_f32s(1).unwrap();
    let keys = g.alloc_ints(2).unwrap();
    let mut l = g.alloc_act(10).unwrap();
    let e = err(g.select(
        SelectIo::new(&mut tok, &mut conf, &mut l, &keys),
        HeadDims { r: 1, v: 10 },
        &p,
    ));
    assert!(e.contains("bf16"), "{e}");
    let (cos, sin) = rope_tables(10000.0, 64, 4);
    let (cb, sb) = (f32s(&g, &cos), f32s(&g, &sin));
    let pos = ints(&g, &[4]);
    let mut q = g.alloc_act(3 * 64).unwrap();
    let e = err(g.rope(
        &mut q,
        Rope::new(&pos, &cb, &sb),
        AttnShape::new(1, 1, 1, 1, 64),
    ));
    assert!(e.contains("pos[0] = 4"), "{e}");
}

/// An int buffer carries the values the host wrote, which the launchers check, until a kernel
/// writes it: from then on its values are unknown on the host (not checked) until the host
/// writes it again.
#[test]
fn int_buffers_carry_the_host_values() {
    let Some(g) = gpu() else { return };
    let mut rows = g.alloc_ints(3).unwrap();
    assert_eq!(rows.host(), None, "a fresh buffer's values are unknown");
    g.write_ints(&mut rows, &[0, 1, 2]).unwrap();
    g.write_ints(&mut rows, &[2]).unwrap();
    assert_eq!(
        rows.host(),
        Some(&[2, 1, 2][..]),
        "a shorter write keeps the tail"
    );
    let x = g.alloc_act(2 * 4).unwrap();
    let mut out = g.alloc_act(3 * 4).unwrap();
    let e = err(g.gather_rows(&mut out, &x, Gather::new(&rows, 3, 4)));
    assert!(
        e.contains("gather_rows: rows[0] = 2 is outside the rows of `x` (0..2)"),
        "{e}"
    );
    let e = err(g.gather_rows(&mut out, &x, Gather::new(&rows, 4, 1)));
    assert!(
        e.contains("`rows` holds 3 elements, needs at least 4"),
        "{e}"
    );
    // top-k writes the buffer: [2, 0, 1] on the device, unknown on the host.
    let (conf, k) = (f32s(&g, &[0.5, 0.25, 1.0]), ints(&g, &[3]));
    g.topk_select(&mut rows, &conf, &k, Rows { n: 1, c: 3 })
        .unwrap();
    assert_eq!(
        rows.host(),
        None,
        "a kernel-written buffer's values are unknown"
    );
    assert_eq!(g.read_ints(&rows, 3).unwrap(), vec![2, 0, 1]);
    g.write_ints(&mut rows, &[1]).unwrap();
    assert_eq!(
        rows.host(),
        Some(&[1][..]),
        "only what the host wrote since is known"
    );
    g.gather_rows(&mut out, &x, Gather::new(&rows, 1, 4))
        .unwrap();
    g.synchronize().unwrap();
}

// ---------------------------------------------------------------------------------------------
// log_prob (kernels/log_prob.cu) against the CPU reference (backend::cpu::log_prob_one).

fn run_log_prob<B: Backend>(
    b: &B,
    logits: &[f32],
    targets: &[i32],
    r: usize,
    v: usize,
    cfg_scale: f64,
) -> (Vec<f32>, Vec<f32>) {
    let lrows = logits.len() / v;
    let l = act(b, logits, lrows, v);
    let t = ints(b, targets);
    let mut out = f32s(b, &vec![f32::NAN; r]);
    b.log_prob(&mut out, &l, &t, LogProb { r, v, cfg_scale })
        .unwrap();
    (
        b.read_f32s(&out, r).unwrap(),
        b.read_act(&l, lrows * v).unwrap(),
    )
}

/// Tolerance: both compute `(l_t − m) − ln Σ exp(l − m)` in f32 from identical (CFG-mixed,
/// bit-exact) logits; the sums differ in order (sequential vs tree: each within (V + log2 V)·2⁻²⁴
/// relative of the exact sum) and in `exp`/`ln` (≤ 2 f32 ulps each), so before the final bf16
/// rounding the results differ by at most δ = (V + 40)·2⁻²⁴·(1 + |out|); the two bf16 roundings
/// then add one bf16 ulp: **|Δ| ≤ ulp(out) + δ**. Special rows (a NaN, all −∞) are exact, and
/// the kernel must not modify the logits.
#[test]
fn log_prob_matches_cpu_reference() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    // (R, V) up to LLaDA's vocabulary, each at three CFG scales.
    let sizes = [(1usize, 64usize), (7, 1000), (33, 4099), (5, 126464)];
    let cases = sizes
        .iter()
        .flat_map(|&(r, v)| [0.0, 0.5, 2.0].map(|c| LogProb::new(r, v, c)));
    for (case, s) in (1u64..).zip(cases) {
        let (LogProb { r, v, cfg_scale }, lrows) = (s, s.logit_rows());
        let mut logits = rand_vec(900 + case, lrows * v, 8.0);
        let mut targets: Vec<i32> = (0..r).map(|i| ((i * 7919 + 13) % v) as i32).collect();
        // Row 0's target is its (conditional) argmax: log p near 0, the cancellation case.
        let best = (0..v)
            .max_by(|&a, &b| logits[a].partial_cmp(&logits[b]).unwrap())
            .unwrap();
        targets[0] = best as i32;
        if r > 2 {
            logits[v + 3] = f32::NAN; // row 1 → NaN
            for x in &mut logits[2 * v..3 * v] {
                *x = f32::NEG_INFINITY; // row 2 → −∞ (conditional half)
            }
            if cfg_scale > 0.0 {
                for x in &mut logits[(r + 2) * v..(r + 3) * v] {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let (oc, lc) = run_log_prob(&c0, &logits, &targets, r, v, cfg_scale);
        let (og, lg) = run_log_prob(&g, &logits, &targets, r, v, cfg_scale);
        let what = format!("log_prob r={r} v={v} cfg={cfg_scale}");
        exact(&format!("{what}: logits unmodified"), &lc, &lg);
        if r > 2 {
            assert!(oc[1].is_nan() && og[1].is_nan(), "{what}: NaN row");
            // All −∞: log p = −∞; with CFG the mix computes −∞ − (−∞) = NaN (as PyTorch).
            if cfg_scale > 0.0 {
                assert!(
                    oc[2].is_nan() && og[2].is_nan(),
                    "{what}: −∞ row under CFG: cpu {} gpu {}",
                    oc[2],
                    og[2]
                );
            } else {
                assert!(
                    oc[2] == f32::NEG_INFINITY && og[2] == f32::NEG_INFINITY,
                    "{what}: −∞ row: cpu {} gpu {}",
                    oc[2],
                    og[2]
                );
            }
        }
        let d = (v as f32 + 40.0) * 2f32.powi(-24);
        compare(&what, &oc, &og, |_, c, gv| {
            ulp_bf16(c.abs().max(gv.abs())) + d * (1.0 + c.abs())
        });
        // The CPU reference itself against an f64 log-softmax (no CFG, ordinary rows).
        if cfg_scale == 0.0 {
            for i in (0..r).filter(|&i| r <= 2 || i == 0 || i > 2) {
                let row = &logits[i * v..(i + 1) * v];
                let m = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
                let z: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
                let want = row[targets[i] as usize] as f64 - m - z.ln();
                let tol = ulp_bf16(want as f32) as f64 + d as f64 * (1.0 + want.abs());
                assert!(
                    (oc[i] as f64 - want).abs() <= tol,
                    "{what} row {i}: cpu {} vs f64 {want}",
                    oc[i]
                );
            }
        }
    }
    // The launcher names a bad target.
    let l = g.alloc_act(2 * 10).unwrap();
    let t = ints(&g, &[3, 10]);
    let mut o = g.alloc_f32s(2).unwrap();
    let e = err(g.log_prob(&mut o, &l, &t, LogProb::new(2, 10, 0.0)));
    assert!(
        e.contains("log_prob") && e.contains("targets[1] = 10"),
        "{e}"
    );
    let e = err(g.log_prob(&mut o, &l, &t, LogProb::new(2, 10, 1.0)));
    assert!(e.contains("logits"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs in the model: generation with graphs equals generation without, bit for bit.

use llada::engine::fast::{generate_fast, CacheMode, Decode};
use llada::engine::predictor::ModelPredictor;
use llada::engine::sampler::{
    generate, GenerateParams, PredictRequest, Predictor, SpanPredictor, SpanRequest,
};

/// Records every (token, confidence) the wrapped predictor returns.
struct Recording<'m, B: Backend> {
    inner: ModelPredictor<'m, B>,
    seen: Vec<(u32, u32)>,
}

impl<B: Backend> Predictor for Recording<'_, B> {
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> anyhow::Result<()> {
        self.inner.predict(req, out)?;
        self.seen.extend(out.iter().map(|&(t, c)| (t, c.to_bits())));
        Ok(())
    }
}

impl<B: Backend> SpanPredictor for Recording<'_, B> {
    fn predict_span(
        &mut self,
        req: &SpanRequest<'_>,
        out: &mut [(u32, f32)],
    ) -> anyhow::Result<()> {
        self.inner.predict_span(req, out)?;
        self.seen.extend(out.iter().map(|&(t, c)| (t, c.to_bits())));
        Ok(())
    }
}

/// Uncached (`generate`) and Fast-dLLM dual / prefix cache (`generate_fast`) generation on the
/// tiny preset, once with graphs and once without: every (token, confidence) of every step is
/// identical (the graph replays the same kernels with the same arguments), and the graph run
/// really captured and replayed graphs. Prompt 200 + 64 generated = 264 keys: attention takes
/// the split-KV path too.
#[test]
fn generation_with_graphs_equals_without() {
    let Some(g) = gpu() else { return };
    let m = common::tiny_model(g, 7);
    let cfg = m.cfg.clone();
    let prompts: Vec<Vec<u32>> = (0..2u64)
        .map(|r| {
            (0..200u64)
                .map(|i| (rng::mix64(i ^ (r << 40)) % 400) as u32)
                .collect()
        })
        .collect();
    let p = GenerateParams {
        temperature: 0.0,
        seed: 5,
        ..common::gen_params(&cfg, 16, 64, 16)
    };
    for mode in ["none", "dual", "prefix"] {
        let run = |graphs: bool| {
            let mut inner = ModelPredictor::new(&m);
            inner.set_graphs(graphs);
            let mut rec = Recording {
                inner,
                seen: Vec::new(),
            };
            let out = if mode == "none" {
                generate(&mut rec, &prompts, &p, None).unwrap()
            } else {
                let d = Decode {
                    cache: mode.parse::<CacheMode>().unwrap(),
                    ..Decode::default()
                };
                generate_fast(&mut rec, &prompts, &p, &d, None).unwrap()
            };
            (out.ids, rec.seen, rec.inner.graph_stats())
        };
        let (ids_eager, seen_eager, stats_eager) = run(false);
        let (ids_graph, seen_graph, stats_graph) = run(true);
        eprintln!("{mode}: graphs (captured, replays) = {stats_graph:?}");
        assert_eq!(stats_eager, (0, 0), "{mode}: graphs used while disabled");
        assert!(
            stats_graph.0 > 0 && stats_graph.1 > stats_graph.0,
            "{mode}: graphs were not captured and replayed: {stats_graph:?}"
        );
        assert_eq!(ids_eager, ids_graph, "{mode}: generated ids differ");
        assert_eq!(
            seen_eager.len(),
            seen_graph.len(),
            "{mode}: step counts differ"
        );
        if let Some(i) = seen_eager.iter().zip(&seen_graph).position(|(a, b)| a != b) {
            panic!(
                "{mode}: prediction {i} differs: eager {:?} graph {:?}",
                seen_eager[i], seen_graph[i]
            );
        }
    }
}

/// A workspace reused after its KV cache is replaced never replays a graph captured on the old
/// cache: the cached step with a new cache equals an eager run on that cache.
#[test]
fn graphs_follow_a_replaced_kv_cache() {
    let Some(g) = gpu() else { return };
    let m = common::tiny_model(g, 7);
    let (b, l, q0, q1) = (1usize, 48usize, 16usize, 32usize);
    let x: Vec<u32> = (0..l as u64)
        .map(|i| (rng::mix64(i) % 400) as u32)
        .collect();
    let span: Vec<u32> = x[q0..q1].to_vec();
    let rows: Vec<u32> = (0..(q1 - q0) as u32).collect();
    let logits = |graphs: bool, fresh_cache_each_time: bool| -> Vec<f32> {
        let mut ws = m.workspace(b * l, b * l).unwrap();
        ws.set_graphs(graphs);
        let all: Vec<u32> = (0..l as u32).collect();
        let mut cache = m.kv_cache(b * l).unwrap();
        let mut last = Vec::new();
        for _ in 0..3 {
            if fresh_cache_each_time {
                cache = m.kv_cache(b * l).unwrap();
            }
            let (full, part) = (Span::new(b, l, 0, l), Span::new(b, l, q0, q1));
            m.forward_span(&mut ws, &mut cache, Tokens::new(&x, None, &all), full)
                .unwrap();
            // The span twice: the second pass replays what the first captured.
            for _ in 0..2 {
                let t = Tokens::new(&span, None, &rows);
                m.forward_span(&mut ws, &mut cache, t, part).unwrap();
            }
            last = m.logits(&ws, rows.len()).unwrap();
        }
        last
    };
    let eager = logits(false, false);
    for fresh in [false, true] {
        let got = logits(true, fresh);
        exact(
            &format!("graph span logits (fresh cache {fresh})"),
            &eager,
            &got,
        );
    }
}

/// Device-event profiling: a profiled generation charges time to every class the forward runs,
/// no more in total than the wall time, and gives the same tokens as an unprofiled one.
#[test]
fn cuda_profiling_breakdown() {
    let Some(g) = gpu() else { return };
    let m = common::tiny_model(g, 7);
    let cfg = m.cfg.clone();
    let prompts = vec![(0..40u32).map(|i| i * 13 % 400).collect::<Vec<_>>()];
    let p = common::gen_params(&cfg, 8, 16, 8);
    let plain = generate(&mut ModelPredictor::new(&m), &prompts, &p, None).unwrap();
    m.backend.prof_enable(true);
    let t0 = std::time::Instant::now();
    let profiled = generate(&mut ModelPredictor::new(&m), &prompts, &p, None).unwrap();
    m.backend.synchronize().unwrap();
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let prof = m.backend.prof_take().unwrap();
    m.backend.prof_enable(false);
    assert_eq!(plain.ids, profiled.ids);
    let sum: f64 = prof.iter().map(|(_, ms)| ms).sum();
    eprintln!("profile: wall {wall:.3} ms, sum {sum:.3} ms: {prof:?}");
    for c in llada::backend::OpClass::ALL {
        assert!(
            prof.iter().any(|(k, _)| *k == c),
            "class {c} missing from {prof:?}"
        );
    }
    assert!(
        sum > 0.0 && sum <= wall * 1.01 + 0.5,
        "sum {sum} ms, wall {wall} ms"
    );
}

// ---------------------------------------------------------------------------------------------
// FA2-class attention (`attention_fa2_*`, selected by LLADA_ATTN=fa2), called explicitly here
// through `set_attention_impl`, and the row-grouping branches of today's split-KV path.
//
// Tolerance against the CPU: the flash bound above (P rounded to bf16, online rescaling) plus
// the chunk merge: at most 4 key chunks, each merge rounds O·a, O_c·b and their sum in f32 (L
// likewise), a relative error ≤ 3·2^-24 per merge on the Σ_j (p_j/Σp)·|v_j| scale, so
// **|Δ| ≤ ulp(o) + (2·2^-8 + 16·2^-24)·Σ_j (p_j/Σp)·|v_j|**. Split (chunks in separate blocks,
// then the combine kernel) and unsplit launches run the same merge in the same order and must
// agree **bit for bit**, as must cached rows and the full pass's rows (32- vs 64-row tiles).

use llada::backend::cuda::{AttnImpl, CudaBackend, Fa2Split};

fn fa2_tol(mag: &[f32]) -> impl Fn(usize, f32, f32) -> f32 + '_ {
    move |i, c, g| {
        ulp_bf16(c.abs().max(g.abs())) + (2.0 * 2f32.powi(-8) + 16.0 * 2f32.powi(-24)) * mag[i]
    }
}

/// `f` with the attention kernels `i` selected on `g` (restored afterwards).
fn with_attn<R>(g: &CudaBackend, i: AttnImpl, f: impl FnOnce(&CudaBackend) -> R) -> R {
    let prev = g.attention_impl();
    g.set_attention_impl(i);
    let r = f(g);
    g.set_attention_impl(prev);
    r
}

/// Padding masks: batch row 0 right-padded (its last `l/7 + 1` keys), batch row 1
/// left-padded (its first `l/5` keys) with every 5th key also masked, further rows fully masked
/// (their outputs are zeros).
fn padding_mask(b: usize, l: usize) -> Vec<i32> {
    (0..b * l)
        .map(|j| {
            let (bi, k) = (j / l, j % l);
            i32::from(match bi {
                0 => k + l / 7 + 1 < l || l == 1,
                1 => k >= l / 5 && k % 5 != 3,
                _ => false,
            })
        })
        .collect()
}

const FA2_MODES: [Fa2Split; 3] = [Fa2Split::Never, Fa2Split::Always, Fa2Split::Auto];

#[test]
fn fa2_attention_matches_within_bound() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    // One tile, partial tiles, one chunk, several chunks (T not a multiple of 64), a batch row
    // fully masked (b = 3).
    let shapes = [&DENSE_SHAPES[..], &[(3, 70), (2, 130), (2, 385)]].concat();
    attention_cases(9000, &shapes, padding_mask, |c| {
        let want = run_attention(&c0, &c.qkv, c.kv, c.s);
        let mag = attention_magnitude(&c.qkv, c.kv, c.s);
        let what = format!("fa2 {}", c.what);
        let outs: Vec<Vec<f32>> = FA2_MODES
            .iter()
            .map(|&m| {
                with_attn(&g, AttnImpl::Fa2(m), |g| {
                    run_attention(g, &c.qkv, c.kv, c.s)
                })
            })
            .collect();
        compare(&what, &want, &outs[0], fa2_tol(&mag));
        exact(&format!("{what}: split vs unsplit"), &outs[0], &outs[1]);
        exact(&format!("{what}: auto vs unsplit"), &outs[0], &outs[2]);
    });
    // L = 1024 (4 chunks), B = 2, padding: one larger case per head dim.
    for &hd in &[64usize, 128] {
        let s = AttnShape::new(2, 1024, 4, 2, hd);
        let qkv = rand_vec(9500 + hd as u64, 2 * 1024 * 8 * hd, 2.0);
        let kv = padding_mask(2, 1024);
        let want = run_attention(&c0, &qkv, Some(&kv), s);
        let mag = attention_magnitude(&qkv, Some(&kv), s);
        let never = with_attn(&g, AttnImpl::Fa2(Fa2Split::Never), |g| {
            run_attention(g, &qkv, Some(&kv), s)
        });
        let always = with_attn(&g, AttnImpl::Fa2(Fa2Split::Always), |g| {
            run_attention(g, &qkv, Some(&kv), s)
        });
        let what = format!("fa2 b=2 t=1024 hd={hd} padded");
        compare(&what, &want, &never, fa2_tol(&mag));
        exact(&format!("{what}: split vs unsplit"), &never, &always);
    }
    // Unsupported head dim: the same clear error as the default kernels.
    with_attn(
        &g,
        AttnImpl::Fa2(Fa2Split::Auto),
        assert_rejects_head_dim_96,
    );
}

/// The cached shape of `[b, tq, l, nh, nkv, hd]`.
fn cached_shape([b, tq, l, nh, nkv, hd]: [usize; 6]) -> CachedAttnShape {
    CachedAttnShape {
        b,
        tq,
        l,
        q0: 0,
        nh,
        nkv,
        hd,
    }
}

/// The cached shape (b, tq, l, nh, nkv, hd) and the dense shape of the full pass over its l keys.
fn cached_and_dense(dims: [usize; 6]) -> (CachedAttnShape, AttnShape) {
    let [b, _, l, nh, nkv, hd] = dims;
    let s = cached_shape(dims);
    (s, AttnShape::new(b, l, nh, nkv, hd))
}

/// Cached attention with the FA2 kernels: CPU vs GPU within the bound; every split policy gives
/// the same bits; the cached rows equal the full pass's rows bit for bit (the dual-cache step's
/// 32 queries take 32-row tiles and usually the split path, the full pass 64-row tiles unsplit).
#[test]
fn fa2_cached_matches_and_rows_are_independent() {
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    // (b, l, tq), queries from q0 = (l − tq) / 2: dual-cache blocks (TQ = 32), TQ = 200 / 400 at
    // L = 1024, odd sizes; each at HD 64 and 128.
    let cases = [
        (2, 1024, 32),
        (2, 1024, 200),
        (1, 1024, 400),
        (1, 385, 32),
        (2, 200, 61),
        (1, 7, 1),
    ];
    for (i, (b, l, tq)) in cases.into_iter().enumerate() {
        for hd in [64, 128] {
            let q0 = (l - tq) / 2;
            let tag = 9700 + (i * 1000 + hd) as u64;
            let (s, dense) = cached_and_dense([b, tq, l, 8, 2, hd]);
            let full = rand_vec(tag, b * l * 12 * hd, 2.0);
            let kv = padding_mask(b, l);
            let kv = Some(kv.as_slice());
            let (_, _, want) = run_cached(&c0, &full, kv, s, q0);
            let mag = attention_magnitude_rows(&full, kv, dense, q0, tq);
            let what = format!("fa2 cached b={b} l={l} q0={q0} tq={tq} hd={hd}");
            let outs: Vec<Vec<f32>> = FA2_MODES
                .iter()
                .map(|&m| with_attn(&g, AttnImpl::Fa2(m), |g| run_cached(g, &full, kv, s, q0).2))
                .collect();
            compare(&what, &want, &outs[0], fa2_tol(&mag));
            exact(&format!("{what}: split vs unsplit"), &outs[0], &outs[1]);
            exact(&format!("{what}: auto vs unsplit"), &outs[0], &outs[2]);
            let full_rows = with_attn(&g, AttnImpl::Fa2(Fa2Split::Auto), |g| {
                run_attention(g, &full, kv, dense)
            });
            let want_rows = span_rows(&full_rows, b, l, 8 * hd, q0, tq);
            exact(
                &format!("{what}: cached vs full pass"),
                &want_rows,
                &outs[0],
            );
        }
    }
}

/// Today's split-KV path (`attention_split_bf16` + combine) when the partials exceed the
/// scratch: launched per group of batch rows (B = 2, TQ = 200 at L = 1024) or per group of query
/// rows (B = 1, TQ = 400). Results: within the flash bound of the CPU, and the cached rows equal
/// the full pass's rows bit for bit.
#[test]
fn split_path_row_groups_match() {
    use llada::backend::cuda::{ATTN_SCRATCH, ATTN_SPLIT_CHUNK};
    let Some(g) = gpu() else { return };
    let c0 = cpu();
    let (l, nh, nkv, hd) = (1024usize, 32usize, 8usize, 128usize);
    // Rows whose partials fit the scratch at once (attention_split's `cap_rows`).
    let cap_rows = ATTN_SCRATCH / (l.div_ceil(ATTN_SPLIT_CHUNK) * nh * (hd + 2));
    for (i, &(b, tq, q0)) in [(2usize, 200usize, 700usize), (1, 400, 300)]
        .iter()
        .enumerate()
    {
        // (2, 200): B·TQ > cap ≥ TQ → groups of batch rows; (1, 400): TQ > cap → query rows.
        assert!(
            b * tq > cap_rows,
            "b={b} tq={tq} fits the scratch ({cap_rows} rows)"
        );
        assert_eq!(tq <= cap_rows, b > 1, "b={b} tq={tq} cap={cap_rows}");
        let (s, dense) = cached_and_dense([b, tq, l, nh, nkv, hd]);
        let full = rand_vec(9900 + i as u64, b * l * (nh + 2 * nkv) * hd, 2.0);
        let kv = padding_mask(b, l);
        let kv = Some(kv.as_slice());
        let (_, _, want) = run_cached(&c0, &full, kv, s, q0);
        let mag = attention_magnitude_rows(&full, kv, dense, q0, tq);
        let (got, full_rows) = with_attn(&g, AttnImpl::Mma, |g| {
            (
                run_cached(g, &full, kv, s, q0).2,
                run_attention(g, &full, kv, dense),
            )
        });
        let what = format!("split-KV groups b={b} tq={tq} l={l}");
        compare(&what, &want, &got, |i, c, gv| {
            ulp_bf16(c.abs().max(gv.abs())) + 2.0 * 2f32.powi(-8) * mag[i]
        });
        let want_rows = span_rows(&full_rows, b, l, nh * hd, q0, tq);
        exact(&format!("{what}: cached vs full pass"), &want_rows, &got);
    }
}

// ---------------------------------------------------------------------------------------------
// LLADA_GEMM=lt: the bf16 inference GEMMs on cuBLASLt (per-shape algorithm cached once)

use llada::backend::cuda::lt::{GemmImpl, ShapeCache, ShapeKey, LT_SHAPES};

/// `f` with the bf16 GEMM library `i` selected on `g` (restored afterwards).
fn with_gemm<R>(g: &CudaBackend, i: GemmImpl, f: impl FnOnce(&CudaBackend) -> R) -> R {
    let prev = g.gemm_impl();
    g.set_gemm_impl(i).unwrap();
    let r = f(g);
    g.set_gemm_impl(prev).unwrap();
    r
}

/// `LLADA_GEMM` parsing: unset/empty/`cublas` is today's path, `lt` the new one, anything else an
/// error naming the variable.
#[test]
fn gemm_env_parses_and_names_the_variable() {
    assert_eq!(GemmImpl::parse(None).unwrap(), GemmImpl::Cublas);
    assert_eq!(GemmImpl::parse(Some("")).unwrap(), GemmImpl::Cublas);
    assert_eq!(GemmImpl::parse(Some("cublas")).unwrap(), GemmImpl::Cublas);
    assert_eq!(GemmImpl::parse(Some("lt")).unwrap(), GemmImpl::Lt);
    for bad in ["LT", "cublaslt", "1", " lt"] {
        let e = err(GemmImpl::parse(Some(bad)));
        assert!(e.contains("LLADA_GEMM") && e.contains(bad), "{e}");
    }
}

/// The shape cache: keys differ in every field, a hit finds its own value, the bound refuses a
/// further shape without growing (its storage is reserved up front, so inserts and lookups below
/// the bound never reallocate).
#[test]
fn gemm_shape_cache_is_keyed_and_bounded() {
    let key = |i: usize| ShapeKey {
        ta: i % 2 == 0,
        tb: i % 3 == 0,
        mnk: [i + 1, 7, 9],
        lds: [9, 9, i + 1],
        align: [256, 256, 256],
    };
    let mut c: ShapeCache<usize> = ShapeCache::new(LT_SHAPES);
    assert!(c.is_empty() && c.has_room());
    for i in 0..LT_SHAPES {
        assert!(c.get(&key(i)).is_none());
        assert!(c.insert(key(i), i));
    }
    for i in 0..LT_SHAPES {
        assert_eq!(c.get(&key(i)), Some(&i));
    }
    // Each field is part of the key.
    let k0 = key(0);
    let flips = [ShapeKey { ta: !k0.ta, ..k0 }, ShapeKey { tb: !k0.tb, ..k0 }];
    let sizes = [[2, 7, 9], [1, 8, 9], [1, 7, 10]].map(|mnk| ShapeKey { mnk, ..k0 });
    let lds = [[10, 9, 1], [9, 10, 1], [9, 9, 2]].map(|lds| ShapeKey { lds, ..k0 });
    let aligns =
        [[2, 256, 256], [256, 16, 256], [256, 256, 8]].map(|align| ShapeKey { align, ..k0 });
    for other in flips.into_iter().chain(sizes).chain(lds).chain(aligns) {
        assert!(c.get(&other).is_none(), "{other:?} found as {k0:?}");
    }
    assert!(!c.has_room());
    assert!(
        !c.insert(key(LT_SHAPES), 0),
        "a full cache took another shape"
    );
    assert_eq!(c.len(), LT_SHAPES);
    assert!(c.get(&key(LT_SHAPES)).is_none());
    // Alignment of a device address: its largest power-of-two divisor, capped at 256.
    for (a, want) in [
        (0u64, 256),
        (1 << 20, 256),
        (256 + 2, 2),
        (4096 + 48, 16),
        (0x7f00_0000_0206, 2),
    ] {
        assert_eq!(ShapeKey::align_of(a), want, "address {a:#x}");
    }
}

/// Tolerance of `LLADA_GEMM=lt` vs cuBLAS. Both multiply bf16 operands exactly in f32 (a bf16
/// product has 16 significand bits), accumulate in f32 (`CUBLAS_COMPUTE_32F`, no reduced-
/// precision reduction) and round once to bf16. Their f32 sums differ only in order: each is
/// within γ_k·Σ|x·w| (γ_k = k·2⁻²⁴) of the exact sum, so they are within 2γ_k·Σ|x·w| of each
/// other; rounding both to bf16 adds at most one bf16 ulp of the result. Where the orders agree
/// (the same kernel family) the results are bit-identical.
fn lt_tol(mag: &[f32], k: usize) -> impl Fn(usize, f32, f32) -> f32 + '_ {
    let gamma = 2.0 * k as f32 * 2f32.powi(-24);
    move |i, c, g| ulp_bf16(c.abs().max(g.abs())) + gamma * mag[i]
}

/// Random inputs of case `ci` of a matmul test (seeds `[x, w]`): `x[n, k]`, the stacked weight
/// parts `[rows, k]`, their total rows `m` and Σ|x·w| per output.
#[allow(clippy::type_complexity)]
fn matmul_inputs(
    [sx, sw]: [u64; 2],
    ci: u64,
    (n, k): (usize, usize),
    rows: &[usize],
) -> (Vec<f32>, Vec<(usize, Vec<f32>)>, usize, Vec<f32>) {
    let x = rand_vec(sx + ci, n * k, 2.0);
    let parts: Vec<(usize, Vec<f32>)> = rows
        .iter()
        .enumerate()
        .map(|(j, &r)| (r, rand_vec(sw + 10 * ci + j as u64, r * k, 0.5)))
        .collect();
    let w: Vec<f32> = parts.iter().flat_map(|p| p.1.clone()).collect();
    let mag = matmul_magnitude(&x, &w, n, k);
    (x, parts, w.len() / k, mag)
}

/// Σ|x·w| per output of `x[n, k] · w[m, k]ᵀ`.
fn matmul_magnitude(x: &[f32], w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let m = w.len() / k;
    let mut mag = vec![0f32; n * m];
    for i in 0..n {
        for j in 0..m {
            mag[i * m + j] = (0..k).map(|t| (x[i * k + t] * w[j * k + t]).abs()).sum();
        }
    }
    mag
}

/// Odd shapes and the `tiny` model's GEMMs (C 128, F 320, V 512): q|k|v, o, gate|up, down and
/// the LM head, each on cuBLASLt against cuBLAS on the same GPU; a repeated shape adds nothing to
/// the algorithm cache, and a shape first seen inside a graph capture runs on cuBLAS (no
/// heuristic call while capturing) and replays the eager result.
#[test]
fn gemm_lt_matches_cublas() {
    let Some(g) = gpu() else { return };
    let (c, f, v) = (128, 320, 512);
    // (n, k, row counts of the stacked parts)
    let cases: &[(usize, usize, &[usize])] = &[
        (1, 1, &[1]),
        (3, 7, &[5]),
        (13, 37, &[19]),
        (33, 129, &[65, 3]),
        (7, c, &[c, c, c]), // q|k|v
        (7, c, &[c]),       // o
        (7, c, &[f, f]),    // gate|up
        (7, f, &[c]),       // down
        (7, c, &[v]),       // LM head
        (130, c, &[c, c, c]),
        (130, f, &[c]),
    ];
    for (ci, &(n, k, parts)) in cases.iter().enumerate() {
        let (x, parts, m, mag) = matmul_inputs([900, 910], ci as u64, (n, k), parts);
        let a = with_gemm(&g, GemmImpl::Cublas, |g| run_matmul(g, &x, &parts, n, k));
        let b = with_gemm(&g, GemmImpl::Lt, |g| {
            let b = run_matmul(g, &x, &parts, n, k);
            assert_eq!(g.gemm_lt_shapes(), 1, "one shape, one cache entry");
            let again = run_matmul(g, &x, &parts, n, k);
            assert_eq!(g.gemm_lt_shapes(), 1, "a repeated shape was cached twice");
            exact("cuBLASLt repeat", &b, &again);
            b
        });
        compare(
            &format!("gemm lt n={n} k={k} m={m}"),
            &a,
            &b,
            lt_tol(&mag, k),
        );
    }
    // A shape first seen during capture: cuBLAS inside the graph, nothing cached.
    let (n, k, m) = (9, 40, 24);
    let x = rand_vec(990, n * k, 2.0);
    let wv = rand_vec(991, m * k, 0.5);
    let eager = with_gemm(&g, GemmImpl::Cublas, |g| {
        run_matmul(g, &x, &[(m, wv.clone())], n, k)
    });
    with_gemm(&g, GemmImpl::Lt, |g| {
        let w = g.load_weight(&[host("w", &[m, k], wv.clone())]).unwrap();
        let xa = act(g, &x, n, k);
        let mut out = poisoned(g, n * m);
        g.synchronize().unwrap();
        let graph = g
            .capture(|b| b.matmul(&mut out, &xa, &w, MatMul { n, k, m }))
            .unwrap();
        assert_eq!(g.gemm_lt_shapes(), 0, "the heuristic ran during capture");
        g.replay(&graph).unwrap();
        exact(
            "captured unseen shape",
            &eager,
            &g.read_act(&out, n * m).unwrap(),
        );
    });
}

/// The whole `tiny` forward with `LLADA_GEMM=lt` against cuBLAS on the same GPU. Each GEMM output
/// may differ by one bf16 ulp (see [`lt_tol`]) and such a tip propagates through the layers as in
/// `tests/cuda_model.rs`'s CPU/GPU bound (same derivation: ≤ 16 ulps of the logit scale).
#[test]
fn gemm_lt_model_logits_match_cublas() {
    let Some(g) = gpu() else { return };
    let m = common::tiny_model(g, 7);
    let (b, l) = (2, 37);
    let x: Vec<u32> = (0..b * l)
        .map(|i| (rng::mix64(i as u64 ^ 0x6c74) % 500) as u32)
        .collect();
    let rows: Vec<u32> = (0..(b * l) as u32).collect();
    let base = common::forward_logits(&m, &x, (b, l), None, &rows);
    m.backend.set_gemm_impl(GemmImpl::Lt).unwrap();
    let lt = common::forward_logits(&m, &x, (b, l), None, &rows);
    assert!(
        m.backend.gemm_lt_shapes() > 0,
        "LLADA_GEMM=lt ran no cuBLASLt GEMM"
    );
    m.backend.set_gemm_impl(GemmImpl::Cublas).unwrap();
    let scale = base.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(
        scale.is_finite() && scale > 0.0,
        "cuBLAS logits scale {scale}"
    );
    let tol = 16.0 * scale * 2f32.powi(-8);
    compare("tiny logits lt vs cublas", &base, &lt, |_, _, _| tol);
}
