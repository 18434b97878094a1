//! Attention (`kernels/attention.cu`, `kernels/kv_store.cu`): the launch geometry and head
//! checks of the single-pass and cached kernels (launched by `attend` in the [`Backend`] impl),
//! the split-KV path for long key sets, the route between the kernels, and the KV-cache store.

use super::*;

/// Head dims the attention kernel is instantiated for.
pub const ATTN_HEAD_DIMS: [usize; 2] = [64, 128];

/// Attention launch geometry, as documented in `kernels/attention.cu`: grid (⌈T/64⌉, NH, B),
/// block 128 (4 warps × 16 query rows), static shared memory only. NH and B are grid y and z.
pub(crate) fn attention_geom(op: &str, b: usize, t: usize, nh: usize) -> Result<Geom> {
    const BLOCK_Q: usize = 64;
    Ok(Geom {
        grid: (
            t.div_ceil(BLOCK_Q) as u32,
            grid_yz(op, "nh", nh)?,
            grid_yz(op, "b", b)?,
        ),
        block: (128, 1, 1),
        smem: 0,
    })
}

/// The attention kernels' head limits: HD one of [`ATTN_HEAD_DIMS`], NH a positive multiple
/// of NKV.
pub(crate) fn check_heads(op: &str, nh: usize, nkv: usize, hd: usize) -> Result<()> {
    if !ATTN_HEAD_DIMS.contains(&hd) {
        bail!("{op}: head dim {hd} is not supported by the CUDA attention kernel (supported: {ATTN_HEAD_DIMS:?})");
    }
    if nkv == 0 || nh % nkv != 0 {
        bail!("{op}: NH = {nh} must be a positive multiple of NKV = {nkv}");
    }
    Ok(())
}

/// Keys per split of the split-KV attention path.
pub const ATTN_SPLIT_CHUNK: usize = 96;

/// Split-KV is used for more than this many keys (fewer: the single-pass kernel).
pub const ATTN_SPLIT_MIN_KEYS: usize = 2 * ATTN_SPLIT_CHUNK;

/// f32 elements of the split-KV scratch (64 MiB, allocated once per backend).
pub const ATTN_SCRATCH: usize = 16 << 20;

/// The split-KV chunk for `l` keys, or `None` for the single-pass kernel. A function of `l`
/// alone: a query row's result must not depend on how many other rows share the call (the
/// cached span rows equal the full pass's rows bit for bit, reference §7 / tests/cache.rs).
pub fn attn_split_chunk(l: usize) -> Option<usize> {
    (l > ATTN_SPLIT_MIN_KEYS).then_some(ATTN_SPLIT_CHUNK)
}

/// One split-KV (or FA2) attention call (device addresses in bytes, strides in elements;
/// `chunk` is the split-KV chunk, 0 for the single-pass kernel).
#[derive(Clone, Copy)]
pub(crate) struct SplitArgs {
    pub(crate) q: u64,
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) key_valid: u64,
    pub(crate) qstride: usize,
    pub(crate) kvstride: usize,
    pub(crate) s: CachedAttnShape,
    pub(crate) chunk: usize,
}

impl CudaBackend {
    /// Run one attention call on the selected kernels: FA2 (`LLADA_ATTN=fa2`), else split-KV
    /// when `a.chunk > 0`, else `single` (the single-pass launch).
    pub(crate) fn attention_route(
        &self,
        op: &str,
        out: u64,
        a: SplitArgs,
        single: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        match self.attn_impl.get() {
            AttnImpl::Fa2(split) => self.attention_fa2(op, out, a, split),
            AttnImpl::Mma if a.chunk > 0 => self.attention_split(op, out, a),
            AttnImpl::Mma => single(),
        }
    }

