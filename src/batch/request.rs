//! See [`super`]: the `request` part of offline batch generation.

use super::shard::*;
use crate::backend::head::Remasking;
use crate::engine::fast::Decode;
use crate::engine::sampler::GenerateParams;
use crate::hf::config::ModelConfig;
use crate::hf::tokenizer::Tokenizer;
use crate::rng::mix64;
use anyhow::Result;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Generation parameters a request may set (the `llada generate` flags): upstream `generate`'s
/// arguments, the Fast-dLLM decoding and the chat switch.
#[derive(Clone, Debug, PartialEq)]
pub struct GenOptions {
    /// The sampler's arguments (`steps` … `confidence_eos_eot_inf`). The model's ids and limits
    /// in it are [`GenerateParams::default`]'s and unused: [`GenOptions::to_params`] takes them
    /// from the model.
    pub params: GenerateParams,
    /// Fast-dLLM KV cache and commit rule (`--cache`, `--threshold`, `--factor`; at most one of
    /// `threshold`, `factor`).
    pub decode: Decode,
    /// Render a text `prompt` as one user message with the chat template.
    pub chat: bool,
}

impl Default for GenOptions {
    /// The defaults of `llada generate`: upstream's, with blocks of 32.
    fn default() -> Self {
        GenOptions {
            params: GenerateParams {
                block_length: 32,
                ..GenerateParams::default()
            },
            decode: Decode::default(),
            chat: false,
        }
    }
}

/// Request keys that override [`GenOptions`].
pub const PARAM_KEYS: [&str; 13] = [
    "steps",
    "gen_length",
    "block_length",
    "temperature",
    "cfg_scale",
    "remasking",
    "seed",
    "logits_eos_inf",
    "confidence_eos_eot_inf",
    "cache",
    "threshold",
    "factor",
    "chat",
];

/// The random-stream key of a request ([`GenerateParams::row_keys`]): the high 31 bits of
/// `mix64(FNV-1a-64(id))`, where `id` is the request's `id` as compact JSON text (`"a"` with
/// its quotes for a string id, `7` for an integer). A pure function of the id, so a sampled
/// request gives the same result in any batch, shard or resumed run (the sampler keys its
/// random numbers by this key and the request's own, unpadded positions).
pub fn rng_row_key(id_key: &str) -> u32 {
    (mix64(fnv1a64(id_key.as_bytes())) >> 33) as u32
}

/// 64-bit FNV-1a.
pub(super) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn remasking_name(r: Remasking) -> &'static str {
    match r {
        Remasking::LowConfidence => "low_confidence",
        Remasking::Random => "random",
    }
}

impl GenOptions {
    /// `base` (which carries the model's ids and limits) with these options.
    pub fn to_params(&self, base: &GenerateParams) -> GenerateParams {
        self.params.with_model_of(base)
    }

    /// Combinations the sampler refuses, as a message naming the keys.
    pub fn check(&self) -> Result<(), String> {
        if self.decode.threshold.is_some() && self.decode.factor.is_some() {
            return Err("give either `threshold` or `factor`, not both (a command-line default counts; set the other to null)".into());
        }
        if self.params.cfg_scale > 0.0 && !self.decode.is_plain() {
            return Err(format!(
                "`cfg_scale` {} > 0 is not supported with Fast-dLLM decoding (`cache` {}, `threshold`, `factor`)",
                self.params.cfg_scale, self.decode.cache
            ));
        }
        Ok(())
    }

    /// The parameters as written in each output line.
    pub fn to_json(&self) -> Value {
        json!({
            "steps": self.params.steps,
            "gen_length": self.params.gen_length,
            "block_length": self.params.block_length,
            "temperature": self.params.temperature,
            "cfg_scale": self.params.cfg_scale,
            "remasking": remasking_name(self.params.remasking),
            "seed": self.params.seed,
            "logits_eos_inf": self.params.logits_eos_inf,
            "confidence_eos_eot_inf": self.params.confidence_eos_eot_inf,
            "cache": self.decode.cache.to_string(),
            "threshold": self.decode.threshold,
            "factor": self.decode.factor,
        })
    }

