//! One denoising call, as both loops make it: upstream `generate` ([`super::sampler`]) and
//! Fast-dLLM decoding ([`super::fast`]). [`Asked`] holds the requested (batch row, position)
//! pairs, [`Calls`] the block schedule, the per-row quotas, the predictions or the predictor's
//! own commit selection, the host commit and the tallies; [`Hooks`] are the caller's callbacks.
//! Everything is sized once per generation, so nothing allocates inside the loop.

use std::ops::Range;

use anyhow::{Context, Result};

use super::predict::{apply_commits, Commits, PredictRequest, Predictor, Progress, SelectsCommits};
use crate::backend::commit::{commit_select, Cand, CommitRule};

/// What a generation calls before every forward pass: the current tokens `[b·t]`, `b` and `t`.
pub type Observer<'a> = dyn FnMut(&[u32], usize, usize) -> Result<()> + 'a;

/// The caller's callbacks of a generation: `progress` after every step, once its tokens were
/// committed; `observe` before every forward pass (an error from it aborts the generation with
/// that error, e.g. the server cancelling an abandoned request).
#[derive(Default)]
pub struct Hooks<'h> {
    pub progress: Option<&'h mut dyn FnMut(Progress)>,
    pub observe: Option<&'h mut Observer<'h>>,
}

impl<'h> Hooks<'h> {
    /// Only `progress`.
    pub fn on_progress(progress: &'h mut dyn FnMut(Progress)) -> Self {
        Hooks {
            progress: Some(progress),
            observe: None,
        }
    }

    /// Only `observe`.
    pub fn on_observe(observe: &'h mut Observer<'h>) -> Self {
        Hooks {
            progress: None,
            observe: Some(observe),
        }
    }

    pub(super) fn observe(&mut self, x: &[u32], b: usize, t: usize) -> Result<()> {
        match self.observe.as_mut() {
            Some(o) => o(x, b, t),
            None => Ok(()),
        }
    }

    pub(super) fn report(&mut self, p: Progress) {
        if let Some(cb) = self.progress.as_mut() {
            cb(p);
        }
    }
}

/// The commit selector a predictor of either kind gave, or an error saying it gave none.
pub(super) fn selector(s: Option<&mut dyn SelectsCommits>) -> Result<&mut dyn SelectsCommits> {
    s.context("this predictor does not make the commit selection (it gave no commit_selector)")
}

/// A predictor of either kind as [`Want::of`] asks it, for its request kind `R`
/// ([`PredictRequest`] or [`super::fast::SpanRequest`]).
pub(super) trait Pass<R> {
    fn predict_rows(&mut self, req: &R, out: &mut [(u32, f32)]) -> Result<()>;
    fn commit_rows(&mut self, req: &R, c: &mut Commits<'_>) -> Result<()>;
}

impl<'a> Pass<PredictRequest<'a>> for dyn Predictor + '_ {
    fn predict_rows(&mut self, req: &PredictRequest<'a>, out: &mut [(u32, f32)]) -> Result<()> {
        self.predict(req, out)
    }
    fn commit_rows(&mut self, req: &PredictRequest<'a>, c: &mut Commits<'_>) -> Result<()> {
        selector(self.commit_selector())?.predict_commit(req, c)
    }
}

/// The (batch row, position) pairs one call asks for, sorted by row, then position, and where
/// each batch row's pairs start (`off[r]..off[r + 1]`).
pub(super) struct Asked {
    pub(super) rows: Vec<(u32, u32)>,
    off: Vec<usize>,
}

impl Asked {
    /// Room for `n` pairs of `b` batch rows.
    pub(super) fn new(b: usize, n: usize) -> Asked {
        Asked {
            rows: Vec::with_capacity(n),
            off: vec![0; b + 1],
        }
    }

    /// Ask for every position in `span` of each row of `x` (rows of `t` tokens) that is `mask`.
    /// Positions are below `t`, which the callers checked fits `u32`.
    pub(super) fn masks(&mut self, x: &[u32], t: usize, span: Range<usize>, mask: u32) {
        self.rows.clear();
        for (r, xr) in x.chunks_exact(t).enumerate() {
            self.rows.extend(
                span.clone()
                    .filter(|&p| xr[p] == mask)
                    .map(|p| (r as u32, p as u32)),
            );
            self.off[r + 1] = self.rows.len();
        }
    }
}

