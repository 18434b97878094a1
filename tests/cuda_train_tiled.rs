//! Parity of the opt-in tiled training kernels (`LLADA_TRAIN_KERNELS=tiled`,
//! `src/train/cuda/tiled.rs`) against the CPU reference ops of `llada::train::ops`.
//!
//! Every GPU test runs the default kernel AND the tiled kernel (one `CudaOps`, switched with
//! `set_train_kernels`) on the same inputs against the CPU reference, at odd sizes, on fresh
//! random inputs (seeded from the clock; the seed is printed, `LLADA_TEST_SEED=S` replays it),
//! and runs the tiled kernel twice: a step must be bit-reproducible, so the two runs must agree
//! bit for bit. Without a usable GPU the GPU tests print `SKIP: <why>` and pass
//! (`LLADA_REQUIRE_GPU=1` turns the skip into a failure).
//!
//! The CPU tests (always run) replay the launch plans (`row_chunks`, `ScatterPlan`) on the host
//! in the kernels' exact order of f32 operations and compare with the reference: what the
//! kernels claim bit-exact must be, the rest within the bound derived beside each check.
//!
//! Notation: u = 2^-24 (f32 unit roundoff). A sum of terms evaluated in any bracketing of k
//! additions is within (k − 1)·u·Σ|terms| (first order) of the exact sum; two orders of the same
//! f32 terms therefore differ by at most the sum of their two bounds.

#[path = "common/cmp.rs"]
mod cmp;
#[path = "common/probe.rs"]
mod probe;

use cmp::within;
use llada::rng;
use llada::train::backend::{AttnGrad, NormGrad, Qkv, QkvGrads, RowIds, TrainOps};
use llada::train::cuda::{row_chunks, CudaOps, ScatterPlan, TrainKernelImpl, SCATTER_PIECE_ROWS};
use llada::train::ops::{self, AttnShape, Rows};

const U: f64 = 1.0 / 16_777_216.0; // 2^-24
const KERNELS: [TrainKernelImpl; 2] = [TrainKernelImpl::Simple, TrainKernelImpl::Tiled];

/// The run's seed: `LLADA_TEST_SEED`, else the clock (printed either way).
fn seed() -> u64 {
    let s = std::env::var("LLADA_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {s} (LLADA_TEST_SEED={s} replays this run)");
    s
}

/// Uniform f32 in [-scale, scale) from stream `tag` of `seed`.
fn values(seed: u64, tag: u64, len: usize, scale: f32) -> Vec<f32> {
    let key = rng::cell_key(seed, 0x71ED, tag, 0, 0);
    let u = |i: usize| rng::uniform(rng::bits(key, i as u64)) as f32;
    (0..len).map(|i| scale * (2.0 * u(i) - 1.0)).collect()
}

/// Ids in [0, hi): with `heavy`, every second one is `hi − 1` (the mask token's share).
fn indices(seed: u64, tag: u64, len: usize, hi: usize, heavy: bool) -> Vec<u32> {
    let key = rng::cell_key(seed, 0x71EE, tag, 0, 0);
    let pick = |i: usize| (rng::uniform(rng::bits(key, i as u64)) * hi as f64) as usize;
    (0..len)
        .map(|i| match heavy && i % 2 == 1 {
            true => hi - 1,
            false => pick(i).min(hi - 1),
        } as u32)
        .collect()
}

fn bitwise(what: &str, a: &[f32], b: &[f32]) {
    let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "{what}: not bit-identical");
}

fn gpu() -> Option<CudaOps> {
    probe::device_or_skip(|| CudaOps::new(0))
}

