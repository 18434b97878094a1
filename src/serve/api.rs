//! The OpenAI-shaped request bodies `llada serve` accepts, their validation into the engine's
//! [`GenerateParams`] / [`Decode`], and the error shape every 4xx/5xx answer uses.
//!
//! Field names follow OpenAI where one exists (`max_tokens` → `gen_length`, `temperature`,
//! `seed`, `n`, `stop`, `stream`); LLaDA's own settings (`steps`, `block_length`, `cfg_scale`,
//! `remasking`, `cache`, `threshold`, `factor`, `logits_eos_inf`, `confidence_eos_eot_inf`) are
//! extra fields. Anything a request leaves out comes from the server's command line
//! ([`GenDefaults`]). Unknown fields are ignored, as OpenAI-compatible servers do.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::fast::{CacheMode, Decode};
use crate::engine::sampler::GenerateParams;

/// An error answered to the client: HTTP status plus OpenAI's `{"error": {...}}` body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`,
    /// `server_error`.
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::bad(message)
        }
    }
    pub fn with_code(mut self, status: u16, code: &'static str) -> ApiError {
        self.status = status;
        self.code = Some(code);
        self
    }
    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// Generation settings the command line gives (`llada serve`'s `--steps`, ... flags): the
/// options of `llada generate` and of a `llada batch` line (`chat` is unused: the endpoint
/// decides).
pub type GenDefaults = crate::batch::GenOptions;

/// Server limits on what one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most completions per request (`n` × prompts).
    pub max_rows: usize,
    /// Most stop sequences (OpenAI allows 4).
    pub max_stop: usize,
}

/// `prompt`: a string, strings, token ids or lists of token ids (OpenAI's four forms).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

/// The generation fields shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct GenFields {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub stop: Option<StopInput>,
    pub stream: Option<bool>,
    pub steps: Option<usize>,
    pub block_length: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub remasking: Option<String>,
    pub cache: Option<String>,
    pub threshold: Option<f64>,
    pub factor: Option<f64>,
    pub logits_eos_inf: Option<bool>,
    pub confidence_eos_eot_inf: Option<bool>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct CompletionRequest {
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub gen: GenFields,
}

/// A chat message's `content`: a string or OpenAI's list of parts (only `text` parts).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum ContentInput {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    pub content: ContentInput,
}

#[derive(Deserialize, Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub gen: GenFields,
}

impl ChatMessage {
    /// The text of the message (text parts joined), or an error naming the message.
    pub fn text(&self, i: usize) -> Result<String, ApiError> {
        match &self.content {
            ContentInput::Text(s) => Ok(s.clone()),
            ContentInput::Parts(parts) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::param(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "only text content parts are supported, got type {:?}",
                                    p.kind
                                ),
                            ))
                        }
                    }
                }
                Ok(s)
            }
        }
    }
}

/// One `/v1/loglikelihood` pair: text (split as lm-eval's `_encode_pair`) or token ids.
#[derive(Deserialize, Debug, Clone)]
pub struct LoglikPair {
    pub prompt: PromptOne,
    /// The continuation whose log-likelihood is wanted (`answer` is accepted too).
    #[serde(alias = "answer")]
    pub continuation: PromptOne,
}

/// A single prompt (text or token ids).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum PromptOne {
    Text(String),
    Ids(Vec<u32>),
}

/// `/v1/loglikelihood`: one pair (`prompt`, `continuation`) or many (`requests`), with
/// upstream's Monte-Carlo settings.
#[derive(Deserialize, Debug, Clone)]
pub struct LoglikRequest {
    pub model: Option<String>,
    pub prompt: Option<PromptOne>,
    #[serde(alias = "answer")]
    pub continuation: Option<PromptOne>,
    pub requests: Option<Vec<LoglikPair>>,
    pub mc_num: Option<usize>,
    pub batch_size: Option<usize>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
}

/// What a generation request resolved to.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub params: GenerateParams,
    pub decode: Decode,
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
}

/// Parse a JSON body, turning serde's message into a 400 that names the problem.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad(
            "the request body is empty: expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

fn finite_nonneg(name: &str, v: f64) -> Result<f64, ApiError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(ApiError::param(
            name,
            format!("{name} must be a finite number ≥ 0, got {v}"),
        ))
    }
}

