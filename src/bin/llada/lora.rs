//! `--lora DIR` (shared by every command that loads a model) and `llada merge-lora`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use llada::engine::{ModelSpec, Opened};
use llada::lora::{write_merged_folder, MERGED_SHARD_BYTES};

/// `--lora DIR`, flattened into each command's arguments.
#[derive(Args, Clone, Debug, Default)]
pub struct LoraArg {
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, written by
    /// PEFT's save_pretrained or by llada) merged into the weights at load: W + scale·B·A in
    /// f32, rounded to the weights' dtype.
    #[arg(long, value_name = "DIR")]
    pub lora: Option<PathBuf>,
}

impl LoraArg {
    /// Apply the adapter, when given, and say so on stderr.
    pub fn apply(&self, opened: &mut Opened) -> Result<()> {
        if let Some(dir) = &self.lora {
            let s = opened.apply_lora(dir)?;
            eprintln!("note: {s}");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct MergeLoraArgs {
    /// The base model: a Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter folder to merge.
    #[arg(long, value_name = "ADIR")]
    lora: PathBuf,
    /// Folder to write the merged model to (config, tokenizer and other files copied,
    /// safetensors in the base's dtypes; shards of at most 5 GB).
    #[arg(long)]
    out: PathBuf,
}

pub fn cmd_merge_lora(a: MergeLoraArgs) -> Result<()> {
    let mut opened = Opened::open(&ModelSpec::Dir(a.model.clone()))?;
    let summary = opened.apply_lora(&a.lora)?;
    eprintln!("{summary}");
    let r = write_merged_folder(
        &a.model,
        &opened.cfg,
        &opened.ckpt,
        &a.out,
        MERGED_SHARD_BYTES,
    )?;
    println!(
        "wrote {} tensors ({:.1} MB) and {} copied files to {}",
        r.tensors,
        r.bytes as f64 / 1e6,
        r.copied.len(),
        a.out.display()
    );
    Ok(())
}
