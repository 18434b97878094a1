//! The training losses of reference §6, as [`Batch`]es: which tokens are masked, and the loss
//! weight of each masked row. The model then computes `Σ_r weight[r]·CE_r`
//! ([`super::model::forward_backward`]).
//!
//! Randomness is counter-based ([`crate::rng`]), so a batch is a pure function of
//! `(seed, micro-step, batch row, position)` and a resumed run masks exactly as an
//! uninterrupted one. Streams (distinct from the sampler's 1–3):
//! - [`STREAM_TRAIN_T`]: `t ~ U(0,1)` of batch row `row` at micro-step `s`:
//!   `uniform(bits(cell_key(seed, 16, s, row, 0), 0))`;
//! - [`STREAM_TRAIN_MASK`]: the per-token draw, `uniform(bits(cell_key(seed, 17, s, row, 0), pos))`,
//!   masked when `< p`;
//! - [`STREAM_TRAIN_TRUNC`]: the 1 % batch truncation: `u0 = uniform(bits(k, 0))` with
//!   `k = cell_key(seed, 18, s, 0, 0)`; when `u0 < 0.01` the length becomes
//!   `1 + ⌊uniform(bits(k, 1))·L⌋`;
//! - [`STREAM_TRAIN_DATA`]: the data order (see [`super::data`]).
//!
//! Draws are f64; `p = (1 − 1e-3)·t + 1e-3` is computed in f64 and the comparison `u < p` is in
//! f64 (upstream draws f32 `torch.rand`; the distribution is the same, the bits are not).

use anyhow::{ensure, Result};

use super::model::Batch;
use crate::rng::{bits, cell_key, uniform};

pub const STREAM_TRAIN_T: u64 = 16;
pub const STREAM_TRAIN_MASK: u64 = 17;
pub const STREAM_TRAIN_TRUNC: u64 = 18;
pub const STREAM_TRAIN_DATA: u64 = 19;

/// Upstream's `eps`: the smallest mask probability.
pub const MASK_EPS: f64 = 1e-3;
/// Probability that a pretraining batch is cut to a random length.
pub const TRUNC_PROB: f64 = 0.01;

/// The mask probability `p_b` of batch row `row` at micro-step `step`.
pub fn mask_prob(seed: u64, step: u64, row: u64) -> f64 {
    let t = uniform(bits(cell_key(seed, STREAM_TRAIN_T, step, row, 0), 0));
    (1.0 - MASK_EPS) * t + MASK_EPS
}

/// Whether position `pos` of batch row `row` is masked at micro-step `step` with probability `p`.
pub fn is_masked(seed: u64, step: u64, row: u64, pos: u64, p: f64) -> bool {
    uniform(bits(cell_key(seed, STREAM_TRAIN_MASK, step, row, 0), pos)) < p
}

/// The length a pretraining batch of length `t` is cut to at micro-step `step` (`t` itself in
/// 99 % of the steps).
pub fn truncated_len(seed: u64, step: u64, t: usize) -> usize {
    let k = cell_key(seed, STREAM_TRAIN_TRUNC, step, 0, 0);
    if uniform(bits(k, 0)) < TRUNC_PROB {
        (1 + (uniform(bits(k, 1)) * t as f64) as usize).min(t)
    } else {
        t
    }
}

/// How the masks of one micro-batch are drawn and its loss rows weighted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Draw {
    /// The id that replaces a masked token.
    pub mask_id: u32,
    /// The run's seed.
    pub seed: u64,
    /// The micro-step: draws are keyed by it (and by the global row).
    pub step: u64,
    /// Multiplies every weight (`1/accumulation steps`).
    pub scale: f64,
    /// The rows of the global batch this process holds (`None`: all of them, one process).
    pub span: Option<RowSpan>,
}

impl Draw {
    /// Draws for a one-process batch.
    pub fn new(mask_id: u32, seed: u64, step: u64, scale: f64) -> Draw {
        Draw {
            mask_id,
            seed,
            step,
            scale,
            span: None,
        }
    }

    /// The span of a batch of `b` rows, checked (see [`RowSpan`]).
    fn span(&self, b: usize, what: &str) -> Result<RowSpan> {
        let span = self.span.unwrap_or(RowSpan::whole(b));
        span.check(b, what)?;
        Ok(span)
    }

    /// Append one row of clean `ids` (global row `g`) to `out`: its mask probability `p` is
    /// drawn, each position drawn as masked (from `keep` on) is replaced by the mask id and made
    /// a loss row (flat index `base + pos`) of weight `weight(p)`.
    fn push_row(
        &self,
        out: &mut Batch,
        ids: &[u32],
        base: usize,
        g: u64,
        keep: usize,
        weight: impl FnOnce(f64) -> f64,
    ) {
        let p = mask_prob(self.seed, self.step, g);
        let w = weight(p);
        for (pos, &id) in ids.iter().enumerate() {
            if pos >= keep && is_masked(self.seed, self.step, g, pos as u64, p) {
                out.ids.push(self.mask_id);
                out.rows.push((base + pos) as u32);
                out.targets.push(id);
                out.weights.push(w);
            } else {
                out.ids.push(id);
            }
        }
    }
}

