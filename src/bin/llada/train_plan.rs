//! `llada train --memory-plan` and the checks of `--zero`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use llada::engine::ModelSpec;
use llada::hf::config::ModelConfig;
use llada::train::memory::{gib, plan, render, Storage};

use crate::ModelArgs;

/// Print the memory per rank of a run of `model` (or the checkpoint `resume`) with
/// micro-batches of `batch × seq` tokens over `world` ranks: the config only is read.
pub fn print_memory_plan(
    model: &ModelArgs,
    resume: &Option<PathBuf>,
    (batch, seq, world): (usize, usize, usize),
    zero: u8,
) -> Result<()> {
    let (cfg, label) = match resume {
        Some(dir) if dir.join("adapter_config.json").is_file() => bail!(
            "{} is a LoRA run: plan it with the run's --model or --preset and --lora-rank \
             (and --lora-targets)",
            dir.display()
        ),
        Some(dir) => (
            ModelConfig::from_file(&dir.join("config.json"))?,
            dir.display().to_string(),
        ),
        None => plan_config(model)?,
    };
    if world == 0 {
        bail!("--world-size must be at least 1");
    }
    if seq == 0 || batch == 0 {
        bail!("--batch-size and --seq-len must be positive");
    }
    let plans = [
        plan(&cfg, batch, seq, world, zero, Storage::F32)?,
        plan(&cfg, batch, seq, world, zero, Storage::Bf16)?,
    ];
    let p = &plans[0];
    println!(
        "memory plan: {label}, {} parameters, {world} rank{}{}, micro-batch {batch} × {seq} \
         tokens per rank",
        p.params,
        if world == 1 { "" } else { "s" },
        if zero == 1 {
            format!(
                ", ZeRO-1 (master weights and moments of {} parameters per rank)",
                p.shard
            )
        } else {
            String::new()
        },
    );
    print!("{}", render(&plans));
    println!(
        "f32 storage: what llada train stores today (CPU, and CUDA with --precision f32 or \
         bf16); bf16 storage: bf16 weights and activations, f32 master weights, moments and \
         gradients. Activations count every token as a loss row; the CUDA context and cuBLAS \
         workspace (a few hundred MiB) are not included. An \"80 GB\" GPU holds about {} \
         (H100 80GB: 81,559 MiB).",
        gib(81_559 << 20)
    );
    Ok(())
}

/// The config a plan reads (the preset's, or the folder's `config.json`) and how it is named.
pub fn plan_config(model: &ModelArgs) -> Result<(ModelConfig, String)> {
    Ok(match model.spec()? {
        ModelSpec::Preset { name, .. } => (llada::hf::presets::preset_config(&name)?, name),
        ModelSpec::Dir(d) => (
            ModelConfig::from_file(&d.join("config.json"))
                .with_context(|| format!("--model {}", d.display()))?,
            d.display().to_string(),
        ),
    })
}

/// `--zero 1` needs several ranks.
pub fn check_zero(world: usize) -> Result<()> {
    if world < 2 {
        bail!(
            "--zero 1 shards the optimizer state over data-parallel ranks, and this run is one \
             process: start it with RANK/WORLD_SIZE (torchrun style) or srun, or drop --zero"
        );
    }
    Ok(())
}
