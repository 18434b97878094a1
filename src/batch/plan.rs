//! See [`super`]: the `plan` part of offline batch generation.

use super::request::*;
use crate::hf::config::ModelConfig;
use std::collections::HashMap;

/// Requests grouped by generation parameters, each group sorted by prompt length (then line),
/// cut into batches of at most `max_batch(opts, longest_prompt)` requests. Returns indices
/// into `reqs`; groups keep the order of their first request.
///
/// With `same_length`, prompts of different lengths never share a batch (no padding at all):
/// then a batch gives bit-for-bit what each prompt gives alone in any dtype on the CPU, at the
/// cost of smaller batches.
pub fn plan_batches(
    reqs: &[Request],
    same_length: bool,
    mut max_batch: impl FnMut(&GenOptions, usize) -> usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<_> = Vec::new();
    let mut groups: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, r) in reqs.iter().enumerate() {
        let k = (
            r.opts.group_key(),
            if same_length { r.prompt_ids.len() } else { 0 },
        );
        groups
            .entry(k)
            .or_insert_with_key(|k| {
                order.push(k.clone());
                Vec::new()
            })
            .push(i);
    }
    let mut out = Vec::new();
    for k in order {
        let mut g = groups.remove(&k).unwrap_or_default();
        g.sort_by_key(|&i| (reqs[i].prompt_ids.len(), reqs[i].line));
        let mut start = 0;
        while start < g.len() {
            // The batch is padded to its longest prompt: size it for the longest it may hold.
            // Sorted ascending, so grow while the size allowed at the new longest still fits.
            let mut end = start + 1;
            while end < g.len() {
                let longest = reqs[g[end]].prompt_ids.len();
                let cap = max_batch(&reqs[g[end]].opts, longest).max(1);
                if end + 1 - start > cap {
                    break;
                }
                end += 1;
            }
            out.push(g[start..end].to_vec());
            start = end;
        }
    }
    out
}

/// Device bytes a forward pass needs per sequence of `t` tokens (prompt + gen_length) whose
/// LM head runs on up to `rows` positions: the model workspace (`Model::workspace`) per token
/// and per head row, doubled with CFG. `act_bytes` is the compute dtype's size.
pub fn bytes_per_sequence(
    cfg: &ModelConfig,
    act_bytes: usize,
    t: usize,
    rows: usize,
    cfg_on: bool,
) -> usize {
    let c = cfg.d_model;
    let hd = cfg.head_dim();
    let qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd;
    let f = cfg.mlp_hidden_size;
    // x, h, d [C] ; qkv ; att [NH·HD] ; gate_up [2F] ; mlp [F] ; ids, pos, key_valid (i32).
    let per_token = act_bytes * (3 * c + qkv + cfg.n_heads * hd + 3 * f) + 3 * 4;
    // xr, dr, hr [C] ; logits [V] ; rows, keys ×2, tok (i32) ; conf (f32).
    let per_row = act_bytes * (3 * c + cfg.embedding_size) + 5 * 4;
    let one = t * per_token + rows * per_row;
    if cfg_on {
        2 * one
    } else {
        one
    }
}

/// Device bytes of the Fast-dLLM KV cache (`Model::kv_cache`) per sequence of `t` tokens:
/// a K and a V buffer of `t · NKV·HD` activations per layer.
pub fn kv_cache_bytes_per_sequence(cfg: &ModelConfig, act_bytes: usize, t: usize) -> usize {
    2 * cfg.n_layers * t * cfg.n_kv_heads * cfg.head_dim() * act_bytes
}

/// The largest batch that fits `free` device bytes (keeping `1 − fraction` of it spare) for
/// prompts of up to `prompt_len` tokens, between 1 and `cap`.
pub fn auto_batch_size(
    cfg: &ModelConfig,
    act_bytes: usize,
    free: usize,
    fraction: f64,
    opts: &GenOptions,
    prompt_len: usize,
    cap: usize,
) -> usize {
    let t = prompt_len + opts.params.gen_length;
    // Head rows: the masks before a block's end, at most prompt masks + one block; the first
    // block is the largest case for a prompt without masks. Use the whole generation as a
    // safe bound when a prompt carries masks.
    let mut rows = opts.params.block_length.max(1).min(t);
    let mut kv = 0;
    if !opts.decode.is_plain() {
        // Fast-dLLM decoding (no CFG) runs the cached predictor: its workspace holds a head row
        // per token (`ModelPredictor::predict_span` reserves b·t rows), plus the KV cache.
        rows = t;
        kv = kv_cache_bytes_per_sequence(cfg, act_bytes, t);
    }
    let per =
        (bytes_per_sequence(cfg, act_bytes, t, rows, opts.params.cfg_scale > 0.0) + kv).max(1);
    let budget = (free as f64 * fraction) as usize;
    (budget / per).clamp(1, cap.max(1))
}
