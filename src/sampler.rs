//! Upstream `generate` (reference §4) over a [`Predictor`].
//!
//! TODO(helper): the algorithm.

use anyhow::Result;

use crate::head::{Remasking, SelectParams};

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
    /// whole block, so devices can reuse a captured graph.
    pub rows: &'a [(u32, u32)],
    /// How to turn logits into (token, confidence); `step` is set per call.
    pub select: &'a SelectParams,
}

/// Something that predicts masked tokens: the model on some backend, or a fake in tests.
pub trait Predictor {
    /// Writes one `(token, confidence)` per entry of `req.rows` into `out`.
    fn predict(&mut self, req: &PredictRequest<'_>, out: &mut [(u32, f32)]) -> Result<()>;
}

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
}
