//! The opt-in tiled training kernels (`LLADA_TRAIN_KERNELS=tiled`, read once when a [`CudaOps`]
//! is created; [`CudaOps::set_train_kernels`] switches later). Off by default: none of these
//! kernels has run on a GPU yet. Each replaces a correct but slow default kernel of the same op,
//! behind the same launcher (the switch only picks the kernel, after the launcher's checks):
//!
//! - `rms_norm_bwd`'s `dw`: the rows cut into chunks over many blocks, per-chunk partial sums
//!   and a second pass adding them in chunk order ([`row_chunks`]);
//! - `scatter_add_rows`, `embedding_bwd`: the destination rows spread over blocks, a heavily
//!   repeated destination (the mask token: half of all positions) cut into pieces summed in a
//!   fixed order ([`ScatterPlan`]); index lists go to a persistent device scratch, so the
//!   launcher neither allocates nor synchronizes;
//! - `attention` / `attention_bwd`: a block per 32-query tile sharing 32-key tiles of K/V in
//!   shared memory (online softmax), and a flash-style backward of two kernels (dQ and δ per
//!   query tile; dK, dV per key tile walking the query tiles), f32 FMA on the CUDA cores, head
//!   dims up to [`ATT_TILED_HD_MAX`] (larger ones keep the default kernels).
//!
//! Everything stays deterministic (no atomics; each sum in an order fixed by the shapes and the
//! host-known indices, never by scheduling or the GPU model), so a step is bit-reproducible;
//! where the order differs from the CPU reference the results agree to f32 rounding (bounds in
//! each kernel's header and tests/cuda_train_tiled.rs).

use super::*;
use cudarc::driver::result as dres;
use std::cell::RefCell;

/// The environment variable that selects the training kernels (read once per [`CudaOps`]).
pub const TRAIN_KERNELS_ENV: &str = "LLADA_TRAIN_KERNELS";

/// Which kernels the f32 training launchers use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrainKernelImpl {
    /// The one-block-per-row / one-thread-per-column kernels, checked on GPUs (the default).
    #[default]
    Simple,
    /// The tiled kernels of this module (never run on a GPU yet).
    Tiled,
}

impl TrainKernelImpl {
    /// `simple` (or empty) or `tiled`.
    pub fn parse(v: &str) -> Result<TrainKernelImpl> {
        let names = [("simple", Self::Simple), ("tiled", Self::Tiled)];
        match v.trim() {
            "" => Ok(Self::Simple),
            v => crate::names::parse(TRAIN_KERNELS_ENV, &names, v),
        }
    }

    /// The set named by `LLADA_TRAIN_KERNELS` (`simple` when unset or empty).
    pub fn from_env() -> Result<TrainKernelImpl> {
        let v = std::env::var_os(TRAIN_KERNELS_ENV).unwrap_or_default();
        let v = v.to_str();
        Self::parse(v.ok_or_else(|| anyhow!("{TRAIN_KERNELS_ENV} is not valid UTF-8"))?)
    }
}

/// The tiled kernels and their device scratch.
pub(super) struct Tiled {
    rms_norm_bwd_dw: dsys::CUfunction,
    rms_norm_bwd_dw_sum: dsys::CUfunction,
    pub(super) scatter_add_rows: [dsys::CUfunction; 2],
    pub(super) embedding_bwd: [dsys::CUfunction; 2],
    /// `attention_fwd_tiled_f32`, `attention_bwd_dq_tiled_f32`, `attention_bwd_dkv_tiled_f32`.
    attention: [dsys::CUfunction; 3],
    /// Grown on demand, never shrunk; reused by every launch on the stream (stream order makes
    /// reuse safe; a replaced buffer is freed stream-ordered by cudarc).
    scratch_f: RefCell<Option<CudaSlice<f32>>>,
    scratch_i: RefCell<Option<CudaSlice<i32>>>,
}