    /// Key of the batch group: requests share a batch only when everything that reaches the
    /// sampler is identical, i.e. their [`GenOptions::to_json`] (`chat` only affects
    /// tokenization and is left out; distinct floats print distinctly).
    pub(super) fn group_key(&self) -> String {
        self.to_json().to_string()
    }

    /// Apply the overrides in `obj` (keys of [`PARAM_KEYS`]), naming the bad key.
    pub(super) fn apply(&mut self, obj: &Map<String, Value>) -> Result<(), String> {
        fn uint(k: &str, v: &Value) -> Result<u64, String> {
            v.as_u64()
                .ok_or_else(|| format!("`{k}` must be a non-negative integer, got {v}"))
        }
        fn size(k: &str, v: &Value) -> Result<usize, String> {
            let n = uint(k, v)?;
            if n == 0 {
                return Err(format!("`{k}` must be > 0"));
            }
            usize::try_from(n).map_err(|_| format!("`{k}` = {n} is too large"))
        }
        fn num(k: &str, v: &Value) -> Result<f64, String> {
            match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
                _ => Err(format!("`{k}` must be a finite number >= 0, got {v}")),
            }
        }
        // A number, or null to clear a command-line default.
        fn opt_num(
            k: &str,
            v: &Value,
            ok: impl Fn(f64) -> bool,
            what: &str,
        ) -> Result<Option<f64>, String> {
            match v {
                Value::Null => Ok(None),
                _ => match v.as_f64() {
                    Some(x) if ok(x) => Ok(Some(x)),
                    _ => Err(format!("`{k}` must be {what} or null, got {v}")),
                },
            }
        }
        fn flag(k: &str, v: &Value) -> Result<bool, String> {
            v.as_bool()
                .ok_or_else(|| format!("`{k}` must be true or false, got {v}"))
        }
        fn text<'v>(k: &str, v: &'v Value) -> Result<&'v str, String> {
            v.as_str()
                .ok_or_else(|| format!("`{k}` must be a string, got {v}"))
        }
        for (k, v) in obj {
            match k.as_str() {
                "steps" => self.params.steps = size(k, v)?,
                "gen_length" => self.params.gen_length = size(k, v)?,
                "block_length" => self.params.block_length = size(k, v)?,
                "temperature" => self.params.temperature = num(k, v)?,
                "cfg_scale" => self.params.cfg_scale = num(k, v)?,
                "remasking" => {
                    self.params.remasking = text(k, v)?.parse().map_err(|e| format!("{e}"))?
                }
                "seed" => self.params.seed = uint(k, v)?,
                "logits_eos_inf" => self.params.logits_eos_inf = flag(k, v)?,
                "confidence_eos_eot_inf" => self.params.confidence_eos_eot_inf = flag(k, v)?,
                "cache" => {
                    self.decode.cache = text(k, v)?.parse().map_err(|e| format!("`cache`: {e}"))?
                }
                "threshold" => {
                    self.decode.threshold = opt_num(k, v, f64::is_finite, "a finite number")?
                }
                "factor" => {
                    self.decode.factor =
                        opt_num(k, v, |x| x.is_finite() && x > 0.0, "a finite number > 0")?
                }
                "chat" => self.chat = flag(k, v)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// One valid input line.
#[derive(Clone, Debug)]
pub struct Request {
    /// 1-based line number in the input file.
    pub line: usize,
    /// The `id` as given (a string or an integer).
    pub id: Value,
    /// `id` as compact JSON: the identity used for resume, duplicates and merge.
    pub id_key: String,
    /// The request's random-stream key, [`rng_row_key`] of `id_key`.
    pub rng_key: u32,
    pub prompt_ids: Vec<u32>,
    pub opts: GenOptions,
}

/// A line that could not be used (bad input, or its generation failed).
#[derive(Clone, Debug, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub id: Option<Value>,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(id) = &self.id {
            write!(f, " (id {id})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl LineError {
    /// The line of the errors file.
    pub fn to_json(&self) -> Value {
        json!({"line": self.line, "id": self.id, "error": self.message})
    }
}

/// What [`parse_input`] needs from the model.
pub struct ParseContext<'a> {
    pub defaults: &'a GenOptions,
    pub tokenizer: Option<&'a Tokenizer>,
    /// Token ids must be below this (the embedding rows).
    pub embedding_size: usize,
    /// Prompt + `gen_length` must fit.
    pub max_sequence_length: usize,
}

impl<'a> ParseContext<'a> {
    pub fn new(
        cfg: &ModelConfig,
        tokenizer: Option<&'a Tokenizer>,
        defaults: &'a GenOptions,
    ) -> Self {
        ParseContext {
            defaults,
            tokenizer,
            embedding_size: cfg.embedding_size,
            max_sequence_length: cfg.max_sequence_length,
        }
    }
}

/// The requests and errors of the lines a shard owns.
#[derive(Debug, Default)]
pub struct ParsedInput {
    pub requests: Vec<Request>,
    pub errors: Vec<LineError>,
    /// Non-blank lines this shard owns.
    pub lines_owned: usize,
}

/// `id` as the identity key, or why it is unusable.
fn id_of(obj: &Map<String, Value>) -> Result<(Value, String), String> {
    match obj.get("id") {
        None => Err("missing field `id`".into()),
        Some(v @ Value::String(s)) if !s.is_empty() => Ok((v.clone(), v.to_string())),
        Some(v @ Value::Number(n)) if n.is_i64() || n.is_u64() => Ok((v.clone(), v.to_string())),
        Some(v) => Err(format!(
            "`id` must be a non-empty string or an integer, got {v}"
        )),
    }
}

fn parse_request(
    line: usize,
    obj: &Map<String, Value>,
    id: Value,
    id_key: String,
    ctx: &ParseContext<'_>,
) -> Result<Request, String> {
    for k in obj.keys() {
        let known = matches!(k.as_str(), "id" | "prompt" | "messages" | "prompt_ids")
            || PARAM_KEYS.contains(&k.as_str());
        if !known {
            return Err(format!(
                "unknown key `{k}` (known: id, prompt, messages, prompt_ids, {})",
                PARAM_KEYS.join(", ")
            ));
        }
    }
    let mut opts = ctx.defaults.clone();
    opts.apply(obj)?;
    opts.check()?;
    opts.params.block_plan().map_err(|e| format!("{e}"))?;

    let given: Vec<&str> = ["prompt", "messages", "prompt_ids"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let tok = || {
        ctx.tokenizer.ok_or_else(|| {
            "text prompts need a tokenizer.json in the model folder (or give `prompt_ids`)"
                .to_string()
        })
    };
    let ids: Vec<u32> = match given.as_slice() {
        [] => return Err("missing field: give one of `prompt`, `messages`, `prompt_ids`".into()),
        ["prompt"] => {
            let text = obj["prompt"]
                .as_str()
                .ok_or_else(|| format!("`prompt` must be a string, got {}", obj["prompt"]))?;
            let t = tok()?;
            let r = if opts.chat {
                t.encode_chat(&[("user", text)])
            } else {
                t.encode(text, true)
            };
            r.map_err(|e| format!("{e:#}"))?
        }
        ["messages"] => {
            let arr = obj["messages"]
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| {
                    "`messages` must be a non-empty array of {\"role\", \"content\"} objects"
                        .to_string()
                })?;
            let mut msgs: Vec<(&str, &str)> = Vec::with_capacity(arr.len());
            for (i, m) in arr.iter().enumerate() {
                let o = m
                    .as_object()
                    .ok_or_else(|| format!("messages[{i}] must be an object"))?;
                if let Some(k) = o.keys().find(|k| *k != "role" && *k != "content") {
                    return Err(format!(
                        "messages[{i}]: unknown key `{k}` (known: role, content)"
                    ));
                }
                let get = |k: &str| {
                    o.get(k)
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("messages[{i}]: `{k}` must be a string"))
                };
                msgs.push((get("role")?, get("content")?));
            }
            tok()?.encode_chat(&msgs).map_err(|e| format!("{e:#}"))?
        }
        ["prompt_ids"] => {
            let arr = obj["prompt_ids"]
                .as_array()
                .ok_or_else(|| "`prompt_ids` must be an array of token ids".to_string())?;
            arr.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| format!("prompt_ids[{i}] = {v} is not a token id"))
                })
                .collect::<Result<_, _>>()?
        }
        more => {
            return Err(format!(
                "give only one of `prompt`, `messages`, `prompt_ids` (got {})",
                more.join(", ")
            ))
        }
    };
    if ids.is_empty() {
        return Err("the prompt is empty (no tokens)".into());
    }
    if let Some((i, &bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, &x)| x as usize >= ctx.embedding_size)
    {
        return Err(format!(
            "prompt token {i} = {bad} is out of range: the model has {} embeddings",
            ctx.embedding_size
        ));
    }
    let total = ids.len() + opts.params.gen_length;
    if total > ctx.max_sequence_length {
        return Err(format!(
            "prompt too long: {} tokens + gen_length {} = {total} exceeds the model's max_sequence_length {}",
            ids.len(),
            opts.params.gen_length,
            ctx.max_sequence_length
        ));
    }
    Ok(Request {
        line,
        id,
        rng_key: rng_row_key(&id_key),
        id_key,
        prompt_ids: ids,
        opts,
    })
}

