//! `llada`: generate with, inspect and debug LLaDA models.

mod batch;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use llada::batch::GenOptions;
use llada::engine::device::DeviceChoice;
use llada::engine::fast::Decode;
use llada::engine::sampler::{GenerateParams, Hooks, Progress};
use llada::engine::{self, ModelSpec, Opened};
use llada::hf::dtype::DType;
use llada::hf::write::write_safetensors;

mod eval;
mod grad;
mod init;
mod loglik;
mod lora;
mod quantize;
mod serve;
mod train;
mod train_plan;

#[derive(Parser)]
#[command(
    name = "llada",
    version,
    about = "LLaDA masked-diffusion LM inference (CPU reference and CUDA)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text with upstream LLaDA `generate` (semi-autoregressive blocks, remasking, CFG).
    Generate(GenerateArgs),
    /// Write the logits of one sequence (`logits`, f32, [1, T, V]) to a safetensors file.
    Forward(ForwardArgs),
    /// Write a preset (tiny | llada-1b | llada-8b) as a Hugging Face model folder with freshly
    /// initialised weights: the preset's own (uniform) or upstream's (--init mitchell).
    Init(init::InitArgs),
    /// Write the `tiny` random-weight preset as a Hugging Face model folder (`init --preset tiny`).
    InitTiny(init::InitTinyArgs),
    /// Print a model folder's configuration and tensors summary.
    Info(ModelArgs),
    /// Offline generation over a JSONL file (sharding, resume, errors file); `batch merge`
    /// joins shard outputs.
    Batch(batch::BatchArgs),
    /// Log-likelihood of an answer given a prompt (upstream Monte-Carlo ELBO).
    Loglik(loglik::LoglikArgs),
    /// Multiple-choice evaluation (lm-eval-harness scoring) from a JSON-lines file.
    Eval(eval::EvalArgs),
    /// Train (pretraining or SFT) and save Hugging Face checkpoints: on the CPU (f32 reference;
    /// the default, --device auto|cpu) or a CUDA GPU (--device cuda|cuda:N, f32 or --precision
    /// bf16), data parallel over several processes when RANK/WORLD_SIZE or srun give ranks.
    Train(train::TrainArgs),
    /// OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models,
    /// /v1/loglikelihood, /health, /metrics.
    Serve(serve::ServeArgs),
    /// Write the masked-token loss and every parameter's gradient (f32) to a safetensors file
    /// (CPU reference, or --device cuda).
    Grad(grad::GradArgs),
    /// Merge a PEFT LoRA adapter into a model and write the merged Hugging Face folder.
    MergeLora(lora::MergeLoraArgs),
    /// Write an FP8 (E4M3) copy of a model folder, or measure FP8 against bf16 and f32.
    Quantize(quantize::QuantizeArgs),
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A random-weight preset instead of a folder: tiny | llada-1b | llada-8b.
    #[arg(long)]
    preset: Option<String>,
    /// Seed of the preset's random weights.
    #[arg(long, default_value_t = 0)]
    weights_seed: u64,
    /// Compute dtype: auto (the checkpoint's) | bf16 | f32; weights are converted at load
    /// (CUDA computes in bf16 only).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// checkpoint (as stored; a quantized folder is FP8) | fp8 (E4M3 linear weights per output
    /// channel, activations quantized per token; a bf16 folder is quantized at load).
    #[arg(long, default_value = "checkpoint")]
    weights: String,
}

impl ModelArgs {
    /// Open the folder or preset with the `--dtype` and `--weights` choices.
    fn open(&self) -> Result<Opened> {
        let compute = engine::parse_compute_dtype(&self.dtype)?;
        let mode: llada::quant::WeightsMode = self.weights.parse()?;
        let mut opened = Opened::open(&self.spec()?)?;
        opened.compute = compute;
        opened.weights = mode;
        Ok(opened)
    }

    /// For commands that compute in f32 whatever the checkpoint (training): `--dtype` must be
    /// auto or f32.
    fn require_f32_compute(&self, what: &str) -> Result<()> {
        if let Some(d) = engine::parse_compute_dtype(&self.dtype)?.filter(|&d| d != DType::F32) {
            bail!("--dtype {d}: {what} computes in f32 (see --precision)");
        }
        if self.weights.parse::<llada::quant::WeightsMode>()?
            != llada::quant::WeightsMode::Checkpoint
        {
            bail!(
                "--weights {}: {what} trains the checkpoint's weights",
                self.weights
            );
        }
        Ok(())
    }

    fn spec(&self) -> Result<ModelSpec> {
        match (&self.model, &self.preset) {
            (Some(dir), None) => Ok(ModelSpec::Dir(dir.clone())),
            (None, Some(name)) => Ok(ModelSpec::Preset {
                name: name.clone(),
                seed: self.weights_seed,
            }),
            _ => bail!("give --model DIR or --preset NAME"),
        }
    }
}

