//! LoRA adapters in Hugging Face PEFT's format: read, write, and merge into a checkpoint.
//!
//! **Format** (what `peft`'s `save_pretrained` writes for LLaDA, checked against PEFT 0.18 by
//! `tests/fixtures/make_lora_fixture.py`): a folder with
//! - `adapter_config.json`: `peft_type` `"LORA"`, `r`, `lora_alpha`, `use_rslora`,
//!   `target_modules` (a list of module-name suffixes, or one regular expression that must match
//!   a whole module name), `rank_pattern` / `alpha_pattern` (per-module overrides: the first key,
//!   in file order, for which `^(.*\.)?(KEY)$` matches the module name wins), and fields this
//!   engine does not need;
//! - `adapter_model.safetensors`: for every adapted `nn.Linear` `M` (a module name such as
//!   `model.transformer.blocks.3.q_proj`; `model.transformer.ff_out` is the LM head),
//!   `base_model.model.M.lora_A.weight` `[r, in]` and `base_model.model.M.lora_B.weight`
//!   `[out, r]`; for the embedding `model.transformer.wte`,
//!   `base_model.model.model.transformer.wte.lora_embedding_A` `[r, V]` and `…lora_embedding_B`
//!   `[C, r]`. PEFT saves a whole module (`modules_to_save`, resized embeddings) as
//!   `base_model.model.M.weight`; such tensors replace the base tensor.
//!
//! The update of a module is `ΔW = scale·B·A` (embedding: `scale·(B·A)ᵀ`) with
//! `scale = lora_alpha / r`, or `lora_alpha / √r` with `use_rslora`. PEFT's target-module
//! suffix `ff_out` matches both the blocks' down projections and the LM head.
//!
//! **Merging** ([`Adapter::apply`]) replaces every adapted tensor of a [`Checkpoint`] with a
//! [`WeightSource::Lora`] that computes `W + ΔW` in f32 (the r-term dot product summed in f32 in
//! order k = 0…r−1, times `scale` in f32, plus `W`) and rounds the sum once to `W`'s dtype
//! whenever the tensor is read: when a backend loads it, or when `llada merge-lora` writes it.
//! That is PEFT's `merge_and_unload()` with f32 adapter weights (the default: `bf16 W += f32
//! ΔW` computes in f32 and rounds once), up to the summation order of the rank-r product.
//! Nothing is materialised beforehand, so a merged 8B model loads in the memory the base needs
//! (the CPU backend merges a row each time it reads one; the CUDA backend once, at upload).
//!
//! Adapter folders come from strangers: files are read through the model-folder checks
//! ([`checkpoint::resolve_in_folder`], size limits, the safetensors header checks), and every
//! tensor name, shape, rank, value and config field is checked with an error that names it.

mod config;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::hf::checkpoint::{self, Checkpoint, WeightSource};
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
pub use crate::hf::lowrank::{Delta, ModuleKind};
use crate::hf::write;
use crate::hf::write::HostTensor;

use config::scale_of;
pub use config::{
    LoraConfig, Targets, ADAPTER_CONFIG, ADAPTER_WEIGHTS, LINEAR_PARTS, MAX_RANK, PEFT_PREFIX,
};

/// The low-rank factors of one module, in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    pub kind: ModuleKind,
    pub rank: usize,
    pub alpha: f64,
    /// `[rows, cols]` of the base weight.
    pub base_shape: [usize; 2],
    /// Linear: `[r, cols]`; embedding: `[r, rows]`.
    pub a: Vec<f32>,
    /// Linear: `[rows, r]`; embedding: `[cols, r]`.
    pub b: Vec<f32>,
}

impl LoraModule {
    /// `alpha / r`, or `alpha / √r` with rsLoRA, as PEFT's `LoraLayer.update_layer`.
    pub fn scale(&self, use_rslora: bool) -> f64 {
        scale_of(self.alpha, self.rank, use_rslora)
    }
    /// Shapes of `A` and `B` as stored.
    pub fn shapes(&self) -> ([usize; 2], [usize; 2]) {
        let [rows, cols] = self.base_shape;
        match self.kind {
            ModuleKind::Linear => ([self.rank, cols], [rows, self.rank]),
            ModuleKind::Embedding => ([self.rank, rows], [cols, self.rank]),
        }
    }
}