/// The generation settings' combination checks: the ones `llada batch` makes on each line
/// ([`crate::batch::GenOptions::check`]), plus the finiteness checks `fast::generate_fast`
/// makes, so that a bad request is a 400 before it reaches the engine.
pub fn validate_decode(params: &GenerateParams, decode: &Decode) -> Result<(), ApiError> {
    let opts = crate::batch::GenOptions {
        params: params.clone(),
        decode: *decode,
        chat: false,
    };
    opts.check()
        .map_err(|m| ApiError::bad(format!("impossible settings: {m}")))?;
    if let Some(th) = decode.threshold {
        if !th.is_finite() {
            return Err(ApiError::param(
                "threshold",
                format!("threshold {th} is not a finite number"),
            ));
        }
    }
    if let Some(f) = decode.factor {
        if !(f.is_finite() && f > 0.0) {
            return Err(ApiError::param(
                "factor",
                format!("factor {f} must be a positive finite number"),
            ));
        }
    }
    Ok(())
}

impl GenFields {
    /// Merge with the command-line defaults and validate. `base` carries the model's ids and
    /// `max_sequence_length` ([`crate::engine::Opened::apply_ids`]). Unset `steps` and
    /// `block_length` follow a `max_tokens` that the defaults do not fit: `block_length`
    /// becomes `max_tokens` when the default does not divide it, and `steps` keeps the default
    /// tokens-per-step ratio, rounded up to a multiple of the number of blocks.
    pub fn resolve(
        &self,
        d: &GenDefaults,
        base: &GenerateParams,
        limits: &Limits,
    ) -> Result<Resolved, ApiError> {
        let gen_length = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => d.params.gen_length,
        };
        if gen_length == 0 {
            return Err(ApiError::param("max_tokens", "max_tokens must be > 0"));
        }
        let block_length = match self.block_length {
            Some(b) => b,
            None if gen_length % d.params.block_length.max(1) == 0 => d.params.block_length,
            None => gen_length,
        };
        let steps = match self.steps {
            Some(s) => s,
            None if gen_length == d.params.gen_length && block_length == d.params.block_length => {
                d.params.steps
            }
            None => {
                let blocks = (gen_length / block_length.max(1)).max(1);
                let want = (gen_length * d.params.steps)
                    .div_ceil(d.params.gen_length.max(1))
                    .max(1);
                want.div_ceil(blocks) * blocks
            }
        };
        let remasking = match &self.remasking {
            Some(r) => r
                .parse()
                .map_err(|e: anyhow::Error| ApiError::param("remasking", format!("{e:#}")))?,
            None => d.params.remasking,
        };
        let mut decode = d.decode;
        if let Some(c) = &self.cache {
            decode.cache = c
                .parse::<CacheMode>()
                .map_err(|e| ApiError::param("cache", format!("{e:#}")))?;
        }
        if self.threshold.is_some() || self.factor.is_some() {
            decode.threshold = self.threshold;
            decode.factor = self.factor;
        }
        let mut params = base.clone();
        params.gen_length = gen_length;
        params.block_length = block_length;
        params.steps = steps;
        params.temperature = finite_nonneg(
            "temperature",
            self.temperature.unwrap_or(d.params.temperature),
        )?;
        params.cfg_scale =
            finite_nonneg("cfg_scale", self.cfg_scale.unwrap_or(d.params.cfg_scale))?;
        params.remasking = remasking;
        params.seed = self.seed.unwrap_or(d.params.seed);
        params.logits_eos_inf = self.logits_eos_inf.unwrap_or(d.params.logits_eos_inf);
        params.confidence_eos_eot_inf = self
            .confidence_eos_eot_inf
            .unwrap_or(d.params.confidence_eos_eot_inf);
        params.row_keys = None;
        params
            .block_plan()
            .map_err(|e| ApiError::bad(format!("impossible settings: {e:#}")))?;
        validate_decode(&params, &decode)?;
        let n = self.n.unwrap_or(1);
        if n == 0 || n > limits.max_rows {
            return Err(ApiError::param(
                "n",
                format!("n must be between 1 and {}, got {n}", limits.max_rows),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopInput::One(s)) => vec![s.clone()],
            Some(StopInput::Many(v)) => v.clone(),
        };
        if stop.len() > limits.max_stop {
            return Err(ApiError::param(
                "stop",
                format!(
                    "at most {} stop sequences, got {}",
                    limits.max_stop,
                    stop.len()
                ),
            ));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::param("stop", "a stop sequence is empty"));
        }
        Ok(Resolved {
            params,
            decode,
            n,
            stop,
            stream: self.stream.unwrap_or(false),
        })
    }
}

