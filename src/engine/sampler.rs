//! Upstream `generate` (reference §4) over a [`Predictor`].
//!
//! The sampler owns everything between forward passes: left padding, the block schedule
//! ([`num_transfer_tokens`]), classifier-free guidance inputs, the EOS rules and the per-row
//! top-k commit. It knows nothing of weights or devices: a [`Predictor`] turns the current tokens
//! into one `(token, confidence)` pair per requested position (the model runs the LM head and
//! [`crate::backend::head::select_one`] semantics on its side).
//!
//! Algorithm, as upstream (`generate.py`, reference §4.3):
//!
//! ```text
//! x = left_pad(prompts, pad_id) ++ [MASK]·gen_length            [B, T], T = Lp + gen_length
//! prompt_index = x != MASK                                       (once; includes the pads)
//! for block in 0..num_blocks:
//!     sched[b] = num_transfer_tokens(#MASK in the block of row b, steps_per_block)
//!     for i in 0..steps_per_block:                               (one forward pass each)
//!         (x0, conf) = predict(x, uncond_x = x with prompt_index set to MASK if cfg_scale > 0)
//!         conf = −∞ where x != MASK or position >= block end
//!         per row b: commit the sched[b][i] best (confidence desc., then position asc.)
//! ```
//!
//! Only positions that can have a finite confidence are predicted: for every batch row, the
//! positions before the block end that are `[MASK]` when the block starts. That set is fixed for
//! the block (so a device can capture one graph per block shape); it is the current block plus
//! any leftover `[MASK]` before it (a `[MASK]` inside a prompt, which upstream also fills, or one
//! a model filled with the mask id itself). Upstream's top-k may also pick −∞ positions when `k`
//! exceeds the finite candidates; that never happens, because each step commits at most `k`
//! masks and the schedule of a block sums to its mask count, so at step `i` at least
//! `Σ_{j≥i} k_j ≥ k_i` masked candidates remain. Here `k` is simply capped at the candidate
//! count.
//!
//! Divergences from upstream, on purpose:
//! - `confidence_eos_eot_inf` has its intended semantics at every temperature (reference §4.4);
//!   upstream HEAD suppresses only EOT in the confidence when `temperature > 0`.
//! - NaN confidences rank as −∞ (upstream's `torch.topk` ranks NaN highest).
//! - `cfg_scale > 0` works with and without padding (upstream raises NameError without a mask).

use anyhow::{bail, Context, Result};

use crate::backend::head::{conf_order, Remasking, SelectParams};
use crate::hf::dtype::DType;

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
}

/// Longest `gen_length` accepted: the longest sequence [`crate::hf::config::LIMITS`] allows. With
/// `steps ≤ gen_length` it also bounds the steps and every schedule allocated from them.
pub const MAX_GEN_LENGTH: usize = 1 << 20;

/// Upstream `generate` arguments plus the ids the model defines.
#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub steps: usize,
    pub gen_length: usize,
    pub block_length: usize,
    pub temperature: f64,
    pub cfg_scale: f64,
    pub remasking: Remasking,
    pub seed: u64,
    pub logits_eos_inf: bool,
    pub confidence_eos_eot_inf: bool,
    pub mask_id: u32,
    pub eos_id: u32,
    /// End-of-turn id (`<|eot_id|>`), if the tokenizer has one.
    pub eot_id: Option<u32>,
    /// Id used for left padding (`pad_token_id`).
    pub pad_id: u32,
    /// The dtype the model's logits live in (its compute dtype); passed on to the head as
    /// [`SelectParams::dtype`]. The caller sets it from the model.
    pub logits_dtype: DType,
    /// The model's `max_sequence_length`, if it has one: longest padded prompt + `gen_length`.
    pub max_sequence_length: Option<usize>,
    /// One random-stream key per prompt (each below 2³¹). `None` (upstream-like, what
    /// `llada generate` uses): the head's RNG is keyed by (batch row, absolute padded position),
    /// so with sampling a prompt's result depends on its row and padding in the batch. `Some`:
    /// prompt `i` draws from the stream `(row_keys[i], position counted from its first real
    /// token)` ([`RowKey`]), so its result is the same in any batch (up to the rounding that
    /// padding changes; see `crate::batch`). With [`generate_fast`] the step counter in the key
    /// then also becomes per block (see there).
    pub row_keys: Option<Vec<u32>>,
}

