//! FP8 inference: E4M3 linear-layer weights with per-output-channel scales and activations
//! quantized per token on the fly (the "W8A8 FP8, dynamic" scheme of vLLM / FBGEMM).
//!
//! - [`fp8`]: the E4M3 format, the scales and the CPU reference of the FP8 linear layer.
//! - This module: the quantized checkpoint format ([`quantize_folder`], `llada quantize`), its
//!   `quantization_config` ([`check_quantization_config`]), and [`fp8_weight`], which hands the
//!   model loader an FP8 weight either read from a quantized folder or quantized at load
//!   (`--weights fp8` on a bf16 folder).
//!
//! **Checkpoint layout.** Every linear layer of every block (`q_proj`, `k_proj`, `v_proj`,
//! `attn_out`, `ff_proj`, `up_proj`, `ff_out`) is stored as `<name>` (`….weight`, dtype
//! `F8_E4M3`, shape `[out, in]`) plus `<name>_scale` (`….weight_scale`, F32, `[out, 1]`):
//! `W ≈ e4m3(weight) · weight_scale` row by row, the compressed-tensors / vLLM naming of a
//! per-channel FP8 weight. The embedding, the norms and the LM head stay in the source dtype.
//! `config.json` gains [`QUANTIZATION_CONFIG`].

pub mod fp8;
pub mod quality;

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::hf::checkpoint::{
    expected_tensors, is_linear_weight, safetensors_dtype_name, Checkpoint, F8_E4M3,
};
use crate::hf::config::ModelConfig;
use crate::hf::dtype::DType;
use fp8::{Fp8Codes, Fp8Weight};

/// How the linear layers' weights are held on the device (`--weights`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsMode {
    /// As the checkpoint stores them: FP8 for a quantized folder, else the checkpoint's dtype.
    #[default]
    Checkpoint,
    /// FP8: a quantized folder as stored; a bf16/f16/f32 folder quantized at load.
    Fp8,
}

impl WeightsMode {
    /// The `--weights` names.
    pub const NAMES: &'static [(&'static str, WeightsMode)] = &[
        ("checkpoint", WeightsMode::Checkpoint),
        ("fp8", WeightsMode::Fp8),
    ];
}

crate::names::named_enum!(WeightsMode, "--weights", WeightsMode::NAMES);

/// The `quantization_config` written into `config.json` by [`quantize_folder`]: vLLM's `fp8`
/// method keys (`quant_method`, `activation_scheme`, `ignored_layers`) plus the format and the
/// granularities spelled out, since per-channel weights with per-token activations is not the
/// per-tensor default of vLLM's `Fp8Config` (it is FBGEMM's `fbgemm_fp8` and compressed-tensors'
/// `channel` / `token` strategies).
pub const QUANTIZATION_CONFIG: &str = r#"{
    "quant_method": "fp8",
    "fmt": "e4m3",
    "weight_scheme": "per_channel",
    "activation_scheme": "dynamic",
    "activation_granularity": "per_token",
    "ignored_layers": ["model.transformer.wte", "model.transformer.ff_out"]
}"#;

/// Check the `quantization_config` of a `config.json` (`cfg_text`, named `source` in errors).
/// Returns whether the folder is FP8-quantized. Anything this engine would not compute exactly
/// as written (another method, block scales, static activation scales, E5M2) is refused.
pub fn check_quantization_config(cfg_text: &str, source: &str) -> Result<bool> {
    let v: Value =
        serde_json::from_str(cfg_text).map_err(|e| anyhow!("{source}: malformed JSON: {e}"))?;
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(false);
    };
    let q = q
        .as_object()
        .ok_or_else(|| anyhow!("{source}: `quantization_config` must be an object, got {q}"))?;
    let field = |k: &str| q.get(k).filter(|v| !v.is_null());
    let want = |k: &str, allowed: &[&str], default: Option<&str>| -> Result<()> {
        let got = match field(k) {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => bail!("{source}: quantization_config.{k} = {other} must be a string"),
            None => match default {
                Some(d) => d,
                None => bail!("{source}: quantization_config.{k} is missing"),
            },
        };
        if !allowed.contains(&got) {
            bail!(
                "{source}: unsupported quantization_config.{k} = \"{got}\"; this engine runs \
                 only {k} = {} (FP8 E4M3 weights per output channel, activations per token)",
                allowed
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(" or ")
            );
        }
        Ok(())
    };
    want("quant_method", &["fp8"], None)?;
    want("fmt", &["e4m3", "float8_e4m3fn"], Some("e4m3"))?;
    want("weight_scheme", &["per_channel"], Some("per_channel"))?;
    want("activation_scheme", &["dynamic"], Some("dynamic"))?;
    want("activation_granularity", &["per_token"], Some("per_token"))?;
    if let Some(b) = field("weight_block_size") {
        bail!(
            "{source}: quantization_config.weight_block_size = {b}: block-scaled FP8 is not \
             supported (only per-output-channel scales)"
        );
    }
    Ok(true)
}

