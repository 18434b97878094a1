//! `llada serve`: an OpenAI-compatible HTTP server (axum on tokio) over one engine.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `GET /health`, `POST /v1/loglikelihood` (upstream's Monte-Carlo ELBO, as `llada loglik`)
//! and `GET /metrics` (Prometheus text).
//!
//! One worker thread owns the model ([`worker`]); handlers validate and tokenize, then queue a
//! job. At most `max_queue` requests are admitted at once (429 beyond); a request's slot is
//! freed when it finishes or its client goes away (the worker then skips it, or aborts its batch
//! between forward passes when nobody of the batch is left). `stream: true` answers with
//! server-sent events, one chunk per committed block, ending with `data: [DONE]`. SIGTERM or
//! ctrl-c stops accepting connections and lets in-flight requests finish.

pub mod api;
pub mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::device::DeviceChoice;
use crate::engine::sampler::GenerateParams;
use crate::engine::{self, Opened};
use crate::eval::encode_pair;
use crate::hf::tokenizer::Tokenizer;
use crate::loglik::LoglikParams;

use api::{
    apply_stop, check_prompts, parse_body, ChatRequest, CompletionRequest, GenFields,
    LoglikRequest, PromptInput, PromptOne, Resolved,
};
pub use api::{ApiError, GenDefaults, Limits};
use worker::{Event, GenJob, Job, Work, WorkerStats};

/// Everything `llada serve` is configured with.
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// The name `/v1/models` lists and requests may give as `model`.
    pub model_name: String,
    pub defaults: GenDefaults,
    pub limits: Limits,
    /// Requests admitted at once (queued or running); more get 429.
    pub max_queue: usize,
    /// Most rows (prompts × n) one engine batch holds.
    pub max_batch: usize,
    /// Largest accepted request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Log-likelihood defaults (`mc_num`, `batch_size`, `cfg_scale`, `seed`).
    pub loglik: LoglikParams,
    /// Most log-likelihood pairs in one request.
    pub max_loglik_pairs: usize,
}

struct AppState {
    cfg: ServeConfig,
    tokenizer: Option<Arc<Tokenizer>>,
    base: GenerateParams,
    embedding_size: usize,
    max_sequence_length: usize,
    eos_ids: Vec<u32>,
    tx: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    inflight: AtomicUsize,
    next_id: AtomicU64,
    stats: Arc<WorkerStats>,
    requests: [AtomicU64; 5],
    responses: [AtomicU64; 3],
    completion_tokens: AtomicU64,
    rejected: AtomicU64,
}

const ENDPOINTS: [&str; 5] = [
    "completions",
    "chat_completions",
    "loglikelihood",
    "models",
    "other",
];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn err_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &e.body())
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A request's place in the queue: dropping it (done, or the client went away) frees the slot
/// and tells the worker nobody waits any more.
struct Slot {
    st: Arc<AppState>,
    cancel: Arc<AtomicBool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.st.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    fn count(&self, endpoint: usize, status: u16) {
        self.requests[endpoint].fetch_add(1, Ordering::Relaxed);
        let class = match status {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.cfg.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError {
                status: 401,
                message: "invalid or missing API key (send Authorization: Bearer KEY)".into(),
                kind: "authentication_error",
                param: None,
                code: Some("invalid_api_key"),
            })
        }
    }

    fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != &self.cfg.model_name => Err(ApiError::param(
                "model",
                format!(
                    "the model {m:?} does not exist: this server serves {:?}",
                    self.cfg.model_name
                ),
            )
            .with_code(404, "model_not_found")),
            _ => Ok(()),
        }
    }

    fn tokenizer(&self, what: &str) -> Result<&Tokenizer, ApiError> {
        self.tokenizer.as_deref().ok_or_else(|| {
            ApiError::bad(format!(
                "{what} needs a tokenizer and this model has none: send token ids instead"
            ))
        })
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer("a text prompt")?
            .encode(text, true)
            .map_err(|e| ApiError::bad(format!("cannot tokenize the prompt: {e:#}")))
    }

    fn decode(&self, ids: &[u32]) -> String {
        match &self.tokenizer {
            Some(t) => t.decode(ids, true).unwrap_or_default(),
            None => ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Admit one request (429 when `max_queue` are in flight).
    fn admit(self: &Arc<Self>) -> Result<Slot, ApiError> {
        let prev = self.inflight.fetch_add(1, Ordering::Relaxed);
        let slot = Slot {
            st: self.clone(),
            cancel: Arc::new(AtomicBool::new(false)),
        };
        if prev >= self.cfg.max_queue {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError {
                status: 429,
                message: format!(
                    "the server is busy: {} requests are queued or running; retry later",
                    self.cfg.max_queue
                ),
                kind: "rate_limit_error",
                param: None,
                code: Some("rate_limit_exceeded"),
            });
        }
        Ok(slot)
    }

    fn submit(&self, work: Work, slot: &Slot) -> Result<UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = unbounded_channel();
        let job = Job {
            work,
            tx,
            cancel: slot.cancel.clone(),
        };
        self.tx
            .lock()
            .map_err(|_| ApiError::server("the job queue is poisoned"))?
            .send(job)
            .map_err(|_| ApiError::server("the engine has stopped"))?;
        Ok(rx)
    }

    fn finish_reason(&self, ids: &[u32], stopped: bool) -> &'static str {
        if stopped || ids.iter().any(|i| self.eos_ids.contains(i)) {
            "stop"
        } else {
            "length"
        }
    }

    /// Generated tokens before the first EOS/EOT.
    fn completion_len(&self, ids: &[u32]) -> usize {
        ids.iter()
            .position(|i| self.eos_ids.contains(i))
            .unwrap_or(ids.len())
    }
}

