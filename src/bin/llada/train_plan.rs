//! `llada train --memory-plan` and the checks of `--zero`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use llada::engine::ModelSpec;
use llada::hf::config::ModelConfig;
use llada::train::backend::Storage;
use llada::train::cuda::TrainPrecision;
use llada::train::memory::{gib, plan, render};

use crate::ModelArgs;

/// Print the memory per rank of a run of `model` (or the checkpoint `resume`) with
/// micro-batches of `batch × seq` tokens over `world` ranks, in `storage` (both storages side
/// by side when it is not given): the config only is read.
pub fn print_memory_plan(
    model: &ModelArgs,
    resume: &Option<PathBuf>,
    (batch, seq, world): (usize, usize, usize),
    zero: u8,
    storage: Option<Storage>,
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
    let storages = match storage {
        Some(s) => vec![s],
        None => vec![Storage::F32, Storage::Bf16],
    };
    let plans = storages
        .into_iter()
        .map(|s| plan(&cfg, batch, seq, world, zero, s))
        .collect::<Result<Vec<_>>>()?;
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
        "f32 storage (--storage f32): everything f32 (--precision bf16 changes only the CUDA \
         GEMMs); bf16 storage (--storage bf16): bf16 weights, activations and activation \
         gradients, f32 master weights, moments, weight gradients and per-row statistics (the \
         CPU reference holds the bf16 values in f32 words: the plan is the device's). \
         Activations count every token as a loss row; the CUDA context and cuBLAS workspace \
         (a few hundred MiB) are not included. An \"80 GB\" GPU holds about {} (H100 80GB: \
         81,559 MiB).",
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

/// The run's storage and GEMM precision from `--storage` and `--precision` (`flags`), the
/// storage of the checkpoint it resumes and whether it runs on CUDA (`on`), checked: bf16
/// storage implies (and needs) bf16 GEMMs; the CPU's bf16 GEMMs are those of bf16 storage.
pub fn storage_and_precision(
    (storage, precision): (Option<Storage>, Option<TrainPrecision>),
    (resumed, cuda): (Option<Storage>, bool),
    lora: bool,
) -> Result<(Storage, TrainPrecision)> {
    if lora {
        check_storage_lora(storage)?;
        return Ok((Storage::F32, precision.unwrap_or_default()));
    }
    if let (Some(s), Some(r)) = (storage, resumed) {
        if s != r {
            eprintln!(
                "note: --storage {s} differs from the checkpoint's {r} storage: the run \
                 continues in {s}, so it is not the run the checkpoint came from"
            );
        }
    }
    let storage = storage.or(resumed).unwrap_or_default();
    let precision = match (storage, precision) {
        (Storage::Bf16, Some(TrainPrecision::F32)) => bail!(
            "--storage bf16 holds weights and activations in bf16, so its GEMMs read bf16 \
             operands: --precision f32 contradicts it (drop --precision, or use --storage f32)"
        ),
        (Storage::Bf16, _) => TrainPrecision::Bf16,
        (Storage::F32, p) => p.unwrap_or_default(),
    };
    if !cuda && storage == Storage::F32 && precision != TrainPrecision::F32 {
        bail!(
            "--precision {precision} needs --device cuda: the CPU reference trains in f32 (its \
             reference of bf16 training is --storage bf16)"
        );
    }
    if cuda && storage == Storage::Bf16 {
        eprintln!(
            "note: --storage bf16 on CUDA (the *_bf16s kernels, bf16 GEMMs) compiles and is \
             parity-tested against the CPU reference by tests/cuda_bf16_storage.rs, which has not \
             run on a GPU yet"
        );
    }
    Ok((storage, precision))
}

/// The `device:` line's account of what a run stores and multiplies in.
pub fn describe(storage: Storage, precision: TrainPrecision) -> &'static str {
    match storage {
        Storage::F32 => precision.describe(),
        Storage::Bf16 => {
            "bf16 weights, activations and activation gradients, bf16 tensor-core GEMMs with f32 \
             accumulation; f32 master weights, moments and weight gradients"
        }
    }
}

/// `--zero 1` on CUDA keeps its own optimizer step: f32 storage only for now.
pub fn check_zero_storage(zero: u8, cuda: bool, storage: Storage) -> Result<()> {
    if zero == 1 && cuda && storage == Storage::Bf16 {
        bail!("--zero 1 with --storage bf16 runs on the CPU only for now (not on CUDA)");
    }
    Ok(())
}

/// A LoRA run takes no `--storage`: its frozen base is bf16 already, its adapters f32.
pub fn check_storage_lora(storage: Option<Storage>) -> Result<()> {
    if let Some(s) = storage {
        bail!(
            "--storage {s} applies to full fine-tuning: a LoRA run keeps its frozen base in bf16 \
             and its adapters and their optimizer state in f32"
        );
    }
    Ok(())
}
