//! Whole-model forward and backward on the host, over the checkpoint's own tensors
//! ([`crate::hf::checkpoint::expected_tensors`]: q/k/v and gate/up are separate here, unlike the
//! merged inference weights of [`crate::engine::model`]).
//!
//! The forward pass is reference §2.2 in plain f32 (or f64 for gradient checks) without a
//! padding mask (upstream training passes none); the LM head and the cross-entropy run only on
//! the rows a [`Batch`] asks for (the masked tokens), each with its own loss weight, so every
//! loss of [`super::loss`] is `Σ_r weight[r]·CE(logits[rows[r]], targets[r])`.

use anyhow::{ensure, Context, Result};

use super::backend::{HostOps, TrainOps};
use super::ops::{AttnShape, Real};
use crate::backend::rope_tables;
use crate::hf::checkpoint::{expected_tensors, Checkpoint};
use crate::hf::config::ModelConfig;

/// Every parameter (or gradient, or optimizer moment) of a model, one flat vector per
/// checkpoint tensor, in the order of [`expected_tensors`].
#[derive(Clone, Debug, Default)]
pub struct Params<T> {
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub data: Vec<Vec<T>>,
}

/// Index of `wte` in [`Params::data`].
pub const I_WTE: usize = 0;
/// Index of per-block tensor `part` (0..9, order of [`crate::hf::checkpoint::BLOCK_PARTS`]) of
/// layer `l`.
pub fn i_block(l: usize, part: usize) -> usize {
    1 + 9 * l + part
}
const ATTN_NORM: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const ATTN_OUT: usize = 4;
const FF_NORM: usize = 5;
const GATE: usize = 6;
const UP: usize = 7;
const DOWN: usize = 8;

impl<T: Real> Params<T> {
    /// All zeros, shaped for `cfg`.
    pub fn zeros(cfg: &ModelConfig) -> Params<T> {
        let (names, shapes): (Vec<_>, Vec<_>) = expected_tensors(cfg).into_iter().unzip();
        let data = shapes
            .iter()
            .map(|s| vec![T::zero(); s.iter().product()])
            .collect();
        Params {
            names,
            shapes,
            data,
        }
    }

    /// Decode every tensor of `ck` (any stored dtype) to `T`.
    pub fn from_checkpoint(cfg: &ModelConfig, ck: &Checkpoint) -> Result<Params<T>> {
        let mut p = Params::zeros(cfg);
        for (i, name) in p.names.iter().enumerate() {
            let src = ck.get(name)?;
            ensure!(
                src.shape() == p.shapes[i].as_slice(),
                "tensor `{name}` has shape {:?}, the config implies {:?}",
                src.shape(),
                p.shapes[i]
            );
            let vals = ck
                .read_f32(name)
                .with_context(|| format!("reading `{name}`"))?;
            p.data[i] = vals.into_iter().map(|x| T::from_f64(x as f64)).collect();
        }
        Ok(p)
    }

    pub fn fill_zero(&mut self) {
        for d in &mut self.data {
            d.fill(T::zero());
        }
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// One (micro-)batch for [`forward_backward`]: model input ids (masked tokens already replaced
/// by the mask id), and the rows the loss reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// `[b, t]` row-major.
    pub ids: Vec<u32>,
    pub b: usize,
    pub t: usize,
    /// Flat token indices `b_i·t + pos` of the loss rows.
    pub rows: Vec<u32>,
    /// Clean token id to predict at each loss row.
    pub targets: Vec<u32>,
    /// Loss weight of each row (`1/(p·normaliser)`, see [`super::loss`]).
    pub weights: Vec<f64>,
}

impl Batch {
    /// Check the batch against the model's shape; errors name the field.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let n = self.b * self.t;
        ensure!(
            self.ids.len() == n,
            "batch: `ids` holds {} tokens, expected b·t = {}·{}",
            self.ids.len(),
            self.b,
            self.t
        );
        ensure!(
            self.t <= cfg.max_sequence_length,
            "batch: sequence length {} exceeds max_sequence_length {}",
            self.t,
            cfg.max_sequence_length
        );
        ensure!(
            self.rows.len() == self.targets.len() && self.rows.len() == self.weights.len(),
            "batch: rows ({}), targets ({}) and weights ({}) differ in length",
            self.rows.len(),
            self.targets.len(),
            self.weights.len()
        );
        let v = cfg.embedding_size;
        if let Some((i, &id)) = self.ids.iter().enumerate().find(|(_, &x)| x as usize >= v) {
            anyhow::bail!("batch: ids[{i}] = {id} is outside the {v} embedding rows");
        }
        if let Some((i, &r)) = self.rows.iter().enumerate().find(|(_, &x)| x as usize >= n) {
            anyhow::bail!("batch: rows[{i}] = {r} is outside the {n} tokens");
        }
        if let Some((i, &x)) = self
            .targets
            .iter()
            .enumerate()
            .find(|(_, &x)| x as usize >= v)
        {
            anyhow::bail!("batch: targets[{i}] = {x} is outside the {v} LM-head rows");
        }
        Ok(())
    }
}