/// Which rows of a global micro-batch a process holds (data parallelism, see
/// [`super::dist`]): its `b` rows are global rows `first .. first + b` of `global`. Mask draws
/// are keyed by the global row, and loss weights normalise by the global batch, so the sum over
/// ranks of their losses (and gradients) is the one-process loss of the global batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowSpan {
    pub first: usize,
    pub global: usize,
}

impl RowSpan {
    /// All `b` rows (one process).
    pub fn whole(b: usize) -> RowSpan {
        RowSpan {
            first: 0,
            global: b,
        }
    }

    /// `b` rows starting at `first` must lie inside the global batch.
    fn check(&self, b: usize, what: &str) -> Result<()> {
        ensure!(
            self.first + b <= self.global,
            "{what}: rows {}..{} of a global batch of {}",
            self.first,
            self.first + b,
            self.global
        );
        Ok(())
    }
}

/// Pretraining (reference §6.1) over clean sequences `clean` (`[b, t]`): per row
/// `p = (1−eps)·t + eps`, every token masked independently with probability `p`, row weight
/// `1/(p·B·L)` (`L` after truncation, `B` the global batch), so the loss is
/// `Σ_masked CE/p / (B·L)`. With `truncate`, 1 % of the batches are cut to a random length
/// first.
pub fn pretrain_batch(clean: &[u32], b: usize, t: usize, truncate: bool, d: Draw) -> Result<Batch> {
    let span = d.span(b, "pretrain batch")?;
    ensure!(
        clean.len() == b * t && b > 0 && t > 0,
        "pretrain batch: {} tokens for b·t = {b}·{t}",
        clean.len()
    );
    let l = if truncate {
        truncated_len(d.seed, d.step, t)
    } else {
        t
    };
    let mut out = Batch {
        b,
        t: l,
        ..Batch::default()
    };
    for row in 0..b {
        let g = (span.first + row) as u64;
        let ids = &clean[row * t..row * t + l];
        d.push_row(&mut out, ids, row * l, g, 0, |p| {
            d.scale / (p * (span.global * l) as f64)
        });
    }
    Ok(out)
}

/// SFT (reference §6.2) over clean sequences `clean` (`[b, t]`, right-padded with EOS, which
/// counts as answer) whose first `prompt_lens[row]` tokens are the prompt: the prompt is never
/// masked; the answer is masked as in pretraining; row weight `1/(p·answer_len·B)`, so each
/// row's loss is divided by its answer length and the rows are averaged.
pub fn sft_batch(
    clean: &[u32],
    prompt_lens: &[usize],
    b: usize,
    t: usize,
    d: Draw,
) -> Result<Batch> {
    let span = d.span(b, "sft batch")?;
    ensure!(
        clean.len() == b * t && b > 0 && prompt_lens.len() == b,
        "sft batch: {} tokens and {} prompt lengths for b·t = {b}·{t}",
        clean.len(),
        prompt_lens.len()
    );
    let mut out = Batch {
        b,
        t,
        ..Batch::default()
    };
    for (row, &pl) in prompt_lens.iter().enumerate() {
        ensure!(
            pl < t,
            "sft batch: row {row} has a prompt of {pl} tokens, leaving no answer in {t}"
        );
        let g = (span.first + row) as u64;
        let ids = &clean[row * t..(row + 1) * t];
        d.push_row(&mut out, ids, row * t, g, pl, |p| {
            d.scale / (p * (t - pl) as f64 * span.global as f64)
        });
    }
    Ok(out)
}

/// The `llada grad` loss: one sequence `ids`, the given positions masked, weight `1/(P·T)` each
/// (`Σ CE / P` over them, divided by the number of ids).
pub fn fixed_mask_batch(ids: &[u32], masked: &[usize], p_mask: f64, mask_id: u32) -> Result<Batch> {
    let t = ids.len();
    ensure!(t > 0, "grad: no ids");
    ensure!(
        p_mask > 0.0 && p_mask <= 1.0,
        "grad: --p-mask {p_mask} must be in (0, 1]"
    );
    let mut noisy = ids.to_vec();
    let mut sorted = masked.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    ensure!(
        sorted.len() == masked.len(),
        "grad: --masked lists a position twice"
    );
    let mut out = Batch {
        b: 1,
        t,
        ..Batch::default()
    };
    for &pos in &sorted {
        ensure!(
            pos < t,
            "grad: masked position {pos} is outside the {t} ids"
        );
        noisy[pos] = mask_id;
        out.rows.push(pos as u32);
        out.targets.push(ids[pos]);
        out.weights.push(1.0 / (p_mask * t as f64));
    }
    out.ids = noisy;
    Ok(out)
}