impl Tiled {
    pub(super) fn load(be: &CudaBackend) -> Result<Tiled> {
        let f = |s: &str| be.function(s);
        be.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e:?}"))?;
        let syms = [
            "attention_fwd_tiled_f32",
            "attention_bwd_dq_tiled_f32",
            "attention_bwd_dkv_tiled_f32",
        ];
        let mut attention = [std::ptr::null_mut(); 3];
        for ((a, sym), smem) in attention
            .iter_mut()
            .zip(syms)
            .zip(att_smem(ATT_TILED_HD_MAX))
        {
            *a = f(sym)?;
            let smem = i32::try_from(smem).unwrap_or(i32::MAX);
            // SAFETY: `*a` is a function of a module the backend keeps loaded.
            unsafe {
                dres::function::set_function_attribute(
                    *a,
                    dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem,
                )
            }
            .map_err(|e| {
                anyhow!("{sym}: raising its shared memory limit to {smem} bytes: {e:?}")
            })?;
        }
        Ok(Tiled {
            attention,
            rms_norm_bwd_dw: f("rms_norm_bwd_dw_tiled_f32")?,
            rms_norm_bwd_dw_sum: f("rms_norm_bwd_dw_sum_f32")?,
            scatter_add_rows: [
                f("scatter_add_rows_tiled_f32")?,
                f("scatter_add_rows_tiled_sum_f32")?,
            ],
            embedding_bwd: [
                f("embedding_bwd_tiled_f32")?,
                f("embedding_bwd_tiled_sum_f32")?,
            ],
            scratch_f: RefCell::new(None),
            scratch_i: RefCell::new(None),
        })
    }
}

/// The largest head dim of the tiled attention kernels (`ATT_HD_MAX`).
pub const ATT_TILED_HD_MAX: usize = 128;
/// Rows of a query or key tile (`ATT_TR`); threads of a block (`ATT_TH`).
const ATT_TILE: usize = 32;
const ATT_THREADS_TILED: u32 = 128;

/// Dynamic shared memory (bytes) of the forward, dQ and dK/dV kernels at head dim `hd`: tiles of
/// 32 rows padded to `hd | 1` floats, 32×33 score tiles, and the dK/dV kernel's lse and δ.
fn att_smem(hd: usize) -> [usize; 3] {
    let (rows, scores) = (ATT_TILE * (hd | 1), ATT_TILE * (ATT_TILE + 1));
    [
        4 * (2 * rows + scores),
        4 * (4 * rows + scores),
        4 * (4 * rows + 2 * scores + 2 * ATT_TILE),
    ]
}

/// `[b, t, nh, nkv, hd]` as the kernels' ints.
fn attn_dims(op: &str, d: AttnShape) -> Result<[i32; 5]> {
    let AttnShape { b, t, nh, nkv, hd } = d;
    Ok([
        int(op, "b", b)?,
        int(op, "t", t)?,
        int(op, "nh", nh)?,
        int(op, "nkv", nkv)?,
        int(op, "hd", hd)?,
    ])
}

/// Blocks of 256 columns times chunks this many: about 4 blocks per SM of a 132-SM GPU.
const TARGET_BLOCKS: usize = 512;
/// A chunk has at least this many rows (shorter chunks cost more in the second pass).
const MIN_CHUNK_ROWS: usize = 16;

/// `(rows per chunk, chunks)` of a column sum over `n` rows of width `c`: about
/// `TARGET_BLOCKS` blocks of 256 columns. A function of `(n, c)` alone, so the summation
/// order (and the result's bits) never depends on the GPU.
pub fn row_chunks(n: usize, c: usize) -> (usize, usize) {
    let want = TARGET_BLOCKS.div_ceil(c.div_ceil(256).max(1)).max(1);
    let rows = n.div_ceil(want).max(MIN_CHUNK_ROWS);
    (rows, n.div_ceil(rows).max(1))
}

