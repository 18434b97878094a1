//! NaN-aware comparisons for the tests. `f32::max` drops NaN (`0f32.max(NaN) == 0`), so a
//! worst-difference fold built on it passes an all-NaN output; these helpers count a NaN or an
//! infinity where the reference is finite as an infinite difference, which fails every
//! tolerance. Equal non-finite values (a −∞ mask in both) count as no difference.
#![allow(dead_code)]

/// |got − want|, +∞ where they are not both finite and not bitwise-equal specials (a NaN where
/// the reference has none, a finite value where it has a mask).
/// (Computed in f64: the f64 difference of two f32 values rounds to the f32 difference.)
pub fn abs_diff(got: f32, want: f32) -> f32 {
    abs_diff64(got.into(), want.into()) as f32
}

/// The f64 version of [`abs_diff`].
pub fn abs_diff64(got: f64, want: f64) -> f64 {
    if got.is_finite() && want.is_finite() {
        (got - want).abs()
    } else if got == want {
        0.0
    } else {
        f64::INFINITY
    }
}

/// `got` within `rel` of `want`, relative to |want|; false on a NaN (see [`abs_diff64`]).
pub fn rel_close(got: f64, want: f64, rel: f64) -> bool {
    abs_diff64(got, want) <= rel * want.abs()
}

/// The larger of a running maximum and `x`; a NaN makes it +∞ (never drops out).
pub fn nan_max(m: f32, x: f32) -> f32 {
    if m.is_nan() || x.is_nan() {
        f32::INFINITY
    } else {
        m.max(x)
    }
}

/// The largest [`abs_diff`] of two slices; +∞ when their lengths differ.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    got.iter()
        .zip(want)
        .fold(0.0, |m, (&g, &w)| nan_max(m, abs_diff(g, w)))
}

/// The largest |x| of a reference (its scale for relative tolerances); +∞ if it holds a NaN,
/// so that a NaN reference cannot silently widen a tolerance to nothing either way: callers
/// assert the scale is finite.
pub fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |m, &v| nan_max(m, v.abs()))
}

/// Every element within `tol(i)` of the reference (NaN anywhere fails); names the worst.
pub fn within(what: &str, want: &[f32], got: &[f32], tol: impl Fn(usize) -> f64) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    // abs_diff64 is +∞ on a NaN, so a NaN fails every tolerance.
    let ratio = |i: usize| match abs_diff64(got[i].into(), want[i].into()) {
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
