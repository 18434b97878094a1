//! The one thread that owns the model. Requests arrive through a channel; generation requests
//! whose settings are identical are run as one padded batch, log-likelihood requests one at a
//! time. Every forward pass first checks whether anybody still waits for the batch (a client
//! that went away cancels its request) and streams blocks that became complete.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::fast::Decode;
use crate::engine::sampler::{GenerateParams, Hooks};
use crate::engine::Engine;
use crate::loglik::{self, LoglikOutput, LoglikParams};

/// What the worker tells a waiting request.
#[derive(Debug)]
pub enum Event {
    /// Choice `choice` of the request has its first `blocks` blocks final: `ids` are they.
    Block {
        choice: usize,
        ids: Vec<u32>,
    },
    /// All choices done: the `gen_length` ids of each, and the forward passes of the batch.
    Done {
        ids: Vec<Vec<u32>>,
        nfe: usize,
    },
    /// Log-likelihood results, one per pair.
    Loglik(Vec<LoglikOutput>),
    Failed(String),
}

pub struct GenJob {
    pub params: GenerateParams,
    pub decode: Decode,
    /// One prompt per choice (prompts × n).
    pub prompts: Vec<Vec<u32>>,
    /// The index of each prompt's choice within its prompt (`n` draws of one prompt get
    /// different random streams).
    pub draws: Vec<u32>,
    pub stream: bool,
}

pub enum Work {
    Generate(GenJob),
    Loglik {
        pairs: Vec<(Vec<u32>, Vec<u32>)>,
        params: LoglikParams,
    },
}

pub struct Job {
    pub work: Work,
    pub tx: UnboundedSender<Event>,
    /// Set when the client went away: the job is skipped, or its batch aborted when every job
    /// in it is cancelled.
    pub cancel: Arc<AtomicBool>,
}

/// Counters the worker keeps for `/metrics`.
#[derive(Default)]
pub struct WorkerStats {
    pub batches: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub forward_passes: AtomicU64,
    /// Busy time in microseconds.
    pub busy_us: AtomicU64,
    pub cancelled_batches: AtomicU64,
}

/// The batching key: every setting except the prompts.
fn key(j: &GenJob) -> String {
    format!("{:?}|{:?}", j.params, j.decode)
}

/// Run jobs until the channel closes.
pub fn run(eng: &mut dyn Engine, rx: Receiver<Job>, max_rows: usize, stats: &WorkerStats) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match pending.pop_front() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        while let Ok(j) = rx.try_recv() {
            pending.push_back(j);
        }
        if first.cancel.load(Ordering::Relaxed) {
            continue;
        }
        let t0 = Instant::now();
        match first.work {
            Work::Loglik {
                ref pairs,
                ref params,
            } => {
                let mut scorer = eng.scorer();
                let mut outs = Vec::with_capacity(pairs.len());
                let mut failed = None;
                for (i, (p, a)) in pairs.iter().enumerate() {
                    if first.cancel.load(Ordering::Relaxed) {
                        failed = Some("cancelled".to_string());
                        break;
                    }
                    match loglik::estimate(scorer.as_mut(), p, a, params) {
                        Ok(o) => {
                            stats
                                .forward_passes
                                .fetch_add(o.forward_passes as u64, Ordering::Relaxed);
                            outs.push(o)
                        }
                        Err(e) => {
                            failed = Some(format!("request {i}: {e:#}"));
                            break;
                        }
                    }
                }
                let _ = first.tx.send(match failed {
                    Some(m) => Event::Failed(m),
                    None => Event::Loglik(outs),
                });
            }
            Work::Generate(ref g) => {
                let k = key(g);
                let mut batch = vec![first];
                let mut rows = match &batch[0].work {
                    Work::Generate(g) => g.prompts.len(),
                    Work::Loglik { .. } => 0,
                };
                let mut i = 0;
                while i < pending.len() {
                    let fits = match &pending[i].work {
                        Work::Generate(h) => {
                            key(h) == k
                                && rows + h.prompts.len() <= max_rows
                                && !pending[i].cancel.load(Ordering::Relaxed)
                        }
                        Work::Loglik { .. } => false,
                    };
                    if fits {
                        if let Some(j) = pending.remove(i) {
                            if let Work::Generate(h) = &j.work {
                                rows += h.prompts.len();
                            }
                            batch.push(j);
                        }
                    } else {
                        i += 1;
                    }
                }
                run_batch(eng, &batch, stats);
            }
        }
        stats
            .busy_us
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