/// Check that a folder's `quantization_config` (`quantized`, from
/// [`check_quantization_config`]) and its tensors agree.
pub fn check_consistent(
    quantized: bool,
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    source: &str,
) -> Result<()> {
    let linear: Vec<String> = expected_tensors(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| is_linear_weight(n))
        .collect();
    let stored = linear
        .iter()
        .filter(|n| ckpt.fp8_tensor(n).is_some())
        .count();
    match (quantized, stored) {
        (false, 0) => Ok(()),
        (false, _) => bail!(
            "{source}: the checkpoint has {F8_E4M3} tensors but config.json has no \
             `quantization_config` (an FP8 folder written by `llada quantize` has one)"
        ),
        (true, s) if s == linear.len() => Ok(()),
        (true, _) => {
            let missing = linear
                .iter()
                .find(|n| ckpt.fp8_tensor(n).is_none())
                .map_or("", String::as_str);
            bail!(
                "{source}: config.json declares FP8 quantization but {} of the {} linear \
                 weights are stored as {F8_E4M3} (e.g. `{missing}` is not)",
                stored,
                linear.len()
            )
        }
    }
}

/// The FP8 weight `name` (a linear layer's `….weight`): read from the checkpoint when it is
/// stored as `F8_E4M3` (codes stay memory-mapped, scales from `<name>_scale` are checked finite
/// and positive), else quantized per output channel from its bf16/f16/f32 values.
pub fn fp8_weight(ckpt: &Checkpoint, name: &str) -> Result<Fp8Weight> {
    if let Some(t) = ckpt.fp8_tensor(name) {
        let (rows, cols) = match t.shape.as_slice() {
            [r, c] => (*r, *c),
            s => bail!("tensor `{name}`: an FP8 weight must be 2-D, got shape {s:?}"),
        };
        let sname = format!("{name}_scale");
        let scale = ckpt
            .read_f32(&sname)
            .with_context(|| format!("reading the scales of `{name}`"))?;
        return Fp8Weight::new(
            name,
            rows,
            cols,
            Fp8Codes::Mapped {
                mmap: t.mmap.clone(),
                start: t.start,
                end: t.end,
            },
            scale,
        );
    }
    Fp8Weight::quantize(ckpt.get(name)?)
}

/// What [`quantize_folder`] wrote.
#[derive(Clone, Debug)]
pub struct QuantizeSummary {
    /// Linear weights quantized.
    pub quantized: usize,
    /// Tensors kept in the source dtype.
    pub kept: usize,
    /// Bytes of the safetensors file.
    pub bytes: u64,
    /// Bytes the source's tensors take.
    pub source_bytes: u64,
}

