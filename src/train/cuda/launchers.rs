//! The f32 training launchers of [`CudaOps`], one per op of [`crate::train::ops`] (same
//! shapes, same argument meaning), each validating lengths and every host-known id, row and
//! position before launching the op's kernel in `kernels/<op>.cu`.

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
        self.row_op(("embedding", f, grid), (out, wte, ids), names, false)
    }

    /// Backward of the embedding: `dwte[ids[i]] += dx[i]` (rows in ascending order; the CSR
    /// grouping is built here from the ids' host copy, no atomics: deterministic, bit-exact). No
    /// synchronization: the index buffers dropped at the end are freed in stream order
    /// (cudarc's `free_async`, or a synchronizing free where the device lacks memory pools).
    fn embedding_bwd(&self, dwte: &mut Buf, dx: &Buf, ids: RowIds<Self>) -> Result<()> {
        let op = "embedding_bwd";
        let Rows { n, c } = ids.d;
        check_len(op, "dx", dx.len(), n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        check_ints(op, "ids", ids.ids, n, dwte.len() / c, "the embedding rows")?;
        if n == 0 {
            return Ok(());
        }
        let host = ids.ids.host_values(op, "ids", n)?;
        if self.tiled.is_some() {
            let (f, p) = (
                self.tiled()?.embedding_bwd,
                [self.ptr_mut(dwte), self.ptr(dx)],
            );
            return self.scatter_tiled(op, f, p, host, c);
        }
        let mut order: Vec<i32> = (0..n as i32).collect();
        order.sort_by_key(|&i| (host[i as usize], i)); // stable in i within one id
        let (mut uniq, mut off) = (Vec::new(), Vec::new());
        for (e, &i) in order.iter().enumerate() {
            let id = host[i as usize];
            if uniq.last() != Some(&id) {
                uniq.push(id);
                off.push(e as i32);
            }
        }
        off.push(n as i32);
        let (u, o, ord) = (
            self.upload_ints(&uniq)?,
            self.upload_ints(&off)?,
            self.upload_ints(&order)?,
        );
        let nu = uniq.len();
        let (dp, xp, up, op_, orp) = (
            self.ptr_mut(dwte),
            self.ptr(dx),
            self.ptr(&u),
            self.ptr(&o),
            self.ptr(&ord),
        );
        let (nu_, c_) = (int(op, "nuniq", nu)?, int(op, "c", c)?);
        launch!(self, op, self.k.embedding_bwd, Geom::new((nu as u32, 1, 1), 256, 0); dp, xp, up,
            op_, orp, nu_, c_)
    }

    fn rms_norm(&self, y: &mut Buf, r: &mut Buf, a: Norm<Self>) -> Result<()> {
        let (op, Rows { n, c }) = ("rms_norm", a.d);
        check_len(op, "y", y.len(), n * c)?;
        check_norm(op, a.d, [a.x.len(), r.len(), a.w.len()])?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (yp, rp, xp, wp) = (
            self.ptr_mut(y),
            self.ptr_mut(r),
            self.ptr(a.x),
            self.ptr(a.w),
        );
        let (n_, c_, eps) = (int(op, "n", n)?, int(op, "c", c)?, a.eps);
        launch!(self, op, self.k.rms_norm_fwd, Geom::new((n as u32, 1, 1), 256, 0); yp, rp, xp, wp,
            n_, c_, eps)
    }

    /// [`crate::train::ops::rms_norm_bwd`]: `dx` written, `dw` accumulated (`None`, a frozen
    /// weight: the `dw` kernel is not launched).
    fn rms_norm_bwd(&self, dx: &mut Buf, dw: Option<&mut Buf>, a: NormGrad<Self>) -> Result<()> {
        let (op, Rows { n, c }) = ("rms_norm_bwd", a.d);
        check_len(op, "dx", dx.len(), n * c)?;
        if let Some(dw) = &dw {
            check_len(op, "dw", dw.len(), c)?;
        }
        check_len(op, "dy", a.dy.len(), n * c)?;
        check_norm(op, a.d, [a.x.len(), a.r.len(), a.w.len()])?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let dxp = self.ptr_mut(dx);
        let (dyp, xp, rp, wp) = (self.ptr(a.dy), self.ptr(a.x), self.ptr(a.r), self.ptr(a.w));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.rms_norm_bwd, Geom::new((n as u32, 1, 1), 256, 0); dxp, dyp, xp,
            rp, wp, n_, c_)?;
        let Some(dw) = dw else {
            return Ok(());
        };
        let dwp = self.ptr_mut(dw);
        if self.tiled.is_some() {
            return self.rms_norm_bwd_dw_tiled([dwp, dyp, xp, rp], n, c);
        }
        launch!(self, op, self.k.rms_norm_bwd_dw, Geom::new((c.div_ceil(256) as u32, 1, 1), 256, 0);
            dwp, dyp, xp, rp, n_, c_)
    }

    /// RoPE in place on `x` `[N, heads·hd]` (`inverse`: the backward rotation).
    fn rope(&self, x: &mut Buf, t: &Rope<Self>, heads: usize, inverse: bool) -> Result<()> {
        let (op, n, hd) = ("rope", t.n, t.hd);
        ensure!(
            hd > 0 && hd % 2 == 0,
            "{op}: head dim {hd} must be even and positive"
        );
        check_len(op, "x", x.len(), n * heads * hd)?;
        let (cos, sin) = (&t.cos, &t.sin);
        ensure!(
            cos.len() == sin.len() && cos.len() >= hd / 2,
            "{op}: tables `cos` ({}) and `sin` ({}) must be [max_pos, HD/2 = {}]",
            cos.len(),
            sin.len(),
            hd / 2
        );
        let max_pos = cos.len() / (hd / 2);
        check_ints(op, "pos", &t.pos, n, max_pos, "the RoPE tables")?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let (xp, cp, sp, pp) = (
            self.ptr_mut(x),
            self.ptr(cos),
            self.ptr(sin),
            self.ptr(&t.pos),
        );
        let (n_, h_, hd_) = (
            int(op, "n", n)?,
            int(op, "heads", heads)?,
            int(op, "hd", hd)?,
        );
        // +1 rotates, −1 rotates back (the kernel multiplies sin by it: exact either way).
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        let f = self.k.rope;
        launch!(self, op, f, Geom::new((n as u32, 1, 1), 256, 0); xp, cp, sp, pp, n_, h_, hd_,
            sign)
    }

    fn swiglu(&self, m: &mut Buf, g: &Buf, u: &Buf, len: usize) -> Result<()> {
        let op = "swiglu";
        check_len(op, "m", m.len(), len)?;
        check_len(op, "g", g.len(), len)?;
        check_len(op, "u", u.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let (mp, gp, up) = (self.ptr_mut(m), self.ptr(g), self.ptr(u));
        let numel = len as i64;
        launch!(self, op, self.k.swiglu_fwd, Geom::new((stride_grid(len), 1, 1), 256, 0); mp, gp,
            up, numel)
    }

    fn swiglu_bwd(&self, dg: &mut Buf, du: &mut Buf, a: SwigluGrad<Self>) -> Result<()> {
        let (op, len) = ("swiglu_bwd", a.len);
        for (arg, l) in [
            ("dg", dg.len()),
            ("du", du.len()),
            ("dm", a.dm.len()),
            ("g", a.g.len()),
            ("u", a.u.len()),
        ] {
            check_len(op, arg, l, len)?;
        }
        if len == 0 {
            return Ok(());
        }
        let (dgp, dup) = (self.ptr_mut(dg), self.ptr_mut(du));
        let (dmp, gp, up) = (self.ptr(a.dm), self.ptr(a.g), self.ptr(a.u));
        let numel = len as i64;
        launch!(self, op, self.k.swiglu_bwd, Geom::new((stride_grid(len), 1, 1), 256, 0); dgp, dup,
            dmp, gp, up, numel)
    }

    /// `x += d` over `len` elements.
    fn add(&self, x: &mut Buf, d: &Buf, len: usize) -> Result<()> {
        let op = "add";
        check_len(op, "x", x.len(), len)?;
        check_len(op, "d", d.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let (xp, dp) = (self.ptr_mut(x), self.ptr(d));
        let numel = len as i64;
        launch!(self, op, self.k.add, Geom::new((stride_grid(len), 1, 1), 256, 0); xp, dp, numel)
    }

    fn gather_rows(&self, out: &mut Buf, x: &Buf, rows: RowIds<Self>) -> Result<()> {
        let (f, grid) = (self.k.gather_rows, rows.d.n as u32);
        let names = ["out", "rows", "the rows of `x`"];
        self.row_op(("gather_rows", f, grid), (out, x, rows), names, false)
    }

    /// `dx[rows[i]] += dy[i]`, i ascending (repeated rows add up).
    fn scatter_add_rows(&self, dx: &mut Buf, dy: &Buf, at: RowIds<Self>) -> Result<()> {
        let (f, grid) = (self.k.scatter_add_rows, at.d.c.div_ceil(256) as u32);
        let names = ["dy", "rows", "the rows of `dx`"];
        self.row_op(("scatter_add_rows", f, grid), (dx, dy, at), names, true)
    }

    /// [`crate::train::ops::attention`]: `o`, and `lse` `[N, NH]` for the backward pass.
    fn attention(&self, o: &mut Buf, lse: &mut Buf, a: Qkv<Self>) -> Result<()> {
        let op = "attention";
        let (n, [b_, t_, nh_, nkv_, hd_]) = Self::attn_checks(op, a.d)?;
        let AttnShape { b, t, nh, nkv, hd } = a.d;
        for (arg, l, need) in [
            ("o", o.len(), n * nh * hd),
            ("lse", lse.len(), n * nh),
            ("q", a.q.len(), n * nh * hd),
            ("k", a.k.len(), n * nkv * hd),
            ("v", a.v.len(), n * nkv * hd),
        ] {
            check_len(op, arg, l, need)?;
        }
        if self.tiled_attention(hd) {
            return self.attention_tiled([o, lse], [a.q, a.k, a.v], a.d);
        }
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem = check_dyn_smem(op, self.k.attention_fwd, (t + hd) * 4, &what)?;
        if n == 0 || nh == 0 {
            return Ok(());
        }
        let (op_, lp) = (self.ptr_mut(o), self.ptr_mut(lse));
        let (qp, kp, vp) = (self.ptr(a.q), self.ptr(a.k), self.ptr(a.v));
        launch!(self, op, self.k.attention_fwd, Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem);
            op_, lp, qp, kp, vp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`crate::train::ops::attention_bwd`]: writes `dq`, `dk`, `dv`; `delta` is scratch `[N, NH]`.
    fn attention_bwd(&self, g: QkvGrads<Self>, a: AttnGrad<Self>) -> Result<()> {
        let (op, qkv) = ("attention_bwd", a.qkv);
        let (n, [b_, t_, nh_, nkv_, hd_]) = Self::attn_checks(op, qkv.d)?;
        let AttnShape { b, t, nh, nkv, hd } = qkv.d;
        let (qw, kw) = (nh * hd, nkv * hd);
        let QkvGrads { dq, dk, dv, delta } = g;
        for (arg, l, need) in [
            ("dq", dq.len(), n * qw),
            ("dk", dk.len(), n * kw),
            ("dv", dv.len(), n * kw),
            ("delta", delta.len(), n * nh),
            ("dout", a.dout.len(), n * qw),
            ("q", qkv.q.len(), n * qw),
            ("k", qkv.k.len(), n * kw),
            ("v", qkv.v.len(), n * kw),
            ("o", a.o.len(), n * qw),
            ("lse", a.lse.len(), n * nh),
        ] {
            check_len(op, arg, l, need)?;
        }
        if self.tiled_attention(hd) {
            let ins = [a.dout, qkv.q, qkv.k, qkv.v, a.o, a.lse];
            return self.attention_bwd_tiled([dq, dk, dv, delta], ins, qkv.d);
        }
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem_q = check_dyn_smem(op, self.k.attention_bwd_dq, (t + 2 * hd) * 4, &what)?;
        let smem_kv = check_dyn_smem(op, self.k.attention_bwd_dkv, (2 * t + 4 * hd) * 4, &what)?;
        if n == 0 {
            return Ok(());
        }
        if nh == 0 {
            self.zero_fill(dk)?;
            return self.zero_fill(dv);
        }
        let (dqp, dkp, dvp, dlp) = (
            self.ptr_mut(dq),
            self.ptr_mut(dk),
            self.ptr_mut(dv),
            self.ptr_mut(delta),
        );
        let (dop, opp, lp) = (self.ptr(a.dout), self.ptr(a.o), self.ptr(a.lse));
        let (qp, kp, vp) = (self.ptr(qkv.q), self.ptr(qkv.k), self.ptr(qkv.v));
        launch!(self, op, self.k.attention_bwd_dq, Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem_q);
            dqp, dlp, dop, qp, kp, vp, opp, lp, b_, t_, nh_, nkv_, hd_)?;
        launch!(self, op, self.k.attention_bwd_dkv, Geom::new((t as u32, nkv as u32, b as u32), ATT_THREADS, smem_kv);
            dkp, dvp, dlp, dop, qp, kp, vp, lp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`crate::train::ops::cross_entropy`] on the `R` rows of `z` `[R, V]` (overwritten with
    /// the gradient); returns `Σ_r loss_r` summed on the host in f64, in row order (as the CPU
    /// does). `loss` is scratch `[R]`.
    fn cross_entropy(&self, z: &mut Buf, loss: &mut Buf, t: Targets<Self>) -> Result<f64> {
        let (op, Rows { n: r, c: v }) = ("cross_entropy", t.d);
        check_len(op, "z", z.len(), r * v)?;
        check_len(op, "loss", loss.len(), r)?;
        check_len(op, "weights", t.weights.len(), r)?;
        check_ints(op, "targets", t.ids, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(0.0);
        }
        let (zp, lp) = (self.ptr_mut(z), self.ptr_mut(loss));
        let (tp, wp) = (self.ptr(t.ids), self.ptr(t.weights));
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        launch!(self, op, self.k.cross_entropy, Geom::new((r as u32, 1, 1), 1024, 0); zp, lp, tp,
            wp, r_, v_)?;
        let rows = self.download(loss, r)?;
        Ok(rows.iter().map(|&x| x as f64).sum())
    }

    /// `y[N, M] = x[N, K]·wᵀ` ([`crate::train::ops::linear`]). Row-major buffers read column-major
    /// are transposes: `yᵀ = W·xᵀ` with `W` stored `[M, K]` = column-major `K×M`, so
    /// `op(A) = Aᵀ` (lda K), `B = xᵀ` (ldb K), ldc M.
    fn linear(&self, y: &mut Buf, x: &Buf, w: &Buf, d: MatMul) -> Result<()> {
        if self.lora.is_some() {
            return self.lora_linear(y, x, w, d);
        }
        let (op, MatMul { n, k, m }) = ("linear", d);
        check_len(op, "y", y.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        check_len(op, "w", w.len(), m * k)?;
        let (yp, xp, wp) = (self.ptr_mut(y), self.ptr(x), self.ptr(w));
        self.gemm(
            op,
            Gemm {
                ta: true,
                tb: false,
                m,
                n,
                k,
                a: wp,
                lda: k,
                b: xp,
                ldb: k,
                beta: 0.0,
                c: yp,
                ldc: m,
                ..Gemm::F32
            },
        )
    }

    /// Backward of [`CudaOps::linear`] ([`crate::train::ops::linear_bwd`]): `dx = dy·w` (as
    /// `dx` says), `dw += dyᵀ·x`.
    fn linear_bwd(&self, dx: Dx<Self>, dw: Option<&mut Buf>, a: LinearGrad<Self>) -> Result<()> {
        if self.lora.is_some() {
            return self.lora_linear_bwd(dx, a);
        }
        let (op, (dx, dx_accumulate)) = ("linear_bwd", dx.split());
        let LinearGrad { dy, x, w, d } = a;
        let MatMul { n, k, m } = d;
        if let Some(dw) = &dw {
            check_len(op, "dw", dw.len(), m * k)?;
        }
        check_len(op, "dy", dy.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        check_len(op, "w", w.len(), m * k)?;
        let (dyp, xp, wp) = (self.ptr(dy), self.ptr(x), self.ptr(w));
        if let Some(dx) = dx {
            check_len(op, "dx", dx.len(), n * k)?;
            let dxp = self.ptr_mut(dx);
            // dxᵀ (K×N) = Wᵀ (col-major K×M, as stored) · dyᵀ (M×N, as stored).
            let beta = if dx_accumulate { 1.0 } else { 0.0 };
            if k > 0 && n > 0 && m == 0 && !dx_accumulate {
                self.zero_fill(dx)?;
            } else {
                self.gemm(
                    op,
                    Gemm {
                        ta: false,
                        tb: false,
                        m: k,
                        n,
                        k: m,
                        a: wp,
                        lda: k,
                        b: dyp,
                        ldb: m,
                        beta,
                        c: dxp,
                        ldc: k,
                        ..Gemm::F32
                    },
                )?;
            }
        }
        // dWᵀ (K×M) += xᵀ (col-major K×N, as stored) · dy (N×M = transpose of the stored M×N);
        // nothing for a frozen weight.
        let Some(dw) = dw else {
            return Ok(());
        };
        let dwp = self.ptr_mut(dw);
        if n > 0 {
            self.gemm(
                op,
                Gemm {
                    ta: false,
                    tb: true,
                    m: k,
                    n: m,
                    k: n,
                    a: xp,
                    lda: k,
                    b: dyp,
                    ldb: m,
                    beta: 1.0,
                    c: dwp,
                    ldc: k,
                    ..Gemm::F32
                },
            )?;
        }
        Ok(())
    }
}

/// The lengths an RMSNorm's operands need over `d`: `x` `[N, C]`, `r` `[N]`, `w` `[C]`.
fn check_norm(op: &str, d: Rows, [x, r, w]: [usize; 3]) -> Result<()> {
    check_len(op, "x", x, d.n * d.c)?;
    check_len(op, "r", r, d.n)?;
    check_len(op, "w", w, d.c)
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

    /// The row ops (`f(dst, src, ids, n, c)` on grid `(grid, 1, 1)` × 256): row `i` of the
    /// `[N, C]` side is row `ids[i]` of the other. The `[N, C]` side is `dst` (embedding,
    /// gather), or `src` when `dst` is the one indexed (`scattered`: a scatter-add). `names`:
    /// the `[N, C]` side's, the ids' and the indexed side's rows' (for the errors).
    fn row_op(
        &self,
        (op, f, grid): (&str, dsys::CUfunction, u32),
        (dst, src, ids): (&mut Buf, &Buf, RowIds<Self>),
        names: [&str; 3],
        scattered: bool,
    ) -> Result<()> {
        let (Rows { n, c }, [dense, ids_name, what]) = (ids.d, names);
        ensure!(c > 0, "{op}: C must be positive");
        let (dense_len, indexed_len) = match scattered {
            true => (src.len(), dst.len()),
            false => (dst.len(), src.len()),
        };
        check_len(op, dense, dense_len, n * c)?;
        check_ints(op, ids_name, ids.ids, n, indexed_len / c, what)?;
        if n == 0 {
            return Ok(());
        }
        if scattered && self.tiled.is_some() {
            let (f, p) = (
                self.tiled()?.scatter_add_rows,
                [self.ptr_mut(dst), self.ptr(src)],
            );
            let host = ids.ids.host_values(op, ids_name, n)?;
            return self.scatter_tiled(op, f, p, host, c);
        }
        let (d, s, i) = (self.ptr_mut(dst), self.ptr(src), self.ptr(ids.ids));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, f, Geom::new((grid, 1, 1), 256, 0); d, s, i, n_, c_)
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
