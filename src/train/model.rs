//! Whole-model forward and backward on the host, over the checkpoint's own tensors
//! ([`crate::hf::checkpoint::expected_tensors`]: q/k/v and gate/up are separate here, unlike the
//! merged inference weights of [`crate::engine::model`]).
//!
//! The forward pass is reference §2.2 in plain f32 (or f64 for gradient checks) without a
//! padding mask (upstream training passes none); the LM head and the cross-entropy run only on
//! the rows a [`Batch`] asks for (the masked tokens), each with its own loss weight, so every
//! loss of [`super::loss`] is `Σ_r weight[r]·CE(logits[rows[r]], targets[r])`.

use anyhow::{ensure, Context, Result};

use super::ops::{self, AttnShape, Real};
use crate::backend::rope_tables;
use crate::hf::checkpoint::{expected_tensors, Checkpoint};
use crate::hf::config::ModelConfig;

/// Every parameter (or gradient, or optimizer moment) of a model, one flat vector per
/// checkpoint tensor, in the order of [`expected_tensors`].
#[derive(Clone, Debug)]
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

    fn lm_head(&self) -> usize {
        self.data.len() - 1
    }
    fn ln_f(&self) -> usize {
        self.data.len() - 2
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
struct Saved<T> {
    x_in: Vec<T>,
    r1: Vec<T>,
    h1: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    lse: Vec<T>,
    a: Vec<T>,
    x_mid: Vec<T>,
    r2: Vec<T>,
    h2: Vec<T>,
    g: Vec<T>,
    u: Vec<T>,
    m: Vec<T>,
}

/// Loss of `batch` under `p`, with the gradient of every parameter **added** to `grad`
/// (so micro-batches accumulate). Returns the loss `Σ_r weight[r]·CE_r` in f64.
pub fn forward_backward<T: Real>(
    cfg: &ModelConfig,
    p: &Params<T>,
    batch: &Batch,
    grad: &mut Params<T>,
) -> Result<f64> {
    batch.validate(cfg)?;
    ensure!(
        p.data.len() == 3 + 9 * cfg.n_layers && grad.data.len() == p.data.len(),
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
    let eps = cfg.rms_norm_eps as f64;
    let dims = AttnShape { b, t, nh, nkv, hd };
    let (cos, sin) = rope_tables(cfg.rope_theta, hd, t.max(1));
    let pos: Vec<usize> = (0..n).map(|i| i % t).collect();
    let zeros = |len: usize| vec![T::zero(); len];

    // ---- forward ----
    let mut x = zeros(n * c);
    ops::embedding(&mut x, &p.data[I_WTE], &batch.ids, c);
    let mut saved: Vec<Saved<T>> = Vec::with_capacity(cfg.n_layers);
    let mut tmp_c = zeros(n * c);
    for l in 0..cfg.n_layers {
        let w = |part: usize| &p.data[i_block(l, part)];
        let mut s = Saved {
            x_in: x.clone(),
            r1: zeros(n),
            h1: zeros(n * c),
            q: zeros(n * qw),
            k: zeros(n * kw),
            v: zeros(n * kw),
            lse: zeros(n * nh),
            a: zeros(n * qw),
            x_mid: Vec::new(),
            r2: zeros(n),
            h2: zeros(n * c),
            g: zeros(n * f),
            u: zeros(n * f),
            m: zeros(n * f),
        };
        ops::rms_norm(&mut s.h1, &mut s.r1, &x, w(ATTN_NORM), n, c, eps);
        ops::linear(&mut s.q, &s.h1, w(Q), n, c, qw);
        ops::linear(&mut s.k, &s.h1, w(K), n, c, kw);
        ops::linear(&mut s.v, &s.h1, w(V), n, c, kw);
        ops::rope(&mut s.q, &pos, &cos, &sin, n, nh, hd, false);
        ops::rope(&mut s.k, &pos, &cos, &sin, n, nkv, hd, false);
        ops::attention(&mut s.a, &mut s.lse, &s.q, &s.k, &s.v, dims);
        ops::linear(&mut tmp_c, &s.a, w(ATTN_OUT), n, qw, c);
        for (xv, &d) in x.iter_mut().zip(&tmp_c) {
            *xv += d;
        }
        s.x_mid = x.clone();
        ops::rms_norm(&mut s.h2, &mut s.r2, &x, w(FF_NORM), n, c, eps);
        ops::linear(&mut s.g, &s.h2, w(GATE), n, c, f);
        ops::linear(&mut s.u, &s.h2, w(UP), n, c, f);
        ops::swiglu(&mut s.m, &s.g, &s.u);
        ops::linear(&mut tmp_c, &s.m, w(DOWN), n, f, c);
        for (xv, &d) in x.iter_mut().zip(&tmp_c) {
            *xv += d;
        }
        saved.push(s);
    }
    let r = batch.rows.len();
    let mut xr = zeros(r * c);
    for (i, &row) in batch.rows.iter().enumerate() {
        let row = row as usize;
        xr[i * c..(i + 1) * c].copy_from_slice(&x[row * c..(row + 1) * c]);
    }
    let mut rf = zeros(r);
    let mut hf = zeros(r * c);
    ops::rms_norm(&mut hf, &mut rf, &xr, &p.data[p.ln_f()], r, c, eps);
    let mut logits = zeros(r * v);
    ops::linear(&mut logits, &hf, &p.data[p.lm_head()], r, c, v);
    let weights: Vec<T> = batch.weights.iter().map(|&w| T::from_f64(w)).collect();
    let loss = ops::cross_entropy(&mut logits, &batch.targets, &weights, v);

    // ---- backward ----
    let (i_lm, i_lnf) = (p.lm_head(), p.ln_f());
    let mut dhf = zeros(r * c);
    ops::linear_bwd(
        Some(&mut dhf),
        &mut grad.data[i_lm],
        &logits,
        &hf,
        &p.data[i_lm],
        r,
        c,
        v,
    );
    let mut dxr = zeros(r * c);
    ops::rms_norm_bwd(
        &mut dxr,
        &mut grad.data[i_lnf],
        &dhf,
        &xr,
        &rf,
        &p.data[i_lnf],
        r,
        c,
    );
    let mut dx = zeros(n * c);
    for (i, &row) in batch.rows.iter().enumerate() {
        let row = row as usize;
        for (o, &g) in dx[row * c..(row + 1) * c]
            .iter_mut()
            .zip(&dxr[i * c..(i + 1) * c])
        {
            *o += g;
        }
    }
    let mut dm = zeros(n * f);
    let mut dg = zeros(n * f);
    let mut du = zeros(n * f);
    let mut dh = zeros(n * c);
    let mut dh_b = zeros(n * c);
    let mut da = zeros(n * qw);
    let mut dq = zeros(n * qw);
    let mut dk = zeros(n * kw);
    let mut dv = zeros(n * kw);
    for l in (0..cfg.n_layers).rev() {
        let s = &saved[l];
        let gi = |part: usize| i_block(l, part);
        let w = |part: usize| &p.data[i_block(l, part)];
        // x_out = x_mid + m·W_downᵀ
        ops::linear_bwd(
            Some(&mut dm),
            &mut grad.data[gi(DOWN)],
            &dx,
            &s.m,
            w(DOWN),
            n,
            f,
            c,
        );
        ops::swiglu_bwd(&mut dg, &mut du, &dm, &s.g, &s.u);
        ops::linear_bwd(
            Some(&mut dh),
            &mut grad.data[gi(GATE)],
            &dg,
            &s.h2,
            w(GATE),
            n,
            c,
            f,
        );
        ops::linear_bwd(
            Some(&mut dh_b),
            &mut grad.data[gi(UP)],
            &du,
            &s.h2,
            w(UP),
            n,
            c,
            f,
        );
        for (a, &bv) in dh.iter_mut().zip(&dh_b) {
            *a += bv;
        }
        ops::rms_norm_bwd(
            &mut tmp_c,
            &mut grad.data[gi(FF_NORM)],
            &dh,
            &s.x_mid,
            &s.r2,
            w(FF_NORM),
            n,
            c,
        );
        for (a, &bv) in dx.iter_mut().zip(&tmp_c) {
            *a += bv;
        }
        // x_mid = x_in + a·W_oᵀ
        ops::linear_bwd(
            Some(&mut da),
            &mut grad.data[gi(ATTN_OUT)],
            &dx,
            &s.a,
            w(ATTN_OUT),
            n,
            qw,
            c,
        );
        ops::attention_bwd(
            &mut dq, &mut dk, &mut dv, &da, &s.q, &s.k, &s.v, &s.a, &s.lse, dims,
        );
        ops::rope(&mut dq, &pos, &cos, &sin, n, nh, hd, true);
        ops::rope(&mut dk, &pos, &cos, &sin, n, nkv, hd, true);
        ops::linear_bwd(
            Some(&mut dh),
            &mut grad.data[gi(Q)],
            &dq,
            &s.h1,
            w(Q),
            n,
            c,
            qw,
        );
        for (part, d) in [(K, &dk), (V, &dv)] {
            ops::linear_bwd(
                Some(&mut dh_b),
                &mut grad.data[gi(part)],
                d,
                &s.h1,
                w(part),
                n,
                c,
                kw,
            );
            for (a, &bv) in dh.iter_mut().zip(&dh_b) {
                *a += bv;
            }
        }
        ops::rms_norm_bwd(
            &mut tmp_c,
            &mut grad.data[gi(ATTN_NORM)],
            &dh,
            &s.x_in,
            &s.r1,
            w(ATTN_NORM),
            n,
            c,
        );
        for (a, &bv) in dx.iter_mut().zip(&tmp_c) {
            *a += bv;
        }
    }
    ops::embedding_bwd(&mut grad.data[I_WTE], &dx, &batch.ids, c);
    Ok(loss)
}
