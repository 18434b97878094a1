//! Offline batch generation (`llada batch`): JSONL requests in, JSONL results out, built to run
//! unattended on clusters.
//!
//! The pieces, each usable on its own:
//! - [`parse_input`]: one request per input line (`id` + one of `prompt` / `messages` /
//!   `prompt_ids`, optional generation overrides). A bad line becomes a [`LineError`] naming its
//!   line number; it never stops the others.
//! - [`Shard`]: which lines this process owns (`--shard I/N`, Slurm array or `srun` tasks), and
//!   the per-shard output file names.
//! - [`plan_batches`]: requests with identical generation parameters grouped, sorted by prompt
//!   length, and cut into batches (left-padded by the sampler, with a key-padding mask).
//! - [`OutputLog`]: the output file as an append-only log. Opening it reads the ids already done
//!   (resume) and cuts off a torn last line left by a killed run; every result is one `write`
//!   of a whole line, followed by a flush.
//! - [`run`]: drives an [`Engine`] over the plan, writes results, reports progress, and splits a
//!   failing batch in halves so one bad request (or an out-of-memory batch) fails alone.
//! - [`merge`]: joins shard outputs, checking that no id appears twice, in input order, written
//!   atomically (temporary file + rename).
//!
//! ## When a batch equals each prompt alone
//! Every request draws its random numbers (Gumbel noise at `temperature > 0`, `remasking =
//! random` confidences) from its own stream: the sampler keys them by the request's
//! [`rng_row_key`] (a hash of its `id`) and its own positions counted from its first real token
//! ([`GenerateParams::row_keys`]), and with Fast-dLLM decoding by the call within the block. So a
//! request's result depends neither on its batch row, nor on the padding its neighbours bring,
//! nor on how many forward passes they need: it is the same in a batch, alone, in another shard
//! or after a resume. (A sampled result differs from `llada generate` with the same seed, which
//! keys by batch row; results that draw no random numbers are equal.)
//! What padding still changes is rounding: it moves the RoPE positions of a prompt, so the
//! rotated q·k products round differently: equal in exact arithmetic, not always in the last bit.
//! On the CPU in f32 this has not changed a result on the test models; in bf16 a last-ulp change
//! can flip an argmax or a confidence order (on the bf16 parity fixture, 3 of 9 padded prompts
//! came out different). [`plan_batches`] with `same_length` (`--same-length`) never pads, which
//! makes CPU batches bit-identical to single prompts in every dtype (see `tests/batch.rs`).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::engine::Engine;
use crate::head::Remasking;
use crate::rng::mix64;
use crate::sampler::{CacheMode, Decode, GenerateParams, Progress};
use crate::tokenizer::Tokenizer;

/// Generation parameters a request may set (the `llada generate` flags).
#[derive(Clone, Debug, PartialEq)]
pub struct GenOptions {
    pub steps: usize,
    pub gen_length: usize,
    pub block_length: usize,
    pub temperature: f64,
    pub cfg_scale: f64,
    pub remasking: Remasking,
    pub seed: u64,
    pub logits_eos_inf: bool,
    pub confidence_eos_eot_inf: bool,
    /// Fast-dLLM KV cache (`--cache`).
    pub cache: CacheMode,
    /// Fast-dLLM confidence threshold (`--threshold`); at most one of `threshold`, `factor`.
    pub threshold: Option<f64>,
    /// Fast-dLLM factor rule (`--factor`).
    pub factor: Option<f64>,
    /// Render a text `prompt` as one user message with the chat template.
    pub chat: bool,
}