/// A LoRA adapter: its config and the factors of every module it updates, keyed by module name
/// (`model.transformer.blocks.0.q_proj`; the tensor it updates is that name plus `.weight`).
#[derive(Clone, Debug)]
pub struct Adapter {
    pub config: LoraConfig,
    pub modules: BTreeMap<String, LoraModule>,
    /// Whole tensors the adapter replaces (PEFT `modules_to_save`), by checkpoint tensor name.
    pub replaced: BTreeMap<String, WeightSource>,
}

/// Every module of `cfg` an adapter may update: module name → (kind, base shape).
pub fn adaptable_modules(cfg: &ModelConfig) -> BTreeMap<String, (ModuleKind, [usize; 2])> {
    let mut out = BTreeMap::new();
    for (name, shape) in checkpoint::expected_tensors(cfg) {
        let (Some(module), [rows, cols]) = (name.strip_suffix(".weight"), shape.as_slice()) else {
            continue;
        };
        let kind = if name == checkpoint::WTE {
            ModuleKind::Embedding
        } else {
            ModuleKind::Linear
        };
        out.insert(module.to_string(), (kind, [*rows, *cols]));
    }
    out
}

fn known_modules_hint(cfg: &ModelConfig) -> String {
    format!(
        "this model's modules are model.transformer.blocks.{{0..{}}}.{{{}}}, model.transformer.ff_out \
         (the LM head) and model.transformer.wte (the embedding)",
        cfg.n_layers.saturating_sub(1),
        LINEAR_PARTS.join(",")
    )
}

/// Which factor a tensor name holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    A,
    B,
}

/// Split a PEFT tensor name into (module, kind, part).
fn parse_tensor_name(name: &str) -> Result<(String, ModuleKind, Option<Part>)> {
    let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
        bail!(
            "adapter tensor `{name}`: not a PEFT tensor name (they start with `{PEFT_PREFIX}`, \
             e.g. `{PEFT_PREFIX}model.transformer.blocks.0.q_proj.lora_A.weight`)"
        );
    };
    for (suffix, kind, part) in [
        (".lora_A.weight", ModuleKind::Linear, Part::A),
        (".lora_B.weight", ModuleKind::Linear, Part::B),
        (".lora_embedding_A", ModuleKind::Embedding, Part::A),
        (".lora_embedding_B", ModuleKind::Embedding, Part::B),
    ] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return Ok((m.to_string(), kind, Some(part)));
        }
    }
    if rest.ends_with(".lora_B.bias") {
        bail!("adapter tensor `{name}`: a bias on lora_B (lora_bias) is not supported");
    }
    if rest.contains("lora_magnitude_vector") {
        bail!("adapter tensor `{name}`: DoRA adapters are not supported");
    }
    if let Some(m) = rest.strip_suffix(".weight") {
        if !m.contains("lora_") {
            // A whole module (modules_to_save, or an embedding saved with
            // save_embedding_layers, which PEFT names `<module>.base_layer.weight` when the
            // embedding also carries LoRA): the caller checks that the module is known.
            let m = m.strip_suffix(".base_layer").unwrap_or(m);
            return Ok((m.to_string(), ModuleKind::Linear, None));
        }
    }
    bail!(
        "adapter tensor `{name}`: not a LoRA tensor llada knows (expected `.lora_A.weight`, \
         `.lora_B.weight`, `.lora_embedding_A`, `.lora_embedding_B`, or a whole module's `.weight`)"
    )
}

fn read_values(src: &WeightSource) -> Result<Vec<f32>> {
    let n = src.numel();
    let mut v = vec![0.0f32; n];
    src.read_range(0, n, &mut v);
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "adapter tensor `{}`: element {i} is {} (every value must be finite)",
            src.name(),
            v[i]
        );
    }
    Ok(v)
}

