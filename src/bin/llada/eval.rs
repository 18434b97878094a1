//! `llada eval`: multiple-choice items scored like lm-eval-harness with upstream's estimator.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use llada::engine;
use llada::engine::device::DeviceChoice;
use llada::eval::{self, EvalParams};

use super::{format_is_json, ModelArgs};

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: super::lora::LoraArg,
    /// JSON lines: {"context": str, "choices": [str, ...], "answer": index or choice text}.
    #[arg(long)]
    tasks: PathBuf,
    /// Score only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Between the context and each choice (lm-eval's target_delimiter).
    #[arg(long, default_value = " ")]
    target_delimiter: String,
    #[command(flatten)]
    mc: super::loglik::McArgs,
    /// Write one JSON line per item (log-likelihoods, predictions) to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// text | json
    #[arg(long, default_value = "text")]
    format: String,
}

fn num(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

pub fn cmd_eval(a: EvalArgs) -> Result<()> {
    let json = format_is_json(&a.format)?;
    let device: DeviceChoice = a.device.parse()?;
    let params = EvalParams {
        loglik: a.mc.params()?,
        target_delimiter: a.target_delimiter.clone(),
    };
    // A FIFO or device output is opened now, so a FIFO nobody reads fails before the work.
    let mut special_out = match &a.output {
        Some(p) if llada::hf::fsio::output_is_special(p) => {
            Some(llada::hf::fsio::create_output(p, "--output")?)
        }
        _ => None,
    };
    let text = llada::hf::fsio::read_input_text(&a.tasks, "--tasks", 4 << 30)?;
    let mut items = eval::parse_items(&text, &a.tasks.display().to_string())?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let mut opened = a.model.open()?;
    a.lora.apply(&mut opened)?;
    let tok = opened
        .tokenizer
        .as_ref()
        .context("eval needs a tokenizer.json in the model folder")?;
    let (eng, notice) = engine::load(&opened, device)?;
    if let Some(n) = notice {
        eprintln!("note: {n}");
    }
    let mut scorer = eng.scorer();
    let show = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut bar = |done: usize, total: usize| {
        if show {
            eprint!("\ritem {done}/{total} {:.1}s", t0.elapsed().as_secs_f64());
            let _ = std::io::stderr().flush();
        }
    };
    let (results, summary) = eval::evaluate(
        scorer.as_mut(),
        &mut |s: &str| tok.encode(s, true),
        &items,
        &params,
        Some(&mut bar),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if show {
        eprintln!();
    }
    if let Some(path) = &a.output {
        let file = match special_out.take() {
            Some(f) => f,
            None => llada::hf::fsio::create_output(path, "--output")?,
        };
        let mut f = std::io::BufWriter::new(file);
        for r in &results {
            let line = serde_json::json!({
                "index": r.index, "lls": r.lls, "tokens": r.tokens, "pred": r.pred,
                "pred_norm": r.pred_norm, "answer": r.answer, "acc": r.acc(), "acc_norm": r.acc_norm(),
            });
            writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
        }
        f.flush()
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        let v = serde_json::json!({
            "n": summary.n,
            "acc": num(summary.acc.mean), "acc_stderr": num(summary.acc.stderr),
            "acc_norm": num(summary.acc_norm.mean), "acc_norm_stderr": num(summary.acc_norm.stderr),
            "forward_passes": summary.forward_passes,
            "device": eng.device(),
            "seconds": secs,
            "params": {
                "mc_num": params.loglik.mc_num, "batch_size": params.loglik.batch_size,
                "cfg_scale": params.loglik.cfg_scale, "seed": params.loglik.seed,
                "target_delimiter": params.target_delimiter,
            },
        });
        println!("{v}");
    } else {
        println!(
            "items {}  acc {:.4} ± {:.4}  acc_norm {:.4} ± {:.4}  ({} forward passes, {:.1}s)",
            summary.n,
            summary.acc.mean,
            summary.acc.stderr,
            summary.acc_norm.mean,
            summary.acc_norm.stderr,
            summary.forward_passes,
            secs
        );
    }
    Ok(())
}
