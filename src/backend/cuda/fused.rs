//! The RoPE input checks shared by the launchers of `rope` and of the fused glue kernel
//! `rope_kv_store` (`kernels/rope.cu`: RoPE and the KV-cache store of a cached step in one pass,
//! [`Backend::rope_kv_store`]).

use super::*;

impl CudaBackend {
    /// The RoPE inputs of `n` rows at head dim `hd` (even): `pos` `[n]` inside the tables,
    /// `cos`, `sin` `[max_pos, HD/2]`. `Ok(false)` when there is nothing to launch (`n = 0`).
    pub(crate) fn check_rope_inputs(
        &self,
        op: &str,
        t: Rope<'_, Self>,
        n: usize,
        hd: usize,
    ) -> Result<bool> {
        let Rope { pos, cos, sin } = t;
        check_len(op, "pos", pos.len(), n)?;
        if cos.len() != sin.len() || cos.len() < hd / 2 {
            bail!(
                "{op}: tables `cos` ({}) and `sin` ({}) must be [max_pos, HD/2 = {}]",
                cos.len(),
                sin.len(),
                hd / 2
            );
        }
        if n == 0 {
            return Ok(false);
        }
        check_ints(op, "pos", pos, n, cos.len() / (hd / 2), "the RoPE tables")?;
        Ok(true)
    }
}
