//! The CPU reference of `log_prob` (log-softmax of the target, CFG-mixed): per row
//! [`log_prob_one`], the function the CUDA kernel `kernels/log_prob.cu` is checked against.

use super::*;

/// CPU reference of the `log_prob` op for one row: `cond` (and, with CFG, `uncond` and the
/// scale) are the stored logits of one position; returns `round(l[t] − m − ln Σ exp(l − m))`
/// in `dtype`, everything in f32 (sequential sum). NaN anywhere gives NaN; all −∞ gives −∞.
pub fn log_prob_one(
    cond: &[f32],
    uncond: Option<(&[f32], f64)>,
    target: usize,
    dtype: DType,
) -> f32 {
    let s = uncond.map(|(_, c)| (c + 1.0) as f32).unwrap_or(1.0);
    let val = |j: usize| -> f32 {
        match uncond {
            Some((u, _)) => {
                // Exactly head::cfg_mix on one element.
                let d = dtype.round(cond[j] - u[j]);
                let m = dtype.round(s * d);
                dtype.round(u[j] + m)
            }
            None => cond[j],
        }
    };
    let mut m = f32::NEG_INFINITY;
    let mut nan = false;
    for j in 0..cond.len() {
        let l = val(j);
        nan |= l.is_nan();
        if l > m {
            m = l;
        }
    }
    if nan {
        return f32::NAN;
    }
    if m == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let mut sum = 0.0f32;
    for j in 0..cond.len() {
        sum += (val(j) - m).exp();
    }
    dtype.round((val(target) - m) - sum.ln())
}

/// [`Backend::log_prob`] on the CPU: [`log_prob_one`] per row.
pub(super) fn cpu_log_prob(
    dtype: DType,
    out: &mut [f32],
    (logits, targets): (&[f32], &[i32]),
    s: LogProb,
) -> Result<()> {
    const OP: &str = "log_prob";
    let LogProb { r, v, cfg_scale } = s;
    ensure!(
        cfg_scale.is_finite() && cfg_scale >= 0.0,
        "{OP}: cfg_scale must be finite and >= 0, got {cfg_scale}"
    );
    let cfg = cfg_scale > 0.0;
    let rr = s.logit_rows();
    need(OP, "logits", logits.len(), rr * v)?;
    need(OP, "targets", targets.len(), r)?;
    need(OP, "out", out.len(), r)?;
    if let Some((i, t)) = super::check::first_outside(&targets[..r], v) {
        bail!("{OP}: targets[{i}] = {t} is outside the vocabulary (V = {v})");
    }
    if r == 0 {
        return Ok(());
    }
    let (cond, uncond) = logits[..rr * v].split_at(r * v);
    out[..r]
        .par_iter_mut()
        .zip(cond.par_chunks(v))
        .enumerate()
        .for_each(|(i, (o, l))| {
            let un = cfg.then(|| (&uncond[i * v..(i + 1) * v], cfg_scale));
            *o = log_prob_one(l, un, targets[i] as usize, dtype);
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_prob_one_matches_f64_log_softmax() {
        let l: Vec<f32> = (0..50)
            .map(|i| ((i * 37) % 23) as f32 * 0.3 - 3.0)
            .collect();
        let m = l.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = l.iter().map(|&v| (v as f64 - m).exp()).sum();
        for t in [0, 7, 49] {
            let want = l[t] as f64 - m - z.ln();
            let got = log_prob_one(&l, None, t, DType::F32) as f64;
            assert!((got - want).abs() < 1e-5, "{got} {want}");
        }
        let mut bad = l.clone();
        bad[3] = f32::NAN;
        assert!(log_prob_one(&bad, None, 0, DType::F32).is_nan());
        let ninf = vec![f32::NEG_INFINITY; 4];
        assert_eq!(log_prob_one(&ninf, None, 0, DType::F32), f32::NEG_INFINITY);
    }
}
