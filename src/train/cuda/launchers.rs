//! The f32 training launchers of [`CudaOps`], one per op of [`crate::train::ops`] (same
//! shapes, same argument meaning), each validating lengths and every host-known id, row and
//! position before launching the op's kernel in `kernels/<op>.cu`.

use super::raw::{Arg, GemmData};
use super::*;

impl TrainOps for CudaOps {
    type Buf = Buf;
    type Ints = DevInts;

    fn zeros(&self, len: usize) -> Result<Buf> {
        self.be
            .stream()
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| driver_err(format!("allocating {len} f32 on the GPU"), e))
    }

    fn upload(&self, host: &[f32]) -> Result<Buf> {
        let mut b = self.zeros(host.len())?;
        if !host.is_empty() {
            self.be
                .stream()
                .memcpy_htod(host, &mut b)
                .map_err(|e| driver_err(format!("host→device copy of {} f32", host.len()), e))?;
        }
        Ok(b)
    }

    /// The first `n` elements of `src` (synchronizes the stream).
    fn download(&self, src: &Buf, n: usize) -> Result<Vec<f32>> {
        check_len("download", "src", src.len(), n)?;
        let mut out = vec![0f32; n];
        if n > 0 {
            self.be
                .stream()
                .memcpy_dtoh(&src.slice(..n), &mut out)
                .map_err(|e| driver_err("device→host copy".into(), e))?;
        }
        self.sync()?;
        Ok(out)
    }

    /// Rounded to f32.
    fn upload_f64(&self, host: &[f64]) -> Result<Buf> {
        self.upload(&host.iter().map(|&x| x as f32).collect::<Vec<_>>())
    }

    /// Values above `i32::MAX` become negative, which every launcher's check refuses.
    fn ints(&self, host: &[u32]) -> Result<DevInts> {
        self.upload_ints(&host.iter().map(|&x| x as i32).collect::<Vec<_>>())
    }

    fn copy(&self, dst: &mut Buf, src: &Buf) -> Result<()> {
        check_len("copy", "dst", dst.len(), src.len())?;
        self.bind()?;
        let mut view = dst.slice_mut(..src.len());
        self.be
            .stream()
            .memcpy_dtod(src, &mut view)
            .map_err(|e| driver_err("device copy".into(), e))
    }

    fn finish(&self, what: &str) -> Result<()> {
        self.sync().with_context(|| what.to_string())
    }

    // ---- element-wise and row ops ----

    fn embedding(&self, out: &mut Buf, wte: &Buf, ids: RowIds<Self>) -> Result<()> {
        if self.lora.is_some() {
            return self.lora_embedding(out, wte, ids);
        }
        let (f, grid) = (self.k.embedding, ids.d.n as u32);
        let names = ["out", "ids", "the embedding rows"];
        let args = [Arg::w(self, out), Arg::r(self, wte)];
        self.row_op(("embedding", f, grid), args, (ids.ids, ids.d), names, false)
    }

    /// Backward of the embedding: `dwte[ids[i]] += dx[i]` (rows in ascending order; the CSR
    /// grouping is built here from the ids' host copy, no atomics: deterministic, bit-exact). No
    /// synchronization: the index buffers dropped at the end are freed in stream order
    /// (cudarc's `free_async`, or a synchronizing free where the device lacks memory pools).
    fn embedding_bwd(&self, dwte: &mut Buf, dx: &Buf, ids: RowIds<Self>) -> Result<()> {
        let f = self.k.embedding_bwd;
        self.embedding_bwd_rows(f, [Arg::w(self, dwte), Arg::r(self, dx)], ids.ids, ids.d)
    }

    fn rms_norm(&self, y: &mut Buf, r: &mut Buf, a: Norm<Self>) -> Result<()> {
        let f = self.k.rms_norm_fwd;
        let args = [
            Arg::w(self, y),
            Arg::w(self, r),
            Arg::r(self, a.x),
            Arg::r(self, a.w),
        ];
        self.rms_norm_rows(f, args, a.d, a.eps)
    }

    /// [`crate::train::ops::rms_norm_bwd`]: `dx` written, `dw` accumulated (`None`, a frozen
    /// weight: the `dw` kernel is not launched).
    fn rms_norm_bwd(&self, dx: &mut Buf, dw: Option<&mut Buf>, a: NormGrad<Self>) -> Result<()> {
        let f = [self.k.rms_norm_bwd, self.k.rms_norm_bwd_dw];
        let outs = (Arg::w(self, dx), dw.map(|b| Arg::w(self, b)));
        let ins = [a.dy, a.x, a.r, a.w].map(|b| Arg::r(self, b));
        self.rms_norm_bwd_rows(f, outs, ins, a.d)
    }

    /// RoPE in place on `x` `[N, heads·hd]` (`inverse`: the backward rotation).
    fn rope(&self, x: &mut Buf, t: &Rope<Self>, heads: usize, inverse: bool) -> Result<()> {
        let tables = (&t.pos, Arg::r(self, &t.cos), Arg::r(self, &t.sin));
        self.rope_rows(
            self.k.rope,
            Arg::w(self, x),
            tables,
            (t.n, t.hd),
            heads,
            inverse,
        )
    }

    fn swiglu(&self, m: &mut Buf, g: &Buf, u: &Buf, len: usize) -> Result<()> {
        let args = [
            ("m", Arg::w(self, m)),
            ("g", Arg::r(self, g)),
            ("u", Arg::r(self, u)),
        ];
        self.elementwise(("swiglu", self.k.swiglu_fwd), &args, len)
    }

    fn swiglu_bwd(&self, dg: &mut Buf, du: &mut Buf, a: SwigluGrad<Self>) -> Result<()> {
        let (dg, du) = (Arg::w(self, dg), Arg::w(self, du));
        let [dm, g, u] = [a.dm, a.g, a.u].map(|b| Arg::r(self, b));
        let args = [("dg", dg), ("du", du), ("dm", dm), ("g", g), ("u", u)];
        self.elementwise(("swiglu_bwd", self.k.swiglu_bwd), &args, a.len)
    }

    /// `x += d` over `len` elements.
    fn add(&self, x: &mut Buf, d: &Buf, len: usize) -> Result<()> {
        let args = [("x", Arg::w(self, x)), ("d", Arg::r(self, d))];
        self.elementwise(("add", self.k.add), &args, len)
    }

    fn gather_rows(&self, out: &mut Buf, x: &Buf, rows: RowIds<Self>) -> Result<()> {
        let args = [Arg::w(self, out), Arg::r(self, x)];
        self.move_rows(self.k.gather_rows, false, args, (rows.ids, rows.d))
    }

    /// `dx[rows[i]] += dy[i]`, i ascending (repeated rows add up).
    fn scatter_add_rows(&self, dx: &mut Buf, dy: &Buf, at: RowIds<Self>) -> Result<()> {
        let args = [Arg::w(self, dx), Arg::r(self, dy)];
        self.move_rows(self.k.scatter_add_rows, true, args, (at.ids, at.d))
    }

    /// [`crate::train::ops::attention`]: `o`, and `lse` `[N, NH]` for the backward pass.
    fn attention(&self, o: &mut Buf, lse: &mut Buf, a: Qkv<Self>) -> Result<()> {
        let outs = [Arg::w(self, o), Arg::w(self, lse)];
        let ins = [a.q, a.k, a.v].map(|b| Arg::r(self, b));
        let tiled = self.tiled_attention(a.d.hd);
        let tiled = tiled.then_some(|| self.attention_tiled([o, lse], [a.q, a.k, a.v], a.d));
        self.attention_rows(self.k.attention_fwd, outs, ins, a.d, tiled)
    }

    /// [`crate::train::ops::attention_bwd`]: writes `dq`, `dk`, `dv`; `delta` is scratch `[N, NH]`.
    fn attention_bwd(&self, g: QkvGrads<Self>, a: AttnGrad<Self>) -> Result<()> {
        let (qkv, f) = (a.qkv, [self.k.attention_bwd_dq, self.k.attention_bwd_dkv]);
        let ins = [a.dout, qkv.q, qkv.k, qkv.v, a.o, a.lse];
        let QkvGrads { dq, dk, dv, delta } = g;
        let outs = [
            Arg::w(self, dq),
            Arg::w(self, dk),
            Arg::w(self, dv),
            Arg::w(self, delta),
        ];
        let args = ins.map(|b| Arg::r(self, b));
        if self.tiled_attention(qkv.d.hd) {
            let tiled = Some(|| self.attention_bwd_tiled([dq, dk, dv, delta], ins, qkv.d));
            return self.attention_bwd_rows(f, outs, args, qkv.d, (|| Ok(()), tiled));
        }
        let zero = || {
            self.zero_fill(dk)?;
            self.zero_fill(dv)
        };
        let none: Option<fn() -> Result<()>> = None;
        self.attention_bwd_rows(f, outs, args, qkv.d, (zero, none))
    }

    /// [`crate::train::ops::cross_entropy`] on the `R` rows of `z` `[R, V]` (overwritten with
    /// the gradient); returns `Σ_r loss_r` summed on the host in f64, in row order (as the CPU
    /// does). `loss` is scratch `[R]`.
    fn cross_entropy(&self, z: &mut Buf, loss: &mut Buf, t: Targets<Self>) -> Result<f64> {
        let (z, w) = (Arg::w(self, z), Arg::r(self, t.weights));
        self.cross_entropy_rows(self.k.cross_entropy, (z, loss), (t.ids, w), t.d)
    }

    /// `y[N, M] = x[N, K]·wᵀ` ([`crate::train::ops::linear`], `CudaOps::linear_rows`).
    fn linear(&self, y: &mut Buf, x: &Buf, w: &Buf, d: MatMul) -> Result<()> {
        if self.lora.is_some() {
            return self.lora_linear(y, x, w, d);
        }
        let args = [Arg::w(self, y), Arg::r(self, x), Arg::r(self, w)];
        self.linear_rows(args, d, GemmData::F32)
    }

    /// Backward of [`CudaOps::linear`] ([`crate::train::ops::linear_bwd`]): `dx = dy·w` (as
    /// `dx` says), `dw += dyᵀ·x`.
    fn linear_bwd(&self, dx: Dx<Self>, dw: Option<&mut Buf>, a: LinearGrad<Self>) -> Result<()> {
        if self.lora.is_some() {
            return self.lora_linear_bwd(dx, a);
        }
        let (mut dx, accumulate) = dx.split();
        let dxa = dx.as_deref_mut().map(|b| (Arg::w(self, b), accumulate));
        let ins = [a.dy, a.x, a.w].map(|b| Arg::r(self, b));
        let zero = || dx.map_or(Ok(()), |b| self.zero_fill(b));
        let dw = dw.map(|b| Arg::w(self, b));
        self.linear_bwd_rows((dxa, dw), ins, a.d, GemmData::F32, zero)
    }
}