/// What [`Calls::pass`] wants of the predictor: the (token, confidence) of every asked pair, or
/// its own commit selection.
pub(super) enum Want<'w, 'c> {
    Predictions(&'w mut [(u32, f32)]),
    Commits(&'w mut Commits<'c>),
}

impl Want<'_, '_> {
    /// Ask `pred` for it with `req`.
    pub(super) fn of<R, P: Pass<R> + ?Sized>(self, pred: &mut P, req: &R) -> Result<()> {
        match self {
            Want::Predictions(out) => pred.predict_rows(req, out),
            Want::Commits(c) => pred.commit_rows(req, c),
        }
    }
}

/// The calls of one generation: the block schedule, each call's quotas and answers (the
/// predictions, committed on the host, or the predictor's own commits), and the tallies.
pub(super) struct Calls {
    b: usize,
    t: usize,
    num_blocks: usize,
    /// Steps [`Progress`] reports (at least the calls made).
    total_steps: usize,
    rule: CommitRule,
    mask: u32,
    out: Vec<(u32, f32)>,
    /// (confidence, position, token) of one batch row's still-masked candidates.
    cands: Vec<Cand>,
    /// `[b·steps_per_block]`: each batch row's schedule for the current block.
    sched: Vec<usize>,
    steps_per_block: usize,
    /// `[b]`: each batch row's quota for the current call.
    quota: Vec<usize>,
    /// With a predictor that selects: the token committed at each asked pair, or −1.
    commits: Vec<i32>,
    selects: bool,
    /// Forward passes so far (upstream's `nfe`).
    pub(super) nfe: usize,
    /// Σ over the calls of the asked pairs.
    pub(super) rows_predicted: usize,
}

impl Calls {
    /// For `b` batch rows of `t` tokens whose masks are `mask`, committed under `rule`, in
    /// `num_blocks` blocks of `steps_per_block` scheduled steps (`total_steps` to report);
    /// `selects`: the predictor makes the commit selection.
    pub(super) fn new(
        (b, t): (usize, usize),
        (num_blocks, steps_per_block, total_steps): (usize, usize, usize),
        (rule, mask): (CommitRule, u32),
        selects: bool,
    ) -> Calls {
        let n = b * t;
        Calls {
            b,
            t,
            num_blocks,
            total_steps,
            rule,
            mask,
            out: if selects {
                Vec::new()
            } else {
                vec![(0, 0.0); n]
            },
            cands: Vec::with_capacity(t),
            sched: vec![0; b * steps_per_block],
            steps_per_block,
            quota: vec![0; b],
            commits: if selects { vec![-1; n] } else { Vec::new() },
            selects,
            nfe: 0,
            rows_predicted: 0,
        }
    }

    /// Each row's schedule for the block `blk` of `x`: its masks there spread over the block's
    /// steps ([`num_transfer_tokens_into`]).
    pub(super) fn schedule(&mut self, x: &[u32], blk: Range<usize>) {
        let rows = x.chunks_exact(self.t);
        for (xr, sched) in rows.zip(self.sched.chunks_exact_mut(self.steps_per_block)) {
            let in_block = xr[blk.clone()].iter().filter(|&&v| v == self.mask).count();
            num_transfer_tokens_into(in_block, sched);
        }
    }

    /// The quotas of call `i` of the block: the schedule's, or one token per call past its end
    /// (a block whose quota ran out with masks left).
    pub(super) fn set_quota(&mut self, i: usize) {
        let scheds = self.sched.chunks_exact(self.steps_per_block);
        for (q, sched) in self.quota.iter_mut().zip(scheds) {
            *q = sched.get(i).copied().unwrap_or(1);
        }
    }

    /// One forward pass of block `block` and its commits into the canvas `x`: `hooks.observe`,
    /// then `call` (the predictor on the request over `x` and the asked pairs, for what it
    /// [`Want`]s), then the commits and `hooks.progress`. An error carries the context `what`.
    pub(super) fn pass(
        &mut self,
        x: &mut [u32],
        asked: &Asked,
        (hooks, block): (&mut Hooks<'_>, usize),
        call: impl FnOnce(&[u32], &[(u32, u32)], Want<'_, '_>) -> Result<()>,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let nr = asked.rows.len();
        hooks
            .observe(x, self.b, self.t)
            .and_then(|()| {
                if self.selects {
                    let mut c = Commits {
                        quota: &self.quota,
                        rule: self.rule,
                        mask_id: self.mask,
                        out: &mut self.commits[..nr],
                    };
                    call(x, &asked.rows, Want::Commits(&mut c))
                } else {
                    call(x, &asked.rows, Want::Predictions(&mut self.out[..nr]))
                }
            })
            .with_context(what)?;
        self.commit(x, asked);
        self.nfe += 1;
        self.rows_predicted += nr;
        hooks.report(Progress {
            step: self.nfe,
            total_steps: self.total_steps.max(self.nfe),
            block,
            num_blocks: self.num_blocks,
        });
        Ok(())
    }

    /// Write the call's commits into `x`: the predictor's, or per batch row [`commit_select`]
    /// among the asked pairs still `mask`.
    fn commit(&mut self, x: &mut [u32], asked: &Asked) {
        let (t, nr) = (self.t, asked.rows.len());
        if self.selects {
            apply_commits(x, t, &asked.rows, &self.commits[..nr]);
            return;
        }
        for (r, &quota) in self.quota.iter().enumerate() {
            if quota == 0 && self.rule == CommitRule::Quota {
                continue;
            }
            let own = asked.off[r]..asked.off[r + 1];
            self.cands.clear();
            for (&(_, p), &(tok, conf)) in asked.rows[own.clone()].iter().zip(&self.out[own]) {
                let p = p as usize;
                if x[r * t + p] == self.mask {
                    self.cands.push((conf, p, tok));
                }
            }
            let k = commit_select(&mut self.cands, quota, self.rule);
            for &(_, p, tok) in &self.cands[..k] {
                x[r * t + p] = tok;
            }
        }
    }
}

/// `get_num_transfer_tokens` for one row: `mask_count` tokens over `steps` steps, the first
/// `mask_count % steps` steps taking one extra.
pub fn num_transfer_tokens(mask_count: usize, steps: usize) -> Vec<usize> {
    let mut out = vec![0; steps];
    num_transfer_tokens_into(mask_count, &mut out);
    out
}

/// [`num_transfer_tokens`] into a caller's buffer (`steps = out.len()`), without allocating.
pub fn num_transfer_tokens_into(mask_count: usize, out: &mut [usize]) {
    let steps = out.len();
    if steps == 0 {
        return;
    }
    let base = mask_count / steps;
    let rem = mask_count % steps;
    for (i, o) in out.iter_mut().enumerate() {
        *o = base + usize::from(i < rem);
    }
}