impl Default for GenOptions {
    /// The defaults of `llada generate`.
    fn default() -> Self {
        GenOptions {
            steps: 128,
            gen_length: 128,
            block_length: 32,
            temperature: 0.0,
            cfg_scale: 0.0,
            remasking: Remasking::LowConfidence,
            seed: 0,
            logits_eos_inf: false,
            confidence_eos_eot_inf: false,
            cache: CacheMode::None,
            threshold: None,
            factor: None,
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

/// What requests must share to run in one batch: everything that reaches the sampler
/// (`chat` only affects tokenization, so it is left out). Floats by their bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    steps: usize,
    gen_length: usize,
    block_length: usize,
    temperature: u64,
    cfg_scale: u64,
    remasking_random: bool,
    seed: u64,
    logits_eos_inf: bool,
    confidence_eos_eot_inf: bool,
    cache: CacheMode,
    threshold: Option<u64>,
    factor: Option<u64>,
}

/// The random-stream key of a request ([`GenerateParams::row_keys`]): the high 31 bits of
/// `mix64(FNV-1a-64(id))`, where `id` is the request's `id` as compact JSON text (`"a"` with
/// its quotes for a string id, `7` for an integer). A pure function of the id, so a sampled
/// request gives the same result in any batch, shard or resumed run (the sampler keys its
/// random numbers by this key and the request's own, unpadded positions).
pub fn rng_row_key(id_key: &str) -> u32 {
    (mix64(fnv1a64(id_key.as_bytes())) >> 33) as u32
}

/// 64-bit FNV-1a.
fn fnv1a64(bytes: &[u8]) -> u64 {
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
        let mut p = base.clone();
        p.steps = self.steps;
        p.gen_length = self.gen_length;
        p.block_length = self.block_length;
        p.temperature = self.temperature;
        p.cfg_scale = self.cfg_scale;
        p.remasking = self.remasking;
        p.seed = self.seed;
        p.logits_eos_inf = self.logits_eos_inf;
        p.confidence_eos_eot_inf = self.confidence_eos_eot_inf;
        p
    }

    /// The Fast-dLLM settings (plain upstream decoding when all are off).
    pub fn to_decode(&self) -> Decode {
        Decode {
            cache: self.cache,
            threshold: self.threshold,
            factor: self.factor,
        }
    }

    /// Combinations the sampler refuses, as a message naming the keys.
    pub fn check(&self) -> Result<(), String> {
        if self.threshold.is_some() && self.factor.is_some() {
            return Err("give either `threshold` or `factor`, not both (a command-line default counts; set the other to null)".into());
        }
        if self.cfg_scale > 0.0 && !self.to_decode().is_plain() {
            return Err(format!(
                "`cfg_scale` {} > 0 is not supported with Fast-dLLM decoding (`cache` {}, `threshold`, `factor`)",
                self.cfg_scale, self.cache
            ));
        }
        Ok(())
    }

    /// The parameters as written in each output line.
    pub fn to_json(&self) -> Value {
        json!({
            "steps": self.steps,
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "temperature": self.temperature,
            "cfg_scale": self.cfg_scale,
            "remasking": remasking_name(self.remasking),
            "seed": self.seed,
            "logits_eos_inf": self.logits_eos_inf,
            "confidence_eos_eot_inf": self.confidence_eos_eot_inf,
            "cache": self.cache.to_string(),
            "threshold": self.threshold,
            "factor": self.factor,
        })
    }

    /// Key of the batch group: requests share a batch only when everything that reaches the
    /// sampler is identical.
    fn group_key(&self) -> GroupKey {
        GroupKey {
            steps: self.steps,
            gen_length: self.gen_length,
            block_length: self.block_length,
            temperature: self.temperature.to_bits(),
            cfg_scale: self.cfg_scale.to_bits(),
            remasking_random: self.remasking == Remasking::Random,
            seed: self.seed,
            logits_eos_inf: self.logits_eos_inf,
            confidence_eos_eot_inf: self.confidence_eos_eot_inf,
            cache: self.cache,
            threshold: self.threshold.map(f64::to_bits),
            factor: self.factor.map(f64::to_bits),
        }
    }

    /// Apply the overrides in `obj` (keys of [`PARAM_KEYS`]), naming the bad key.
    fn apply(&mut self, obj: &Map<String, Value>) -> Result<(), String> {
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
        for (k, v) in obj {
            match k.as_str() {
                "steps" => self.steps = size(k, v)?,
                "gen_length" => self.gen_length = size(k, v)?,
                "block_length" => self.block_length = size(k, v)?,
                "temperature" => self.temperature = num(k, v)?,
                "cfg_scale" => self.cfg_scale = num(k, v)?,
                "remasking" => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| format!("`remasking` must be a string, got {v}"))?;
                    self.remasking = s.parse().map_err(|e| format!("{e}"))?;
                }
                "seed" => self.seed = uint(k, v)?,
                "logits_eos_inf" => self.logits_eos_inf = flag(k, v)?,
                "confidence_eos_eot_inf" => self.confidence_eos_eot_inf = flag(k, v)?,
                "cache" => {
                    let s = v
                        .as_str()
                        .ok_or_else(|| format!("`cache` must be a string, got {v}"))?;
                    self.cache = s.parse().map_err(|e| format!("`cache`: {e}"))?;
                }
                "threshold" => self.threshold = opt_num(k, v, f64::is_finite, "a finite number")?,
                "factor" => {
                    self.factor =
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
    let plan_check = GenerateParams {
        steps: opts.steps,
        gen_length: opts.gen_length,
        block_length: opts.block_length,
        ..GenerateParams::default()
    };
    plan_check.block_plan().map_err(|e| format!("{e}"))?;

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
    let total = ids.len() + opts.gen_length;
    if total > ctx.max_sequence_length {
        return Err(format!(
            "prompt too long: {} tokens + gen_length {} = {total} exceeds the model's max_sequence_length {}",
            ids.len(),
            opts.gen_length,
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
/// Largest result file `merge` reads.
pub const MAX_RESULTS_BYTES: u64 = 16 << 30;

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

/// Which input lines this process handles: lines whose `(line − 1) mod count == index`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
    /// Where the numbers came from (for the log).
    pub source: String,
}

impl Shard {
    pub fn new(index: usize, count: usize, source: impl Into<String>) -> Result<Shard> {
        if count == 0 || index >= count {
            bail!("bad shard {index}/{count}: need 0 <= index < count");
        }
        Ok(Shard {
            index,
            count,
            source: source.into(),
        })
    }

    /// `I/N` (0-based index).
    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("bad --shard {s:?}: expected I/N, e.g. 0/4"))?;
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .with_context(|| format!("bad --shard {s:?}: {x:?} is not a number"))
        };
        Shard::new(num(i)?, num(n)?, "--shard")
    }

    /// The shard Slurm assigns, from `env` (normally `std::env::var`):
    /// array jobs (`SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`),
    /// `srun` tasks (`SLURM_PROCID` of `SLURM_NTASKS`), or both combined
    /// (`array_index · ntasks + procid`). `None` when neither is set or there is one shard.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match env(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .with_context(|| format!("environment {k}={v:?} is not a number")),
            }
        };
        let array = match (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(id), Some(count)) => {
                let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let idx = id.checked_sub(min).with_context(|| {
                    format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
                })?;
                if idx >= count {
                    bail!("SLURM_ARRAY_TASK_ID {id} − SLURM_ARRAY_TASK_MIN {min} = {idx} is not below SLURM_ARRAY_TASK_COUNT {count} (array steps like 0-15:4 are not supported; use --shard I/N)");
                }
                Some((idx, count))
            }
            _ => None,
        };
        let tasks = match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            (Some(p), Some(n)) if n > 1 => Some((p, n)),
            _ => None,
        };
        let s = match (array, tasks) {
            (None, None) => return Ok(None),
            (Some((i, n)), None) => Shard::new(i, n, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")?,
            (None, Some((p, n))) => Shard::new(p, n, "SLURM_PROCID/SLURM_NTASKS")?,
            (Some((i, n)), Some((p, m))) => Shard::new(
                i * m + p,
                n * m,
                "SLURM_ARRAY_TASK_ID·SLURM_NTASKS + SLURM_PROCID",
            )?,
        };
        Ok((s.count > 1).then_some(s))
    }

    /// Whether 1-based input line `line` belongs to this shard.
    pub fn owns(&self, line: usize) -> bool {
        (line - 1) % self.count == self.index
    }

    /// `results.jsonl` → `results.shard-00003-of-00008.jsonl`.
    pub fn output_path(&self, base: &Path) -> PathBuf {
        let (stem, ext) = stem_ext(base);
        base.with_file_name(format!(
            "{stem}.shard-{:05}-of-{:05}{ext}",
            self.index, self.count
        ))
    }
}

