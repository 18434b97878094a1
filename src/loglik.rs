//! Log-likelihood of an answer given a prompt: upstream `get_log_likelihood` (reference §5.1).
//!
//! A masked-diffusion model has no left-to-right factorisation; its log-likelihood is bounded
//! below by the ELBO
//!
//! ```text
//! log p(a | p) ≥ E_{l ~ U{1..T}} E_{S ⊂ answer, |S| = l} [ (T / l) · Σ_{i ∈ S} log p_θ(a_i | p, a with S masked) ]
//! ```
//!
//! (`T` = answer length; the prompt is never masked). [`estimate`] is upstream's Monte-Carlo
//! estimator of that bound: per mini-batch of `b` samples one `k ~ U{1..T}`, stratified mask
//! counts `l_r = ((round(linspace(k, k + (b−1)·T/b, b))_r − 1) mod T) + 1`, exactly `l_r` answer
//! positions masked per row (a uniform random subset), each masked log-probability weighted by
//! `T / l_r`, summed per row, averaged over the `mc_num` samples. With CFG (`cfg_scale > 0`) the
//! unconditional batch is the same noisy batch with every prompt token masked, mixed as
//! `un + (cfg+1)(cond − un)` (each op rounded to the logits dtype, like [`crate::backend::head::cfg_mix`]).
//! With a one-token answer every sample masks that token with weight 1, so the estimate is the
//! exact log-probability of the token, whatever `mc_num`.
//!
//! Numerics: upstream computes `F.cross_entropy` on bf16 logits, whose `log_softmax` works in
//! f32 and returns bf16 (checked with torch 2.15: the loss equals the f32 log-softmax rounded to
//! bf16). The backend op [`Backend::log_prob`](crate::backend::Backend::log_prob) does the same:
//! f32 from the stored logits, one rounding to the compute dtype (a no-op for f32 models). The
//! weighted sums and the mean are then taken in f64 (upstream: f32 sums, then a Python float).
//!
//! Randomness: `k` and the subsets come from the counter RNG ([`rng`], stream
//! [`rng::STREAM_LOGLIK`]) keyed by (seed, mini-batch index, row), on the host, so the estimate
//! is a pure function of (model, prompt, answer, mc_num, batch_size, cfg_scale, seed) and is
//! identical on every backend up to the log-probabilities themselves. Different answers scored
//! with the same seed share their random numbers (common random numbers: it lowers the variance
//! of the difference between choices). Upstream draws from torch's global RNG.
//!
//! Upstream quirk kept on purpose: `torch.round` rounds halves to even, so when `r·T/b` is a
//! half-integer the count of row `r` is not uniform on 1..T (e.g. T = 3, b = 2: row 1 gets
//! counts 2, 1, 1 for k = 1, 2, 3). The estimator is unbiased for the ELBO exactly when no such
//! tie occurs: always when `b` is odd (a tie needs `2rT/b` odd, impossible if `b` is odd) or
//! when `b` divides `T` (see [`mask_counts`]).

use anyhow::{bail, ensure, Result};

use crate::engine::predictor::{ScoreRequest, Scorer};
use crate::rng;

/// Stratified mask counts of one mini-batch (upstream `forward_process`): for `k` in 1..=T,
/// `x = round(linspace(k, k + (b−1)·T/b, b))` computed as `torch.linspace` does in f32 (first
/// half from the start, second half from the end), rounded half to even like `torch.round`,
/// then `((x − 1) mod T) + 1`. Writes `b` counts in 1..=T into `out`.
pub fn mask_counts(k: usize, b: usize, t: usize, out: &mut Vec<usize>) {
    out.clear();
    let start = k as f32;
    let end = k as f32 + ((b.saturating_sub(1)) as f64 * (t as f64 / b as f64)) as f32;
    if b == 1 {
        out.push(((k - 1) % t) + 1);
        return;
    }
    let step = (end - start) / (b - 1) as f32;
    let half = b / 2;
    for i in 0..b {
        let v = if i < half {
            start + step * i as f32
        } else {
            end - step * (b - i - 1) as f32
        };
        let x = v.round_ties_even() as i64;
        out.push(((x - 1).rem_euclid(t as i64)) as usize + 1);
    }
}

/// `k ~ U{1..T}` of mini-batch `it`.
pub fn draw_k(seed: u64, it: u64, t: usize) -> usize {
    let key = rng::cell_key(seed, rng::STREAM_LOGLIK, it, 0, 0);
    let u = rng::uniform(rng::bits(key, 0));
    ((u * t as f64) as usize).min(t - 1) + 1
}

