//! LoRA training checkpoints: the layout of full training's ([`super::checkpoint`]) with the
//! adapter in place of the model, so `llada train --resume DIR` continues a LoRA run exactly.
//!
//! `DIR/` holds
//! - `adapter_config.json` + `adapter_model.safetensors`: the adapter in PEFT's format, loadable
//!   as is (`llada generate --lora DIR`, PyTorch `peft`). Its factors are f32, the exact values
//!   the optimizer holds, so there is no separate `master.` copy;
//! - `optimizer.safetensors`: f32 `exp_avg.NAME` and `exp_avg_sq.NAME` for every adapter tensor
//!   NAME (its PEFT name; [`LoraAdamW::tensors`]);
//! - `trainer_state.json`: the [`TrainerState`] of full training (step, AdamW step count and
//!   hyper-parameters, the run's options: seed, batch split, schedule… from which every
//!   remaining batch, mask and learning rate follows: data order and masks are functions of
//!   seed and step, there is no other RNG state) plus `lora`: [`LoraRun`], the adapter's shape
//!   and the base model it was trained on, which a resume checks.
//!
//! The base model is recorded by where it came from (a folder, or a preset and its seed) and a
//! fingerprint of its weights ([`base_fingerprint`]), so a resume on another model is an error
//! that names the difference rather than a silently different run.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::checkpoint::{
    adamw_config, f32_tensor, parse_safetensors, read_optimizer_file, read_state, TrainerState,
};
use super::dist::{fnv1a, FNV_START};
use crate::hf::checkpoint::{expected_tensors, Checkpoint};
use crate::hf::config::ModelConfig;
use crate::hf::write::{write_safetensors, write_text_atomic};
use crate::lora::train::{select_modules, LoraAdamW};
use crate::lora::{Adapter, ModuleKind};

pub use super::checkpoint::{BaseModel, LoraRun};

/// Elements of each window [`base_fingerprint`] reads.
const WINDOW: usize = 1024;

/// A fingerprint of a model's weights for `cfg`: every expected tensor's name and shape, and the
/// bits of three windows of `WINDOW` values of it (start, middle, end). Reading a few thousand
/// values per tensor keeps it cheap on an 8B model, and any two different checkpoints (another
/// model, another fine-tune, other preset seed) differ in those windows.
pub fn base_fingerprint(cfg: &ModelConfig, ck: &Checkpoint) -> Result<u64> {
    let mut h = FNV_START;
    let mut buf = vec![0f32; WINDOW];
    for (name, shape) in expected_tensors(cfg) {
        let src = ck.get(&name)?;
        ensure!(
            src.shape() == shape.as_slice(),
            "tensor `{name}` has shape {:?}, the config implies {shape:?}",
            src.shape()
        );
        h = fnv1a(h, name.as_bytes());
        for d in &shape {
            h = fnv1a(h, &(*d as u64).to_le_bytes());
        }
        let n = src.numel();
        for from in [0, n / 2, n.saturating_sub(WINDOW)] {
            let to = (from + WINDOW).min(n);
            let out = &mut buf[..to - from];
            src.read_range(from, to, out);
            for v in out.iter() {
                h = fnv1a(h, &v.to_bits().to_le_bytes());
            }
        }
    }
    Ok(h)
}

/// [`base_fingerprint`] as stored in [`BaseModel::fingerprint`].
pub fn fingerprint_hex(fp: u64) -> String {
    format!("{fp:016x}")
}

/// Write a LoRA run's checkpoint to `dir` (module docs). `state.lora` must be set.
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    adapter: &Adapter,
    opt: &LoraAdamW,
    state: &TrainerState,
) -> Result<()> {
    ensure!(
        state.lora.is_some(),
        "a LoRA checkpoint needs the run's LoRA record"
    );
    adapter.save(dir, cfg)?;
    write_safetensors(&dir.join("optimizer.safetensors"), &opt.tensors(adapter))?;
    write_text_atomic(
        &dir.join("trainer_state.json"),
        &(serde_json::to_string_pretty(state)? + "\n"),
    )
}

/// What [`load`] restores.
pub struct LoraResumed {
    pub adapter: Adapter,
    pub opt: LoraAdamW,
    pub state: TrainerState,
    pub run: LoraRun,
}