impl Default for GenerateParams {
    /// Upstream `generate` defaults with the LLaDA-8B ids (reference §1, §3, §4.1).
    fn default() -> Self {
        GenerateParams {
            steps: 128,
            gen_length: 128,
            block_length: 128,
            temperature: 0.0,
            cfg_scale: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            mask_id: 126336,
            eos_id: 126081,
            eot_id: Some(126348),
            pad_id: 126081,
            logits_dtype: DType::F32,
            max_sequence_length: None,
            row_keys: None,
        }
    }
}

impl GenerateParams {
    /// Number of blocks and steps per block, or an error naming the numbers that do not fit
    /// (upstream's assertions).
    pub fn block_plan(&self) -> Result<(usize, usize)> {
        if self.gen_length == 0 {
            bail!("gen_length must be > 0");
        }
        if self.block_length == 0 {
            bail!("block_length must be > 0");
        }
        if self.steps == 0 {
            bail!("steps must be > 0");
        }
        if self.gen_length > MAX_GEN_LENGTH {
            bail!(
                "gen_length {} is more than the {MAX_GEN_LENGTH} tokens this engine generates at once",
                self.gen_length
            );
        }
        // Upstream's rule: every step commits at least one token on average. More steps than
        // tokens would run forward passes that commit nothing.
        if self.steps > self.gen_length {
            bail!(
                "steps {} is more than gen_length {}: a step commits at least one token (steps ≤ gen_length)",
                self.steps,
                self.gen_length
            );
        }
        if self.gen_length % self.block_length != 0 {
            bail!(
                "gen_length {} is not a multiple of block_length {}",
                self.gen_length,
                self.block_length
            );
        }
        let num_blocks = self.gen_length / self.block_length;
        if self.steps % num_blocks != 0 {
            bail!(
                "steps {} is not a multiple of the number of blocks {} (gen_length {} / block_length {})",
                self.steps,
                num_blocks,
                self.gen_length,
                self.block_length
            );
        }
        Ok((num_blocks, self.steps / num_blocks))
    }

    /// The [`RowKey`]s of `prompts` left-padded to `lp` tokens, or `None` without
    /// [`GenerateParams::row_keys`]; an error when the keys do not fit the prompts.
    fn row_keys_for(&self, prompts: &[Vec<u32>], lp: usize) -> Result<Option<Vec<RowKey>>> {
        let Some(keys) = &self.row_keys else {
            return Ok(None);
        };
        if keys.len() != prompts.len() {
            bail!(
                "row_keys holds {} keys for {} prompts",
                keys.len(),
                prompts.len()
            );
        }
        if let Some((i, k)) = keys.iter().enumerate().find(|(_, &k)| k > i32::MAX as u32) {
            bail!("row_keys[{i}] = {k} is not below 2^31");
        }
        // lp fits u32: the callers checked that lp + gen_length does.
        Ok(Some(
            keys.iter()
                .zip(prompts)
                .map(|(&key, p)| RowKey {
                    key,
                    origin: (lp - p.len()) as u32,
                })
                .collect(),
        ))
    }