/// A destination row repeated more than this many times is cut into pieces.
pub const SCATTER_PIECE_ROWS: usize = 64;
/// At most this many pieces per destination row (bounds the scratch and the second pass).
pub const SCATTER_MAX_PIECES: usize = 256;

/// The launch plan of a segmented row scatter-add (`kernels/scatter_rows.cuh`) for the
/// destinations `dest[i]` of the source rows `i`: `ints` = `order [N] | piece [P, 4] | fin [F, 3]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScatterPlan {
    pub ints: Vec<i32>,
    /// `P`: pieces `{dest, from, to, slot}` (slot −1: added onto `dst` directly).
    pub pieces: usize,
    /// `F`: destinations summed from `slot_from .. slot_to` of the partials.
    pub fins: usize,
    /// Partial rows of scratch the pieces write.
    pub slots: usize,
}

impl ScatterPlan {
    /// For the destinations `dest` (each a valid row of the destination, at most `i32::MAX`).
    pub fn new(dest: &[u32]) -> Result<ScatterPlan> {
        let n = dest.len();
        ensure!(
            i32::try_from(n).is_ok(),
            "scatter plan: {n} source rows exceed the kernels' 32-bit int range"
        );
        let d32 = |i: usize| -> Result<i32> {
            i32::try_from(dest[i])
                .map_err(|_| anyhow!("scatter plan: destination row {} exceeds i32", dest[i]))
        };
        let mut order: Vec<i32> = (0..n as i32).collect();
        order.sort_unstable_by_key(|&i| (dest[i as usize], i)); // ascending i within one row
        let (mut piece, mut fin) = (Vec::new(), Vec::new());
        let mut slots = 0usize;
        let mut from = 0usize;
        while from < n {
            let d = dest[order[from] as usize];
            let mut to = from + 1;
            while to < n && dest[order[to] as usize] == d {
                to += 1;
            }
            let (len, d) = (to - from, d32(order[from] as usize)?);
            if len <= SCATTER_PIECE_ROWS {
                piece.extend([d, from as i32, to as i32, -1]);
            } else {
                let k = len.div_ceil(SCATTER_PIECE_ROWS).min(SCATTER_MAX_PIECES);
                let rows = len.div_ceil(k);
                let first = slots;
                let mut a = from;
                while a < to {
                    let b = (a + rows).min(to);
                    piece.extend([d, a as i32, b as i32, slots as i32]);
                    slots += 1;
                    a = b;
                }
                fin.extend([d, first as i32, slots as i32]);
            }
            from = to;
        }
        let (pieces, fins) = (piece.len() / 4, fin.len() / 3);
        let mut ints = order;
        ints.extend(piece);
        ints.extend(fin);
        Ok(ScatterPlan {
            ints,
            pieces,
            fins,
            slots,
        })
    }
}

impl CudaOps {
    /// Use the kernel set `k` from now on (default: `LLADA_TRAIN_KERNELS` at creation).
    pub fn set_train_kernels(&mut self, k: TrainKernelImpl) -> Result<()> {
        self.tiled = match k {
            TrainKernelImpl::Simple => None,
            TrainKernelImpl::Tiled => Some(Box::new(Tiled::load(&self.be)?)),
        };
        Ok(())
    }

    pub(super) fn tiled(&self) -> Result<&Tiled> {
        self.tiled
            .as_deref()
            .ok_or_else(|| anyhow!("the tiled training kernels are not loaded"))
    }

    /// A device pointer to at least `len` f32 of scratch.
    fn scratch_f32(&self, len: usize) -> Result<u64> {
        let t = self.tiled()?;
        let mut s = t.scratch_f.borrow_mut();
        if s.as_ref().map_or(true, |b| b.len() < len) {
            let n = len.max(1).next_power_of_two();
            *s = Some(self.be.stream().alloc_zeros::<f32>(n).map_err(|e| {
                driver_err(format!("allocating {n} f32 of tiled-kernel scratch"), e)
            })?);
        }
        let b = s.as_mut().ok_or_else(|| anyhow!("no f32 scratch"))?;
        Ok(self.ptr_mut(b))
    }

