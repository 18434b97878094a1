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