async fn read_body(st: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, st.cfg.max_body_bytes)
        .await
        .map_err(|e| {
            let too_big = std::error::Error::source(&e)
                .map(|s| s.to_string().contains("length limit"))
                .unwrap_or(false)
                || e.to_string().contains("length limit");
            if too_big {
                ApiError::bad(format!(
                    "the request body exceeds {} bytes",
                    st.cfg.max_body_bytes
                ))
                .with_code(413, "request_too_large")
            } else {
                ApiError::bad(format!("cannot read the request body: {e}"))
            }
        })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let r = generate_endpoint(&st, headers, body, Kind::Completion).await;
    finish(&st, 0, r)
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = generate_endpoint(&st, headers, body, Kind::Chat).await;
    finish(&st, 1, r)
}

fn finish(st: &AppState, endpoint: usize, r: Result<Response, ApiError>) -> Response {
    let resp = match r {
        Ok(resp) => resp,
        Err(e) => err_response(&e),
    };
    st.count(endpoint, resp.status().as_u16());
    resp
}

async fn generate_endpoint(
    st: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    kind: Kind,
) -> Result<Response, ApiError> {
    st.check_auth(&headers)?;
    let bytes = read_body(st, body).await?;
    let (fields, prompts): (GenFields, Vec<Vec<u32>>) = match kind {
        Kind::Completion => {
            let req: CompletionRequest = parse_body(&bytes)?;
            st.check_model(&req.gen.model)?;
            let prompts = match req.prompt {
                PromptInput::Text(s) => vec![st.encode(&s)?],
                PromptInput::Texts(v) => {
                    v.iter().map(|s| st.encode(s)).collect::<Result<_, _>>()?
                }
                PromptInput::Ids(ids) => vec![ids],
                PromptInput::IdLists(v) => v,
            };
            (req.gen, prompts)
        }
        Kind::Chat => {
            let req: ChatRequest = parse_body(&bytes)?;
            st.check_model(&req.gen.model)?;
            if req.messages.is_empty() {
                return Err(ApiError::param("messages", "messages is empty"));
            }
            let msgs = req
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| Ok((m.role.clone(), m.text(i)?)))
                .collect::<Result<Vec<_>, ApiError>>()?;
            let ids = st
                .tokenizer("chat")?
                .encode_chat(&msgs)
                .map_err(|e| ApiError::param("messages", format!("{e:#}")))?;
            (req.gen, vec![ids])
        }
    };
    let Resolved {
        params,
        decode,
        n,
        stop,
        stream,
    } = fields.resolve(&st.cfg.defaults, &st.base, &st.cfg.limits)?;
    if prompts.len() * n > st.cfg.limits.max_rows {
        return Err(ApiError::param(
            "n",
            format!(
                "{} prompts × n {n} exceed the limit of {} completions per request",
                prompts.len(),
                st.cfg.limits.max_rows
            ),
        ));
    }
    check_prompts(&prompts, &params, st.embedding_size, st.max_sequence_length)?;
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let mut rows = Vec::with_capacity(prompts.len() * n);
    let mut draws = Vec::with_capacity(prompts.len() * n);
    for p in &prompts {
        for d in 0..n {
            rows.push(p.clone());
            draws.push(d as u32);
        }
    }
    let slot = st.admit()?;
    let rx = st.submit(
        Work::Generate(GenJob {
            params,
            decode,
            prompts: rows,
            draws,
            stream,
        }),
        &slot,
    )?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let info = RespInfo {
        choices: prompts.len() * n,
        id,
        created: now(),
        kind,
        prompt_tokens,
        stop,
    };
    if stream {
        Ok(sse_response(st.clone(), rx, slot, info))
    } else {
        let mut rx = rx;
        let (ids, nfe) = loop {
            match rx.recv().await {
                Some(Event::Done { ids, nfe }) => break (ids, nfe),
                Some(Event::Failed(m)) => return Err(ApiError::server(m)),
                Some(_) => continue,
                None => return Err(ApiError::server("the engine dropped the request")),
            }
        };
        drop(slot);
        Ok(json_response(
            StatusCode::OK,
            &final_body(st, &info, &ids, nfe),
        ))
    }
}

