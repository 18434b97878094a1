//! LoRA training on the host: the frozen base model's forward and backward pass is the one
//! [`super::model::forward_backward_on`], run over [`LoraOps`]: the [`HostOps`] with the
//! [`LoraLinear`]s, which
//!
//! - run [`lora_linear`] instead of the plain linear for every base weight the adapter
//!   targets (recognised by the weight buffer it is handed), keeping `u` for the backward;
//! - run [`lora_linear_bwd`] in that linear's backward (adding `dA`, `dB` into
//!   [`LoraGrads`]) and, for every other linear, computes only `dx`. The pass runs with the
//!   base frozen ([`PassOptions::frozen_base`]): no base weight, norm or embedding gradient is
//!   computed.
//!
//! [`LoraStep`] is the [`super::StepState`] of a LoRA run: the trainer's step (micro-batches,
//! accumulation, clipping, schedule) is the one full training uses, the update is
//! [`LoraAdamW`]'s. There is no full-model gradient or optimizer state.

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::{bail, Result};

use super::backend::{Grad, HostLinear, HostOps, LinearBwd, MatMul, PlainLinear};
use super::dist;
use super::model::{forward_backward_with, Batch, Params, PassOptions, PassStats};
use super::ops::linear_dx;
use super::optim::{AdamW, AdamWConfig};
use super::StepState;
use crate::hf::config::ModelConfig;
use crate::lora::train::{lora_linear, lora_linear_bwd, Factors, LoraAdamW, LoraGrads};
use crate::lora::{Adapter, ModuleKind};

/// [`HostOps`] in f32 with an adapter's LoRA linears in place of the targeted base linears and
/// no base-parameter gradients (module docs).
pub type LoraOps<'a> = HostOps<f32, LoraLinear<'a>>;

/// The linears of [`LoraOps`]: [`lora_linear`] for the weights the adapter targets, only `dx`
/// for the others.
pub struct LoraLinear<'a> {
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

impl<'a> LoraLinear<'a> {
    /// The linears of the base `params` with `adapter` (every module a linear of `params`).
    pub fn new(
        params: &'a Params<f32>,
        adapter: &'a Adapter,
        grads: &'a mut LoraGrads,
    ) -> Result<LoraLinear<'a>> {
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
        Ok(LoraLinear {
            adapter,
            by_weight,
            grads: RefCell::new(grads),
            saved_u: RefCell::new(HashMap::new()),
        })
    }
}

