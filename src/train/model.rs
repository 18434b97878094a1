//! Whole-model forward and backward on the host, over the checkpoint's own tensors
//! ([`crate::hf::checkpoint::expected_tensors`]: q/k/v and gate/up are separate here, unlike the
//! merged inference weights of [`crate::engine::model`]).
//!
//! The forward pass is reference §2.2 in plain f32 (or f64 for gradient checks) without a
//! padding mask (upstream training passes none); the LM head and the cross-entropy run only on
//! the rows a [`Batch`] asks for (the masked tokens), each with its own loss weight, so every
//! loss of [`super::loss`] is `Σ_r weight[r]·CE(logits[rows[r]], targets[r])`.
//!
//! [`forward_backward_with`] keeps every layer's activations for the backward pass, or, with
//! [`PassOptions::recompute`], only every layer's input, recomputing a layer's activations
//! just before its backward (bit-identical results); [`PassStats::activation_floats`] counts
//! what it held and [`activation_floats`] gives the same number from the shapes.

use std::cell::Cell;

use anyhow::{ensure, Context, Result};

use super::backend::{
    AttnGrad, Dx, HostOps, LinearGrad, MatMul, Norm, NormGrad, Qkv, QkvGrads, Rope, RowIds, Rows,
    SwigluGrad, Targets, TrainOps,
};
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

/// How [`forward_backward_with`] keeps the activations between its forward and backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassOptions {
    /// Per-layer activation recomputation: the forward pass keeps only each layer's input; the
    /// backward pass recomputes a layer's activations from it, into one layer's buffers, just
    /// before that layer's backward. The same ops in the same order on the same inputs, so the
    /// loss and gradients equal (bit for bit) those of keeping everything; it costs one more
    /// forward pass of the blocks, less their down projections.
    pub recompute: bool,
    /// The model's own parameters are frozen (a LoRA run: only an adapter inside the ops'
    /// linears trains): no weight gradient is computed for them on any backend (no linear
    /// `dw`, no RMSNorm `dw`, no embedding gradient), and `grad` may be empty. The input
    /// gradients, so an adapter's gradients, are the same bits either way.
    pub frozen_base: bool,
}

impl PassOptions {
    /// The options with [`PassOptions::recompute`] set to `recompute`.
    pub const fn recomputing(recompute: bool) -> PassOptions {
        PassOptions {
            recompute,
            frozen_base: false,
        }
    }

    /// These options with the base frozen ([`PassOptions::frozen_base`]).
    pub fn frozen(self) -> PassOptions {
        PassOptions {
            frozen_base: true,
            ..self
        }
    }
}

/// What one pass computed and held.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PassStats {
    /// `Σ_r weight[r]·CE_r`.
    pub loss: f64,
    /// Floats in every activation buffer the pass allocated (all live until it returns, so
    /// this is its peak), counted as they are allocated; [`activation_floats`] is the same
    /// count from the shapes alone. Parameters, gradients, RoPE tables and index buffers are
    /// not activations and not counted.
    pub activation_floats: usize,
}

/// Floats of one layer's activations beyond its input ([`PassStats::activation_floats`]):
/// `N·(3C + 2 + 2·NH·HD + 2·NKV·HD + NH + 3F)` — `r1`, `h1`, `q`, `k`, `v`, `lse`, `a`, `x_mid`,
/// `r2`, `h2`, `g`, `u`, `m`.
pub fn layer_activation_floats(cfg: &ModelConfig, n: usize) -> usize {
    let (c, hd, f) = (cfg.d_model, cfg.head_dim(), cfg.mlp_hidden_size);
    let (qw, kw) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    n * (3 * c + 2 + 2 * qw + 2 * kw + cfg.n_heads + 3 * f)
}

