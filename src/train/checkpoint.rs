//! Training checkpoints: a Hugging Face model folder that `llada generate` loads, plus what a
//! resume needs.
//!
//! `DIR/` holds `config.json`, `model.safetensors` (bf16, reference §2.1 names),
//! `tokenizer.json` / `tokenizer_config.json` (copied from the source folder, or the tiny
//! tokenizer for the `tiny` preset), and
//! - `optimizer.safetensors`: f32 `master.NAME` (the exact f32 weights), `exp_avg.NAME`,
//!   `exp_avg_sq.NAME` for every tensor NAME;
//! - `trainer_state.json`: the step reached, the AdamW step count and hyper-parameters, and the
//!   run's options (seed, batch size, schedule…), which a resume reuses so that it continues
//!   exactly as an uninterrupted run would (all randomness is a function of seed and step).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::backend::Storage;
use super::model::Params;
use super::optim::{AdamW, AdamWConfig};
use crate::hf::checkpoint::Checkpoint;
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use crate::hf::write::{write_hf_folder, write_safetensors, write_text_atomic, HostTensor};

/// Everything of a run that is not a tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub adam_t: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub options: serde_json::Value,
    /// The run's storage ([`super::mixed`]; absent, as in checkpoints before it, means f32).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub storage: Storage,
    /// A LoRA run's adapter and base model (absent for full fine-tuning; see
    /// [`super::lora_checkpoint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraRun>,
}

fn is_f32(s: &Storage) -> bool {
    *s == Storage::F32
}

/// The `lora` record of a LoRA run's `trainer_state.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoraRun {
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// `--lora-targets` as given (module-name suffixes).
    pub targets: Vec<String>,
    pub base: BaseModel,
}

/// Where a LoRA run's frozen base model came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaseModel {
    /// The model folder (absolute when it could be resolved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Or a random-weight preset and its seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    #[serde(default)]
    pub weights_seed: u64,
    /// [`super::lora_checkpoint::base_fingerprint`] of its weights, 16 hex digits.
    pub fingerprint: String,
}

impl BaseModel {
    /// How the base is named in messages.
    pub fn describe(&self) -> String {
        match (&self.model, &self.preset) {
            (Some(m), _) => format!("--model {}", m.display()),
            (None, Some(p)) => format!("--preset {p} --weights-seed {}", self.weights_seed),
            (None, None) => "an unrecorded model".into(),
        }
    }
}

/// Write the model folder and the optimizer state to `dir`. `tokenizer_from` is a folder whose
/// `tokenizer.json` / `tokenizer_config.json` are copied (when present); `tiny_tokenizer`
/// writes the tiny preset's tokenizer instead.
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    params: &Params<f32>,
    opt: &AdamW,
    state: &TrainerState,
    tokenizer_from: Option<&Path>,
    tiny_tokenizer: bool,
) -> Result<()> {
    let tensors: Vec<HostTensor> = (0..params.data.len())
        .map(|i| {
            (
                params.names[i].clone(),
                DType::BF16,
                params.shapes[i].clone(),
                params.data[i].clone(),
            )
        })
        .collect();
    write_hf_folder(dir, cfg, &tensors, 1)?;
    if tiny_tokenizer {
        crate::hf::tiny::write_tiny_tokenizer(dir)?;
    } else if let Some(src) = tokenizer_from {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let from = src.join(f);
            if from.is_file() && src.canonicalize().ok() != dir.canonicalize().ok() {
                std::fs::copy(&from, dir.join(f)).with_context(|| {
                    format!("cannot copy {} to {}", from.display(), dir.display())
                })?;
            }
        }
    }
    let mut opt_tensors: Vec<HostTensor> = Vec::with_capacity(3 * params.data.len());
    for (prefix, p) in [
        ("master.", params),
        ("exp_avg.", &opt.m),
        ("exp_avg_sq.", &opt.v),
    ] {
        for i in 0..p.data.len() {
            opt_tensors.push((
                format!("{prefix}{}", p.names[i]),
                DType::F32,
                p.shapes[i].clone(),
                p.data[i].clone(),
            ));
        }
    }
    write_safetensors(&dir.join("optimizer.safetensors"), &opt_tensors)?;
    write_text_atomic(
        &dir.join("trainer_state.json"),
        &(serde_json::to_string_pretty(state)? + "\n"),
    )?;
    Ok(())
}

