//! `llada batch`: offline generation over a JSONL file (see `llada::batch` and the README's
//! "Batch generation on clusters").
//!
//! Exit status: 0 when every owned line has a result, 3 when some lines failed (bad input or a
//! failed generation; see the errors file), 1 on a fatal error (model, files, `--strict`).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use llada::batch::openai::OpenAiBatch;
use llada::batch::{self, GenOptions, LineError, OutputLog, ParseContext, RunOptions, Shard};
use llada::engine;
use llada::engine::device::DeviceChoice;
use llada::engine::sampler::GenerateParams;

use super::ModelArgs;

/// Exit status when some lines failed but the run completed.
const EXIT_LINES_FAILED: u8 = 3;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BatchArgs {
    #[command(subcommand)]
    cmd: Option<BatchCmd>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    lora: super::lora::LoraArg,
    /// Requests, one JSON object a line: `id` and one of `prompt`, `messages`, `prompt_ids`,
    /// optionally overriding any generation flag (`steps`, `gen_length`, `temperature`, ...).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Results, one JSON object a line; appended to (rerunning resumes). With a shard, the file
    /// is `<stem>.shard-IIIII-of-NNNNN.<ext>` next to it.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Errors file (default `<output stem>.errors.jsonl`), rewritten on every run.
    #[arg(long)]
    errors: Option<PathBuf>,
    /// Prompts per forward pass; default: as many as fit the free device memory (8 on the CPU).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Upper bound of the automatic batch size.
    #[arg(long, default_value_t = 256)]
    max_batch_size: usize,
    /// Share of the free device memory the automatic batch size may use.
    #[arg(long, default_value_t = 0.85)]
    memory_fraction: f64,
    /// Handle only lines with (line − 1) mod N == I. Default: from Slurm
    /// (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, SLURM_PROCID/SLURM_NTASKS); `0/1` turns it off.
    #[arg(long)]
    shard: Option<String>,
    /// CUDA device ordinal (one process per GPU); same as `--device cuda:N`. Default under
    /// Slurm with several visible GPUs: SLURM_LOCALID.
    #[arg(long)]
    device_id: Option<usize>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Stop at the first bad line or failed generation.
    #[arg(long)]
    strict: bool,
    /// No effect, kept for old scripts: sampled requests are always batched now, each with its
    /// own random stream (keyed by its id), so batching does not change their results.
    #[arg(long, hide = true)]
    batch_sampling: bool,
    /// Batch only prompts of equal length (no padding): results bit-identical to single
    /// prompts in bf16 too, at the cost of smaller batches. Without it, padded bf16 batches can
    /// differ from single prompts in rare near-ties (RoPE positions shift with the padding).
    #[arg(long)]
    same_length: bool,
    /// Render text `prompt`s as one user message with the chat template (Instruct models).
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    gen: super::GenFlags,
}

