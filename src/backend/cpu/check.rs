//! The CPU ops' one length check, shared with the FP8 reference ([`crate::quant::fp8::matmul`]),
//! in its own file so that the reference imports it without importing the backend.

use anyhow::{ensure, Result};

/// `have >= want`, else an error naming the op and its argument.
pub(crate) fn need(op: &str, arg: &str, have: usize, want: usize) -> Result<()> {
    ensure!(
        have >= want,
        "{op}: `{arg}` holds {have} elements, the op needs {want}"
    );
    Ok(())
}

/// The first of `vals` outside `[0, hi)` as `(index, value)`: the int-range check of the ops
/// that index with ints (ids, positions, rows, targets); each op words its own error.
pub(crate) fn first_outside(vals: &[i32], hi: usize) -> Option<(usize, i32)> {
    vals.iter()
        .enumerate()
        .find(|(_, &v)| v < 0 || v as usize >= hi)
        .map(|(i, &v)| (i, v))
}
