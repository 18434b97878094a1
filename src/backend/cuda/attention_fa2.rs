//! The flash-attention-2-class attention path (`attention_fa2_*` in `kernels/attention.cu`):
//! the kernel switch (`LLADA_ATTN`), the launch plan (query-tile rows, key chunks, split or not)
//! and the launcher. Off by default until a GPU run has passed its parity tests
//! (tests/cuda_parity.rs, `fa2_*`).
//!
//! Row independence: the key chunks are a function of L alone and the kernel merges them in the
//! same order with the same operations whether one block walks every chunk or the chunks run in
//! separate blocks and `attention_fa2_combine_bf16` merges them, and the 32- and 64-row variants
//! do the same per-row work. So the plan may depend on B, NH and TQ (grid fill) while a query
//! row's result depends only on its own inputs: a cached row equals the full pass's row bit for
//! bit.

use super::*;

/// The environment variable that selects the attention kernel (read once per backend).
pub const ATTN_ENV: &str = "LLADA_ATTN";

/// Which kernels the attention launchers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnImpl {
    /// `attention_fwd_bf16` / `attention_cached_fwd_bf16`, split-KV above 192 keys (the default).
    Mma,
    /// The FA2-class kernels, with their split policy.
    Fa2(Fa2Split),
}

/// When the FA2 path runs its key chunks in separate blocks (same result either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fa2Split {
    /// Split when the unsplit grid has fewer blocks than the GPU has SMs ([`fa2_plan`]).
    Auto,
    /// Never split (one block walks every chunk).
    Never,
    /// Always split when L has more than one chunk (tests, benchmarks).
    Always,
}

impl AttnImpl {
    /// `mma` (or empty) → [`AttnImpl::Mma`]; `fa2`, `fa2-split`, `fa2-nosplit` → [`AttnImpl::Fa2`]
    /// with [`Fa2Split::Auto`], `Always`, `Never`.
    pub fn parse(v: &str) -> Result<AttnImpl> {
        Ok(match v.trim() {
            "" | "mma" => AttnImpl::Mma,
            "fa2" => AttnImpl::Fa2(Fa2Split::Auto),
            "fa2-split" => AttnImpl::Fa2(Fa2Split::Always),
            "fa2-nosplit" => AttnImpl::Fa2(Fa2Split::Never),
            other => bail!(
                "{ATTN_ENV}={other:?} is not an attention kernel (expected mma, fa2, fa2-split or fa2-nosplit)"
            ),
        })
    }

    /// The kernel named by `LLADA_ATTN` ([`AttnImpl::Mma`] when unset).
    pub fn from_env() -> Result<AttnImpl> {
        match std::env::var(ATTN_ENV) {
            Ok(v) => AttnImpl::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(AttnImpl::Mma),
            Err(std::env::VarError::NotUnicode(_)) => bail!("{ATTN_ENV} is not valid UTF-8"),
        }
    }
}

/// Keys per FA2 tile (`FA2_BK` in the kernel); chunks are whole tiles.
const FA2_TILE: usize = 64;
/// At most this many key chunks per call.
pub const FA2_MAX_CHUNKS: usize = 4;
/// The smallest chunk: shorter key sets are one chunk (no merge, no split).
pub const FA2_MIN_CHUNK: usize = 128;

/// Keys per chunk for `l` keys: ⌈L / 4⌉ rounded up to whole 64-key tiles, at least 128. A
/// function of L alone (it fixes each row's arithmetic), giving at most `FA2_MAX_CHUNKS`.
pub fn fa2_chunk(l: usize) -> usize {
    (l.div_ceil(FA2_MAX_CHUNKS).div_ceil(FA2_TILE) * FA2_TILE).max(FA2_MIN_CHUNK)
}

/// One FA2 launch: query rows per block (32 or 64), keys per chunk, and `splits` (1: one block
/// walks every chunk; otherwise the number of chunks, one block each, then the combine kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fa2Plan {
    pub rows: usize,
    pub chunk: usize,
    pub splits: usize,
}

/// The FA2 launch plan for B batch rows, NH heads, TQ queries and L keys per row on a GPU with
/// `sms` SMs. 32-row query tiles when TQ ≤ 32 (the dual-cache step) or when 64-row tiles give
/// fewer blocks than SMs; the chunks run in separate blocks ([`Fa2Split::Auto`]) only when the
/// grid, B·NH·⌈TQ/rows⌉ blocks, still has fewer blocks than SMs and L has more than one chunk.
pub fn fa2_plan(b: usize, nh: usize, tq: usize, l: usize, sms: usize, split: Fa2Split) -> Fa2Plan {
    let chunk = fa2_chunk(l);
    let chunks = l.div_ceil(chunk).max(1);
    let blocks = |rows: usize| b * nh * tq.div_ceil(rows);
    let rows = if tq <= 32 || blocks(64) < sms { 32 } else { 64 };
    let split_on = chunks > 1
        && match split {
            Fa2Split::Auto => blocks(rows) < sms,
            Fa2Split::Never => false,
            Fa2Split::Always => true,
        };
    Fa2Plan {
        rows,
        chunk,
        splits: if split_on { chunks } else { 1 },
    }
}