impl Adapter {
    /// Read and check the PEFT LoRA adapter folder `dir` against the model `cfg`.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Adapter> {
        Self::open_inner(dir, cfg).with_context(|| format!("LoRA adapter {}", dir.display()))
    }

    fn open_inner(dir: &Path, cfg: &ModelConfig) -> Result<Adapter> {
        if !dir.is_dir() {
            bail!("not a folder (a PEFT adapter is a folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})");
        }
        let cfg_path = checkpoint::resolve_in_folder(dir, ADAPTER_CONFIG, dir)?;
        let text = checkpoint::read_text_file(&cfg_path, checkpoint::MAX_CONFIG_BYTES)?;
        let config = LoraConfig::from_json(&text)?;
        if !dir.join(ADAPTER_WEIGHTS).exists() && dir.join("adapter_model.bin").exists() {
            bail!(
                "only adapter_model.bin (a pickle) is present: llada reads safetensors only \
                 (save with PEFT's default safe_serialization=True)"
            );
        }
        let weights = checkpoint::resolve_in_folder(dir, ADAPTER_WEIGHTS, dir)?;
        let sources = checkpoint::open_safetensors(&weights)?;
        Self::from_sources(config, &sources, cfg)
    }

    /// Build an adapter from PEFT-named tensors, checking names, shapes, ranks and values.
    pub fn from_sources(
        config: LoraConfig,
        sources: &[WeightSource],
        cfg: &ModelConfig,
    ) -> Result<Adapter> {
        let known = adaptable_modules(cfg);
        let expected: BTreeMap<String, Vec<usize>> =
            checkpoint::expected_tensors(cfg).into_iter().collect();
        // module -> (kind, A, B)
        let mut found: BTreeMap<
            String,
            (ModuleKind, Option<&WeightSource>, Option<&WeightSource>),
        > = BTreeMap::new();
        let mut replaced = BTreeMap::new();
        for src in sources {
            let name = src.name();
            let (module, kind, part) = parse_tensor_name(name)?;
            let Some(part) = part else {
                let tensor = format!("{module}.weight");
                let Some(shape) = expected.get(&tensor) else {
                    bail!(
                        "adapter tensor `{name}`: unknown module `{module}` ({})",
                        known_modules_hint(cfg)
                    );
                };
                if src.shape() != shape.as_slice() {
                    bail!(
                        "adapter tensor `{name}` has shape {:?}; `{tensor}` is {shape:?}",
                        src.shape()
                    );
                }
                read_values(src)?;
                if replaced.insert(tensor.clone(), src.clone()).is_some() {
                    bail!("{ADAPTER_WEIGHTS}: `{tensor}` is given whole twice");
                }
                continue;
            };
            let Some((want_kind, _)) = known.get(&module) else {
                bail!(
                    "adapter tensor `{name}`: unknown module `{module}` ({})",
                    known_modules_hint(cfg)
                );
            };
            if kind != *want_kind {
                bail!(
                    "adapter tensor `{name}`: `{module}` is {}, so its LoRA tensors are named {}",
                    if *want_kind == ModuleKind::Embedding {
                        "an embedding"
                    } else {
                        "a linear layer"
                    },
                    if *want_kind == ModuleKind::Embedding {
                        "`.lora_embedding_A` / `.lora_embedding_B`"
                    } else {
                        "`.lora_A.weight` / `.lora_B.weight`"
                    }
                );
            }
            if src.shape().len() != 2 {
                bail!(
                    "adapter tensor `{name}` has shape {:?}; LoRA factors are 2-D",
                    src.shape()
                );
            }
            let e = found.entry(module).or_insert((kind, None, None));
            match part {
                Part::A => e.1 = Some(src),
                Part::B => e.2 = Some(src),
            }
        }
        if found.is_empty() && replaced.is_empty() {
            bail!("{ADAPTER_WEIGHTS} holds no LoRA tensors");
        }
        let mut modules = BTreeMap::new();
        for (module, (kind, a, b)) in found {
            let ns = |p: &str| match kind {
                ModuleKind::Linear => format!("{PEFT_PREFIX}{module}.lora_{p}.weight"),
                ModuleKind::Embedding => format!("{PEFT_PREFIX}{module}.lora_embedding_{p}"),
            };
            let (Some(a), Some(b)) = (a, b) else {
                let missing = if a.is_none() { ns("A") } else { ns("B") };
                bail!("{ADAPTER_WEIGHTS}: `{missing}` is missing (every adapted module needs both factors)");
            };
            let [rows, cols] = known[&module].1;
            let (a_shape, b_shape) = (a.shape(), b.shape());
            let rank = a_shape[0];
            if rank == 0 {
                bail!(
                    "adapter tensor `{}` has shape {a_shape:?}: rank 0",
                    a.name()
                );
            }
            // Linear: A [r, in=cols], B [out=rows, r]; embedding: A [r, V=rows], B [C=cols, r].
            let (a_cols, b_rows) = match kind {
                ModuleKind::Linear => (cols, rows),
                ModuleKind::Embedding => (rows, cols),
            };
            if a_shape[1] != a_cols {
                bail!(
                    "adapter tensor `{}` has shape {a_shape:?}, but `{module}.weight` is \
                     [{rows}, {cols}]: expected [r, {a_cols}]",
                    a.name()
                );
            }
            if b_shape != [b_rows, rank] {
                bail!(
                    "adapter tensor `{}` has shape {b_shape:?}, but `{module}.weight` is \
                     [{rows}, {cols}] and `{}` has rank {rank}: expected [{b_rows}, {rank}]",
                    b.name(),
                    a.name()
                );
            }
            let (cfg_rank, alpha) = config.rank_alpha(&module)?;
            if cfg_rank != rank {
                bail!(
                    "adapter tensor `{}` has rank {rank}, but {ADAPTER_CONFIG} gives module \
                     `{module}` rank {cfg_rank} (r / rank_pattern)",
                    a.name()
                );
            }
            modules.insert(
                module,
                LoraModule {
                    kind,
                    rank,
                    alpha,
                    base_shape: [rows, cols],
                    a: read_values(a)?,
                    b: read_values(b)?,
                },
            );
        }
        Ok(Adapter {
            config,
            modules,
            replaced,
        })
    }

    /// Merge this adapter into `ckpt` (see the module docs): each adapted tensor becomes a
    /// [`WeightSource::Lora`] over its current source (so adapters stack when applied in turn);
    /// whole-module tensors first replace the base (rounded to its dtype), so a module saved
    /// whole and adapted gets its update on top of the saved tensor, as in PEFT.
    pub fn apply(&self, ckpt: &mut Checkpoint) -> Result<()> {
        for (tensor, src) in &self.replaced {
            let base = ckpt.get(tensor)?;
            let dtype = base.dtype();
            let mut v = read_values(src)?;
            dtype.round_slice(&mut v);
            let s = WeightSource::Host {
                data: Arc::new(v),
                dtype,
                shape: base.shape().to_vec(),
                name: tensor.clone(),
            };
            ckpt.set(tensor, s);
        }
        for (module, m) in &self.modules {
            let tensor = format!("{module}.weight");
            let base = ckpt.get(&tensor)?.clone();
            if base.shape() != m.base_shape.as_slice() {
                bail!(
                    "LoRA module `{module}`: the checkpoint's `{tensor}` has shape {:?}, the adapter \
                     was checked against {:?}",
                    base.shape(),
                    m.base_shape
                );
            }
            let delta = Delta {
                kind: m.kind,
                rank: m.rank,
                cols: m.base_shape[1],
                scale: m.scale(self.config.use_rslora) as f32,
                a: m.a.clone(),
                b: m.b.clone(),
            };
            ckpt.set(
                &tensor,
                WeightSource::Lora {
                    base: Box::new(base),
                    delta: Arc::new(delta),
                },
            );
        }
        Ok(())
    }

    /// One line for logs: modules, ranks, scales.
    pub fn summary(&self) -> String {
        let mut ranks: Vec<usize> = self.modules.values().map(|m| m.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        let mut scales: Vec<f64> = self
            .modules
            .values()
            .map(|m| m.scale(self.config.use_rslora))
            .collect();
        scales.sort_by(f64::total_cmp);
        scales.dedup();
        let fmt = |v: &[String]| v.join("/");
        let mut s = format!(
            "{} modules, rank {}, scale {}{}",
            self.modules.len(),
            fmt(&ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>()),
            fmt(&scales.iter().map(|x| format!("{x}")).collect::<Vec<_>>()),
            if self.config.use_rslora {
                " (rsLoRA)"
            } else {
                ""
            }
        );
        if !self.replaced.is_empty() {
            s += &format!(", {} whole tensors replaced", self.replaced.len());
        }
        s
    }

    /// The tensors of `adapter_model.safetensors` (f32, PEFT's names, sorted).
    pub fn tensors(&self) -> Vec<HostTensor> {
        let mut out = Vec::new();
        for (module, m) in &self.modules {
            let (sa, sb) = m.shapes();
            let (na, nb) = match m.kind {
                ModuleKind::Linear => (
                    format!("{PEFT_PREFIX}{module}.lora_A.weight"),
                    format!("{PEFT_PREFIX}{module}.lora_B.weight"),
                ),
                ModuleKind::Embedding => (
                    format!("{PEFT_PREFIX}{module}.lora_embedding_A"),
                    format!("{PEFT_PREFIX}{module}.lora_embedding_B"),
                ),
            };
            out.push((na, DType::F32, sa.to_vec(), m.a.clone()));
            out.push((nb, DType::F32, sb.to_vec(), m.b.clone()));
        }
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    }

    /// The `adapter_config.json` PEFT reads back into the same modules, ranks and scales:
    /// `target_modules` is the list of part names when that selects exactly the adapted
    /// modules (PEFT matches by suffix, so `ff_out` also selects the LM head), else one regular
    /// expression over the exact module names; modules whose rank or alpha differs from `r` /
    /// `lora_alpha` get exact-name `rank_pattern` / `alpha_pattern` entries. Only fields PEFT has
    /// had since 0.9 are written, so older and newer versions read it.
    pub fn config_json(&self, cfg: &ModelConfig) -> Value {
        let c = &self.config;
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for (module, m) in &self.modules {
            let key = regex::escape(module);
            if m.rank != c.r {
                rank_pattern.insert(key.clone(), Value::from(m.rank));
            }
            if m.alpha != c.lora_alpha {
                alpha_pattern.insert(key, number(m.alpha));
            }
        }
        serde_json::json!({
            "alpha_pattern": alpha_pattern,
            "base_model_name_or_path": c.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": number(c.lora_alpha),
            "lora_dropout": c.lora_dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.r,
            "rank_pattern": rank_pattern,
            "revision": null,
            "target_modules": target_modules_value(self.modules.keys(), cfg),
            "task_type": null,
            "use_dora": false,
            "use_rslora": c.use_rslora,
        })
    }

    /// Write the adapter as a PEFT folder (`adapter_config.json`, `adapter_model.safetensors`
    /// in f32), atomically file by file.
    pub fn save(&self, dir: &Path, cfg: &ModelConfig) -> Result<()> {
        if !self.replaced.is_empty() {
            bail!("saving adapters with whole replaced tensors is not supported");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write::write_safetensors(&dir.join(ADAPTER_WEIGHTS), &self.tensors())?;
        let text = serde_json::to_string_pretty(&self.config_json(cfg))? + "\n";
        write::write_text_atomic(&dir.join(ADAPTER_CONFIG), &text)
    }
}

/// An integral value as a JSON integer (PEFT users write `lora_alpha: 16`), else a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

/// `target_modules` selecting exactly `modules` under PEFT's rules (see
/// [`Adapter::config_json`]).
fn target_modules_value<'a>(modules: impl Iterator<Item = &'a String>, cfg: &ModelConfig) -> Value {
    let chosen: std::collections::BTreeSet<&str> = modules.map(String::as_str).collect();
    let all: Vec<String> = adaptable_modules(cfg).into_keys().collect();
    let last = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
    let mut parts: Vec<String> = chosen.iter().map(|m| last(m)).collect();
    parts.sort();
    parts.dedup();
    // PEFT's list rule: a module is targeted when its name ends with "." + an entry.
    let selected: std::collections::BTreeSet<&str> = all
        .iter()
        .filter(|m| parts.iter().any(|p| m.ends_with(&format!(".{p}"))))
        .map(String::as_str)
        .collect();
    if selected == chosen {
        return Value::from(parts);
    }
    // Every block of the model, the same parts, the head not included: a compact regex.
    let block_parts: std::collections::BTreeSet<String> = chosen
        .iter()
        .filter(|m| m.starts_with("model.transformer.blocks."))
        .map(|m| last(m))
        .collect();
    let per_block: std::collections::BTreeSet<String> = (0..cfg.n_layers)
        .flat_map(|l| {
            block_parts
                .iter()
                .map(move |p| format!("model.transformer.blocks.{l}.{p}"))
        })
        .collect();
    if chosen.iter().all(|m| per_block.contains(*m)) && per_block.len() == chosen.len() {
        let alt: Vec<&str> = block_parts.iter().map(String::as_str).collect();
        return Value::from(format!(
            "model\\.transformer\\.blocks\\.\\d+\\.({})",
            alt.join("|")
        ));
    }
    let alt: Vec<String> = chosen.iter().map(|m| regex::escape(m)).collect();
    Value::from(alt.join("|"))
}

