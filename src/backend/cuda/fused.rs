//! Launchers of the fused glue kernels: `rope_kv_store` (`kernels/rope.cu`), RoPE and the
//! KV-cache store of a cached step in one pass ([`Backend::rope_kv_store`]), and the RoPE input
//! checks it shares with `rope`.

use super::*;
use anyhow::ensure;

impl CudaBackend {
    /// Launcher of `rope_kv_store_bf16` (`kernels/rope.cu`, [`Backend::rope_kv_store`]): the checks of `rope`
    /// and `kv_store` together.
    pub(crate) fn launch_rope_kv_store(
        &self,
        qkv: &mut Act,
        (k_cache, v_cache): (&mut Act, &mut Act),
        (pos, cos, sin): (&Ints, &F32s, &F32s),
        q0: usize,
        s: CachedAttnShape,
    ) -> Result<()> {
        let op = "rope_kv_store";
        let (b, tq, l, nh, nkv, hd) = s.dims();
        let n = b * tq;
        ensure!(
            hd > 0 && hd % 2 == 0 && q0 + tq <= l,
            "{op}: head dim {hd} must be even and positive, and the rows [{q0}, {}) lie in the cache length {l}",
            q0 + tq
        );
        for (what, len, want) in [
            ("qkv", qkv.len(), n * (nh + 2 * nkv) * hd),
            ("k_cache", k_cache.len(), b * l * nkv * hd),
            ("v_cache", v_cache.len(), b * l * nkv * hd),
        ] {
            check_len(op, what, len, want)?;
        }
        if !self.check_rope_inputs(op, (pos, cos, sin), n, hd)? {
            return Ok(());
        }
        int(op, "b·tq", n)?;
        let threads = ((nh + nkv) * hd / 2).clamp(32, 256).next_multiple_of(32) as u32;
        launch!(&self.stream, op, self.k.rope_kv_store, rows_geom(n, threads);
            dptr_mut(qkv, &self.stream), dptr_mut(k_cache, &self.stream),
            dptr_mut(v_cache, &self.stream), dptr(cos, &self.stream), dptr(sin, &self.stream),
            dptr(pos, &self.stream), int(op, "b", b)?, int(op, "tq", tq)?, int(op, "l", l)?,
            int(op, "q0", q0)?, int(op, "nh", nh)?, int(op, "nkv", nkv)?, int(op, "hd", hd)?)
    }

    /// The RoPE inputs of `n` rows at head dim `hd` (even): `pos` `[n]` inside the tables,
    /// `cos`, `sin` `[max_pos, HD/2]`. `Ok(false)` when there is nothing to launch (`n = 0`).
    pub(crate) fn check_rope_inputs(
        &self,
        op: &str,
        (pos, cos, sin): (&Ints, &F32s, &F32s),
        n: usize,
        hd: usize,
    ) -> Result<bool> {
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
        self.check_ints(op, "pos", pos, n, cos.len() / (hd / 2), "the RoPE tables")?;
        Ok(true)
    }
}
