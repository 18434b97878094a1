//! `step_advance`: the end of one denoising step on the device, and the device step state it
//! advances (`LLADA_STEP_GRAPH=1`, [`crate::engine::stepgraph`]).
//!
//! A step graph replays the same launches every step, so whatever changes from step to step
//! lives in device memory: the pass's tokens (`ids`, which the step's commits are written into),
//! the commit plan's quotas (written for the next step from the block's schedule table), and the
//! step state below, whose step counter keys the head's random numbers
//! (`head_select_step_bf16`) and indexes the schedule. The host writes the state once per block
//! and reads back only the masks left (threshold / factor rules) and, once per block, the tokens.
//!
//! One name through every layer: [`step_advance_ref`] is the CPU reference (the CPU backend runs
//! it), `step_advance_i32` in `kernels/step_advance.cu` its CUDA twin, checked against it in
//! `tests/cuda_parity.rs`.

use anyhow::{bail, ensure, Result};

/// Ints of the step state.
pub const STATE_LEN: usize = 7;
/// Steps the block has made (the device step counter `i`).
pub const STATE_STEP: usize = 0;
/// The RNG step of the block's first step, low and high 32 bits.
pub const STATE_STEP0_LO: usize = 1;
pub const STATE_STEP0_HI: usize = 2;
/// The block span `[s, e)` (positions within a row) whose masks [`STATE_LEFT_BLOCK`] counts.
pub const STATE_BLOCK_START: usize = 3;
pub const STATE_BLOCK_END: usize = 4;
/// Out: the requested rows still masked in the block span after the last step.
pub const STATE_LEFT_BLOCK: usize = 5;
/// Out: the requested rows still masked after the last step.
pub const STATE_LEFT_ROWS: usize = 6;

/// The step state at the start of a block: no step made, the block's first RNG step `step0`,
/// its span `[s, e)` (positions in the pass's rows), nothing counted yet.
pub fn initial_state(step0: u64, (s, e): (usize, usize)) -> Result<[i32; STATE_LEN]> {
    let pos = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| anyhow::anyhow!("step state: {what} {v} exceeds i32"))
    };
    let mut st = [0i32; STATE_LEN];
    st[STATE_STEP0_LO] = step0 as u32 as i32;
    st[STATE_STEP0_HI] = (step0 >> 32) as u32 as i32;
    st[STATE_BLOCK_START] = pos(s, "block start")?;
    st[STATE_BLOCK_END] = pos(e, "block end")?;
    Ok(st)
}

/// The tables of a block as the host uploads them: the schedule `sched` (`[b·steps]`, row-major
/// by batch row) as ints into `h_sched`, and the plan of the block's first device step, step
/// `first` of the block, into `h_plan`: the segment offsets `seg` (`[b + 1]`), then each batch
/// row's quota of that step, `sched[br·steps + first]` (1 past the schedule). Later quotas come
/// from [`step_advance_ref`] (and its kernel). Reuses the vectors' storage.
pub fn block_tables(
    (seg, sched, steps): (&[usize], &[usize], usize),
    first: usize,
    (h_sched, h_plan): (&mut Vec<i32>, &mut Vec<i32>),
) -> Result<()> {
    let b = seg.len().saturating_sub(1);
    ensure!(
        !seg.is_empty() && steps > 0 && sched.len() == b * steps,
        "a schedule of {} entries for {b} batch rows of {steps} steps",
        sched.len()
    );
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| anyhow::anyhow!("block tables: {what} {v} exceeds i32"))
    };
    h_sched.clear();
    for &q in sched {
        h_sched.push(int(q, "a quota")?);
    }
    h_plan.clear();
    for &o in seg {
        h_plan.push(int(o, "a segment offset")?);
    }
    for br in 0..b {
        h_plan.push(if first < steps {
            h_sched[br * steps + first]
        } else {
            1
        });
    }
    Ok(())
}

/// The RNG step the head uses with the step state `state`: the block's first step plus the
/// steps made (u64, wrapping, as the kernel adds).
pub fn rng_step(state: &[i32]) -> u64 {
    let lo = state[STATE_STEP0_LO] as u32 as u64;
    let hi = state[STATE_STEP0_HI] as u32 as u64;
    (lo | (hi << 32)).wrapping_add(state[STATE_STEP] as u32 as u64)
}

/// The sizes of one [`crate::backend::Backend::step_advance`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepShape {
    /// Requested rows (each a token index below `mirror`, or below `n` without CFG).
    pub r: usize,
    /// Batch rows (of the plan and the schedule).
    pub b: usize,
    /// Tokens per batch row (a requested row's position is its index mod `t`).
    pub t: usize,
    /// Tokens of the pass (`ids` holds at least this many).
    pub n: usize,
    /// With CFG the offset of the unconditional copy of each token (`b·t`), else 0.
    pub mirror: usize,
    pub mask_id: u32,
    /// Entries of each batch row's schedule.
    pub steps: usize,
}

