//! LoRA training math on the host, written once over [`Real`] (f32 training, f64
//! finite-difference checks), and the adapters' optimizer state.
//!
//! A LoRA linear with frozen weight `W` `[M, K]`, factors `A` `[r, K]`, `B` `[M, r]` and scale
//! `s` computes, for `x` `[N, K]`:
//!
//! ```text
//! u = x·Aᵀ                      [N, r]   (kept for the backward)
//! y = x·Wᵀ + s·u·Bᵀ             [N, M]
//! ```
//!
//! and its backward, given `dy` `[N, M]` (`W` gets no gradient):
//!
//! ```text
//! e  = dy·B                     [N, r]
//! dB += s·dyᵀ·u                 [M, r]
//! dA += s·eᵀ·x                  [r, K]
//! dx  = dy·W + s·e·A            [N, K]
//! ```
//!
//! which is PEFT's unmerged forward `base(x) + lora_B(lora_A(dropout(x)))·scaling` (dropout 0)
//! and its autograd. Equivalently, with the dense weight gradient `G = dyᵀ·x` `[M, K]` of the
//! merged weight, `dA = s·Bᵀ·G` and `dB = s·G·Aᵀ` ([`lora_grads_from_dense`]): the fixture test
//! uses that identity to check adapter gradients against PyTorch + PEFT through `llada grad`
//! on a merged checkpoint.
//!
//! How the trainer uses this (`llada train --lora-rank`, [`crate::train::lora`]): adapters are
//! created by [`init_adapter`] (PEFT's initialisation: `A` kaiming-uniform, `B` zero, so step 0
//! is the base model), every targeted linear's forward runs [`lora_linear`] instead of the plain linear and
//! keeps `u`, its backward runs [`lora_linear_bwd`] instead of the plain backward (no `dW`),
//! [`LoraGrads`] collects `dA`/`dB`, [`LoraGrads::clip`] and [`LoraAdamW::step`] update the
//! adapter, and [`crate::lora::Adapter::save`] writes it in PEFT's format.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::{adaptable_modules, Adapter, LoraConfig, LoraModule, ModuleKind, Targets};
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use crate::hf::write::HostTensor;
use crate::train::backend::{LinearBwd, MatMul};
use crate::train::ops::{dot, Real};
use crate::train::optim::{adamw_update, AdamWConfig, AdamWStep};

/// Counter-RNG stream of the adapters' initial `A` values (keyed by module index and element).
pub const STREAM_LORA_INIT: u64 = 21;

/// The adapter of one linear: `A` `[r, K]`, `B` `[M, r]`, scale `s`.
#[derive(Clone, Copy, Debug)]
pub struct Factors<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub s: T,
    pub r: usize,
}

/// Forward of a LoRA linear (module docs): writes `u` `[N, r]` and `y` `[N, M]`.
pub fn lora_linear<T: Real>(
    y: &mut [T],
    u: &mut [T],
    x: &[T],
    w: &[T],
    f: Factors<'_, T>,
    d: MatMul,
) {
    let (Factors { a, b, s, r }, MatMul { n, k, m }) = (f, d);
    debug_assert!(y.len() >= n * m && u.len() >= n * r && x.len() >= n * k);
    debug_assert!(w.len() >= m * k && a.len() >= r * k && b.len() >= m * r);
    y[..n * m]
        .par_chunks_mut(m)
        .zip(u[..n * r].par_chunks_mut(r))
        .zip(x[..n * k].par_chunks(k))
        .for_each(|((yr, ur), xr)| {
            for (o, ar) in ur.iter_mut().zip(a.chunks_exact(k)) {
                *o = dot(xr, ar);
            }
            for ((o, wr), br) in yr.iter_mut().zip(w.chunks_exact(k)).zip(b.chunks_exact(r)) {
                *o = dot(xr, wr) + s * dot(ur, br);
            }
        });
}

