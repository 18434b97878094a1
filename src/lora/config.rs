//! `adapter_config.json`: [`LoraConfig`] (rank, alpha, rsLoRA, target modules, the per-module
//! rank and alpha patterns), read and checked field by field, and the adapter folder's names.

use anyhow::{anyhow, bail, Result};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// Prefix of every tensor name: PEFT's `PeftModel.base_model` (the `LoraModel`) `.model` (the
/// Hugging Face model).
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The block linears LoRA usually targets, in checkpoint order.
pub const LINEAR_PARTS: [&str; 7] = [
    "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out",
];
/// Largest rank accepted.
pub const MAX_RANK: usize = 1 << 16;

pub(super) fn scale_of(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// How `adapter_config.json` names the adapted modules (informational: the tensors decide).
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Module-name suffixes (`["q_proj", "v_proj"]`).
    Names(Vec<String>),
    /// One regular expression that must match a whole module name.
    Regex(String),
    /// Absent or `null`.
    Unset,
}

/// The `adapter_config.json` fields this engine reads and writes.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Targets,
    /// Per-module rank overrides, in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub lora_dropout: f64,
    pub base_model_name_or_path: Option<String>,
}

impl LoraConfig {
    /// A plain config: rank `r`, `lora_alpha`, no patterns.
    pub fn new(r: usize, lora_alpha: f64, use_rslora: bool) -> LoraConfig {
        LoraConfig {
            r,
            lora_alpha,
            use_rslora,
            target_modules: Targets::Unset,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            lora_dropout: 0.0,
            base_model_name_or_path: None,
        }
    }

    /// The rank and alpha PEFT gives module `module` (e.g. `model.transformer.blocks.0.q_proj`):
    /// the first `rank_pattern` / `alpha_pattern` key for which `^(.*\.)?(KEY)$` matches the
    /// module name, else `r` / `lora_alpha` (PEFT's `get_pattern_key`).
    pub fn rank_alpha(&self, module: &str) -> Result<(usize, f64)> {
        let mut rank = self.r;
        for (key, r) in &self.rank_pattern {
            if pattern_matches(key, module, "rank_pattern")? {
                rank = *r;
                break;
            }
        }
        let mut alpha = self.lora_alpha;
        for (key, a) in &self.alpha_pattern {
            if pattern_matches(key, module, "alpha_pattern")? {
                alpha = *a;
                break;
            }
        }
        Ok((rank, alpha))
    }
}

/// PEFT's `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_matches(key: &str, module: &str, field: &str) -> Result<bool> {
    let re = regex::RegexBuilder::new(&format!("^(?:.*\\.)?(?:{key})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            anyhow!("{ADAPTER_CONFIG}: {field} key {key:?} is not a regular expression llada can use: {e}")
        })?;
    Ok(re.is_match(module))
}

/// A JSON object read with its keys in file order (PEFT's patterns are tried in that order).
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(
                self,
                mut m: M,
            ) -> std::result::Result<Ordered, M::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(serde::Deserialize)]
struct RawConfig {
    peft_type: Option<Value>,
    r: Option<Value>,
    lora_alpha: Option<Value>,
    use_rslora: Option<Value>,
    use_dora: Option<Value>,
    lora_bias: Option<Value>,
    bias: Option<Value>,
    target_modules: Option<Value>,
    rank_pattern: Option<Option<Ordered>>,
    alpha_pattern: Option<Option<Ordered>>,
    lora_dropout: Option<Value>,
    base_model_name_or_path: Option<Value>,
    layer_replication: Option<Value>,
    alora_invocation_tokens: Option<Value>,
    use_qalora: Option<Value>,
}

fn rank_value(v: &Value, what: &str) -> Result<usize> {
    let r = v
        .as_u64()
        .ok_or_else(|| anyhow!("{ADAPTER_CONFIG}: {what} = {v} is not a non-negative integer"))?;
    if r == 0 {
        bail!("{ADAPTER_CONFIG}: {what} = 0: a LoRA rank must be at least 1");
    }
    if r > MAX_RANK as u64 {
        bail!("{ADAPTER_CONFIG}: {what} = {r} exceeds the largest rank accepted ({MAX_RANK})");
    }
    Ok(r as usize)
}

fn alpha_value(v: &Value, what: &str) -> Result<f64> {
    let a = v
        .as_f64()
        .ok_or_else(|| anyhow!("{ADAPTER_CONFIG}: {what} = {v} is not a number"))?;
    if !a.is_finite() {
        bail!("{ADAPTER_CONFIG}: {what} = {a} is not finite");
    }
    Ok(a)
}

