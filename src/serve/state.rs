//! The server's shared state ([`AppState`]: configuration, tokenizer, job queue, counters),
//! request admission ([`Slot`]) and the response helpers every endpoint uses.
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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{ApiError, GenDefaults, Limits};
use super::worker::{Event, Job, Work, WorkerStats};
use crate::engine::sampler::GenerateParams;
use crate::hf::tokenizer::Tokenizer;
use crate::loglik::LoglikParams;

pub(super) struct AppState {
    pub(super) cfg: ServeConfig,
    pub(super) tokenizer: Option<Arc<Tokenizer>>,
    pub(super) base: GenerateParams,
    pub(super) embedding_size: usize,
    pub(super) max_sequence_length: usize,
    pub(super) eos_ids: Vec<u32>,
    pub(super) tx: std::sync::Mutex<std::sync::mpsc::Sender<Job>>,
    pub(super) inflight: AtomicUsize,
    pub(super) next_id: AtomicU64,
    pub(super) stats: Arc<WorkerStats>,
    pub(super) requests: [AtomicU64; 5],
    pub(super) responses: [AtomicU64; 3],
    pub(super) completion_tokens: AtomicU64,
    pub(super) rejected: AtomicU64,
}

pub(super) const ENDPOINTS: [&str; 5] = [
    "completions",
    "chat_completions",
    "loglikelihood",
    "models",
    "other",
];

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(super) fn err_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &e.body())
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// A request's place in the queue: dropping it (done, or the client went away) frees the slot
/// and tells the worker nobody waits any more.
pub(super) struct Slot {
    pub(super) st: Arc<AppState>,
    pub(super) cancel: Arc<AtomicBool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.st.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AppState {
    pub(super) fn count(&self, endpoint: usize, status: u16) {
        self.requests[endpoint].fetch_add(1, Ordering::Relaxed);
        let class = match status {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
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

    pub(super) fn check_model(&self, model: &Option<String>) -> Result<(), ApiError> {
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

    pub(super) fn tokenizer(&self, what: &str) -> Result<&Tokenizer, ApiError> {
        self.tokenizer.as_deref().ok_or_else(|| {
            ApiError::bad(format!(
                "{what} needs a tokenizer and this model has none: send token ids instead"
            ))
        })
    }

    pub(super) fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tokenizer("a text prompt")?
            .encode(text, true)
            .map_err(|e| ApiError::bad(format!("cannot tokenize the prompt: {e:#}")))
    }

    pub(super) fn decode(&self, ids: &[u32]) -> String {
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
    pub(super) fn admit(self: &Arc<Self>) -> Result<Slot, ApiError> {
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

    pub(super) fn submit(
        &self,
        work: Work,
        slot: &Slot,
    ) -> Result<UnboundedReceiver<Event>, ApiError> {
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

    pub(super) fn finish_reason(&self, ids: &[u32], stopped: bool) -> &'static str {
        if stopped || ids.iter().any(|i| self.eos_ids.contains(i)) {
            "stop"
        } else {
            "length"
        }
    }

    /// Generated tokens before the first EOS/EOT.
    pub(super) fn completion_len(&self, ids: &[u32]) -> usize {
        ids.iter()
            .position(|i| self.eos_ids.contains(i))
            .unwrap_or(ids.len())
    }
}

pub(super) async fn read_body(st: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
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

pub(super) fn finish(st: &AppState, endpoint: usize, r: Result<Response, ApiError>) -> Response {
    let resp = match r {
        Ok(resp) => resp,
        Err(e) => err_response(&e),
    };
    st.count(endpoint, resp.status().as_u16());
    resp
}
