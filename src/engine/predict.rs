//! The predictor interface of the denoising loops: what one call to the model asks
//! ([`PredictRequest`], [`SpanRequest`] against a KV cache), what answers it ([`Predictor`],
//! [`SpanPredictor`], the model on a backend or a fake in tests), a predictor's own commit
//! selection ([`SelectsCommits`], [`Commits`]) or its whole steps ([`StepsOnDevice`]), the RNG
//! keys of the head ([`RowKey`]) and the per-step report ([`Progress`]). Upstream `generate`
//! ([`super::sampler`]), Fast-dLLM decoding ([`super::fast`]) and their shared call
//! (`super::step`) are written over it; it imports no other engine module.

use anyhow::{Context, Result};

use crate::backend::commit::CommitRule;
use crate::backend::head::SelectParams;

/// One call to the model: predict (token, confidence) at `rows`.
pub struct PredictRequest<'a> {
    /// Batch rows.
    pub b: usize,
    /// Tokens per row (prompt + gen_length, including left padding).
    pub t: usize,
    /// Current tokens `[b·t]`.
    pub x: &'a [u32],
    /// With CFG: the unconditional tokens `[b·t]` (prompt positions replaced by the mask id).
    pub uncond_x: Option<&'a [u32]>,
    /// `[b·t]`, 1 = real token, 0 = left padding (a key-padding mask); `None` = no padding.
    pub key_valid: Option<&'a [u8]>,
    /// (batch row, absolute position) pairs whose prediction is wanted. The set is fixed for a
    /// whole block, so devices can reuse a captured graph. Sorted by row, then position.
    pub rows: &'a [(u32, u32)],
    /// How to turn logits into (token, confidence); `step` is set per call.
    pub select: &'a SelectParams,
    /// Random-stream keys per batch row (`[b]`, see [`RowKey`]); `None` keys the head's RNG by
    /// (batch row, absolute position).
    pub row_keys: Option<&'a [RowKey]>,
}

impl PredictRequest<'_> {
    /// The RNG key (row, position) of batch row `br` at absolute position `pos` ([`rng_key`]).
    pub fn rng_key(&self, br: u32, pos: u32) -> Result<(u32, u32)> {
        rng_key(self.row_keys, br, pos)
    }
}

/// The random stream of one batch row: the head's random numbers at absolute position `pos`
/// of this row are keyed by `(key, pos − origin)` instead of (batch row, `pos`). The sampler
/// sets `origin` to the row's left padding, so a prompt's stream depends only on its own key and
/// its own (unpadded) positions, whatever batch it runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowKey {
    /// Below 2³¹ (the head takes keys as non-negative `i32`).
    pub key: u32,
    pub origin: u32,
}

/// The (row, position) pair the head's RNG is keyed by for batch row `br`, absolute position
/// `pos`: `(br, pos)` without row keys, else `(key, pos − origin)` of row `br`. An error names
/// a row outside `row_keys` or a position before the row's origin.
pub fn rng_key(row_keys: Option<&[RowKey]>, br: u32, pos: u32) -> Result<(u32, u32)> {
    let Some(keys) = row_keys else {
        return Ok((br, pos));
    };
    let k = keys
        .get(br as usize)
        .with_context(|| format!("batch row {br} has no RNG row key ({} given)", keys.len()))?;
    let p = pos.checked_sub(k.origin).with_context(|| {
        format!(
            "position {pos} of batch row {br} lies before its RNG origin {} (left padding)",
            k.origin
        )
    })?;
    Ok((k.key, p))
}

/// Something that predicts masked tokens: the model on some backend, or a fake in tests.
pub trait Predictor {
    /// Writes one `(token, confidence)` per entry of `req.rows` into `out`
    /// (`out.len() == req.rows.len()`).
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()>;