fn gen(j: &Job) -> &GenJob {
    match &j.work {
        Work::Generate(g) => g,
        Work::Loglik { .. } => unreachable!("only generation jobs are batched"),
    }
}

/// One engine call for jobs with identical settings.
fn run_batch(eng: &mut dyn Engine, batch: &[Job], stats: &WorkerStats) {
    let g0 = gen(&batch[0]);
    let mut prompts = Vec::new();
    let mut draws = Vec::new();
    // owner[r] = (job, choice) of batch row r.
    let mut owner = Vec::new();
    for (ji, j) in batch.iter().enumerate() {
        let g = gen(j);
        for (c, p) in g.prompts.iter().enumerate() {
            prompts.push(p.clone());
            draws.push(g.draws[c]);
            owner.push((ji, c));
        }
    }
    let mut params = g0.params.clone();
    // Keyed random streams make each row's draws independent of its batch neighbours and
    // equal, for draw 0, to a lone `llada generate` of the prompt (key 0 = row 0, positions
    // from the first real token). Fast-dLLM decoding keys its step counter per block when
    // keyed, so a lone single-draw request there keeps upstream's unkeyed streams.
    let lone = prompts.len() == 1;
    params.row_keys = if lone && !g0.decode.is_plain() {
        None
    } else {
        Some(draws.clone())
    };
    let gen_length = params.gen_length;
    let block = params.block_length;
    let mask = params.mask_id;
    let mut emitted = vec![0usize; prompts.len()];
    let mut observe = |x: &[u32], b: usize, t: usize| -> anyhow::Result<()> {
        if batch.iter().all(|j| j.cancel.load(Ordering::Relaxed)) {
            return Err(anyhow!("cancelled: every client of this batch went away"));
        }
        let lp = t - gen_length;
        for r in 0..b.min(owner.len()) {
            let (ji, c) = owner[r];
            if !gen(&batch[ji]).stream {
                continue;
            }
            let row = &x[r * t + lp..(r + 1) * t];
            let mut done = emitted[r];
            while (done + 1) * block <= gen_length
                && !row[done * block..(done + 1) * block].contains(&mask)
            {
                done += 1;
            }
            if done > emitted[r] {
                emitted[r] = done;
                let _ = batch[ji].tx.send(Event::Block {
                    choice: c,
                    ids: row[..done * block].to_vec(),
                });
            }
        }
        Ok(())
    };
    let result = eng.generate(
        &prompts,
        &params,
        &g0.decode,
        Hooks::on_observe(&mut observe),
    );
    stats.batches.fetch_add(1, Ordering::Relaxed);
    match result {
        Ok(out) => {
            stats
                .forward_passes
                .fetch_add(out.nfe as u64, Ordering::Relaxed);
            stats
                .generated_tokens
                .fetch_add((out.ids.len() * gen_length) as u64, Ordering::Relaxed);
            let mut per_job: Vec<Vec<Vec<u32>>> = vec![Vec::new(); batch.len()];
            for (r, ids) in out.ids.into_iter().enumerate() {
                per_job[owner[r].0].push(ids);
            }
            for (j, ids) in batch.iter().zip(per_job) {
                let _ = j.tx.send(Event::Done { ids, nfe: out.nfe });
            }
        }
        Err(e) => {
            if batch.iter().all(|j| j.cancel.load(Ordering::Relaxed)) {
                stats.cancelled_batches.fetch_add(1, Ordering::Relaxed);
            }
            for j in batch {
                let _ = j.tx.send(Event::Failed(format!("{e:#}")));
            }
        }
    }
}
