//! `llada loglik`: upstream `get_log_likelihood` (Monte-Carlo ELBO) of an answer given a prompt.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use llada::engine;
use llada::engine::device::DeviceChoice;
use llada::eval::encode_pair;
use llada::loglik::{self, LoglikParams};

use super::{format_is_json, ModelArgs};

#[derive(Args)]
pub struct LoglikArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: super::lora::LoraArg,
    /// Prompt text; the prompt/answer split follows lm-eval's `_encode_pair`.
    #[arg(long, conflicts_with = "prompt_ids", requires = "answer")]
    prompt: Option<String>,
    /// Answer text (continuation of the prompt, e.g. " Paris").
    #[arg(long, conflicts_with = "answer_ids")]
    answer: Option<String>,
    /// Prompt token ids, comma separated (may be empty: "").
    #[arg(long = "prompt-ids", requires = "answer_ids")]
    prompt_ids: Option<String>,
    /// Answer token ids, comma separated.
    #[arg(long = "answer-ids")]
    answer_ids: Option<String>,
    #[command(flatten)]
    mc: McArgs,
    /// Also compute the exact ELBO by enumerating every mask set (answers ≤ 12 tokens).
    #[arg(long)]
    exact: bool,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// text | json
    #[arg(long, default_value = "text")]
    format: String,
}

pub fn cmd_loglik(a: LoglikArgs) -> Result<()> {
    let json = format_is_json(&a.format)?;
    let device: DeviceChoice = a.device.parse()?;
    let params = a.mc.params()?;
    let mut opened = a.model.open()?;
    a.lora.apply(&mut opened)?;
    let (prompt, answer) = match (&a.prompt, &a.answer, &a.prompt_ids, &a.answer_ids) {
        (Some(p), Some(ans), None, None) => {
            let tok = opened.tokenizer.as_ref().context(
                "--prompt/--answer need a tokenizer.json in the model folder (or use --prompt-ids/--answer-ids)",
            )?;
            encode_pair(&mut |s: &str| tok.encode(s, true), p, ans)?
        }
        (None, None, Some(p), Some(ans)) => (
            engine::parse_ids(p).context("--prompt-ids")?,
            engine::parse_ids(ans).context("--answer-ids")?,
        ),
        _ => bail!("give --prompt TEXT --answer TEXT, or --prompt-ids 1,2 --answer-ids 3,4"),
    };
    if answer.is_empty() {
        bail!("the answer has no tokens: nothing to score");
    }
    let v = opened.cfg.embedding_size;
    if let Some(&id) = prompt.iter().chain(&answer).find(|&&id| id as usize >= v) {
        bail!("token id {id} is out of range: the model has {v} embeddings");
    }
    let (eng, notice) = engine::load(&opened, device)?;
    if let Some(n) = notice {
        eprintln!("note: {n}");
    }
    let mut scorer = eng.scorer();
    let t0 = Instant::now();
    let out = loglik::estimate(scorer.as_mut(), &prompt, &answer, &params)?;
    let secs = t0.elapsed().as_secs_f64();
    let exact = if a.exact {
        Some(loglik::elbo_exact(
            scorer.as_mut(),
            &prompt,
            &answer,
            params.cfg_scale,
            params.batch_size,
        )?)
    } else {
        None
    };
    if json {
        let v = serde_json::json!({
            "loglik": out.loglik,
            "mc_stderr": out.mc_stderr,
            "elbo_exact": exact,
            "batch_means": out.batch_means,
            "prompt_ids": prompt,
            "answer_ids": answer,
            "forward_passes": out.forward_passes,
            "device": eng.device(),
            "seconds": secs,
            "params": {
                "mc_num": params.mc_num, "batch_size": params.batch_size,
                "cfg_scale": params.cfg_scale, "seed": params.seed,
            },
        });
        println!("{v}");
    } else {
        match out.mc_stderr {
            Some(se) => println!("{:.6} ± {:.6}", out.loglik, se),
            None => println!("{:.6}", out.loglik),
        }
        if let Some(e) = exact {
            println!("exact ELBO {e:.6}");
        }
    }
    Ok(())
}

/// The estimator's flags, shared by `llada loglik` and `llada eval`.
#[derive(Args)]
pub struct McArgs {
    /// Monte-Carlo samples (upstream default 128; 1 is exact for a one-token answer).
    #[arg(long, default_value_t = 128)]
    mc_num: usize,
    /// Samples per forward pass; must divide --mc-num [default: the largest divisor ≤ 16].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Unsupervised classifier-free guidance scale (prompt masked in the unconditional pass).
    #[arg(long, default_value_t = 0.0)]
    cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl McArgs {
    /// The estimator's parameters, checked.
    pub fn params(&self) -> Result<LoglikParams> {
        let p = LoglikParams {
            mc_num: self.mc_num,
            batch_size: self
                .batch_size
                .unwrap_or_else(|| LoglikParams::default_batch_size(self.mc_num)),
            cfg_scale: self.cfg_scale,
            seed: self.seed,
        };
        p.validate()?;
        Ok(p)
    }
}