fn stem_ext(p: &Path) -> (String, String) {
    let name = p
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rfind('.') {
        Some(i) if i > 0 => (name[..i].to_string(), name[i..].to_string()),
        _ => (name, String::new()),
    }
}

/// The errors file next to an output file: `results.jsonl` → `results.errors.jsonl`.
pub fn errors_path(output: &Path) -> PathBuf {
    let (stem, ext) = stem_ext(output);
    let ext = if ext.is_empty() { ".jsonl".into() } else { ext };
    output.with_file_name(format!("{stem}.errors{ext}"))
}

/// The output file as an append-only log of whole lines.
pub struct OutputLog {
    file: File,
    path: PathBuf,
    /// `id` keys of the results already in the file.
    pub done: HashSet<String>,
    /// The `params` recorded with each done `id` (`null` when the line has none), so a resumed
    /// run can check them against its request ([`split_done`]).
    pub done_params: HashMap<String, Value>,
    /// Bytes of a torn last line that opening cut off (0 when the file ended cleanly).
    pub truncated: usize,
    /// Rewrites each record before it is written (the OpenAI batch format,
    /// [`crate::batch_openai`]); it must keep the record's `id`.
    pub wrap: Option<crate::batch_openai::RecordWrap>,
}

impl OutputLog {
    /// Open (or create) `path` for appending. Every complete line must be a JSON object with an
    /// `id`; its id counts as done. A last line without its newline (a write cut short by a
    /// killed process) is not a result: it is cut off here so the next append starts clean.
    pub fn open(path: &Path) -> Result<OutputLog> {
        if crate::fsio::output_is_special(path) {
            bail!(
                "{}: the output must be a regular file (results are appended to it, locked and \
                 resumed), not a directory, FIFO or device",
                path.display()
            );
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening the output file {}", path.display()))?;
        // One writer per output: an advisory lock held as long as this log is open, so two runs
        // on the same output (or shard) can never both generate the same ids.
        // (`flock` through libc: `File::try_lock` needs Rust 1.89, above this crate's MSRV.)
        crate::fsio::try_lock_exclusive(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                anyhow::anyhow!(
                    "{}: another llada batch is writing this output (it holds its lock); wait \
                     for it or give another --output",
                    path.display()
                )
            } else {
                anyhow::anyhow!("locking the output file {}: {e}", path.display())
            }
        })?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let truncated = buf.len() - complete;
        if truncated > 0 {
            file.set_len(complete as u64)
                .with_context(|| format!("cutting the torn last line of {}", path.display()))?;
            file.seek(SeekFrom::End(0))?;
        }
        let mut done = HashSet::new();
        let mut done_params = HashMap::new();
        for (i, line) in buf[..complete].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v = serde_json::from_slice::<Value>(line).ok();
            let key = v
                .as_ref()
                .and_then(|v| v.get("id").map(Value::to_string))
                .with_context(|| {
                    format!(
                        "{} line {}: not a result line (a JSON object with an `id`); refusing to append to a file this tool did not write",
                        path.display(),
                        i + 1
                    )
                })?;
            // Native lines carry `params`; OpenAI-format lines carry them in the response body.
            let params = v
                .as_ref()
                .and_then(|v| {
                    v.get("params")
                        .or_else(|| v.pointer("/response/body/params"))
                })
                .cloned()
                .unwrap_or(Value::Null);
            done_params.insert(key.clone(), params);
            done.insert(key);
        }
        Ok(OutputLog {
            file,
            path: path.to_path_buf(),
            done,
            done_params,
            truncated,
            wrap: None,
        })
    }

    /// Append one record as one whole line: a single `write` of the serialized line and its
    /// newline, then a flush.
    pub fn append(&mut self, record: &Value) -> Result<()> {
        let wrapped = self.wrap.as_ref().map(|w| w(record));
        let mut line = serde_json::to_vec(wrapped.as_ref().unwrap_or(record))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("writing to {}", self.path.display()))
    }

    /// Ask the OS to put the file on disk (once per batch).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Split `requests` for a resumed run: those still to generate, the number already done with