struct RespInfo {
    /// Choices in the response (prompts × n).
    choices: usize,
    id: String,
    created: u64,
    kind: Kind,
    prompt_tokens: usize,
    stop: Vec<String>,
}

fn usage(st: &AppState, info: &RespInfo, ids: &[Vec<u32>], nfe: usize) -> Value {
    let completion: usize = ids.iter().map(|i| st.completion_len(i)).sum();
    st.completion_tokens
        .fetch_add(completion as u64, Ordering::Relaxed);
    json!({
        "prompt_tokens": info.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": info.prompt_tokens + completion,
        "nfe": nfe,
    })
}

fn final_body(st: &AppState, info: &RespInfo, ids: &[Vec<u32>], nfe: usize) -> Value {
    let choices: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let (text, stopped) = apply_stop(&st.decode(ids), &info.stop);
            let reason = st.finish_reason(ids, stopped);
            match info.kind {
                Kind::Completion => json!({
                    "index": i, "text": text, "logprobs": null, "finish_reason": reason,
                    "token_ids": ids,
                }),
                Kind::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null, "finish_reason": reason, "token_ids": ids,
                }),
            }
        })
        .collect();
    json!({
        "id": info.id,
        "object": if info.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": info.created,
        "model": st.cfg.model_name,
        "choices": choices,
        "usage": usage(st, info, ids, nfe),
    })
}

/// Per-choice streaming state: what was sent, whether a stop sequence ended it.
struct ChoiceState {
    sent: String,
    done: bool,
}

fn chunk(
    st: &AppState,
    info: &RespInfo,
    index: usize,
    text: &str,
    reason: Option<&str>,
    first: bool,
) -> Value {
    match info.kind {
        Kind::Completion => json!({
            "id": info.id, "object": "text_completion", "created": info.created,
            "model": st.cfg.model_name,
            "choices": [{"index": index, "text": text, "logprobs": null, "finish_reason": reason}],
        }),
        Kind::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else if reason.is_some() && text.is_empty() {
                json!({})
            } else {
                json!({"content": text})
            };
            json!({
                "id": info.id, "object": "chat.completion.chunk", "created": info.created,
                "model": st.cfg.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": reason}],
            })
        }
    }
}

