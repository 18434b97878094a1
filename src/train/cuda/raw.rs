//! The launch bodies of the training ops over device addresses and lengths ([`Arg`]), whatever
//! the buffers' dtype: one validation and launch per op, shared by the f32 launchers
//! (`launchers.rs`, the `*_f32` kernels) and the bf16-storage ones (`stored.rs`, the `*_bf16s`
//! kernels; the caller has checked each buffer's dtype). Lengths are elements.

use super::*;
use cublas::sys::cudaDataType_t;

/// A buffer as a launcher sees it: its device address and its length in elements.
#[derive(Clone, Copy, Debug)]
pub(super) struct Arg {
    pub p: u64,
    pub len: usize,
}

impl Arg {
    /// A buffer the kernel reads.
    pub fn r<T>(ops: &CudaOps, b: &CudaSlice<T>) -> Arg {
        Arg {
            p: ops.ptr(b),
            len: b.len(),
        }
    }
    /// A buffer the kernel writes.
    pub fn w<T>(ops: &CudaOps, b: &mut CudaSlice<T>) -> Arg {
        Arg {
            p: ops.ptr_mut(b),
            len: b.len(),
        }
    }
}

/// `Err` naming `op` and the argument unless every `(name, len, need)` has `len ≥ need`.
pub(super) fn check_lens(op: &str, args: &[(&str, usize, usize)]) -> Result<()> {
    for &(arg, len, need) in args {
        check_len(op, arg, len, need)?;
    }
    Ok(())
}

/// The lengths an RMSNorm's operands need over `d`: `x` `[N, C]`, `r` `[N]`, `w` `[C]`.
fn check_norm(op: &str, d: Rows, [x, r, w]: [usize; 3]) -> Result<()> {
    check_lens(op, &[("x", x, d.n * d.c), ("r", r, d.n), ("w", w, d.c)])
}

/// The element types of a linear's GEMMs: f32 throughout (in the ops' precision), or bf16
/// storage's bf16 `x`, `w`, `y`, `dx`, `dy` with f32 `dw` and f32 compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum GemmData {
    F32,
    Bf16,
}

/// The column-major GEMM `C[m×n] = op(A)·op(B) + beta·C` (`t`: whether A, B are transposed)
/// of the operands A, B, C (address, leading dimension), f32 until [`CudaOps::gemm_on`] sets
/// its data types.
fn gemm_of(t: [bool; 2], [m, n, k]: [usize; 3], abc: [(u64, usize); 3], beta: f32) -> Gemm {
    let [(a, lda), (b, ldb), (c, ldc)] = abc;
    let (ta, tb) = (t[0], t[1]);
    Gemm {
        ta,
        tb,
        m,
        n,
        k,
        a,
        lda,
        b,
        ldb,
        beta,
        c,
        ldc,
        ..Gemm::F32
    }
}

impl CudaOps {
    /// A gather (`out[i] = x[rows[i]]`, grid N) or, `scattered`, a scatter-add
    /// (`dx[rows[i]] += dy[i]`, i ascending, grid ⌈C/256⌉) of `[dst, src]` through `f`.
    pub(super) fn move_rows(
        &self,
        f: dsys::CUfunction,
        scattered: bool,
        args: [Arg; 2],
        (ids, d): (&DevInts, Rows),
    ) -> Result<()> {
        let (op, grid, names) = match scattered {
            false => ("gather_rows", d.n, ["out", "rows", "the rows of `x`"]),
            true => (
                "scatter_add_rows",
                d.c.div_ceil(256),
                ["dy", "rows", "the rows of `dx`"],
            ),
        };
        self.row_op((op, f, grid as u32), args, (ids, d), names, scattered)
    }