    /// The predictor's own commit selection ([`SelectsCommits`]) when it makes it on its side
    /// (the model's device, `LLADA_DEVICE_SELECT=1`); `None` (the default): the sampler reads
    /// the (token, confidence) pairs back and selects on the host.
    fn commit_selector(&mut self) -> Option<&mut dyn SelectsCommits> {
        None
    }

    /// The predictor's whole-step driver ([`StepsOnDevice`]) when it runs whole denoising steps
    /// on its side (the model's device, `LLADA_STEP_GRAPH=1`); `None` (the default): one call
    /// per step.
    fn steps_on_device(&mut self) -> Option<&mut dyn StepsOnDevice> {
        None
    }
}

/// A predictor that runs whole denoising steps on its device, each the prediction, the commit
/// selection of [`SelectsCommits`] and the write of the commits into its own copy of the
/// tokens: the sampler uploads a block once, then asks for steps, and reads the tokens back at
/// the end of the block. Results equal one [`SelectsCommits`] call per step with the same
/// requested rows, quotas and RNG steps.
pub trait StepsOnDevice {
    /// Start a block: the request over the tokens at its start (`req.rows`: every pair any step
    /// of the block may commit, fixed for the block; a pair no longer `[MASK]` is skipped), and
    /// `plan`. The block's call `i` (from `plan.first`) draws its random numbers at step
    /// `req.select.step + i − plan.first`.
    fn begin_block(&mut self, req: &PredictRequest<'_>, plan: &BlockPlan<'_>) -> Result<()>;
    /// [`StepsOnDevice::begin_block`] for passes over the span `[req.q0, req.q1)` against the
    /// predictor's KV cache (filled by the block's full pass before; `req.rows` in the span).
    fn begin_span_block(&mut self, req: &SpanRequest<'_>, plan: &BlockPlan<'_>) -> Result<()>;
    /// Queue the block's next step; with `count`, wait for it and return the masks left.
    fn step(&mut self, count: bool) -> Result<Option<MasksLeft>>;
    /// The current tokens `[b·t]` into `x`.
    fn read_tokens(&mut self, x: &mut [u32]) -> Result<()>;
}

/// How a block of [`StepsOnDevice`] steps commits.
#[derive(Clone, Debug)]
pub struct BlockPlan<'a> {
    /// Where each batch row's pairs start in the request's rows, `[b + 1]`.
    pub seg: &'a [usize],
    /// Each batch row's schedule `[b·steps]` (row-major by batch row): step `i` commits
    /// `sched[br·steps + i]` under [`CommitRule::Quota`], one token past the schedule.
    pub sched: &'a [usize],
    pub steps: usize,
    /// The block's call the first device step is (0, or 1 for the calls of Fast-dLLM against a
    /// KV cache, after the block's full pass); it indexes the schedule and adds to the RNG step.
    pub first: usize,
    pub rule: CommitRule,
    /// Candidates are the requested pairs whose token is still this id.
    pub mask_id: u32,
    /// The positions of the block: [`MasksLeft::block`] counts the masks there.
    pub block: std::ops::Range<usize>,
}

/// The masks left after a [`StepsOnDevice`] step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MasksLeft {
    /// Requested pairs still `[MASK]` inside the block's positions.
    pub block: usize,
    /// Requested pairs still `[MASK]`.
    pub rows: usize,
}

/// A predictor that makes the step's commit selection itself, for either request kind: the
/// prediction, then the selection of every batch row as
/// [`crate::backend::commit::commit_select`] on the rows still `[MASK]` in `req.x`:
/// `c.out[i]` = the token committed at `req.rows[i]`, or −1.
pub trait SelectsCommits {
    /// [`Predictor::predict`], then the commit selection.
    fn predict_commit(&mut self, req: &PredictRequest<'_>, c: &mut Commits<'_>) -> Result<()>;
    /// [`SpanPredictor::predict_span`], then the commit selection.
    fn predict_span_commit(&mut self, req: &SpanRequest<'_>, c: &mut Commits<'_>) -> Result<()>;
}

