//! `tokenizer.json` and the chat template.
//!
//! [`Tokenizer`] wraps a Hugging Face `tokenizer.json` (read with the `tokenizers` crate) and the
//! chat template of `tokenizer_config.json` (or `chat_template.jinja`), rendered with minijinja
//! in the environment `transformers` uses: `trim_blocks` and `lstrip_blocks` on, `loopcontrols`,
//! `raise_exception(msg)`, a `tojson` that writes like Python's `json.dumps(ensure_ascii=False)`,
//! and the variables `messages`, `bos_token`, `eos_token`, `pad_token`, `add_generation_prompt`.
//! The environment is a sandbox: no loader, so no `include`/`import`/`extends`, no file system;
//! a render is limited by fuel ([`TEMPLATE_FUEL`](super::template::TEMPLATE_FUEL) instructions) and recursion depth, its source by
//! size and nesting ([`check_template_source`](super::template::check_template_source)), and on Linux it runs in a forked child under a
//! memory budget ([`TEMPLATE_MEMORY_BUDGET`](super::template::TEMPLATE_MEMORY_BUDGET)), a timeout and an output limit, so a hostile
//! template (a memory bomb, a stack bomb, an endless loop) fails with an error instead of
//! taking the process down or hanging. A few Python string/dict methods that HF templates call
//! (`strip`, `startswith`, `items`, ...) are provided.
//!
//! When no template is given, LLaDA-8B-Instruct's template ([`LLADA_INSTRUCT_TEMPLATE`],
//! reference §3) is used. Special ids come from the config (mask, eos, pad) and the vocabulary
//! (`<|eot_id|>`, the BOS string): nothing is hard-coded.

use crate::hf::template::{render_chat_template, LLADA_INSTRUCT_TEMPLATE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::Value as JValue;
use serde_json::Value;

use crate::hf::checkpoint::{
    read_text_file, resolve_in_folder, MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES,
};
use crate::hf::config::ModelConfig;

/// Special token ids the sampler and the CLI need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    /// `mask_token_id` of config.json (`<|mdm_mask|>`).
    pub mask: u32,
    /// `eos_token_id` of config.json (`<|endoftext|>`).
    pub eos: u32,
    /// `pad_token_id` of config.json.
    pub pad: u32,
    /// `<|eot_id|>`, when the vocabulary has it.
    pub eot: Option<u32>,
    /// The id of the BOS string, when there is one.
    pub bos: Option<u32>,
}

/// A tokenizer with its chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: String,
    template_is_fallback: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    /// Special ids (from the config and the vocabulary).
    pub special: SpecialIds,
    source: PathBuf,
    /// The file the chat template came from (`None`: the built-in one).
    template_source: Option<PathBuf>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("special", &self.special)
            .field("template_is_fallback", &self.template_is_fallback)
            .finish_non_exhaustive()
    }
}

/// A special-token field of tokenizer_config.json: a string, `{"content": ...}`, or null.
fn token_field(v: Option<&Value>, key: &str, file: &Path) -> Result<Option<String>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => bail!("{}: `{key}` object has no string `content`", file.display()),
        },
        Some(other) => bail!("{}: `{key}` = {other} is not a token", file.display()),
    }
}

/// What tokenizer_config.json contributes.
#[derive(Default)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
}

fn read_tokenizer_config(path: &Path) -> Result<TokenizerConfig> {
    let text = read_text_file(path, MAX_CONFIG_BYTES)?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: malformed JSON: {e}", path.display()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
    let chat_template = match obj.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        // Newer transformers: a list of {"name", "template"}; use "default", else the first.
        Some(Value::Array(list)) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first());
            match pick.and_then(|t| t.get("template")).and_then(Value::as_str) {
                Some(s) => Some(s.to_string()),
                None => bail!(
                    "{}: `chat_template` list has no entry with a string `template`",
                    path.display()
                ),
            }
        }
        Some(other) => bail!(
            "{}: `chat_template` = {other} is neither a string nor a list",
            path.display()
        ),
    };
    Ok(TokenizerConfig {
        chat_template,
        bos_token: token_field(obj.get("bos_token"), "bos_token", path)?,
        eos_token: token_field(obj.get("eos_token"), "eos_token", path)?,
        pad_token: token_field(obj.get("pad_token"), "pad_token", path)?,
    })
}

