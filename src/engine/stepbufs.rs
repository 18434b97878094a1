//! The device buffers of a workspace's step graphs ([`super::stepgraph`]), allocated once per
//! workspace so a captured graph's pointers stay valid.

use anyhow::{bail, Result};

use crate::backend::step::STATE_LEN;
use crate::backend::Backend;

/// The device buffers of the step graphs of one workspace, sized for its capacity when first
/// used, so they never move under a captured graph (they live and die with the workspace and
/// its graphs).
pub struct StepBufs<B: Backend> {
    /// Each batch row's schedule of the block `[B·steps]` (row-major by batch row).
    pub(super) sched: B::Ints,
    /// `commit_select`'s plan `[2B + 1]`: segment offsets, then the quotas of the next step.
    pub(super) plan: B::Ints,
    /// `commit_select`'s output `[R]`.
    pub(super) commit: B::Ints,
    /// The step state ([`crate::backend::step`]).
    pub(super) state: B::Ints,
    pub(super) sched_len: usize,
    pub(super) plan_len: usize,
    // Host staging, grown once per block shape (outside the loop).
    pub(super) h_sched: Vec<i32>,
    pub(super) h_plan: Vec<i32>,
    pub(super) h_state: [i32; STATE_LEN],
}

impl<B: Backend> StepBufs<B> {
    /// Buffers for passes of at most `max_tokens` tokens (so at most that many batch rows and
    /// schedule entries) and `max_rows` requested rows.
    pub(super) fn new(be: &B, max_tokens: usize, max_rows: usize) -> Result<Self> {
        if max_tokens == 0 {
            bail!("step buffers: the workspace holds no tokens");
        }
        let plan_len = 2 * max_tokens + 1;
        Ok(StepBufs {
            sched: be.alloc_ints(max_tokens)?,
            plan: be.alloc_ints(plan_len)?,
            commit: be.alloc_ints(max_rows.max(1))?,
            state: be.alloc_ints(STATE_LEN)?,
            sched_len: max_tokens,
            plan_len,
            h_sched: Vec::with_capacity(max_tokens),
            h_plan: Vec::with_capacity(plan_len),
            h_state: [0; STATE_LEN],
        })
    }
}