/// The generation flags shared by `llada generate` and `llada batch` (upstream `generate`'s
/// arguments plus Fast-dLLM's).
#[derive(Args, Clone, Debug)]
pub(crate) struct GenFlags {
    #[arg(long, default_value_t = 128)]
    pub(crate) gen_length: usize,
    #[arg(long, default_value_t = 128)]
    pub(crate) steps: usize,
    #[arg(long, default_value_t = 32)]
    pub(crate) block_length: usize,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f64,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) cfg_scale: f64,
    /// low_confidence | random
    #[arg(long, default_value = "low_confidence")]
    pub(crate) remasking: String,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Never sample EOS (upstream `logits_eos_inf`).
    #[arg(long)]
    pub(crate) logits_eos_inf: bool,
    /// Commit EOS/EOT predictions last within a block (upstream `confidence_eos_eot_inf`).
    #[arg(long)]
    pub(crate) confidence_eos_eot_inf: bool,
    /// Fast-dLLM KV cache: none | prefix | dual (refilled by a full pass at each block start).
    #[arg(long, default_value = "none")]
    pub(crate) cache: String,
    /// Fast-dLLM parallel decoding: commit the top-1 and every candidate with confidence ≥ F
    /// (replaces the steps schedule; Fast-dLLM's default is 0.9).
    #[arg(long, conflicts_with = "factor")]
    pub(crate) threshold: Option<f64>,
    /// Fast-dLLM factor rule: commit the longest confidence-sorted prefix with
    /// c_j ≥ 1 − F/(j+1) (at least one token; replaces the steps schedule).
    #[arg(long)]
    pub(crate) factor: Option<f64>,
}