/// Dynamic shared memory of an FA2 block: two stages of K and V tiles [64][HD + 8] bf16 plus two
/// 64-int mask tiles (`Fa2Smem` in the kernel).
pub(crate) fn fa2_smem(hd: usize) -> usize {
    4 * FA2_TILE * (hd + 8) * 2 + 2 * FA2_TILE * 4
}

/// The FA2 kernels: `f[hd 64 | hd 128][q32 | q64]`, the combine kernel and the SM count.
pub(crate) struct Fa2Kernels {
    f: [[dsys::CUfunction; 2]; 2],
    combine: dsys::CUfunction,
    sms: usize,
}

impl Fa2Kernels {
    /// Look the kernels up with `get` and raise each one's dynamic shared memory limit to its need.
    pub(crate) fn load(
        get: &dyn Fn(&str) -> Result<dsys::CUfunction>,
        ctx: &CudaContext,
    ) -> Result<Fa2Kernels> {
        let mut f = [[std::ptr::null_mut(); 2]; 2];
        for (hi, hd) in [64usize, 128].into_iter().enumerate() {
            for (ri, rows) in [32usize, 64].into_iter().enumerate() {
                let sym = format!("attention_fa2_bf16_hd{hd}_q{rows}");
                let func = get(&sym)?;
                let smem = i32::try_from(fa2_smem(hd)).unwrap_or(i32::MAX);
                // SAFETY: `func` is a function of a loaded module.
                unsafe {
                    dres::function::set_function_attribute(
                        func,
                        dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem,
                    )
                }
                .map_err(|e| {
                    anyhow!("{sym}: raising its shared memory limit to {smem} bytes: {e:?}")
                })?;
                f[hi][ri] = func;
            }
        }
        let sms = ctx
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| anyhow!("querying the SM count: {e:?}"))?;
        Ok(Fa2Kernels {
            f,
            combine: get("attention_fa2_combine_bf16")?,
            sms: usize::try_from(sms).unwrap_or(1).max(1),
        })
    }
}

impl CudaBackend {
    /// Select the attention kernels (default: `LLADA_ATTN`, read at construction). Call it before
    /// capturing graphs: a captured graph keeps the kernels it was captured with.
    pub fn set_attention_impl(&self, i: AttnImpl) {
        self.attn_impl.set(i);
    }

    /// The attention kernels in use.
    pub fn attention_impl(&self) -> AttnImpl {
        self.attn_impl.get()
    }

    /// The FA2 plan this backend uses for a call of this shape (its SM count).
    pub fn fa2_plan_for(
        &self,
        b: usize,
        nh: usize,
        tq: usize,
        l: usize,
        split: Fa2Split,
    ) -> Fa2Plan {
        fa2_plan(b, nh, tq, l, self.fa2.sms, split)
    }

