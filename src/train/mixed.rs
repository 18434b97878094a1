//! bf16 storage (`llada train --storage bf16`): bf16 mixed-precision full fine-tuning, what
//! each buffer holds, and its CPU reference.
//!
//! The semantics are Megatron-LM's bf16 mode (bf16 parameters and activations, the residual
//! stream included, f32 "main" gradients and optimizer state) with PyTorch autocast's per-op
//! rules (GEMMs read bf16 and accumulate in f32; norms, softmax and the loss compute in f32):
//!
//! | buffer | dtype |
//! |---|---|
//! | master weights, AdamW moments (optimizer side) | f32 |
//! | working weights, read by every op (`wte`, norms, linears, LM head) | bf16: RNE of the f32 master, refreshed after every AdamW step |
//! | weight gradients, accumulated over micro-batches, clipped, summed over ranks | f32 |
//! | activations: residual stream, layer inputs, norm outputs, q/k/v (after RoPE), attention output, gate/up/SwiGLU outputs, projections, logits | bf16 |
//! | activation gradients (`dx`, `dh`, `dq`/`dk`/`dv`, `dg`/`du`/`dm`, the logits' gradient) | bf16 |
//! | per-row statistics: norm scales `r`, attention `lse` and `delta`, loss rows | f32 |
//!
//! Every op computes in f32 from what it reads and rounds once (RNE) what it writes into a
//! bf16 buffer: a linear is `bf16(Σ f32 products)` (a GEMM with bf16 A/B, f32 accumulation,
//! bf16 C); `x += d` (residual adds, accumulated input gradients, a GEMM with β = 1) is
//! `bf16(x + d)`; a weight gradient is `dw += Σ` in f32. Activation gradients are bf16 (as in
//! autocast, where a bf16 output's gradient is bf16) so that the backward GEMMs read bf16 on
//! both sides; they are scratch shared by the layers, so f32 would cost little memory, but
//! would need mixed-dtype GEMMs. bf16 has the exponent range of f32, so no loss scaling is
//! needed; clipping and accumulation act on the f32 gradients as in f32 storage.
//!
//! On the host ([`HostOps::with_storage`]) the bf16 buffers are f32 words holding bf16 values,
//! rounded by the op that writes them; an op refuses an operand that is not a bf16 value, so a
//! buffer that escaped rounding is an error, not a silent difference. The pass
//! ([`super::model::forward_backward_with`]) is the same for both storages.

use anyhow::Result;

use super::backend::HostOps;
use super::backend::Storage;
use super::model::{forward_backward_with, Batch, Params, PassOptions, PassStats};
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;

/// The working weights of bf16 storage: every parameter of `master` rounded to bf16 (RNE),
/// held in f32 words.
pub fn bf16_weights(master: &Params<f32>) -> Params<f32> {
    let mut w = master.clone();
    for d in &mut w.data {
        DType::BF16.round_slice(d);
    }
    w
}

/// [`forward_backward_with`] on the host in `storage`, from the f32 `master` weights (bf16
/// storage reads their bf16 rounding), the f32 gradients added into `grad`.
pub fn forward_backward_stored(
    cfg: &ModelConfig,
    storage: Storage,
    master: &Params<f32>,
    batch: &Batch,
    grad: &mut Params<f32>,
    opts: PassOptions,
) -> Result<PassStats> {
    let ops = HostOps::<f32>::new().with_storage(storage);
    match storage {
        Storage::F32 => forward_backward_with(&ops, cfg, opts, &master.data, batch, &mut grad.data),
        Storage::Bf16 => {
            let w = bf16_weights(master);
            forward_backward_with(&ops, cfg, opts, &w.data, batch, &mut grad.data)
        }
    }
}
