//! What the binaries share: open a model (folder or preset), pick a device, and run it.
//!
//! [`Engine`] hides the backend type so the CLI and the benchmark are written once; the model,
//! sampler and backends stay generic underneath.

pub mod device;
pub mod fast;
pub mod graphs;
pub mod model;
pub mod predict;
pub mod predictor;
mod replay;
pub mod sampler;
mod step;
mod stepbufs;
pub mod stepgraph;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::engine::device::{DeviceChoice, Resolved};
use crate::engine::fast::Decode;
use crate::engine::model::Model;
use crate::engine::model::Tokens;
use crate::engine::predictor::ModelPredictor;
pub use crate::engine::sampler::Observer;
use crate::engine::sampler::{GenerateOutput, GenerateParams, Hooks};
use crate::hf::checkpoint::Checkpoint;
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use crate::hf::tokenizer::Tokenizer;
use crate::hf::{init, presets};
use crate::quant::WeightsMode;

/// Where the weights come from.
#[derive(Clone, Debug)]
pub enum ModelSpec {
    /// A Hugging Face model folder.
    Dir(PathBuf),
    /// A random-weight preset (`tiny`, `llada-1b`, `llada-8b`) with a seed.
    Preset { name: String, seed: u64 },
}

/// A model folder or preset, opened (memory-mapped, validated) but not yet on a device.
pub struct Opened {
    pub cfg: ModelConfig,
    pub ckpt: Checkpoint,
    /// The tokenizer, when the folder has one (presets: `tiny` carries a tiny one).
    pub tokenizer: Option<Tokenizer>,
    pub label: String,
    /// The dtype to compute in (`--dtype`); `None`: the checkpoint's ([`Checkpoint::dtype`]).
    pub compute: Option<DType>,
    /// How [`load`] holds the linear layers (`--weights`; set it after [`Opened::open`]). A
    /// quantized folder is FP8 either way.
    pub weights: WeightsMode,
}

/// `--dtype auto|bf16|f32`: the compute dtype, like transformers' `torch_dtype` (`auto` = the
/// checkpoint's). Weights are converted while loading ([`crate::hf::checkpoint::cast_source`]).
pub fn parse_compute_dtype(s: &str) -> Result<Option<DType>> {
    match s {
        "auto" => Ok(None),
        "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
        "f32" | "float32" => Ok(Some(DType::F32)),
        _ => bail!("unknown --dtype {s:?}: expected auto, bf16 or f32"),
    }
}

impl Opened {
    pub fn open(spec: &ModelSpec) -> Result<Opened> {
        match spec {
            ModelSpec::Dir(dir) => {
                let cfg_path = crate::hf::checkpoint::resolve_in_folder(dir, "config.json", dir)?;
                let cfg = ModelConfig::from_file(&cfg_path)?;
                let ckpt = Checkpoint::open(dir, &cfg)?;
                let source = cfg_path.display().to_string();
                let cfg_text =
                    crate::hf::fsio::read_text_file(&cfg_path, crate::hf::fsio::MAX_CONFIG_BYTES)?;
                let quantized = crate::quant::check_quantization_config(&cfg_text, &source)?;
                crate::quant::check_consistent(quantized, &ckpt, &cfg, &source)?;
                let tokenizer = if dir.join("tokenizer.json").is_file() {
                    Some(Tokenizer::from_dir(dir, &cfg)?)
                } else {
                    None
                };
                Ok(Opened {
                    cfg,
                    ckpt,
                    tokenizer,
                    label: dir.display().to_string(),
                    compute: None,
                    weights: WeightsMode::Checkpoint,
                })
            }
            ModelSpec::Preset { name, seed } => {
                let cfg = presets::preset_config(name)?;
                let ckpt = presets::preset_checkpoint(name, *seed, DType::BF16)?;
                Ok(Opened {
                    cfg,
                    ckpt,
                    tokenizer: None,
                    label: format!("preset {name} (random weights, seed {seed})"),
                    compute: None,
                    weights: WeightsMode::Checkpoint,
                })
            }
        }
    }

    /// Merge the PEFT LoRA adapter folder `dir` into the weights ([`crate::lora`]): every
    /// module its tensors name is read as `W + scale·B·A` (f32, rounded once to `W`'s dtype)
    /// when a backend loads it. Call before [`load`]; returns a one-line summary. Every
    /// command's `--lora DIR` (and `serve`) goes through here.
    pub fn apply_lora(&mut self, dir: &Path) -> Result<String> {
        let adapter = crate::lora::Adapter::open(dir, &self.cfg)?;
        adapter.apply(&mut self.ckpt)?;
        self.label = format!("{} + LoRA {}", self.label, dir.display());
        Ok(format!("LoRA {}: {}", dir.display(), adapter.summary()))
    }