impl CudaOps {
    /// Checks an attention shape for the kernels; returns `N = B·T` and `[b, t, nh, nkv, hd]`
    /// as the kernels' ints.
    pub(super) fn attn_checks(op: &str, d: AttnShape) -> Result<(usize, [i32; 5])> {
        let AttnShape { b, t, nh, nkv, hd } = d;
        ensure!(
            nkv > 0 && nh % nkv == 0,
            "{op}: NH = {nh} must be a positive multiple of NKV = {nkv}"
        );
        ensure!(hd > 0, "{op}: head dim must be positive");
        grid_yz(op, "b", b)?;
        grid_yz(op, "nh", nh)?;
        let dims = [("b", b), ("t", t), ("nh", nh), ("nkv", nkv), ("hd", hd)];
        let mut ints = [0i32; 5];
        for (o, (arg, v)) in ints.iter_mut().zip(dims) {
            *o = int(op, arg, v)?;
        }
        Ok((b * t, ints))
    }

    /// Σ x² over the first `len` elements, f64 (fixed partial-sum grid: deterministic).
    pub fn sumsq(&self, x: &Buf, len: usize, partial: &mut CudaSlice<f64>) -> Result<f64> {
        self.sumsq_at(x, 0, len, partial)
    }

    /// [`CudaOps::sumsq`] of elements `at .. at + len` (a ZeRO-1 shard's piece of a tensor).
    pub fn sumsq_at(
        &self,
        x: &Buf,
        at: usize,
        len: usize,
        partial: &mut CudaSlice<f64>,
    ) -> Result<f64> {
        if len == 0 {
            check_len("sumsq", "x", x.len(), at)?;
            check_len("sumsq", "partial", partial.len(), SUMSQ_BLOCKS)?;
            return Ok(0.0);
        }
        self.sumsq_queue(x, at, len, partial, 0)?;
        Ok(self.sumsq_read(partial, 1)?[0])
    }