/// Σ|terms| in f64 for the rows of `rows_of(j)` of column `j`: |dw0| + Σ |dy·x·r|.
fn dw_abs(dw0: &[f32], dy: &[f32], x: &[f32], r: &[f32], c: usize) -> Vec<f64> {
    (0..c)
        .map(|j| {
            (0..r.len()).fold(f64::from(dw0[j]).abs(), |s, i| {
                let e = i * c + j;
                s + (f64::from(dy[e]) * f64::from(x[e]) * f64::from(r[i])).abs()
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The switch

#[test]
fn switch_names() {
    let p = TrainKernelImpl::parse;
    assert_eq!(p("tiled").unwrap(), TrainKernelImpl::Tiled);
    assert_eq!(p(" simple ").unwrap(), TrainKernelImpl::Simple);
    assert_eq!(p("").unwrap(), TrainKernelImpl::Simple);
    assert_eq!(TrainKernelImpl::default(), TrainKernelImpl::Simple);
    let e = p("fast").unwrap_err();
    assert!(
        format!("{e:#}").contains("LLADA_TRAIN_KERNELS \"fast\""),
        "{e:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// RMSNorm's dw: chunked column sums

/// `rms_norm_bwd_dw_tiled_f32` + `rms_norm_bwd_dw_sum_f32` on the host, same f32 operations in
/// the same order (one pass when there is one chunk, as the launcher does).
fn dw_chunked(dw: &mut [f32], dy: &[f32], x: &[f32], r: &[f32], n: usize, c: usize) {
    let (rows, s) = row_chunks(n, c);
    let term = |i: usize, j: usize| dy[i * c + j] * x[i * c + j] * r[i];
    for (j, w) in dw.iter_mut().enumerate() {
        if s == 1 {
            *w = (0..n).fold(*w, |a, i| a + term(i, j));
            continue;
        }
        let part =
            |k: usize| (k * rows..n.min((k + 1) * rows)).fold(-0.0f32, |a, i| a + term(i, j));
        *w = (0..s).fold(*w, |a, k| a + part(k));
    }
}

const DW_SHAPES: [(usize, usize); 6] = [
    (1, 1),
    (3, 7),
    (37, 301),
    (1000, 77),
    (517, 4096),
    (33, 8191),
];

/// Tolerance of a reordered column sum: (2N + 2)·u·(|dw0| + Σ|terms|). A term that passes through
/// k additions carries ≤ k·u of itself: the CPU's sequential order ≤ N additions, the chunked one
/// ≤ rows + S, and rows·(S − 1) < N with S ≥ 2 gives rows + S ≤ N + 1 (S = 1 is the one-pass
/// kernel, the CPU's order); one u more covers the second-order terms.
fn dw_tol(n: usize, abs: &[f64]) -> impl Fn(usize) -> f64 + '_ {
    move |j| (2 * n + 2) as f64 * U * abs[j]
}

#[test]
fn rms_norm_dw_chunks_replayed_on_host() {
    let seed = seed();
    for (case, &(n, c)) in DW_SHAPES.iter().enumerate() {
        let (rows, s) = row_chunks(n, c);
        assert!(
            rows * s >= n && rows * (s - 1) < n,
            "{n}x{c}: chunks {rows}x{s}"
        );
        if c <= 256 && n >= 1000 {
            assert!(s > 1, "{n}x{c}: one chunk leaves the GPU idle");
        }
        let t = 10 * case as u64;
        let (x, dy, r) = (
            values(seed, t, n * c, 2.0),
            values(seed, t + 1, n * c, 1.0),
            values(seed, t + 2, n, 1.5),
        );
        let dw0 = values(seed, t + 3, c, 0.3);
        let (mut want, mut dx) = (dw0.clone(), vec![0f32; n * c]);
        let w = vec![1f32; c];
        ops::rms_norm_bwd(&mut dx, &mut want, &dy, &x, &r, &w, Rows { n, c });
        let mut got = dw0.clone();
        dw_chunked(&mut got, &dy, &x, &r, n, c);
        let abs = dw_abs(&dw0, &dy, &x, &r, c);
        within(
            &format!("host chunked dw {n}x{c}"),
            &want,
            &got,
            dw_tol(n, &abs),
        );
    }
}

#[test]
fn rms_norm_dw_tiled_gpu() {
    let Some(mut g) = gpu() else { return };
    let seed = seed();
    for (case, &(n, c)) in DW_SHAPES.iter().enumerate() {
        let t = 100 + 10 * case as u64;
        let (x, dy) = (values(seed, t, n * c, 2.0), values(seed, t + 1, n * c, 1.0));
        let (r, w, dw0) = (
            values(seed, t + 2, n, 1.5),
            values(seed, t + 3, c, 1.5),
            values(seed, t + 4, c, 0.3),
        );
        let (mut dx, mut want) = (vec![0f32; n * c], dw0.clone());
        ops::rms_norm_bwd(&mut dx, &mut want, &dy, &x, &r, &w, Rows { n, c });
        let abs = dw_abs(&dw0, &dy, &x, &r, c);
        let mut runs = Vec::new();
        for k in KERNELS {
            g.set_train_kernels(k).unwrap();
            for _ in 0..2 {
                let up = |v: &[f32]| g.upload(v).unwrap();
                let (dyd, xd, rd, wd) = (up(&dy), up(&x), up(&r), up(&w));
                let (mut dxd, mut dwd) = (up(&vec![f32::NAN; n * c]), up(&dw0));
                let a = NormGrad::new(&dyd, &xd, &rd, &wd, Rows { n, c });
                g.rms_norm_bwd(&mut dxd, Some(&mut dwd), a).unwrap();
                runs.push((
                    g.download(&dxd, n * c).unwrap(),
                    g.download(&dwd, c).unwrap(),
                ));
            }
        }
        let tag = format!("{n}x{c}");
        // The default kernel: the CPU's order, bit-exact; the tiled one within the bound.
        bitwise(&format!("rms_norm dw simple {tag}"), &want, &runs[0].1);
        bitwise(
            &format!("rms_norm dw simple rerun {tag}"),
            &runs[0].1,
            &runs[1].1,
        );
        within(
            &format!("rms_norm dw tiled {tag}"),
            &want,
            &runs[2].1,
            dw_tol(n, &abs),
        );
        bitwise(
            &format!("rms_norm dw tiled rerun {tag}"),
            &runs[2].1,
            &runs[3].1,
        );
        // dx comes from the same kernel either way.
        bitwise(&format!("rms_norm dx {tag}"), &runs[0].0, &runs[2].0);
    }
}

// ---------------------------------------------------------------------------------------------
// Row scatter-add and the embedding backward: segmented sums

/// The kernels of `kernels/scatter_rows.cuh` on the host, same f32 operations in the same order.
fn scatter_replayed(dst: &mut [f32], src: &[f32], plan: &ScatterPlan, n: usize, c: usize) {
    let (order, rest) = plan.ints.split_at(n);
    let (piece, fin) = rest.split_at(4 * plan.pieces);
    let mut part = vec![f32::NAN; plan.slots * c];
    for p in piece.chunks(4) {
        let [d, a, b, slot] = [p[0], p[1], p[2], p[3]];
        for j in 0..c {
            let at = |e: i32| src[order[e as usize] as usize * c + j];
            if slot < 0 {
                let o = &mut dst[d as usize * c + j];
                *o = (a..b).fold(*o, |s, e| s + at(e));
            } else {
                part[slot as usize * c + j] = (a..b).fold(-0.0f32, |s, e| s + at(e));
            }
        }
    }
    for f in fin.chunks(3) {
        for j in 0..c {
            let o = &mut dst[f[0] as usize * c + j];
            *o = (f[1]..f[2]).fold(*o, |s, k| s + part[k as usize * c + j]);
        }
    }
}

/// Per destination element: (how often the row is a destination, |dst0| + Σ|src terms|).
fn scatter_abs(dst0: &[f32], src: &[f32], dest: &[u32], c: usize) -> (Vec<usize>, Vec<f64>) {
    let mut count = vec![0usize; dst0.len() / c];
    let mut abs: Vec<f64> = dst0.iter().map(|&v| f64::from(v).abs()).collect();
    for (i, &d) in dest.iter().enumerate() {
        count[d as usize] += 1;
        for j in 0..c {
            abs[d as usize * c + j] += f64::from(src[i * c + j]).abs();
        }
    }
    (count, abs)
}

/// Rows repeated ≤ 64 times: bit-exact (one piece, the CPU's order). Longer: the CPU's order
/// within len·u·Σ, the pieces' within (rows + k)·u·Σ ≤ (len + 1)·u·Σ (k ≥ 2 pieces of ⌈len/k⌉
/// rows, as for the chunked dw above): (2·len + 2)·u·Σ.
fn scatter_check(
    what: &str,
    want: &[f32],
    got: &[f32],
    (count, abs): &(Vec<usize>, Vec<f64>),
    c: usize,
) {
    within(what, want, got, |e| {
        let len = count[e / c];
        if len <= SCATTER_PIECE_ROWS {
            0.0
        } else {
            (2 * len + 2) as f64 * U * abs[e]
        }
    });
}

/// (N source rows, V destination rows, C, the mask token's share of the ids).
const SCATTER_SHAPES: [(usize, usize, usize, bool); 6] = [
    (1, 1, 1, false),
    (9, 5, 7, false),
    (300, 3, 33, false),
    (513, 50, 129, true),
    (2049, 301, 65, true),
    (40_000, 11, 3, true),
];

#[test]
fn scatter_plans_replayed_on_host() {
    let seed = seed();
    for (case, &(n, v, c, heavy)) in SCATTER_SHAPES.iter().enumerate() {
        let t = 200 + 10 * case as u64;
        let ids = indices(seed, t, n, v, heavy);
        let plan = ScatterPlan::new(&ids).unwrap();
        // Each source row exactly once; pieces per destination bounded.
        let mut seen = plan.ints[..n].to_vec();
        seen.sort_unstable();
        assert!(
            seen.iter().enumerate().all(|(i, &s)| s == i as i32),
            "order is a permutation"
        );
        assert_eq!(plan.ints.len(), n + 4 * plan.pieces + 3 * plan.fins);
        let (src, dst0) = (
            values(seed, t + 1, n * c, 1.0),
            values(seed, t + 2, v * c, 1.0),
        );
        let mut want = dst0.clone();
        ops::embedding_bwd(&mut want, &src, &ids, c);
        let mut got = dst0.clone();
        scatter_replayed(&mut got, &src, &plan, n, c);
        let abs = scatter_abs(&dst0, &src, &ids, c);
        scatter_check(&format!("host scatter {n}x{v}x{c}"), &want, &got, &abs, c);
        if heavy && n >= 1000 {
            assert!(
                plan.fins >= 1 && plan.pieces > v,
                "{n}: the mask token is not split"
            );
        }
    }
    assert!(ScatterPlan::new(&[]).unwrap().ints.is_empty());
}

#[test]
fn scatter_and_embedding_bwd_tiled_gpu() {
    let Some(mut g) = gpu() else { return };
    let seed = seed();
    for (case, &(n, v, c, heavy)) in SCATTER_SHAPES.iter().enumerate() {
        let t = 300 + 10 * case as u64;
        let ids = indices(seed, t, n, v, heavy);
        let (src, dst0) = (
            values(seed, t + 1, n * c, 1.0),
            values(seed, t + 2, v * c, 1.0),
        );
        let mut want = dst0.clone();
        ops::embedding_bwd(&mut want, &src, &ids, c);
        let abs = scatter_abs(&dst0, &src, &ids, c);
        let idd = g.ints(&ids).unwrap();
        let tag = format!("{n}x{v}x{c}");
        for k in KERNELS {
            g.set_train_kernels(k).unwrap();
            let mut runs = Vec::new();
            for _ in 0..2 {
                let sd = g.upload(&src).unwrap();
                let (mut e, mut s) = (g.upload(&dst0).unwrap(), g.upload(&dst0).unwrap());
                g.embedding_bwd(&mut e, &sd, RowIds::new(&idd, Rows { n, c }))
                    .unwrap();
                g.scatter_add_rows(&mut s, &sd, RowIds::new(&idd, Rows { n, c }))
                    .unwrap();
                runs.push([
                    g.download(&e, v * c).unwrap(),
                    g.download(&s, v * c).unwrap(),
                ]);
            }
            for (op, i) in [("embedding_bwd", 0), ("scatter_add_rows", 1)] {
                let what = format!("{op} {k:?} {tag}");
                if k == TrainKernelImpl::Simple {
                    bitwise(&what, &want, &runs[0][i]);
                } else {
                    scatter_check(&what, &want, &runs[0][i], &abs, c);
                }
                bitwise(&format!("{what} rerun"), &runs[0][i], &runs[1][i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention: tiled forward (online softmax) and flash-style backward

/// (B, T, NH, NKV, HD): odd T across tile edges (32), GQA, odd head dims; HD = 160 is above the
/// tiled kernels' limit and must fall back to the default kernels.
const ATTN_SHAPES: [[usize; 5]; 8] = [
    [1, 1, 1, 1, 1],
    [1, 5, 2, 2, 6],
    [2, 33, 4, 2, 64],
    [1, 70, 2, 1, 128],
    [2, 17, 3, 3, 80],
    [1, 97, 4, 1, 37],
    [1, 130, 2, 2, 128],
    [1, 9, 2, 1, 160],
];

/// One problem and its exact (f64) per-score quantities, indexed ((b·NH + h)·T + i)·T + j.
struct Attn {
    d: AttnShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    /// Scaled scores q·k/√HD.
    s: Vec<f64>,
    /// Per-side bound on a computed score: (HD + 2)·u·Σ|q·k|/√HD.
    es: Vec<f64>,
    /// exp(s − max_j s): the softmax numerators of the forward.
    e: Vec<f64>,
}

impl Attn {
    fn new(seed: u64, tag: u64, d: AttnShape) -> Attn {
        let AttnShape { b, t, nh, nkv, hd } = d;
        let n = b * t;
        let q = values(seed, tag, n * nh * hd, 2.0); // wide scores: the running max moves
        let k = values(seed, tag + 1, n * nkv * hd, 1.0);
        let v = values(seed, tag + 2, n * nkv * hd, 1.0);
        let dout = values(seed, tag + 3, n * nh * hd, 1.0);
        let scale = 1.0 / (hd as f64).sqrt();
        let (mut s, mut es) = (vec![0f64; b * nh * t * t], vec![0f64; b * nh * t * t]);
        for (e, (sv, ev)) in s.iter_mut().zip(es.iter_mut()).enumerate() {
            let (j, i, h, bi) = (e % t, e / t % t, e / (t * t) % nh, e / (t * t * nh));
            let (qo, ko) = (
                (bi * t + i) * nh * hd + h * hd,
                (bi * t + j) * nkv * hd + h / (nh / nkv) * hd,
            );
            let pr = (0..hd).map(|c| f64::from(q[qo + c]) * f64::from(k[ko + c]));
            let (dot, abs) = pr.fold((0.0, 0.0), |(a, b), x| (a + x, b + x.abs()));
            (*sv, *ev) = (dot * scale, (hd as f64 + 2.0) * U * abs * scale);
        }
        let mut e = s.clone();
        for row in e.chunks_mut(t) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            row.iter_mut().for_each(|x| *x = (*x - m).exp());
        }
        Attn {
            d,
            q,
            k,
            v,
            dout,
            s,
            es,
            e,
        }
    }

    /// Score row (b, h, i) as a range of the per-score vectors.
    fn row(&self, bi: usize, h: usize, i: usize) -> std::ops::Range<usize> {
        let t = self.d.t;
        let e0 = ((bi * self.d.nh + h) * t + i) * t;
        e0..e0 + t
    }
}

/// Forward bounds, each side's summed. With ES = max_j es_j, nt ≤ T key tiles, x_j = max − s_j:
/// a weight exp(s_j − max) carries 2ES + 4u relative (the CPU), plus ≤ nt rescalings of 5u
/// (an expf of ≤ 2 ulp and a product) in the tiled kernel, plus u·x_j from rounding the
/// exponent's argument (the rescale arguments telescope to max − s_j). The normaliser l sums T
/// weights in ≤ T + nt roundings, o = Σ w·v / l likewise plus one division:
/// |Δo_c| ≤ (8ES + (4T + 24 + 12(nt + 1))u)·Σ p|v_c| + 4u·Σ p·x·(|v_c| + |o_c|) over both sides;
/// |Δlse| ≤ 2ES + (2T + 12 + 12nt)u + 2u·Σ p·x + 4u|lse| (logf and ln ≤ 1 ulp).
fn fwd_tols(a: &Attn, o: &[f32], lse: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let AttnShape { b, t, nh, nkv, hd } = a.d;
    let (tf, nt) = (t as f64, t as f64);
    let (mut to, mut tl) = (vec![0f64; o.len()], vec![0f64; lse.len()]);
    for (bi, h, i) in
        (0..b).flat_map(|bi| (0..nh).flat_map(move |h| (0..t).map(move |i| (bi, h, i))))
    {
        let r = a.row(bi, h, i);
        let es = a.es[r.clone()].iter().cloned().fold(0.0, f64::max);
        let smax = a.s[r.clone()]
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = a.e[r.clone()].iter().sum();
        let p = |j: usize| a.e[r.start + j] / sum;
        let x = |j: usize| smax - a.s[r.start + j];
        let row = bi * t + i;
        let hx: f64 = (0..t).map(|j| p(j) * x(j)).sum();
        tl[row * nh + h] = 2.0 * es
            + (2.0 * tf + 12.0 + 12.0 * nt) * U
            + 2.0 * U * hx
            + 4.0 * U * f64::from(lse[row * nh + h]).abs();
        for c in 0..hd {
            let oe = row * nh * hd + h * hd + c;
            let vj =
                |j: usize| f64::from(a.v[(bi * t + j) * nkv * hd + h / (nh / nkv) * hd + c]).abs();
            let m: f64 = (0..t).map(|j| p(j) * vj(j)).sum();
            let mx: f64 = (0..t)
                .map(|j| p(j) * x(j) * (vj(j) + f64::from(o[oe]).abs()))
                .sum();
            to[oe] = (8.0 * es + (4.0 * tf + 24.0 + 12.0 * (nt + 1.0)) * U) * m + 4.0 * U * mx;
        }
    }
    (to, tl)
}

/// Backward bounds from identical inputs (the CPU's o and lse), both sides summed. Per side:
/// P = exp(s − lse) carries ε_P = ES_j + 4u + u·(lse − s_j) relative (the last: the argument's
/// rounding); dP = dO·v within (HD + 2)u·Σ|dO||v|, δ = dO·O within (HD + 2)u·Σ|dO||O|;
/// dS = (P(dP − δ))·scale adds 3 roundings: |ΔdS| ≤ scale·P·(|dP − δ|(ε_P + 3u) + e_dP + e_δ).
/// dQ_i = Σ_j dS·k_j: Σ_j |ΔdS||k| + (T + 2)u·Σ_j |dS||k|; dK_j, dV_j likewise over the G·T
/// (head, query) pairs of the kv head, dV with ε_P. FMA chains (the tiled kernels) round no
/// more than the CPU's multiply-then-add, so the same bound holds for both.
fn bwd_tols(a: &Attn, o: &[f32], lse: &[f32]) -> [Vec<f64>; 3] {
    let AttnShape { b, t, nh, nkv, hd } = a.d;
    let (qw, kw, g) = (nh * hd, nkv * hd, nh / nkv);
    let scale = 1.0 / (hd as f64).sqrt();
    let dot = |x: &[f32], y: &[f32]| {
        x.iter().zip(y).fold((0f64, 0f64), |(s, sa), (&u, &w)| {
            let p = f64::from(u) * f64::from(w);
            (s + p, sa + p.abs())
        })
    };
    let len = b * nh * t * t;
    let (mut p, mut ep, mut ds, mut dds) = (
        vec![0f64; len],
        vec![0f64; len],
        vec![0f64; len],
        vec![0f64; len],
    );
    for e in 0..len {
        let (j, i, h, bi) = (e % t, e / t % t, e / (t * t) % nh, e / (t * t * nh));
        let (qo, ko) = ((bi * t + i) * qw + h * hd, (bi * t + j) * kw + h / g * hd);
        let l = f64::from(lse[(bi * t + i) * nh + h]);
        let (dl, dla) = dot(&a.dout[qo..qo + hd], &o[qo..qo + hd]);
        let (dp, dpa) = dot(&a.dout[qo..qo + hd], &a.v[ko..ko + hd]);
        p[e] = (a.s[e] - l).exp();
        ep[e] = a.es[e] + 4.0 * U + U * (l - a.s[e]).abs();
        ds[e] = p[e] * (dp - dl) * scale;
        dds[e] = scale
            * p[e]
            * ((dp - dl).abs() * (ep[e] + 3.0 * U) + (hd as f64 + 2.0) * U * (dpa + dla));
    }
    let at = |bi: usize, h: usize, i: usize, j: usize| ((bi * nh + h) * t + i) * t + j;
    let tq = (0..b * t * qw)
        .map(|e| {
            let (bi, i, h, c) = (e / qw / t, e / qw % t, e % qw / hd, e % hd);
            let kv = |j: usize| f64::from(a.k[(bi * t + j) * kw + h / g * hd + c]).abs();
            let s1: f64 = (0..t).map(|j| dds[at(bi, h, i, j)] * kv(j)).sum();
            let s2: f64 = (0..t).map(|j| ds[at(bi, h, i, j)].abs() * kv(j)).sum();
            2.0 * (s1 + (t as f64 + 2.0) * U * s2)
        })
        .collect();
    let tkv = |want_v: bool| -> Vec<f64> {
        (0..b * t * kw)
            .map(|e| {
                let (bi, j, kh, c) = (e / kw / t, e / kw % t, e % kw / hd, e % hd);
                let (mut s1, mut s2) = (0f64, 0f64);
                for (h, i) in (kh * g..(kh + 1) * g).flat_map(|h| (0..t).map(move |i| (h, i))) {
                    let (el, qo) = (at(bi, h, i, j), (bi * t + i) * qw + h * hd + c);
                    let (w, d, dd) = match want_v {
                        true => (f64::from(a.dout[qo]).abs(), p[el], p[el] * ep[el]),
                        false => (f64::from(a.q[qo]).abs(), ds[el].abs(), dds[el]),
                    };
                    s1 += dd * w;
                    s2 += d * w;
                }
                2.0 * (s1 + ((g * t) as f64 + 2.0) * U * s2)
            })
            .collect()
    };
    [tq, tkv(false), tkv(true)]
}

/// `attention_fwd_tiled_f32` on the host: the same tiles, online-softmax updates and FMA chains
/// (libm exp/ln for expf/logf: within the bound's 4u per call).
fn attention_fwd_replayed(o: &mut [f32], lse: &mut [f32], a: &Attn) {
    let AttnShape { b, t, nh, nkv, hd } = a.d;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    for (bi, h, i) in
        (0..b).flat_map(|bi| (0..nh).flat_map(move |h| (0..t).map(move |i| (bi, h, i))))
    {
        let row = bi * t + i;
        let qi = &a.q[row * nh * hd + h * hd..][..hd];
        let kv = |m: &[f32], j: usize| -> Vec<f32> {
            m[(bi * t + j) * nkv * hd + h / (nh / nkv) * hd..][..hd].to_vec()
        };
        let (mut mx, mut l, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; hd]);
        for k0 in (0..t).step_by(32) {
            let keys = k0..t.min(k0 + 32);
            let s: Vec<f32> = keys
                .clone()
                .map(|j| {
                    qi.iter()
                        .zip(kv(&a.k, j))
                        .fold(0f32, |c, (&x, y)| x.mul_add(y, c))
                        * scale
                })
                .collect();
            let mnew = s.iter().fold(mx, |m, &x| m.max(x));
            let alpha = (mx - mnew).exp();
            let p: Vec<f32> = s.iter().map(|&x| (x - mnew).exp()).collect();
            l = l * alpha + p.iter().fold(0f32, |c, &x| c + x);
            acc.iter_mut().for_each(|x| *x *= alpha);
            for (pj, j) in p.iter().zip(keys) {
                for (x, vv) in acc.iter_mut().zip(kv(&a.v, j)) {
                    *x = pj.mul_add(vv, *x);
                }
            }
            mx = mnew;
        }
        for (c, x) in acc.iter().enumerate() {
            o[row * nh * hd + h * hd + c] = x / l;
        }
        lse[row * nh + h] = mx + l.ln();
    }
}

fn attn_cpu(a: &Attn) -> (Vec<f32>, Vec<f32>) {
    let n = a.d.b * a.d.t;
    let (mut o, mut lse) = (vec![0f32; n * a.d.nh * a.d.hd], vec![0f32; n * a.d.nh]);
    ops::attention(&mut o, &mut lse, &a.q, &a.k, &a.v, a.d);
    (o, lse)
}

#[test]
fn attention_online_softmax_replayed_on_host() {
    let seed = seed();
    for (case, &[b, t, nh, nkv, hd]) in ATTN_SHAPES.iter().enumerate() {
        let a = Attn::new(
            seed,
            400 + 10 * case as u64,
            AttnShape { b, t, nh, nkv, hd },
        );
        let (o, lse) = attn_cpu(&a);
        let (mut go, mut gl) = (vec![f32::NAN; o.len()], vec![f32::NAN; lse.len()]);
        attention_fwd_replayed(&mut go, &mut gl, &a);
        let (to, tl) = fwd_tols(&a, &o, &lse);
        let tag = format!("{b}x{t}x{nh}/{nkv}x{hd}");
        within(&format!("host tiled attention o {tag}"), &o, &go, |e| to[e]);
        within(&format!("host tiled attention lse {tag}"), &lse, &gl, |e| {
            tl[e]
        });
    }
}

#[test]
fn attention_tiled_gpu() {
    let Some(mut g) = gpu() else { return };
    let seed = seed();
    for (case, &[b, t, nh, nkv, hd]) in ATTN_SHAPES.iter().enumerate() {
        let d = AttnShape { b, t, nh, nkv, hd };
        let a = Attn::new(seed, 500 + 10 * case as u64, d);
        let (o, lse) = attn_cpu(&a);
        let n = b * t;
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; n * nh * hd],
            vec![0f32; n * nkv * hd],
            vec![0f32; n * nkv * hd],
        );
        ops::attention_bwd(
            (&mut dq, &mut dk, &mut dv),
            (&a.dout, &o, &lse),
            (&a.q, &a.k, &a.v),
            d,
        );
        let (to, tl) = fwd_tols(&a, &o, &lse);
        let [tq, tk, tv] = bwd_tols(&a, &o, &lse);
        let tag = format!("{b}x{t}x{nh}/{nkv}x{hd}");
        for k in KERNELS {
            g.set_train_kernels(k).unwrap();
            let mut runs = Vec::new();
            for _ in 0..2 {
                let up = |x: &[f32]| g.upload(x).unwrap();
                let (qd, kd, vd) = (up(&a.q), up(&a.k), up(&a.v));
                let (mut od, mut ld) =
                    (up(&vec![f32::NAN; o.len()]), up(&vec![f32::NAN; lse.len()]));
                g.attention(&mut od, &mut ld, Qkv::new(&qd, &kd, &vd, d))
                    .unwrap();
                // The backward from the CPU's o and lse (identical inputs on both sides).
                let (oc, lc, dod) = (up(&o), up(&lse), up(&a.dout));
                let nan = |len: usize| up(&vec![f32::NAN; len]);
                let (mut dqd, mut dkd, mut dvd, mut dl) =
                    (nan(dq.len()), nan(dk.len()), nan(dv.len()), nan(n * nh));
                let grads = QkvGrads::new(&mut dqd, &mut dkd, &mut dvd, &mut dl);
                let saved = AttnGrad::new(&dod, Qkv::new(&qd, &kd, &vd, d), &oc, &lc);
                g.attention_bwd(grads, saved).unwrap();
                let down = |x: &llada::train::cuda::Buf, len: usize| g.download(x, len).unwrap();
                runs.push([
                    down(&od, o.len()),
                    down(&ld, lse.len()),
                    down(&dqd, dq.len()),
                    down(&dkd, dk.len()),
                    down(&dvd, dv.len()),
                ]);
            }
            let what = |x: &str| format!("attention {x} {k:?} {tag}");
            within(&what("o"), &o, &runs[0][0], |e| to[e]);
            within(&what("lse"), &lse, &runs[0][1], |e| tl[e]);
            within(&what("dq"), &dq, &runs[0][2], |e| tq[e]);
            within(&what("dk"), &dk, &runs[0][3], |e| tk[e]);
            within(&what("dv"), &dv, &runs[0][4], |e| tv[e]);
            for (x, y) in runs[0].iter().zip(&runs[1]) {
                bitwise(&what("rerun"), x, y);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A whole training pass with the tiled kernels

/// ‖a − b‖ / ‖a‖ in f64 (normwise: cancellations in single elements cannot inflate it).
fn normwise(a: &[f32], b: &[f32]) -> f64 {
    let sq = |it: &mut dyn Iterator<Item = f64>| it.map(|x| x * x).sum::<f64>().sqrt();
    let d = sq(&mut a.iter().zip(b).map(|(&x, &y)| f64::from(x) - f64::from(y)));
    d / sq(&mut a.iter().map(|&x| f64::from(x))).max(1e-300)
}

/// One forward/backward of the tiny preset (C 128, HD 64, V 512) at B 2 × T 160 (five key tiles,
/// the last partial; the mask token usually more than 64 times, so its rows are split) through
/// the tiled kernels, against the CPU. The same argument and bounds as tests/cuda_train.rs
/// `model_step_matches_cpu`: every op within a few f32 roundings per accumulated term of the CPU
/// (the tiled ones within their bounds above, the same order of magnitude), loss relative 1e-4,
/// gradients normwise 1e-3; a wrong term gives O(1). Twice: bit-identical loss and gradients.
#[test]
fn model_step_tiled_gpu() {
    use llada::train::model::{forward_backward, forward_backward_on, Params};
    let Some(mut g) = gpu() else { return };
    g.set_train_kernels(TrainKernelImpl::Tiled).unwrap();
    let seed = seed();
    let cfg = llada::hf::presets::preset_config("tiny").unwrap();
    let mut p = Params::<f32>::zeros(&cfg);
    for (i, d) in p.data.iter_mut().enumerate() {
        let r = values(seed, 600 + i as u64, d.len(), 0.1);
        let norm = p.shapes[i].len() == 1; // norm weights around 1
        *d = r.iter().map(|x| if norm { 1.0 + x } else { *x }).collect();
    }
    let (b, t) = (2, 160);
    let draw = llada::train::loss::Draw::new(cfg.mask_token_id, seed, 0, 1.0);
    let batch = llada::train::loss::pretrain_batch(
        &indices(seed, 690, b * t, 500, false),
        b,
        t,
        false,
        draw,
    )
    .unwrap();
    let mut grad = Params::<f32>::zeros(&cfg);
    let loss = forward_backward(&cfg, &p, &batch, &mut grad).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dp: Vec<_> = p.data.iter().map(|d| g.upload(d).unwrap()).collect();
        let mut dg: Vec<_> = grad
            .data
            .iter()
            .map(|d| g.zeros(d.len()).unwrap())
            .collect();
        let gl = forward_backward_on(&g, &cfg, &dp, &batch, &mut dg).unwrap();
        let gg: Vec<Vec<f32>> = dg
            .iter()
            .zip(&grad.data)
            .map(|(x, d)| g.download(x, d.len()).unwrap())
            .collect();
        runs.push((gl, gg));
    }
    eprintln!("tiny loss: cpu {loss} tiled {}", runs[0].0);
    assert!(
        (loss - runs[0].0).abs() <= 1e-4 * loss.abs(),
        "loss cpu {loss} tiled {}",
        runs[0].0
    );
    for (i, name) in grad.names.iter().enumerate() {
        let e = normwise(&grad.data[i], &runs[0].1[i]);
        eprintln!("grad `{name}`: relative error {e:.2e}");
        assert!(e <= 1e-3, "gradient of `{name}`: relative error {e:e}");
        bitwise(
            &format!("grad `{name}` rerun"),
            &runs[0].1[i],
            &runs[1].1[i],
        );
    }
    assert_eq!(
        runs[0].0.to_bits(),
        runs[1].0.to_bits(),
        "the tiled pass is deterministic"
    );
}
