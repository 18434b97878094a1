//! `llada serve`: the OpenAI-compatible HTTP server ([`llada::serve`]).

use anyhow::{Context, Result};
use clap::Args;

use llada::engine::device::DeviceChoice;
use llada::engine::{ModelSpec, Opened};
use llada::hf::tokenizer::Tokenizer;
use llada::loglik::LoglikParams;
use llada::serve::{GenDefaults, Limits, ServeConfig};

use super::{GenFlags, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: super::lora::LoraArg,
    /// Defaults for requests that leave a setting out (`max_tokens` is `--gen-length`).
    #[command(flatten)]
    gen: GenFlags,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 = pick a free one; the bound address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 endpoints.
    #[arg(long)]
    api_key: Option<String>,
    /// Model name listed by /v1/models [default: the folder's name or the preset's].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Requests admitted at once, queued or running (429 beyond).
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most rows (prompts × n) of one engine batch; requests with identical settings share it.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Most completions (prompts × n) per request.
    #[arg(long, default_value_t = 16)]
    max_n: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Default Monte-Carlo samples of /v1/loglikelihood (upstream 128).
    #[arg(long, default_value_t = 128)]
    mc_num: usize,
    /// Most (prompt, continuation) pairs per /v1/loglikelihood request.
    #[arg(long, default_value_t = 256)]
    max_loglik_pairs: usize,
}

pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    let device: DeviceChoice = a.device.parse()?;
    let spec = a.model.spec()?;
    let mut opened = a.model.open()?;
    a.lora.apply(&mut opened)?;
    let name = match (&a.served_model_name, &spec) {
        (Some(n), _) => n.clone(),
        (None, ModelSpec::Dir(d)) => d
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "llada".into()),
        (None, ModelSpec::Preset { name, .. }) => format!("llada-{name}"),
    };
    if let (None, ModelSpec::Preset { name, .. }) = (&opened.tokenizer, &spec) {
        if name == "tiny" {
            opened.tokenizer = Some(tiny_tokenizer(&opened)?);
        }
    }
    let g = &a.gen;
    let defaults: GenDefaults = g.options()?;

    let loglik = LoglikParams {
        mc_num: a.mc_num,
        batch_size: LoglikParams::default_batch_size(a.mc_num),
        cfg_scale: g.cfg_scale,
        seed: g.seed,
    };
    loglik.validate().context("--mc-num")?;
    if a.max_queue == 0 || a.max_n == 0 || a.max_body_bytes == 0 {
        anyhow::bail!("--max-queue, --max-n and --max-body-bytes must be > 0");
    }
    // The defaults must make a valid request on their own.
    let mut base = llada::engine::sampler::GenerateParams::default();
    opened.apply_ids(&mut base);
    llada::serve::api::GenFields::default()
        .resolve(
            &defaults,
            &base,
            &Limits {
                max_rows: a.max_n,
                max_stop: 4,
            },
        )
        .map_err(|e| anyhow::anyhow!("the default generation settings: {}", e.message))?;
    let cfg = ServeConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        model_name: name,
        defaults,
        limits: Limits {
            max_rows: a.max_n,
            max_stop: 4,
        },
        max_queue: a.max_queue,
        max_batch: a.max_batch,
        max_body_bytes: a.max_body_bytes,
        loglik,
        max_loglik_pairs: a.max_loglik_pairs,
    };
    llada::serve::run(cfg, opened, device)
}

/// The `tiny` preset's tokenizer (the one `llada init-tiny` writes), built through a temporary
/// folder so that `--preset tiny` serves text like the folder does.
fn tiny_tokenizer(opened: &Opened) -> Result<Tokenizer> {
    let dir = std::env::temp_dir().join(format!("llada-serve-tokenizer-{}", std::process::id()));
    llada::hf::tiny::write_tiny_tokenizer(&dir)?;
    let t = Tokenizer::from_dir(&dir, &opened.cfg);
    let _ = std::fs::remove_dir_all(&dir);
    t.context("building the tiny preset's tokenizer")
}
