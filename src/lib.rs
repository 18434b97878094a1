//! llada: an inference and training engine for LLaDA masked-diffusion language models.
//!
//! Layers, bottom up:
//! - [`config`], [`checkpoint`], [`tokenizer`]: what a Hugging Face model folder holds.
//! - [`backend`]: the op-level interface the model is written against; [`backend::cpu`] is the
//!   executable specification, [`backend::cuda`] the fast one.
//! - [`model`]: the LLaDA forward pass, written once over [`backend::Backend`].
//! - [`head`] and [`rng`]: turning logits into (token, confidence) pairs, bit-reproducibly.
//! - [`sampler`]: upstream `generate` (blocks, schedule, remasking, CFG, EOS rules) over a
//!   [`sampler::Predictor`].
//! - [`batch`]: offline JSONL batch generation (sharding, bucketing, resume, merge).
//! - [`lora`]: PEFT LoRA adapters (read, write, merge at load) and their training math.
//! - [`loglik`] and [`eval`]: upstream's Monte-Carlo log-likelihood (ELBO) and lm-eval-style
//!   multiple-choice scoring over a [`loglik::Scorer`].
//! - [`serve`]: `llada serve`, the OpenAI-compatible HTTP server.
//! - [`quant`]: FP8 (E4M3) weights and activations: format, quantized checkpoints, CPU reference.

pub mod backend;
pub mod batch;
pub mod engine;
pub mod eval;
pub mod hf;
pub mod loglik;
pub mod lora;
pub mod nvtx;
pub mod quant;
pub mod serve;
pub mod train;
