//! The step loop of `llada train`, shared by full fine-tuning (`train.rs`) and LoRA runs
//! (`lora.rs`): `--dump-batches`, the progress line, `--save-every`, the final save (or
//! `--no-save`) and the barrier that keeps the ranks until rank 0 has saved. What differs
//! between the runs, one optimizer step and one checkpoint, is a [`RunState`].

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use llada::train::{StepStats, Trainer};

use super::{dump_micro_batches, TrainArgs};

/// One run's step state and checkpointing, driven by [`run_steps`].
pub(super) trait RunState {
    /// One optimizer step of `trainer` on this state.
    fn step(&mut self, trainer: &mut Trainer) -> Result<StepStats>;
    /// Save the run's checkpoint to `--out`. Called on every rank (a sharded optimizer gathers
    /// its state to rank 0); only rank 0 writes.
    fn save(&mut self, trainer: &mut Trainer) -> Result<()>;
}

/// How [`run_steps`] reports.
pub(super) struct Report {
    /// Rank 0: prints the progress lines.
    pub lead: bool,
    /// Data-parallel ranks (the MFU column is per GPU).
    pub world: usize,
    /// Full fine-tuning's line: a progress bar before and GFLOP/s and MFU after the
    /// `step I/N loss … tok/s` of a LoRA run.
    pub full: bool,
}

/// Take `trainer`'s remaining steps on `run`, saving every `--save-every` steps and at the end
/// (unless `--no-save`); returns whether the end was saved. Every rank waits for rank 0's save.
pub(super) fn run_steps(
    a: &TrainArgs,
    trainer: &mut Trainer,
    run: &mut impl RunState,
    r: Report,
) -> Result<bool> {
    let mut dump = match &a.dump_batches {
        Some(path) if trainer.group().is_none() => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("--dump-batches {}", path.display()))?;
            let mut w = std::io::BufWriter::new(f);
            writeln!(w, "{}", serde_json::json!({ "options": trainer.opts }))?;
            Some(w)
        }
        Some(_) => bail!("--dump-batches runs as one process; pass --no-dist"),
        None => None,
    };
    let show = std::io::stderr().is_terminal() && r.lead;
    let total = trainer.opts.steps;
    while trainer.step < total {
        if let Some(d) = dump.as_mut() {
            dump_micro_batches(trainer, d)?;
        }
        let t0 = Instant::now();
        let s = run.step(trainer)?;
        if let Some(d) = dump.as_mut() {
            let line = serde_json::json!({
                "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
            });
            writeln!(d, "{line}")?;
            // Each step whole on disk: a run cut short (a timeout) leaves complete lines.
            d.flush().context("--dump-batches")?;
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let line = format!(
            "step {}/{} loss {:.4} lr {:.2e} gnorm {:.3} tok/s {:.0}",
            s.step,
            total,
            s.loss,
            s.lr,
            s.grad_norm,
            s.tokens as f64 / secs
        );
        let line = if r.full {
            // Per GPU: the step's global FLOPs over the ranks that shared them.
            let flops = s.flops / secs / r.world as f64;
            let mfu = match a.peak_tflops {
                Some(p) if p > 0.0 => format!("{:.1}%", 100.0 * flops / (p * 1e12)),
                _ => "-".into(),
            };
            let w = 20;
            let done = (s.step as usize * w) / total.max(1) as usize;
            format!(
                "[{}{}] {line} GFLOP/s {:.2} MFU {}",
                "#".repeat(done),
                " ".repeat(w - done),
                flops / 1e9,
                mfu
            )
        } else {
            line
        };
        if show {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if r.lead {
            eprintln!("{line}");
        }
        let due = !a.no_save && a.save_every > 0 && s.step % a.save_every == 0 && s.step < total;
        if due {
            run.save(trainer)?;
        }
    }
    if show {
        eprintln!();
    }
    if let Some(mut d) = dump.take() {
        d.flush().context("--dump-batches")?;
    }
    if a.no_save {
        if r.lead {
            eprintln!("not saved (--no-save), step {}", trainer.step);
        }
        return Ok(false);
    }
    run.save(trainer)?;
    if let Some(group) = trainer.group() {
        // Nobody leaves before rank 0 has saved (a failed save stops rank 0, and the others
        // see it here).
        group.barrier()?;
    }
    Ok(true)
}
