//! The Hugging Face LLaDA `config.json`.
//!
//! [`ModelConfig::from_json_str`] reads the fields upstream's `LLaDAConfig` reads (reference §1),
//! starting from the `ModelConfig` dataclass defaults (§1.2) and honouring the aliases
//! `num_attention_heads → n_heads`, `num_hidden_layers → n_layers`, `hidden_size → d_model`.
//! Settings this engine does not implement (anything but the LLaDA `llama` block with SiLU gate,
//! RMSNorm, RoPE, no biases, untied LM head) are rejected with an error naming the field, its
//! value and the file, rather than silently computing something else.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// Upper limits of the sizes of a model config ([`ModelConfig::validate`]). With these, every
/// weight has fewer than 2^43 elements (`embedding_size · d_model`) and every shape product
/// fits `usize`; the per-layer tensor list has at most 9 · 1024 entries; the RoPE tables of
/// `max_sequence_length · head_dim / 2` f32 pairs stay below 2^31 bytes.
pub const LIMITS: [(&str, usize); 8] = [
    ("d_model", 1 << 16),
    ("n_heads", 1 << 10),
    ("n_kv_heads", 1 << 10),
    ("n_layers", 1 << 10),
    ("mlp_hidden_size", 1 << 20),
    ("vocab_size", 1 << 22),
    ("embedding_size", 1 << 22),
    ("max_sequence_length", 1 << 20),
];

/// Largest head width accepted (`d_model / n_heads`; real models use 64–256).
pub const MAX_HEAD_DIM: usize = 1024;

/// Largest `max_sequence_length · head_dim` accepted (the size of the RoPE tables).
pub const MAX_ROPE_VALUES: usize = 1 << 26;

/// The parts of `config.json` this engine uses, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// Effective key/value heads (`n_kv_heads`, or `n_heads` when absent).
    pub n_kv_heads: usize,
    pub n_layers: usize,
    /// MLP width `F` (`mlp_hidden_size`, or `mlp_ratio · d_model` when absent).
    pub mlp_hidden_size: usize,
    /// Tokenizer vocabulary size (`vocab_size`).
    pub vocab_size: usize,
    /// Rows of the embedding and of the LM head: `V` (`embedding_size`, or `vocab_size`).
    pub embedding_size: usize,
    pub max_sequence_length: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub mask_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

/// One JSON object with typed, field-naming accessors. `null` counts as absent (upstream's
/// dataclass treats `None` as "use the default / derive it").
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    source: &'a str,
}

impl Fields<'_> {
    fn raw(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    /// Field `key` converted by `conv`, or an error saying it `must be {what}`.
    fn typed<'s, T>(
        &'s self,
        key: &str,
        what: &str,
        conv: impl FnOnce(&'s Value) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.raw(key) else {
            return Ok(None);
        };
        let source = self.source;
        conv(v)
            .map(Some)
            .ok_or_else(|| anyhow!("{source}: field `{key}` = {v} must be {what}"))
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        let n = self.typed(key, "a non-negative integer", Value::as_u64)?;
        n.map(|n| {
            usize::try_from(n)
                .map_err(|_| anyhow!("{}: field `{key}` = {n} is too large", self.source))
        })
        .transpose()
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a finite number", |v| {
            v.as_f64().filter(|x| x.is_finite())
        })
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "true or false", Value::as_bool)
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    /// A field with an alias (`n_heads` / `num_attention_heads`); both present must agree.
    fn usize_aliased(&self, key: &str, alias: &str) -> Result<Option<usize>> {
        match (self.usize(key)?, self.usize(alias)?) {
            (Some(a), Some(b)) if a != b => bail!(
                "{}: field `{key}` = {a} disagrees with its alias `{alias}` = {b}",
                self.source
            ),
            (a, b) => Ok(a.or(b)),
        }
    }

    /// A token id: an integer that fits u32.
    fn token_id(&self, key: &str, default: u32) -> Result<u32> {
        match self.usize(key)? {
            None => Ok(default),
            Some(n) => u32::try_from(n).map_err(|_| {
                anyhow!(
                    "{}: field `{key}` = {n} does not fit a token id",
                    self.source
                )
            }),
        }
    }

    /// A setting that must equal `want` (`default` when absent), shown as `show` shows it.
    fn require<T: PartialEq + Copy>(
        &self,
        key: &str,
        got: Option<T>,
        (default, want): (T, T),
        show: impl Fn(T) -> String,
    ) -> Result<()> {
        let v = got.unwrap_or(default);
        if v != want {
            let note = if got.is_none() {
                " (the default when absent)"
            } else {
                ""
            };
            bail!(
                "{}: unsupported setting `{key}` = {}{note}; this engine implements only \
                 `{key}` = {} (the LLaDA architecture)",
                self.source,
                show(v),
                show(want)
            );
        }
        Ok(())
    }

    /// A string-valued setting that must equal `want` (`default` when absent).
    fn require_str(&self, key: &str, default: &str, want: &str) -> Result<()> {
        let got = self.str(key)?;
        self.require(key, got, (default, want), |v| format!("\"{v}\""))
    }

    /// A boolean setting that must equal `want` (`default` when absent).
    fn require_bool(&self, key: &str, default: bool, want: bool) -> Result<()> {
        let got = self.bool(key)?;
        self.require(key, got, (default, want), |v| v.to_string())
    }
}