impl GenFlags {
    /// These flags as a request's [`GenOptions`] (`chat` off), `--remasking` and `--cache`
    /// parsed.
    pub(crate) fn options(&self) -> Result<GenOptions> {
        let params = GenerateParams {
            steps: self.steps,
            gen_length: self.gen_length,
            block_length: self.block_length,
            temperature: self.temperature,
            cfg_scale: self.cfg_scale,
            remasking: self.remasking.parse()?,
            seed: self.seed,
            logits_eos_inf: self.logits_eos_inf,
            confidence_eos_eot_inf: self.confidence_eos_eot_inf,
            ..GenerateParams::default()
        };
        let decode = Decode {
            cache: self.cache.parse()?,
            threshold: self.threshold,
            factor: self.factor,
        };
        Ok(GenOptions {
            params,
            decode,
            chat: false,
        })
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: lora::LoraArg,
    /// Prompt text (tokenized with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// Render the prompt as one user message with the chat template (Instruct models).
    #[arg(long)]
    chat: bool,
    /// Prompt token ids, comma separated; repeat for a batch (left-padded).
    #[arg(long = "prompt-ids")]
    prompt_ids: Vec<String>,
    #[command(flatten)]
    gen: GenFlags,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// text | json
    #[arg(long, default_value = "text")]
    format: String,
}

#[derive(Args)]
struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: lora::LoraArg,
    /// Token ids, comma separated.
    #[arg(long)]
    ids: String,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub(crate) fn parse_dtype(s: &str) -> Result<DType> {
    llada::names::parse("dtype", DType::NAMES, s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Forward(a) => cmd_forward(a),
        Cmd::Init(a) => init::cmd_init(a),
        Cmd::InitTiny(a) => init::cmd_init_tiny(a),
        Cmd::Info(a) => cmd_info(a),
        Cmd::Batch(a) => return batch::main(a),
        Cmd::Loglik(a) => loglik::cmd_loglik(a),
        Cmd::Eval(a) => eval::cmd_eval(a),
        Cmd::Train(a) => train::cmd_train(a),
        Cmd::Grad(a) => grad::cmd_grad(a),
        Cmd::MergeLora(a) => lora::cmd_merge_lora(a),
        Cmd::Serve(a) => serve::cmd_serve(a),
        Cmd::Quantize(a) => quantize::cmd_quantize(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_info(a: ModelArgs) -> Result<()> {
    let opened = a.open()?;
    let c = &opened.cfg;
    println!("model: {}", opened.label);
    println!(
        "d_model {} heads {} kv_heads {} head_dim {} layers {} mlp {} vocab {} embeddings {} max_seq {}",
        c.d_model, c.n_heads, c.n_kv_heads, c.head_dim(), c.n_layers, c.mlp_hidden_size, c.vocab_size, c.embedding_size,
        c.max_sequence_length
    );
    println!(
        "ids: mask {} eos {} pad {}",
        c.mask_token_id, c.eos_token_id, c.pad_token_id
    );
    println!("weights dtype: {}", opened.ckpt.dtype());
    println!(
        "compute dtype: {}",
        opened.compute.unwrap_or(opened.ckpt.dtype())
    );
    if opened.ckpt.has_fp8() {
        println!("linear layers: FP8 E4M3, per-channel scales (quantization_config fp8)");
    }
    if let Some(t) = &opened.tokenizer {
        println!(
            "tokenizer: {} entries, eot {:?}, bos {:?}",
            t.vocab_size(),
            t.special.eot,
            t.special.bos
        );
    }
    Ok(())
}

fn cmd_forward(a: ForwardArgs) -> Result<()> {
    let ids = engine::parse_ids(&a.ids)?;
    let mut opened = a.model.open()?;
    a.lora.apply(&mut opened)?;
    let device: DeviceChoice = a.device.parse()?;
    let (mut eng, notice) = engine::load(&opened, device)?;
    if let Some(n) = notice {
        eprintln!("note: {n}");
    }
    let logits = eng.forward_logits(&ids)?;
    let v = eng.config().embedding_size;
    let t = ids.len();
    write_safetensors(
        &a.out,
        &[("logits".to_string(), DType::F32, vec![1, t, v], logits)],
    )?;
    eprintln!("wrote logits [1, {t}, {v}] to {}", a.out.display());
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let opts = a.gen.options()?;
    let device: DeviceChoice = a.device.parse()?;
    let json = format_is_json(&a.format)?;
    let mut opened = a.model.open()?;
    a.lora.apply(&mut opened)?;
    let prompts: Vec<Vec<u32>> = if let Some(text) = &a.prompt {
        let tok = opened
            .tokenizer
            .as_ref()
            .context("--prompt needs a tokenizer.json in the model folder (or use --prompt-ids)")?;
        let ids = if a.chat {
            tok.encode_chat(&[("user", text.as_str())])?
        } else {
            tok.encode(text, true)?
        };
        vec![ids]
    } else if !a.prompt_ids.is_empty() {
        a.prompt_ids
            .iter()
            .map(|s| engine::parse_ids(s))
            .collect::<Result<_>>()?
    } else {
        bail!("give --prompt TEXT or --prompt-ids 1,2,3");
    };
    if a.chat && a.prompt.is_none() {
        bail!("--chat applies to --prompt TEXT, not to --prompt-ids");
    }
    // The ids and max_sequence_length come from `apply_ids`.
    let mut params = opts.to_params(&GenerateParams::default());
    opened.apply_ids(&mut params);
    params.block_plan()?;
    let decode = opts.decode;
    let (mut eng, notice) = engine::load(&opened, device)?;
    if let Some(n) = notice {
        eprintln!("note: {n}");
    }
    let show = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut bar = |p: Progress| {
        if show {
            let w = 30;
            let done = (p.step * w / p.total_steps.max(1)).min(w);
            eprint!(
                "\r[{}{}] step {}/{} block {}/{} {:.1}s",
                "#".repeat(done),
                " ".repeat(w - done),
                p.step,
                p.total_steps,
                p.block + 1,
                p.num_blocks,
                t0.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    };
    let out = eng.generate(&prompts, &params, &decode, Hooks::on_progress(&mut bar))?;
    let secs = t0.elapsed().as_secs_f64();
    if show {
        eprintln!();
    }
    let texts: Vec<String> = match &opened.tokenizer {
        Some(t) => out
            .ids
            .iter()
            .map(|ids| t.decode(ids, true))
            .collect::<Result<_>>()?,
        None => out
            .ids
            .iter()
            .map(|ids| {
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect(),
    };
    if json {
        let v = serde_json::json!({
            "prompt_ids": prompts,
            "ids": out.ids,
            "text": texts,
            "nfe": out.nfe,
            "device": eng.device(),
            "seconds": secs,
            "params": {
                "steps": params.steps, "gen_length": params.gen_length, "block_length": params.block_length,
                "temperature": params.temperature, "cfg_scale": params.cfg_scale, "remasking": a.gen.remasking,
                "seed": params.seed, "logits_eos_inf": params.logits_eos_inf,
                "confidence_eos_eot_inf": params.confidence_eos_eot_inf,
                "cache": decode.cache.to_string(), "threshold": decode.threshold, "factor": decode.factor,
            },
        });
        println!("{v}");
    } else {
        for t in &texts {
            println!("{t}");
        }
    }
    Ok(())
}

/// `--format text|json`: whether the output is JSON.
fn format_is_json(format: &str) -> Result<bool> {
    llada::names::parse("--format", &[("text", false), ("json", true)], format)
}
