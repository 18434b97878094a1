//! llada: an inference and training engine for LLaDA masked-diffusion language models.
//!
//! The map, bottom up; each layer imports only the layers below it.
//!
//! 0. **Foundations** — [`rng`]: the counter-based RNG every device reproduces bit for bit;
//!    [`names`]: the name tables of the choices flags and files spell out.
//! 1. **The model folder** — [`hf`]: `config.json`, safetensors weights (memory-mapped and
//!    validated), the tokenizer and its sandboxed chat template, the random-weight presets, and
//!    the bounded file I/O every stranger's file goes through.
//! 2. **The ops** — [`backend`]: the op-level [`backend::Backend`] interface; [`backend::cpu`]
//!    is the executable specification every kernel is tested against, [`backend::cuda`] the
//!    fast one (`kernels/*.cu`, one file per op); [`backend::head`] is the head op's math
//!    (CFG, EOS rules, Gumbel-max). [`nvtx`]: profiler ranges.
//! 3. **The engine** — [`engine`]: the LLaDA forward pass written once over `Backend`
//!    ([`engine::model`]), the predictor and scorer the workloads call, upstream's `generate`
//!    and Fast-dLLM's caches ([`engine::sampler`]), and [`engine::Engine`], which opens a model
//!    on a device for the binaries. (Two imports still run upward:
//!    the engine loads FP8 weights from [`quant`] and merges adapters through [`lora`].)
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
pub mod names;
pub mod nvtx;
pub mod quant;
pub mod rng;
pub mod serve;
pub mod train;