impl HostLinear<f32> for LoraLinear<'_> {
    fn forward(&self, y: &mut [f32], x: &[f32], w: &[f32], d: MatMul) -> Result<()> {
        let Some(&(name, s)) = self.by_weight.get(&key(w)) else {
            return PlainLinear.forward(y, x, w, d);
        };
        let md = &self.adapter.modules[name];
        let r = md.rank;
        let mut u = vec![0.0f32; d.n * r];
        let (a, b) = (&md.a[..], &md.b[..]);
        lora_linear(y, &mut u, x, w, Factors { a, b, s, r }, d);
        self.saved_u.borrow_mut().insert(key(w), u);
        Ok(())
    }
    /// The base weights are frozen: `dw` is left alone (the pass hands none,
    /// [`PassOptions::frozen_base`]).
    fn backward(&self, dx: Grad<'_, f32>, _: Grad<'_, f32>, a: LinearBwd<'_, f32>) -> Result<()> {
        let Some(&(name, s)) = self.by_weight.get(&key(a.w)) else {
            if let Some(dx) = dx {
                linear_dx(dx, a);
            }
            return Ok(());
        };
        let md = &self.adapter.modules[name];
        let Some(u) = self.saved_u.borrow_mut().remove(&key(a.w)) else {
            bail!("LoRA backward of {name} without its forward");
        };
        let mut grads = self.grads.borrow_mut();
        let Some((da, db)) = grads.modules.get_mut(name) else {
            bail!("LoRA training: no gradient buffers for module {name}");
        };
        let f = Factors {
            a: &md.a,
            b: &md.b,
            s,
            r: md.rank,
        };
        lora_linear_bwd(dx, (da, db), &u, f, a);
        Ok(())
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
/// stay kept for every layer, the base activations are recomputed); the pass always has the
/// base frozen ([`PassOptions::frozen_base`]: no base-weight gradient work at all).
pub fn lora_forward_backward_with(
    cfg: &ModelConfig,
    params: &Params<f32>,
    adapter: &Adapter,
    batch: &Batch,
    grads: &mut LoraGrads,
    opts: PassOptions,
) -> Result<PassStats> {
    let ops = LoraOps::with_linear(LoraLinear::new(params, adapter, grads)?);
    forward_backward_with(&ops, cfg, opts.frozen(), &params.data, batch, &mut [])
}

/// The step state of a LoRA run (module docs): frozen base, trained adapter, its gradients and
/// optimizer.
pub struct LoraStep {
    pub params: Params<f32>,
    pub adapter: Adapter,
    pub grads: LoraGrads,
    pub opt: LoraAdamW,
}

impl LoraStep {
    pub fn new(params: Params<f32>, adapter: Adapter, opt: AdamWConfig) -> LoraStep {
        LoraStep {
            grads: LoraGrads::zeros_like(&adapter),
            opt: LoraAdamW::new(opt, &adapter),
            params,
            adapter,
        }
    }
}

impl StepState for LoraStep {
    fn zero_grad(&mut self) -> Result<()> {
        self.grads.fill_zero();
        Ok(())
    }
    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64> {
        let (p, ad, g) = (&self.params, &self.adapter, &mut self.grads);
        Ok(lora_forward_backward_with(cfg, p, ad, b, g, o)?.loss)
    }
    /// One all-reduce of every factor's gradient, concatenated (element-wise sums: the same
    /// values as one all-reduce per tensor).
    fn all_reduce_grads(&mut self, group: &mut dist::HostGroup) -> Result<()> {
        let mut flat: Vec<f32> = Vec::new();
        for (a, b) in self.grads.modules.values() {
            flat.extend_from_slice(a);
            flat.extend_from_slice(b);
        }
        group.all_reduce_f32(&mut flat)?;
        let mut rest = &flat[..];
        for (a, b) in self.grads.modules.values_mut() {
            for t in [a, b] {
                let (head, tail) = rest.split_at(t.len());
                t.copy_from_slice(head);
                rest = tail;
            }
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

/// Device bytes of a LoRA run on one GPU ([`super::cuda::CudaLoraState`]), by category, from
/// the shapes alone ([`lora_memory`]): computed, not measured (the CUDA context, cuBLAS's
/// workspace and the allocator's slack come on top).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraMemory {
    /// The frozen base: bf16 matrices (2 bytes each), f32 norms counted at 8 bytes per element
    /// (a margin: the frozen pass keeps no norm gradient).
    pub base: usize,
    /// The adapters' factors, gradients and two AdamW moments: 24 bytes per parameter.
    pub adapter: usize,
    /// The pass's f32 activations ([`super::model::activation_floats`], every token a loss row).
    pub activations: usize,
    /// Every targeted linear's kept `u` `[N, r]` (all layers, also when recomputing) and the
    /// `dy·B` buffer.
    pub lora_acts: usize,
    /// The bf16 copy of the largest base-GEMM input (`N × max(K, M)`, the head's `N × V`).
    pub scratch: usize,
}

impl LoraMemory {
    pub fn total(&self) -> usize {
        self.base + self.adapter + self.activations + self.lora_acts + self.scratch
    }

    /// One line for the start of a run (GiB).
    pub fn describe(&self) -> String {
        let g = |b: usize| b as f64 / (1u64 << 30) as f64;
        format!(
            "{:.2} GiB = base {:.2} (bf16) + adapters {:.3} (f32 factors, grads, moments) + \
             activations {:.2} + LoRA u {:.3} + bf16 scratch {:.2}",
            g(self.total()),
            g(self.base),
            g(self.adapter),
            g(self.activations),
            g(self.lora_acts),
            g(self.scratch)
        )
    }
}

/// [`LoraMemory`] of micro-batches of `b × t` tokens training `adapter` on `cfg`'s model, with
/// or without per-layer recomputation.
pub fn lora_memory(
    cfg: &ModelConfig,
    adapter: &Adapter,
    b: usize,
    t: usize,
    recompute: bool,
) -> LoraMemory {
    let n = b * t;
    let (mut base, mut widest) = (0usize, 0usize);
    for (_, shape) in crate::hf::checkpoint::expected_tensors(cfg) {
        let numel: usize = shape.iter().product();
        match shape.as_slice() {
            [rows, cols] => {
                base += 2 * numel;
                widest = widest.max(*rows.max(cols));
            }
            _ => base += 2 * 4 * numel,
        }
    }
    let (mut adapter_bytes, mut u, mut r_max) = (0usize, 0usize, 0usize);
    for m in adapter.modules.values() {
        adapter_bytes += 24 * (m.a.len() + m.b.len());
        u += 4 * n * m.rank;
        r_max = r_max.max(m.rank);
    }
    LoraMemory {
        base,
        adapter: adapter_bytes,
        activations: 4 * super::model::activation_floats(cfg, b, t, n, recompute),
        lora_acts: u + 4 * n * r_max,
        scratch: 2 * n * widest,
    }
}
