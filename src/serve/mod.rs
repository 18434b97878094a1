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
mod generate;
mod state;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::engine::device::DeviceChoice;
use crate::engine::sampler::GenerateParams;
use crate::engine::{self, Opened};
use crate::eval::encode_pair;
use crate::loglik::LoglikParams;

use api::{parse_body, LoglikRequest, PromptOne};
pub use api::{ApiError, GenDefaults, Limits};
use generate::completions;
pub use state::ServeConfig;
use state::{err_response, finish, json_response, read_body, AppState, ENDPOINTS};
use worker::{Event, Job, Work, WorkerStats};

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

/// `type name help` of each single-value metric, in the order [`metrics`] gives the values.
const METRICS: [&str; 8] = [
    "gauge llada_queue_depth Requests queued or running.",
    "counter llada_rejected_total Requests refused with 429.",
    "counter llada_batches_total Engine batches run.",
    "counter llada_cancelled_batches_total Batches aborted because every client left.",
    "counter llada_generated_tokens_total Tokens generated (rows × gen_length).",
    "counter llada_completion_tokens_total Completion tokens answered (before EOS).",
    "counter llada_forward_passes_total Forward passes run.",
    "counter llada_busy_seconds_total Seconds the engine was busy (tokens/s = rate(generated_tokens) / rate(busy_seconds)).",
];

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
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let values = [
        st.inflight.load(Ordering::Relaxed) as f64,
        c(&st.rejected),
        c(&w.batches),
        c(&w.cancelled_batches),
        c(&w.generated_tokens),
        c(&st.completion_tokens),
        c(&w.forward_passes),
        c(&w.busy_us) / 1e6,
    ];
    for (m, v) in METRICS.iter().zip(values) {
        let (kind, rest) = m.split_once(' ').unwrap_or_default();
        let (name, help) = rest.split_once(' ').unwrap_or_default();
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
        .route("/v1/completions", post(completions::<false>))
        .route("/v1/chat/completions", post(completions::<true>))
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