fn sse(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// The text of `ids` that is safe to send now: no trailing replacement character (a partial
/// UTF-8 sequence) and, with stop sequences, nothing a stop sequence could still start in.
fn settled(full: &str, stop: &[String]) -> (String, bool) {
    let (cut, stopped) = apply_stop(full, stop);
    if stopped {
        return (cut, true);
    }
    let mut s = cut.trim_end_matches('\u{FFFD}').to_string();
    let hold = stop
        .iter()
        .map(|x| x.len())
        .max()
        .unwrap_or(1)
        .saturating_sub(1);
    let mut keep = s.len().saturating_sub(hold);
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    s.truncate(keep);
    (s, false)
}

fn sse_response(
    st: Arc<AppState>,
    rx: UnboundedReceiver<Event>,
    slot: Slot,
    info: RespInfo,
) -> Response {
    struct S {
        st: Arc<AppState>,
        rx: UnboundedReceiver<Event>,
        slot: Option<Slot>,
        info: RespInfo,
        choices: Vec<ChoiceState>,
        first: bool,
    }
    let state = S {
        st,
        rx,
        slot: Some(slot),
        info,
        choices: Vec::new(),
        first: true,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        s.slot.as_ref()?;
        let mut out = String::new();
        if s.first && s.info.kind == Kind::Chat {
            // The role comes first, as OpenAI's stream does.
            for i in 0..s.info.choices {
                out.push_str(&sse(&chunk(&s.st, &s.info, i, "", None, true)));
            }
        }
        s.first = false;
        match s.rx.recv().await {
            Some(Event::Block { choice, ids }) => {
                while s.choices.len() <= choice {
                    s.choices.push(ChoiceState {
                        sent: String::new(),
                        done: false,
                    });
                }
                let c = &mut s.choices[choice];
                if !c.done {
                    let (text, stopped) = settled(&s.st.decode(&ids), &s.info.stop);
                    if let Some(delta) = text.strip_prefix(c.sent.as_str()) {
                        if !delta.is_empty() || stopped {
                            let reason = stopped.then_some("stop");
                            out.push_str(&sse(&chunk(
                                &s.st, &s.info, choice, delta, reason, false,
                            )));
                            c.sent = text.clone();
                            c.done = stopped;
                        }
                    }
                }
            }
            Some(Event::Done { ids, nfe }) => {
                for (i, row) in ids.iter().enumerate() {
                    while s.choices.len() <= i {
                        s.choices.push(ChoiceState {
                            sent: String::new(),
                            done: false,
                        });
                    }
                    let c = &s.choices[i];
                    if c.done {
                        continue;
                    }
                    let (text, stopped) = apply_stop(&s.st.decode(row), &s.info.stop);
                    let delta = text.strip_prefix(c.sent.as_str()).unwrap_or(&text);
                    let reason = s.st.finish_reason(row, stopped);
                    out.push_str(&sse(&chunk(&s.st, &s.info, i, delta, Some(reason), false)));
                }
                let mut last = chunk(&s.st, &s.info, 0, "", None, false);
                last["choices"] = json!([]);
                last["usage"] = usage(&s.st, &s.info, &ids, nfe);
                out.push_str(&sse(&last));
                out.push_str("data: [DONE]\n\n");
                s.slot = None;
            }
            Some(Event::Failed(m)) => {
                out.push_str(&sse(&ApiError::server(m).body()));
                out.push_str("data: [DONE]\n\n");
                s.slot = None;
            }
            Some(Event::Loglik(_)) | None => {
                out.push_str(&sse(
                    &ApiError::server("the engine dropped the request").body()
                ));
                out.push_str("data: [DONE]\n\n");
                s.slot = None;
            }
        }
        Some((Ok::<String, Infallible>(out), s))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| err_response(&ApiError::server("cannot build the stream")))
}

async fn loglikelihood(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = loglik_endpoint(&st, headers, body).await;
    finish(&st, 2, r)
}

async fn loglik_endpoint(
    st: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    st.check_auth(&headers)?;
    let bytes = read_body(st, body).await?;
    let req: LoglikRequest = parse_body(&bytes)?;
    st.check_model(&req.model)?;
    let pairs_in = match (&req.prompt, &req.continuation, &req.requests) {
        (Some(p), Some(c), None) => vec![(p.clone(), c.clone())],
        (None, None, Some(v)) if !v.is_empty() => v
            .iter()
            .map(|p| (p.prompt.clone(), p.continuation.clone()))
            .collect(),
        _ => return Err(ApiError::bad(
            "give prompt and continuation, or a non-empty requests list of {prompt, continuation}",
        )),
    };
    if pairs_in.len() > st.cfg.max_loglik_pairs {
        return Err(ApiError::param(
            "requests",
            format!(
                "{} pairs exceed the limit of {} per request",
                pairs_in.len(),
                st.cfg.max_loglik_pairs
            ),
        ));
    }
    let mc_num = req.mc_num.unwrap_or(st.cfg.loglik.mc_num);
    let params = LoglikParams {
        mc_num,
        batch_size: req
            .batch_size
            .unwrap_or_else(|| LoglikParams::default_batch_size(mc_num)),
        cfg_scale: req.cfg_scale.unwrap_or(st.cfg.loglik.cfg_scale),
        seed: req.seed.unwrap_or(st.cfg.loglik.seed),
    };
    params
        .validate()
        .map_err(|e| ApiError::bad(format!("impossible settings: {e:#}")))?;
    if params.mc_num > 1 << 16 {
        return Err(ApiError::param("mc_num", "mc_num must be at most 65536"));
    }
    let mut pairs = Vec::with_capacity(pairs_in.len());
    for (i, (p, c)) in pairs_in.into_iter().enumerate() {
        let (prompt, answer) = match (p, c) {
            (PromptOne::Ids(p), PromptOne::Ids(c)) => (p, c),
            (PromptOne::Text(p), PromptOne::Text(c)) => {
                let tok = st.tokenizer("a text prompt")?;
                encode_pair(&mut |s: &str| tok.encode(s, true), &p, &c)
                    .map_err(|e| ApiError::bad(format!("pair {i}: cannot tokenize: {e:#}")))?
            }
            _ => {
                return Err(ApiError::bad(format!(
                    "pair {i}: prompt and continuation must both be text or both token ids"
                )))
            }
        };
        if answer.is_empty() {
            return Err(ApiError::param(
                "continuation",
                format!("pair {i}: the continuation has no tokens"),
            ));
        }
        if let Some(&id) = prompt
            .iter()
            .chain(&answer)
            .find(|&&id| id as usize >= st.embedding_size)
        {
            return Err(ApiError::bad(format!(
                "pair {i}: token id {id} is out of range (the model has {} embeddings)",
                st.embedding_size
            )));
        }
        if answer.contains(&st.base.mask_id) {
            return Err(ApiError::param(
                "continuation",
                format!("pair {i}: the continuation contains the mask token"),
            ));
        }
        if prompt.len() + answer.len() > st.max_sequence_length {
            return Err(ApiError::bad(format!(
                "pair {i}: prompt ({}) + continuation ({}) exceed the model's context of {} tokens",
                prompt.len(),
                answer.len(),
                st.max_sequence_length
            ))
            .with_code(400, "context_length_exceeded"));
        }
        pairs.push((prompt, answer));
    }
    let prompt_tokens: usize = pairs.iter().map(|p| p.0.len()).sum();
    let cont_tokens: Vec<usize> = pairs.iter().map(|p| p.1.len()).collect();
    let slot = st.admit()?;
    let mut rx = st.submit(
        Work::Loglik {
            pairs,
            params: params.clone(),
        },
        &slot,
    )?;
    let outs = loop {
        match rx.recv().await {
            Some(Event::Loglik(o)) => break o,
            Some(Event::Failed(m)) => return Err(ApiError::server(m)),
            Some(_) => continue,
            None => return Err(ApiError::server("the engine dropped the request")),
        }
    };
    drop(slot);
    let nfe: usize = outs.iter().map(|o| o.forward_passes).sum();
    let results: Vec<Value> = outs
        .iter()
        .zip(&cont_tokens)
        .map(|(o, &n)| {
            json!({"loglikelihood": o.loglik, "mc_stderr": o.mc_stderr, "continuation_tokens": n})
        })
        .collect();
    let mut v = json!({
        "object": "loglikelihood",
        "model": st.cfg.model_name,
        "results": results,
        "params": {"mc_num": params.mc_num, "batch_size": params.batch_size,
                   "cfg_scale": params.cfg_scale, "seed": params.seed},
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                  "total_tokens": prompt_tokens, "nfe": nfe},
    });
    if outs.len() == 1 {
        v["loglikelihood"] = json!(outs[0].loglik);
    }
    Ok(json_response(StatusCode::OK, &v))
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = st.check_auth(&headers).map(|_| {
        json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{
                "id": st.cfg.model_name, "object": "model", "created": 0, "owned_by": "llada",
                "max_model_len": st.max_sequence_length,
            }]}),
        )
    });
    finish(&st, 3, r)
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let w = &st.stats;
    let mut s = String::new();
    s.push_str(
        "# HELP llada_requests_total Requests by endpoint.\n# TYPE llada_requests_total counter\n",
    );
    for (i, e) in ENDPOINTS.iter().enumerate() {
        s.push_str(&format!(
            "llada_requests_total{{endpoint=\"{e}\"}} {}\n",
            st.requests[i].load(Ordering::Relaxed)
        ));
    }
    s.push_str("# HELP llada_responses_total Responses by status class.\n# TYPE llada_responses_total counter\n");
    for (i, c) in ["2xx", "4xx", "5xx"].iter().enumerate() {
        s.push_str(&format!(
            "llada_responses_total{{class=\"{c}\"}} {}\n",
            st.responses[i].load(Ordering::Relaxed)
        ));
    }
    let lines = [
        (
            "llada_queue_depth",
            "gauge",
            "Requests queued or running.",
            st.inflight.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_rejected_total",
            "counter",
            "Requests refused with 429.",
            st.rejected.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_batches_total",
            "counter",
            "Engine batches run.",
            w.batches.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_cancelled_batches_total",
            "counter",
            "Batches aborted because every client left.",
            w.cancelled_batches.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_generated_tokens_total",
            "counter",
            "Tokens generated (rows × gen_length).",
            w.generated_tokens.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_completion_tokens_total",
            "counter",
            "Completion tokens answered (before EOS).",
            st.completion_tokens.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_forward_passes_total",
            "counter",
            "Forward passes run.",
            w.forward_passes.load(Ordering::Relaxed) as f64,
        ),
        (
            "llada_busy_seconds_total",
            "counter",
            "Seconds the engine was busy (tokens/s = rate(generated_tokens) / rate(busy_seconds)).",
            w.busy_us.load(Ordering::Relaxed) as f64 / 1e6,
        ),
    ];
    for (name, kind, help, v) in lines {
        s.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    st.count(4, 200);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s).into_response()
}

