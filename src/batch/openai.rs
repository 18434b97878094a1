//! OpenAI's batch file format for `llada batch`, beside the native one (detected per file).
//!
//! Input lines `{"custom_id", "method": "POST", "url": "/v1/completions" |
//! "/v1/chat/completions", "body": {...}}` are translated line for line into native lines
//! (same line numbers, so sharding, resume, duplicates and the errors file work unchanged), with
//! the native id `batch_req_<custom_id>`. Result lines are rewritten on their way to the output
//! file into `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
//! whose `body` is the completion object `llada serve` answers; error lines into
//! `{"id", "custom_id", "response": null, "error": {"code", "message", "line"}}`.
//!
//! Body fields: OpenAI's `prompt` (a string or token ids), `messages`, `max_tokens` /
//! `max_completion_tokens` (→ `gen_length`), `temperature`, `seed`, `stop`, `model` (echoed),
//! `n` (only 1), `stream` (only false), `user` (ignored), and LLaDA's own settings as in the
//! native format.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::request::{apply_stop, LineError, PARAM_KEYS};

/// The prefix of the native id of a request (`batch_req_<custom_id>`).
pub const ID_PREFIX: &str = "batch_req_";

const URLS: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

/// Whether `text` is an OpenAI batch file: its first non-blank line is a JSON object with a
/// `custom_id`.
pub fn is_openai(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v.get("custom_id").is_some())
}

struct Meta {
    custom_id: String,
    chat: bool,
    stop: Vec<String>,
    model: Option<Value>,
}

/// A translated OpenAI batch file.
pub struct OpenAiBatch {
    /// Native JSONL, one line per input line.
    pub text: String,
    /// Lines that are not valid OpenAI batch lines (every line; the caller keeps its shard's).
    pub errors: Vec<LineError>,
    meta: HashMap<String, Meta>,
    eos_ids: Vec<u32>,
    created: u64,
}

fn native_id(custom_id: &str) -> String {
    format!("{ID_PREFIX}{custom_id}")
}