/// the same parameters, and an error for each request whose id is done with different recorded
/// parameters (a changed request is reported, neither silently trusted nor generated twice).
pub fn split_done(
    requests: Vec<Request>,
    log: &OutputLog,
) -> (Vec<Request>, usize, Vec<LineError>) {
    let mut todo = Vec::with_capacity(requests.len());
    let (mut same, mut changed) = (0, Vec::new());
    for r in requests {
        if !log.done.contains(&r.id_key) {
            todo.push(r);
            continue;
        }
        let want = r.opts.to_json();
        match log.done_params.get(&r.id_key) {
            Some(got) if *got == want => same += 1,
            got => changed.push(LineError {
                line: r.line,
                id: Some(r.id.clone()),
                message: format!(
                    "id already done in {} with parameters {} but this request asks {want}; \
                     not regenerated (remove that line, or use another --output)",
                    log.path.display(),
                    got.unwrap_or(&Value::Null)
                ),
            }),
        }
    }
    (todo, same, changed)
}

/// Requests grouped by generation parameters, each group sorted by prompt length (then line),
/// cut into batches of at most `max_batch(opts, longest_prompt)` requests. Returns indices
/// into `reqs`; groups keep the order of their first request.
///
/// With `same_length`, prompts of different lengths never share a batch (no padding at all):
/// then a batch gives bit-for-bit what each prompt gives alone in any dtype on the CPU, at the
/// cost of smaller batches.
pub fn plan_batches(
    reqs: &[Request],
    same_length: bool,
    mut max_batch: impl FnMut(&GenOptions, usize) -> usize,
) -> Vec<Vec<usize>> {
    let mut order: Vec<_> = Vec::new();
    let mut groups: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, r) in reqs.iter().enumerate() {
        let k = (
            r.opts.group_key(),
            if same_length { r.prompt_ids.len() } else { 0 },
        );
        groups
            .entry(k)
            .or_insert_with(|| {
                order.push(k);
                Vec::new()
            })
            .push(i);
    }
    let mut out = Vec::new();
    for k in order {
        let mut g = groups.remove(&k).unwrap_or_default();
        g.sort_by_key(|&i| (reqs[i].prompt_ids.len(), reqs[i].line));
        let mut start = 0;
        while start < g.len() {
            // The batch is padded to its longest prompt: size it for the longest it may hold.
            // Sorted ascending, so grow while the size allowed at the new longest still fits.
            let mut end = start + 1;
            while end < g.len() {
                let longest = reqs[g[end]].prompt_ids.len();
                let cap = max_batch(&reqs[g[end]].opts, longest).max(1);
                if end + 1 - start > cap {
                    break;
                }
                end += 1;
            }
            out.push(g[start..end].to_vec());
            start = end;
        }
    }
    out
}