async fn not_found(State(st): State<Arc<AppState>>) -> Response {
    let e = ApiError::bad("no such endpoint").with_code(404, "not_found");
    st.count(4, 404);
    err_response(&e)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("llada serve: shutting down, finishing in-flight requests");
}

/// Load the model on `device` (in the worker thread, which keeps it), bind, print
/// `llada serve listening on http://ADDR` on stdout, and serve until SIGTERM / ctrl-c.
pub fn run(cfg: ServeConfig, mut opened: Opened, device: DeviceChoice) -> Result<()> {
    let mut base = GenerateParams::default();
    opened.apply_ids(&mut base);
    let tokenizer = opened.tokenizer.take().map(Arc::new);
    let mut eos_ids = vec![base.eos_id];
    eos_ids.extend(base.eot_id);
    let embedding_size = opened.cfg.embedding_size;
    let max_sequence_length = opened.cfg.max_sequence_length;
    let stats = Arc::new(WorkerStats::default());
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String>>();
    let max_batch = cfg.max_batch.max(1);
    let wstats = stats.clone();
    std::thread::Builder::new()
        .name("llada-engine".into())
        .spawn(move || {
            let (mut eng, notice) = match engine::load(&opened, device) {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if let Some(n) = notice {
                eprintln!("note: {n}");
            }
            let _ = ready_tx.send(Ok(eng.device()));
            worker::run(eng.as_mut(), rx, max_batch, &wstats);
        })
        .context("cannot start the engine thread")?;
    let device_name = ready_rx
        .recv()
        .context("the engine thread stopped while loading")??;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let st = Arc::new(AppState {
        cfg,
        tokenizer,
        base,
        embedding_size,
        max_sequence_length,
        eos_ids,
        tx: std::sync::Mutex::new(tx),
        inflight: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        stats,
        requests: Default::default(),
        responses: Default::default(),
        completion_tokens: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/loglikelihood", post(loglikelihood))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(st.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound: SocketAddr = listener.local_addr()?;
        println!("llada serve listening on http://{bound}");
        eprintln!(
            "llada serve: model {:?} on {device_name}",
            st.cfg.model_name
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server error")?;
        Ok::<(), anyhow::Error>(())
    })?;
    eprintln!("llada serve: stopped");
    Ok(())
}
