//! `commit_select`: which of a batch row's predicted candidates a denoising step commits.
//!
//! One name through every layer: [`commit_select`] is the selection the sampler's host path runs
//! on each batch row, [`commit_rows`] is [`crate::backend::Backend::commit_select`] on host
//! slices (the CPU backend runs it), and `commit_select_f32` in `kernels/topk.cu` is its CUDA
//! twin, checked against [`commit_rows`] in `tests/cuda_parity.rs`.
//!
//! Order ([`conf_order`]): confidence descending, ties to the lowest position, NaN ranks as −∞,
//! −0.0 equals +0.0. The rules compare the candidates' own confidences (a NaN fails the threshold
//! rule, `NaN ≥ th` being false, and passes the factor rule, `NaN < th` being false), in f64
//! exactly as upstream's tensors would hold the f32 value.

use anyhow::{bail, ensure, Result};

use crate::backend::head::conf_order;

/// How many of a batch row's candidates one step commits (reference §4.3, §7.5, §7.6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CommitRule {
    /// The fixed schedule: the row's `quota` best, capped at the candidate count.
    Quota,
    /// `get_transfer_index(…, threshold)`: the best, then every following candidate whose
    /// confidence is `≥ threshold` (stopping at the first that is not).
    Threshold(f64),
    /// `get_transfer_index_dynamic(…, factor)`: thresholds `1 − factor/(j+1)` for the 1-based
    /// rank `j ≥ 2`; stop at the first failing rank `f` (0-based) and commit `f`, except that a
    /// stop at the last rank (or none) commits all `n` (upstream quirk, §7.6).
    Factor(f64),
}

impl CommitRule {
    /// The rule's mode number and parameter as the CUDA kernel takes them (0 quota, 1 threshold,
    /// 2 factor).
    pub fn mode(self) -> (i32, f64) {
        match self {
            CommitRule::Quota => (0, 0.0),
            CommitRule::Threshold(th) => (1, th),
            CommitRule::Factor(f) => (2, f),
        }
    }
}

/// One candidate: (confidence, position, token).
pub type Cand = (f32, usize, u32);

/// How many of `sorted` (candidates in [`conf_order`]) a step commits under `rule`.
pub fn commit_count(sorted: &[Cand], quota: usize, rule: CommitRule) -> usize {
    let n = sorted.len();
    if n == 0 {
        return 0;
    }
    match rule {
        CommitRule::Quota => quota.min(n),
        CommitRule::Threshold(th) => {
            1 + sorted[1..]
                .iter()
                .take_while(|c| (c.0 as f64) >= th)
                .count()
        }
        CommitRule::Factor(factor) => {
            let fail = (1..n).find(|&f| (sorted[f].0 as f64) < 1.0 - factor / (f as f64 + 2.0));
            match fail {
                Some(f) if f < n - 1 => f,
                _ => n,
            }
        }
    }
}

/// Sorts `cands` (distinct positions) into [`conf_order`] and returns how many of the first
/// ones the step commits. Sorting in place allocates nothing.
pub fn commit_select(cands: &mut [Cand], quota: usize, rule: CommitRule) -> usize {
    // Positions are distinct, so conf_order is a total order and the unstable sort is exact.
    cands.sort_unstable_by(|a, c| conf_order((a.0, a.1), (c.0, c.1)));
    commit_count(cands, quota, rule)
}

/// The sizes and rule of one [`crate::backend::Backend::commit_select`] call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CommitShape {
    /// Requested rows (predictions) of the pass.
    pub r: usize,
    /// Batch rows (segments of the requested rows).
    pub b: usize,
    /// Tokens of the pass (`ids` holds at least this many; `rows` index them).
    pub n: usize,
    /// A requested row is a candidate while its token `ids[rows[i]]` is this id.
    pub mask_id: u32,
    pub rule: CommitRule,
}