/// Device bytes a forward pass needs per sequence of `t` tokens (prompt + gen_length) whose
/// LM head runs on up to `rows` positions: the model workspace (`Model::workspace`) per token
/// and per head row, doubled with CFG. `act_bytes` is the compute dtype's size.
pub fn bytes_per_sequence(
    cfg: &ModelConfig,
    act_bytes: usize,
    t: usize,
    rows: usize,
    cfg_on: bool,
) -> usize {
    let c = cfg.d_model;
    let hd = cfg.head_dim();
    let qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd;
    let f = cfg.mlp_hidden_size;
    // x, h, d [C] ; qkv ; att [NH·HD] ; gate_up [2F] ; mlp [F] ; ids, pos, key_valid (i32).
    let per_token = act_bytes * (3 * c + qkv + cfg.n_heads * hd + 3 * f) + 3 * 4;
    // xr, dr, hr [C] ; logits [V] ; rows, keys ×2, tok (i32) ; conf (f32).
    let per_row = act_bytes * (3 * c + cfg.embedding_size) + 5 * 4;
    let one = t * per_token + rows * per_row;
    if cfg_on {
        2 * one
    } else {
        one
    }
}

/// Device bytes of the Fast-dLLM KV cache (`Model::kv_cache`) per sequence of `t` tokens:
/// a K and a V buffer of `t · NKV·HD` activations per layer.
pub fn kv_cache_bytes_per_sequence(cfg: &ModelConfig, act_bytes: usize, t: usize) -> usize {
    2 * cfg.n_layers * t * cfg.n_kv_heads * cfg.head_dim() * act_bytes
}

/// The largest batch that fits `free` device bytes (keeping `1 − fraction` of it spare) for
/// prompts of up to `prompt_len` tokens, between 1 and `cap`.
pub fn auto_batch_size(
    cfg: &ModelConfig,
    act_bytes: usize,
    free: usize,
    fraction: f64,
    opts: &GenOptions,
    prompt_len: usize,
    cap: usize,
) -> usize {
    let t = prompt_len + opts.gen_length;
    // Head rows: the masks before a block's end, at most prompt masks + one block; the first
    // block is the largest case for a prompt without masks. Use the whole generation as a
    // safe bound when a prompt carries masks.
    let mut rows = opts.block_length.max(1).min(t);
    let mut kv = 0;
    if !opts.to_decode().is_plain() {
        // Fast-dLLM decoding (no CFG) runs the cached predictor: its workspace holds a head row
        // per token (`ModelPredictor::predict_span` reserves b·t rows), plus the KV cache.
        rows = t;
        kv = kv_cache_bytes_per_sequence(cfg, act_bytes, t);
    }
    let per = (bytes_per_sequence(cfg, act_bytes, t, rows, opts.cfg_scale > 0.0) + kv).max(1);
    let budget = (free as f64 * fraction) as usize;
    (budget / per).clamp(1, cap.max(1))
}

/// How [`run`] behaves.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Stop at the first failed generation.
    pub strict: bool,
}

/// Progress after each step and each batch.
#[derive(Clone, Copy, Debug)]
pub struct RunProgress {
    /// Requests finished (written or failed) in this run.
    pub done: usize,
    pub total: usize,
    /// Generated tokens written in this run.
    pub tokens: usize,
    pub elapsed_s: f64,
    /// Size of the batch in flight and its step progress.
    pub batch_size: usize,
    pub step: Option<Progress>,
    /// Set once per finished batch.
    pub batch_finished: bool,
}

/// What [`run`] did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub written: usize,
    pub failed: Vec<LineError>,
    pub tokens: usize,
    pub nfe: usize,
    pub batches: usize,
    pub elapsed_s: f64,
}