/// Largest values of the training options ([`check_options`]).
pub const MAX_BATCH_SIZE: usize = 1 << 12;
pub const MAX_ACCUM: usize = 1 << 16;
pub const MAX_STEPS: u64 = 1 << 40;
/// Most tokens in one micro-batch of one rank (`batch_size · seq_len`).
pub const MAX_MICRO_BATCH_TOKENS: usize = 1 << 24;
pub const MAX_WORLD: usize = 1 << 16;

/// Check training options (from the command line or a checkpoint's `trainer_state.json`)
/// against clear limits before anything is allocated from them, naming the option.
pub fn check_options(o: &super::TrainOptions, cfg: &ModelConfig) -> Result<()> {
    ensure!(
        (1..=MAX_BATCH_SIZE).contains(&o.batch_size),
        "--batch-size {} must be between 1 and {MAX_BATCH_SIZE}",
        o.batch_size
    );
    ensure!(
        (1..=MAX_ACCUM).contains(&o.accum),
        "--accum {} must be between 1 and {MAX_ACCUM}",
        o.accum
    );
    ensure!(
        (1..=MAX_WORLD).contains(&o.world),
        "the world size {} must be between 1 and {MAX_WORLD}",
        o.world
    );
    ensure!(
        o.seq_len >= 2 && o.seq_len <= cfg.max_sequence_length,
        "--seq-len {} must be between 2 and the model's max_sequence_length {}",
        o.seq_len,
        cfg.max_sequence_length
    );
    ensure!(
        o.batch_size.saturating_mul(o.seq_len) <= MAX_MICRO_BATCH_TOKENS,
        "--batch-size {} × --seq-len {} is more than the {MAX_MICRO_BATCH_TOKENS} tokens a \
         micro-batch may hold (use --accum for larger batches)",
        o.batch_size,
        o.seq_len
    );
    ensure!(
        (1..=MAX_STEPS).contains(&o.steps),
        "--steps {} must be between 1 and {MAX_STEPS}",
        o.steps
    );
    ensure!(
        o.warmup <= MAX_STEPS,
        "--warmup {} must be at most {MAX_STEPS}",
        o.warmup
    );
    for (name, v) in [
        ("--lr", o.lr),
        ("--weight-decay", o.weight_decay),
        ("--clip", o.clip),
    ] {
        ensure!(
            v.is_finite() && v >= 0.0,
            "{name} {v} must be a finite number ≥ 0"
        );
    }
    Ok(())
}

/// What [`load`] restores.
pub struct Resumed {
    pub cfg: ModelConfig,
    pub params: Params<f32>,
    pub opt: AdamW,
    pub state: TrainerState,
}

/// Read and check `DIR/trainer_state.json` (full or LoRA checkpoint).
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let text = crate::hf::fsio::read_text_file(&state_path, crate::hf::fsio::MAX_CONFIG_BYTES)
        .with_context(|| {
            format!(
                "cannot read {} (is {} a training checkpoint?)",
                state_path.display(),
                dir.display()
            )
        })?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a trainer state (truncated, or not written by llada train)",
            state_path.display()
        )
    })?;
    for (name, v, lo, hi) in [
        ("beta1", state.beta1, 0.0, 1.0),
        ("beta2", state.beta2, 0.0, 1.0),
        ("eps", state.eps, f64::MIN_POSITIVE, 1.0),
        ("weight_decay", state.weight_decay, 0.0, f64::MAX),
    ] {
        ensure!(
            v.is_finite() && v >= lo && v < hi,
            "{}: `{name}` = {v} is out of range",
            state_path.display()
        );
    }
    ensure!(
        state.adam_t <= state.step.saturating_mul(MAX_ACCUM as u64) && state.step <= MAX_STEPS,
        "{}: step {} / AdamW step {} are inconsistent",
        state_path.display(),
        state.step,
        state.adam_t
    );
    Ok(state)
}