/// The peak activation floats of one [`forward_backward_with`] pass over a `[b, t]` batch
/// with `rows` loss rows, from the shapes: the kept layer activations (every layer's input and
/// activations; with `recompute` every layer's input plus one layer's activations), the
/// residual stream and its scratch (`2·N·C`), the head (`R·(2C + V + 2)`), and the backward's
/// gradients (`R·2C + N·(2C + 3F + 2·NH·HD + 2·NKV·HD + NH)`). ×4 for bytes in f32.
pub fn activation_floats(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    rows: usize,
    recompute: bool,
) -> usize {
    let n = b * t;
    let (c, hd, f, v) = (
        cfg.d_model,
        cfg.head_dim(),
        cfg.mlp_hidden_size,
        cfg.embedding_size,
    );
    let (qw, kw) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
    let layer = layer_activation_floats(cfg, n);
    let inputs = cfg.n_layers * n * c;
    let kept = if recompute {
        inputs + layer
    } else {
        inputs + cfg.n_layers * layer
    };
    let head = rows * (2 * c + v + 2);
    let bwd = rows * 2 * c + n * (2 * c + 3 * f + 2 * qw + 2 * kw + cfg.n_heads);
    kept + 2 * n * c + head + bwd
}

/// One layer's activations beyond its input, kept for (or recomputed before) its backward.
struct Acts<B> {
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

/// The backward pass's activation gradients, shared by the layers.
struct Grads<B> {
    dm: B,
    dg: B,
    du: B,
    dh: B,
    da: B,
    dq: B,
    dk: B,
    dv: B,
    delta: B,
}

/// The parameters, shapes, tables and allocation count one pass shares across its layers.
struct Pass<'a, B: TrainOps> {
    ops: &'a B,
    p: &'a [B::Buf],
    n: usize,
    c: usize,
    qw: usize,
    kw: usize,
    f: usize,
    eps: f32,
    dims: AttnShape,
    rope: Rope<B>,
    floats: Cell<usize>,
    /// [`PassOptions::frozen_base`].
    frozen: bool,
}

