//! `POST /v1/completions` and `POST /v1/chat/completions`: validate, queue a generation job,
//! answer with one JSON body or a server-sent-event stream.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{
    apply_stop, check_prompts, parse_body, ApiError, ChatRequest, CompletionRequest, GenFields,
    PromptInput, Resolved,
};
use super::state::{err_response, finish, json_response, now, read_body, AppState, Slot};
use super::worker::{Event, GenJob, Work};

/// `POST /v1/completions` (`CHAT` false, endpoint 0) and `POST /v1/chat/completions` (`CHAT`
/// true, endpoint 1).
pub(super) async fn completions<const CHAT: bool>(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let kind = if CHAT { Kind::Chat } else { Kind::Completion };
    let r = generate_endpoint(&st, headers, body, kind).await;
    finish(&st, usize::from(CHAT), r)
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