    /// Split-KV attention (kernels/attention.cu): partials into the fixed scratch, then the
    /// combine kernel into `out` (`[B·TQ, NH·HD]` at address `out`). Calls whose partials
    /// exceed the scratch run as several launches over groups of batch rows or query rows
    /// (rows are independent, so the result is the same).
    pub(crate) fn attention_split(&self, op: &str, out: u64, a: SplitArgs) -> Result<()> {
        let splits = a.s.l.div_ceil(a.chunk);
        let per_row = splits * a.s.nh * (a.s.hd + 2);
        let cap_rows = ATTN_SCRATCH / per_row;
        if cap_rows == 0 {
            bail!(
                "{op}: one query row needs {per_row} f32 of split-KV scratch, more than the {ATTN_SCRATCH} available (L = {}, NH = {}, HD = {})",
                a.s.l,
                a.s.nh,
                a.s.hd
            );
        }
        // Blocks (qt, h, b·splits + s): NH and (batch rows)·splits are grid y and z.
        grid_yz(op, "nh", a.s.nh)?;
        let max_b = GRID_YZ_MAX / splits;
        if max_b == 0 {
            bail!(
                "{op}: {splits} key splits (L = {}) exceed CUDA's grid limit of {GRID_YZ_MAX}",
                a.s.l
            );
        }
        let scratch = dptr(&self.attn_scratch, &self.stream);
        let esz = 2u64; // bf16 bytes
                        // Groups: (first batch row, batch rows, first query row, query rows).
        let launch_group = |b0: usize, nb: usize, i0: usize, nq: usize| -> Result<()> {
            let rows = nb * nq;
            let q = a.q + ((b0 * a.s.tq + i0) * a.qstride) as u64 * esz;
            let k = a.k + (b0 * a.s.l * a.kvstride) as u64 * esz;
            let v = a.v + (b0 * a.s.l * a.kvstride) as u64 * esz;
            let kv = if a.key_valid == 0 {
                0
            } else {
                a.key_valid + (b0 * a.s.l * 4) as u64
            };
            let o_out = out + ((b0 * a.s.tq + i0) * a.s.nh * a.s.hd) as u64 * esz;
            let part_o = scratch;
            let part_ml = scratch + (splits * rows * a.s.nh * a.s.hd * 4) as u64;
            let (qs, ks) = (a.qstride as i64, a.kvstride as i64);
            let (b_, tq_, l_, nh_, nkv_, hd_, ch_, sp_) = (
                int(op, "b", nb)?,
                int(op, "tq", nq)?,
                int(op, "l", a.s.l)?,
                int(op, "nh", a.s.nh)?,
                int(op, "nkv", a.s.nkv)?,
                int(op, "hd", a.s.hd)?,
                int(op, "chunk", a.chunk)?,
                int(op, "splits", splits)?,
            );
            let g = Geom {
                grid: (
                    nq.div_ceil(64) as u32,
                    grid_yz(op, "nh", a.s.nh)?,
                    grid_yz(op, "b·splits", nb * splits)?,
                ),
                block: (128, 1, 1),
                smem: 0,
            };
            let (po, pm) = (part_o, part_ml);
            launch!(&self.stream, op, self.k.attention_split, g; po, pm, q, k, v, kv, qs, ks, b_,
                tq_, l_, nh_, nkv_, hd_, ch_, sp_)?;
            let rows_ = int(op, "rows", rows)?;
            let cg = Geom {
                grid: (rows as u32, grid_yz(op, "nh", a.s.nh)?, 1),
                block: (a.s.hd as u32, 1, 1),
                smem: 0,
            };
            launch!(&self.stream, op, self.k.attention_combine, cg; o_out, po, pm, rows_, nh_, hd_,
                sp_)
        };
        if cap_rows >= a.s.b * a.s.tq && a.s.b <= max_b {
            launch_group(0, a.s.b, 0, a.s.tq)
        } else if cap_rows >= a.s.tq {
            let per = (cap_rows / a.s.tq).min(max_b);
            let mut b0 = 0;
            while b0 < a.s.b {
                let nb = per.min(a.s.b - b0);
                launch_group(b0, nb, 0, a.s.tq)?;
                b0 += nb;
            }
            Ok(())
        } else {
            for b0 in 0..a.s.b {
                let mut i0 = 0;
                while i0 < a.s.tq {
                    let nq = cap_rows.min(a.s.tq - i0);
                    launch_group(b0, 1, i0, nq)?;
                    i0 += nq;
                }
            }
            Ok(())
        }
    }

    pub(crate) fn launch_kv_store(
        &self,
        kv: Kv<&mut Act>,
        qkv: &Act,
        s: CachedAttnShape,
    ) -> Result<()> {
        let (op, (b, tq, l, nh, nkv, hd), q0) = ("kv_store", s.dims(), s.q0);
        if q0 + tq > l {
            bail!(
                "{op}: query rows [{q0}, {}) exceed the cache length {l}",
                q0 + tq
            );
        }
        let kw = b * l * nkv * hd;
        check_lens(
            op,
            &[
                ("qkv", qkv.len(), b * tq * (nh + 2 * nkv) * hd),
                ("k_cache", kv.k.len(), kw),
                ("v_cache", kv.v.len(), kw),
            ],
        )?;
        if b * tq == 0 || nkv * hd == 0 {
            return Ok(());
        }
        int(op, "b·tq", b * tq)?;
        launch!(&self.stream, op, self.k.kv_store, rows_geom(b * tq, 256); self.ptr_mut(kv.k),
            self.ptr_mut(kv.v), self.ptr(qkv), int(op, "b", b)?, int(op, "tq", tq)?,
            int(op, "l", l)?, int(op, "q0", q0)?, int(op, "nh", nh)?, int(op, "nkv", nkv)?,
            int(op, "hd", hd)?)
    }
}