/// One input line into a native object, or why not.
fn translate_line(obj: &Map<String, Value>) -> Result<(Map<String, Value>, Meta), String> {
    for k in obj.keys() {
        if !matches!(k.as_str(), "custom_id" | "method" | "url" | "body") {
            return Err(format!(
                "unknown key `{k}` (an OpenAI batch line has custom_id, method, url, body)"
            ));
        }
    }
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(v) => return Err(format!("`custom_id` must be a non-empty string, got {v}")),
        None => return Err("missing field `custom_id`".into()),
    };
    match obj.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        Some(m) => return Err(format!("method {m:?} is not supported (only POST)")),
        None => return Err("missing field `method` (\"POST\")".into()),
    }
    let url = obj
        .get("url")
        .and_then(Value::as_str)
        .ok_or("missing field `url`")?;
    let chat = match url {
        "/v1/completions" => false,
        "/v1/chat/completions" => true,
        u => {
            return Err(format!(
                "url {u:?} is not supported (expected one of {URLS:?})"
            ))
        }
    };
    let body = obj
        .get("body")
        .and_then(Value::as_object)
        .ok_or("`body` must be a JSON object")?;
    let mut out = Map::new();
    out.insert("id".into(), Value::String(native_id(&custom_id)));
    let mut stop = Vec::new();
    let mut model = None;
    for (k, v) in body {
        match k.as_str() {
            "prompt" if !chat => match v {
                Value::String(_) => {
                    out.insert("prompt".into(), v.clone());
                }
                Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                    out.insert("prompt".into(), a[0].clone());
                }
                Value::Array(a) if a.iter().all(Value::is_number) => {
                    out.insert("prompt_ids".into(), v.clone());
                }
                _ => {
                    return Err(
                        "`prompt` must be one string or one list of token ids per line".into(),
                    )
                }
            },
            "messages" if chat => {
                let arr = v.as_array().ok_or("`messages` must be an array")?;
                let mut msgs = Vec::with_capacity(arr.len());
                for (i, m) in arr.iter().enumerate() {
                    let role = m.get("role").cloned().unwrap_or(Value::Null);
                    let content = match m.get("content") {
                        Some(Value::Array(parts)) => {
                            let mut s = String::new();
                            for (j, p) in parts.iter().enumerate() {
                                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                                    (Some("text"), Some(Value::String(t))) => s.push_str(t),
                                    _ => {
                                        return Err(format!(
                                            "messages[{i}].content[{j}]: only text parts are supported"
                                        ))
                                    }
                                }
                            }
                            Value::String(s)
                        }
                        Some(c) => c.clone(),
                        None => Value::Null,
                    };
                    msgs.push(json!({"role": role, "content": content}));
                }
                out.insert("messages".into(), Value::Array(msgs));
            }
            "max_tokens" | "max_completion_tokens" => {
                out.insert("gen_length".into(), v.clone());
            }
            "n" if v.as_u64() == Some(1) => {}
            "n" => return Err(format!("n = {v} is not supported in a batch line (only 1)")),
            "stream" if v == &Value::Bool(false) => {}
            "stream" => return Err("stream is not supported in a batch line".into()),
            "stop" => {
                stop = match v {
                    Value::Null => Vec::new(),
                    Value::String(s) => vec![s.clone()],
                    Value::Array(a) => a
                        .iter()
                        .map(|s| s.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or("`stop` must be a string or a list of strings")?,
                    _ => return Err("`stop` must be a string or a list of strings".into()),
                };
                if stop.len() > 4 || stop.iter().any(String::is_empty) {
                    return Err("`stop`: at most 4 non-empty sequences".into());
                }
            }
            "model" => model = Some(v.clone()),
            "user" => {}
            "chat" => {
                return Err(format!("unknown body key `{k}` in an OpenAI batch line"))
            }
            k if PARAM_KEYS.contains(&k) => {
                out.insert(k.into(), v.clone());
            }
            _ => {
                return Err(format!(
                    "unknown body key `{k}` for {url} (known: {}, max_tokens, stop, model, n, stream, user, {})",
                    if chat { "messages" } else { "prompt" },
                    PARAM_KEYS[..PARAM_KEYS.len() - 1].join(", ")
                ))
            }
        }
    }
    if !chat {
        out.insert("chat".into(), Value::Bool(false));
    }
    Ok((
        out,
        Meta {
            custom_id,
            chat,
            stop,
            model,
        },
    ))
}

