//! [`DeviceParams`] and [`forward_backward`]: the whole model on the device, the same math and
//! order as [`crate::train::model::forward_backward`].

use super::*;

/// Every parameter (or gradient, or moment) of a model on the device, in the order of
/// [`Params`].
pub struct DeviceParams {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Buf>,
}

impl DeviceParams {
    pub fn upload(ops: &CudaOps, p: &Params<f32>) -> Result<DeviceParams> {
        let data = p
            .data
            .iter()
            .zip(&p.names)
            .map(|(d, n)| ops.upload(d).with_context(|| format!("uploading `{n}`")))
            .collect::<Result<Vec<_>>>()?;
        Ok(DeviceParams {
            names: p.names.clone(),
            shapes: p.shapes.clone(),
            data,
        })
    }

    /// Copy every tensor back into `p` (same layout).
    pub fn download_into(&self, ops: &CudaOps, p: &mut Params<f32>) -> Result<()> {
        ensure!(
            p.data.len() == self.data.len(),
            "download: {} tensors on the device, {} on the host",
            self.data.len(),
            p.data.len()
        );
        for (i, d) in p.data.iter_mut().enumerate() {
            *d = ops.download(&self.data[i], d.len())?;
        }
        Ok(())
    }

    pub fn download(&self, ops: &CudaOps) -> Result<Params<f32>> {
        let mut p = Params {
            names: self.names.clone(),
            shapes: self.shapes.clone(),
            data: self
                .shapes
                .iter()
                .map(|s| vec![0f32; s.iter().product()])
                .collect(),
        };
        self.download_into(ops, &mut p)?;
        Ok(p)
    }

    pub fn fill_zero(&mut self, ops: &CudaOps) -> Result<()> {
        for d in &mut self.data {
            ops.zero_fill(d)?;
        }
        Ok(())
    }

    pub(super) fn lm_head(&self) -> usize {
        self.data.len() - 1
    }
    pub(super) fn ln_f(&self) -> usize {
        self.data.len() - 2
    }
}

pub(super) const ATTN_NORM: usize = 0;
pub(super) const Q: usize = 1;
pub(super) const K: usize = 2;
pub(super) const V: usize = 3;
pub(super) const ATTN_OUT: usize = 4;
pub(super) const FF_NORM: usize = 5;
pub(super) const GATE: usize = 6;
pub(super) const UP: usize = 7;
pub(super) const DOWN: usize = 8;

/// What one layer's forward pass keeps for the backward pass (as in `model.rs`).
pub(super) struct Saved {
    x_in: Buf,
    r1: Buf,
    h1: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    lse: Buf,
    a: Buf,
    x_mid: Buf,
    r2: Buf,
    h2: Buf,
    g: Buf,
    u: Buf,
    m: Buf,
}

pub(super) fn copy(ops: &CudaOps, dst: &mut Buf, src: &Buf) -> Result<()> {
    ops.bind()?;
    ops.be
        .stream()
        .memcpy_dtod(src, dst)
        .map_err(|e| driver_err("device copy".into(), e))
}

