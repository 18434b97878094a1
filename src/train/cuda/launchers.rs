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

    fn embedding(&self, out: &mut Buf, wte: &Buf, ids: &DevInts, n: usize, c: usize) -> Result<()> {
        let op = "embedding";
        check_len(op, "out", out.len(), n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        if self.lora.is_some() {
            return self.lora_embedding(out, wte, ids, [n, c]);
        }
        check_ints(op, "ids", ids, n, wte.len() / c, "the embedding rows")?;
        if n == 0 {
            return Ok(());
        }
        let (o, w, i) = (self.ptr_mut(out), self.ptr(wte), self.ptr(&ids.buf));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.embedding, Geom::new((n as u32, 1, 1), 256, 0); o, w, i, n_, c_)
    }

    /// Backward of the embedding: `dwte[ids[i]] += dx[i]` (rows in ascending order; the CSR
    /// grouping is built here from the host ids, no atomics: deterministic, bit-exact). No
    /// synchronization: the index buffers dropped at the end are freed in stream order
    /// (cudarc's `free_async`, or a synchronizing free where the device lacks memory pools).
    fn embedding_bwd(&self, dwte: &mut Buf, dx: &Buf, ids: &[u32], c: usize) -> Result<()> {
        if self.lora.is_some() {
            return Ok(()); // the embedding is frozen
        }
        let op = "embedding_bwd";
        let n = ids.len();
        check_len(op, "dx", dx.len(), n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        let v = dwte.len() / c;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &x)| x as usize >= v) {
            bail!("{op}: ids[{i}] = {id} is outside the {v} embedding rows");
        }
        if n == 0 {
            return Ok(());
        }
        if self.tiled.is_some() {
            return self.embedding_bwd_tiled(dwte, dx, ids, c);
        }
        let mut order: Vec<i32> = (0..n as i32).collect();
        order.sort_by_key(|&i| (ids[i as usize], i)); // stable in i within one id
        let (mut uniq, mut off) = (Vec::new(), Vec::new());
        for (e, &i) in order.iter().enumerate() {
            let id = ids[i as usize] as i32;
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
            self.ptr(&u.buf),
            self.ptr(&o.buf),
            self.ptr(&ord.buf),
        );
        let (nu_, c_) = (int(op, "nuniq", nu)?, int(op, "c", c)?);
        launch!(self, op, self.k.embedding_bwd, Geom::new((nu as u32, 1, 1), 256, 0); dp, xp, up,
            op_, orp, nu_, c_)
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        y: &mut Buf,
        r: &mut Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm";
        check_len(op, "y", y.len(), n * c)?;
        check_len(op, "r", r.len(), n)?;
        check_len(op, "x", x.len(), n * c)?;
        check_len(op, "w", w.len(), c)?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (yp, rp, xp, wp) = (self.ptr_mut(y), self.ptr_mut(r), self.ptr(x), self.ptr(w));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.rms_norm_fwd, Geom::new((n as u32, 1, 1), 256, 0); yp, rp, xp, wp,
            n_, c_, eps)
    }

    /// [`crate::train::ops::rms_norm_bwd`]: `dx` written, `dw` accumulated.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_bwd(
        &self,
        dx: &mut Buf,
        dw: &mut Buf,
        dy: &Buf,
        x: &Buf,
        r: &Buf,
        w: &Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let op = "rms_norm_bwd";
        check_len(op, "dx", dx.len(), n * c)?;
        check_len(op, "dw", dw.len(), c)?;
        check_len(op, "dy", dy.len(), n * c)?;
        check_len(op, "x", x.len(), n * c)?;
        check_len(op, "r", r.len(), n)?;
        check_len(op, "w", w.len(), c)?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (dxp, dwp, dyp, xp, rp, wp) = (
            self.ptr_mut(dx),
            self.ptr_mut(dw),
            self.ptr(dy),
            self.ptr(x),
            self.ptr(r),
            self.ptr(w),
        );
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, self.k.rms_norm_bwd, Geom::new((n as u32, 1, 1), 256, 0); dxp, dyp, xp,
            rp, wp, n_, c_)?;
        if self.tiled.is_some() {
            return self.rms_norm_bwd_dw_tiled([dwp, dyp, xp, rp], n, c);
        }
        launch!(self, op, self.k.rms_norm_bwd_dw, Geom::new((c.div_ceil(256) as u32, 1, 1), 256, 0);
            dwp, dyp, xp, rp, n_, c_)
    }

    /// RoPE in place on `x` `[N, heads·hd]` (`inverse`: the backward rotation).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Buf,
        pos: &DevInts,
        cos: &Buf,
        sin: &Buf,
        n: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        let op = "rope";
        ensure!(
            hd > 0 && hd % 2 == 0,
            "{op}: head dim {hd} must be even and positive"
        );
        check_len(op, "x", x.len(), n * heads * hd)?;
        ensure!(
            cos.len() == sin.len() && cos.len() >= hd / 2,
            "{op}: tables `cos` ({}) and `sin` ({}) must be [max_pos, HD/2 = {}]",
            cos.len(),
            sin.len(),
            hd / 2
        );
        let max_pos = cos.len() / (hd / 2);
        check_ints(op, "pos", pos, n, max_pos, "the RoPE tables")?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let (xp, cp, sp, pp) = (
            self.ptr_mut(x),
            self.ptr(cos),
            self.ptr(sin),
            self.ptr(&pos.buf),
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

    fn swiglu_bwd(
        &self,
        dg: &mut Buf,
        du: &mut Buf,
        dm: &Buf,
        g: &Buf,
        u: &Buf,
        len: usize,
    ) -> Result<()> {
        let op = "swiglu_bwd";
        for (a, l) in [
            ("dg", dg.len()),
            ("du", du.len()),
            ("dm", dm.len()),
            ("g", g.len()),
            ("u", u.len()),
        ] {
            check_len(op, a, l, len)?;
        }
        if len == 0 {
            return Ok(());
        }
        let (dgp, dup, dmp, gp, up) = (
            self.ptr_mut(dg),
            self.ptr_mut(du),
            self.ptr(dm),
            self.ptr(g),
            self.ptr(u),
        );
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

    fn gather_rows(
        &self,
        out: &mut Buf,
        x: &Buf,
        rows: &DevInts,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        let op = "gather_rows";
        ensure!(c > 0, "{op}: C must be positive");
        check_len(op, "out", out.len(), nrows * c)?;
        check_ints(op, "rows", rows, nrows, x.len() / c, "the rows of `x`")?;
        if nrows == 0 {
            return Ok(());
        }
        let (o, xp, r) = (self.ptr_mut(out), self.ptr(x), self.ptr(&rows.buf));
        let (nr, c_) = (int(op, "nrows", nrows)?, int(op, "c", c)?);
        launch!(self, op, self.k.gather_rows, Geom::new((nrows as u32, 1, 1), 256, 0); o, xp, r,
            nr, c_)
    }

    /// `dx[rows[i]] += src[i]`, i ascending (repeated rows add up).
    fn scatter_add_rows(
        &self,
        dx: &mut Buf,
        src: &Buf,
        rows: &DevInts,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        let op = "scatter_add_rows";
        ensure!(c > 0, "{op}: C must be positive");
        check_len(op, "src", src.len(), nrows * c)?;
        check_ints(op, "rows", rows, nrows, dx.len() / c, "the rows of `dx`")?;
        if nrows == 0 {
            return Ok(());
        }
        if self.tiled.is_some() {
            return self.scatter_add_rows_tiled(dx, src, &rows.host[..nrows], c);
        }
        let (d, s, r) = (self.ptr_mut(dx), self.ptr(src), self.ptr(&rows.buf));
        let (nr, c_) = (int(op, "nrows", nrows)?, int(op, "c", c)?);
        launch!(self, op, self.k.scatter_add_rows, Geom::new((c.div_ceil(256) as u32, 1, 1), 256, 0);
            d, s, r, nr, c_)
    }

    /// [`crate::train::ops::attention`]: `o`, and `lse` `[N, NH]` for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        o: &mut Buf,
        lse: &mut Buf,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        d: AttnShape,
    ) -> Result<()> {
        let op = "attention";
        Self::attn_checks(op, d)?;
        let AttnShape { b, t, nh, nkv, hd } = d;
        let n = b * t;
        check_len(op, "o", o.len(), n * nh * hd)?;
        check_len(op, "lse", lse.len(), n * nh)?;
        check_len(op, "q", q.len(), n * nh * hd)?;
        check_len(op, "k", k.len(), n * nkv * hd)?;
        check_len(op, "v", v.len(), n * nkv * hd)?;
        if self.tiled_attention(hd) {
            return self.attention_tiled([o, lse], [q, k, v], d);
        }
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem = check_dyn_smem(op, self.k.attention_fwd, (t + hd) * 4, &what)?;
        if n == 0 || nh == 0 {
            return Ok(());
        }
        let (op_, lp, qp, kp, vp) = (
            self.ptr_mut(o),
            self.ptr_mut(lse),
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
        );
        let (b_, t_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "t", t)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        launch!(self, op, self.k.attention_fwd, Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem);
            op_, lp, qp, kp, vp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`crate::train::ops::attention_bwd`]: writes `dq`, `dk`, `dv`; `delta` is scratch `[N, NH]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: &mut Buf,
        dk: &mut Buf,
        dv: &mut Buf,
        delta: &mut Buf,
        dout: &Buf,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        o: &Buf,
        lse: &Buf,
        d: AttnShape,
    ) -> Result<()> {
        let op = "attention_bwd";
        Self::attn_checks(op, d)?;
        let AttnShape { b, t, nh, nkv, hd } = d;
        let n = b * t;
        let (qw, kw) = (nh * hd, nkv * hd);
        for (a, l, need) in [
            ("dq", dq.len(), n * qw),
            ("dk", dk.len(), n * kw),
            ("dv", dv.len(), n * kw),
            ("delta", delta.len(), n * nh),
            ("dout", dout.len(), n * qw),
            ("q", q.len(), n * qw),
            ("k", k.len(), n * kw),
            ("v", v.len(), n * kw),
            ("o", o.len(), n * qw),
            ("lse", lse.len(), n * nh),
        ] {
            check_len(op, a, l, need)?;
        }
        if self.tiled_attention(hd) {
            return self.attention_bwd_tiled([dq, dk, dv, delta], [dout, q, k, v, o, lse], d);
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
        let (dop, qp, kp, vp, opp, lp) = (
            self.ptr(dout),
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(o),
            self.ptr(lse),
        );
        let (b_, t_, nh_, nkv_, hd_) = (
            int(op, "b", b)?,
            int(op, "t", t)?,
            int(op, "nh", nh)?,
            int(op, "nkv", nkv)?,
            int(op, "hd", hd)?,
        );
        launch!(self, op, self.k.attention_bwd_dq, Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem_q);
            dqp, dlp, dop, qp, kp, vp, opp, lp, b_, t_, nh_, nkv_, hd_)?;
        launch!(self, op, self.k.attention_bwd_dkv, Geom::new((t as u32, nkv as u32, b as u32), ATT_THREADS, smem_kv);
            dkp, dvp, dlp, dop, qp, kp, vp, lp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`crate::train::ops::cross_entropy`] on the first `r` rows of `z` `[R, V]` (overwritten
    /// with the gradient); returns `Σ_r loss_r` summed on the host in f64, in row order (as the
    /// CPU does). `loss_rows` is scratch `[R]`.
    fn cross_entropy(
        &self,
        z: &mut Buf,
        loss_rows: &mut Buf,
        targets: &DevInts,
        weights: &Buf,
        r: usize,
        v: usize,
    ) -> Result<f64> {
        let op = "cross_entropy";
        check_len(op, "z", z.len(), r * v)?;
        check_len(op, "loss_rows", loss_rows.len(), r)?;
        check_len(op, "weights", weights.len(), r)?;
        check_ints(op, "targets", targets, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(0.0);
        }
        let (zp, lp, tp, wp) = (
            self.ptr_mut(z),
            self.ptr_mut(loss_rows),
            self.ptr(&targets.buf),
            self.ptr(weights),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        launch!(self, op, self.k.cross_entropy, Geom::new((r as u32, 1, 1), 1024, 0); zp, lp, tp,
            wp, r_, v_)?;
        let rows = self.download(loss_rows, r)?;
        Ok(rows.iter().map(|&x| x as f64).sum())
    }

    /// `y[N, M] = x[N, K]·wᵀ` ([`crate::train::ops::linear`]). Row-major buffers read column-major
    /// are transposes: `yᵀ = W·xᵀ` with `W` stored `[M, K]` = column-major `K×M`, so
    /// `op(A) = Aᵀ` (lda K), `B = xᵀ` (ldb K), ldc M.
    fn linear(&self, y: &mut Buf, x: &Buf, w: &Buf, n: usize, k: usize, m: usize) -> Result<()> {
        if self.lora.is_some() {
            return self.lora_linear(y, x, w, LinearDims { n, k, m });
        }
        let op = "linear";
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

    /// Backward of [`CudaOps::linear`] ([`crate::train::ops::linear_bwd`]): `dx = dy·w` (written, or
    /// added when `dx_accumulate`), `dw += dyᵀ·x`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dx: Option<&mut Buf>,
        dx_accumulate: bool,
        dw: &mut Buf,
        dy: &Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        if self.lora.is_some() {
            let d = LinearDims { n, k, m };
            return self.lora_linear_bwd(dx, dx_accumulate, (dy, x, w), d);
        }
        let op = "linear_bwd";
        check_len(op, "dw", dw.len(), m * k)?;
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
        // dWᵀ (K×M) += xᵀ (col-major K×N, as stored) · dy (N×M = transpose of the stored M×N).
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

impl CudaOps {
    pub(super) fn attn_checks(op: &str, d: AttnShape) -> Result<()> {
        let AttnShape { b, nh, nkv, hd, .. } = d;
        ensure!(
            nkv > 0 && nh % nkv == 0,
            "{op}: NH = {nh} must be a positive multiple of NKV = {nkv}"
        );
        ensure!(hd > 0, "{op}: head dim must be positive");
        grid_yz(op, "b", b)?;
        grid_yz(op, "nh", nh)?;
        Ok(())
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
        let op = "sumsq";
        check_len(op, "x", x.len(), at.saturating_add(len))?;
        check_len(op, "partial", partial.len(), SUMSQ_BLOCKS)?;
        if len == 0 {
            return Ok(0.0);
        }
        let (pp, xp) = (self.ptr_mut(partial), self.ptr(x) + 4 * at as u64);
        let numel = len as i64;
        launch!(self, op, self.k.sumsq, Geom::new((SUMSQ_BLOCKS as u32, 1, 1), 256, 0); pp, xp,
            numel)?;
        let mut h = vec![0f64; SUMSQ_BLOCKS];
        self.be
            .stream()
            .memcpy_dtoh(&partial.slice(..SUMSQ_BLOCKS), &mut h)
            .map_err(|e| driver_err(format!("{op}: device→host copy"), e))?;
        self.sync()?;
        Ok(h.iter().sum())
    }

    /// One AdamW update (`adamw_f32`, see [`crate::train::optim::AdamW::step`]) of elements
    /// `at .. at + len` of the weights `p` (and their bf16 copy `p_bf16`) and the gradient `g`,
    /// with moments `m`, `v` of `len` values: a whole tensor at `at = 0`, or a ZeRO-1 shard's
    /// piece of one with its own moments.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        p: &mut Buf,
        at: usize,
        m: &mut Buf,
        v: &mut Buf,
        p_bf16: Option<&mut CudaSlice<bf16>>,
        g: &Buf,
        len: usize,
        h: &AdamWScalars,
        decay: f32,
        gscale: f32,
    ) -> Result<()> {
        let op = "adamw";
        let end = at.saturating_add(len);
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
        } = *h;
        launch!(self, op, self.k.adamw, Geom::new((stride_grid(len), 1, 1), 256, 0); pp, mp, vp,
            pb, gp, numel, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps, decay, gscale)
    }
}