/// Backward of [`lora_linear`] (module docs): `dA`, `dB` accumulated (`+=`), `dx` written when
/// given. `u` is the forward's. Allocates one `[N, r]` scratch buffer.
pub fn lora_linear_bwd<T: Real>(
    dx: Option<&mut [T]>,
    (da, db): (&mut [T], &mut [T]),
    u: &[T],
    f: Factors<'_, T>,
    io: LinearBwd<'_, T>,
) {
    let (Factors { a, b, s, r }, LinearBwd { dy, x, w, d }) = (f, io);
    let MatMul { n, k, m } = d;
    // e = dy·B [N, r]
    let mut e = vec![T::zero(); n * r];
    e.par_chunks_mut(r)
        .zip(dy[..n * m].par_chunks(m))
        .for_each(|(er, dyr)| {
            for (&g, br) in dyr.iter().zip(b.chunks_exact(r)) {
                for (o, &bv) in er.iter_mut().zip(br) {
                    *o += g * bv;
                }
            }
        });
    // dB[j, :] += s·Σ_i dy[i, j]·u[i, :]
    add_scaled_outer(&mut db[..m * r], s, (dy, m), (u, r), n);
    // dA[q, :] += s·Σ_i e[i, q]·x[i, :]
    add_scaled_outer(&mut da[..r * k], s, (&e, r), (x, k), n);
    if let Some(dx) = dx {
        dx[..n * k]
            .par_chunks_mut(k)
            .zip(dy[..n * m].par_chunks(m))
            .zip(e.par_chunks(r))
            .for_each(|((dxr, dyr), er)| {
                dxr.fill(T::zero());
                for (&g, wr) in dyr.iter().zip(w.chunks_exact(k)) {
                    for (o, &wv) in dxr.iter_mut().zip(wr) {
                        *o += g * wv;
                    }
                }
                for (&g, ar) in er.iter().zip(a.chunks_exact(k)) {
                    let g = s * g;
                    for (o, &av) in dxr.iter_mut().zip(ar) {
                        *o += g * av;
                    }
                }
            });
    }
}

/// `out[j, :] += s·Σ_{i < n} g[i, j]·v[i, :]` (`g` rows of `gw`, `v` and `out` rows of `w`), i
/// ascending.
fn add_scaled_outer<T: Real>(
    out: &mut [T],
    s: T,
    (g, gw): (&[T], usize),
    (v, w): (&[T], usize),
    n: usize,
) {
    out.par_chunks_mut(w).enumerate().for_each(|(j, or)| {
        for i in 0..n {
            let c = s * g[i * gw + j];
            for (o, &vv) in or.iter_mut().zip(&v[i * w..(i + 1) * w]) {
                *o += c * vv;
            }
        }
    });
}

/// `dA += s·Bᵀ·G` `[r, K]` and `dB += s·G·Aᵀ` `[M, r]` from the dense gradient `G` `[M, K]` of
/// the merged weight `W + s·B·A` (the same numbers [`lora_linear_bwd`] gives, summed in
/// another order).
pub fn lora_grads_from_dense<T: Real>(
    (da, db): (&mut [T], &mut [T]),
    g: &[T],
    f: Factors<'_, T>,
    k: usize,
    m: usize,
) {
    let Factors { a, b, s, r } = f;
    for j in 0..m {
        let gr = &g[j * k..(j + 1) * k];
        for q in 0..r {
            let bq = s * b[j * r + q];
            for (o, &gv) in da[q * k..(q + 1) * k].iter_mut().zip(gr) {
                *o += bq * gv;
            }
            db[j * r + q] += s * dot(gr, &a[q * k..(q + 1) * k]);
        }
    }
}

