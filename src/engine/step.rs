//! One denoising call, as both loops make it: upstream `generate` ([`super::sampler`]) and
//! Fast-dLLM decoding ([`super::fast`]). [`Asked`] holds the requested (batch row, position)
//! pairs, [`Calls`] the block schedule, the per-row quotas, the predictions or the predictor's
//! own commit selection, the host commit and the tallies; [`Hooks`] are the caller's callbacks.
//! Everything is sized once per generation, so nothing allocates inside the loop.

use std::ops::Range;

use anyhow::{Context, Result};

use super::predict::{apply_commits, BlockPlan, Commits, MasksLeft, PredictRequest, Predictor};
use super::predict::{Progress, SelectsCommits, StepsOnDevice};
use crate::backend::commit::{commit_row, Cand, CommitRule};

/// What a generation calls before every forward pass: the current tokens `[b·t]`, `b` and `t`.
pub type Observer<'a> = dyn FnMut(&[u32], usize, usize) -> Result<()> + 'a;

/// The caller's callbacks of a generation: `progress` after every step, once its tokens were
/// committed (with whole steps on the device, once the step is queued: its tokens are committed
/// before anything reads them); `observe` before every forward pass (an error from it aborts
/// the generation with that error, e.g. the server cancelling an abandoned request).
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

/// The whole-step driver a predictor of either kind gave, or an error saying it gave none.
pub(super) fn device_steps(s: Option<&mut dyn StepsOnDevice>) -> Result<&mut dyn StepsOnDevice> {
    s.context("this predictor does not run whole steps on its device (it gave no steps_on_device)")
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
    pub(super) off: Vec<usize>,
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
                        seg: &asked.off,
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
        self.tally(nr, (hooks, block));
        Ok(())
    }

    /// One whole step of block `block` on the device (`dev`, see [`StepsOnDevice`]) over `nr`
    /// requested pairs: `hooks.observe` (on the tokens read back from the device first, when
    /// there is an observer), the step, `hooks.progress`. With `count`, returns the masks left.
    pub(super) fn device_pass(
        &mut self,
        (x, nr): (&mut [u32], usize),
        (hooks, block): (&mut Hooks<'_>, usize),
        (dev, count): (&mut dyn StepsOnDevice, bool),
        what: impl FnOnce() -> String,
    ) -> Result<Option<MasksLeft>> {
        let left = (|| {
            if hooks.observe.is_some() {
                dev.read_tokens(x)?;
            }
            hooks.observe(x, self.b, self.t)?;
            dev.step(count)
        })()
        .with_context(what)?;
        self.tally(nr, (hooks, block));
        Ok(left)
    }

    /// Count a call over `nr` pairs of block `block` and report it.
    fn tally(&mut self, nr: usize, (hooks, block): (&mut Hooks<'_>, usize)) {
        self.nfe += 1;
        self.rows_predicted += nr;
        hooks.report(Progress {
            step: self.nfe,
            total_steps: self.total_steps.max(self.nfe),
            block,
            num_blocks: self.num_blocks,
        });
    }

    /// The [`BlockPlan`] of the block at positions `block` for the pairs `asked`, from its call
    /// `first` on: the current schedule ([`Calls::schedule`]) and the rule.
    pub(super) fn block_plan<'s>(
        &'s self,
        asked: &'s Asked,
        block: Range<usize>,
        first: usize,
    ) -> BlockPlan<'s> {
        BlockPlan {
            seg: &asked.off,
            sched: &self.sched,
            steps: self.steps_per_block,
            first,
            rule: self.rule,
            mask_id: self.mask,
            block,
        }
    }

    /// Write the call's commits into `x`: the predictor's, or per batch row [`commit_row`]
    /// among the asked pairs still `mask`.
    fn commit(&mut self, x: &mut [u32], asked: &Asked) {
        let (t, nr) = (self.t, asked.rows.len());
        if self.selects {
            apply_commits(x, t, &asked.rows, &self.commits[..nr]);
            return;
        }
        for (r, &quota) in self.quota.iter().enumerate() {
            let own = asked.off[r]..asked.off[r + 1];
            let xr = &mut x[r * t..(r + 1) * t];
            let cands = asked.rows[own.clone()]
                .iter()
                .zip(&self.out[own])
                .map(|(&(_, p), &(tok, conf))| (conf, p as usize, tok))
                .filter(|&(_, p, _)| xr[p] == self.mask);
            for &(_, p, tok) in commit_row(&mut self.cands, cands, (quota, self.rule)) {
                xr[p] = tok;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::step::{block_tables, initial_state, step_advance_ref, StepShape};

    /// The schedule table and first plan a device block is given ([`block_tables`]), advanced by
    /// [`step_advance_ref`] (the device's step counter), give the same quota at every call as the
    /// host's [`Calls::set_quota`], past the schedule too; and each row's table is upstream's
    /// `num_transfer_tokens` (odd counts, steps not dividing the block, empty rows).
    #[test]
    fn device_schedule_table_equals_the_sampler_quotas() {
        let mask = 9;
        let t = 16;
        for (counts, spb) in [
            (vec![8usize, 5], 3usize),
            (vec![15], 4),
            (vec![3, 0, 7], 5),
            (vec![1], 1),
            (vec![7, 16], 7),
        ] {
            let b = counts.len();
            let x: Vec<u32> = counts
                .iter()
                .flat_map(|&c| (0..t).map(move |p| if p < c { mask } else { 1 }))
                .collect();
            let mut calls = Calls::new((b, t), (1, spb, spb), (CommitRule::Quota, mask), true);
            calls.schedule(&x, 0..t);
            let mut asked = Asked::new(b, b * t);
            asked.masks(&x, t, 0..t, mask);
            for (br, &c) in counts.iter().enumerate() {
                let sched = &calls.block_plan(&asked, 0..t, 0).sched[br * spb..][..spb];
                assert_eq!(*sched, num_transfer_tokens(c, spb)[..]);
            }
            // A block from its first call (plain generate, no cache) or its second (the calls
            // against a KV cache).
            for first in [0, 1] {
                let plan = calls.block_plan(&asked, 0..t, first);
                let (mut sched, mut dplan) = (Vec::new(), Vec::new());
                let tables = (plan.seg, plan.sched, spb);
                block_tables(tables, first, (&mut sched, &mut dplan)).unwrap();
                assert_eq!(
                    dplan[..=b],
                    asked.off.iter().map(|&o| o as i32).collect::<Vec<_>>()[..]
                );
                let mut state = initial_state(0, (0, t)).unwrap();
                state[crate::backend::step::STATE_STEP] = first as i32;
                let mut ids = vec![1; b * t];
                let s = StepShape {
                    r: 0,
                    b,
                    t,
                    n: b * t,
                    mirror: 0,
                    mask_id: mask,
                    steps: spb,
                };
                for i in first..spb + 3 {
                    calls.set_quota(i);
                    let want: Vec<i32> = calls.quota.iter().map(|&q| q as i32).collect();
                    let what = format!("{counts:?} over {spb} steps from {first}, call {i}");
                    assert_eq!(dplan[b + 1..], want[..], "{what}");
                    let bufs = (&mut ids[..], &mut state[..], &mut dplan[..]);
                    step_advance_ref(bufs, (&[], &[], &sched), s).unwrap();
                }
            }
        }
    }
}