/// Generate every request of `plan` (indices into `reqs`) and append one result line each to
/// `log`. A batch that fails is split in halves and retried, so a failure ends up attached to
/// one request; with [`RunOptions::strict`] the first failure stops the run.
///
/// `base` carries the model's ids and limits ([`crate::engine::Opened::apply_ids`]); `decode`
/// turns generated ids into text (`None` without a tokenizer).
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &mut dyn Engine,
    reqs: &[Request],
    plan: &[Vec<usize>],
    base: &GenerateParams,
    log: &mut OutputLog,
    opts: &RunOptions,
    decode: &dyn Fn(&[u32]) -> Option<String>,
    progress: &mut dyn FnMut(&RunProgress),
) -> Result<RunSummary> {
    let t0 = Instant::now();
    let total: usize = plan.iter().map(Vec::len).sum();
    let mut sum = RunSummary::default();
    let mut done = 0usize;
    // Work list: batches to run, front first; a failing batch is replaced by its halves.
    let mut queue: std::collections::VecDeque<Vec<usize>> = plan.iter().cloned().collect();
    while let Some(batch) = queue.pop_front() {
        let Some(&first) = batch.first() else {
            continue;
        };
        let o = &reqs[first].opts;
        let mut params = o.to_params(base);
        // Each request draws from its own random stream, whatever its batch row.
        params.row_keys = Some(batch.iter().map(|&i| reqs[i].rng_key).collect());
        let fast = o.to_decode();
        let prompts: Vec<Vec<u32>> = batch.iter().map(|&i| reqs[i].prompt_ids.clone()).collect();
        let tb = Instant::now();
        let (d0, tok0) = (done, sum.tokens);
        let res = {
            let mut cb = |p: Progress| {
                progress(&RunProgress {
                    done: d0,
                    total,
                    tokens: tok0,
                    elapsed_s: t0.elapsed().as_secs_f64(),
                    batch_size: batch.len(),
                    step: Some(p),
                    batch_finished: false,
                })
            };
            // A panic on one batch (a bug, not a hostile line: lines are validated) fails that
            // batch like a device error instead of ending the run.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.generate(&prompts, &params, &fast, Some(&mut cb))
            }))
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(anyhow::anyhow!("internal error (panic): {what}"))
            })
        };
        match res {
            Ok(out) => {
                let secs = tb.elapsed().as_secs_f64();
                for (&i, ids) in batch.iter().zip(&out.ids) {
                    let r = &reqs[i];
                    let rec = json!({
                        "id": r.id,
                        "line": r.line,
                        "ids": ids,
                        "text": decode(ids),
                        "nfe": out.nfe,
                        "prompt_tokens": r.prompt_ids.len(),
                        "batch_size": batch.len(),
                        "padded_prompt_tokens": out.prompt_len_padded,
                        "seconds": secs,
                        "rng_key": r.rng_key,
                        "params": r.opts.to_json(),
                    });
                    log.append(&rec)?;
                    log.done.insert(r.id_key.clone());
                    sum.written += 1;
                    sum.tokens += ids.len();
                }
                log.sync()?;
                sum.nfe += out.nfe;
                sum.batches += 1;
                done += batch.len();
            }
            // A sticky device fault: no retry can succeed on this context (out of memory can).
            Err(e) if crate::backend::DeviceError::is_fault(&e) => return Err(e),
            Err(e) if batch.len() > 1 => {
                let mid = batch.len() / 2;
                queue.push_front(batch[mid..].to_vec());
                queue.push_front(batch[..mid].to_vec());
                let _ = e;
                continue;
            }
            Err(e) => {
                let r = &reqs[first];
                let le = LineError {
                    line: r.line,
                    id: Some(r.id.clone()),
                    message: format!("generation failed: {e:#}"),
                };
                if opts.strict {
                    return Err(e.context(format!("line {} (id {})", r.line, r.id)));
                }
                sum.failed.push(le);
                done += 1;
            }
        }
        progress(&RunProgress {
            done,
            total,
            tokens: sum.tokens,
            elapsed_s: t0.elapsed().as_secs_f64(),
            batch_size: batch.len(),
            step: None,
            batch_finished: true,
        });
    }
    sum.elapsed_s = t0.elapsed().as_secs_f64();
    Ok(sum)
}

/// What [`merge`] did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    pub records: usize,
    /// (file, bytes) of torn last lines that were left out.
    pub torn: Vec<(PathBuf, usize)>,
}

/// The shard files of `output` in its folder (`results.shard-*-of-N.jsonl`), checked to be one
/// complete set (same `N`, every index present).
pub fn find_shards(output: &Path) -> Result<Vec<PathBuf>> {
    let (stem, ext) = stem_ext(output);
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{stem}.shard-");
    let mut found: Vec<(usize, usize, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(&ext))
        else {
            continue;
        };
        let Some((i, n)) = rest.split_once("-of-") else {
            continue;
        };
        if let (Ok(i), Ok(n)) = (i.parse::<usize>(), n.parse::<usize>()) {
            found.push((i, n, e.path()));
        }
    }
    if found.is_empty() {
        bail!("no shard files {}/{prefix}*-of-*{ext} found", dir.display());
    }
    found.sort();
    let n = found[0].1;
    if let Some(f) = found.iter().find(|f| f.1 != n) {
        bail!(
            "shard files of different runs: {} has {} shards, {} has {n}",
            f.2.display(),
            f.1,
            found[0].2.display()
        );
    }
    let have: HashSet<usize> = found.iter().map(|f| f.0).collect();
    let missing: Vec<String> = (0..n)
        .filter(|i| !have.contains(i))
        .map(|i| i.to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "shards missing from {}: {} of {n} (indices {})",
            dir.display(),
            missing.len(),
            missing.join(", ")
        );
    }
    Ok(found.into_iter().map(|f| f.2).collect())
}

