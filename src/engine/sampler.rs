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

use crate::backend::commit::CommitRule;
use crate::backend::head::{Remasking, SelectParams};
use crate::hf::dtype::DType;

pub use super::predict::{
    rng_key, BlockPlan, Commits, MasksLeft, PredictRequest, Predictor, Predictors, Progress,
    RowKey, SelectsCommits, SpanPredictor, SpanRequest, StepsOnDevice,
};
use super::step::{device_steps, Asked, Calls};
pub use super::step::{num_transfer_tokens, num_transfer_tokens_into, Hooks, Observer};

/// Longest `gen_length` accepted: the longest sequence [`crate::hf::config::LIMITS`] allows. With
/// `steps ≤ gen_length` it also bounds the steps and every schedule allocated from them.
pub const MAX_GEN_LENGTH: usize = 1 << 20;

/// Upstream `generate` arguments plus the ids the model defines.
#[derive(Clone, Debug, PartialEq)]
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
    /// padding changes; see `crate::batch`). With [`super::fast::generate_fast`] the step counter in the key
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

    /// These sampling arguments (`steps` … `confidence_eos_eot_inf`) with the model's ids and
    /// limits, logits dtype and row keys taken from `model`.
    pub fn with_model_of(&self, model: &GenerateParams) -> GenerateParams {
        GenerateParams {
            mask_id: model.mask_id,
            eos_id: model.eos_id,
            eot_id: model.eot_id,
            pad_id: model.pad_id,
            logits_dtype: model.logits_dtype,
            max_sequence_length: model.max_sequence_length,
            row_keys: model.row_keys.clone(),
            ..self.clone()
        }
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

/// The initial batch of upstream `generate`: prompts left-padded with `pad_id` to the longest,
/// then `gen_length` masks; a key-padding mask only when lengths differ (upstream passes none
/// otherwise), and the prompts' [`RowKey`]s. Checks upstream's assertions and the model's length
/// limit.
pub(super) struct BatchLayout {
    pub(super) b: usize,
    /// Padded prompt length.
    pub(super) lp: usize,
    pub(super) t: usize,
    pub(super) n: usize,
    /// `[B·T]`, 1 = real token.
    key_valid: Option<Vec<u8>>,
    /// [`GenerateParams::row_keys`] as [`RowKey`]s.
    pub(super) row_keys: Option<Vec<RowKey>>,
}

impl BatchLayout {
    /// The layout and the initial tokens `x` `[B·T]`.
    pub(crate) fn new(
        prompts: &[Vec<u32>],
        params: &GenerateParams,
    ) -> Result<(BatchLayout, Vec<u32>)> {
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
        let row_keys = params.row_keys_for(prompts, lp)?;
        let layout = BatchLayout {
            b,
            lp,
            t,
            n,
            key_valid,
            row_keys,
        };
        Ok((layout, x))
    }

    /// The request of one call over the canvas `x`: `rows` (batch row, position) to predict.
    pub(super) fn request<'a>(
        &'a self,
        x: &'a [u32],
        uncond_x: Option<&'a [u32]>,
        rows: &'a [(u32, u32)],
        select: &'a SelectParams,
    ) -> PredictRequest<'a> {
        PredictRequest {
            b: self.b,
            t: self.t,
            x,
            uncond_x,
            key_valid: self.key_valid.as_deref(),
            rows,
            select,
            row_keys: self.row_keys.as_deref(),
        }
    }

    /// The output of a finished generation on the canvas `x`: each row's generated tail.
    pub(super) fn output(&self, x: &[u32], calls: &Calls) -> GenerateOutput {
        let (t, lp) = (self.t, self.lp);
        GenerateOutput {
            ids: x.chunks_exact(t).map(|row| row[lp..].to_vec()).collect(),
            nfe: calls.nfe,
            prompt_len_padded: lp,
            rows_predicted: calls.rows_predicted,
        }
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
    progress: Option<&mut dyn FnMut(Progress)>,
) -> Result<GenerateOutput> {
    let observe = None;
    generate_hooked(pred, prompts, params, Hooks { progress, observe })
}

/// [`generate`] with both [`Hooks`].
pub fn generate_hooked(
    pred: &mut dyn Predictor,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    mut hooks: Hooks<'_>,
) -> Result<GenerateOutput> {
    let (num_blocks, steps_per_block) = params.block_plan()?;
    let (layout, mut x) = BatchLayout::new(prompts, params)?;
    let (t, lp) = (layout.t, layout.lp);
    let mask = params.mask_id;
    let prompt_index: Vec<bool> = x.iter().map(|&v| v != mask).collect();
    let cfg = params.cfg_scale > 0.0;
    let mut uncond_x = if cfg {
        vec![mask; layout.n]
    } else {
        Vec::new()
    };

    // The unconditional tokens: the prompt masked, the rest as in x.
    let unconditional = |u: &mut [u32], x: &[u32]| {
        for ((u, &v), &is_prompt) in u.iter_mut().zip(x).zip(&prompt_index) {
            *u = if is_prompt { mask } else { v };
        }
    };

    // Buffers reused by every block and step.
    let mut asked = Asked::new(layout.b, layout.n);
    // Whole steps on the device (LLADA_STEP_GRAPH=1), else one call per step.
    let on_device = pred.steps_on_device().is_some();
    let selects = on_device || pred.commit_selector().is_some();
    let rule = (CommitRule::Quota, mask);
    let plan = (num_blocks, steps_per_block, num_blocks * steps_per_block);
    let mut calls = Calls::new((layout.b, t), plan, rule, selects);
    let mut select = params.select_params(0);

    for block in 0..num_blocks {
        let blk_start = lp + block * params.block_length;
        let blk_end = blk_start + params.block_length;
        asked.masks(&x, t, 0..blk_end, mask);
        calls.schedule(&x, blk_start..blk_end);
        if on_device {
            // The device keeps the tokens (and their unconditional copy) through the block.
            let dev = device_steps(pred.steps_on_device())?;
            if cfg {
                unconditional(&mut uncond_x, &x);
            }
            select.step = (block * steps_per_block) as u64;
            let uncond = cfg.then_some(uncond_x.as_slice());
            let req = layout.request(&x, uncond, &asked.rows, &select);
            dev.begin_block(&req, &calls.block_plan(&asked, blk_start..blk_end, 0))
                .with_context(|| format!("starting block {block} on the device"))?;
            for i in 0..steps_per_block {
                let step = block * steps_per_block + i;
                calls.device_pass(
                    (&mut x, asked.rows.len()),
                    (&mut hooks, block),
                    (&mut *dev, false),
                    || format!("device step {step} (block {block})"),
                )?;
            }
            dev.read_tokens(&mut x)?;
            continue;
        }
        for i in 0..steps_per_block {
            let step = block * steps_per_block + i;
            if cfg {
                unconditional(&mut uncond_x, &x);
            }
            select.step = step as u64;
            calls.set_quota(i);
            let uncond = cfg.then_some(uncond_x.as_slice());
            calls.pass(
                &mut x,
                &asked,
                (&mut hooks, block),
                |x, rows, want| want.of(&mut *pred, &layout.request(x, uncond, rows, &select)),
                || format!("forward pass at step {step} (block {block})"),
            )?;
        }
    }
    Ok(layout.output(&x, &calls))
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
}