/// Loss of `batch` under `p` on the GPU, with every parameter's gradient **added** to `grad`:
/// [`crate::train::model::forward_backward`] step by step (same ops, same order), f32 throughout.
/// Activation buffers are allocated per call (stream-ordered) and freed at the end.
pub fn forward_backward(
    ops: &CudaOps,
    cfg: &ModelConfig,
    p: &DeviceParams,
    batch: &Batch,
    grad: &mut DeviceParams,
) -> Result<f64> {
    batch.validate(cfg)?;
    ensure!(
        p.data.len() == 3 + 9 * cfg.n_layers && grad.data.len() == p.data.len(),
        "forward_backward (cuda): parameter sets do not match the config's {} layers",
        cfg.n_layers
    );
    let (b, t) = (batch.b, batch.t);
    let n = b * t;
    let (c, nh, nkv, hd, f, v) = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim(),
        cfg.mlp_hidden_size,
        cfg.embedding_size,
    );
    let (qw, kw) = (nh * hd, nkv * hd);
    let eps = cfg.rms_norm_eps;
    let dims = AttnShape { b, t, nh, nkv, hd };
    let (cos_h, sin_h) = rope_tables(cfg.rope_theta, hd, t.max(1));
    let (cos, sin) = (ops.upload(&cos_h)?, ops.upload(&sin_h)?);
    let pos: Vec<i32> = (0..n).map(|i| (i % t.max(1)) as i32).collect();
    let pos = ops.upload_ints(&pos)?;
    let ids: Vec<i32> = batch.ids.iter().map(|&x| x as i32).collect();
    let ids_d = ops.upload_ints(&ids)?;
    let z = |len: usize| ops.zeros(len);

    // ---- forward ----
    let mut x = z(n * c)?;
    ops.embedding(&mut x, &p.data[I_WTE], &ids_d, n, c)?;
    let mut saved: Vec<Saved> = Vec::with_capacity(cfg.n_layers);
    let mut tmp_c = z(n * c)?;
    for l in 0..cfg.n_layers {
        let w = |part: usize| &p.data[i_block(l, part)];
        let mut s = Saved {
            x_in: z(n * c)?,
            r1: z(n)?,
            h1: z(n * c)?,
            q: z(n * qw)?,
            k: z(n * kw)?,
            v: z(n * kw)?,
            lse: z(n * nh)?,
            a: z(n * qw)?,
            x_mid: z(n * c)?,
            r2: z(n)?,
            h2: z(n * c)?,
            g: z(n * f)?,
            u: z(n * f)?,
            m: z(n * f)?,
        };
        copy(ops, &mut s.x_in, &x)?;
        ops.rms_norm(&mut s.h1, &mut s.r1, &x, w(ATTN_NORM), n, c, eps)?;
        ops.linear(&mut s.q, &s.h1, w(Q), n, c, qw)?;
        ops.linear(&mut s.k, &s.h1, w(K), n, c, kw)?;
        ops.linear(&mut s.v, &s.h1, w(V), n, c, kw)?;
        ops.rope(&mut s.q, &pos, &cos, &sin, n, nh, hd, false)?;
        ops.rope(&mut s.k, &pos, &cos, &sin, n, nkv, hd, false)?;
        ops.attention(&mut s.a, &mut s.lse, &s.q, &s.k, &s.v, dims)?;
        ops.linear(&mut tmp_c, &s.a, w(ATTN_OUT), n, qw, c)?;
        ops.add(&mut x, &tmp_c, n * c)?;
        copy(ops, &mut s.x_mid, &x)?;
        ops.rms_norm(&mut s.h2, &mut s.r2, &x, w(FF_NORM), n, c, eps)?;
        ops.linear(&mut s.g, &s.h2, w(GATE), n, c, f)?;
        ops.linear(&mut s.u, &s.h2, w(UP), n, c, f)?;
        ops.swiglu(&mut s.m, &s.g, &s.u, n * f)?;
        ops.linear(&mut tmp_c, &s.m, w(DOWN), n, f, c)?;
        ops.add(&mut x, &tmp_c, n * c)?;
        saved.push(s);
    }
    let r = batch.rows.len();
    let rows: Vec<i32> = batch.rows.iter().map(|&x| x as i32).collect();
    let rows_d = ops.upload_ints(&rows)?;
    let mut xr = z(r * c)?;
    ops.gather_rows(&mut xr, &x, &rows_d, r, c)?;
    let mut rf = z(r)?;
    let mut hf = z(r * c)?;
    let (i_lm, i_lnf) = (p.lm_head(), p.ln_f());
    ops.rms_norm(&mut hf, &mut rf, &xr, &p.data[i_lnf], r, c, eps)?;
    let mut logits = z(r * v)?;
    ops.linear(&mut logits, &hf, &p.data[i_lm], r, c, v)?;
    let weights: Vec<f32> = batch.weights.iter().map(|&w| w as f32).collect();
    let weights_d = ops.upload(&weights)?;
    let tg: Vec<i32> = batch.targets.iter().map(|&x| x as i32).collect();
    let tg_d = ops.upload_ints(&tg)?;
    let mut loss_rows = z(r)?;
    let loss = ops.cross_entropy(&mut logits, &mut loss_rows, &tg_d, &weights_d, r, v)?;

    // ---- backward ----
    let mut dhf = z(r * c)?;
    ops.linear_bwd(
        Some(&mut dhf),
        false,
        &mut grad.data[i_lm],
        &logits,
        &hf,
        &p.data[i_lm],
        r,
        c,
        v,
    )?;
    let mut dxr = z(r * c)?;
    ops.rms_norm_bwd(
        &mut dxr,
        &mut grad.data[i_lnf],
        &dhf,
        &xr,
        &rf,
        &p.data[i_lnf],
        r,
        c,
    )?;
    let mut dx = z(n * c)?;
    ops.scatter_add_rows(&mut dx, &dxr, &rows_d, r, c)?;
    let mut dm = z(n * f)?;
    let mut dg = z(n * f)?;
    let mut du = z(n * f)?;
    let mut dh = z(n * c)?;
    let mut da = z(n * qw)?;
    let mut dq = z(n * qw)?;
    let mut dk = z(n * kw)?;
    let mut dv = z(n * kw)?;
    let mut delta = z(n * nh)?;
    for l in (0..cfg.n_layers).rev() {
        let s = &saved[l];
        let gi = |part: usize| i_block(l, part);
        let w = |part: usize| &p.data[i_block(l, part)];
        // x_out = x_mid + m·W_downᵀ
        ops.linear_bwd(
            Some(&mut dm),
            false,
            &mut grad.data[gi(DOWN)],
            &dx,
            &s.m,
            w(DOWN),
            n,
            f,
            c,
        )?;
        ops.swiglu_bwd(&mut dg, &mut du, &dm, &s.g, &s.u, n * f)?;
        ops.linear_bwd(
            Some(&mut dh),
            false,
            &mut grad.data[gi(GATE)],
            &dg,
            &s.h2,
            w(GATE),
            n,
            c,
            f,
        )?;
        ops.linear_bwd(
            Some(&mut dh),
            true,
            &mut grad.data[gi(UP)],
            &du,
            &s.h2,
            w(UP),
            n,
            c,
            f,
        )?;
        ops.rms_norm_bwd(
            &mut tmp_c,
            &mut grad.data[gi(FF_NORM)],
            &dh,
            &s.x_mid,
            &s.r2,
            w(FF_NORM),
            n,
            c,
        )?;
        ops.add(&mut dx, &tmp_c, n * c)?;
        // x_mid = x_in + a·W_oᵀ
        ops.linear_bwd(
            Some(&mut da),
            false,
            &mut grad.data[gi(ATTN_OUT)],
            &dx,
            &s.a,
            w(ATTN_OUT),
            n,
            qw,
            c,
        )?;
        ops.attention_bwd(
            &mut dq, &mut dk, &mut dv, &mut delta, &da, &s.q, &s.k, &s.v, &s.a, &s.lse, dims,
        )?;
        ops.rope(&mut dq, &pos, &cos, &sin, n, nh, hd, true)?;
        ops.rope(&mut dk, &pos, &cos, &sin, n, nkv, hd, true)?;
        ops.linear_bwd(
            Some(&mut dh),
            false,
            &mut grad.data[gi(Q)],
            &dq,
            &s.h1,
            w(Q),
            n,
            c,
            qw,
        )?;
        ops.linear_bwd(
            Some(&mut dh),
            true,
            &mut grad.data[gi(K)],
            &dk,
            &s.h1,
            w(K),
            n,
            c,
            kw,
        )?;
        ops.linear_bwd(
            Some(&mut dh),
            true,
            &mut grad.data[gi(V)],
            &dv,
            &s.h1,
            w(V),
            n,
            c,
            kw,
        )?;
        ops.rms_norm_bwd(
            &mut tmp_c,
            &mut grad.data[gi(ATTN_NORM)],
            &dh,
            &s.x_in,
            &s.r1,
            w(ATTN_NORM),
            n,
            c,
        )?;
        ops.add(&mut dx, &tmp_c, n * c)?;
    }
    ops.embedding_bwd(&mut grad.data[I_WTE], &dx, &batch.ids, c)?;
    // Every buffer above is freed on return: make sure the work using them is done (and
    // surface a kernel fault here, naming the step).
    ops.sync().context("the GPU forward/backward pass")?;
    Ok(loss)
}
