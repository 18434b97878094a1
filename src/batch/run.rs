//! See [`super`]: the `run` part of offline batch generation.

use super::{output::*, request::*};
use crate::engine::sampler::{GenerateParams, Hooks, Progress};
use crate::engine::Engine;
use anyhow::Result;
use serde_json::json;
use std::time::Instant;

/// How [`run`] behaves.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Stop at the first failed generation.
    pub strict: bool,
}

/// Progress after each step and each batch.
#[derive(Clone, Copy, Debug)]
pub struct RunProgress {
    /// Requests finished (written or failed) in this run.
    pub done: usize,
    pub total: usize,
    /// Generated tokens written in this run.
    pub tokens: usize,
    pub elapsed_s: f64,
    /// Size of the batch in flight.
    pub batch_size: usize,
    /// Its step progress; `None` once per finished batch.
    pub step: Option<Progress>,
}

impl RunProgress {
    /// Reported once per finished batch.
    pub fn batch_finished(&self) -> bool {
        self.step.is_none()
    }
}

/// What [`run`] did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub written: usize,
    pub failed: Vec<LineError>,
    pub tokens: usize,
    pub nfe: usize,
    pub batches: usize,
    pub elapsed_s: f64,
}

/// What [`run`] generates and how.
#[derive(Clone, Copy)]
pub struct RunInputs<'a> {
    /// The requests.
    pub reqs: &'a [Request],
    /// Batches to run, as indices into `reqs`.
    pub plan: &'a [Vec<usize>],
    /// The model's ids and limits ([`crate::engine::Opened::apply_ids`]).
    pub base: &'a GenerateParams,
    pub opts: &'a RunOptions,
    /// Generated ids to text (`None` without a tokenizer).
    pub decode: &'a dyn Fn(&[u32]) -> Option<String>,
}

/// Generate every request of `input.plan` (indices into `input.reqs`) and append one result
/// line each to `log`. A batch that fails is split in halves and retried, so a failure ends up
/// attached to one request; with [`RunOptions::strict`] the first failure stops the run.
pub fn run(
    engine: &mut dyn Engine,
    input: RunInputs<'_>,
    log: &mut OutputLog,
    progress: &mut dyn FnMut(&RunProgress),
) -> Result<RunSummary> {
    let RunInputs {
        reqs,
        plan,
        base,
        opts,
        decode,
    } = input;
    let t0 = Instant::now();
    let total: usize = plan.iter().map(Vec::len).sum();
    let mut sum = RunSummary::default();
    let mut done = 0usize;
    // Work list: batches to run, front first; a failing batch is replaced by its halves.
    let mut queue: std::collections::VecDeque<Vec<usize>> = plan.iter().cloned().collect();
    while let Some(batch) = queue.pop_front() {
        let Some(&first) = batch.first() else {
            continue;
        };
        let o = &reqs[first].opts;
        let mut params = o.to_params(base);
        // Each request draws from its own random stream, whatever its batch row.
        params.row_keys = Some(batch.iter().map(|&i| reqs[i].rng_key).collect());
        let fast = o.decode;
        let prompts: Vec<Vec<u32>> = batch.iter().map(|&i| reqs[i].prompt_ids.clone()).collect();
        let tb = Instant::now();
        let at = |done, tokens, step| RunProgress {
            done,
            total,
            tokens,
            elapsed_s: t0.elapsed().as_secs_f64(),
            batch_size: batch.len(),
            step,
        };
        let (d0, tok0) = (done, sum.tokens);
        let res = {
            let mut cb = |p: Progress| progress(&at(d0, tok0, Some(p)));
            // A panic on one batch (a bug, not a hostile line: lines are validated) fails that
            // batch like a device error instead of ending the run.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.generate(&prompts, &params, &fast, Hooks::on_progress(&mut cb))
            }))
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(anyhow::anyhow!("internal error (panic): {what}"))
            })
        };
        match res {
            Ok(out) => {
                let secs = tb.elapsed().as_secs_f64();
                for (&i, ids) in batch.iter().zip(&out.ids) {
                    let r = &reqs[i];
                    let rec = json!({
                        "id": r.id,
                        "line": r.line,
                        "ids": ids,
                        "text": decode(ids),
                        "nfe": out.nfe,
                        "prompt_tokens": r.prompt_ids.len(),
                        "batch_size": batch.len(),
                        "padded_prompt_tokens": out.prompt_len_padded,
                        "seconds": secs,
                        "rng_key": r.rng_key,
                        "params": r.opts.to_json(),
                    });
                    log.append(&rec)?;
                    log.done.insert(r.id_key.clone());
                    sum.written += 1;
                    sum.tokens += ids.len();
                }
                log.sync()?;
                sum.nfe += out.nfe;
                sum.batches += 1;
                done += batch.len();
            }
            // A sticky device fault: no retry can succeed on this context (out of memory can).
            Err(e) if crate::backend::DeviceError::is_fault(&e) => return Err(e),
            Err(e) if batch.len() > 1 => {
                let mid = batch.len() / 2;
                queue.push_front(batch[mid..].to_vec());
                queue.push_front(batch[..mid].to_vec());
                let _ = e;
                continue;
            }
            Err(e) => {
                let r = &reqs[first];
                let le = LineError {
                    line: r.line,
                    id: Some(r.id.clone()),
                    message: format!("generation failed: {e:#}"),
                };
                if opts.strict {
                    return Err(e.context(format!("line {} (id {})", r.line, r.id)));
                }
                sum.failed.push(le);
                done += 1;
            }
        }
        progress(&at(done, sum.tokens, None));
    }
    sum.elapsed_s = t0.elapsed().as_secs_f64();
    Ok(sum)
}