/// [`crate::backend::Backend::step_advance`] on host slices (the contract of
/// `kernels/step_advance.cu`): writes `commit[j] ≥ 0` at `ids[rows[j]]` (and at
/// `ids[rows[j] + mirror]` with CFG), counts the requested rows still `mask_id` (all of them,
/// and those whose position lies in the state's block span) into the state, advances its step
/// counter `i` and writes the quotas of step `i` into `plan[b + 1..]`: `sched[br·steps + i]`, or
/// 1 past the schedule (the sampler's rule, [`crate::engine::sampler`]).
pub fn step_advance_ref(
    (ids, state, plan): (&mut [i32], &mut [i32], &mut [i32]),
    (commit, rows, sched): (&[i32], &[i32], &[i32]),
    s: StepShape,
) -> Result<()> {
    check(
        "step_advance",
        (ids.len(), state.len(), plan.len()),
        (commit.len(), rows, sched.len()),
        s,
    )?;
    let StepShape {
        r, b, t, mirror, ..
    } = s;
    let mask = s.mask_id as i32;
    for (&c, &k) in commit[..r].iter().zip(&rows[..r]) {
        if c >= 0 {
            ids[k as usize] = c;
            if mirror > 0 {
                ids[k as usize + mirror] = c;
            }
        }
    }
    let (s0, e0) = (state[STATE_BLOCK_START], state[STATE_BLOCK_END]);
    let (mut left_block, mut left_rows) = (0, 0);
    for &k in &rows[..r] {
        if ids[k as usize] == mask {
            let p = (k as usize % t) as i32;
            left_rows += 1;
            left_block += i32::from(p >= s0 && p < e0);
        }
    }
    let i = state[STATE_STEP] + 1;
    for br in 0..b {
        plan[b + 1 + br] = if (i as usize) < s.steps {
            sched[br * s.steps + i as usize]
        } else {
            1
        };
    }
    state[STATE_STEP] = i;
    state[STATE_LEFT_BLOCK] = left_block;
    state[STATE_LEFT_ROWS] = left_rows;
    Ok(())
}

/// The checks of a `step_advance` call every backend runs: buffer lengths, `t > 0`, and the
/// requested rows inside the pass (and, with CFG, inside its first half). `rows` is `None` where
/// the backend does not know their values (written by a kernel).
pub fn check(
    op: &str,
    (ids, state, plan): (usize, usize, usize),
    (commit, rows, sched): (usize, &[i32], usize),
    s: StepShape,
) -> Result<()> {
    let StepShape {
        r,
        b,
        t,
        n,
        mirror,
        steps,
        ..
    } = s;
    for (what, len, want) in [
        ("ids", ids, n),
        ("state", state, STATE_LEN),
        ("plan", plan, 2 * b + 1),
        ("commit", commit, r),
        ("sched", sched, b * steps),
    ] {
        ensure!(
            len >= want,
            "{op}: `{what}` holds {len} entries, expected at least {want}"
        );
    }
    ensure!(t > 0, "{op}: tokens per row t is 0");
    ensure!(
        mirror == 0 || 2 * mirror <= n,
        "{op}: the unconditional copy at {mirror} does not fit the pass's {n} tokens"
    );
    let hi = if mirror > 0 { mirror } else { n };
    if !rows.is_empty() {
        ensure!(
            rows.len() >= r,
            "{op}: `rows` holds {} entries, expected at least {r}",
            rows.len()
        );
        if let Some((j, k)) = rows[..r]
            .iter()
            .enumerate()
            .find(|(_, &k)| k < 0 || k as usize >= hi)
        {
            bail!("{op}: rows[{j}] = {k} is outside the {hi} tokens it may index");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_writes_counts_and_plans_the_next_quotas() {
        // b = 2 rows of t = 4 tokens, CFG mirror at 8; mask 9; block span [2, 4).
        let s = StepShape {
            r: 4,
            b: 2,
            t: 4,
            n: 16,
            mirror: 8,
            mask_id: 9,
            steps: 2,
        };
        let mut ids = [1, 9, 9, 9, 1, 1, 9, 9, 1, 9, 9, 9, 1, 1, 9, 9];
        let mut state = initial_state((3 << 32) | 5, (2, 4)).unwrap();
        assert_eq!(rng_step(&state), (3 << 32) | 5);
        let mut plan = [0, 2, 4, 1, 1];
        let rows = [1, 2, 6, 7];
        let commit = [-1, 42, 43, -1];
        let sched = [1, 2, 1, 0];
        step_advance_ref(
            (&mut ids, &mut state, &mut plan),
            (&commit, &rows, &sched),
            s,
        )
        .unwrap();
        assert_eq!(ids, [1, 9, 42, 9, 1, 1, 43, 9, 1, 9, 42, 9, 1, 1, 43, 9]);
        // Left: rows 1 (pos 1, outside the span) and 7 (pos 3): 1 in the block, 2 in all.
        assert_eq!(state[STATE_LEFT_BLOCK], 1);
        assert_eq!(state[STATE_LEFT_ROWS], 2);
        assert_eq!(state[STATE_STEP], 1);
        assert_eq!(rng_step(&state), (3 << 32) | 6);
        assert_eq!(plan, [0, 2, 4, 2, 0]);
        // Past the schedule: one token per step.
        step_advance_ref(
            (&mut ids, &mut state, &mut plan),
            (&[-1; 4], &rows, &sched),
            s,
        )
        .unwrap();
        assert_eq!(plan, [0, 2, 4, 1, 1]);
        // A row index in the unconditional half is refused.
        let e = step_advance_ref(
            (&mut ids, &mut state, &mut plan),
            (&commit, &[1, 2, 6, 9], &sched),
            s,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rows[3] = 9"), "{e}");
    }
}