    /// Copy `host` to the int scratch; its device pointer. The copy is queued on the stream
    /// (the host data is staged before this returns), after every earlier use of the scratch.
    fn scratch_ints(&self, host: &[i32]) -> Result<u64> {
        let t = self.tiled()?;
        let mut s = t.scratch_i.borrow_mut();
        if s.as_ref().map_or(true, |b| b.len() < host.len()) {
            let n = host.len().max(1).next_power_of_two();
            *s = Some(self.be.stream().alloc_zeros::<i32>(n).map_err(|e| {
                driver_err(format!("allocating {n} ints of tiled-kernel scratch"), e)
            })?);
        }
        let b = s.as_mut().ok_or_else(|| anyhow!("no int scratch"))?;
        if !host.is_empty() {
            let mut view = b.slice_mut(..host.len());
            self.be
                .stream()
                .memcpy_htod(host, &mut view)
                .map_err(|e| driver_err(format!("host→device copy of {} ints", host.len()), e))?;
        }
        Ok(self.ptr_mut(b))
    }

    /// `dw += Σ_i (dy·x)·r` over the rows in chunks (`rms_norm_bwd_dw_tiled_f32` and
    /// `rms_norm_bwd_dw_sum_f32`); one chunk: the one-pass kernel. Pointers checked by
    /// `rms_norm_bwd`.
    pub(super) fn rms_norm_bwd_dw_tiled(
        &self,
        [dwp, dyp, xp, rp]: [u64; 4],
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "rms_norm_bwd";
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        let cb = c.div_ceil(256) as u32;
        let (rows, s) = row_chunks(n, c);
        if s == 1 {
            return launch!(self, op, self.k.rms_norm_bwd_dw, Geom::new((cb, 1, 1), 256, 0);
                dwp, dyp, xp, rp, n_, c_);
        }
        let t = self.tiled()?;
        let part = self.scratch_f32(s * c)?;
        let (rows_, s_) = (int(op, "rows", rows)?, int(op, "chunks", s)?);
        let sy = grid_yz(op, "chunks", s)?;
        launch!(self, op, t.rms_norm_bwd_dw, Geom::new((cb, sy, 1), 256, 0); part, dyp, xp, rp,
            n_, c_, rows_)?;
        launch!(self, op, t.rms_norm_bwd_dw_sum, Geom::new((cb, 1, 1), 256, 0); dwp, part, s_, c_)
    }

    /// `dst[rows[i]] += src[i]` (`dst`, `src` device pointers of rows of width `c`, `rows`
    /// validated by the caller) through `fns` = (piece kernel, finishing kernel): the tiled
    /// `scatter_add_rows` and `embedding_bwd` (no allocation on the device, no synchronization).
    pub(super) fn scatter_tiled(
        &self,
        op: &str,
        fns: [dsys::CUfunction; 2],
        [dstp, srcp]: [u64; 2],
        rows: &[i32],
        c: usize,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        // Validated rows are non-negative.
        let dest: Vec<u32> = rows.iter().map(|&r| r.max(0) as u32).collect();
        let plan = ScatterPlan::new(&dest).with_context(|| op.to_string())?;
        let c_ = int(op, "c", c)?;
        let cy = grid_yz(op, "c / 256", c.div_ceil(256))?;
        let part = if plan.slots > 0 {
            self.scratch_f32(plan.slots * c)?
        } else {
            0
        };
        let base = self.scratch_ints(&plan.ints)?;
        let n = dest.len();
        let (order, piece, fin) = (
            base,
            base + 4 * n as u64,
            base + 4 * (n + 4 * plan.pieces) as u64,
        );
        let (np, nf) = (int(op, "pieces", plan.pieces)?, int(op, "fins", plan.fins)?);
        launch!(self, op, fns[0], Geom::new((plan.pieces as u32, cy, 1), 256, 0); dstp, part, srcp,
            order, piece, np, c_)?;
        if plan.fins > 0 {
            launch!(self, op, fns[1], Geom::new((plan.fins as u32, cy, 1), 256, 0); dstp, part,
                fin, nf, c_)?;
        }
        Ok(())
    }

