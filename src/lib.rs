//! llada: an inference and training engine for LLaDA masked-diffusion language models.
//!
//! The map, bottom up; each layer imports only the layers below it.
//!
//! 1. **The model folder** — [`hf`]: `config.json`, safetensors weights (memory-mapped and
//!    validated), the tokenizer and its sandboxed chat template, the random-weight presets, and
//!    the bounded file I/O every stranger's file goes through.
//! 2. **The ops** — [`backend`]: the op-level [`backend::Backend`] interface; [`backend::cpu`]
//!    is the executable specification every kernel is tested against, [`backend::cuda`] the
//!    fast one (`kernels/*.cu`, one file per op). [`nvtx`]: profiler ranges.
//! 3. **The engine** — [`engine`]: the LLaDA forward pass written once over `Backend`
//!    ([`engine::model`]), the head and RNG that turn logits into (token, confidence) pairs
//!    bit-reproducibly, upstream's `generate` and Fast-dLLM's caches ([`engine::sampler`]), and
//!    [`engine::Engine`], which opens a model on a device for the binaries.
//! 4. **Workloads** — [`batch`] (offline JSONL generation: sharding, resume, merge, the OpenAI
//!    batch format), [`loglik`] and [`eval`] (Monte-Carlo ELBO, multiple-choice scoring),
//!    [`serve`] (the OpenAI-compatible HTTP server), [`train`] (losses, backward, AdamW, data
//!    parallelism), [`lora`] (PEFT adapters) and [`quant`] (FP8 weights and activations).
//!
//! The binaries (`src/bin/llada`, `bench/llada_bench.rs`) parse flags, call a workload, and print.

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
