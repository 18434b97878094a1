//! `llada quantize`: write an FP8 (E4M3) copy of a model folder, or measure FP8 against bf16
//! and f32 on the CPU reference (`--report`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use llada::engine::{ModelSpec, Opened};
use llada::quant::quality::{self, QualityInputs};

use crate::ModelArgs;

#[derive(Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output folder (a Hugging Face folder: config.json with `quantization_config`,
    /// model.safetensors with F8_E4M3 linear weights and F32 `_scale`s, tokenizer files).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Quantization scheme; only `fp8` (E4M3 weights per output channel, activations per token).
    #[arg(long, default_value = "fp8")]
    scheme: String,
    /// Instead of (or besides) writing: run the f32, bf16 and FP8 models on the CPU and print
    /// logits error, greedy agreement and log-likelihood difference (JSON).
    #[arg(long)]
    report: bool,
    /// With --report: a text file to cut the inputs from (tokenized with the model's tokenizer);
    /// default: pseudo-random ids.
    #[arg(long)]
    text: Option<PathBuf>,
    /// With --report: number of sequences.
    #[arg(long, default_value_t = 8)]
    sequences: usize,
    /// With --report: tokens per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
}

pub fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    if a.scheme != "fp8" {
        bail!("unknown --scheme {:?}: only fp8 is supported", a.scheme);
    }
    if a.out.is_none() && !a.report {
        bail!("give --out DIR (write the FP8 folder) and/or --report (measure quality)");
    }
    let spec = a.model.spec()?;
    let opened = Opened::open(&spec)?;
    if let Some(out) = &a.out {
        let src = match &spec {
            ModelSpec::Dir(d) => Some(d.as_path()),
            ModelSpec::Preset { .. } => None,
        };
        let s = llada::quant::quantize_folder(&opened.ckpt, &opened.cfg, src, out)?;
        eprintln!(
            "wrote {}: {} linear weights in FP8 E4M3 (+ per-channel scales), {} tensors kept; \
             {:.1} MB (source {:.1} MB)",
            out.display(),
            s.quantized,
            s.kept,
            s.bytes as f64 / 1e6,
            s.source_bytes as f64 / 1e6
        );
    }
    if a.report {
        let inputs = match &a.text {
            Some(path) => {
                let tok = opened
                    .tokenizer
                    .as_ref()
                    .context("--text needs a tokenizer.json in the model folder")?;
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let ids = tok.encode(&text, false)?;
                QualityInputs::from_tokens(&ids, &opened.cfg, a.sequences, a.seq_len)?
            }
            None => QualityInputs::random(&opened.cfg, a.sequences, a.seq_len, 0),
        };
        let r = quality::measure(&opened.cfg, &opened.ckpt, &inputs)?;
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}
