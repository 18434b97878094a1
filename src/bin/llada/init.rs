//! `llada init` and `llada init-tiny`: write a preset as a Hugging Face folder with freshly
//! initialised weights (`llada::hf::init`), streamed, so any preset can be written (`llada-1b`
//! in f32 is 4.9 GB, `llada-8b` in bf16 16 GB) with a few chunks of values in memory.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use llada::hf::init::{check_new_folder, write_preset, InitFn, InitOptions};
use llada::hf::presets::preset_config;

/// The flags `init` and `init-tiny` share.
#[derive(Args)]
pub struct InitFlags {
    /// Seed of the weights (each tensor's seed derives from it and the tensor's name).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stored dtype: bf16 | f32 | f16
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Number of safetensors files (1 = a single model.safetensors; more: contiguous runs of
    /// tensors with model.safetensors.index.json).
    #[arg(long, default_value_t = 1)]
    shards: usize,
}

#[derive(Args)]
pub struct InitArgs {
    /// The preset whose config to write: tiny | llada-1b | llada-8b.
    #[arg(long)]
    preset: String,
    /// Folder to write (new, or empty).
    #[arg(long)]
    out: PathBuf,
    /// uniform (the weights `--preset NAME --weights-seed SEED` loads: uniform, std 0.02) |
    /// mitchell (upstream LLaDA's init_fn: truncated normal at ±3σ, σ = 1/√fan-in, output
    /// projections of layer l divided by √(2(l+1)); norm weights 1).
    #[arg(long, default_value = "uniform")]
    init: String,
    #[command(flatten)]
    flags: InitFlags,
}

#[derive(Args)]
pub struct InitTinyArgs {
    /// Folder to write (new, or empty).
    dir: PathBuf,
    #[command(flatten)]
    flags: InitFlags,
}

/// Write preset `preset` into the new folder `out`.
fn write(preset: &str, out: &Path, init: InitFn, f: &InitFlags) -> Result<()> {
    // The preset and the flags are checked before anything is written.
    preset_config(preset).map_err(|e| anyhow::anyhow!("--preset: {e}"))?;
    let o = InitOptions {
        seed: f.seed,
        dtype: crate::parse_dtype(&f.dtype)?,
        shards: f.shards,
        init,
    };
    check_new_folder(out)?;
    write_preset(preset, out, &o)
}

pub fn cmd_init(a: InitArgs) -> Result<()> {
    let init: InitFn = a.init.parse()?;
    write(&a.preset, &a.out, init, &a.flags)?;
    let note = if a.preset == "tiny" {
        ""
    } else {
        " (no tokenizer: train it on {\"ids\": [...]} data)"
    };
    println!(
        "wrote the {} preset ({} init, seed {}, {}) to {}{note}",
        a.preset,
        a.init,
        a.flags.seed,
        a.flags.dtype,
        a.out.display()
    );
    Ok(())
}

/// `llada init-tiny DIR` = `llada init --preset tiny --out DIR --init uniform`.
pub fn cmd_init_tiny(a: InitTinyArgs) -> Result<()> {
    write("tiny", &a.dir, InitFn::Uniform, &a.flags)?;
    println!("wrote the tiny preset to {}", a.dir.display());
    Ok(())
}