impl<'a, B: TrainOps> Pass<'a, B> {
    /// The gradient of parameter `i` in `grad`, `None` when the base is frozen.
    fn dw<'g>(&self, grad: &'g mut [B::Buf], i: usize) -> Option<&'g mut B::Buf> {
        if self.frozen {
            None
        } else {
            grad.get_mut(i)
        }
    }

    /// `len` zeros, counted as activations.
    fn zeros(&self, len: usize) -> Result<B::Buf> {
        self.floats.set(self.floats.get() + len);
        self.ops.zeros(len)
    }

    fn acts(&self) -> Result<Acts<B::Buf>> {
        let (n, c, qw, kw, f) = (self.n, self.c, self.qw, self.kw, self.f);
        Ok(Acts {
            r1: self.zeros(n)?,
            h1: self.zeros(n * c)?,
            q: self.zeros(n * qw)?,
            k: self.zeros(n * kw)?,
            v: self.zeros(n * kw)?,
            lse: self.zeros(n * self.dims.nh)?,
            a: self.zeros(n * qw)?,
            x_mid: self.zeros(n * c)?,
            r2: self.zeros(n)?,
            h2: self.zeros(n * c)?,
            g: self.zeros(n * f)?,
            u: self.zeros(n * f)?,
            m: self.zeros(n * f)?,
        })
    }

    fn grads(&self) -> Result<Grads<B::Buf>> {
        let (n, c, qw, kw, f) = (self.n, self.c, self.qw, self.kw, self.f);
        Ok(Grads {
            dm: self.zeros(n * f)?,
            dg: self.zeros(n * f)?,
            du: self.zeros(n * f)?,
            dh: self.zeros(n * c)?,
            da: self.zeros(n * qw)?,
            dq: self.zeros(n * qw)?,
            dk: self.zeros(n * kw)?,
            dv: self.zeros(n * kw)?,
            delta: self.zeros(n * self.dims.nh)?,
        })
    }

    /// Part `part` of layer `l`'s weights.
    fn w(&self, l: usize, part: usize) -> &'a B::Buf {
        &self.p[i_block(l, part)]
    }

    /// The sizes of a linear from width `k` to `m` over the pass's rows.
    fn lin(&self, k: usize, m: usize) -> MatMul {
        MatMul { n: self.n, k, m }
    }

    /// Layer `l`'s RMSNorm `part` of `x`.
    fn norm<'b>(&self, x: &'b B::Buf, l: usize, part: usize) -> Norm<'b, B>
    where
        'a: 'b,
    {
        Norm::new(x, self.w(l, part), self.rows(), self.eps)
    }

    fn rows(&self) -> Rows {
        Rows {
            n: self.n,
            c: self.c,
        }
    }

    /// Layer `l`'s forward from its input in `x`, filling `s`. `x` becomes the layer's output,
    /// or, without `through_down` (a recomputation), stays at `x_mid`: the down projection's
    /// output is not needed by the backward pass.
    fn layer_fwd(
        &self,
        l: usize,
        x: &mut B::Buf,
        s: &mut Acts<B::Buf>,
        tmp_c: &mut B::Buf,
        through_down: bool,
    ) -> Result<()> {
        let (ops, n, c, qw, kw, f) = (self.ops, self.n, self.c, self.qw, self.kw, self.f);
        let (nh, nkv, rope) = (self.dims.nh, self.dims.nkv, &self.rope);
        let w = |part: usize| self.w(l, part);
        ops.rms_norm(&mut s.h1, &mut s.r1, self.norm(x, l, ATTN_NORM))?;
        ops.linear(&mut s.q, &s.h1, w(Q), self.lin(c, qw))?;
        ops.linear(&mut s.k, &s.h1, w(K), self.lin(c, kw))?;
        ops.linear(&mut s.v, &s.h1, w(V), self.lin(c, kw))?;
        ops.rope(&mut s.q, rope, nh, false)?;
        ops.rope(&mut s.k, rope, nkv, false)?;
        let qkv = Qkv::new(&s.q, &s.k, &s.v, self.dims);
        ops.attention(&mut s.a, &mut s.lse, qkv)?;
        ops.linear(tmp_c, &s.a, w(ATTN_OUT), self.lin(qw, c))?;
        ops.add(x, tmp_c, n * c)?;
        ops.copy(&mut s.x_mid, x)?;
        ops.rms_norm(&mut s.h2, &mut s.r2, self.norm(x, l, FF_NORM))?;
        ops.linear(&mut s.g, &s.h2, w(GATE), self.lin(c, f))?;
        ops.linear(&mut s.u, &s.h2, w(UP), self.lin(c, f))?;
        ops.swiglu(&mut s.m, &s.g, &s.u, n * f)?;
        if through_down {
            ops.linear(tmp_c, &s.m, w(DOWN), self.lin(f, c))?;
            ops.add(x, tmp_c, n * c)?;
        }
        Ok(())
    }

    /// Layer `l`'s backward: `dx` (the gradient of the layer's output) becomes that of its
    /// input `x_in`, whose forward kept `s`; the weight gradients are added into `grad`.
    fn layer_bwd(
        &self,
        grad: &mut [B::Buf],
        l: usize,
        dx: &mut B::Buf,
        (x_in, s): (&B::Buf, &Acts<B::Buf>),
        d: &mut Grads<B::Buf>,
        tmp_c: &mut B::Buf,
    ) -> Result<()> {
        let (ops, n, c, qw, kw, f) = (self.ops, self.n, self.c, self.qw, self.kw, self.f);
        let (nh, nkv, rope) = (self.dims.nh, self.dims.nkv, &self.rope);
        let w = |part: usize| self.w(l, part);
        let gi = |part: usize| i_block(l, part);
        // x_out = x_mid + m·W_downᵀ
        let a = LinearGrad::new(dx, &s.m, w(DOWN), self.lin(f, c));
        ops.linear_bwd(Dx::Write(&mut d.dm), self.dw(grad, gi(DOWN)), a)?;
        let a = SwigluGrad::new(&d.dm, &s.g, &s.u, n * f);
        ops.swiglu_bwd(&mut d.dg, &mut d.du, a)?;
        let a = LinearGrad::new(&d.dg, &s.h2, w(GATE), self.lin(c, f));
        ops.linear_bwd(Dx::Write(&mut d.dh), self.dw(grad, gi(GATE)), a)?;
        let a = LinearGrad::new(&d.du, &s.h2, w(UP), self.lin(c, f));
        ops.linear_bwd(Dx::Add(&mut d.dh), self.dw(grad, gi(UP)), a)?;
        let a = NormGrad::new(&d.dh, &s.x_mid, &s.r2, w(FF_NORM), self.rows());
        ops.rms_norm_bwd(tmp_c, self.dw(grad, gi(FF_NORM)), a)?;
        ops.add(dx, tmp_c, n * c)?;
        // x_mid = x_in + a·W_oᵀ
        let a = LinearGrad::new(dx, &s.a, w(ATTN_OUT), self.lin(qw, c));
        ops.linear_bwd(Dx::Write(&mut d.da), self.dw(grad, gi(ATTN_OUT)), a)?;
        let (dq, dk, dv, delta) = (&mut d.dq, &mut d.dk, &mut d.dv, &mut d.delta);
        let qkv = Qkv::new(&s.q, &s.k, &s.v, self.dims);
        let a = AttnGrad::new(&d.da, qkv, &s.a, &s.lse);
        ops.attention_bwd(QkvGrads { dq, dk, dv, delta }, a)?;
        ops.rope(&mut d.dq, rope, nh, true)?;
        ops.rope(&mut d.dk, rope, nkv, true)?;
        let a = LinearGrad::new(&d.dq, &s.h1, w(Q), self.lin(c, qw));
        ops.linear_bwd(Dx::Write(&mut d.dh), self.dw(grad, gi(Q)), a)?;
        let a = LinearGrad::new(&d.dk, &s.h1, w(K), self.lin(c, kw));
        ops.linear_bwd(Dx::Add(&mut d.dh), self.dw(grad, gi(K)), a)?;
        let a = LinearGrad::new(&d.dv, &s.h1, w(V), self.lin(c, kw));
        ops.linear_bwd(Dx::Add(&mut d.dh), self.dw(grad, gi(V)), a)?;
        let a = NormGrad::new(&d.dh, x_in, &s.r1, w(ATTN_NORM), self.rows());
        ops.rms_norm_bwd(tmp_c, self.dw(grad, gi(ATTN_NORM)), a)?;
        ops.add(dx, tmp_c, n * c)
    }
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