    /// The head parameters for global step `step`.
    pub fn select_params(&self, step: u64) -> SelectParams {
        SelectParams {
            temperature: self.temperature,
            cfg_scale: self.cfg_scale,
            remasking: self.remasking,
            seed: self.seed,
            step,
            forbid: self.logits_eos_inf.then_some(self.eos_id),
            conf_suppress: if self.confidence_eos_eot_inf {
                [Some(self.eos_id), self.eot_id]
            } else {
                [None, None]
            },
            dtype: self.logits_dtype,
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

/// What [`generate`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenerateOutput {
    /// The `gen_length` generated ids of each prompt (prompt and padding removed).
    pub ids: Vec<Vec<u32>>,
    /// Forward passes as upstream counts them: one per step (a CFG step is one batched call).
    pub nfe: usize,
    /// Length of the left-padded prompts (`Lp`).
    pub prompt_len_padded: usize,
    /// Σ over calls of the number of requested (row, position) pairs.
    pub rows_predicted: usize,
}

/// `get_num_transfer_tokens` for one row: `mask_count` tokens over `steps` steps, the first
/// `mask_count % steps` steps taking one extra.
pub fn num_transfer_tokens(mask_count: usize, steps: usize) -> Vec<usize> {
    let mut out = vec![0; steps];
    num_transfer_tokens_into(mask_count, &mut out);
    out
}

/// [`num_transfer_tokens`] into a caller's buffer (`steps = out.len()`), without allocating.
pub fn num_transfer_tokens_into(mask_count: usize, out: &mut [usize]) {
    let steps = out.len();
    if steps == 0 {
        return;
    }
    let base = mask_count / steps;
    let rem = mask_count % steps;
    for (i, o) in out.iter_mut().enumerate() {
        *o = base + usize::from(i < rem);
    }
}

/// The initial batch of upstream `generate`: prompts left-padded with `pad_id` to the longest,
/// then `gen_length` masks; a key-padding mask only when lengths differ (upstream passes none
/// otherwise). Checks upstream's assertions and the model's length limit.
struct BatchLayout {
    b: usize,
    /// Padded prompt length.
    lp: usize,
    t: usize,
    n: usize,
    /// `[B·T]` tokens.
    x: Vec<u32>,
    /// `[B·T]`, 1 = real token.
    key_valid: Option<Vec<u8>>,
}

impl BatchLayout {
    pub(crate) fn new(prompts: &[Vec<u32>], params: &GenerateParams) -> Result<BatchLayout> {
        if prompts.is_empty() {
            bail!("no prompts given");
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt {i} is empty");
        }
        if params.pad_id == params.mask_id {
            bail!(
                "pad_id {} equals mask_id: padding would be generated over (upstream asserts pad != mask)",
                params.pad_id
            );
        }
        let b = prompts.len();
        let lp = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let t = lp
            .checked_add(params.gen_length)
            .context("prompt length + gen_length overflows")?;
        if let Some(max) = params.max_sequence_length {
            if t > max {
                bail!(
                    "prompt length {lp} + gen_length {} = {t} exceeds the model's max_sequence_length {max}",
                    params.gen_length
                );
            }
        }
        if u32::try_from(t).is_err() || u32::try_from(b).is_err() {
            bail!("batch {b} × length {t} does not fit u32 indices");
        }
        let n = b.checked_mul(t).context("batch × length overflows")?;
        let mask = params.mask_id;

        // x [B·T]: left padding, prompt, gen_length masks.
        let mut x = vec![mask; n];
        let padded = prompts.iter().any(|p| p.len() != lp);
        let mut key_valid = padded.then(|| vec![1u8; n]);
        for (r, p) in prompts.iter().enumerate() {
            let row = &mut x[r * t..r * t + lp];
            let pad = lp - p.len();
            row[..pad].fill(params.pad_id);
            row[pad..].copy_from_slice(p);
            if let Some(kv) = key_valid.as_mut() {
                kv[r * t..r * t + pad].fill(0);
            }
        }
        Ok(BatchLayout {
            b,
            lp,
            t,
            n,
            x,
            key_valid,
        })
    }
}

/// Upstream `generate`: fills `gen_length` masked tokens after each prompt.
///
/// Prompts of different lengths are left-padded with `params.pad_id`; the predictor then gets a
/// key-padding mask (`None` when all prompts have the same length, as upstream passes none).
pub fn generate(
    pred: &mut dyn Predictor,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    mut progress: Option<&mut dyn FnMut(Progress)>,
) -> Result<GenerateOutput> {
    let (num_blocks, steps_per_block) = params.block_plan()?;
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
    let prompt_index: Vec<bool> = x.iter().map(|&v| v != mask).collect();
    let cfg = params.cfg_scale > 0.0;
    let mut uncond_x = if cfg { vec![mask; n] } else { Vec::new() };

    // Buffers reused by every block and step.
    let mut rows: Vec<(u32, u32)> = Vec::with_capacity(n);
    let mut row_off = vec![0usize; b + 1];
    let mut out = vec![(0u32, 0f32); n];
    // (confidence, position, token) of one batch row's still-masked candidates.
    let mut cands: Vec<(f32, usize, u32)> = Vec::with_capacity(t);
    let mut sched = vec![0usize; b * steps_per_block];
    let mut select = params.select_params(0);

    let total_steps = num_blocks * steps_per_block;
    let mut nfe = 0usize;
    let mut rows_predicted = 0usize;
    for block in 0..num_blocks {
        let blk_start = lp + block * params.block_length;
        let blk_end = blk_start + params.block_length;
        rows.clear();
        for r in 0..b {
            let xr = &x[r * t..(r + 1) * t];
            // Positions < blk_end, so < t <= u32::MAX (checked above).
            rows.extend(
                (0..blk_end)
                    .filter(|&p| xr[p] == mask)
                    .map(|p| (r as u32, p as u32)),
            );
            row_off[r + 1] = rows.len();
            let in_block = xr[blk_start..blk_end]
                .iter()
                .filter(|&&v| v == mask)
                .count();
            num_transfer_tokens_into(
                in_block,
                &mut sched[r * steps_per_block..(r + 1) * steps_per_block],
            );
        }
        let nr = rows.len();
        for i in 0..steps_per_block {
            let step = block * steps_per_block + i;
            if cfg {
                for ((u, &v), &is_prompt) in uncond_x.iter_mut().zip(&x).zip(&prompt_index) {
                    *u = if is_prompt { mask } else { v };
                }
            }
            select.step = step as u64;
            let req = PredictRequest {
                b,
                t,
                x: &x,
                uncond_x: cfg.then_some(uncond_x.as_slice()),
                key_valid: key_valid.as_deref(),
                rows: &rows,
                select: &select,
                row_keys: row_keys.as_deref(),
            };
            pred.predict(&req, &mut out[..nr])
                .with_context(|| format!("forward pass at step {step} (block {block})"))?;
            nfe += 1;
            rows_predicted += nr;

            for r in 0..b {
                let k = sched[r * steps_per_block + i];
                if k == 0 {
                    continue;
                }
                cands.clear();
                for (&(_, p), &(tok, conf)) in rows[row_off[r]..row_off[r + 1]]
                    .iter()
                    .zip(&out[row_off[r]..row_off[r + 1]])
                {
                    let p = p as usize;
                    if x[r * t + p] == mask {
                        cands.push((conf, p, tok));
                    }
                }
                // Positions are distinct, so conf_order is a total order and an unstable
                // (non-allocating) sort gives the same result as head::top_k.
                cands.sort_unstable_by(|a, c| conf_order((a.0, a.1), (c.0, c.1)));
                for &(_, p, tok) in cands.iter().take(k) {
                    x[r * t + p] = tok;
                }
            }
            if let Some(cb) = progress.as_mut() {
                cb(Progress {
                    step: step + 1,
                    total_steps,
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

impl std::str::FromStr for CacheMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(CacheMode::None),
            "prefix" => Ok(CacheMode::Prefix),
            "dual" => Ok(CacheMode::Dual),
            _ => bail!("unknown cache mode {s:?} (expected none, prefix or dual)"),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Prefix => "prefix",
            CacheMode::Dual => "dual",
        })
    }
}

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
}

/// How many of `n` candidates, sorted by confidence descending (`sorted`), a step commits.
fn commit_count(sorted: &[(f32, usize, u32)], quota: usize, d: &Decode) -> usize {
    let n = sorted.len();
    if n == 0 {
        return 0;
    }
    if let Some(factor) = d.factor {
        // get_transfer_index_dynamic: thresholds 1 − factor/(j+1) for the 1-based rank j ≥ 2
        // (rank 1 always passes); stop at the first failing rank f (0-based) and commit f, except
        // that a stop at the last rank (or none) commits all n (upstream quirk, §7.6).
        let fail = (1..n).find(|&f| (sorted[f].0 as f64) < 1.0 - factor / (f as f64 + 2.0));
        return match fail {
            Some(f) if f < n - 1 => f,
            _ => n,
        };
    }
    if let Some(th) = d.threshold {
        // get_transfer_index with a threshold: the top-1, then every candidate not `< th`.
        return 1 + sorted[1..]
            .iter()
            .take_while(|c| (c.0 as f64) >= th)
            .count();
    }
    quota.min(n)
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
            pred.predict_span(&req, &mut out[..nr])
                .with_context(|| format!("forward pass {nfe} (block {block}, step {i})"))?;
            nfe += 1;
            rows_predicted += nr;

            for r in 0..b {
                cands.clear();
                for (&(_, p), &(tok, conf)) in rows[row_off[r]..row_off[r + 1]]
                    .iter()
                    .zip(&out[row_off[r]..row_off[r + 1]])
                {
                    cands.push((conf, p as usize, tok));
                }
                cands.sort_unstable_by(|a, c| conf_order((a.0, a.1), (c.0, c.1)));
                let quota = if i < steps_per_block {
                    sched[r * steps_per_block + i]
                } else {
                    1
                };
                let k = commit_count(&cands, quota, decode);
                for &(_, p, tok) in cands.iter().take(k) {
                    x[r * t + p] = tok;
                }
            }
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

impl GenerateOutput {
    /// The output of a finished generation on the canvas `x` (`b` rows of `t` tokens, prompts
    /// left-padded to `lp`): each row's generated tail.
    fn from_canvas(
        x: &[u32],
        b: usize,
        t: usize,
        lp: usize,
        nfe: usize,
        rows_predicted: usize,
    ) -> Self {
        GenerateOutput {
            ids: (0..b)
                .map(|r| x[r * t + lp..(r + 1) * t].to_vec())
                .collect(),
            nfe,
            prompt_len_padded: lp,
            rows_predicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_upstream_examples() {
        assert_eq!(num_transfer_tokens(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(num_transfer_tokens(3, 5), vec![1, 1, 1, 0, 0]);
        assert_eq!(num_transfer_tokens(0, 3), vec![0, 0, 0]);
        assert_eq!(num_transfer_tokens(8, 8), vec![1; 8]);
    }

    fn c(confs: &[f32]) -> Vec<(f32, usize, u32)> {
        confs.iter().enumerate().map(|(i, &c)| (c, i, 0)).collect()
    }

    #[test]
    fn threshold_rule_commits_top1_then_ties_at_threshold() {
        let d = Decode {
            threshold: Some(0.5),
            ..Decode::default()
        };
        assert_eq!(commit_count(&c(&[0.4, 0.3]), 0, &d), 1);
        assert_eq!(commit_count(&c(&[0.9, 0.5, 0.49]), 0, &d), 2);
        assert_eq!(commit_count(&c(&[]), 0, &d), 0);
        let never = Decode {
            threshold: Some(1.01),
            ..Decode::default()
        };
        assert_eq!(commit_count(&c(&[1.0, 1.0, 1.0]), 0, &never), 1);
    }

    #[test]
    fn factor_rule_follows_upstream_quirks() {
        // factor 1: thresholds (1-based rank j ≥ 2) 1 − 1/(j+1): 2/3, 3/4, 4/5, …
        let d = Decode {
            factor: Some(1.0),
            ..Decode::default()
        };
        // rank 2 fails (0.6 < 2/3), not the last rank: commit 1.
        assert_eq!(commit_count(&c(&[0.9, 0.6, 0.1]), 0, &d), 1);
        // rank 3 fails (0.7 < 3/4) and is the last: upstream commits all 3.
        assert_eq!(commit_count(&c(&[0.9, 0.7, 0.7]), 0, &d), 3);
        // nothing fails: all.
        assert_eq!(commit_count(&c(&[0.99, 0.9, 0.8]), 0, &d), 3);
        // rank 3 fails with a 4th after it: commit 2.
        assert_eq!(commit_count(&c(&[0.99, 0.9, 0.7, 0.7]), 0, &d), 2);
        assert_eq!(commit_count(&c(&[0.01]), 0, &d), 1);
    }
}