/// Join result files into `output`: every id at most once (an id in two files is an error
/// naming both), ordered by input line (`line`), written to a temporary file and renamed into
/// place. Torn last lines (a killed run) are left out and reported.
pub fn merge(inputs: &[PathBuf], output: &Path) -> Result<MergeReport> {
    let mut report = MergeReport::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    // (input line or MAX, file index, line index, text)
    let mut rows: Vec<(usize, usize, usize, String)> = Vec::new();
    for (fi, path) in inputs.iter().enumerate() {
        let text = crate::fsio::read_input_text(path, "batch merge", MAX_RESULTS_BYTES)?;
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            report.torn.push((path.clone(), text.len() - complete));
        }
        for (li, l) in text[..complete].split('\n').enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not valid JSON", path.display(), li + 1))?;
            let key = v
                .get("id")
                .map(Value::to_string)
                .with_context(|| format!("{} line {}: no `id`", path.display(), li + 1))?;
            if let Some(&other) = seen.get(&key) {
                bail!(
                    "id {key} appears in both {} and {} (line {}): shards overlap",
                    inputs[other].display(),
                    path.display(),
                    li + 1
                );
            }
            seen.insert(key, fi);
            let line = v
                .get("line")
                .and_then(Value::as_u64)
                .map_or(usize::MAX, |x| x as usize);
            rows.push((line, fi, li, l.to_string()));
        }
    }
    rows.sort_by_key(|r| (r.0, r.1, r.2));
    let mut body = String::with_capacity(rows.iter().map(|r| r.3.len() + 1).sum());
    for r in &rows {
        body.push_str(&r.3);
        body.push('\n');
    }
    write_atomic(output, body.as_bytes())?;
    report.records = rows.len();
    Ok(report)
}