impl ModelConfig {
    /// Width of one attention head, `HD = d_model / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Read and validate `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::hf::fsio::read_text_file(path, crate::hf::fsio::MAX_CONFIG_BYTES)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse and validate the text of a `config.json`; `source_name` (usually the path) is used
    /// in every error message.
    pub fn from_json_str(s: &str, source_name: &str) -> Result<ModelConfig> {
        let value: Value =
            serde_json::from_str(s).map_err(|e| anyhow!("{source_name}: malformed JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("{source_name}: expected a JSON object at the top level"))?;
        let f = Fields {
            obj,
            source: source_name,
        };

        // Architecture switches (defaults: the upstream dataclass, reference §1.2).
        f.require_str("block_type", "sequential", "llama")?;
        f.require_str("activation_type", "swiglu", "silu")?;
        f.require_str("layer_norm_type", "default", "rms")?;
        f.require_bool("weight_tying", true, false)?;
        f.require_bool("include_bias", false, false)?;
        f.require_bool("include_qkv_bias", false, false)?;
        let include_bias = f.bool("include_bias")?.unwrap_or(false);
        // `bias_for_layer_norm: null` inherits `include_bias`.
        f.require_bool("bias_for_layer_norm", include_bias, false)?;
        f.require_bool("alibi", false, false)?;
        f.require_bool("rope", false, true)?;
        f.require_bool("rope_full_precision", true, true)?;
        f.require_bool("attention_layer_norm", false, false)?;
        f.require_bool("layer_norm_with_affine", true, true)?;
        f.require_bool("input_emb_norm", false, false)?;
        f.require_bool("scale_logits", false, false)?;

        let d_model = f.usize_aliased("d_model", "hidden_size")?.unwrap_or(768);
        let n_heads = f
            .usize_aliased("n_heads", "num_attention_heads")?
            .unwrap_or(12);
        let n_layers = f
            .usize_aliased("n_layers", "num_hidden_layers")?
            .unwrap_or(12);
        let mqa = f.bool("multi_query_attention")?;
        let n_kv_heads = match (f.usize("n_kv_heads")?, mqa) {
            (None, Some(true)) => 1,
            (None, _) => n_heads,
            (Some(k), Some(true)) if k != 1 => bail!(
                "{source_name}: `n_kv_heads` = {k} contradicts `multi_query_attention` = true \
                 (which means 1 key/value head)"
            ),
            (Some(k), Some(false)) if k != n_heads => bail!(
                "{source_name}: `n_kv_heads` = {k} contradicts `multi_query_attention` = false \
                 (which means n_kv_heads = n_heads = {n_heads})"
            ),
            (Some(k), _) => k,
        };
        let mlp_ratio = f.usize("mlp_ratio")?.unwrap_or(4);
        if mlp_ratio > 64 {
            bail!("{source_name}: field `mlp_ratio` = {mlp_ratio} is larger than any real model has (at most 64)");
        }
        let mlp_hidden_size = match f.usize("mlp_hidden_size")? {
            Some(m) => m,
            None => mlp_ratio
                .checked_mul(d_model)
                .ok_or_else(|| anyhow!("{source_name}: `mlp_ratio` · `d_model` overflows"))?,
        };
        let vocab_size = f.usize("vocab_size")?.unwrap_or(50257);
        // The dataclass default is 50304, but an explicit `null` means "same as vocab_size";
        // a missing key takes the dataclass default like upstream.
        let embedding_size = if obj.contains_key("embedding_size") {
            f.usize("embedding_size")?.unwrap_or(vocab_size)
        } else {
            50304
        };
        let max_sequence_length = f.usize("max_sequence_length")?.unwrap_or(1024);
        let rope_theta = f.f64("rope_theta")?.unwrap_or(10000.0);
        let rms_norm_eps = f.f64("rms_norm_eps")?.unwrap_or(1e-5);
        let mask_token_id = f.token_id("mask_token_id", 50256)?;
        let eos_token_id = f.token_id("eos_token_id", 50256)?;
        let pad_token_id = f.token_id("pad_token_id", 50256)?;

        let cfg = ModelConfig {
            d_model,
            n_heads,
            n_kv_heads,
            n_layers,
            mlp_hidden_size,
            vocab_size,
            embedding_size,
            max_sequence_length,
            rope_theta: rope_theta as f32,
            rms_norm_eps: rms_norm_eps as f32,
            mask_token_id,
            eos_token_id,
            pad_token_id,
        };
        cfg.validate()
            .with_context(|| format!("{source_name}: invalid model config"))?;
        Ok(cfg)
    }

    /// Check sizes and ids for consistency (also used for configs built in code).
    ///
    /// Every size must lie in `1..=limit` ([`LIMITS`]): the limits sit far above any released
    /// model (LLaDA-8B: 32 layers, d_model 4096, 126 464 embeddings, 4096 positions) and far
    /// below what would make a tensor list, a shape product or the RoPE tables exhaust memory,
    /// so a hostile `config.json` is refused here, before anything is allocated from it.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("n_layers", self.n_layers),
            ("mlp_hidden_size", self.mlp_hidden_size),
            ("vocab_size", self.vocab_size),
            ("embedding_size", self.embedding_size),
            ("max_sequence_length", self.max_sequence_length),
        ] {
            if v == 0 {
                bail!("`{name}` must be > 0");
            }
            let limit = LIMITS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(usize::MAX, |&(_, l)| l);
            if v > limit {
                bail!(
                    "`{name}` = {v} is larger than any real model has (this engine accepts at \
                     most {limit})"
                );
            }
        }
        if self.d_model % self.n_heads != 0 {
            bail!(
                "`d_model` = {} is not a multiple of `n_heads` = {}",
                self.d_model,
                self.n_heads
            );
        }
        if self.head_dim() > MAX_HEAD_DIM {
            bail!(
                "head dim d_model/n_heads = {} is larger than any real model has (this engine \
                 accepts at most {MAX_HEAD_DIM})",
                self.head_dim()
            );
        }
        // The RoPE tables hold `max_sequence_length · head_dim` f32 (cos and sin halves),
        // allocated when a model is built: at most 2^26 values = 256 MiB (LLaDA-8B: 2^19).
        let rope_values = self.max_sequence_length.saturating_mul(self.head_dim());
        if rope_values > MAX_ROPE_VALUES {
            bail!(
                "`max_sequence_length` = {} × head dim {} = {rope_values} RoPE table entries, \
                 more than the {MAX_ROPE_VALUES} this engine accepts (lower max_sequence_length)",
                self.max_sequence_length,
                self.head_dim()
            );
        }
        if self.head_dim() % 2 != 0 {
            bail!(
                "head dim d_model/n_heads = {} must be even (RoPE rotates half-dims)",
                self.head_dim()
            );
        }
        if self.n_kv_heads > self.n_heads || self.n_heads % self.n_kv_heads != 0 {
            bail!(
                "`n_kv_heads` = {} must divide `n_heads` = {}",
                self.n_kv_heads,
                self.n_heads
            );
        }
        if self.embedding_size < self.vocab_size {
            bail!(
                "`embedding_size` = {} is smaller than `vocab_size` = {}",
                self.embedding_size,
                self.vocab_size
            );
        }
        for (name, id) in [
            ("mask_token_id", self.mask_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ] {
            if id as usize >= self.embedding_size {
                bail!(
                    "`{name}` = {id} is outside the embedding (embedding_size = {})",
                    self.embedding_size
                );
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "`rope_theta` = {} must be a positive number",
                self.rope_theta
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            bail!(
                "`rms_norm_eps` = {} must be a non-negative number",
                self.rms_norm_eps
            );
        }
        Ok(())
    }

    /// A `config.json` in the Hugging Face LLaDA format with every field of reference §1.1, so
    /// that upstream's `LLaDAConfig` and [`ModelConfig::from_json_str`] both read it back.
    pub fn to_json(&self) -> String {
        // `mlp_ratio` is unused when `mlp_hidden_size` is set; LLaDA's file says 4.
        let mlp_ratio = 4;
        // f32 fields as the shortest decimal that reads back to the same f32 (1e-5, not
        // 9.99999974737875e-6).
        let short = |x: f32| x.to_string().parse::<f64>().unwrap_or(x as f64);
        // Two halves: one `json!` literal this long exceeds the macro recursion limit.
        let mut a = serde_json::json!({
            "activation_type": "silu",
            "alibi": false,
            "alibi_bias_max": 8.0,
            "architectures": ["LLaDAModelLM"],
            "attention_dropout": 0.0,
            "attention_layer_norm": false,
            "attention_layer_norm_with_affine": true,
            "auto_map": {
                "AutoConfig": "configuration_llada.LLaDAConfig",
                "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"
            },
            "bias_for_layer_norm": false,
            "block_group_size": 1,
            "block_type": "llama",
            "d_model": self.d_model,
            "embedding_dropout": 0.0,
            "embedding_size": self.embedding_size,
            "eos_token_id": self.eos_token_id,
            "flash_attention": false,
            "include_bias": false,
            "include_qkv_bias": false,
            "init_cutoff_factor": null,
            "init_device": "meta",
            "init_fn": "mitchell",
            "init_std": 0.02,
        });
        let b = serde_json::json!({
            "input_emb_norm": false,
            "layer_norm_type": "rms",
            "layer_norm_with_affine": true,
            "mask_token_id": self.mask_token_id,
            "max_sequence_length": self.max_sequence_length,
            "mlp_hidden_size": self.mlp_hidden_size,
            "mlp_ratio": mlp_ratio,
            "model_type": "llada",
            "multi_query_attention": null,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_layers": self.n_layers,
            "pad_token_id": self.pad_token_id,
            "precision": "amp_bf16",
            "residual_dropout": 0.0,
            "rms_norm_eps": short(self.rms_norm_eps),
            "rope": true,
            "rope_full_precision": true,
            "rope_theta": short(self.rope_theta),
            "scale_logits": false,
            "transformers_version": "4.46.3",
            "use_cache": false,
            "vocab_size": self.vocab_size,
            "weight_tying": false
        });
        if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
            a.extend(b);
        }
        // Serialising a `Value` built from plain numbers and strings cannot fail.
        serde_json::to_string_pretty(&a).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_to_json() {
        let cfg = ModelConfig {
            d_model: 64,
            n_heads: 4,
            n_kv_heads: 2,
            n_layers: 2,
            mlp_hidden_size: 160,
            vocab_size: 500,
            embedding_size: 512,
            max_sequence_length: 1024,
            rope_theta: 500000.0,
            rms_norm_eps: 1e-5,
            mask_token_id: 505,
            eos_token_id: 501,
            pad_token_id: 501,
        };
        let back = ModelConfig::from_json_str(&cfg.to_json(), "mem").unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn defaults_and_aliases() {
        let s = r#"{"block_type":"llama","activation_type":"silu","layer_norm_type":"rms",
            "weight_tying":false,"rope":true,"hidden_size":256,"num_attention_heads":8,
            "num_hidden_layers":3}"#;
        let c = ModelConfig::from_json_str(s, "mem").unwrap();
        assert_eq!(
            (c.d_model, c.n_heads, c.n_kv_heads, c.n_layers),
            (256, 8, 8, 3)
        );
        assert_eq!(c.mlp_hidden_size, 4 * 256);
        assert_eq!((c.vocab_size, c.embedding_size), (50257, 50304));
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_sequence_length, 1024);
    }

    #[test]
    fn alias_conflict() {
        let s = r#"{"block_type":"llama","activation_type":"silu","layer_norm_type":"rms",
            "weight_tying":false,"rope":true,"d_model":256,"hidden_size":128}"#;
        let e = ModelConfig::from_json_str(s, "mem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_size") && e.contains("d_model"), "{e}");
    }
}