/// A uniform random permutation of `0..T` for row `row` of mini-batch `it` (Fisher–Yates,
/// forward), written into `perm`; its first `l` entries are the masked answer positions.
pub fn draw_perm(seed: u64, it: u64, row: u64, t: usize, perm: &mut Vec<usize>) {
    perm.clear();
    perm.extend(0..t);
    let key = rng::cell_key(seed, rng::STREAM_LOGLIK, it, row + 1, 0);
    for j in 0..t.saturating_sub(1) {
        let u = rng::uniform(rng::bits(key, j as u64));
        let pick = j + ((u * (t - j) as f64) as usize).min(t - j - 1);
        perm.swap(j, pick);
    }
}

/// Most Monte-Carlo samples per estimate (upstream: 128; lm-eval configurations ≤ 1024).
pub const MAX_MC_NUM: usize = 1 << 16;
/// Most sequences in one scoring forward pass.
pub const MAX_BATCH_SIZE: usize = 1 << 12;
/// Most tokens (`batch_size × sequence length`) in one scoring forward pass.
pub const MAX_TOKENS_PER_PASS: usize = 1 << 24;

#[derive(Clone, Debug)]
pub struct LoglikParams {
    /// Monte-Carlo samples (upstream `mc_num`, default 128).
    pub mc_num: usize,
    /// Samples per forward pass (upstream `batch_size`); must divide `mc_num`.
    pub batch_size: usize,
    /// Unsupervised CFG scale (0 = off).
    pub cfg_scale: f64,
    pub seed: u64,
}

