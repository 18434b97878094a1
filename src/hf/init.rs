//! Freshly initialised weights written as a Hugging Face folder (`llada init`, `llada init-tiny`):
//! a preset's (or any) config and every tensor generated and written a chunk at a time through
//! [`crate::hf::write::write_weight_shards`], so writing even `llada-8b` holds a few chunks of
//! values in memory, never a whole tensor.
//!
//! Two initialisations ([`InitFn`]):
//! - `uniform`: exactly the presets' weights (what `--preset NAME --weights-seed S` loads,
//!   [`crate::hf::presets`]): every matrix uniform with standard deviation 0.02
//!   ([`WeightSource::Random`]), every norm weight 1;
//! - `mitchell`: upstream LLaDA's initialisation (its `config.json` has `"init_fn": "mitchell"`;
//!   OLMo's `init_weights`): every matrix truncated normal, cut at ±3σ, with σ = 1/√(fan-in)
//!   (the embedding and the LM head too: 1/√C), and the output projections of layer `l`
//!   (`attn_out`, `ff_out`) further divided by √(2(l+1)); every norm weight 1. Element `i` of a
//!   tensor is `σ·Φ⁻¹(Φ(−3) + u·(Φ(3) − Φ(−3)))` for the same uniform `u` the presets draw
//!   (same per-tensor seeds), rounded once to the stored dtype.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::hf::checkpoint::{block_tensor, expected_tensors, WeightSource};
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use crate::hf::presets::{preset_config, preset_sources, tensor_seed};
use crate::hf::write::{write_text_atomic, write_weight_shards, RangeSource};

/// How the matrices are initialised (norm weights are always 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitFn {
    /// The presets' weights: uniform, standard deviation 0.02.
    Uniform,
    /// Upstream LLaDA's `init_fn = "mitchell"`: truncated normal, σ = 1/√(fan-in), output
    /// projections of layer `l` divided by √(2(l+1)).
    Mitchell,
}

impl InitFn {
    /// The `--init` names.
    pub const NAMES: &'static [(&'static str, InitFn)] =
        &[("uniform", InitFn::Uniform), ("mitchell", InitFn::Mitchell)];
}

impl std::str::FromStr for InitFn {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        crate::names::parse("--init", InitFn::NAMES, s)
    }
}

/// What a written folder holds besides its config.
#[derive(Clone, Copy, Debug)]
pub struct InitOptions {
    /// Seed of every tensor (per-tensor seeds derive from it and the tensor's name).
    pub seed: u64,
    /// Stored dtype of every tensor.
    pub dtype: DType,
    /// Number of safetensors files (1: `model.safetensors`; more: contiguous runs of tensors
    /// with an index).
    pub shards: usize,
    pub init: InitFn,
}

/// One tensor to write: a weight source (the presets' tensors), or a truncated normal.
#[derive(Clone, Debug)]
pub enum InitTensor {
    Source(WeightSource),
    /// Normal with standard deviation `std` cut at ±3·`std` (see the module docs).
    TruncNormal {
        seed: u64,
        std: f32,
        dtype: DType,
        shape: Vec<usize>,
    },
}

/// Φ(−3), the standard normal's mass below −3.
const PHI_MINUS_3: f64 = 0.001_349_898_031_630_094_6;

/// The standard normal quantile Φ⁻¹(p) for p in (0, 1) (Acklam's rational approximation,
/// relative error below 1.2e-9: far below f32's 6e-8).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let poly = |c: &[f64], x: f64| c.iter().fold(0.0, |acc, &k| acc * x + k);
    let tail = |q: f64| {
        let s = (-2.0 * q.ln()).sqrt();
        poly(&C, s) / (poly(&D, s) * s + 1.0)
    };
    const LOW: f64 = 0.02425;
    if p < LOW {
        tail(p)
    } else if p > 1.0 - LOW {
        -tail(1.0 - p)
    } else {
        let q = p - 0.5;
        let r = q * q;
        poly(&A, r) * q / (poly(&B, r) * r + 1.0)
    }
}

impl RangeSource for InitTensor {
    fn shape(&self) -> &[usize] {
        match self {
            InitTensor::Source(s) => s.shape(),
            InitTensor::TruncNormal { shape, .. } => shape,
        }
    }
    fn dtype(&self) -> DType {
        match self {
            InitTensor::Source(s) => s.dtype(),
            InitTensor::TruncNormal { dtype, .. } => *dtype,
        }
    }
    fn read_range(&self, from: usize, to: usize, out: &mut [f32]) {
        match self {
            InitTensor::Source(s) => s.read_range(from, to, out),
            InitTensor::TruncNormal {
                seed, std, dtype, ..
            } => {
                let key = crate::rng::cell_key(*seed, crate::rng::STREAM_WEIGHTS, 0, 0, 0);
                let width = 1.0 - 2.0 * PHI_MINUS_3;
                for (o, i) in out.iter_mut().zip(from..to) {
                    let u = crate::rng::uniform(crate::rng::bits(key, i as u64));
                    let z = normal_quantile(PHI_MINUS_3 + u * width).clamp(-3.0, 3.0);
                    *o = dtype.round((*std as f64 * z) as f32);
                }
            }
        }
    }
}

/// Upstream's σ for matrix `name` of shape `[out, in]`: 1/√in, divided by √(2(l+1)) for the
/// output projections of layer `l` (`layer_of_out` maps their names to `l`).
fn mitchell_std(name: &str, shape: &[usize], layer_of_out: &HashMap<String, usize>) -> f32 {
    let fan_in = shape.get(1).copied().unwrap_or(1).max(1) as f64;
    let mut std = 1.0 / fan_in.sqrt();
    if let Some(&l) = layer_of_out.get(name) {
        std /= (2.0 * (l as f64 + 1.0)).sqrt();
    }
    std as f32
}

