//! LoRA training on the host: the frozen base model's forward and backward pass is the one
//! [`super::model::forward_backward_on`], run over [`LoraOps`], a [`TrainOps`] that wraps
//! [`HostOps`] and
//!
//! - runs [`lora_linear`] instead of the plain linear for every base weight the adapter
//!   targets (recognised by the weight buffer it is handed), keeping `u` for the backward;
//! - runs [`lora_linear_bwd`] in that linear's backward (adding `dA`, `dB` into
//!   [`LoraGrads`]) and, for every other linear, computes only `dx`: no base weight, norm or
//!   embedding gradient is kept (the norms' `dw` goes to a small scratch buffer).
//!
//! [`LoraStep`] is the [`super::StepState`] of a LoRA run: the trainer's step (micro-batches,
//! accumulation, clipping, schedule) is the one full training uses, the update is
//! [`LoraAdamW`]'s. There is no full-model gradient or optimizer state.

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::backend::{HostOps, TrainOps};
use super::dist;
use super::model::{forward_backward_with, Batch, Params, PassOptions, PassStats};
use super::ops::AttnShape;
use super::optim::{AdamW, AdamWConfig};
use super::StepState;
use crate::hf::config::ModelConfig;
use crate::lora::train::{lora_linear, lora_linear_bwd, LoraAdamW, LoraGrads};
use crate::lora::{Adapter, ModuleKind};

/// [`HostOps`] in f32 with an adapter's LoRA linears in place of the targeted base linears and
/// no base-parameter gradients (module docs).
pub struct LoraOps<'a> {
    host: HostOps<f32>,
    adapter: &'a Adapter,
    /// Base weight buffer address → (module name, scale).
    by_weight: HashMap<usize, (&'a str, f32)>,
    grads: RefCell<&'a mut LoraGrads>,
    /// `u` `[N, r]` of each targeted linear's forward, by weight address.
    saved_u: RefCell<HashMap<usize, Vec<f32>>>,
}

fn key(w: &[f32]) -> usize {
    w.as_ptr() as usize
}

impl<'a> LoraOps<'a> {
    /// Ops for the base `params` with `adapter` (every module a linear of `params`).
    pub fn new(
        params: &'a Params<f32>,
        adapter: &'a Adapter,
        grads: &'a mut LoraGrads,
    ) -> Result<LoraOps<'a>> {
        let mut by_weight = HashMap::new();
        for (name, m) in &adapter.modules {
            if m.kind != ModuleKind::Linear {
                bail!("LoRA training: module {name} is an embedding; only linears are trained");
            }
            let Some(i) = params.index_of(&format!("{name}.weight")) else {
                bail!("LoRA training: the model has no weight {name}.weight");
            };
            let w = &params.data[i];
            if w.len() != m.base_shape[0] * m.base_shape[1] || w.is_empty() {
                bail!("LoRA training: {name} does not match the model's weight shape");
            }
            let s = m.scale(adapter.config.use_rslora) as f32;
            by_weight.insert(key(w), (name.as_str(), s));
        }
        for name in adapter.modules.keys() {
            if !grads.modules.contains_key(name) {
                bail!("LoRA training: no gradient buffers for module {name}");
            }
        }
        Ok(LoraOps {
            host: HostOps::new(),
            adapter,
            by_weight,
            grads: RefCell::new(grads),
            saved_u: RefCell::new(HashMap::new()),
        })
    }
}

/// `dx[N, K] = dy[N, M]·w[M, K]` (written, or added when `accumulate`).
fn linear_dx(
    dx: &mut [f32],
    accumulate: bool,
    dy: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    m: usize,
) {
    dx[..n * k]
        .par_chunks_mut(k)
        .zip(dy[..n * m].par_chunks(m))
        .for_each(|(dxr, dyr)| {
            let mut row = vec![0.0f32; k];
            for (&g, wr) in dyr.iter().zip(w.chunks_exact(k)) {
                for (o, &wv) in row.iter_mut().zip(wr) {
                    *o += g * wv;
                }
            }
            if accumulate {
                for (o, v) in dxr.iter_mut().zip(row) {
                    *o += v;
                }
            } else {
                dxr.copy_from_slice(&row);
            }
        });
}