/// [`forward_backward`] with [`PassOptions`] (e.g. recomputation).
pub fn forward_backward_host<T: Real>(
    cfg: &ModelConfig,
    p: &Params<T>,
    batch: &Batch,
    grad: &mut Params<T>,
    opts: PassOptions,
) -> Result<PassStats> {
    let ops = HostOps::<T>::new();
    forward_backward_with(&ops, cfg, opts, &p.data, batch, &mut grad.data)
}

/// The model's forward and backward pass over any [`TrainOps`]: loss of `batch` under the
/// parameters `p` (the tensors of [`Params`], in its order), with every parameter's gradient
/// **added** to `grad`, keeping every activation ([`forward_backward_with`] with the default
/// options).
pub fn forward_backward_on<B: TrainOps>(
    ops: &B,
    cfg: &ModelConfig,
    p: &[B::Buf],
    batch: &Batch,
    grad: &mut [B::Buf],
) -> Result<f64> {
    Ok(forward_backward_with(ops, cfg, PassOptions::default(), p, batch, grad)?.loss)
}

/// [`forward_backward_on`] with [`PassOptions`]; also returns the activation floats it held.
/// Activation buffers live for the call.
pub fn forward_backward_with<B: TrainOps>(
    ops: &B,
    cfg: &ModelConfig,
    opts: PassOptions,
    p: &[B::Buf],
    batch: &Batch,
    grad: &mut [B::Buf],
) -> Result<PassStats> {
    batch.validate(cfg)?;
    ensure!(
        p.len() == 3 + 9 * cfg.n_layers
            && (grad.len() == p.len() || opts.frozen_base && grad.is_empty()),
        "forward_backward: parameter sets do not match the config's {} layers",
        cfg.n_layers
    );
    let (b, t) = (batch.b, batch.t);
    let n = b * t;
    let (c, hd, v) = (cfg.d_model, cfg.head_dim(), cfg.embedding_size);
    let dims = AttnShape {
        b,
        t,
        nh: cfg.n_heads,
        nkv: cfg.n_kv_heads,
        hd,
    };
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let (cos_h, sin_h) = rope_tables(cfg.rope_theta, hd, t.max(1));
    let pos: Vec<u32> = (0..n).map(|i| (i % t.max(1)) as u32).collect();
    let rope = Rope {
        pos: ops.ints(&pos)?,
        cos: ops.upload_f64(&f64s(&cos_h))?,
        sin: ops.upload_f64(&f64s(&sin_h))?,
        n,
        hd,
    };
    let pass = Pass {
        ops,
        p,
        n,
        c,
        qw: cfg.n_heads * hd,
        kw: cfg.n_kv_heads * hd,
        f: cfg.mlp_hidden_size,
        eps: cfg.rms_norm_eps,
        dims,
        rope,
        floats: Cell::new(0),
        frozen: opts.frozen_base,
    };
    let ids = ops.ints(&batch.ids)?;
    let z = |len: usize| pass.zeros(len);

    // ---- forward ----
    let mut x = z(n * c)?;
    ops.embedding(&mut x, &p[I_WTE], RowIds::new(&ids, pass.rows()))?;
    let mut tmp_c = z(n * c)?;
    // Every layer's input; and every layer's activations, or (recomputing) one layer's.
    let mut inputs: Vec<B::Buf> = Vec::with_capacity(cfg.n_layers);
    let mut kept: Vec<Acts<B::Buf>> = Vec::with_capacity(cfg.n_layers);
    let mut work = if opts.recompute {
        Some(pass.acts()?)
    } else {
        None
    };
    for l in 0..cfg.n_layers {
        let mut x_in = z(n * c)?;
        ops.copy(&mut x_in, &x)?;
        inputs.push(x_in);
        match work.as_mut() {
            Some(s) => pass.layer_fwd(l, &mut x, s, &mut tmp_c, true)?,
            None => {
                let mut s = pass.acts()?;
                pass.layer_fwd(l, &mut x, &mut s, &mut tmp_c, true)?;
                kept.push(s);
            }
        }
    }
    let r = batch.rows.len();
    let (rows, head_rows) = (ops.ints(&batch.rows)?, Rows { n: r, c });
    let mut xr = z(r * c)?;
    ops.gather_rows(&mut xr, &x, RowIds::new(&rows, head_rows))?;
    let mut rf = z(r)?;
    let mut hf = z(r * c)?;
    let (i_lm, i_lnf) = (p.len() - 1, p.len() - 2);
    let norm = Norm::new(&xr, &p[i_lnf], head_rows, cfg.rms_norm_eps);
    ops.rms_norm(&mut hf, &mut rf, norm)?;
    let mut logits = z(r * v)?;
    let head = MatMul { n: r, k: c, m: v };
    ops.linear(&mut logits, &hf, &p[i_lm], head)?;
    let weights = ops.upload_f64(&batch.weights)?;
    let targets = ops.ints(&batch.targets)?;
    let mut loss_rows = z(r)?;
    let t = Targets::new(&targets, &weights, Rows { n: r, c: v });
    let loss = ops.cross_entropy(&mut logits, &mut loss_rows, t)?;

    // ---- backward ----
    let mut dhf = z(r * c)?;
    let a = LinearGrad::new(&logits, &hf, &p[i_lm], head);
    ops.linear_bwd(Dx::Write(&mut dhf), pass.dw(grad, i_lm), a)?;
    let mut dxr = z(r * c)?;
    let a = NormGrad::new(&dhf, &xr, &rf, &p[i_lnf], head_rows);
    ops.rms_norm_bwd(&mut dxr, pass.dw(grad, i_lnf), a)?;
    let mut dx = z(n * c)?;
    ops.scatter_add_rows(&mut dx, &dxr, RowIds::new(&rows, head_rows))?;
    let mut d = pass.grads()?;
    for l in (0..cfg.n_layers).rev() {
        let x_in = &inputs[l];
        let s = match work.as_mut() {
            Some(s) => {
                // The residual stream `x` is free after the head: the recomputation's scratch.
                ops.copy(&mut x, x_in)?;
                pass.layer_fwd(l, &mut x, s, &mut tmp_c, false)?;
                &*s
            }
            None => &kept[l],
        };
        pass.layer_bwd(grad, l, &mut dx, (x_in, s), &mut d, &mut tmp_c)?;
    }
    if let Some(dwte) = pass.dw(grad, I_WTE) {
        ops.embedding_bwd(dwte, &dx, RowIds::new(&ids, pass.rows()))?;
    }
    // The activation buffers are freed on return: make sure the work using them is done (a
    // device surfaces a kernel fault here, naming the step).
    ops.finish("the forward/backward pass")?;
    Ok(PassStats {
        loss,
        activation_floats: pass.floats.get(),
    })
}