    /// Generation defaults that come from the model: special ids and limits.
    pub fn apply_ids(&self, p: &mut GenerateParams) {
        p.mask_id = self.cfg.mask_token_id;
        p.eos_id = self.cfg.eos_token_id;
        p.pad_id = self.cfg.pad_token_id;
        p.eot_id = self.tokenizer.as_ref().and_then(|t| t.special.eot);
        p.max_sequence_length = Some(self.cfg.max_sequence_length);
    }
}

/// A model resident on some backend, ready to run.
pub trait Engine {
    /// Human-readable device, e.g. `cpu (2 threads)` or `NVIDIA H100 80GB HBM3 (cuda:0)`.
    fn device(&self) -> String;
    fn config(&self) -> &ModelConfig;
    /// The dtype logits are produced in.
    fn logits_dtype(&self) -> DType;
    /// Upstream `generate` on this model ([`Decode::is_plain`]), or Fast-dLLM decoding
    /// ([`fast::generate_fast`]) with a KV cache and/or a threshold / factor rule. `hooks`:
    /// a progress callback after every step and an observer before every forward pass (the
    /// server streams committed blocks and cancels abandoned requests through it).
    fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: &GenerateParams,
        decode: &Decode,
        hooks: Hooks<'_>,
    ) -> Result<GenerateOutput> {
        check_ids(self.config(), prompts.iter().flatten().copied())?;
        let mut p = params.clone();
        p.logits_dtype = self.logits_dtype();
        let mut pred = self.predictor();
        if decode.is_plain() {
            sampler::generate_hooked(pred.full(), prompts, &p, hooks)
        } else {
            fast::generate_fast_hooked(pred.span(), prompts, &p, decode, hooks)
        }
    }
    /// The model as a predictor of either kind (plain and cached passes), for [`Engine::generate`].
    fn predictor(&self) -> Box<dyn sampler::Predictors + '_>;
    /// Full logits `[T, V]` (f32 values of the compute dtype) for one unpadded sequence.
    fn forward_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
    /// Wait for queued device work.
    fn synchronize(&self) -> Result<()>;
    /// Device memory in use in bytes, when the backend tracks it.
    fn memory_used(&self) -> Option<usize>;
    /// Free device memory in bytes, when the backend tracks it (`None` on the CPU).
    fn memory_free(&self) -> Option<usize>;
    /// Driver description for reports.
    fn driver(&self) -> String;
    /// Measured bf16 GEMM throughput (TFLOP/s) of this backend at a large square-ish shape:
    /// the ceiling the benchmark compares against. `None` on the CPU reference.
    fn gemm_ceiling_tflops(&mut self) -> Result<Option<f64>>;
    /// A log-likelihood scorer over this model (see [`crate::loglik`]).
    fn scorer(&self) -> Box<dyn crate::engine::predictor::Scorer + '_>;
    /// Turn per-op-class timing on or off ([`Backend::prof_enable`]; graphs are off meanwhile).
    fn set_profiling(&mut self, on: bool) {
        let _ = on;
    }
    /// Milliseconds per op class since profiling was turned on or last taken.
    fn take_profile(&mut self) -> Result<Vec<(crate::backend::OpClass, f64)>> {
        Ok(Vec::new())
    }
}

struct EngineImpl<B: Backend> {
    model: Model<B>,
    device: String,
}

impl<B: Backend> Engine for EngineImpl<B> {
    fn device(&self) -> String {
        self.device.clone()
    }
    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }
    fn logits_dtype(&self) -> DType {
        self.model.backend.compute_dtype()
    }
    fn predictor(&self) -> Box<dyn sampler::Predictors + '_> {
        Box::new(ModelPredictor::new(&self.model))
    }
    fn forward_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        check_ids(&self.model.cfg, ids.iter().copied())?;
        let t = ids.len();
        if t == 0 {
            bail!("no ids given");
        }
        if t > self.model.cfg.max_sequence_length {
            bail!(
                "{t} ids exceed max_sequence_length {}",
                self.model.cfg.max_sequence_length
            );
        }
        let mut ws = self.model.workspace(t, t)?;
        let rows: Vec<u32> = (0..t as u32).collect();
        self.model
            .forward(&mut ws, Tokens::new(ids, None, &rows), 1, t)?;
        self.model.logits(&ws, t)
    }
    fn synchronize(&self) -> Result<()> {
        self.model.backend.synchronize()
    }
    fn memory_used(&self) -> Option<usize> {
        self.model.backend.memory_in_use()
    }
    fn memory_free(&self) -> Option<usize> {
        self.model.backend.memory_free()
    }
    fn driver(&self) -> String {
        self.model.backend.driver()
    }
    fn scorer(&self) -> Box<dyn crate::engine::predictor::Scorer + '_> {
        Box::new(crate::engine::predictor::ModelScorer::new(&self.model))
    }
    fn set_profiling(&mut self, on: bool) {
        self.model.backend.prof_enable(on);
    }
    fn take_profile(&mut self) -> Result<Vec<(crate::backend::OpClass, f64)>> {
        self.model.backend.prof_take()
    }
    fn gemm_ceiling_tflops(&mut self) -> Result<Option<f64>> {
        if self.model.backend.compute_dtype() != DType::BF16 || self.device.starts_with("cpu") {
            return Ok(None);
        }
        let (n, k, m) = (4096usize, 4096usize, 8192usize);
        let be = &self.model.backend;
        let random = |seed, std, shape, name: &str| {
            be.load_weight(&[crate::hf::checkpoint::WeightSource::Random {
                seed,
                std,
                dtype: DType::BF16,
                shape,
                name: name.into(),
            }])
        };
        let w = random(1, 0.02, vec![m, k], "gemm-ceiling")?;
        let x = random(2, 1.0, vec![n, k], "gemm-ceiling-x")?;
        // Fill the input with random values (never time on zeros): gather all rows of `x`.
        let mut xa = be.alloc_act(n * k)?;
        let mut ids = be.alloc_ints(n)?;
        be.write_ints(&mut ids, &(0..n as i32).collect::<Vec<_>>())?;
        be.embedding(&mut xa, &x, crate::backend::Gather::new(&ids, n, k))?;
        let mm = crate::backend::MatMul { n, k, m };
        let mut out = be.alloc_act(n * m)?;
        for _ in 0..3 {
            be.matmul(&mut out, &xa, &w, mm)?;
        }
        be.synchronize()?;
        let iters = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            be.matmul(&mut out, &xa, &w, mm)?;
        }
        be.synchronize()?;
        let s = t0.elapsed().as_secs_f64() / iters as f64;
        Ok(Some(2.0 * (n * k * m) as f64 / s / 1e12))
    }
}

