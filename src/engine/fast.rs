//! Fast-dLLM decoding (reference §7) over a [`SpanPredictor`]: the prefix / dual KV cache and
//! the threshold / factor commit rules, split from [`super::sampler`] (upstream `generate`),
//! whose batch layout, schedule and commit selection it shares.

use anyhow::{bail, Context, Result};

use super::predict::{Commits, Progress, SpanPredictor, SpanRequest, StepsOnDevice};
use super::sampler::{BatchLayout, GenerateOutput, GenerateParams, Hooks};
use super::step::{device_steps, selector, Asked, Calls, Pass};
use crate::backend::commit::CommitRule;

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

impl<'a> Pass<SpanRequest<'a>> for dyn SpanPredictor + '_ {
    fn predict_rows(&mut self, req: &SpanRequest<'a>, out: &mut [(u32, f32)]) -> Result<()> {
        self.predict_span(req, out)
    }
    fn commit_rows(&mut self, req: &SpanRequest<'a>, c: &mut Commits<'_>) -> Result<()> {
        selector(self.commit_selector())?.predict_span_commit(req, c)
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
/// With whole steps on the device (`LLADA_STEP_GRAPH=1`, [`StepsOnDevice`]) every call without a
/// cache, and every call after the first with one, runs as a device step over the masks the
/// block held when its device steps began (the device skipping the ones committed since).
/// `select.step` is the call counter (0-based) for the Gumbel noise; with
/// [`GenerateParams::row_keys`] it is `(block << 32) | call in block` instead, so that a prompt's
/// random numbers do not depend on how many calls its batch neighbours needed. CFG is not part of
/// Fast-dLLM and is rejected; the EOS options and left padding work as in [`generate`](super::sampler::generate) (all rows
/// share the block positions, since padding is on the left).
pub fn generate_fast(
    pred: &mut dyn SpanPredictor,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    decode: &Decode,
    progress: Option<&mut dyn FnMut(Progress)>,
) -> Result<GenerateOutput> {
    let observe = None;
    generate_fast_hooked(pred, prompts, params, decode, Hooks { progress, observe })
}

/// [`generate_fast`] with both [`Hooks`].
pub fn generate_fast_hooked(
    pred: &mut dyn SpanPredictor,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    decode: &Decode,
    mut hooks: Hooks<'_>,
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
    let (layout, mut x) = BatchLayout::new(prompts, params)?;
    let (t, lp) = (layout.t, layout.lp);
    let mask = params.mask_id;
    let mut asked = Asked::new(layout.b, layout.n);
    // Whole steps on the device (LLADA_STEP_GRAPH=1): every call of a block without a KV cache,
    // the calls after the block's full pass with one.
    let on_device = pred.steps_on_device().is_some();
    let selects = pred.commit_selector().is_some();
    let fixed = decode.threshold.is_none() && decode.factor.is_none();
    let total_steps = if fixed {
        num_blocks * steps_per_block
    } else {
        params.gen_length
    };
    let plan = (num_blocks, steps_per_block, total_steps);
    let mut calls = Calls::new((layout.b, t), plan, (decode.rule(), mask), selects);
    let mut select = params.select_params(0);

    for block in 0..num_blocks {
        let s = lp + block * params.block_length;
        let e = s + params.block_length;
        calls.schedule(&x, s..e);
        let mut i = 0usize;
        loop {
            let block_done = !x.chunks_exact(t).any(|xr| xr[s..e].contains(&mask));
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
            asked.masks(&x, t, c0..e, mask);
            // With row keys, (block, call in block): a row's i-th call of a block is the same
            // call in any batch (rows that finish early only get extra calls that commit
            // nothing), whereas `nfe` counts the calls its batch neighbours needed too.
            let nfe = calls.nfe;
            select.step = if layout.row_keys.is_some() {
                ((block as u64) << 32) | i as u64
            } else {
                nfe as u64
            };
            if on_device && (i > 0 || decode.cache == CacheMode::None) {
                // The rest of the block as whole device steps: every call without a cache (its
                // pairs those of the block start: the device skips the ones committed since),
                // the calls against the cache after the first.
                let dev = device_steps(pred.steps_on_device())?;
                let full = layout.request(&x, None, &asked.rows, &select);
                let plan = calls.block_plan(&asked, s..e, i);
                if i == 0 {
                    dev.begin_block(&full, &plan)
                } else {
                    dev.begin_span_block(&SpanRequest { full, q0, q1 }, &plan)
                }
                .with_context(|| format!("starting block {block} on the device at call {i}"))?;
                device_block(
                    &mut calls,
                    dev,
                    (&mut x, asked.rows.len()),
                    (&mut hooks, block),
                )?;
                break;
            }
            // A block whose quota ran out with masks left commits one token per further call.
            calls.set_quota(i);
            calls.pass(
                &mut x,
                &asked,
                (&mut hooks, block),
                |x, rows, want| {
                    let full = layout.request(x, None, rows, &select);
                    want.of(&mut *pred, &SpanRequest { full, q0, q1 })
                },
                || format!("forward pass {nfe} (block {block}, step {i})"),
            )?;
            i += 1;
        }
    }
    Ok(layout.output(&x, &calls))
}

/// The calls of block `block` on the device `dev` (begun) until no mask is left in it, the first
/// over `nr` pairs, each over the masks the one before left; then the tokens back into `x`.
fn device_block(
    calls: &mut Calls,
    dev: &mut dyn StepsOnDevice,
    (x, mut nr): (&mut [u32], usize),
    (hooks, block): (&mut Hooks<'_>, usize),
) -> Result<()> {
    // Every call commits at least one token of a row with masks left, so a block of `nr` masks
    // ends within `nr` calls; a device that commits nothing is an error, not a spin.
    let cap = nr + 1;
    for _ in 0..cap {
        let nfe = calls.nfe;
        let left = calls
            .device_pass(
                (&mut *x, nr),
                (&mut *hooks, block),
                (&mut *dev, true),
                || format!("device step {nfe} (block {block})"),
            )?
            .context("the device step returned no count")?;
        nr = left.rows;
        if left.block == 0 {
            return dev.read_tokens(x);
        }
    }
    bail!(
        "block {block}: the device steps left masks after {cap} calls (each call must commit at \
         least one token; the step kernels are wrong on this device)"
    )
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