/// Most prompts in one generation batch (`--batch-size`, `--max-batch-size`).
pub const MAX_BATCH_SIZE: usize = 1 << 12;

/// Longest input line accepted (a longer one is an error for that line only).
pub const MAX_LINE_BYTES: usize = 16 << 20;
/// Largest input file accepted (it is read whole).
pub const MAX_INPUT_BYTES: u64 = 4 << 30;
/// Parse the JSONL `text`, keeping the lines `shard` owns (every line when `None`).
///
/// Blank lines are skipped. Every line's `id` is read, owned or not, so a duplicate is found
/// across shards: the first line with an id keeps it, every later line with the same id is an
/// error (reported by the shard that owns that later line).
pub fn parse_input(text: &str, ctx: &ParseContext<'_>, shard: Option<&Shard>) -> ParsedInput {
    let mut out = ParsedInput::default();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let owned = match shard {
            Some(s) => s.owns(line),
            None => true,
        };
        let parsed: Result<Map<String, Value>, String> = if raw.len() > MAX_LINE_BYTES {
            Err(format!(
                "the line has {} bytes, more than the {MAX_LINE_BYTES} an input line may have",
                raw.len()
            ))
        } else {
            match serde_json::from_str::<Value>(raw) {
                Ok(Value::Object(o)) => Ok(o),
                Ok(other) => Err(format!(
                    "expected a JSON object, got {}",
                    match other {
                        Value::Array(_) => "an array",
                        Value::String(_) => "a string",
                        Value::Number(_) => "a number",
                        Value::Bool(_) => "a boolean",
                        _ => "null",
                    }
                )),
                Err(e) => Err(format!("invalid JSON: {e}")),
            }
        };
        let id = parsed.as_ref().ok().map(id_of);
        let mut dup_of = None;
        if let Some(Ok((_, key))) = &id {
            match first_line.get(key) {
                Some(&first) => dup_of = Some(first),
                None => {
                    first_line.insert(key.clone(), line);
                }
            }
        }
        if !owned {
            continue;
        }
        out.lines_owned += 1;
        let err = |id: Option<Value>, message: String| LineError { line, id, message };
        match (parsed, id) {
            (Err(m), _) => out.errors.push(err(None, m)),
            (Ok(_), Some(Err(m))) => out.errors.push(err(None, m)),
            (Ok(obj), Some(Ok((id, key)))) => {
                if let Some(first) = dup_of {
                    out.errors.push(err(
                        Some(id),
                        format!("duplicate id (first on line {first})"),
                    ));
                    continue;
                }
                match parse_request(line, &obj, id.clone(), key, ctx) {
                    Ok(r) => out.requests.push(r),
                    Err(m) => out.errors.push(err(Some(id), m)),
                }
            }
            (Ok(_), None) => unreachable!("an object always yields an id result"),
        }
    }
    out
}

/// Cut `text` (a decoded completion; `llada batch`'s OpenAI format and `llada serve`) at the first occurrence of any stop sequence: the cut text and whether one matched.
pub fn apply_stop(text: &str, stop: &[String]) -> (String, bool) {
    match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(i) => (text[..i].to_string(), true),
        None => (text.to_string(), false),
    }
}