impl LoglikParams {
    /// The largest divisor of `mc_num` that is at most 16 (upstream's default mini-batch 16
    /// for `mc_num = 128`; 1 for `mc_num = 1`).
    pub fn default_batch_size(mc_num: usize) -> usize {
        (1..=mc_num.clamp(1, 16))
            .rev()
            .find(|d| mc_num % d == 0)
            .unwrap_or(1)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.mc_num > 0, "mc_num must be at least 1");
        ensure!(
            self.mc_num <= MAX_MC_NUM,
            "mc_num {} is more than the {MAX_MC_NUM} Monte-Carlo samples accepted (upstream uses 128)",
            self.mc_num
        );
        ensure!(self.batch_size > 0, "batch_size must be at least 1");
        ensure!(
            self.batch_size <= MAX_BATCH_SIZE,
            "batch_size {} is more than the {MAX_BATCH_SIZE} sequences per forward pass accepted",
            self.batch_size
        );
        ensure!(
            self.mc_num % self.batch_size == 0,
            "mc_num {} is not a multiple of batch_size {} (upstream asserts the same)",
            self.mc_num,
            self.batch_size
        );
        ensure!(
            self.cfg_scale.is_finite() && self.cfg_scale >= 0.0,
            "cfg_scale must be finite and ≥ 0, got {}",
            self.cfg_scale
        );
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct LoglikOutput {
    /// The estimate of log p(answer | prompt) (upstream's return value).
    pub loglik: f64,
    /// Forward passes run (one per mini-batch; each carries 2b sequences with CFG).
    pub forward_passes: usize,
    /// `−loss` of each mini-batch: the mean over its `b` samples of `(T/l)·Σ log p`; `loglik`
    /// is their mean.
    pub batch_means: Vec<f64>,
    /// Standard error of `loglik` from the spread of the mini-batch means (sample std /
    /// √batches, [`mean_stderr`]); `None` with a single mini-batch or a one-token answer (exact).
    pub mc_stderr: Option<f64>,
}

/// Mean and standard error (sample standard deviation / √n; NaN when n < 2).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

fn check_inputs(scorer: &dyn Scorer, prompt: &[u32], answer: &[u32]) -> Result<()> {
    ensure!(!answer.is_empty(), "the answer is empty: nothing to score");
    let len = prompt.len() + answer.len();
    ensure!(
        len <= scorer.max_len(),
        "prompt ({}) + answer ({}) = {len} tokens exceed the model's max_sequence_length {}",
        prompt.len(),
        answer.len(),
        scorer.max_len()
    );
    let mask = scorer.mask_id();
    if let Some(i) = answer.iter().position(|&a| a == mask) {
        bail!("answer[{i}] is the mask token {mask}: its likelihood is not defined");
    }
    Ok(())
}

/// Upstream `get_log_likelihood(model, prompt, answer, mc_num, batch_size, cfg_scale)`.
pub fn estimate(
    scorer: &mut dyn Scorer,
    prompt: &[u32],
    answer: &[u32],
    p: &LoglikParams,
) -> Result<LoglikOutput> {
    p.validate()?;
    check_inputs(scorer, prompt, answer)?;
    let (lp, t) = (prompt.len(), answer.len());
    let len = lp + t;
    let b = p.batch_size;
    let cfg = p.cfg_scale > 0.0;
    let mask = scorer.mask_id();
    let iters = p.mc_num / b;
    ensure!(
        b.checked_mul(len).is_some_and(|n| n <= MAX_TOKENS_PER_PASS),
        "batch_size {b} × {len} tokens is more than the {MAX_TOKENS_PER_PASS} tokens one scoring \
         pass may hold (lower batch_size)"
    );

    // The most rows any mini-batch can ask for: max over k of Σ_r l_r.
    let mut counts = Vec::with_capacity(b);
    let mut max_rows = 0;
    for k in 1..=t {
        mask_counts(k, b, t, &mut counts);
        max_rows = max_rows.max(counts.iter().sum::<usize>());
    }
    scorer.reserve(b * len, max_rows, cfg)?;

    let mut x: Vec<u32> = Vec::with_capacity(b * len);
    let mut un: Vec<u32> = Vec::with_capacity(if cfg { b * len } else { 0 });
    let mut rows: Vec<u32> = Vec::with_capacity(max_rows);
    let mut targets: Vec<u32> = Vec::with_capacity(max_rows);
    let mut weights: Vec<f64> = Vec::with_capacity(max_rows);
    let mut out = vec![0f32; max_rows];
    let mut perm = Vec::with_capacity(t);
    let mut batch_means = Vec::with_capacity(iters);

    for it in 0..iters {
        let k = draw_k(p.seed, it as u64, t);
        mask_counts(k, b, t, &mut counts);
        x.clear();
        rows.clear();
        targets.clear();
        weights.clear();
        for (r, &l) in counts.iter().enumerate() {
            x.extend_from_slice(prompt);
            x.extend_from_slice(answer);
            draw_perm(p.seed, it as u64, r as u64, t, &mut perm);
            let w = t as f64 / l as f64;
            for &i in &perm[..l] {
                let flat = r * len + lp + i;
                x[flat] = mask;
                rows.push(flat as u32);
                targets.push(answer[i]);
                weights.push(w);
            }
        }
        if cfg {
            un.clear();
            un.extend_from_slice(&x);
            for r in 0..b {
                un[r * len..r * len + lp].fill(mask);
            }
        }
        let nr = rows.len();
        scorer.score(
            &ScoreRequest {
                b,
                t: len,
                x: &x,
                uncond_x: cfg.then_some(un.as_slice()),
                cfg_scale: p.cfg_scale,
                rows: &rows,
                targets: &targets,
            },
            &mut out[..nr],
        )?;
        let s: f64 = out[..nr]
            .iter()
            .zip(&weights)
            .map(|(&lpv, &w)| lpv as f64 * w)
            .sum();
        batch_means.push(s / b as f64);
    }
    let (loglik, se) = mean_stderr(&batch_means);
    let mc_stderr = (batch_means.len() > 1 && t > 1).then_some(se);
    Ok(LoglikOutput {
        loglik,
        forward_passes: iters,
        batch_means,
        mc_stderr,
    })
}

/// Longest answer [`elbo_exact`] enumerates (2^T − 1 masked sequences).
pub const ELBO_EXACT_MAX_T: usize = 12;

/// The ELBO the estimator converges to, computed exactly by enumerating every non-empty mask
/// set `S` of the answer: `Σ_S (1 / (|S|·C(T,|S|))) Σ_{i∈S} log p(a_i | p, a with S masked)`
/// (each `l` has probability 1/T, each subset of size `l` probability 1/C(T,l), weight T/l).
/// Scores `chunk` sequences per forward pass. `T ≤` [`ELBO_EXACT_MAX_T`].
pub fn elbo_exact(
    scorer: &mut dyn Scorer,
    prompt: &[u32],
    answer: &[u32],
    cfg_scale: f64,
    chunk: usize,
) -> Result<f64> {
    check_inputs(scorer, prompt, answer)?;
    let (lp, t) = (prompt.len(), answer.len());
    ensure!(
        t <= ELBO_EXACT_MAX_T,
        "exact ELBO enumeration supports answers of at most {ELBO_EXACT_MAX_T} tokens, got {t}"
    );
    ensure!(
        cfg_scale.is_finite() && cfg_scale >= 0.0,
        "cfg_scale must be finite and ≥ 0, got {cfg_scale}"
    );
    let chunk = chunk.max(1);
    let len = lp + t;
    let cfg = cfg_scale > 0.0;
    let mask = scorer.mask_id();
    let binom = |n: usize, k: usize| -> f64 {
        (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
    };
    let subsets: Vec<u32> = (1u32..(1u32 << t)).collect();
    scorer.reserve(chunk * len, chunk * t, cfg)?;
    let mut total = 0.0f64;
    let (mut x, mut un, mut rows, mut targets, mut w) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut out = vec![0f32; chunk * t];
    for group in subsets.chunks(chunk) {
        x.clear();
        rows.clear();
        targets.clear();
        w.clear();
        for (r, &s) in group.iter().enumerate() {
            x.extend_from_slice(prompt);
            x.extend_from_slice(answer);
            let l = s.count_ones() as usize;
            let weight = 1.0 / (l as f64 * binom(t, l));
            for (i, &a) in answer.iter().enumerate() {
                if s >> i & 1 == 1 {
                    let flat = r * len + lp + i;
                    x[flat] = mask;
                    rows.push(flat as u32);
                    targets.push(a);
                    w.push(weight);
                }
            }
        }
        if cfg {
            un.clear();
            un.extend_from_slice(&x);
            for r in 0..group.len() {
                un[r * len..r * len + lp].fill(mask);
            }
        }
        let nr = rows.len();
        scorer.score(
            &ScoreRequest {
                b: group.len(),
                t: len,
                x: &x,
                uncond_x: cfg.then_some(un.as_slice()),
                cfg_scale,
                rows: &rows,
                targets: &targets,
            },
            &mut out[..nr],
        )?;
        total += out[..nr]
            .iter()
            .zip(&w)
            .map(|(&v, &wt)| v as f64 * wt)
            .sum::<f64>();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_upstream_linspace() {
        let mut c = Vec::new();
        // b = T: every count once, shifted by k.
        for k in 1..=4 {
            mask_counts(k, 4, 4, &mut c);
            let mut s = c.clone();
            s.sort();
            assert_eq!(s, vec![1, 2, 3, 4], "k={k}: {c:?}");
            assert_eq!(c[0], k);
        }
        // The round-half-to-even quirk: T = 3, b = 2, row 1 = round(k + 1.5).
        let row1: Vec<usize> = (1..=3)
            .map(|k| {
                mask_counts(k, 2, 3, &mut c);
                c[1]
            })
            .collect();
        assert_eq!(row1, vec![2, 1, 1]);
        // b = 1: just k.
        mask_counts(3, 1, 5, &mut c);
        assert_eq!(c, vec![3]);
        // b > T: counts wrap into 1..=T.
        mask_counts(2, 8, 3, &mut c);
        assert!(c.iter().all(|&l| (1..=3).contains(&l)), "{c:?}");
    }

    #[test]
    fn k_and_permutations_are_uniform() {
        let t = 5;
        let mut hist = [0usize; 5];
        let mut first = [0usize; 5];
        let mut perm = Vec::new();
        let n = 20_000;
        for it in 0..n {
            hist[draw_k(9, it, t) - 1] += 1;
            draw_perm(9, it, 3, t, &mut perm);
            let mut s = perm.clone();
            s.sort();
            assert_eq!(s, (0..t).collect::<Vec<_>>());
            first[perm[0]] += 1;
        }
        // Each bin ~ Binomial(n, 1/5): sd = sqrt(n·0.16) ≈ 57; allow 5 sd.
        for h in hist.iter().chain(&first) {
            assert!(
                (*h as f64 - n as f64 / 5.0).abs() < 5.0 * 57.0,
                "{hist:?} {first:?}"
            );
        }
    }

    #[test]
    fn default_batch_size_divides() {
        assert_eq!(LoglikParams::default_batch_size(128), 16);
        assert_eq!(LoglikParams::default_batch_size(1), 1);
        assert_eq!(LoglikParams::default_batch_size(12), 12);
        assert_eq!(LoglikParams::default_batch_size(34), 2);
    }
}