/// [`crate::backend::Backend::commit_select`] on host slices. `plan` is `[2b + 1]`: the
/// segment offsets `seg[0..=b]` of the batch rows in the requested rows (non-decreasing,
/// `≤ r`; a batch row's requested rows sorted by position), then the quotas `[b]`. For each batch
/// row, the requested rows whose token is still `mask_id` are the candidates (confidence
/// `conf[i]`, position = index in the segment, token `tok[i]`); [`commit_select`] picks, and
/// `commit[i]` becomes `tok[i]` for each picked row, −1 for every other of the `r` rows.
/// The candidates are staged in a per-thread scratch grown once.
pub fn commit_rows(
    commit: &mut [i32],
    (tok, conf): (&[i32], &[f32]),
    rows: &[i32],
    ids: &[i32],
    plan: &[i32],
    s: CommitShape,
) -> Result<()> {
    const OP: &str = "commit_select";
    let CommitShape { r, b, n, .. } = s;
    for (what, len, want) in [
        ("commit", commit.len(), r),
        ("tok", tok.len(), r),
        ("conf", conf.len(), r),
        ("rows", rows.len(), r),
        ("ids", ids.len(), n),
        ("plan", plan.len(), 2 * b + 1),
    ] {
        ensure!(
            len >= want,
            "{OP}: `{what}` holds {len} entries, expected at least {want}"
        );
    }
    check_plan(OP, &plan[..2 * b + 1], r, b)?;
    if let Some((i, rw)) = crate::backend::cpu::check::first_outside(&rows[..r], n) {
        bail!("{OP}: rows[{i}] = {rw} is outside the pass's {n} tokens");
    }
    commit[..r].fill(-1);
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<Cand>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|sc| {
        let scratch = &mut *sc.borrow_mut();
        for br in 0..b {
            let (s0, s1) = (plan[br] as usize, plan[br + 1] as usize);
            let cands = (s0..s1)
                .filter(|&i| ids[rows[i] as usize] == s.mask_id as i32)
                .map(|i| (conf[i], i - s0, tok[i] as u32));
            let quota = plan[b + 1 + br] as usize;
            for &(_, j, tk) in commit_row(scratch, cands, (quota, s.rule)) {
                commit[s0 + j] = tk as i32;
            }
        }
    });
    Ok(())
}

/// One batch row's commits, as the sampler's host path and [`commit_rows`] make them: the
/// candidates `cands` (confidence, position, token; those still masked) are staged in
/// `scratch` and selected by [`commit_select`] with `quota` under `rule`; returns the ones
/// kept, best first.
pub fn commit_row(
    scratch: &mut Vec<Cand>,
    cands: impl Iterator<Item = Cand>,
    (quota, rule): (usize, CommitRule),
) -> &[Cand] {
    scratch.clear();
    scratch.extend(cands);
    let k = commit_select(scratch, quota, rule);
    &scratch[..k]
}