    /// The kernel of [`CudaOps::sumsq_at`], queued without a read-back: the `SUMSQ_BLOCKS`
    /// partial sums of Σ x² over elements `at .. at + len` go to slot `slot` of `partial`
    /// (elements `slot·SUMSQ_BLOCKS ..`; zeros when `len` is 0). [`CudaOps::sumsq_read`] reads
    /// several slots back at once.
    pub(super) fn sumsq_queue(
        &self,
        x: &Buf,
        at: usize,
        len: usize,
        partial: &mut CudaSlice<f64>,
        slot: usize,
    ) -> Result<()> {
        let op = "sumsq";
        check_len(op, "x", x.len(), at.saturating_add(len))?;
        let end = (slot + 1).saturating_mul(SUMSQ_BLOCKS);
        check_len(op, "partial", partial.len(), end)?;
        if len == 0 {
            let mut view = partial.slice_mut(slot * SUMSQ_BLOCKS..end);
            return self
                .be
                .stream()
                .memset_zeros(&mut view)
                .map_err(|e| driver_err(format!("{op}: zeroing slot {slot}"), e));
        }
        let pp = self.ptr_mut(partial) + (8 * slot * SUMSQ_BLOCKS) as u64;
        let xp = self.ptr(x) + 4 * at as u64;
        let numel = len as i64;
        launch!(self, op, self.k.sumsq, Geom::new((SUMSQ_BLOCKS as u32, 1, 1), 256, 0); pp, xp,
            numel)
    }