    /// `f(dst, src, ids, n, c)` on grid `(grid, 1, 1)` × 256: row `i` of the `[N, C]` side is
    /// row `ids[i]` of the other. The `[N, C]` side is `dst` (embedding, gather), or `src`
    /// when `dst` is the one indexed (`scattered`: a scatter-add). `names`: the `[N, C]` side's,
    /// the ids' and the indexed side's rows' (for the errors).
    pub(super) fn row_op(
        &self,
        (op, f, grid): (&str, dsys::CUfunction, u32),
        [dst, src]: [Arg; 2],
        (ids, d): (&DevInts, Rows),
        names: [&str; 3],
        scattered: bool,
    ) -> Result<()> {
        let (Rows { n, c }, [dense, ids_name, what]) = (d, names);
        ensure!(c > 0, "{op}: C must be positive");
        let (dense_len, indexed_len) = match scattered {
            true => (src.len, dst.len),
            false => (dst.len, src.len),
        };
        check_len(op, dense, dense_len, n * c)?;
        check_ints(op, ids_name, ids, n, indexed_len / c, what)?;
        if n == 0 {
            return Ok(());
        }
        if scattered && self.tiled.is_some() {
            let f = self.tiled()?.scatter_add_rows;
            let host = ids.host_values(op, ids_name, n)?;
            return self.scatter_tiled(op, f, [dst.p, src.p], host, c);
        }
        let (d, s, i) = (dst.p, src.p, self.ptr(ids));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, f, Geom::new((grid, 1, 1), 256, 0); d, s, i, n_, c_)
    }

    /// `dwte[ids[i]] += dx[i]` through `f` (rows in ascending order; the CSR grouping is built
    /// here from the ids' host copy, no atomics: deterministic). No synchronization: the index
    /// buffers dropped at the end are freed in stream order (cudarc's `free_async`, or a
    /// synchronizing free where the device lacks memory pools).
    pub(super) fn embedding_bwd_rows(
        &self,
        f: dsys::CUfunction,
        [dwte, dx]: [Arg; 2],
        ids: &DevInts,
        d: Rows,
    ) -> Result<()> {
        let op = "embedding_bwd";
        let Rows { n, c } = d;
        check_len(op, "dx", dx.len, n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        check_ints(op, "ids", ids, n, dwte.len / c, "the embedding rows")?;
        if n == 0 {
            return Ok(());
        }
        let host = ids.host_values(op, "ids", n)?;
        if self.tiled.is_some() {
            let f = self.tiled()?.embedding_bwd;
            return self.scatter_tiled(op, f, [dwte.p, dx.p], host, c);
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
        let (dp, xp) = (dwte.p, dx.p);
        let (up, op_, orp) = (self.ptr(&u), self.ptr(&o), self.ptr(&ord));
        let (nu_, c_) = (int(op, "nuniq", nu)?, int(op, "c", c)?);
        launch!(self, op, f, Geom::new((nu as u32, 1, 1), 256, 0); dp, xp, up, op_, orp, nu_, c_)
    }

    /// [`crate::train::ops::rms_norm`] through `f`: `y`, `r` from `x`, `w`.
    pub(super) fn rms_norm_rows(
        &self,
        f: dsys::CUfunction,
        [y, r, x, w]: [Arg; 4],
        d: Rows,
        eps: f32,
    ) -> Result<()> {
        let (op, Rows { n, c }) = ("rms_norm", d);
        check_len(op, "y", y.len, n * c)?;
        check_norm(op, d, [x.len, r.len, w.len])?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (yp, rp, xp, wp) = (y.p, r.p, x.p, w.p);
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, f, Geom::new((n as u32, 1, 1), 256, 0); yp, rp, xp, wp, n_, c_, eps)
    }

    /// [`crate::train::ops::rms_norm_bwd`] through `f` = (the `dx` kernel, the `dw` kernel):
    /// `dx` written, `dw` accumulated, from `dy`, `x`, `r`, `w`.
    pub(super) fn rms_norm_bwd_rows(
        &self,
        f: [dsys::CUfunction; 2],
        (dx, dw): (Arg, Option<Arg>),
        [dy, x, r, w]: [Arg; 4],
        d: Rows,
    ) -> Result<()> {
        let (op, Rows { n, c }) = ("rms_norm_bwd", d);
        check_lens(op, &[("dx", dx.len, n * c), ("dy", dy.len, n * c)])?;
        if let Some(dw) = dw {
            check_len(op, "dw", dw.len, c)?;
        }
        check_norm(op, d, [x.len, r.len, w.len])?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        let (dxp, dyp, xp, rp, wp) = (dx.p, dy.p, x.p, r.p, w.p);
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, f[0], Geom::new((n as u32, 1, 1), 256, 0); dxp, dyp, xp, rp, wp, n_,
            c_)?;
        // A frozen weight (`None`): the `dw` kernel is not launched.
        let Some(dw) = dw else {
            return Ok(());
        };
        let dwp = dw.p;
        if self.tiled.is_some() {
            return self.rms_norm_bwd_dw_tiled([dwp, dyp, xp, rp], n, c);
        }
        launch!(self, op, f[1], Geom::new((c.div_ceil(256) as u32, 1, 1), 256, 0); dwp, dyp, xp,
            rp, n_, c_)
    }

    /// RoPE through `f` in place on `x` `[N, heads·hd]` (`inverse`: the backward rotation),
    /// rows at the positions `pos` of the tables `cos`, `sin` `[max_pos, hd/2]`.
    pub(super) fn rope_rows(
        &self,
        f: dsys::CUfunction,
        x: Arg,
        (pos, cos, sin): (&DevInts, Arg, Arg),
        (n, hd): (usize, usize),
        heads: usize,
        inverse: bool,
    ) -> Result<()> {
        let op = "rope";
        ensure!(
            hd > 0 && hd % 2 == 0,
            "{op}: head dim {hd} must be even and positive"
        );
        check_len(op, "x", x.len, n * heads * hd)?;
        ensure!(
            cos.len == sin.len && cos.len >= hd / 2,
            "{op}: tables `cos` ({}) and `sin` ({}) must be [max_pos, HD/2 = {}]",
            cos.len,
            sin.len,
            hd / 2
        );
        let max_pos = cos.len / (hd / 2);
        check_ints(op, "pos", pos, n, max_pos, "the RoPE tables")?;
        if n == 0 || heads == 0 {
            return Ok(());
        }
        let (xp, cp, sp, pp) = (x.p, cos.p, sin.p, self.ptr(pos));
        let (n_, h_, hd_) = (
            int(op, "n", n)?,
            int(op, "heads", heads)?,
            int(op, "hd", hd)?,
        );
        // +1 rotates, −1 rotates back (the kernel multiplies sin by it: exact either way).
        let sign: f32 = if inverse { -1.0 } else { 1.0 };
        launch!(self, op, f, Geom::new((n as u32, 1, 1), 256, 0); xp, cp, sp, pp, n_, h_, hd_,
            sign)
    }

    /// A grid-stride element-wise kernel `f(args.., numel)` over `len` elements of every
    /// argument (`names` for the errors): swiglu (3 buffers), its backward (5), add (2).
    pub(super) fn elementwise(
        &self,
        (op, f): (&str, dsys::CUfunction),
        args: &[(&str, Arg)],
        len: usize,
    ) -> Result<()> {
        for (name, a) in args {
            check_len(op, name, a.len, len)?;
        }
        if len == 0 {
            return Ok(());
        }
        let (g, numel) = (Geom::new((stride_grid(len), 1, 1), 256, 0), len as i64);
        let p: Vec<u64> = args.iter().map(|(_, a)| a.p).collect();
        match p[..] {
            [a, b] => launch!(self, op, f, g; a, b, numel),
            [a, b, c] => launch!(self, op, f, g; a, b, c, numel),
            [a, b, c, d, e] => launch!(self, op, f, g; a, b, c, d, e, numel),
            _ => bail!("{op}: {} buffers", p.len()),
        }
    }

    /// [`crate::train::ops::attention`] through `f`: `o`, `lse` from `q`, `k`, `v` (or, the
    /// shapes checked, through `tiled`).
    pub(super) fn attention_rows(
        &self,
        f: dsys::CUfunction,
        [o, lse]: [Arg; 2],
        [q, k, v]: [Arg; 3],
        d: AttnShape,
        tiled: Option<impl FnOnce() -> Result<()>>,
    ) -> Result<()> {
        let op = "attention";
        let (n, [b_, t_, nh_, nkv_, hd_]) = Self::attn_checks(op, d)?;
        let AttnShape { b, t, nh, nkv, hd } = d;
        let (qw, kw) = (nh * hd, nkv * hd);
        let lens = [("o", o.len, n * qw), ("lse", lse.len, n * nh)];
        check_lens(op, &lens)?;
        check_lens(
            op,
            &[
                ("q", q.len, n * qw),
                ("k", k.len, n * kw),
                ("v", v.len, n * kw),
            ],
        )?;
        if let Some(tiled) = tiled {
            return tiled();
        }
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem = check_dyn_smem(op, f, (t + hd) * 4, &what)?;
        if n == 0 || nh == 0 {
            return Ok(());
        }
        let (op_, lp, qp, kp, vp) = (o.p, lse.p, q.p, k.p, v.p);
        let g = Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem);
        launch!(self, op, f, g; op_, lp, qp, kp, vp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`crate::train::ops::attention_bwd`] through `f` = (the `dq` kernel, the `dk`/`dv`
    /// kernel): writes `dq`, `dk`, `dv` and the scratch `delta` `[N, NH]` from `dout`, `q`,
    /// `k`, `v`, `o`, `lse` (or, the shapes checked, through `tiled`). With no query heads,
    /// `zero` clears `dk` and `dv`.
    pub(super) fn attention_bwd_rows(
        &self,
        f: [dsys::CUfunction; 2],
        [dq, dk, dv, delta]: [Arg; 4],
        [dout, q, k, v, o, lse]: [Arg; 6],
        d: AttnShape,
        (zero, tiled): (
            impl FnOnce() -> Result<()>,
            Option<impl FnOnce() -> Result<()>>,
        ),
    ) -> Result<()> {
        let op = "attention_bwd";
        let (n, [b_, t_, nh_, nkv_, hd_]) = Self::attn_checks(op, d)?;
        let AttnShape { b, t, nh, nkv, hd } = d;
        let (qw, kw) = (nh * hd, nkv * hd);
        let (nq, nk) = (n * qw, n * kw);
        let lens = [("dq", dq.len, nq), ("dk", dk.len, nk), ("dv", dv.len, nk)];
        check_lens(op, &lens)?;
        let lens = [
            ("delta", delta.len, n * nh),
            ("dout", dout.len, nq),
            ("q", q.len, nq),
        ];
        check_lens(op, &lens)?;
        let lens = [("k", k.len, nk), ("v", v.len, nk), ("o", o.len, nq)];
        check_lens(op, &lens)?;
        check_len(op, "lse", lse.len, n * nh)?;
        if let Some(tiled) = tiled {
            return tiled();
        }
        let what = format!("T = {t}, HD = {hd}");
        self.bind()?;
        let smem_q = check_dyn_smem(op, f[0], (t + 2 * hd) * 4, &what)?;
        let smem_kv = check_dyn_smem(op, f[1], (2 * t + 4 * hd) * 4, &what)?;
        if n == 0 {
            return Ok(());
        }
        if nh == 0 {
            return zero();
        }
        let (dqp, dkp, dvp, dlp) = (dq.p, dk.p, dv.p, delta.p);
        let (dop, opp, lp, qp, kp, vp) = (dout.p, o.p, lse.p, q.p, k.p, v.p);
        let g = Geom::new((t as u32, nh as u32, b as u32), ATT_THREADS, smem_q);
        launch!(self, op, f[0], g; dqp, dlp, dop, qp, kp, vp, opp, lp, b_, t_, nh_, nkv_, hd_)?;
        let g = Geom::new((t as u32, nkv as u32, b as u32), ATT_THREADS, smem_kv);
        launch!(self, op, f[1], g; dkp, dvp, dlp, dop, qp, kp, vp, lp, b_, t_, nh_, nkv_, hd_)
    }

    /// [`crate::train::ops::cross_entropy`] through `f` on the `R` rows of `z` `[R, V]`
    /// (overwritten with the gradient); returns `Σ_r loss_r` summed on the host in f64, in row
    /// order (as the CPU does). `loss` (f32) is scratch `[R]`.
    pub(super) fn cross_entropy_rows(
        &self,
        f: dsys::CUfunction,
        (z, loss): (Arg, &mut Buf),
        (ids, weights): (&DevInts, Arg),
        d: Rows,
    ) -> Result<f64> {
        let (op, Rows { n: r, c: v }) = ("cross_entropy", d);
        let lens = [("z", z.len, r * v), ("loss", loss.len(), r)];
        check_lens(op, &lens)?;
        check_len(op, "weights", weights.len, r)?;
        check_ints(op, "targets", ids, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(0.0);
        }
        let (zp, lp, tp, wp) = (z.p, self.ptr_mut(loss), self.ptr(ids), weights.p);
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        launch!(self, op, f, Geom::new((r as u32, 1, 1), 1024, 0); zp, lp, tp, wp, r_, v_)?;
        let rows = self.download(loss, r)?;
        Ok(rows.iter().map(|&x| x as f64).sum())
    }

    /// `y[N, M] = x[N, K]·wᵀ` ([`crate::train::ops::linear`]) on `data`. Row-major buffers
    /// read column-major are transposes: `yᵀ = W·xᵀ` with `W` stored `[M, K]` = column-major
    /// `K×M`, so `op(A) = Aᵀ` (lda K), `B = xᵀ` (ldb K), ldc M.
    pub(super) fn linear_rows(&self, [y, x, w]: [Arg; 3], d: MatMul, data: GemmData) -> Result<()> {
        let (op, MatMul { n, k, m }) = ("linear", d);
        let lens = [
            ("y", y.len, n * m),
            ("x", x.len, n * k),
            ("w", w.len, m * k),
        ];
        check_lens(op, &lens)?;
        let g = gemm_of(
            [true, false],
            [m, n, k],
            [(w.p, k), (x.p, k), (y.p, m)],
            0.0,
        );
        self.gemm_on(op, g, data, false)
    }

    /// Backward of [`CudaOps::linear_rows`] ([`crate::train::ops::linear_bwd`]) on `data`:
    /// `dx = dy·w` (written, or added when `dx.1`), `dw += dyᵀ·x` (f32). With `K·N > 0 = M`
    /// a written `dx` is cleared by `zero`.
    pub(super) fn linear_bwd_rows(
        &self,
        (dx, dw): (Option<(Arg, bool)>, Option<Arg>),
        [dy, x, w]: [Arg; 3],
        d: MatMul,
        data: GemmData,
        zero: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let op = "linear_bwd";
        let MatMul { n, k, m } = d;
        check_len(op, "dy", dy.len, n * m)?;
        if let Some(dw) = dw {
            check_len(op, "dw", dw.len, m * k)?;
        }
        check_lens(op, &[("x", x.len, n * k), ("w", w.len, m * k)])?;
        if let Some((dx, accumulate)) = dx {
            check_len(op, "dx", dx.len, n * k)?;
            if k > 0 && n > 0 && m == 0 && !accumulate {
                zero()?;
            } else {
                // dxᵀ (K×N) = Wᵀ (col-major K×M, as stored) · dyᵀ (M×N, as stored).
                let beta = if accumulate { 1.0 } else { 0.0 };
                let abc = [(w.p, k), (dy.p, m), (dx.p, k)];
                self.gemm_on(
                    op,
                    gemm_of([false, false], [k, n, m], abc, beta),
                    data,
                    false,
                )?;
            }
        }
        // Nothing for a frozen weight (`None`).
        let Some(dw) = dw.filter(|_| n > 0) else {
            return Ok(());
        };
        // dWᵀ (K×M) += xᵀ (col-major K×N, as stored) · dy (N×M = transpose of the stored M×N).
        let abc = [(x.p, k), (dy.p, m), (dw.p, k)];
        self.gemm_on(op, gemm_of([false, true], [k, m, n], abc, 1.0), data, true)
    }

    /// Run `g` (its operand addresses and shapes set) on `data`: f32 in the ops' precision
    /// ([`CudaOps::gemm`]), or bf16 A/B (`CUDA_R_16BF`, tensor cores, f32 accumulation,
    /// `CUBLAS_COMPUTE_32F`) with a bf16 C, or an f32 C when `f32_c` (weight gradients).
    fn gemm_on(&self, op: &str, g: Gemm, data: GemmData, f32_c: bool) -> Result<()> {
        match data {
            GemmData::F32 => self.gemm(op, g),
            GemmData::Bf16 => {
                self.bind()?;
                let c_data = f32_c.then_some(cudaDataType_t::CUDA_R_32F);
                Gemm {
                    data: cudaDataType_t::CUDA_R_16BF,
                    compute: cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    c_data,
                    ..g
                }
                .run(op, self.be.blas_handle())
                .with_context(|| format!("{op}: bf16 storage GEMM"))
            }
        }
    }
}