impl Tokenizer {
    /// Load `tokenizer.json` from a model folder, plus `tokenizer_config.json` and
    /// `chat_template.jinja` when present (the latter wins, as in `transformers`).
    pub fn from_dir(dir: &Path, cfg: &ModelConfig) -> Result<Tokenizer> {
        // Every file must stay inside the folder (symlinks included): folders come from strangers.
        let json = resolve_in_folder(dir, "tokenizer.json", dir)?;
        let conf = dir.join("tokenizer_config.json");
        let conf = match conf.exists() {
            true => Some(resolve_in_folder(dir, "tokenizer_config.json", dir)?),
            false => None,
        };
        let mut t = Self::from_files(&json, conf.as_deref(), cfg)?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let jinja = resolve_in_folder(dir, "chat_template.jinja", dir)?;
            t.chat_template = read_text_file(&jinja, MAX_CONFIG_BYTES)?;
            t.template_is_fallback = false;
            t.template_source = Some(jinja);
        }
        Ok(t)
    }

    /// Load a `tokenizer.json` and an optional `tokenizer_config.json`.
    ///
    /// Without a `bos_token` in the config, `<|startoftext|>` is used when the vocabulary has it
    /// (LLaDA's BOS). Errors when the vocabulary has ids outside the model's embedding, or when
    /// it has `<|mdm_mask|>` at an id other than the config's `mask_token_id`.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        cfg: &ModelConfig,
    ) -> Result<Tokenizer> {
        let file = tokenizer_json.display();
        let text = read_text_file(tokenizer_json, MAX_TOKENIZER_BYTES)
            .with_context(|| format!("cannot read {file}"))?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| anyhow!("{file}: not a valid tokenizer.json: {e}"))?;
        let tc = match tokenizer_config {
            Some(p) => read_tokenizer_config(p)?,
            None => TokenizerConfig::default(),
        };

        let vocab = inner.get_vocab(true);
        if let Some((tok, &max)) = vocab.iter().max_by_key(|(_, &id)| id) {
            if max as usize >= cfg.embedding_size {
                bail!(
                    "{file}: token {tok:?} has id {max}, outside the model's embedding \
                     (embedding_size = {} in config.json)",
                    cfg.embedding_size
                );
            }
        }
        if let Some(&m) = vocab.get("<|mdm_mask|>") {
            if m != cfg.mask_token_id {
                bail!(
                    "{file}: `<|mdm_mask|>` has id {m} but config.json says mask_token_id = {}",
                    cfg.mask_token_id
                );
            }
        }
        let bos_token = tc.bos_token.or_else(|| {
            vocab
                .contains_key("<|startoftext|>")
                .then(|| "<|startoftext|>".into())
        });
        let special = SpecialIds {
            mask: cfg.mask_token_id,
            eos: cfg.eos_token_id,
            pad: cfg.pad_token_id,
            eot: vocab.get("<|eot_id|>").copied(),
            bos: bos_token.as_ref().and_then(|b| vocab.get(b).copied()),
        };
        let (chat_template, template_is_fallback, template_source) = match tc.chat_template {
            Some(t) => (t, false, tokenizer_config.map(Path::to_path_buf)),
            None => (LLADA_INSTRUCT_TEMPLATE.to_string(), true, None),
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            template_is_fallback,
            bos_token,
            eos_token: tc.eos_token,
            pad_token: tc.pad_token,
            special,
            source: tokenizer_json.to_path_buf(),
            template_source,
        })
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's post-processor (which may
    /// add BOS/EOS, depending on tokenizer.json); special tokens written in the text are always
    /// recognised, as in `transformers`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow!("{}: cannot encode text: {e}", self.source.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; ids the vocabulary does not know (the embedding's padding rows) are skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow!("{}: cannot decode ids: {e}", self.source.display()))
    }

    /// The id of a token string, if the vocabulary (added tokens included) has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template in use.
    pub fn chat_template(&self) -> &str {
        &self.chat_template
    }

    /// Whether [`LLADA_INSTRUCT_TEMPLATE`] is used because the folder had no template.
    pub fn template_is_fallback(&self) -> bool {
        self.template_is_fallback
    }

    /// Render the chat template over `(role, content)` messages with
    /// `add_generation_prompt = true`, as `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template<R: AsRef<str>, C: AsRef<str>>(
        &self,
        messages: &[(R, C)],
    ) -> Result<String> {
        let msgs: Vec<BTreeMap<&str, &str>> = messages
            .iter()
            .map(|(r, c)| BTreeMap::from([("role", r.as_ref()), ("content", c.as_ref())]))
            .collect();
        let mut ctx: BTreeMap<&str, JValue> = BTreeMap::new();
        ctx.insert("messages", JValue::from_serialize(&msgs));
        ctx.insert("add_generation_prompt", JValue::from(true));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = v {
                ctx.insert(k, JValue::from(v.as_str()));
            }
        }
        render_chat_template(&self.chat_template, &ctx).map_err(|e| {
            let what = if self.template_is_fallback {
                "the built-in LLaDA-Instruct chat template".to_string()
            } else {
                let file = self.template_source.as_deref().unwrap_or(&self.source);
                format!("the chat template of {}", file.display())
            };
            anyhow!("cannot render {what}: {e:#}")
        })
    }

    /// Render the chat template and tokenize the text with `add_special_tokens = false`, as
    /// `apply_chat_template(..., tokenize=True)` does: the template carries the one BOS.
    pub fn encode_chat<R: AsRef<str>, C: AsRef<str>>(
        &self,
        messages: &[(R, C)],
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages)?;
        self.encode(&text, false)
    }
}