/// Read the LoRA checkpoint `dir` written by [`save`] for the base model `cfg`, checking that
/// the adapter, its record and its optimizer state agree (names, shapes, ranks, finite values).
pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<LoraResumed> {
    let state = read_state(dir)?;
    let state_path = dir.join("trainer_state.json");
    let Some(run) = state.lora.clone() else {
        bail!(
            "{}: a full fine-tuning checkpoint, not a LoRA run's (no `lora` record)",
            state_path.display()
        );
    };
    ensure!(
        state.adam_t == state.step,
        "{}: AdamW step {} differs from the step {} (a LoRA run takes one update per step)",
        state_path.display(),
        state.adam_t,
        state.step
    );
    let adapter = Adapter::open(dir, cfg)?;
    check_adapter(&adapter, &run, cfg).with_context(|| {
        format!(
            "{}: the adapter does not match the run's `lora` record in {}",
            dir.display(),
            state_path.display()
        )
    })?;
    let opt = load_moments(dir, &adapter, &state)?;
    Ok(LoraResumed {
        adapter,
        opt,
        state,
        run,
    })
}

/// The adapter holds exactly the modules `run.targets` selects, at `run`'s rank, alpha and
/// scaling.
fn check_adapter(ad: &Adapter, run: &LoraRun, cfg: &ModelConfig) -> Result<()> {
    let c = &ad.config;
    ensure!(
        (c.r, c.lora_alpha, c.use_rslora) == (run.rank, run.alpha, run.rslora),
        "adapter_config.json has r {} alpha {} use_rslora {}, the record r {} alpha {} rslora {}",
        c.r,
        c.lora_alpha,
        c.use_rslora,
        run.rank,
        run.alpha,
        run.rslora
    );
    let want = select_modules(cfg, &run.targets)?;
    let have: Vec<&String> = ad.modules.keys().collect();
    ensure!(
        have.len() == want.len() && have.iter().zip(&want).all(|(a, b)| *a == b),
        "the adapter has {} modules, the targets {:?} select {}",
        have.len(),
        run.targets,
        want.len()
    );
    for (name, m) in &ad.modules {
        ensure!(
            m.kind == ModuleKind::Linear && m.rank == run.rank && m.alpha == run.alpha,
            "module {name} has rank {} alpha {}, the run {} / {}",
            m.rank,
            m.alpha,
            run.rank,
            run.alpha
        );
    }
    Ok(())
}

/// `optimizer.safetensors` of a LoRA checkpoint: exactly the two moments of every adapter
/// tensor, f32, in its shape, finite (`exp_avg_sq` ≥ 0).
fn load_moments(dir: &Path, ad: &Adapter, state: &TrainerState) -> Result<LoraAdamW> {
    let path = dir.join("optimizer.safetensors");
    let tensors = ad.tensors();
    let numel: u64 = tensors.iter().map(|t| t.3.len() as u64).sum();
    let what = format!("the moments of this adapter ({numel} parameters, 2 f32 copies)");
    let bytes = read_optimizer_file(&path, 2 * 4 * numel, 16 << 20, (&what, "adapter"))?;
    let st = parse_safetensors(&bytes, &path)?;
    ensure!(
        st.len() == 2 * tensors.len(),
        "{}: {} tensors, expected {} (exp_avg and exp_avg_sq of each of the adapter's {})",
        path.display(),
        st.len(),
        2 * tensors.len(),
        tensors.len()
    );
    let shapes: HashMap<&str, &[usize]> =
        tensors.iter().map(|t| (t.0.as_str(), &t.2[..])).collect();
    LoraAdamW::load(adamw_config(state), ad, state.adam_t, |name| {
        let (prefix, peft) = name.split_once('.').unwrap_or(("", name));
        let want = shapes.get(peft).copied().unwrap_or(&[]);
        let v = f32_tensor(&st, &path, name, want)?;
        let bad = |x: f32| !x.is_finite() || (prefix == "exp_avg_sq" && x < 0.0);
        if let Some(i) = v.iter().position(|&x| bad(x)) {
            bail!(
                "{}: tensor `{name}` holds {} at index {i} (a moment must be finite{})",
                path.display(),
                v[i],
                if prefix == "exp_avg_sq" {
                    " and ≥ 0"
                } else {
                    ""
                }
            );
        }
        Ok(v)
    })
}