/// What one layer's forward pass keeps for the backward pass.
struct Saved<B> {
    x_in: B,
    r1: B,
    h1: B,
    q: B,
    k: B,
    v: B,
    lse: B,
    a: B,
    x_mid: B,
    r2: B,
    h2: B,
    g: B,
    u: B,
    m: B,
}

/// Loss of `batch` under `p` on the host, with the gradient of every parameter **added** to
/// `grad` (so micro-batches accumulate): [`forward_backward_on`] over [`HostOps`]. Returns the
/// loss `Σ_r weight[r]·CE_r` in f64.
pub fn forward_backward<T: Real>(
    cfg: &ModelConfig,
    p: &Params<T>,
    batch: &Batch,
    grad: &mut Params<T>,
) -> Result<f64> {
    forward_backward_on(&HostOps::<T>::new(), cfg, &p.data, batch, &mut grad.data)
}

/// The model's forward and backward pass over any [`TrainOps`]: loss of `batch` under the
/// parameters `p` (the tensors of [`Params`], in its order), with every parameter's gradient
/// **added** to `grad`. Activation buffers live for the call.
pub fn forward_backward_on<B: TrainOps>(
    ops: &B,
    cfg: &ModelConfig,
    p: &[B::Buf],
    batch: &Batch,
    grad: &mut [B::Buf],
) -> Result<f64> {
    batch.validate(cfg)?;
    ensure!(
        p.len() == 3 + 9 * cfg.n_layers && grad.len() == p.len(),
        "forward_backward: parameter sets do not match the config's {} layers",
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
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (cos_h, sin_h) = rope_tables(cfg.rope_theta, hd, t.max(1));
    let (cos, sin) = (
        ops.upload_f64(&f64s(&cos_h))?,
        ops.upload_f64(&f64s(&sin_h))?,
    );
    let pos: Vec<u32> = (0..n).map(|i| (i % t.max(1)) as u32).collect();
    let pos = ops.ints(&pos)?;
    let ids = ops.ints(&batch.ids)?;
    let z = |len: usize| ops.zeros(len);

    // ---- forward ----
    let mut x = z(n * c)?;
    ops.embedding(&mut x, &p[I_WTE], &ids, n, c)?;
    let mut saved: Vec<Saved<B::Buf>> = Vec::with_capacity(cfg.n_layers);
    let mut tmp_c = z(n * c)?;
    for l in 0..cfg.n_layers {
        let w = |part: usize| &p[i_block(l, part)];
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
        ops.copy(&mut s.x_in, &x)?;
        ops.rms_norm(&mut s.h1, &mut s.r1, &x, w(ATTN_NORM), n, c, eps)?;
        ops.linear(&mut s.q, &s.h1, w(Q), n, c, qw)?;
        ops.linear(&mut s.k, &s.h1, w(K), n, c, kw)?;
        ops.linear(&mut s.v, &s.h1, w(V), n, c, kw)?;
        ops.rope(&mut s.q, &pos, &cos, &sin, n, nh, hd, false)?;
        ops.rope(&mut s.k, &pos, &cos, &sin, n, nkv, hd, false)?;
        ops.attention(&mut s.a, &mut s.lse, &s.q, &s.k, &s.v, dims)?;
        ops.linear(&mut tmp_c, &s.a, w(ATTN_OUT), n, qw, c)?;
        ops.add(&mut x, &tmp_c, n * c)?;
        ops.copy(&mut s.x_mid, &x)?;
        ops.rms_norm(&mut s.h2, &mut s.r2, &x, w(FF_NORM), n, c, eps)?;
        ops.linear(&mut s.g, &s.h2, w(GATE), n, c, f)?;
        ops.linear(&mut s.u, &s.h2, w(UP), n, c, f)?;
        ops.swiglu(&mut s.m, &s.g, &s.u, n * f)?;
        ops.linear(&mut tmp_c, &s.m, w(DOWN), n, f, c)?;
        ops.add(&mut x, &tmp_c, n * c)?;
        saved.push(s);
    }
    let r = batch.rows.len();
    let rows = ops.ints(&batch.rows)?;
    let mut xr = z(r * c)?;
    ops.gather_rows(&mut xr, &x, &rows, r, c)?;
    let mut rf = z(r)?;
    let mut hf = z(r * c)?;
    let (i_lm, i_lnf) = (p.len() - 1, p.len() - 2);
    ops.rms_norm(&mut hf, &mut rf, &xr, &p[i_lnf], r, c, eps)?;
    let mut logits = z(r * v)?;
    ops.linear(&mut logits, &hf, &p[i_lm], r, c, v)?;
    let weights = ops.upload_f64(&batch.weights)?;
    let targets = ops.ints(&batch.targets)?;
    let mut loss_rows = z(r)?;
    let loss = ops.cross_entropy(&mut logits, &mut loss_rows, &targets, &weights, r, v)?;

    // ---- backward ----
    let mut dhf = z(r * c)?;
    let (gl, gp) = (&mut grad[i_lm], &p[i_lm]);
    ops.linear_bwd(Some(&mut dhf), false, gl, &logits, &hf, gp, r, c, v)?;
    let mut dxr = z(r * c)?;
    let (gn, pn) = (&mut grad[i_lnf], &p[i_lnf]);
    ops.rms_norm_bwd(&mut dxr, gn, &dhf, &xr, &rf, pn, r, c)?;
    let mut dx = z(n * c)?;
    ops.scatter_add_rows(&mut dx, &dxr, &rows, r, c)?;
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
        let w = |part: usize| &p[i_block(l, part)];
        let gi = |part: usize| i_block(l, part);
        // x_out = x_mid + m·W_downᵀ
        ops.linear_bwd(
            Some(&mut dm),
            false,
            &mut grad[gi(DOWN)],
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
            &mut grad[gi(GATE)],
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
            &mut grad[gi(UP)],
            &du,
            &s.h2,
            w(UP),
            n,
            c,
            f,
        )?;
        let gn = &mut grad[gi(FF_NORM)];
        ops.rms_norm_bwd(&mut tmp_c, gn, &dh, &s.x_mid, &s.r2, w(FF_NORM), n, c)?;
        ops.add(&mut dx, &tmp_c, n * c)?;
        // x_mid = x_in + a·W_oᵀ
        let go = &mut grad[gi(ATTN_OUT)];
        ops.linear_bwd(Some(&mut da), false, go, &dx, &s.a, w(ATTN_OUT), n, qw, c)?;
        let (sq, sk, sv) = (&s.q, &s.k, &s.v);
        ops.attention_bwd(
            &mut dq, &mut dk, &mut dv, &mut delta, &da, sq, sk, sv, &s.a, &s.lse, dims,
        )?;
        ops.rope(&mut dq, &pos, &cos, &sin, n, nh, hd, true)?;
        ops.rope(&mut dk, &pos, &cos, &sin, n, nkv, hd, true)?;
        ops.linear_bwd(
            Some(&mut dh),
            false,
            &mut grad[gi(Q)],
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
            &mut grad[gi(K)],
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
            &mut grad[gi(V)],
            &dv,
            &s.h1,
            w(V),
            n,
            c,
            kw,
        )?;
        let gn = &mut grad[gi(ATTN_NORM)];
        ops.rms_norm_bwd(&mut tmp_c, gn, &dh, &s.x_in, &s.r1, w(ATTN_NORM), n, c)?;
        ops.add(&mut dx, &tmp_c, n * c)?;
    }
    ops.embedding_bwd(&mut grad[I_WTE], &dx, &batch.ids, c)?;
    // The activation buffers are freed on return: make sure the work using them is done (a
    // device surfaces a kernel fault here, naming the step).
    ops.finish("the forward/backward pass")?;
    Ok(loss)
}