fn check_ids(cfg: &ModelConfig, ids: impl Iterator<Item = u32>) -> Result<()> {
    for id in ids {
        if id as usize >= cfg.embedding_size {
            bail!(
                "token id {id} is out of range: the model has {} embeddings",
                cfg.embedding_size
            );
        }
    }
    Ok(())
}

/// Load `opened` onto the device `choice` resolves to. Returns the engine and, when `auto` fell
/// back to the CPU, the one-line notice to print.
pub fn load(opened: &Opened, choice: DeviceChoice) -> Result<(Box<dyn Engine>, Option<String>)> {
    let (dev, notice) = device::resolve(choice)?;
    let get = |name: &str| opened.ckpt.get(name).cloned();
    let fp8 = opened.weights == WeightsMode::Fp8 || opened.ckpt.has_fp8();
    let get_fp8 = |name: &str| crate::quant::fp8_weight(&opened.ckpt, name);
    let engine: Box<dyn Engine> = match dev {
        Resolved::Cpu => {
            if opened.cfg.d_model >= 2048
                && matches!(
                    opened.ckpt.get("model.transformer.wte.weight"),
                    Ok(crate::hf::checkpoint::WeightSource::Random { .. })
                )
            {
                bail!("the {} preset is too large for the CPU reference backend (it would materialise its random weights); use --device cuda or the tiny preset", opened.label);
            }
            let compute = opened.compute.unwrap_or(opened.ckpt.dtype());
            let backend = CpuBackend::new(compute);
            let threads = rayon::current_num_threads();
            let cast = |name: &str| {
                let src = opened.ckpt.get(name)?;
                Ok(crate::hf::checkpoint::cast_source(src, compute))
            };
            let model = if fp8 {
                Model::load_fp8(backend, opened.cfg.clone(), cast, get_fp8)
            } else {
                Model::load(backend, opened.cfg.clone(), cast)
            }
            .with_context(|| format!("loading {} on the CPU", opened.label))?;
            let w = if fp8 { ", fp8 weights" } else { "" };
            Box::new(EngineImpl {
                model,
                device: format!("cpu ({threads} threads, {compute} compute{w})"),
            })
        }
        Resolved::Cuda(i) => {
            if let Some(d) = opened.compute.filter(|&d| d != DType::BF16) {
                bail!("--dtype {d}: the CUDA backend computes in bf16 only (every checkpoint dtype is converted to bf16 at load); use --dtype bf16/auto, or --device cpu for {d}");
            }
            let backend = CudaBackend::new(i)?;
            let name = format!("{} (cuda:{i})", backend.device_name());
            let model = if fp8 {
                Model::load_fp8(backend, opened.cfg.clone(), get, get_fp8)
            } else {
                Model::load(backend, opened.cfg.clone(), get)
            }
            .with_context(|| format!("loading {} on cuda:{i}", opened.label))?;
            Box::new(EngineImpl {
                model,
                device: name,
            })
        }
    };
    Ok((engine, notice))
}

/// Parse `1,2,3` into ids, naming the bad item.
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .with_context(|| format!("bad token id {x:?} in {s:?}"))
        })
        .collect()
}

/// The `tiny` preset written as a Hugging Face folder (for smoke tests and the GPU check).
pub fn init_tiny(dir: &Path, seed: u64, dtype: DType, shards: usize) -> Result<()> {
    init::write_preset_folder("tiny", dir, seed, dtype, shards)
}
