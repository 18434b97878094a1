//! Fast-dLLM decoding (reference §7) over a [`SpanPredictor`]: the prefix / dual KV cache and
//! the threshold / factor commit rules, split from [`super::sampler`] (upstream `generate`),
//! whose batch layout, schedule and commit selection it shares. The sampler re-exports what is
//! public here, so `engine::sampler::generate_fast` and friends keep their paths.

use anyhow::{bail, Context, Result};

use super::sampler::{
    apply_commits, num_transfer_tokens_into, rng_key, BatchLayout, Commits, GenerateOutput,
    GenerateParams, Progress, RowKey,
};
use crate::backend::commit::{commit_select, CommitRule};
use crate::backend::head::SelectParams;

/// Which KV cache Fast-dLLM decoding uses (reference §7.3, §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CacheMode {
    /// Every step is a full forward pass (Fast-dLLM's baseline `generate`, §7.2).
    #[default]
    None,
    /// `generate_with_prefix_cache`: a full pass at each block start, then the current block and
    /// everything after it run against the cached prefix.
    Prefix,
    /// `generate_with_dual_cache`: a full pass at each block start, then only the current block
    /// runs against the cached prefix and suffix, overwriting its own cache rows.
    Dual,
}

/// The `--cache` names, for parsing and printing.
const CACHE_MODES: &[(&str, CacheMode)] = &[
    ("none", CacheMode::None),
    ("prefix", CacheMode::Prefix),
    ("dual", CacheMode::Dual),
];

crate::names::named_enum!(CacheMode, "cache mode", CACHE_MODES);

/// How many tokens a step commits, and with which cache (Fast-dLLM, reference §7).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Decode {
    pub cache: CacheMode,
    /// `get_transfer_index(…, threshold)` (§7.5): the top-1 plus every candidate with
    /// confidence ≥ threshold. Replaces the `steps` schedule.
    pub threshold: Option<f64>,
    /// `get_transfer_index_dynamic(…, factor)` (§7.6). Replaces the `steps` schedule.
    pub factor: Option<f64>,
}

impl Decode {
    /// Plain upstream LLaDA `generate` (no cache, fixed schedule).
    pub fn is_plain(&self) -> bool {
        self.cache == CacheMode::None && self.threshold.is_none() && self.factor.is_none()
    }

    /// The commit rule: the factor if given, else the threshold, else the fixed schedule.
    pub fn rule(&self) -> CommitRule {
        match (self.factor, self.threshold) {
            (Some(f), _) => CommitRule::Factor(f),
            (None, Some(th)) => CommitRule::Threshold(th),
            (None, None) => CommitRule::Quota,
        }
    }
}

/// One cached forward pass: the tokens at positions `[q0, q1)` of every batch row go through the
/// network, their keys/values overwrite those rows of the predictor's KV cache, and attention
/// reads all `t` rows of the cache. `[0, t)` is a full forward pass that (re)fills the cache.
pub struct SpanRequest<'a> {
    pub b: usize,
    pub t: usize,
    /// Current tokens `[b·t]` (only the span is read).
    pub x: &'a [u32],
    /// `[b·t]`, 1 = real token, 0 = left padding; `None` = no padding.
    pub key_valid: Option<&'a [u8]>,
    pub q0: usize,
    pub q1: usize,
    /// (batch row, absolute position) pairs in `[q0, q1)` whose prediction is wanted, sorted by
    /// row, then position.
    pub rows: &'a [(u32, u32)],
    pub select: &'a SelectParams,
    /// As [`PredictRequest::row_keys`].
    pub row_keys: Option<&'a [RowKey]>,
}

impl SpanRequest<'_> {
    /// The RNG key (row, position) of batch row `br` at absolute position `pos` ([`rng_key`]).
    pub fn rng_key(&self, br: u32, pos: u32) -> Result<(u32, u32)> {
        rng_key(self.row_keys, br, pos)
    }
}

