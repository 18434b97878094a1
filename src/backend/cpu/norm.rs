//! RMSNorm's row reference and its weight (a materialised slice or a scalar constant).

use super::*;

/// `x · rsqrt(mean(x²) + eps)` in f32, rounded to `dt`, then times the weight, rounded.
pub(super) fn rms_row(dt: DType, out: &mut [f32], x: &[f32], w: &WeightRow<'_>, eps: f32) {
    let c = x.len();
    let mut ss = 0.0f32;
    for &v in x {
        ss += v * v;
    }
    let r = 1.0f32 / (ss / c as f32 + eps).sqrt();
    for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let y = dt.round(v * r);
        let wj = match w {
            WeightRow::Scalar(s) => *s,
            WeightRow::Slice(s) => s[j],
        };
        *o = dt.round(wj * y);
    }
}

/// [`rms_row`] over the rows of `c` elements of `x` into `out`.
pub(super) fn rms_rows(
    dt: DType,
    out: &mut [f32],
    x: &[f32],
    w: &WeightRow<'_>,
    c: usize,
    eps: f32,
) {
    if c == 0 {
        return;
    }
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, xr)| rms_row(dt, o, xr, w, eps));
}

/// `x += d` elementwise, each sum rounded to `dt` ([`Backend::add`], and the residual add of
/// [`Backend::add_rms_norm`] before its norm).
pub(super) fn add_rounded(dt: DType, x: &mut [f32], d: &[f32]) {
    x.par_iter_mut()
        .zip(d.par_iter())
        .for_each(|(a, &b)| *a = dt.round(*a + b));
}

pub(super) enum WeightRow<'a> {
    Scalar(f32),
    Slice(&'a [f32]),
}

impl CpuBackend {
    /// The checks of the norms under the name `op`: each `(name, len)` of `args` holds `N·C`
    /// elements and `w` is a norm weight of `C`.
    pub(super) fn norm_args<'a>(
        &self,
        op: &str,
        args: &[(&str, usize)],
        w: &'a CpuWeight,
        s: Norm,
    ) -> Result<WeightRow<'a>> {
        for &(name, len) in args {
            need(op, name, len, s.n * s.c)?;
        }
        self.norm_weight(op, w, s.c)
    }

    pub(super) fn norm_weight<'a>(
        &self,
        op: &str,
        w: &'a CpuWeight,
        c: usize,
    ) -> Result<WeightRow<'a>> {
        ensure!(
            w.rows == 1 && w.cols == c,
            "{op}: weight `{}` is [{}, {}], expected a norm weight of {c} elements",
            w.name,
            w.rows,
            w.cols
        );
        if let [Part {
            store: Store::Scalar(s),
            ..
        }] = w.parts.as_slice()
        {
            return Ok(WeightRow::Scalar(*s));
        }
        match w.is_dense_single() {
            Some(d) => Ok(WeightRow::Slice(d)),
            None => bail!(
                "{op}: weight `{}` is not a materialised norm weight",
                w.name
            ),
        }
    }
}