    /// One FA2 attention call (`a.chunk` is ignored: the FA2 chunk is [`fa2_chunk`]). Heads and
    /// lengths are checked by the caller.
    pub(crate) fn attention_fa2(
        &self,
        op: &str,
        out: u64,
        a: SplitArgs,
        split: Fa2Split,
    ) -> Result<()> {
        let hi = match a.s.hd {
            64 => 0,
            128 => 1,
            hd => bail!("{op}: head dim {hd} has no FA2 kernel (64 or 128)"),
        };
        for (name, p) in [("q", a.q), ("k", a.k), ("v", a.v)] {
            if p % 16 != 0 {
                bail!(
                    "{op}: `{name}` at {p:#x} is not 16-byte aligned, which the FA2 kernel needs"
                );
            }
        }
        if a.qstride % 8 != 0 || a.kvstride % 8 != 0 {
            bail!(
                "{op}: row strides {} and {} must be multiples of 8 elements for the FA2 kernel",
                a.qstride,
                a.kvstride
            );
        }
        let mut plan = fa2_plan(a.s.b, a.s.nh, a.s.tq, a.s.l, self.fa2.sms, split);
        let rows = a.s.b * a.s.tq;
        if plan.splits > 1
            && (plan.splits * rows * a.s.nh * (a.s.hd + 2) > ATTN_SCRATCH
                || a.s.b * plan.splits > GRID_YZ_MAX)
        {
            plan.splits = 1; // the same bits, in one block per tile
        }
        let g = Geom::new(
            (
                a.s.tq.div_ceil(plan.rows) as u32,
                grid_yz(op, "nh", a.s.nh)?,
                grid_yz(op, "b·splits", a.s.b * plan.splits)?,
            ),
            (plan.rows * 2) as u32,
            fa2_smem(a.s.hd) as u32,
        );
        let f = self.fa2.f[hi][usize::from(plan.rows == 64)];
        let part_o = dptr(&self.attn_scratch, &self.stream);
        let part_ml = part_o + (plan.splits * rows * a.s.nh * a.s.hd * 4) as u64;
        let (b_, tq_, l_, nh_, nkv_, hd_) = (
            int(op, "b", a.s.b)?,
            int(op, "tq", a.s.tq)?,
            int(op, "l", a.s.l)?,
            int(op, "nh", a.s.nh)?,
            int(op, "nkv", a.s.nkv)?,
            int(op, "hd", a.s.hd)?,
        );
        let (ch_, sp_) = (
            int(op, "chunk", plan.chunk)?,
            int(op, "splits", plan.splits)?,
        );
        launch!(&self.stream, op, f, g; out, part_o, part_ml, a.q, a.k, a.v, a.key_valid,
            a.qstride as i64, a.kvstride as i64, b_, tq_, l_, nh_, nkv_, ch_, sp_)?;
        if plan.splits == 1 {
            return Ok(());
        }
        let cg = Geom::new(
            (rows as u32, grid_yz(op, "nh", a.s.nh)?, 1),
            a.s.hd as u32,
            0,
        );
        launch!(&self.stream, op, self.fa2.combine, cg; out, part_o, part_ml,
            int(op, "rows", rows)?, nh_, hd_, sp_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_is_whole_tiles_and_at_most_four() {
        for l in 1..5000 {
            let c = fa2_chunk(l);
            assert_eq!(c % FA2_TILE, 0, "l={l}");
            assert!(c >= FA2_MIN_CHUNK, "l={l}");
            assert!(l.div_ceil(c) <= FA2_MAX_CHUNKS, "l={l} c={c}");
        }
        assert_eq!(fa2_chunk(64), 128);
        assert_eq!(fa2_chunk(384), 128);
        assert_eq!(fa2_chunk(1024), 256);
        assert_eq!(fa2_chunk(1025), 320);
    }

    #[test]
    fn plan_splits_only_an_underfilled_grid() {
        let h200 = 132;
        // Full step, B=1, 384 tokens, 32 heads: 192 blocks of 64 rows fill 132 SMs, no split.
        let p = fa2_plan(1, 32, 384, 384, h200, Fa2Split::Auto);
        assert_eq!(
            p,
            Fa2Plan {
                rows: 64,
                chunk: 128,
                splits: 1
            }
        );
        // Dual-cache step: 32 queries → 32-row tiles, 32 blocks < 132 SMs: split in 3 chunks.
        let p = fa2_plan(1, 32, 32, 384, h200, Fa2Split::Auto);
        assert_eq!(
            p,
            Fa2Plan {
                rows: 32,
                chunk: 128,
                splits: 3
            }
        );
        // Batch 8: plenty of blocks.
        assert_eq!(fa2_plan(8, 32, 32, 384, h200, Fa2Split::Auto).splits, 1);
        // 64-row tiles would underfill (2 heads × 2 tiles), 32-row tiles still do: split.
        let p = fa2_plan(1, 2, 100, 1024, h200, Fa2Split::Auto);
        assert_eq!(
            p,
            Fa2Plan {
                rows: 32,
                chunk: 256,
                splits: 4
            }
        );
        // One chunk never splits; Never / Always override the grid test.
        assert_eq!(fa2_plan(1, 1, 1, 100, h200, Fa2Split::Always).splits, 1);
        assert_eq!(fa2_plan(1, 1, 1, 1000, h200, Fa2Split::Never).splits, 1);
        assert_eq!(
            fa2_plan(64, 64, 512, 1000, h200, Fa2Split::Always).splits,
            4
        );
        // The chunk never depends on anything but L.
        for (b, nh, tq) in [(1, 1, 1), (2, 32, 200), (64, 64, 1024)] {
            assert_eq!(
                fa2_plan(b, nh, tq, 1000, h200, Fa2Split::Auto).chunk,
                fa2_chunk(1000)
            );
        }
    }

    #[test]
    fn env_values_parse_or_name_the_problem() {
        assert_eq!(AttnImpl::parse("").unwrap(), AttnImpl::Mma);
        assert_eq!(AttnImpl::parse("mma").unwrap(), AttnImpl::Mma);
        assert_eq!(
            AttnImpl::parse("fa2").unwrap(),
            AttnImpl::Fa2(Fa2Split::Auto)
        );
        assert_eq!(
            AttnImpl::parse(" fa2-split ").unwrap(),
            AttnImpl::Fa2(Fa2Split::Always)
        );
        assert_eq!(
            AttnImpl::parse("fa2-nosplit").unwrap(),
            AttnImpl::Fa2(Fa2Split::Never)
        );
        let e = AttnImpl::parse("fa3").unwrap_err().to_string();
        assert!(e.contains("LLADA_ATTN") && e.contains("fa3"), "{e}");
    }

    #[test]
    fn smem_matches_the_kernel_layout() {
        // 2 stages × (K + V) × [64][HD + 8] bf16 + 2 × 64 ints (kernels/attention.cu header).
        assert_eq!(fa2_smem(128), 70_144);
        assert_eq!(fa2_smem(64), 37_376);
    }
}
