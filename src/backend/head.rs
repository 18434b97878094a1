//! From logits to (token, confidence): the part of upstream `generate` that runs per position.
//!
//! This is the CPU reference of the fused head kernel (`kernels/head_select.cu`): CFG mixing,
//! `logits_eos_inf`, Gumbel-max sampling in f64, the softmax confidence (or a random one), and
//! the per-row top-k / threshold selection with a written tie rule. The fake predictors in the
//! tests call the same functions, so the sampler is tested against exactly what the model uses.
//!
//! Rules (shared with the CUDA kernels):
//! - argmax ties break to the **lowest token id**; NaN logits are never chosen;
//! - top-k orders by confidence descending, ties to the **lowest position**; NaN counts as −∞.

use crate::hf::dtype::DType;
use crate::rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remasking {
    LowConfidence,
    Random,
}

/// The `--remasking` names.
const REMASKINGS: &[(&str, Remasking)] = &[
    ("low_confidence", Remasking::LowConfidence),
    ("random", Remasking::Random),
];

crate::names::named_enum!(Remasking, "remasking", REMASKINGS);

/// Everything the head needs besides the logits.
#[derive(Clone, Debug)]
pub struct SelectParams {
    /// Gumbel temperature; 0 = greedy argmax.
    pub temperature: f64,
    /// Classifier-free guidance scale; when > 0 every position comes with an unconditional row
    /// and the logits are `un + (cfg_scale + 1)·(cond − un)`, each op rounded to `dtype`.
    pub cfg_scale: f64,
    pub remasking: Remasking,
    pub seed: u64,
    /// Global step index (0-based over the whole generation); keys the RNG.
    pub step: u64,
    /// `logits_eos_inf`: this token's logit is −∞ before sampling and confidence.
    pub forbid: Option<u32>,
    /// `confidence_eos_eot_inf` (intended semantics): these tokens' logits are −∞ in the
    /// confidence softmax only, after the token was chosen.
    pub conf_suppress: [Option<u32>; 2],
    /// The dtype logits live in (the model's compute dtype): CFG mixing and the confidence are
    /// rounded to it, as PyTorch does on a tensor of that dtype.
    pub dtype: DType,
}

impl Default for SelectParams {
    fn default() -> Self {
        SelectParams {
            temperature: 0.0,
            cfg_scale: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            step: 0,
            forbid: None,
            conf_suppress: [None, None],
            dtype: DType::F32,
        }
    }
}

/// Mix conditional and unconditional logits in place into `cond` (CFG), rounding each op.
pub fn cfg_mix(cond: &mut [f32], uncond: &[f32], cfg_scale: f64, dtype: DType) {
    let s = (cfg_scale + 1.0) as f32;
    for (c, &u) in cond.iter_mut().zip(uncond) {
        let d = dtype.round(*c - u);
        let m = dtype.round(s * d);
        *c = dtype.round(u + m);
    }
}

/// Pick the token and its confidence for one position.
///
/// `logits` are the (already CFG-mixed) logits of that position, `row`/`col` its batch row and
/// absolute position (RNG key). `logits` may be modified (forbidden token set to −∞).
pub fn select_one(logits: &mut [f32], row: u32, col: u32, p: &SelectParams) -> (u32, f32) {
    if let Some(f) = p.forbid {
        if let Some(l) = logits.get_mut(f as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    // Token: argmax of logits (+ τ·Gumbel in f64). Lowest id wins ties; NaN never wins.
    let mut best = 0usize;
    if p.temperature > 0.0 {
        let key = rng::cell_key(p.seed, rng::STREAM_GUMBEL, p.step, row as u64, col as u64);
        let mut bv = f64::NEG_INFINITY;
        let mut found = false;
        for (v, &l) in logits.iter().enumerate() {
            let g = rng::gumbel(rng::uniform(rng::bits(key, v as u64)));
            let s = l as f64 + p.temperature * g;
            if !s.is_nan() && (!found || s > bv) {
                bv = s;
                best = v;
                found = true;
            }
        }
    } else {
        let mut bv = f32::NEG_INFINITY;
        let mut found = false;
        for (v, &l) in logits.iter().enumerate() {
            if !l.is_nan() && (!found || l > bv) {
                bv = l;
                best = v;
                found = true;
            }
        }
    }
    let conf = match p.remasking {
        Remasking::Random => {
            let key = rng::cell_key(
                p.seed,
                rng::STREAM_RANDOM_CONF,
                p.step,
                row as u64,
                col as u64,
            );
            rng::uniform(rng::bits(key, 0)) as f32
        }
        Remasking::LowConfidence => {
            let suppressed = |v: usize| p.conf_suppress.contains(&Some(v as u32));
            let mut m = f32::NEG_INFINITY;
            for (v, &l) in logits.iter().enumerate() {
                if !suppressed(v) && l > m {
                    m = l;
                }
            }
            if suppressed(best) || m == f32::NEG_INFINITY {
                0.0
            } else {
                let mut sum = 0.0f32;
                for (v, &l) in logits.iter().enumerate() {
                    if !suppressed(v) {
                        sum += (l - m).exp();
                    }
                }
                p.dtype.round((logits[best] - m).exp() / sum)
            }
        }
    };
    (best as u32, conf)
}

/// Orders candidates for commitment: confidence descending, then position ascending.
/// NaN confidences sort as −∞.
pub fn conf_order(a: (f32, usize), b: (f32, usize)) -> std::cmp::Ordering {
    let ka = if a.0.is_nan() { f32::NEG_INFINITY } else { a.0 };
    let kb = if b.0.is_nan() { f32::NEG_INFINITY } else { b.0 };
    kb.partial_cmp(&ka)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// Indices (into `cands`) of the `k` best candidates under [`conf_order`], written into `out`
/// (cleared first). `cands` holds (confidence, position) pairs.
pub fn top_k(cands: &[(f32, usize)], k: usize, out: &mut Vec<usize>) {
    out.clear();
    out.extend(0..cands.len());
    out.sort_by(|&i, &j| conf_order(cands[i], cands[j]));
    out.truncate(k);
}

/// Fast-dLLM threshold rule: always the best candidate, plus every other one with
/// confidence ≥ `threshold`. Same order and tie rule as [`top_k`].
pub fn threshold_select(cands: &[(f32, usize)], threshold: f32, out: &mut Vec<usize>) {
    out.clear();
    out.extend(0..cands.len());
    out.sort_by(|&i, &j| conf_order(cands[i], cands[j]));
    let keep = out
        .iter()
        .enumerate()
        .take_while(|(j, &i)| *j == 0 || cands[i].0 >= threshold)
        .count();
    out.truncate(keep);
}