/// A predictor with a KV cache (the model, or a fake in tests).
pub trait SpanPredictor {
    /// Writes one `(token, confidence)` per entry of `req.rows` into `out`.
    fn predict_span(&mut self, req: &SpanRequest<'_>, out: &mut [(u32, f32)]) -> Result<()>;

    /// As [`super::sampler::Predictor::selects_commits`].
    fn selects_commits(&self) -> bool {
        false
    }

    /// [`SpanPredictor::predict_span`], then the commit selection as
    /// [`super::sampler::Predictor::predict_commit`].
    fn predict_span_commit(&mut self, req: &SpanRequest<'_>, c: &mut Commits<'_>) -> Result<()> {
        let _ = (req, c);
        bail!("this predictor does not make the commit selection (selects_commits is false)")
    }
}

/// Fast-dLLM decoding (reference §7): the baseline loop (`cache: None`),
/// `generate_with_prefix_cache` or `generate_with_dual_cache`, each with the fixed `steps`
/// schedule, a confidence `threshold` or a `factor`.
///
/// ```text
/// for each block [s, e):
///     sched = num_transfer_tokens(#MASK in [s, e), steps_per_block)
///     call 0: full pass over [0, T) (refills the cache); candidates = MASKs in [0, e)
///     then, while [s, e) still has a MASK (checked BEFORE each call, as FD-new does):
///         call i: none → [0, T); prefix → [s, T); dual → [s, e); candidates = MASKs in [s, e)
///     each call commits per row, by confidence (desc., then position asc.): sched[i] tokens,
///     or the threshold / factor rule; nfe += 1 per call.
/// ```
///
/// The first call of a block and the `none` baseline take candidates from `[0, e)` as upstream
/// (`mask_index[:, e:] = 0`); cached calls only from the block. With the fixed schedule a block
/// whose quota ran out with masks left (only possible when a `[MASK]` before the block took part
/// of call 0's quota; upstream then indexes past the schedule) commits one token per further call.
/// `select.step` is the call counter (0-based) for the Gumbel noise; with
/// [`GenerateParams::row_keys`] it is `(block << 32) | call in block` instead, so that a prompt's
/// random numbers do not depend on how many calls its batch neighbours needed. CFG is not part of
/// Fast-dLLM and is rejected; the EOS options and left padding work as in [`generate`] (all rows
/// share the block positions, since padding is on the left).
pub fn generate_fast(
    pred: &mut dyn SpanPredictor,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    decode: &Decode,
    mut progress: Option<&mut dyn FnMut(Progress)>,
) -> Result<GenerateOutput> {
    let (num_blocks, steps_per_block) = params.block_plan()?;
    if params.cfg_scale > 0.0 {
        bail!("cfg_scale > 0 is not supported with Fast-dLLM decoding (--cache / --threshold / --factor)");
    }
    if decode.threshold.is_some() && decode.factor.is_some() {
        bail!("give either a threshold or a factor, not both (Fast-dLLM uses one rule at a time)");
    }
    if let Some(th) = decode.threshold {
        if !th.is_finite() {
            bail!("threshold {th} is not a finite number");
        }
    }
    if let Some(f) = decode.factor {
        if !(f.is_finite() && f > 0.0) {
            bail!("factor {f} must be a positive finite number");
        }
    }
    let BatchLayout {
        b,
        lp,
        t,
        n,
        mut x,
        key_valid,
    } = BatchLayout::new(prompts, params)?;
    let mask = params.mask_id;
    let row_keys = params.row_keys_for(prompts, lp)?;

    let mut rows: Vec<(u32, u32)> = Vec::with_capacity(n);
    let mut row_off = vec![0usize; b + 1];
    let mut out = vec![(0u32, 0f32); n];
    let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(t);
    let mut sched = vec![0usize; b * steps_per_block];
    let mut select = params.select_params(0);
    let rule = decode.rule();
    let device_select = pred.selects_commits();
    let mut quota = vec![0usize; b];
    let mut commits = vec![-1i32; if device_select { n } else { 0 }];
    let fixed = decode.threshold.is_none() && decode.factor.is_none();
    let total_steps = if fixed {
        num_blocks * steps_per_block
    } else {
        params.gen_length
    };

    let mut nfe = 0usize;
    let mut rows_predicted = 0usize;
    for block in 0..num_blocks {
        let s = lp + block * params.block_length;
        let e = s + params.block_length;
        for r in 0..b {
            let in_block = x[r * t + s..r * t + e]
                .iter()
                .filter(|&&v| v == mask)
                .count();
            num_transfer_tokens_into(
                in_block,
                &mut sched[r * steps_per_block..(r + 1) * steps_per_block],
            );
        }
        let mut i = 0usize;
        loop {
            let block_done = !(0..b).any(|r| x[r * t + s..r * t + e].contains(&mask));
            if i > 0 && block_done {
                break;
            }
            let (q0, q1) = match decode.cache {
                _ if i == 0 => (0, t),
                CacheMode::None => (0, t),
                CacheMode::Prefix => (s, t),
                CacheMode::Dual => (s, e),
            };
            let c0 = if i == 0 || decode.cache == CacheMode::None {
                0
            } else {
                s
            };
            rows.clear();
            for r in 0..b {
                let xr = &x[r * t..(r + 1) * t];
                rows.extend(
                    (c0..e)
                        .filter(|&p| xr[p] == mask)
                        .map(|p| (r as u32, p as u32)),
                );
                row_off[r + 1] = rows.len();
            }
            let nr = rows.len();
            // With row keys, (block, call in block): a row's i-th call of a block is the same
            // call in any batch (rows that finish early only get extra calls that commit
            // nothing), whereas `nfe` counts the calls its batch neighbours needed too.
            select.step = if row_keys.is_some() {
                ((block as u64) << 32) | i as u64
            } else {
                nfe as u64
            };
            let req = SpanRequest {
                b,
                t,
                x: &x,
                key_valid: key_valid.as_deref(),
                q0,
                q1,
                rows: &rows,
                select: &select,
                row_keys: row_keys.as_deref(),
            };
            // A block whose quota ran out with masks left commits one token per further call.
            for (r, q) in quota.iter_mut().enumerate() {
                *q = if i < steps_per_block {
                    sched[r * steps_per_block + i]
                } else {
                    1
                };
            }
            let context = || format!("forward pass {nfe} (block {block}, step {i})");
            if device_select {
                let mut c = Commits {
                    quota: &quota,
                    rule,
                    mask_id: mask,
                    out: &mut commits[..nr],
                };
                pred.predict_span_commit(&req, &mut c)
                    .with_context(context)?;
                apply_commits(&mut x, t, &rows, &commits[..nr]);
            } else {
                pred.predict_span(&req, &mut out[..nr])
                    .with_context(context)?;
                for r in 0..b {
                    cands.clear();
                    for (&(_, p), &(tok, conf)) in rows[row_off[r]..row_off[r + 1]]
                        .iter()
                        .zip(&out[row_off[r]..row_off[r + 1]])
                    {
                        cands.push((conf, p as usize, tok));
                    }
                    let k = commit_select(&mut cands, quota[r], rule);
                    for &(_, p, tok) in &cands[..k] {
                        x[r * t + p] = tok;
                    }
                }
            }
            nfe += 1;
            rows_predicted += nr;
            i += 1;
            if let Some(cb) = progress.as_mut() {
                cb(Progress {
                    step: nfe,
                    total_steps: total_steps.max(nfe),
                    block,
                    num_blocks,
                });
            }
        }
    }

    Ok(GenerateOutput::from_canvas(
        &x,
        b,
        t,
        lp,
        nfe,
        rows_predicted,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rule_prefers_factor_then_threshold() {
        let d = |threshold, factor| Decode {
            threshold,
            factor,
            ..Decode::default()
        };
        assert_eq!(d(None, None).rule(), CommitRule::Quota);
        assert_eq!(d(Some(0.9), None).rule(), CommitRule::Threshold(0.9));
        assert_eq!(d(None, Some(1.0)).rule(), CommitRule::Factor(1.0));
        assert_eq!(d(Some(0.9), Some(1.0)).rule(), CommitRule::Factor(1.0));
    }
}