#[derive(Subcommand)]
enum BatchCmd {
    /// Join shard outputs into one file in input order (checks that no id appears twice).
    Merge(MergeArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// The merged file (written atomically). Without FILES, its shard files
    /// (`<stem>.shard-*-of-N.<ext>`) are found next to it and must be a complete set.
    #[arg(long)]
    output: PathBuf,
    /// Result files to join (default: the shard files of --output).
    files: Vec<PathBuf>,
}

pub fn main(a: BatchArgs) -> ExitCode {
    let r = match a.cmd {
        Some(BatchCmd::Merge(m)) => cmd_merge(m).map(|_| ExitCode::SUCCESS),
        None => cmd_run(a),
    };
    r.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

fn cmd_merge(m: MergeArgs) -> Result<()> {
    let files = if m.files.is_empty() {
        batch::find_shards(&m.output)?
    } else {
        m.files
    };
    let rep = batch::merge(&files, &m.output)?;
    for (p, n) in &rep.torn {
        eprintln!(
            "warning: {}: left out a torn last line ({n} bytes; that run was killed — rerun it to finish)",
            p.display()
        );
    }
    eprintln!(
        "merged {} results from {} files into {}",
        rep.records,
        files.len(),
        m.output.display()
    );
    Ok(())
}

fn device_choice(a: &BatchArgs) -> Result<DeviceChoice> {
    if let Some(i) = a.device_id {
        if a.device != "auto" && a.device != format!("cuda:{i}") {
            bail!("--device-id {i} conflicts with --device {}", a.device);
        }
        return Ok(DeviceChoice::Cuda(i));
    }
    let choice: DeviceChoice = a.device.parse()?;
    if matches!(choice, DeviceChoice::Auto | DeviceChoice::Cuda(0)) && a.device != "cuda:0" {
        // One process per GPU under srun without per-task GPU binding: every task sees all
        // GPUs, so pick the one of this task's node-local rank.
        let visible = std::env::var("CUDA_VISIBLE_DEVICES")
            .map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count())
            .unwrap_or(0);
        if let Ok(local) = std::env::var("SLURM_LOCALID") {
            if visible > 1 {
                let i: usize = local
                    .trim()
                    .parse()
                    .with_context(|| format!("SLURM_LOCALID={local:?} is not a number"))?;
                if i < visible {
                    eprintln!(
                        "note: using cuda:{i} (SLURM_LOCALID of {visible} visible GPUs; --device-id overrides)"
                    );
                    return Ok(DeviceChoice::Cuda(i));
                }
            }
        }
    }
    Ok(choice)
}

fn report_errors(errs: &[LineError]) {
    for e in errs {
        eprintln!("error: {e}");
    }
}

fn write_errors(
    path: &std::path::Path,
    errs: &[LineError],
    oa: Option<&OpenAiBatch>,
) -> Result<()> {
    let mut body = String::new();
    for e in errs {
        let line = oa.map_or_else(|| e.to_json(), |b| b.error_line(e));
        body.push_str(&line.to_string());
        body.push('\n');
    }
    batch::write_atomic(path, body.as_bytes())
        .with_context(|| format!("writing the errors file {}", path.display()))
}

fn cmd_run(a: BatchArgs) -> Result<ExitCode> {
    let input = a.input.clone().context("give --input FILE.jsonl")?;
    let base_out = a.output.clone().context("give --output FILE.jsonl")?;
    let defaults = GenOptions {
        chat: a.chat,
        ..a.gen.options()?
    };
    if !(a.gen.temperature.is_finite() && a.gen.temperature >= 0.0) {
        bail!("--temperature must be a finite number >= 0");
    }
    if !(a.gen.cfg_scale.is_finite() && a.gen.cfg_scale >= 0.0) {
        bail!("--cfg-scale must be a finite number >= 0");
    }
    if let Some(th) = a.gen.threshold.filter(|t| !t.is_finite()) {
        bail!("--threshold {th} is not a finite number");
    }
    if let Some(f) = a.gen.factor.filter(|f| !(f.is_finite() && *f > 0.0)) {
        bail!("--factor {f} must be a finite number > 0");
    }
    defaults
        .check()
        .map_err(|m| anyhow::anyhow!("the generation flags: {m}"))?;
    if a.batch_sampling {
        eprintln!("note: --batch-sampling has no effect any more: sampled requests are always batched, each with its own random stream");
    }
    for (flag, v) in [
        ("--batch-size", a.batch_size),
        ("--max-batch-size", Some(a.max_batch_size)),
    ] {
        if let Some(n) = v.filter(|&n| n == 0 || n > batch::MAX_BATCH_SIZE) {
            bail!("{flag} {n} must be between 1 and {}", batch::MAX_BATCH_SIZE);
        }
    }
    if !(a.memory_fraction > 0.0 && a.memory_fraction <= 1.0) {
        bail!("--memory-fraction must be in (0, 1]");
    }
    let mut base = GenerateParams::default();
    defaults
        .to_params(&base)
        .block_plan()
        .context("the generation flags")?;

    let shard = match &a.shard {
        Some(s) => Some(Shard::parse(s)?).filter(|s| s.count > 1),
        None => Shard::from_env(|k| std::env::var(k).ok())?,
    };
    let output = match &shard {
        Some(s) => {
            eprintln!(
                "shard {}/{} (from {}): lines with (line - 1) mod {} == {}",
                s.index, s.count, s.source, s.count, s.index
            );
            s.output_path(&base_out)
        }
        None => base_out.clone(),
    };
    let errors_file = a
        .errors
        .clone()
        .unwrap_or_else(|| batch::errors_path(&output));
    if let Some(p) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    }

    let mut opened = a.model.open()?;
    a.lora.apply(&mut opened)?;
    opened.apply_ids(&mut base);
    // Take the output's lock first: nothing (not even the errors file) is written by a second
    // run on the same output.
    let mut log = OutputLog::open(&output)?;
    let text = llada::hf::fsio::read_input_text(&input, "--input", batch::MAX_INPUT_BYTES)?;
    // The OpenAI batch format (detected per file) is translated line for line.
    let openai = llada::batch::openai::is_openai(&text).then(|| {
        let eos = [Some(base.eos_id), base.eot_id]
            .into_iter()
            .flatten()
            .collect();
        std::rc::Rc::new(OpenAiBatch::translate(&text, eos))
    });
    let text = openai.as_ref().map_or(text, |b| b.text.clone());
    if let Some(b) = &openai {
        let b = b.clone();
        log.wrap = Some(Box::new(move |r| b.result_line(r)));
    }
    let ctx = ParseContext::new(&opened.cfg, opened.tokenizer.as_ref(), &defaults);
    let mut parsed = batch::parse_input(&text, &ctx, shard.as_ref());
    if let Some(b) = &openai {
        let owned = |l: usize| shard.as_ref().map_or(true, |s| s.owns(l));
        parsed
            .errors
            .extend(b.errors.iter().filter(|e| owned(e.line)).cloned());
        parsed.lines_owned += b.errors.iter().filter(|e| owned(e.line)).count();
        parsed.errors.sort_by_key(|e| e.line);
    }
    let oa = openai.as_deref();
    let mut errors = parsed.errors;
    let total_good = parsed.requests.len();
    let (todo, skipped, changed) = batch::split_done(parsed.requests, &log);
    errors.extend(changed);
    report_errors(&errors);
    write_errors(&errors_file, &errors, oa)?;
    if a.strict && !errors.is_empty() {
        bail!(
            "{} bad input lines (--strict); see {}",
            errors.len(),
            errors_file.display()
        );
    }