/// A predictor of both kinds (the model): [`Predictor`] for plain passes, [`SpanPredictor`] for
/// passes against a KV cache, as one trait object ([`crate::engine::Engine::predictor`]).
pub trait Predictors: Predictor + SpanPredictor {
    fn full(&mut self) -> &mut dyn Predictor;
    fn span(&mut self) -> &mut dyn SpanPredictor;
}

impl<P: Predictor + SpanPredictor> Predictors for P {
    fn full(&mut self) -> &mut dyn Predictor {
        self
    }
    fn span(&mut self) -> &mut dyn SpanPredictor {
        self
    }
}

/// A step's commit selection, for a predictor that selects ([`SelectsCommits`]).
#[derive(Debug)]
pub struct Commits<'a> {
    /// Where each batch row's pairs start in the request's rows, `[b + 1]`.
    pub seg: &'a [usize],
    /// The quota of each batch row `[b]` (read by [`CommitRule::Quota`]).
    pub quota: &'a [usize],
    pub rule: CommitRule,
    /// Candidates are the requested positions whose token is still this id.
    pub mask_id: u32,
    /// Out: the token committed at each requested row, or −1.
    pub out: &'a mut [i32],
}

/// Writes the committed tokens `commits[i] ≥ 0` at `rows[i]` (batch row, position) of the canvas
/// `x` (rows of `t` tokens); −1 leaves the position as it is.
pub(crate) fn apply_commits(x: &mut [u32], t: usize, rows: &[(u32, u32)], commits: &[i32]) {
    for (&(br, p), &c) in rows.iter().zip(commits) {
        if c >= 0 {
            x[br as usize * t + p as usize] = c as u32;
        }
    }
}

/// Reported once per step, after its tokens were committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Steps done so far (1-based: `total_steps` after the last one).
    pub step: usize,
    pub total_steps: usize,
    /// Current block (0-based).
    pub block: usize,
    pub num_blocks: usize,
}

/// One cached forward pass: the tokens at positions `[q0, q1)` of every batch row go through the
/// network, their keys/values overwrite those rows of the predictor's KV cache, and attention
/// reads all `t` rows of the cache. `[0, t)` is a full forward pass that (re)fills the cache.
///
/// A span request is a [`PredictRequest`] (without CFG: `uncond_x` is `None`) plus the span; it
/// derefs to it, so `req.x`, `req.rows`, `req.rng_key(…)` read the full request's fields. Its
/// `rows` lie in `[q0, q1)`; `x` is read only there.
pub struct SpanRequest<'a> {
    /// The same request as one full pass over `[0, t)` would take it.
    pub full: PredictRequest<'a>,
    pub q0: usize,
    pub q1: usize,
}

impl<'a> std::ops::Deref for SpanRequest<'a> {
    type Target = PredictRequest<'a>;

    fn deref(&self) -> &PredictRequest<'a> {
        &self.full
    }
}

/// A predictor with a KV cache (the model, or a fake in tests).
pub trait SpanPredictor {
    /// Writes one `(token, confidence)` per entry of `req.rows` into `out`.
    fn predict_span(&mut self, req: &SpanRequest<'_>, out: &mut [(u32, f32)]) -> Result<()>;

    /// As [`Predictor::commit_selector`].
    fn commit_selector(&mut self) -> Option<&mut dyn SelectsCommits> {
        None
    }

    /// As [`Predictor::steps_on_device`] (Fast-dLLM decoding uses it without a KV cache only).
    fn steps_on_device(&mut self) -> Option<&mut dyn StepsOnDevice> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_apply_to_their_rows_only() {
        let mut x = vec![9u32; 8];
        apply_commits(&mut x, 4, &[(0, 1), (1, 0), (1, 3)], &[5, -1, 7]);
        assert_eq!(x, [9, 5, 9, 9, 9, 9, 9, 7]);
    }
}
