//! Counter-based random numbers that the CPU and the GPU produce bit for bit.
//!
//! Every random number the sampler uses is a pure function of
//! `(seed, stream, step, row, col, index)`: no state, no order dependence, so a CUDA thread can
//! compute the same value as this file. The arithmetic is restricted to integer ops and IEEE-754
//! `+ - * /` and fused multiply-add on f64, each written out explicitly (no libm), so the CUDA
//! twin in `kernels/common.cuh` (`llada_mix64`, `llada_uniform`, `llada_ln`, `llada_gumbel`)
//! rounds identically. Changing anything here means changing that file too; the GPU parity test
//! of the head kernel compares them bit for bit.

/// Stream for the Gumbel noise of temperature sampling (one value per vocab entry).
pub const STREAM_GUMBEL: u64 = 1;
/// Stream for `remasking = random` confidences (one value per position).
pub const STREAM_RANDOM_CONF: u64 = 2;
/// Stream for the random weights of presets (one value per element).
pub const STREAM_WEIGHTS: u64 = 3;
/// Stream for the Monte-Carlo log-likelihood estimator (mask counts and permutations,
/// host-side; see `crate::loglik`).
pub const STREAM_LOGLIK: u64 = 4;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 finaliser: a bijective 64-bit mix.
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Key of one (seed, stream, step, row, col) cell; combine with an index via [`bits`].
/// `step` is the global step index (0-based over the whole generation), `row` the batch row,
/// `col` the absolute position in the sequence.
#[inline(always)]
pub fn cell_key(seed: u64, stream: u64, step: u64, row: u64, col: u64) -> u64 {
    let mut h = mix64(seed.wrapping_add(GOLDEN));
    h = mix64(h ^ stream.wrapping_mul(GOLDEN));
    h = mix64(h ^ step);
    h = mix64(h ^ row);
    mix64(h ^ col)
}

/// 64 random bits for element `index` of a cell.
#[inline(always)]
pub fn bits(key: u64, index: u64) -> u64 {
    mix64(key ^ index.wrapping_mul(GOLDEN))
}

/// Uniform in the open interval (0, 1): the top 52 bits `k`, as `(k + 0.5)·2⁻⁵²` — exact in
/// f64 (2k+1 < 2⁵³), so the result lies in [2⁻⁵³, 1 − 2⁻⁵³] and is never 0 or 1.
#[inline(always)]
pub fn uniform(bits: u64) -> f64 {
    ((bits >> 12) as f64 + 0.5) * (1.0 / 4_503_599_627_370_496.0)
}

const LN2: f64 = std::f64::consts::LN_2;
const SQRT2: f64 = std::f64::consts::SQRT_2;
// 1/(2k+1) for k = 11 down to 1: the atanh series 2s(1 + s²/3 + s⁴/5 + …).
const ATANH_C: [f64; 11] = [
    1.0 / 23.0,
    1.0 / 21.0,
    1.0 / 19.0,
    1.0 / 17.0,
    1.0 / 15.0,
    1.0 / 13.0,
    1.0 / 11.0,
    1.0 / 9.0,
    1.0 / 7.0,
    1.0 / 5.0,
    1.0 / 3.0,
];

/// Natural log of a positive, finite, normal f64, using only IEEE ops (relative error ~1e-16).
///
/// x = m·2^e with m in [√2/2, √2); ln m = 2·atanh(s), s = (m−1)/(m+1), |s| ≤ 0.1716.
#[inline(always)]
pub fn ln(x: f64) -> f64 {
    let b = x.to_bits();
    let mut e = ((b >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((b & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > SQRT2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = ATANH_C[0];
    for &c in &ATANH_C[1..] {
        p = p.mul_add(s2, c);
    }
    // 2s + 2s·s²·p
    let two_s = 2.0 * s;
    let lnm = (two_s * s2).mul_add(p, two_s);
    (e as f64).mul_add(LN2, lnm)
}

/// Standard Gumbel sample −ln(−ln u) for u in (0, 1).
#[inline(always)]
pub fn gumbel(u: f64) -> f64 {
    -ln(-ln(u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_matches_libm_closely() {
        let mut worst = 0.0f64;
        for i in 1..20000u64 {
            let x = uniform(bits(cell_key(7, 1, 0, 0, 0), i)) * 50.0 + 1e-12;
            let r = (ln(x) - x.ln()).abs() / x.ln().abs().max(1e-300);
            worst = worst.max(r);
        }
        assert!(worst < 1e-14, "worst relative error {worst}");
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn uniform_is_open_and_key_sensitive() {
        assert!(uniform(0) > 0.0 && uniform(u64::MAX) < 1.0);
        let a = cell_key(1, STREAM_GUMBEL, 3, 0, 5);
        assert_ne!(a, cell_key(2, STREAM_GUMBEL, 3, 0, 5));
        assert_ne!(a, cell_key(1, STREAM_RANDOM_CONF, 3, 0, 5));
        assert_ne!(a, cell_key(1, STREAM_GUMBEL, 4, 0, 5));
        assert_ne!(a, cell_key(1, STREAM_GUMBEL, 3, 1, 5));
        assert_ne!(a, cell_key(1, STREAM_GUMBEL, 3, 0, 6));
        assert_eq!(a, cell_key(1, STREAM_GUMBEL, 3, 0, 5));
    }

    #[test]
    fn uniform_mean_is_half() {
        let k = cell_key(3, 1, 0, 0, 0);
        let n = 100_000;
        let mean: f64 = (0..n).map(|i| uniform(bits(k, i))).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }
}