/// Every tensor of a model with config `cfg`, in checkpoint order, initialised by `o.init`.
pub fn init_tensors(cfg: &ModelConfig, o: &InitOptions) -> Vec<(String, InitTensor)> {
    match o.init {
        InitFn::Uniform => preset_sources(cfg, o.seed, o.dtype)
            .into_iter()
            .map(|(n, s)| (n, InitTensor::Source(s)))
            .collect(),
        InitFn::Mitchell => {
            let mut out_layer = HashMap::new();
            for l in 0..cfg.n_layers {
                out_layer.insert(block_tensor(l, "attn_out"), l);
                out_layer.insert(block_tensor(l, "ff_out"), l);
            }
            expected_tensors(cfg)
                .into_iter()
                .map(|(name, shape)| {
                    let t = if shape.len() == 1 {
                        InitTensor::Source(WeightSource::Const {
                            value: 1.0,
                            dtype: o.dtype,
                            shape,
                            name: name.clone(),
                        })
                    } else {
                        InitTensor::TruncNormal {
                            seed: tensor_seed(o.seed, &name),
                            std: mitchell_std(&name, &shape, &out_layer),
                            dtype: o.dtype,
                            shape,
                        }
                    };
                    (name, t)
                })
                .collect()
        }
    }
}

/// Write the weights and `config.json` of a model with config `cfg` into `dir` (created if
/// missing; weight files of the other layout are removed), streamed: a few chunks of values in
/// memory at a time. `o.shards` must be 1 to the number of tensors.
pub fn write_init_folder(dir: &Path, cfg: &ModelConfig, o: &InitOptions) -> Result<()> {
    cfg.validate()?;
    let tensors = init_tensors(cfg, o);
    let refs: Vec<(String, &InitTensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    // The weights first (the shard count is checked there), the config last.
    write_weight_shards(dir, &refs, o.shards)?;
    write_text_atomic(&dir.join("config.json"), &cfg.to_json())
}

/// Write preset `name` as a folder: [`write_init_folder`] with the preset's config, plus the
/// tiny tokenizer for `tiny` (the other presets have LLaDA's vocabulary, whose tokenizer is not
/// shipped: train them on `{"ids": [...]}` data).
pub fn write_preset(name: &str, dir: &Path, o: &InitOptions) -> Result<()> {
    let cfg = preset_config(name)?;
    write_init_folder(dir, &cfg, o)?;
    if name == "tiny" {
        crate::hf::tiny::write_tiny_tokenizer(dir)?;
    }
    Ok(())
}

/// `dir` must be new or an empty folder: a writer never mixes its files with another model's.
pub fn check_new_folder(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} exists and is not empty: give a new or empty folder",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) if dir.exists() => bail!("{} exists and is not a folder", dir.display()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

/// Write preset `name` as a complete Hugging Face model folder in `dir`: `config.json`, the
/// weights `--preset NAME` loads (`model.safetensors`, or `shards` shards with an index),
/// streamed, and for `tiny` its `tokenizer.json` and `tokenizer_config.json` (with the
/// LLaDA-Instruct chat template). [`write_preset`] also writes upstream's initialisation.
pub fn write_preset_folder(
    name: &str,
    dir: &Path,
    seed: u64,
    dtype: DType,
    shards: usize,
) -> Result<()> {
    let o = InitOptions {
        seed,
        dtype,
        shards,
        init: InitFn::Uniform,
    };
    write_preset(name, dir, &o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_known_values() {
        // Φ⁻¹ at Φ(−3), Φ(−1), 0.02, 0.5, 0.975 (reference values to 16 digits).
        for (p, want) in [
            (PHI_MINUS_3, -3.0),
            (0.158_655_253_931_457_05, -1.0),
            (0.02, -2.053_748_910_631_823),
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (1.0 - PHI_MINUS_3, 3.0),
        ] {
            let got = normal_quantile(p);
            assert!(
                (got - want).abs() <= 2e-9 * want.abs().max(1.0),
                "Φ⁻¹({p}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn mitchell_std_follows_upstream() {
        let cfg = preset_config("tiny").unwrap();
        let o = InitOptions {
            seed: 1,
            dtype: DType::F32,
            shards: 1,
            init: InitFn::Mitchell,
        };
        let t: HashMap<String, InitTensor> = init_tensors(&cfg, &o).into_iter().collect();
        let std = |n: &str| match &t[n] {
            InitTensor::TruncNormal { std, .. } => *std as f64,
            other => panic!("{n}: {other:?}"),
        };
        let (c, f) = (cfg.d_model as f64, cfg.mlp_hidden_size as f64);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-7 * b;
        assert!(close(std(crate::hf::checkpoint::WTE), 1.0 / c.sqrt()));
        assert!(close(std(crate::hf::checkpoint::LM_HEAD), 1.0 / c.sqrt()));
        assert!(close(std(&block_tensor(1, "q_proj")), 1.0 / c.sqrt()));
        assert!(close(std(&block_tensor(1, "up_proj")), 1.0 / c.sqrt()));
        // Layer 1: divided by √(2·2) = 2.
        assert!(close(
            std(&block_tensor(1, "attn_out")),
            1.0 / c.sqrt() / 2.0
        ));
        assert!(close(std(&block_tensor(1, "ff_out")), 1.0 / f.sqrt() / 2.0));
        assert!(close(
            std(&block_tensor(0, "ff_out")),
            1.0 / f.sqrt() / 2f64.sqrt()
        ));
        assert!(matches!(
            &t[&block_tensor(0, "attn_norm")],
            InitTensor::Source(WeightSource::Const { value, .. }) if *value == 1.0
        ));
    }
}