/// Check that `prompts` fit the model: non-empty, ids in range, and the longest prompt plus
/// `gen_length` within `max_sequence_length` (the prompts are left-padded to the longest).
pub fn check_prompts(
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    embedding_size: usize,
    max_sequence_length: usize,
) -> Result<(), ApiError> {
    if prompts.is_empty() {
        return Err(ApiError::param("prompt", "no prompt given"));
    }
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&id) = p.iter().find(|&&id| id as usize >= embedding_size) {
            return Err(ApiError::param(
                "prompt",
                format!("prompt {i}: token id {id} is out of range (the model has {embedding_size} embeddings)"),
            ));
        }
        if p.contains(&params.mask_id) {
            return Err(ApiError::param(
                "prompt",
                format!("prompt {i} contains the mask token {}", params.mask_id),
            ));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + params.gen_length > max_sequence_length {
        return Err(ApiError::param(
            "prompt",
            format!(
                "the prompt ({longest} tokens) plus max_tokens ({}) exceed the model's context of {max_sequence_length} tokens",
                params.gen_length
            ),
        )
        .with_code(400, "context_length_exceeded"));
    }
    Ok(())
}

pub use crate::batch::apply_stop;

#[cfg(test)]
mod tests {
    use super::*;

    /// `llada generate`'s defaults (128 tokens, 128 steps, blocks of 32, greedy, no cache).
    fn defaults() -> GenDefaults {
        GenDefaults::default()
    }
    const LIMITS: Limits = Limits {
        max_rows: 16,
        max_stop: 4,
    };

    fn resolve(body: &str) -> Result<Resolved, ApiError> {
        let f: GenFields = serde_json::from_str(body).unwrap();
        f.resolve(&defaults(), &GenerateParams::default(), &LIMITS)
    }

    #[test]
    fn defaults_and_openai_names() {
        let r = resolve("{}").unwrap();
        assert_eq!(
            (r.params.gen_length, r.params.steps, r.params.block_length),
            (128, 128, 32)
        );
        let r =
            resolve(r#"{"max_tokens": 64, "temperature": 0.5, "seed": 7, "n": 2, "stop": "x"}"#)
                .unwrap();
        assert_eq!(
            (r.params.gen_length, r.params.steps, r.params.block_length),
            (64, 64, 32)
        );
        assert_eq!((r.params.temperature, r.params.seed, r.n), (0.5, 7, 2));
        assert_eq!(r.stop, vec!["x".to_string()]);
        // max_tokens the default block does not divide: one block, steps scaled.
        let r = resolve(r#"{"max_tokens": 8}"#).unwrap();
        assert_eq!(
            (r.params.gen_length, r.params.steps, r.params.block_length),
            (8, 8, 8)
        );
    }

    #[test]
    fn impossible_settings_are_400() {
        for body in [
            r#"{"max_tokens": 0}"#,
            r#"{"max_tokens": 64, "block_length": 48}"#,
            r#"{"steps": 3}"#,
            r#"{"n": 0}"#,
            r#"{"n": 17}"#,
            r#"{"remasking": "best"}"#,
            r#"{"cache": "triple"}"#,
            r#"{"threshold": 0.9, "factor": 1.0}"#,
            r#"{"factor": -1.0}"#,
            r#"{"cache": "prefix", "cfg_scale": 1.0}"#,
            r#"{"stop": ["a", "b", "c", "d", "e"]}"#,
            r#"{"stop": ""}"#,
        ] {
            let e = resolve(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}: {e:?}");
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn prompt_checks() {
        let p = GenerateParams {
            gen_length: 8,
            mask_id: 9,
            ..GenerateParams::default()
        };
        assert!(check_prompts(&[vec![1, 2]], &p, 10, 16).is_ok());
        assert!(check_prompts(&[], &p, 10, 16).is_err());
        assert!(check_prompts(&[vec![10]], &p, 10, 16).is_err());
        assert!(check_prompts(&[vec![9]], &p, 10, 16).is_err());
        let e = check_prompts(&[vec![1; 9]], &p, 10, 16).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    #[test]
    fn stop_cuts_at_first() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(apply_stop("abcdef", &s(&["d", "b"])), ("a".into(), true));
        assert_eq!(apply_stop("abc", &s(&["z"])), ("abc".into(), false));
    }

    #[test]
    fn prompt_forms_parse() {
        let p: CompletionRequest = serde_json::from_str(r#"{"prompt": [1, 2]}"#).unwrap();
        assert!(matches!(p.prompt, PromptInput::Ids(_)));
        let p: CompletionRequest = serde_json::from_str(r#"{"prompt": [[1], [2]]}"#).unwrap();
        assert!(matches!(p.prompt, PromptInput::IdLists(_)));
        let p: CompletionRequest = serde_json::from_str(r#"{"prompt": ["a"]}"#).unwrap();
        assert!(matches!(p.prompt, PromptInput::Texts(_)));
        assert!(parse_body::<CompletionRequest>(b"{\"prompt\": 3}").is_err());
        assert!(parse_body::<CompletionRequest>(b"").is_err());
    }
}