    /// Whether `attention` / `attention_bwd` at head dim `hd` run the tiled kernels.
    pub(super) fn tiled_attention(&self, hd: usize) -> bool {
        self.tiled.is_some() && hd <= ATT_TILED_HD_MAX
    }

    /// [`TrainOps::attention`] through `attention_fwd_tiled_f32` (lengths and shape checked).
    pub(super) fn attention_tiled(
        &self,
        [o, lse]: [&mut Buf; 2],
        [q, k, v]: [&Buf; 3],
        d: AttnShape,
    ) -> Result<()> {
        let op = "attention";
        let f = self.tiled()?.attention[0];
        self.bind()?;
        let smem = check_dyn_smem(op, f, att_smem(d.hd)[0], &format!("HD = {}", d.hd))?;
        if d.b * d.t == 0 || d.nh == 0 {
            return Ok(());
        }
        let dm = attn_dims(op, d)?;
        let grid = (d.t.div_ceil(ATT_TILE) as u32, d.nh as u32, d.b as u32);
        let (op_, lp) = (self.ptr_mut(o), self.ptr_mut(lse));
        let (qp, kp, vp) = (self.ptr(q), self.ptr(k), self.ptr(v));
        launch!(self, op, f, Geom::new(grid, ATT_THREADS_TILED, smem); op_, lp, qp, kp, vp,
            dm[0], dm[1], dm[2], dm[3], dm[4])
    }

    /// [`TrainOps::attention_bwd`] through `attention_bwd_dq_tiled_f32` (which writes `delta`)
    /// then `attention_bwd_dkv_tiled_f32` (lengths and shape checked).
    pub(super) fn attention_bwd_tiled(
        &self,
        [dq, dk, dv, delta]: [&mut Buf; 4],
        [dout, q, k, v, o, lse]: [&Buf; 6],
        d: AttnShape,
    ) -> Result<()> {
        let op = "attention_bwd";
        let f = self.tiled()?.attention;
        self.bind()?;
        let what = format!("HD = {}", d.hd);
        let sm = att_smem(d.hd);
        let (s_q, s_kv) = (
            check_dyn_smem(op, f[1], sm[1], &what)?,
            check_dyn_smem(op, f[2], sm[2], &what)?,
        );
        if d.b * d.t == 0 {
            return Ok(());
        }
        if d.nh == 0 {
            self.zero_fill(dk)?;
            return self.zero_fill(dv);
        }
        let dm = attn_dims(op, d)?;
        let tiles = d.t.div_ceil(ATT_TILE) as u32;
        let (dqp, dkp, dvp, dlp) = (
            self.ptr_mut(dq),
            self.ptr_mut(dk),
            self.ptr_mut(dv),
            self.ptr_mut(delta),
        );
        let [dop, qp, kp, vp, opp, lp] = [dout, q, k, v, o, lse].map(|x| self.ptr(x));
        let g = Geom::new((tiles, d.nh as u32, d.b as u32), ATT_THREADS_TILED, s_q);
        launch!(self, op, f[1], g; dqp, dlp, dop, qp, kp, vp, opp, lp, dm[0], dm[1], dm[2],
            dm[3], dm[4])?;
        let g = Geom::new((tiles, d.nkv as u32, d.b as u32), ATT_THREADS_TILED, s_kv);
        launch!(self, op, f[2], g; dkp, dvp, dlp, dop, qp, kp, vp, lp, dm[0], dm[1], dm[2],
            dm[3], dm[4])
    }
}