impl TrainOps for LoraOps<'_> {
    type Buf = Vec<f32>;
    type Ints = Vec<u32>;

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        self.host.zeros(len)
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        self.host.upload(host)
    }
    fn download(&self, src: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        self.host.download(src, n)
    }
    fn upload_f64(&self, host: &[f64]) -> Result<Vec<f32>> {
        self.host.upload_f64(host)
    }
    fn ints(&self, host: &[u32]) -> Result<Vec<u32>> {
        self.host.ints(host)
    }
    fn copy(&self, dst: &mut Vec<f32>, src: &Vec<f32>) -> Result<()> {
        self.host.copy(dst, src)
    }
    fn finish(&self, what: &str) -> Result<()> {
        self.host.finish(what)
    }
    fn embedding(
        &self,
        out: &mut Vec<f32>,
        wte: &Vec<f32>,
        ids: &Vec<u32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.host.embedding(out, wte, ids, n, c)
    }
    /// The embedding is frozen: nothing to do.
    fn embedding_bwd(&self, _: &mut Vec<f32>, _: &Vec<f32>, _: &[u32], _: usize) -> Result<()> {
        Ok(())
    }
    fn rms_norm(
        &self,
        y: &mut Vec<f32>,
        r: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.host.rms_norm(y, r, x, w, n, c, eps)
    }
    fn rms_norm_bwd(
        &self,
        dx: &mut Vec<f32>,
        dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        r: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        // `dw` is the step's scratch (the norms are frozen).
        self.host.rms_norm_bwd(dx, dw, dy, x, r, w, n, c)
    }
    fn linear(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let Some(&(name, s)) = self.by_weight.get(&key(w)) else {
            return self.host.linear(y, x, w, n, k, m);
        };
        let md = &self.adapter.modules[name];
        let r = md.rank;
        let mut u = vec![0.0f32; n * r];
        lora_linear(y, &mut u, x, w, &md.a, &md.b, s, n, k, m, r);
        self.saved_u.borrow_mut().insert(key(w), u);
        Ok(())
    }
    fn linear_bwd(
        &self,
        dx: Option<&mut Vec<f32>>,
        dx_accumulate: bool,
        _dw: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let Some(&(name, s)) = self.by_weight.get(&key(w)) else {
            if let Some(dx) = dx {
                linear_dx(dx, dx_accumulate, dy, w, n, k, m);
            }
            return Ok(());
        };
        let md = &self.adapter.modules[name];
        let Some(u) = self.saved_u.borrow_mut().remove(&key(w)) else {
            bail!("LoRA backward of {name} without its forward");
        };
        let mut grads = self.grads.borrow_mut();
        let Some((da, db)) = grads.modules.get_mut(name) else {
            bail!("LoRA training: no gradient buffers for module {name}");
        };
        match dx {
            Some(dx) if dx_accumulate => {
                let mut part = vec![0.0f32; n * k];
                let (a, b) = (&md.a, &md.b);
                lora_linear_bwd(
                    Some(&mut part),
                    da,
                    db,
                    dy,
                    x,
                    &u,
                    w,
                    a,
                    b,
                    s,
                    n,
                    k,
                    m,
                    md.rank,
                );
                for (o, v) in dx.iter_mut().zip(part) {
                    *o += v;
                }
            }
            dx => {
                let dx = dx.map(|d| d.as_mut_slice());
                let (a, b) = (&md.a, &md.b);
                lora_linear_bwd(dx, da, db, dy, x, &u, w, a, b, s, n, k, m, md.rank);
            }
        }
        Ok(())
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        pos: &Vec<u32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        n: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        self.host.rope(x, pos, cos, sin, n, heads, hd, inverse)
    }
    fn attention(
        &self,
        o: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        d: AttnShape,
    ) -> Result<()> {
        self.host.attention(o, lse, q, k, v, d)
    }
    fn attention_bwd(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        delta: &mut Vec<f32>,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        o: &Vec<f32>,
        lse: &Vec<f32>,
        d: AttnShape,
    ) -> Result<()> {
        self.host
            .attention_bwd(dq, dk, dv, delta, dout, q, k, v, o, lse, d)
    }
    fn swiglu(&self, m: &mut Vec<f32>, g: &Vec<f32>, u: &Vec<f32>, len: usize) -> Result<()> {
        self.host.swiglu(m, g, u, len)
    }
    fn swiglu_bwd(
        &self,
        dg: &mut Vec<f32>,
        du: &mut Vec<f32>,
        dm: &Vec<f32>,
        g: &Vec<f32>,
        u: &Vec<f32>,
        len: usize,
    ) -> Result<()> {
        self.host.swiglu_bwd(dg, du, dm, g, u, len)
    }
    fn add(&self, x: &mut Vec<f32>, d: &Vec<f32>, len: usize) -> Result<()> {
        self.host.add(x, d, len)
    }
    fn gather_rows(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        rows: &Vec<u32>,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        self.host.gather_rows(out, x, rows, nrows, c)
    }
    fn scatter_add_rows(
        &self,
        dx: &mut Vec<f32>,
        src: &Vec<f32>,
        rows: &Vec<u32>,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        self.host.scatter_add_rows(dx, src, rows, nrows, c)
    }
    fn cross_entropy(
        &self,
        z: &mut Vec<f32>,
        loss_rows: &mut Vec<f32>,
        targets: &Vec<u32>,
        weights: &Vec<f32>,
        r: usize,
        v: usize,
    ) -> Result<f64> {
        self.host
            .cross_entropy(z, loss_rows, targets, weights, r, v)
    }
}