/// Write `bytes` to a temporary file next to `path`, sync it, and rename it over `path`.
/// The directory is synced after the rename, so the new file survives a crash. A target that
/// exists and is not a regular file (a FIFO, `/dev/stdout`) is written through, never replaced
/// ([`crate::fsio::create_output`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if crate::fsio::output_is_special(path) {
        let mut f = crate::fsio::create_output(path, "output")?;
        return f
            .write_all(bytes)
            .with_context(|| format!("writing {}", path.display()));
    }
    let (stem, ext) = stem_ext(path);
    let tmp = path.with_file_name(format!(".{stem}{ext}.tmp-{}", std::process::id()));
    let r = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        crate::fsio::sync_parent_dir(path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(line: usize, len: usize, opts: GenOptions) -> Request {
        Request {
            line,
            id: json!(line),
            id_key: line.to_string(),
            rng_key: rng_row_key(&line.to_string()),
            prompt_ids: vec![1; len],
            opts,
        }
    }

    #[test]
    fn rng_row_keys_are_stable_31_bit_hashes_of_the_id() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            rng_row_key("\"a\""),
            (mix64(fnv1a64(b"\"a\"")) >> 33) as u32
        );
        // Below 2^31 (the head takes non-negative i32 keys) and distinct for distinct ids.
        let keys: HashSet<u32> = (0..10_000)
            .map(|i| rng_row_key(&json!(format!("r{i}")).to_string()))
            .collect();
        assert_eq!(keys.len(), 10_000);
        assert!(keys.iter().all(|&k| k < 1 << 31));
        // A string id and the integer with the same digits are different ids.
        assert_ne!(rng_row_key("7"), rng_row_key("\"7\""));
    }

    #[test]
    fn fast_dllm_options_parse_group_and_check() {
        let mut o = GenOptions {
            threshold: Some(0.9),
            ..GenOptions::default()
        };
        let obj = |v: Value| v.as_object().unwrap().clone();
        o.apply(&obj(json!({"cache": "dual", "threshold": 0.5})))
            .unwrap();
        assert_eq!(
            (o.cache, o.threshold, o.factor),
            (CacheMode::Dual, Some(0.5), None)
        );
        assert!(o.check().is_ok());
        assert_eq!(o.to_json()["cache"], json!("dual"));
        assert_eq!(o.to_json()["threshold"], json!(0.5));
        // A factor on top of a default threshold: refused unless the threshold is cleared.
        let mut both = o.clone();
        both.apply(&obj(json!({"factor": 1.0}))).unwrap();
        assert!(both.check().unwrap_err().contains("not both"));
        both.apply(&obj(json!({"threshold": null}))).unwrap();
        assert!(both.check().is_ok());
        assert!(o
            .clone()
            .apply(&obj(json!({"cache": "lru"})))
            .unwrap_err()
            .contains("lru"));
        assert!(o.clone().apply(&obj(json!({"factor": 0}))).is_err());
        assert!(o.clone().apply(&obj(json!({"threshold": "x"}))).is_err());
        let mut cfg = o.clone();
        cfg.apply(&obj(json!({"cfg_scale": 1.0}))).unwrap();
        assert!(cfg.check().unwrap_err().contains("cfg_scale"));
        // Each Fast-dLLM setting splits the batch groups.
        let base = GenOptions::default();
        let variants = [
            GenOptions {
                cache: CacheMode::Prefix,
                ..base.clone()
            },
            GenOptions {
                cache: CacheMode::Dual,
                ..base.clone()
            },
            GenOptions {
                threshold: Some(0.5),
                ..base.clone()
            },
            GenOptions {
                threshold: Some(0.6),
                ..base.clone()
            },
            GenOptions {
                factor: Some(0.5),
                ..base.clone()
            },
        ];
        let mut reqs = vec![req(1, 3, base.clone())];
        for (i, v) in variants.iter().enumerate() {
            reqs.push(req(i + 2, 3, v.clone()));
        }
        assert_eq!(
            plan_batches(&reqs, false, |_, _| 8).len(),
            1 + variants.len()
        );
    }

    #[test]
    fn shard_from_env_combines_array_and_tasks() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let s = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.index, s.count), (2, 4));
        let s = Shard::from_env(env(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.index, s.count), (1, 2));
        // One task: no sharding.
        assert_eq!(
            Shard::from_env(env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")])).unwrap(),
            None
        );
        let s = Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((s.index, s.count), (3, 6));
        assert!(Shard::from_env(env(&[
            ("SLURM_ARRAY_TASK_ID", "9"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]))
        .is_err());
        assert!(Shard::parse("4/4").is_err());
        assert!(Shard::parse("x/4").is_err());
    }

    #[test]
    fn shards_partition_the_lines() {
        let n = 3;
        for line in 1..=20 {
            let owners = (0..n)
                .filter(|&i| Shard::new(i, n, "t").unwrap().owns(line))
                .count();
            assert_eq!(owners, 1, "line {line}");
        }
        let s = Shard::new(2, 8, "t").unwrap();
        assert_eq!(
            s.output_path(Path::new("/x/res.jsonl")),
            Path::new("/x/res.shard-00002-of-00008.jsonl")
        );
        assert_eq!(
            errors_path(Path::new("/x/res.jsonl")),
            Path::new("/x/res.errors.jsonl")
        );
    }

    #[test]
    fn plan_groups_by_params_and_sorts_by_length() {
        let a = GenOptions::default();
        let b = GenOptions {
            seed: 5,
            ..GenOptions::default()
        };
        let reqs = vec![
            req(1, 9, a.clone()),
            req(2, 3, b.clone()),
            req(3, 1, a.clone()),
            req(4, 5, a.clone()),
            req(5, 2, b.clone()),
        ];
        let plan = plan_batches(&reqs, false, |_, _| 2);
        assert_eq!(plan, vec![vec![2, 3], vec![0], vec![4, 1]]);
        // A cap that shrinks with length closes a batch early.
        let plan = plan_batches(&reqs, false, |_, len| if len >= 5 { 1 } else { 8 });
        assert_eq!(plan, vec![vec![2], vec![3], vec![0], vec![4, 1]]);
        // Same length only: every batch holds one prompt length.
        let mut more = reqs.clone();
        more.push(req(6, 9, a.clone()));
        let plan = plan_batches(&more, true, |_, _| 8);
        assert_eq!(plan, vec![vec![0, 5], vec![1], vec![2], vec![3], vec![4]]);
        // Every request planned exactly once.
        let mut all: Vec<usize> = plan_batches(&reqs, false, |_, _| 3).concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn auto_batch_shrinks_with_length_and_cfg() {
        let cfg = crate::presets::preset_config("llada-8b").unwrap();
        let o = GenOptions {
            gen_length: 256,
            block_length: 32,
            ..GenOptions::default()
        };
        let free = 40usize << 30;
        let short = auto_batch_size(&cfg, 2, free, 0.9, &o, 64, 1024);
        let long = auto_batch_size(&cfg, 2, free, 0.9, &o, 1024, 1024);
        assert!(short > long && long >= 1, "{short} {long}");
        let with_cfg = auto_batch_size(
            &cfg,
            2,
            free,
            0.9,
            &GenOptions {
                cfg_scale: 1.0,
                ..o.clone()
            },
            64,
            1024,
        );
        assert_eq!(with_cfg, short / 2);
        // The chosen batch fits the budget; one more would not (unless capped).
        let per = bytes_per_sequence(&cfg, 2, 64 + 256, 32, false);
        assert!(short * per <= (free as f64 * 0.9) as usize);
        assert!((short + 1) * per > (free as f64 * 0.9) as usize);
        assert_eq!(auto_batch_size(&cfg, 2, 0, 0.9, &o, 64, 1024), 1);
        // Fast-dLLM decoding also holds a KV cache and a head row per token.
        let dual = GenOptions {
            cache: CacheMode::Dual,
            ..o.clone()
        };
        let fast = auto_batch_size(&cfg, 2, free, 0.9, &dual, 64, 1024);
        let per_fast = bytes_per_sequence(&cfg, 2, 320, 320, false)
            + kv_cache_bytes_per_sequence(&cfg, 2, 320);
        assert!(fast < short && fast * per_fast <= (free as f64 * 0.9) as usize);
        assert!((fast + 1) * per_fast > (free as f64 * 0.9) as usize);
    }
}