/// The AdamW hyper-parameters a checkpoint's state records.
pub fn adamw_config(state: &TrainerState) -> AdamWConfig {
    AdamWConfig {
        beta1: state.beta1,
        beta2: state.beta2,
        eps: state.eps,
        weight_decay: state.weight_decay,
    }
}

/// The bytes of an optimizer file `path` after checking its size: `data_bytes` of tensor data
/// plus a header of at most `slack` bytes, so a truncated or foreign file is refused before it is
/// read. `(what, of)`: what the data is, and what another file would be from ("model").
pub(crate) fn read_optimizer_file(
    path: &Path,
    data_bytes: u64,
    slack: u64,
    (what, of): (&str, &str),
) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read {} (a resume needs it)", path.display()))?;
    ensure!(meta.is_file(), "{}: not a regular file", path.display());
    ensure!(
        meta.len() >= data_bytes + 8 && meta.len() <= data_bytes + 8 + slack,
        "{}: {} bytes, but {what} takes {data_bytes} bytes plus a header: truncated, or from \
         another {of}",
        path.display(),
        meta.len()
    );
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `bytes` (read from `path`) as a safetensors file.
pub(crate) fn parse_safetensors<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<safetensors::SafeTensors<'a>> {
    safetensors::SafeTensors::deserialize(bytes).with_context(|| {
        format!(
            "{}: not a safetensors file (truncated or corrupt)",
            path.display()
        )
    })
}

/// Tensor `name` of the safetensors `st` (read from `path`), which must be F32 of `shape`.
pub(crate) fn f32_tensor(
    st: &safetensors::SafeTensors,
    path: &Path,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .with_context(|| format!("{}: tensor `{name}` missing", path.display()))?;
    ensure!(
        t.dtype() == safetensors::Dtype::F32 && t.shape() == shape,
        "{}: tensor `{name}` is {:?} {:?}, expected F32 {shape:?}",
        path.display(),
        t.dtype(),
        t.shape()
    );
    Ok(t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Read a training checkpoint written by [`save`].
pub fn load(dir: &Path) -> Result<Resumed> {
    let state = read_state(dir)?;
    ensure!(
        state.lora.is_none(),
        "{}: a LoRA run's checkpoint (an adapter), not a full model (see lora_checkpoint::load)",
        dir.display()
    );
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let opt_path = dir.join("optimizer.safetensors");
    // Expected size: 3 f32 copies of every parameter plus a header; a truncated or foreign file
    // is refused before it is read.
    let numel: u64 = crate::hf::checkpoint::expected_tensors(&cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let what = format!("the optimizer state of this model ({numel} parameters, 3 f32 copies)");
    let bytes = read_optimizer_file(&opt_path, 3 * 4 * numel, 100 << 20, (&what, "model"))?;
    let st = parse_safetensors(&bytes, &opt_path)?;
    let mut sets: Vec<Params<f32>> = (0..3).map(|_| Params::zeros(&cfg)).collect();
    for (k, prefix) in ["master.", "exp_avg.", "exp_avg_sq."].iter().enumerate() {
        let p = &mut sets[k];
        for i in 0..p.data.len() {
            let name = format!("{prefix}{}", p.names[i]);
            p.data[i] = f32_tensor(&st, &opt_path, &name, &p.shapes[i])?;
        }
    }
    let v = sets.pop().context("three parameter sets")?;
    let m = sets.pop().context("three parameter sets")?;
    let params = sets.pop().context("three parameter sets")?;
    let opt = AdamW {
        cfg: adamw_config(&state),
        m,
        v,
        t: state.adam_t,
    };
    // The bf16 model weights must be the rounded master weights (a hand-edited folder would
    // otherwise silently train something else than it generates with).
    let ck = Checkpoint::open(dir, &cfg)?;
    let wte = ck.read_f32(crate::hf::checkpoint::WTE)?;
    let same = wte
        .iter()
        .zip(&params.data[0])
        .all(|(&a, &b)| a == DType::BF16.round(b));
    ensure!(
        same,
        "{}: model.safetensors does not match the master weights in optimizer.safetensors",
        dir.display()
    );
    Ok(Resumed {
        cfg,
        params,
        opt,
        state,
    })
}