/// Files of a model folder that are weights (not copied by [`write_merged_folder`]).
fn is_weight_file(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".h5",
        ".msgpack",
    ]
    .iter()
    .any(|s| name.ends_with(s))
        || name == "model.safetensors.index.json"
        || name == "pytorch_model.bin.index.json"
}

/// What [`write_merged_folder`] wrote.
#[derive(Debug, Default)]
pub struct MergeReport {
    /// Files copied from the model folder, by name.
    pub copied: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// Largest shard `llada merge-lora` writes (Hugging Face's default `max_shard_size`, 5 GB).
pub const MERGED_SHARD_BYTES: u64 = 5_000_000_000;

/// Write `ckpt` (normally with an adapter applied) as a complete Hugging Face folder `out`:
/// every non-weight file of `model_dir` copied (config, tokenizer, chat template, modeling
/// code), and the model's tensors in their dtypes, streamed (`model.safetensors`, or shards of
/// at most `max_shard_bytes` and an index). `out` must not be `model_dir`.
pub fn write_merged_folder(
    model_dir: &Path,
    cfg: &ModelConfig,
    ckpt: &Checkpoint,
    out: &Path,
    max_shard_bytes: u64,
) -> Result<MergeReport> {
    let src = model_dir
        .canonicalize()
        .with_context(|| format!("cannot open model folder {}", model_dir.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let dst: PathBuf = out
        .canonicalize()
        .with_context(|| format!("cannot open {}", out.display()))?;
    if src == dst {
        bail!(
            "--out {} is the model folder itself: write the merged model to another folder",
            out.display()
        );
    }
    let mut report = MergeReport::default();
    let mut entries: Vec<String> = std::fs::read_dir(&src)
        .with_context(|| format!("cannot list {}", model_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    entries.sort();
    for name in entries {
        if name.starts_with('.') || is_weight_file(&name) {
            continue;
        }
        let path = src.join(&name);
        if !path.is_file() {
            continue;
        }
        let from = checkpoint::resolve_in_folder(&src, &name, &src)?;
        let to = dst.join(&name);
        let tmp = dst.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::copy(&from, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &to))
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        report.copied.push(name);
    }
    if !report.copied.iter().any(|n| n == "config.json") {
        write::write_text_atomic(&dst.join("config.json"), &cfg.to_json())?;
        report.copied.push("config.json (written)".into());
    }
    let mut names: Vec<String> = checkpoint::expected_tensors(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.extend(ckpt.ignored().iter().cloned());
    let sources: Vec<(String, &WeightSource)> = names
        .iter()
        .map(|n| Ok((n.clone(), ckpt.get(n)?)))
        .collect::<Result<_>>()?;
    report.tensors = sources.len();
    report.bytes = sources
        .iter()
        .map(|(_, s)| (s.numel() * s.dtype().size()) as u64)
        .sum();
    write::write_weight_files(&dst, &sources, max_shard_bytes)?;
    Ok(report)
}
