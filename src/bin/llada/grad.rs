//! `llada grad`: the pretraining loss of one sequence with given masked positions, and the
//! gradient of every parameter (f32), for parity debugging against PyTorch autograd; on the CPU
//! reference or (`--device cuda`) the CUDA training step.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::Args;

use llada::engine::device::DeviceChoice;
use llada::engine::{self, Opened};
use llada::hf::dtype::DType;
use llada::hf::write::{write_safetensors, HostTensor};
use llada::train::backend::Storage;
use llada::train::cuda::{bf16_weights, forward_backward_bf16, CudaOps, DeviceParams};
use llada::train::loss::fixed_mask_batch;
use llada::train::mixed::forward_backward_stored;
use llada::train::model::{forward_backward_with, Params, PassOptions};

use crate::ModelArgs;

#[derive(Args)]
pub struct GradArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Clean token ids, comma separated.
    #[arg(long)]
    ids: String,
    /// Positions (0-based) to replace by the mask id, comma separated.
    #[arg(long)]
    masked: String,
    /// The mask probability P the loss divides by (Σ CE / P over the masked positions, divided
    /// by the number of ids).
    #[arg(long = "p-mask")]
    p_mask: f64,
    /// Output safetensors file: `loss` (f32 [1]) and one f32 gradient per checkpoint tensor.
    #[arg(long)]
    out: PathBuf,
    /// auto | cpu | cuda | cuda:N. auto means the CPU (the f32 reference); cuda runs the CUDA
    /// training step (f32).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Recompute each layer's activations in the backward pass (the same gradients, bit for
    /// bit, from less memory; see `llada train --recompute`).
    #[arg(long)]
    recompute: bool,
    /// f32, or bf16: the pass of `llada train --storage bf16` (bf16 weights and activations,
    /// f32 gradients) from the checkpoint's weights rounded to bf16.
    #[arg(long, default_value = "f32")]
    storage: Storage,
}

pub fn cmd_grad(a: GradArgs) -> Result<()> {
    let ids = engine::parse_ids(&a.ids)?;
    let masked: Vec<usize> = engine::parse_ids(&a.masked)?
        .into_iter()
        .map(|x| x as usize)
        .collect();
    if masked.is_empty() {
        bail!("--masked lists no positions");
    }
    a.model.require_f32_compute("llada grad")?;
    let opened = Opened::open(&a.model.spec()?)?;
    let cfg = &opened.cfg;
    let params = Params::<f32>::from_checkpoint(cfg, &opened.ckpt)?;
    let batch = fixed_mask_batch(&ids, &masked, a.p_mask, cfg.mask_token_id)?;
    let mut grad = Params::<f32>::zeros(cfg);
    let opts = PassOptions::recomputing(a.recompute);
    let stats = match a.device.parse::<DeviceChoice>()? {
        DeviceChoice::Cpu | DeviceChoice::Auto => {
            forward_backward_stored(cfg, a.storage, &params, &batch, &mut grad, opts)?
        }
        DeviceChoice::Cuda(i) => {
            llada::engine::device::cuda_available()
                .map_err(|e| anyhow!("--device {}: CUDA unavailable: {e}", a.device))?;
            let ops = CudaOps::new(i)?;
            let dp = DeviceParams::upload(&ops, &params)?;
            let mut dg = DeviceParams::upload(&ops, &grad)?;
            let stats = match a.storage {
                Storage::F32 => {
                    forward_backward_with(&ops, cfg, opts, &dp.data, &batch, &mut dg.data)?
                }
                Storage::Bf16 => {
                    let w = bf16_weights(&ops, &dp.data)?;
                    forward_backward_bf16(&ops, cfg, opts, &w, &batch, &mut dg.data)?
                }
            };
            grad = dg.download(&ops)?;
            stats
        }
    };
    let loss = stats.loss;
    let mut out: Vec<HostTensor> = vec![("loss".into(), DType::F32, vec![1], vec![loss as f32])];
    for i in 0..grad.data.len() {
        out.push((
            grad.names[i].clone(),
            DType::F32,
            grad.shapes[i].clone(),
            std::mem::take(&mut grad.data[i]),
        ));
    }
    write_safetensors(&a.out, &out)?;
    eprintln!(
        "loss {loss:.6}; wrote the loss and {} gradients to {} (activations: {:.2} MiB{}, \
         {} storage)",
        out.len() - 1,
        a.out.display(),
        stats.activation_floats as f64 * 4.0 / (1u64 << 20) as f64,
        if a.recompute { ", recomputed" } else { "" },
        a.storage
    );
    Ok(())
}