/// Loss of `batch` under the frozen base `params` with `adapter`, the adapter's gradients
/// **added** to `grads` (so micro-batches accumulate).
pub fn lora_forward_backward(
    cfg: &ModelConfig,
    params: &Params<f32>,
    adapter: &Adapter,
    batch: &Batch,
    grads: &mut LoraGrads,
) -> Result<f64> {
    let opts = PassOptions::default();
    Ok(lora_forward_backward_with(cfg, params, adapter, batch, grads, opts)?.loss)
}

/// [`lora_forward_backward`] with [`PassOptions`] (recomputation: the adapters' `u` `[N, r]`
/// stay kept for every layer, the base activations are recomputed).
pub fn lora_forward_backward_with(
    cfg: &ModelConfig,
    params: &Params<f32>,
    adapter: &Adapter,
    batch: &Batch,
    grads: &mut LoraGrads,
    opts: PassOptions,
) -> Result<PassStats> {
    // Scratch for the frozen norms' `dw` (1-D tensors); the matrices get empty buffers, which
    // `LoraOps` never writes.
    let mut scratch: Vec<Vec<f32>> = params
        .shapes
        .iter()
        .map(|s| match s.as_slice() {
            [c] => vec![0.0; *c],
            _ => Vec::new(),
        })
        .collect();
    let ops = LoraOps::new(params, adapter, grads)?;
    forward_backward_with(&ops, cfg, opts, &params.data, batch, &mut scratch)
}

/// The step state of a LoRA run (module docs): frozen base, trained adapter, its gradients and
/// optimizer.
pub struct LoraStep {
    pub params: Params<f32>,
    pub adapter: Adapter,
    pub grads: LoraGrads,
    pub opt: LoraAdamW,
    /// Per-layer activation recomputation ([`PassOptions::recompute`]).
    pub recompute: bool,
}

impl LoraStep {
    pub fn new(params: Params<f32>, adapter: Adapter, opt: AdamWConfig) -> LoraStep {
        LoraStep {
            grads: LoraGrads::zeros_like(&adapter),
            opt: LoraAdamW::new(opt, &adapter),
            params,
            adapter,
            recompute: false,
        }
    }
}

impl StepState for LoraStep {
    fn zero_grad(&mut self) -> Result<()> {
        self.grads.fill_zero();
        Ok(())
    }
    fn forward_backward(&mut self, cfg: &ModelConfig, batch: &Batch) -> Result<f64> {
        let opts = PassOptions {
            recompute: self.recompute,
        };
        let (p, ad, g) = (&self.params, &self.adapter, &mut self.grads);
        Ok(lora_forward_backward_with(cfg, p, ad, batch, g, opts)?.loss)
    }
    fn all_reduce_grads(&mut self, group: &mut dist::HostGroup) -> Result<()> {
        for (a, b) in self.grads.modules.values_mut() {
            group.all_reduce_f32(a)?;
            group.all_reduce_f32(b)?;
        }
        Ok(())
    }
    /// Clips and updates the adapter with [`LoraAdamW`]; the trainer's (empty) full-model
    /// `opt` only counts the update.
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = self.grads.clip(max_norm);
        self.opt.step(&mut self.adapter, &self.grads, lr)?;
        opt.t = self.opt.t;
        Ok(norm)
    }
}