    if log.truncated > 0 {
        eprintln!(
            "note: {}: cut off a torn last line ({} bytes) left by an interrupted run",
            output.display(),
            log.truncated
        );
    }
    eprintln!(
        "{}: {} lines, {} valid, {} bad, {} already done, {} to generate -> {}",
        input.display(),
        parsed.lines_owned,
        total_good,
        errors.len(),
        skipped,
        todo.len(),
        output.display()
    );

    let mut summary = batch::RunSummary::default();
    let mut device = String::from("-");
    if !todo.is_empty() {
        let (mut eng, notice) = engine::load(&opened, device_choice(&a)?)?;
        if let Some(n) = notice {
            eprintln!("note: {n}");
        }
        device = eng.device();
        let act_bytes = eng.logits_dtype().size();
        let free = eng.memory_free();
        let cfg = eng.config().clone();
        let (fixed, cap, frac) = (a.batch_size, a.max_batch_size.max(1), a.memory_fraction);
        let size_of = |o: &GenOptions, len: usize| match (fixed, free) {
            (Some(n), _) => n,
            (None, Some(f)) => batch::auto_batch_size(&cfg, act_bytes, f, frac, o, len, cap),
            (None, None) => 8.min(cap),
        };
        let plan = batch::plan_batches(&todo, a.same_length, size_of);
        let largest = plan.iter().map(Vec::len).max().unwrap_or(0);
        eprintln!(
            "device {device}: {} batches (largest {largest}{})",
            plan.len(),
            match (fixed, free) {
                (Some(_), _) => String::from(", --batch-size"),
                (None, Some(f)) => format!(
                    ", sized to {:.0}% of {:.1} GiB free",
                    frac * 100.0,
                    f as f64 / (1u64 << 30) as f64
                ),
                (None, None) => String::from(", CPU default"),
            }
        );
        let tok = opened.tokenizer.as_ref();
        let decode = |ids: &[u32]| tok.and_then(|t| t.decode(ids, true).ok());
        let tty = std::io::stderr().is_terminal();
        let mut last_line = std::time::Instant::now();
        let mut bar = |p: &batch::RunProgress| {
            let rate = |n: usize| n as f64 / p.elapsed_s.max(1e-9);
            if tty {
                let w = 24;
                let filled = (p.done * w).checked_div(p.total).unwrap_or(w).min(w);
                let step = p
                    .step
                    .map(|s| {
                        format!(
                            " | batch of {} step {}/{}",
                            p.batch_size, s.step, s.total_steps
                        )
                    })
                    .unwrap_or_default();
                eprint!(
                    "\r[{}{}] {}/{} {:.2} prompts/s {:.1} tok/s {:.0}s{step}\x1b[K",
                    "#".repeat(filled),
                    " ".repeat(w - filled),
                    p.done,
                    p.total,
                    rate(p.done),
                    rate(p.tokens),
                    p.elapsed_s
                );
                let _ = std::io::stderr().flush();
            } else if p.batch_finished()
                && (p.done == p.total || last_line.elapsed().as_secs_f64() >= 10.0)
            {
                last_line = std::time::Instant::now();
                eprintln!(
                    "progress {}/{} {:.2} prompts/s {:.1} tok/s {:.0}s",
                    p.done,
                    p.total,
                    rate(p.done),
                    rate(p.tokens),
                    p.elapsed_s
                );
            }
        };
        let ropts = RunOptions { strict: a.strict };
        let input = batch::RunInputs {
            reqs: &todo,
            plan: &plan,
            base: &base,
            opts: &ropts,
            decode: &decode,
        };
        let res = batch::run(eng.as_mut(), input, &mut log, &mut bar);
        if tty {
            eprintln!();
        }
        summary = res?;
        report_errors(&summary.failed);
        errors.extend(summary.failed.iter().cloned());
        write_errors(&errors_file, &errors, oa)?;
    }

    let s = &summary;
    let rate = |n: usize| n as f64 / s.elapsed_s.max(1e-9);
    eprintln!(
        "summary: {} written, {} already done, {} failed ({} bad input, {} generation) in {:.1}s on {device}: {:.2} prompts/s, {:.1} tok/s, {} batches, {} forward passes",
        s.written,
        skipped,
        errors.len(),
        errors.len() - s.failed.len(),
        s.failed.len(),
        s.elapsed_s,
        rate(s.written),
        rate(s.tokens),
        s.batches,
        s.nfe
    );
    if !errors.is_empty() {
        eprintln!("errors: {}", errors_file.display());
        return Ok(ExitCode::from(EXIT_LINES_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}
