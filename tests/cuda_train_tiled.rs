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

use llada::rng;
use llada::train::backend::TrainOps;
use llada::train::cuda::{row_chunks, CudaOps, ScatterPlan, TrainKernelImpl, SCATTER_PIECE_ROWS};
use llada::train::ops;

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

/// Every element within `tol(i)` of the reference (NaN anywhere fails); names the worst.
fn within(what: &str, want: &[f32], got: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    // abs_diff64 is +∞ on a NaN, so a NaN fails every tolerance.
    let ratio = |i: usize| match cmp::abs_diff64(got[i].into(), want[i].into()) {
        0.0 => 0.0,
        d => d / tol(i),
    };
    let mut worst = (0.0f64, 0usize);
    for i in 0..want.len() {
        if ratio(i) > worst.0 {
            worst = (ratio(i), i);
        }
    }
    eprintln!(
        "{what}: {} elements, worst |diff|/tol {:.3}",
        want.len(),
        worst.0
    );
    let i = worst.1;
    assert!(
        worst.0 <= 1.0,
        "{what}: element {i}: want {:e} got {:e} (tol {:e})",
        want.get(i).copied().unwrap_or(f32::NAN),
        got.get(i).copied().unwrap_or(f32::NAN),
        tol(i)
    );
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

/// Tolerance of a reordered column sum: (2N + 2)·u·(|dw0| + Σ|terms|) — the CPU's sequential
/// order within N·u·Σ, the chunked one within (rows + S)·u·Σ ≤ (N + 1)·u·Σ (rows, S ≤ N... and
/// one more for the second-order terms).
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
        ops::rms_norm_bwd(&mut dx, &mut want, &dy, &x, &r, &w, n, c);
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
        ops::rms_norm_bwd(&mut dx, &mut want, &dy, &x, &r, &w, n, c);
        let abs = dw_abs(&dw0, &dy, &x, &r, c);
        let mut runs = Vec::new();
        for k in KERNELS {
            g.set_train_kernels(k).unwrap();
            for _ in 0..2 {
                let up = |v: &[f32]| g.upload(v).unwrap();
                let (dyd, xd, rd, wd) = (up(&dy), up(&x), up(&r), up(&w));
                let (mut dxd, mut dwd) = (up(&vec![f32::NAN; n * c]), up(&dw0));
                g.rms_norm_bwd(&mut dxd, &mut dwd, &dyd, &xd, &rd, &wd, n, c)
                    .unwrap();
                runs.push((
                    g.download(&dxd, n * c).unwrap(),
                    g.download(&dwd, c).unwrap(),
                ));
            }
        }
        let tag = format!("{n}x{c}");
        // The default kernel: the CPU's order, bit-exact; the tiled one within the bound.
        bitwise(&format!("rms_norm dw simple {tag}"), &want, &runs[0].1);
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
/// within len·u·Σ, the pieces' within (rows + k)·u·Σ ≤ (len + 1)·u·Σ: (2·len + 2)·u·Σ.
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
                g.embedding_bwd(&mut e, &sd, &ids, c).unwrap();
                g.scatter_add_rows(&mut s, &sd, &idd, n, c).unwrap();
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
