//! AdamW with f32 master weights and moments, learning-rate schedules, gradient clipping.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled decay, bias-corrected moments):
//! `p ← p − lr·wd·p`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr·(m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)`. Weight decay applies to matrices only (the
//! 1-D RMSNorm weights are not decayed; upstream's exact parameter groups are not published).
//! Gradient accumulation is done by the caller: micro-batch losses carry a `1/accum` weight and
//! their gradients add up in one [`Params`] before [`AdamW::step`].

use anyhow::{bail, Result};

use super::model::Params;

/// Learning-rate schedule: linear warm-up over `warmup` steps to `lr`, then
/// - `Constant`: hold;
/// - `Linear`: decay linearly to `final_frac·lr` at `total` steps;
/// - `Wsd` (warmup–stable–decay, upstream's): hold until the last `decay` steps, then decay
///   linearly to `final_frac·lr`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    Linear { final_frac: f64 },
    Wsd { decay: u64, final_frac: f64 },
}

impl Schedule {
    /// Parse `constant`, `linear` or `wsd` (`wsd` decays over the last 10 % of the steps to
    /// 10 % of the peak, `linear` to 10 % of the peak).
    pub fn parse(s: &str, total: u64) -> Result<Schedule> {
        Ok(match s {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear { final_frac: 0.1 },
            "wsd" => Schedule::Wsd {
                decay: (total / 10).max(1),
                final_frac: 0.1,
            },
            _ => bail!("unknown --schedule {s:?}: expected constant, linear or wsd"),
        })
    }

    /// Learning rate of optimizer step `step` (0-based) of `total`.
    pub fn lr(&self, peak: f64, warmup: u64, step: u64, total: u64) -> f64 {
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        let lin = |from: u64, len: u64, final_frac: f64| {
            let f = ((step - from) as f64 / len.max(1) as f64).min(1.0);
            peak * (1.0 - f * (1.0 - final_frac))
        };
        match *self {
            Schedule::Constant => peak,
            Schedule::Linear { final_frac } => {
                lin(warmup, total.saturating_sub(warmup), final_frac)
            }
            Schedule::Wsd { decay, final_frac } => {
                let start = total.saturating_sub(decay).max(warmup);
                if step < start {
                    peak
                } else {
                    lin(start, total - start, final_frac)
                }
            }
        }
    }
}

/// AdamW hyper-parameters (defaults: PyTorch's betas and eps, upstream's weight decay 0.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW state: first and second moments (f32) and the number of updates taken.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Params<f32>,
    pub v: Params<f32>,
    pub t: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, like: &Params<f32>) -> AdamW {
        let mut m = like.clone();
        m.fill_zero();
        AdamW {
            cfg,
            v: m.clone(),
            m,
            t: 0,
        }
    }

    /// One update of `p` with gradient `g` at learning rate `lr`.
    pub fn step(&mut self, p: &mut Params<f32>, g: &Params<f32>, lr: f64) {
        self.t += 1;
        let s = AdamWStep::new(&self.cfg, self.t, lr);
        for i in 0..p.data.len() {
            let decay = s.decay(p.shapes[i].len());
            adamw_update(
                &mut p.data[i],
                &g.data[i],
                &mut self.m.data[i],
                &mut self.v.data[i],
                decay,
                &s,
            );
        }
    }
}

/// The f32 scalars of AdamW update number `t` (1-based) at learning rate `lr`.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub b1: f32,
    pub b2: f32,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f32,
    /// `√(1 − β2ᵗ)`.
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `1 − lr·weight_decay`.
    pub matrix_decay: f32,
}

impl AdamWStep {
    pub fn new(c: &AdamWConfig, t: u64, lr: f64) -> AdamWStep {
        let bc1 = 1.0 - c.beta1.powi(t as i32);
        let bc2 = 1.0 - c.beta2.powi(t as i32);
        AdamWStep {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: c.eps as f32,
            matrix_decay: 1.0 - (lr * c.weight_decay) as f32,
        }
    }
    /// The decay factor of a tensor with `ndim` dimensions (matrices only are decayed).
    pub fn decay(&self, ndim: usize) -> f32 {
        if ndim >= 2 {
            self.matrix_decay
        } else {
            1.0
        }
    }
}

/// One AdamW update of one tensor `p` with gradient `g` and moments `m`, `v` (see the module
/// docs); every optimizer of the trainer (full weights, LoRA adapters) runs this.
pub fn adamw_update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    decay: f32,
    s: &AdamWStep,
) {
    let (b1, b2) = (s.b1, s.b2);
    for j in 0..p.len() {
        let gj = g[j];
        m[j] = b1 * m[j] + (1.0 - b1) * gj;
        v[j] = b2 * v[j] + (1.0 - b2) * gj * gj;
        p[j] *= decay;
        p[j] -= s.step_size * m[j] / (v[j].sqrt() / s.bc2_sqrt + s.eps);
    }
}

/// Global L2 norm of all gradients (accumulated in f64).
pub fn grad_norm(g: &Params<f32>) -> f64 {
    g.data
        .iter()
        .flat_map(|d| d.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scale the gradients so their global norm is at most `max_norm` (PyTorch
/// `clip_grad_norm_`: factor `max_norm/(norm + 1e-6)` when below 1). Returns the norm before
/// clipping. `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(g: &mut Params<f32>, max_norm: f64) -> f64 {
    let norm = grad_norm(g);
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for d in &mut g.data {
                for x in d.iter_mut() {
                    *x *= coef as f32;
                }
            }
        }
    }
    norm
}