fn flag(v: &Option<Value>, what: &str) -> Result<bool> {
    match v {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => bail!("{ADAPTER_CONFIG}: {what} = {v} is not true or false"),
    }
}

impl LoraConfig {
    /// Parse and check `adapter_config.json` text.
    pub fn from_json(text: &str) -> Result<LoraConfig> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| {
            anyhow!("{ADAPTER_CONFIG}: malformed JSON or field of the wrong type: {e}")
        })?;
        match raw.peft_type.as_ref().and_then(Value::as_str) {
            Some("LORA") => {}
            Some(t) => bail!(
                "{ADAPTER_CONFIG}: peft_type {t:?}: only LoRA adapters (peft_type \"LORA\") are supported"
            ),
            None => bail!("{ADAPTER_CONFIG}: no peft_type \"LORA\": not a PEFT LoRA adapter"),
        }
        let r = rank_value(
            raw.r
                .as_ref()
                .ok_or_else(|| anyhow!("{ADAPTER_CONFIG}: no rank `r`"))?,
            "r",
        )?;
        // PEFT's default lora_alpha is 8.
        let lora_alpha = match &raw.lora_alpha {
            None | Some(Value::Null) => 8.0,
            Some(v) => alpha_value(v, "lora_alpha")?,
        };
        if flag(&raw.use_dora, "use_dora")? {
            bail!("{ADAPTER_CONFIG}: use_dora: DoRA adapters are not supported (only plain LoRA)");
        }
        if flag(&raw.lora_bias, "lora_bias")? {
            bail!("{ADAPTER_CONFIG}: lora_bias: a bias on lora_B is not supported (LLaDA's linears have no bias)");
        }
        if flag(&raw.use_qalora, "use_qalora")? {
            bail!("{ADAPTER_CONFIG}: use_qalora: QALoRA adapters are not supported");
        }
        match raw.bias.as_ref() {
            None | Some(Value::Null) => {}
            Some(Value::String(b)) if ["none", "all", "lora_only"].contains(&b.as_str()) => {}
            Some(b) => {
                bail!("{ADAPTER_CONFIG}: bias = {b}: expected \"none\", \"all\" or \"lora_only\"")
            }
        }
        if !matches!(raw.layer_replication, None | Some(Value::Null)) {
            bail!("{ADAPTER_CONFIG}: layer_replication changes the architecture; not supported");
        }
        if !matches!(raw.alora_invocation_tokens, None | Some(Value::Null)) {
            bail!("{ADAPTER_CONFIG}: alora_invocation_tokens: activated LoRA cannot be merged into the weights; not supported");
        }
        let target_modules = match raw.target_modules {
            None | Some(Value::Null) => Targets::Unset,
            Some(Value::String(s)) => Targets::Regex(s),
            Some(Value::Array(a)) => Targets::Names(
                a.iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            anyhow!("{ADAPTER_CONFIG}: target_modules entry {v} is not a string")
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(v) => {
                bail!("{ADAPTER_CONFIG}: target_modules = {v} is neither a list nor a string")
            }
        };
        let rank_pattern = raw.rank_pattern.flatten().map_or(Ok(Vec::new()), |o| {
            o.0.iter()
                .map(|(k, v)| Ok((k.clone(), rank_value(v, &format!("rank_pattern[{k:?}]"))?)))
                .collect::<Result<Vec<_>>>()
        })?;
        let alpha_pattern = raw.alpha_pattern.flatten().map_or(Ok(Vec::new()), |o| {
            o.0.iter()
                .map(|(k, v)| Ok((k.clone(), alpha_value(v, &format!("alpha_pattern[{k:?}]"))?)))
                .collect::<Result<Vec<_>>>()
        })?;
        let lora_dropout = match &raw.lora_dropout {
            None | Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| anyhow!("{ADAPTER_CONFIG}: lora_dropout = {v} is not in [0, 1)"))?,
        };
        let base_model_name_or_path = raw
            .base_model_name_or_path
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string);
        let cfg = LoraConfig {
            r,
            lora_alpha,
            use_rslora: flag(&raw.use_rslora, "use_rslora")?,
            target_modules,
            rank_pattern,
            alpha_pattern,
            lora_dropout,
            base_model_name_or_path,
        };
        // Compile every pattern now, so a bad one is reported even if it matches nothing.
        for (k, _) in &cfg.rank_pattern {
            pattern_matches(k, "", "rank_pattern")?;
        }
        for (k, _) in &cfg.alpha_pattern {
            pattern_matches(k, "", "alpha_pattern")?;
        }
        Ok(cfg)
    }
}
