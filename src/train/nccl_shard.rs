//! The NCCL collectives of sharded optimizer state ([`crate::train::zero`]), all f32, in place,
//! grouped into one NCCL launch on the caller's stream, asynchronous like any launch:
//!
//! [`NcclComm::ranges_f32`]: for tensors split by
//! [`crate::train::zero::ShardLayout::tensor_bounds`] into unequal (possibly empty) ranges,
//! one `ncclReduce` to, or `ncclBroadcast` from, each range's owner ([`RangeOp`]).
//!
//! NCCL sums in its own order (ring or tree), so unlike the TCP group's these sums are not the
//! bits of the all-reduce; each is deterministic for a fixed world and topology.

use std::ffi::c_void;

use anyhow::{ensure, Result};

use super::{
    api, check, Api, NcclComm, NcclResult, NCCL_FLOAT32, NCCL_IN_PROGRESS, NCCL_SUCCESS, NCCL_SUM,
};

/// What [`NcclComm::ranges_f32`] does with each rank's range of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeOp {
    /// Sum over the ranks onto the range's owner.
    SumToOwner,
    /// The owner's values to every rank.
    FromOwner,
}

impl NcclComm {
    /// `calls` between `ncclGroupStart` and `ncclGroupEnd`; the first failing call's error.
    fn grouped(
        &self,
        what: &str,
        calls: impl FnOnce(&Api) -> Vec<(NcclResult, &'static str)>,
    ) -> Result<()> {
        let a = api()?;
        // SAFETY: group calls take no arguments.
        check(a, unsafe { (a.group_start)() }, "ncclGroupStart")?;
        let results = calls(a);
        // SAFETY: closes the group opened above.
        let end = unsafe { (a.group_end)() };
        for (r, call) in results {
            if r != NCCL_SUCCESS {
                check(a, r, call)?;
            }
        }
        if end == NCCL_IN_PROGRESS {
            return Ok(());
        }
        check(a, end, &format!("ncclGroupEnd ({what})"))
    }

    /// In place, for every `(device pointer, bounds)` tensor (`bounds`: `world + 1` ascending
    /// offsets, [`crate::train::dist::check_bounds`]), each range `bounds[r]..bounds[r+1]`:
    /// [`RangeOp::SumToOwner`] sums it over the ranks onto rank `r` (one `ncclReduce` per
    /// non-empty range: the reduce-scatter of an unevenly split tensor);
    /// [`RangeOp::FromOwner`] sends rank `r`'s to every rank (one `ncclBroadcast`: the
    /// all-gather).
    ///
    /// # Safety
    /// Every pointer must be a live device allocation of `bounds[world]` f32 on this
    /// communicator's device, not used by other streams until `stream` has passed this point.
    pub unsafe fn ranges_f32(
        &self,
        op: RangeOp,
        tensors: &[(u64, &[usize])],
        stream: *mut c_void,
    ) -> Result<()> {
        self.check_ranges(tensors)?;
        let what = match op {
            RangeOp::SumToOwner => "the gradient reduce-scatter",
            RangeOp::FromOwner => "the weights' all-gather",
        };
        self.grouped(what, |a| {
            let mut out = Vec::new();
            for &(ptr, b) in tensors {
                for root in 0..self.world {
                    let (lo, hi) = (b[root], b[root + 1]);
                    if lo >= hi {
                        continue;
                    }
                    let (p, n, root) = ((ptr + 4 * lo as u64) as *mut c_void, hi - lo, root as i32);
                    out.push(match op {
                        RangeOp::SumToOwner => (
                            (a.reduce)(p, p, n, NCCL_FLOAT32, NCCL_SUM, root, self.comm, stream),
                            "ncclReduce",
                        ),
                        RangeOp::FromOwner => (
                            (a.broadcast)(p, p, n, NCCL_FLOAT32, root, self.comm, stream),
                            "ncclBroadcast",
                        ),
                    });
                }
            }
            out
        })
    }

    fn check_ranges(&self, tensors: &[(u64, &[usize])]) -> Result<()> {
        ensure!(
            self.world <= i32::MAX as usize,
            "world size {} too large",
            self.world
        );
        for (_, b) in tensors {
            let n = b.last().copied().unwrap_or(0);
            crate::train::dist::check_bounds(b, self.world, n)?;
        }
        Ok(())
    }
}