impl OpenAiBatch {
    /// Translate an OpenAI batch file. `eos_ids` (EOS, EOT) decide `finish_reason` and
    /// `completion_tokens`.
    pub fn translate(text: &str, eos_ids: Vec<u32>) -> OpenAiBatch {
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        let mut meta = HashMap::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = i + 1;
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            match serde_json::from_str::<Value>(raw) {
                Ok(Value::Object(obj)) => match translate_line(&obj) {
                    Ok((native, m)) => {
                        let key = Value::String(native_id(&m.custom_id)).to_string();
                        // The first line with an id keeps its meta (later ones are duplicates).
                        meta.entry(key).or_insert(m);
                        lines.push(Value::Object(native).to_string());
                    }
                    Err(message) => {
                        let id = obj
                            .get("custom_id")
                            .and_then(Value::as_str)
                            .map(|c| Value::String(native_id(c)));
                        errors.push(LineError { line, id, message });
                        lines.push(String::new());
                    }
                },
                // Not an object: the native parser names the problem.
                _ => lines.push(raw.to_string()),
            }
        }
        OpenAiBatch {
            text: lines.join("\n"),
            errors,
            meta,
            eos_ids,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn custom_id(&self, id: Option<&Value>) -> Value {
        match id {
            Some(v) => self
                .meta
                .get(&v.to_string())
                .map(|m| Value::String(m.custom_id.clone()))
                .or_else(|| {
                    v.as_str()
                        .and_then(|s| s.strip_prefix(ID_PREFIX))
                        .map(|s| Value::String(s.into()))
                })
                .unwrap_or(Value::Null),
            None => Value::Null,
        }
    }

    /// A native result line (`id`, `ids`, `text`, `nfe`, `prompt_tokens`, ...) as an OpenAI
    /// batch output line.
    pub fn result_line(&self, rec: &Value) -> Value {
        let id = rec.get("id").cloned().unwrap_or(Value::Null);
        let Some(m) = self.meta.get(&id.to_string()) else {
            return rec.clone();
        };
        let ids: Vec<u32> = rec
            .get("ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as u32))
                    .collect()
            })
            .unwrap_or_default();
        let text = match rec.get("text").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        };
        let (text, stopped) = apply_stop(&text, &m.stop);
        let reason = if stopped || ids.iter().any(|i| self.eos_ids.contains(i)) {
            "stop"
        } else {
            "length"
        };
        let completion = ids
            .iter()
            .position(|i| self.eos_ids.contains(i))
            .unwrap_or(ids.len());
        let prompt = rec
            .get("prompt_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let choice = if m.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text},
                   "logprobs": null, "finish_reason": reason, "token_ids": ids})
        } else {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason,
                   "token_ids": ids})
        };
        let body = json!({
            "id": format!("{}-{}", if m.chat { "chatcmpl" } else { "cmpl" }, m.custom_id),
            "object": if m.chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": m.model.clone().unwrap_or(Value::String("llada".into())),
            "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion, "nfe": rec.get("nfe")},
            // The generation parameters, so a resume can check a done line against its request.
            "params": rec.get("params"),
        });
        json!({
            "id": id,
            "custom_id": m.custom_id,
            "response": {"status_code": 200, "request_id": id, "body": body},
            "error": null,
        })
    }

    /// An errors-file line in OpenAI's shape.
    pub fn error_line(&self, e: &LineError) -> Value {
        let code = if e.message.starts_with("generation failed") {
            "generation_failed"
        } else {
            "invalid_request"
        };
        json!({
            "id": e.id,
            "custom_id": self.custom_id(e.id.as_ref()),
            "response": null,
            "error": {"code": code, "message": e.message, "line": e.line},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_translates() {
        let text = r#"{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", "max_tokens": 8, "steps": 4, "stop": "x", "model": "m"}}

{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "yo"}]}]}}
{"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}
{"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {}}
{"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a", "n": 2}}
{"id": 1, "prompt": "native line"}
not json"#;
        assert!(is_openai(text));
        assert!(!is_openai(r#"{"id": 1, "prompt": "x"}"#));
        let b = OpenAiBatch::translate(text, vec![2]);
        let lines: Vec<&str> = b.text.split('\n').collect();
        assert_eq!(lines.len(), 8);
        let a: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(
            a,
            json!({"id": "batch_req_a", "prompt": "hi", "gen_length": 8, "steps": 4, "chat": false})
        );
        assert_eq!(lines[1], "");
        let c: Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(c["messages"][0]["content"], "yo");
        assert_eq!(lines[7], "not json");
        let bad: Vec<usize> = b.errors.iter().map(|e| e.line).collect();
        assert_eq!(bad, vec![4, 5, 6, 7]);
        assert_eq!(b.errors[0].id, Some(json!("batch_req_c")));
        let rec = json!({"id": "batch_req_a", "ids": [5, 6, 2, 2], "text": "abxcd",
                         "nfe": 4, "prompt_tokens": 3});
        let out = b.result_line(&rec);
        assert_eq!(out["custom_id"], "a");
        assert_eq!(out["response"]["status_code"], 200);
        let body = &out["response"]["body"];
        assert_eq!(body["choices"][0]["text"], "ab");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["completion_tokens"], 2);
        assert_eq!(body["model"], "m");
        let e = b.error_line(&b.errors[0]);
        assert_eq!(e["custom_id"], "c");
        assert_eq!(e["error"]["line"], 4);
        assert!(e["response"].is_null());
    }
}
