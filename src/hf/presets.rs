//! Random-weight presets (`tiny`, `llada-1b`, `llada-8b`) for smoke tests and benchmarks.
//!
//! A preset is a [`ModelConfig`] plus a [`Checkpoint`] of lazily generated weights: every matrix
//! (embedding and LM head included) is [`WeightSource::Random`] with standard deviation 0.02 and
//! every norm weight is [`WeightSource::Const`] 1.0, so nothing is materialised until a backend
//! loads it. Each tensor gets its own seed, `mix64(seed ^ fnv1a64(name))`, so tensors differ
//! from each other and do not depend on the order they are created in.
//!
//! `tiny` matches the tiny tokenizer of [`crate::hf::tiny::write_tiny_tokenizer`], and
//! [`crate::hf::init::write_preset_folder`] writes any preset as a complete Hugging Face model folder (streamed).

use std::collections::HashMap;

use anyhow::{bail, Result};

use crate::hf::checkpoint::{expected_tensors, Checkpoint, WeightSource};
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use crate::hf::tiny::TINY_VOCAB;

/// Names accepted by [`preset_config`].
pub const PRESETS: [&str; 3] = ["tiny", "llada-1b", "llada-8b"];

/// Standard deviation of the random matrices (upstream's `init_std`).
pub const INIT_STD: f32 = 0.02;

/// The config of a preset:
/// - `tiny`: C 128, NH = NKV 2 (head dim 64, which the CUDA attention kernel supports),
///   2 layers, F 320, V 512, ids of the tiny tokenizer;
/// - `llada-1b`: a LLaDA-shaped model for the training benchmark (not a released model): C 2048,
///   NH = NKV 16 (head dim 128, as LLaDA-8B), 14 layers, F 5632, and LLaDA-8B's vocabulary
///   (126464), special ids, RoPE θ, eps and max sequence length. Exactly 1,237,379,072
///   parameters: 2·126464·2048 = 517,996,544 in the embedding and the untied LM head,
///   14·(4·2048² + 3·2048·5632 + 2·2048) = 719,380,480 in the blocks, 2048 in the final norm;
/// - `llada-8b`: exactly LLaDA-8B's `config.json` (reference §1.1).
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    let cfg = match name {
        "tiny" => ModelConfig {
            d_model: 128,
            n_heads: 2,
            n_kv_heads: 2,
            n_layers: 2,
            mlp_hidden_size: 320,
            vocab_size: 512,
            embedding_size: 512,
            max_sequence_length: 1024,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            mask_token_id: TINY_VOCAB.mask,
            eos_token_id: TINY_VOCAB.eos,
            pad_token_id: TINY_VOCAB.eos,
        },
        "llada-1b" => ModelConfig {
            d_model: 2048,
            n_heads: 16,
            n_kv_heads: 16,
            n_layers: 14,
            mlp_hidden_size: 5632,
            vocab_size: 126464,
            embedding_size: 126464,
            max_sequence_length: 4096,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            mask_token_id: 126336,
            eos_token_id: 126081,
            pad_token_id: 126081,
        },
        "llada-8b" => ModelConfig {
            d_model: 4096,
            n_heads: 32,
            n_kv_heads: 32,
            n_layers: 32,
            mlp_hidden_size: 12288,
            // LLaDA-8B's vocabulary, special ids, RoPE θ, eps and max sequence length.
            ..preset_config("llada-1b")?
        },
        _ => bail!("unknown preset `{name}` (known: {})", PRESETS.join(", ")),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// FNV-1a, 64 bit: a stable hash of tensor names for the per-tensor seeds.
fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Seed of tensor `name` in a preset with seed `seed`.
pub fn tensor_seed(seed: u64, name: &str) -> u64 {
    crate::rng::mix64(seed ^ fnv1a64(name))
}

/// The random weights of a model with config `cfg`, stored as `dtype`, in checkpoint order:
/// matrices [`WeightSource::Random`] (std [`INIT_STD`], seed [`tensor_seed`]), norm weights
/// [`WeightSource::Const`] 1.0. Nothing is materialised.
pub fn preset_sources(cfg: &ModelConfig, seed: u64, dtype: DType) -> Vec<(String, WeightSource)> {
    expected_tensors(cfg)
        .into_iter()
        .map(|(tname, shape)| {
            let src = if shape.len() == 1 {
                WeightSource::Const {
                    value: 1.0,
                    dtype,
                    shape,
                    name: tname.clone(),
                }
            } else {
                WeightSource::Random {
                    seed: tensor_seed(seed, &tname),
                    std: INIT_STD,
                    dtype,
                    shape,
                    name: tname.clone(),
                }
            };
            (tname, src)
        })
        .collect()
}

/// The random weights of a preset, stored as `dtype`; nothing is materialised.
pub fn preset_checkpoint(name: &str, seed: u64, dtype: DType) -> Result<Checkpoint> {
    let cfg = preset_config(name)?;
    let map: HashMap<String, WeightSource> =
        preset_sources(&cfg, seed, dtype).into_iter().collect();
    let mut ck = Checkpoint::from_sources(map);
    ck.check_against(&cfg)?;
    Ok(ck)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameters of preset `name`, and its tensor count.
    fn count(name: &str) -> (usize, usize) {
        let cfg = preset_config(name).unwrap();
        let t = expected_tensors(&cfg);
        (
            t.iter().map(|(_, s)| s.iter().product::<usize>()).sum(),
            t.len(),
        )
    }

    #[test]
    fn llada_8b_parameter_count() {
        // Reference §2.1: 8,015,581,184 parameters.
        let (n, tensors) = count("llada-8b");
        assert_eq!(n, 8_015_581_184);
        assert_eq!(tensors, 291);
    }

    #[test]
    fn llada_1b_parameter_count() {
        // The count stated in `preset_config`'s docs, from its own terms.
        let (n, tensors) = count("llada-1b");
        let (v, c, f, l) = (126464, 2048, 5632, 14);
        assert_eq!(n, 2 * v * c + l * (4 * c * c + 3 * c * f + 2 * c) + c);
        assert_eq!(n, 1_237_379_072);
        assert_eq!(tensors, 3 + 9 * 14);
        let cfg = preset_config("llada-1b").unwrap();
        assert_eq!(cfg.head_dim(), 128);
        // Same vocabulary and special ids as LLaDA-8B.
        let big = preset_config("llada-8b").unwrap();
        assert_eq!(
            (
                cfg.vocab_size,
                cfg.embedding_size,
                cfg.mask_token_id,
                cfg.eos_token_id
            ),
            (
                big.vocab_size,
                big.embedding_size,
                big.mask_token_id,
                big.eos_token_id
            )
        );
        assert!(preset_config("llada-2b").is_err());
    }

    #[test]
    fn tensors_differ_and_have_requested_std() {
        let ck = preset_checkpoint("tiny", 7, DType::F32).unwrap();
        let a = ck
            .read_f32("model.transformer.blocks.0.q_proj.weight")
            .unwrap();
        let b = ck
            .read_f32("model.transformer.blocks.0.k_proj.weight")
            .unwrap();
        assert_ne!(a, b);
        // Uniform with std 0.02 over 4096 samples: the sample std is within a few percent.
        let var = a.iter().map(|x| (x * x) as f64).sum::<f64>() / a.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.002, "std {}", var.sqrt());
        assert!(ck
            .read_f32("model.transformer.ln_f.weight")
            .unwrap()
            .iter()
            .all(|&x| x == 1.0));
    }
}