/// Files copied from the source folder besides the weights and `config.json`.
const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Write the FP8 version of a model to `out`: one `model.safetensors` (linear layers as
/// `F8_E4M3` + `_scale`, everything else as stored), `config.json` (the source's, or the
/// preset's, with [`QUANTIZATION_CONFIG`]) and the tokenizer files of `src_dir`. The file is
/// streamed one tensor at a time (peak memory: one tensor) and renamed into place when complete.
pub fn quantize_folder(
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    src_dir: Option<&Path>,
    out: &Path,
) -> Result<QuantizeSummary> {
    if ckpt.has_fp8() {
        bail!("the model is already FP8-quantized");
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if let Some(src) = src_dir {
        if let (Ok(a), Ok(b)) = (src.canonicalize(), out.canonicalize()) {
            if a == b {
                bail!("--out must differ from the source folder {}", src.display());
            }
        }
    }
    // The plan: (name, dtype string, shape, element size) in order.
    struct Entry {
        name: String,
        dtype: &'static str,
        shape: Vec<usize>,
        bytes: usize,
        /// Index into `expected` of the source tensor; `scale` marks the `_scale` companion.
        src: usize,
        scale: bool,
    }
    let expected = expected_tensors(cfg);
    let mut plan: Vec<Entry> = Vec::new();
    let mut source_bytes = 0u64;
    let (mut quantized, mut kept) = (0, 0);
    for (i, (name, shape)) in expected.iter().enumerate() {
        let t = ckpt.get(name)?;
        let numel: usize = shape.iter().product();
        source_bytes += (numel * t.dtype().size()) as u64;
        if is_linear_weight(name) {
            plan.push(Entry {
                name: name.clone(),
                dtype: F8_E4M3,
                shape: shape.clone(),
                bytes: numel,
                src: i,
                scale: false,
            });
            plan.push(Entry {
                name: format!("{name}_scale"),
                dtype: "F32",
                shape: vec![shape[0], 1],
                bytes: shape[0] * 4,
                src: i,
                scale: true,
            });
            quantized += 1;
        } else {
            let dt = t.dtype();
            plan.push(Entry {
                name: name.clone(),
                dtype: safetensors_dtype_name(dt),
                shape: shape.clone(),
                bytes: numel * dt.size(),
                src: i,
                scale: false,
            });
            kept += 1;
        }
    }
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": "pt", "quantized_by": "llada quantize --scheme fp8"}),
    );
    let mut off = 0usize;
    for e in &plan {
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [off, off + e.bytes]}),
        );
        off += e.bytes;
    }
    let mut h = serde_json::to_string(&Value::Object(header))?.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let path = out.join("model.safetensors");
    let tmp = out.join(format!(".model.safetensors.tmp-{}", std::process::id()));
    let res = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        let mut pending: Option<Fp8Weight> = None;
        for e in &plan {
            let (name, _) = &expected[e.src];
            if e.dtype == F8_E4M3 {
                let q = Fp8Weight::quantize(ckpt.get(name)?)?;
                w.write_all(q.codes())?;
                pending = Some(q);
            } else if e.scale {
                let q = pending
                    .take()
                    .ok_or_else(|| anyhow!("internal: scale of `{name}` before its weight"))?;
                for s in q.scale() {
                    w.write_all(&s.to_le_bytes())?;
                }
            } else {
                let t = ckpt.get(name)?;
                let mut v = vec![0.0f32; t.numel()];
                t.read_range(0, t.numel(), &mut v);
                let mut bytes = Vec::with_capacity(e.bytes);
                for x in v {
                    match t.dtype() {
                        DType::BF16 => {
                            bytes.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes())
                        }
                        DType::F16 => {
                            bytes.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())
                        }
                        DType::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                    }
                }
                w.write_all(&bytes)?;
            }
        }
        let f = w.into_inner().map_err(|e| anyhow!("{e}"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    let index = out.join("model.safetensors.index.json");
    if index.exists() {
        std::fs::remove_file(&index)
            .with_context(|| format!("cannot remove stale {}", index.display()))?;
    }

    // config.json: the source's own text (every field kept) or the preset's, plus the config.
    let mut cfg_json: Value = match src_dir {
        Some(src) => {
            let p = crate::hf::checkpoint::resolve_in_folder(src, "config.json", src)?;
            let text = crate::hf::fsio::read_text_file(&p, crate::hf::fsio::MAX_CONFIG_BYTES)?;
            serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: malformed JSON: {e}", p.display()))?
        }
        None => serde_json::from_str(&cfg.to_json())?,
    };
    let obj = cfg_json
        .as_object_mut()
        .ok_or_else(|| anyhow!("config.json is not a JSON object"))?;
    obj.insert(
        "quantization_config".into(),
        serde_json::from_str(QUANTIZATION_CONFIG)?,
    );
    crate::hf::write::write_text_atomic(
        &out.join("config.json"),
        &(serde_json::to_string_pretty(&cfg_json)? + "\n"),
    )?;
    if let Some(src) = src_dir {
        for f in COPIED_FILES {
            let p = src.join(f);
            if p.is_file() {
                let p = crate::hf::checkpoint::resolve_in_folder(src, f, src)?;
                std::fs::copy(&p, out.join(f))
                    .with_context(|| format!("cannot copy {} to {}", p.display(), out.display()))?;
            }
        }
    }
    Ok(QuantizeSummary {
        quantized,
        kept,
        bytes: 8 + h.len() as u64 + off as u64,
        source_bytes,
    })
}