/// The modules `targets` selects under PEFT's list rule: module `M` is adapted when `M` ends
/// with `"." + target` (so `ff_out` selects every block's down projection *and* the LM head
/// `model.transformer.ff_out`, as in PEFT). Full module names work too. Only linear layers
/// train here; a target that selects nothing or the embedding is an error.
pub fn select_modules(cfg: &ModelConfig, targets: &[String]) -> Result<Vec<String>> {
    let all = adaptable_modules(cfg);
    let mut out = Vec::new();
    for t in targets {
        let hits: Vec<&String> = all
            .keys()
            .filter(|m| *m == t || m.ends_with(&format!(".{t}")))
            .collect();
        if hits.is_empty() {
            bail!(
                "LoRA target {t:?} matches no module (targets are module-name suffixes such as {})",
                super::LINEAR_PARTS.join(", ")
            );
        }
        for h in hits {
            if all[h].0 == ModuleKind::Embedding {
                bail!("LoRA target {t:?} selects the embedding {h}: only linear layers train with LoRA");
            }
            if !out.contains(h) {
                out.push(h.clone());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A fresh adapter as PEFT's `init_lora_weights=True` makes it: `A` kaiming-uniform with
/// `a = √5`, i.e. uniform in `±1/√in` (from the counter RNG, stream [`STREAM_LORA_INIT`],
/// keyed by `seed` and the module's index in sorted order), `B` zero, so the adapted model
/// starts equal to the base.
pub fn init_adapter(
    cfg: &ModelConfig,
    targets: &[String],
    r: usize,
    alpha: f64,
    use_rslora: bool,
    seed: u64,
) -> Result<Adapter> {
    if r == 0 || r > super::MAX_RANK {
        bail!("LoRA rank {r} must be in 1..={}", super::MAX_RANK);
    }
    if !alpha.is_finite() {
        bail!("LoRA alpha {alpha} is not finite");
    }
    let modules = select_modules(cfg, targets)?;
    let shapes = adaptable_modules(cfg);
    let mut out = BTreeMap::new();
    for (mi, name) in modules.iter().enumerate() {
        let [rows, cols] = shapes[name].1;
        let bound = 1.0 / (cols as f64).sqrt();
        let key = crate::rng::cell_key(seed, STREAM_LORA_INIT, mi as u64, 0, 0);
        let a = (0..r * cols)
            .map(|i| {
                (bound * (2.0 * crate::rng::uniform(crate::rng::bits(key, i as u64)) - 1.0)) as f32
            })
            .collect();
        out.insert(
            name.clone(),
            LoraModule {
                kind: ModuleKind::Linear,
                rank: r,
                alpha,
                base_shape: [rows, cols],
                a,
                b: vec![0.0; rows * r],
            },
        );
    }
    let mut config = LoraConfig::new(r, alpha, use_rslora);
    config.target_modules = Targets::Names(targets.to_vec());
    Ok(Adapter {
        config,
        modules: out,
        replaced: BTreeMap::new(),
    })
}

/// Gradients of an adapter's factors, module by module (`dA`, `dB` in the shapes of `A`, `B`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGrads {
    pub modules: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

impl LoraGrads {
    pub fn zeros_like(ad: &Adapter) -> LoraGrads {
        LoraGrads {
            modules: ad
                .modules
                .iter()
                .map(|(n, m)| (n.clone(), (vec![0.0; m.a.len()], vec![0.0; m.b.len()])))
                .collect(),
        }
    }
    pub fn fill_zero(&mut self) {
        for (a, b) in self.modules.values_mut() {
            a.fill(0.0);
            b.fill(0.0);
        }
    }
    /// Global L2 norm (f64 accumulation), as [`crate::train::optim::grad_norm`].
    pub fn norm(&self) -> f64 {
        self.modules
            .values()
            .flat_map(|(a, b)| a.iter().chain(b))
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt()
    }
    /// PyTorch `clip_grad_norm_` (as [`crate::train::optim::clip_grad_norm`]); returns the norm
    /// before clipping. `max_norm <= 0` disables clipping.
    pub fn clip(&mut self, max_norm: f64) -> f64 {
        let norm = self.norm();
        if max_norm > 0.0 {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                for (a, b) in self.modules.values_mut() {
                    for x in a.iter_mut().chain(b.iter_mut()) {
                        *x *= coef as f32;
                    }
                }
            }
        }
        norm
    }
}

/// AdamW state of an adapter: f32 first and second moments of every `A` and `B`, and the
/// number of updates taken. The update is [`crate::train::optim::adamw_update`], the one the
/// full-weight optimizer runs (A and B are matrices: they get the weight decay).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdamW {
    pub cfg: AdamWConfig,
    pub m: LoraGrads,
    pub v: LoraGrads,
    pub t: u64,
}

impl LoraAdamW {
    pub fn new(cfg: AdamWConfig, ad: &Adapter) -> LoraAdamW {
        LoraAdamW {
            cfg,
            m: LoraGrads::zeros_like(ad),
            v: LoraGrads::zeros_like(ad),
            t: 0,
        }
    }

    /// One update of the adapter's factors with gradients `g` at learning rate `lr`.
    pub fn step(&mut self, ad: &mut Adapter, g: &LoraGrads, lr: f64) -> Result<()> {
        self.t += 1;
        let s = AdamWStep::new(&self.cfg, self.t, lr);
        for (name, md) in ad.modules.iter_mut() {
            let (Some((ga, gb)), Some((ma, mb)), Some((va, vb))) = (
                g.modules.get(name),
                self.m.modules.get_mut(name),
                self.v.modules.get_mut(name),
            ) else {
                bail!("LoRA optimizer: no gradient or moments for module {name}");
            };
            if ga.len() != md.a.len() || gb.len() != md.b.len() {
                bail!("LoRA optimizer: gradient of {name} has the wrong size");
            }
            adamw_update(&mut md.a, ga, ma, va, s.decay(2), &s);
            adamw_update(&mut md.b, gb, mb, vb, s.decay(2), &s);
        }
        Ok(())
    }

    /// The moments as tensors for a checkpoint: `exp_avg.<PEFT name>` and
    /// `exp_avg_sq.<PEFT name>` (f32); the step count `t` is the caller's to store.
    pub fn tensors(&self, ad: &Adapter) -> Vec<HostTensor> {
        let mut out = Vec::new();
        for (prefix, st) in [("exp_avg", &self.m), ("exp_avg_sq", &self.v)] {
            let mut like = ad.clone();
            for (name, md) in like.modules.iter_mut() {
                if let Some((a, b)) = st.modules.get(name) {
                    md.a = a.clone();
                    md.b = b.clone();
                }
            }
            for (n, _, shape, v) in like.tensors() {
                out.push((format!("{prefix}.{n}"), DType::F32, shape, v));
            }
        }
        out
    }

    /// Restore moments written by [`LoraAdamW::tensors`] (looked up by name through `get`).
    pub fn load(
        cfg: AdamWConfig,
        ad: &Adapter,
        t: u64,
        mut get: impl FnMut(&str) -> Result<Vec<f32>>,
    ) -> Result<LoraAdamW> {
        let mut o = LoraAdamW::new(cfg, ad);
        o.t = t;
        for (prefix, st) in [("exp_avg", &mut o.m), ("exp_avg_sq", &mut o.v)] {
            for (module, (a, b)) in st.modules.iter_mut() {
                for (part, dst) in [("A", a), ("B", b)] {
                    let name =
                        format!("{prefix}.{}{module}.lora_{part}.weight", super::PEFT_PREFIX);
                    let v = get(&name)?;
                    if v.len() != dst.len() {
                        bail!(
                            "LoRA optimizer state: {name} holds {} values, expected {}",
                            v.len(),
                            dst.len()
                        );
                    }
                    dst.copy_from_slice(&v);
                }
            }
        }
        Ok(o)
    }
}
