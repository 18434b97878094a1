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

pub(super) enum WeightRow<'a> {
    Scalar(f32),
    Slice(&'a [f32]),
}

impl CpuBackend {
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