/// Checks a commit plan `[2b + 1]`: offsets non-decreasing from 0 up to at most `r`, quotas
/// non-negative. Errors name the entry.
pub fn check_plan(op: &str, plan: &[i32], r: usize, b: usize) -> Result<()> {
    ensure!(
        plan.len() == 2 * b + 1,
        "{op}: plan holds {} entries for b = {b}",
        plan.len()
    );
    ensure!(
        plan[0] == 0,
        "{op}: plan[0] (the first segment offset) is {}, expected 0",
        plan[0]
    );
    for br in 0..b {
        let (s0, s1) = (plan[br], plan[br + 1]);
        ensure!(
            s0 <= s1 && s1 as usize <= r,
            "{op}: segment offsets plan[{br}..={}] = {s0}..{s1} decrease or exceed r = {r}",
            br + 1
        );
        let q = plan[b + 1 + br];
        ensure!(
            q >= 0,
            "{op}: quota of batch row {br} (plan[{}]) is {q} < 0",
            b + 1 + br
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(confs: &[f32]) -> Vec<Cand> {
        confs.iter().enumerate().map(|(i, &c)| (c, i, 0)).collect()
    }

    #[test]
    fn threshold_rule_commits_top1_then_ties_at_threshold() {
        let d = CommitRule::Threshold(0.5);
        assert_eq!(commit_count(&c(&[0.4, 0.3]), 0, d), 1);
        assert_eq!(commit_count(&c(&[0.9, 0.5, 0.49]), 0, d), 2);
        assert_eq!(commit_count(&c(&[]), 0, d), 0);
        assert_eq!(
            commit_count(&c(&[1.0, 1.0, 1.0]), 0, CommitRule::Threshold(1.01)),
            1
        );
        // A NaN stops the walk (NaN >= th is false).
        assert_eq!(commit_count(&c(&[0.9, f32::NAN, 0.9]), 0, d), 1);
    }

    #[test]
    fn factor_rule_follows_upstream_quirks() {
        // factor 1: thresholds (1-based rank j ≥ 2) 1 − 1/(j+1): 2/3, 3/4, 4/5, …
        let d = CommitRule::Factor(1.0);
        // rank 2 fails (0.6 < 2/3), not the last rank: commit 1.
        assert_eq!(commit_count(&c(&[0.9, 0.6, 0.1]), 0, d), 1);
        // rank 3 fails (0.7 < 3/4) and is the last: upstream commits all 3.
        assert_eq!(commit_count(&c(&[0.9, 0.7, 0.7]), 0, d), 3);
        // nothing fails: all.
        assert_eq!(commit_count(&c(&[0.99, 0.9, 0.8]), 0, d), 3);
        // rank 3 fails with a 4th after it: commit 2.
        assert_eq!(commit_count(&c(&[0.99, 0.9, 0.7, 0.7]), 0, d), 2);
        assert_eq!(commit_count(&c(&[0.01]), 0, d), 1);
        // A NaN passes (NaN < th is false).
        assert_eq!(commit_count(&c(&[0.9, f32::NAN, 0.1, 0.0]), 0, d), 2);
    }

    #[test]
    fn select_orders_nan_as_neg_inf_and_ties_by_position() {
        let mut v = vec![
            (f32::NAN, 0, 10),
            (0.5, 1, 11),
            (f32::NEG_INFINITY, 2, 12),
            (0.5, 3, 13),
            (-0.0, 4, 14),
            (0.0, 5, 15),
        ];
        assert_eq!(commit_select(&mut v, 4, CommitRule::Quota), 4);
        let order: Vec<usize> = v.iter().map(|c| c.1).collect();
        assert_eq!(order, [1, 3, 4, 5, 0, 2]);
        assert_eq!(commit_select(&mut v, 99, CommitRule::Quota), 6);
    }

    #[test]
    fn rows_skip_committed_candidates_and_fill_the_rest() {
        // Two batch rows: [0, 3) and [3, 5); row 1's first candidate is no longer masked.
        let (mask, r) = (7, 5);
        let ids = [7, 7, 7, 1, 7, 7];
        let rows = [0, 1, 2, 3, 4];
        let tok = [20, 21, 22, 23, 24];
        let conf = [0.1, 0.9, f32::NAN, 0.99, 0.2];
        let plan = [0, 3, 5, 2, 1];
        let s = CommitShape {
            r,
            b: 2,
            n: ids.len(),
            mask_id: mask,
            rule: CommitRule::Quota,
        };
        let mut commit = [9; 5];
        commit_rows(&mut commit, (&tok, &conf), &rows, &ids, &plan, s).unwrap();
        assert_eq!(commit, [20, 21, -1, -1, 24]);
        let bad = [0, 4, 3, 1, 1];
        let e = commit_rows(&mut commit, (&tok, &conf), &rows, &ids, &bad, s);
        assert!(e.unwrap_err().to_string().contains("decrease"));
    }
}