    /// The sums of the first `slots` slots of `partial` ([`CudaOps::sumsq_queue`]), each its
    /// `SUMSQ_BLOCKS` partials added in order in f64: one device→host copy and one sync.
    pub(super) fn sumsq_read(&self, partial: &CudaSlice<f64>, slots: usize) -> Result<Vec<f64>> {
        let (op, n) = ("sumsq", slots.saturating_mul(SUMSQ_BLOCKS));
        check_len(op, "partial", partial.len(), n)?;
        let mut h = vec![0f64; n];
        if n > 0 {
            self.be
                .stream()
                .memcpy_dtoh(&partial.slice(..n), &mut h)
                .map_err(|e| driver_err(format!("{op}: device→host copy"), e))?;
            self.sync()?;
        }
        Ok(h.chunks(SUMSQ_BLOCKS).map(|c| c.iter().sum()).collect())
    }

    /// One AdamW update (`adamw_f32`, see [`crate::train::optim::AdamW::step`]) of elements
    /// `range` of the weights `p` (and their bf16 copy) and the gradient `g`, with moments `m`,
    /// `v` of `range.len()` values: a whole tensor at `0..len`, or a ZeRO-1 shard's piece of one
    /// with its own moments.
    pub fn adamw(
        &self,
        (p, p_bf16): (&mut Buf, Option<&mut CudaSlice<bf16>>),
        (m, v): (&mut Buf, &mut Buf),
        g: &Buf,
        range: std::ops::Range<usize>,
        h: &AdamWScalars,
        decay: f32,
    ) -> Result<()> {
        let (op, at, len, end) = ("adamw", range.start, range.len(), range.end);
        for (a, l, need) in [
            ("p", p.len(), end),
            ("m", m.len(), len),
            ("v", v.len(), len),
            ("g", g.len(), end),
        ] {
            check_len(op, a, l, need)?;
        }
        let pb: u64 = match p_bf16 {
            Some(b) => {
                check_len(op, "p_bf16", b.len(), end)?;
                self.ptr_mut(b) + 2 * at as u64
            }
            None => 0,
        };
        if len == 0 {
            return Ok(());
        }
        let (pp, mp, vp, gp) = (
            self.ptr_mut(p) + 4 * at as u64,
            self.ptr_mut(m),
            self.ptr_mut(v),
            self.ptr(g) + 4 * at as u64,
        );
        let numel = len as i64;
        let AdamWScalars {
            b1,
            omb1,
            b2,
            omb2,
            step_size,
            bc2_sqrt,
            eps,
            gscale,
        } = *h;
        launch!(self, op, self.k.adamw, Geom::new((stride_grid(len), 1, 1), 256, 0); pp, mp, vp,
            pb, gp, numel, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps, decay, gscale)
    }
}
