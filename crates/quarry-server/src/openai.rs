//! `POST /v1/chat/completions` and `POST /v1/completions`, streamed (server-sent events) or
//! not, in OpenAI's response shapes.
//!
//! A request with `n` choices becomes `n` engine requests (seeds `seed + i`) whose events
//! arrive tagged with their choice index on one channel.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quarry_engine::{Cancel, Event, FinishReason, Request, TokenLogprob, Usage};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::error::ApiError;
use crate::params::{self, Endpoint, Generation};
use crate::{AppState, Server};

pub async fn chat(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(s, Endpoint::Chat, body).await
}

pub async fn completions(
    State(s): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    generate(s, Endpoint::Completions, body).await
}

/// A body the extractor refused (too large, unreadable), as an OpenAI error.
pub fn rejection(r: BytesRejection) -> ApiError {
    ApiError::bad_request(format!(
        "could not read the request body: {} (the limit is {} bytes)",
        r.body_text(),
        crate::BODY_LIMIT
    ))
    .with_status(r.status())
}

/// Seconds since the epoch, for `created`.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn response_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}-{}{}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn generate(
    s: AppState,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = params::object(&body.map_err(rejection)?)?;
    s.check_model(&body)?;
    let g = generation(&s, endpoint, body).await?;
    let events = submit(&s, &g)?;
    let reply = Reply {
        endpoint,
        id: response_id(match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }),
        created: now(),
        model: s.config.model_id.clone(),
    };
    if g.stream {
        Ok(stream(s, reply, g, events).into_response())
    } else {
        Ok(Json(collect(&s, &reply, &g, events).await?).into_response())
    }
}

/// Reads a chat or completion body into a [`Generation`] ([`params::generation`]) off the
/// async workers: rendering and tokenizing a prompt takes about a second per MiB.
pub async fn generation(
    s: &AppState,
    endpoint: Endpoint,
    body: Map<String, Value>,
) -> Result<Generation, ApiError> {
    let s = s.clone();
    crate::blocking(move || {
        params::generation(
            endpoint,
            &body,
            s.tokenizer,
            s.template,
            s.context(),
            s.max_token_bytes,
        )
    })
    .await
}

/// The events of a submitted generation, as `(choice, event)`. Dropping it (the handler or
/// stream task ended because the client left) cancels the generation's engine requests, so
/// they leave the queue or the batch at the engine's next step, mid-prefill included.
pub struct Events {
    rx: UnboundedReceiver<(usize, Event)>,
    cancel: Cancel,
}

impl Events {
    pub async fn recv(&mut self) -> Option<(usize, Event)> {
        self.rx.recv().await
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Submits the `n` choices of `g`; their events arrive as `(choice, event)`.
pub fn submit(s: &Server, g: &Generation) -> Result<Events, ApiError> {
    let (tx, rx) = unbounded_channel();
    let deadline = Instant::now() + s.config.request_timeout;
    // Created before the first submission: a failed later choice cancels the earlier ones.
    let events = Events {
        rx,
        cancel: Cancel::new(),
    };
    for i in 0..g.n {
        let mut options = g.options.clone();
        options.sampling.seed = options.sampling.seed.wrapping_add(i as u64);
        let request = Request {
            prompt: g.prompt.clone(),
            options,
            logprobs: g.logprobs,
            deadline: Some(deadline),
            cancel: Some(events.cancel.clone()),
        };
        let tx = tx.clone();
        s.engine
            .submit(request, Box::new(move |e| tx.send((i, e)).is_ok()))?;
    }
    Ok(events)
}

/// The fixed fields of every response and chunk.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

/// One choice as it builds up.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<(u32, TokenLogprob)>,
    finish: Option<&'static str>,
    completion_tokens: usize,
    last_token: Option<Instant>,
}

/// OpenAI's `finish_reason` (a full context is a length limit, as llama.cpp's server says).
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::ContextFull => "length",
    }
}

/// Records the latency metrics of one token of a choice.
fn observe_token(s: &Server, choice: &mut Choice) {
    let now = Instant::now();
    if let Some(last) = choice.last_token.replace(now) {
        s.metrics.inter_token_latency(now - last);
    }
}

fn observe_done(s: &Server, usage: &Usage, count_prompt: bool) {
    s.metrics.time_to_first_token(usage.time_to_first_token);
    s.metrics.tokens(
        if count_prompt { usage.prompt_tokens } else { 0 },
        usage.completion_tokens,
    );
}

fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// Waits for every choice and builds the whole response.
async fn collect(
    s: &Server,
    reply: &Reply,
    g: &Generation,
    mut events: Events,
) -> Result<Value, ApiError> {
    let mut choices: Vec<Choice> = (0..g.n).map(|_| Choice::default()).collect();
    let mut cached = 0;
    let mut open = g.n;
    while open > 0 {
        let Some((i, event)) = events.recv().await else {
            break;
        };
        let c = &mut choices[i];
        match event {
            Event::Token { id, text, logprob } => {
                observe_token(s, c);
                c.text.push_str(&text);
                if let Some(lp) = logprob {
                    c.logprobs.push((id, lp));
                }
            }
            Event::Done {
                reason,
                text,
                usage,
            } => {
                c.text.push_str(&text);
                c.finish = Some(finish_reason(reason));
                c.completion_tokens = usage.completion_tokens;
                cached = cached.max(usage.cached_tokens);
                observe_done(s, &usage, i == 0);
                open -= 1;
            }
            Event::Failed(e) => return Err(e.into()),
        }
    }
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let body: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = g
                .logprobs
                .map(|_| logprobs_json(s, reply.endpoint, &c.logprobs, 0));
            match reply.endpoint {
                Endpoint::Chat => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs,
                    "finish_reason": c.finish,
                }),
                Endpoint::Completions => {
                    let text = if g.echo {
                        format!("{}{}", g.prompt_text, c.text)
                    } else {
                        c.text.clone()
                    };
                    json!({
                        "index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish,
                    })
                }
            }
        })
        .collect();
    Ok(json!({
        "id": reply.id,
        "object": match reply.endpoint {
            Endpoint::Chat => "chat.completion",
            Endpoint::Completions => "text_completion",
        },
        "created": reply.created,
        "model": reply.model,
        "choices": body,
        "usage": usage_json(g.prompt.len(), completion, cached),
    }))
}

/// A token's text as the client sees it (its bytes, lossily as UTF-8).
fn token_text(s: &Server, id: u32) -> String {
    String::from_utf8_lossy(&s.tokenizer.token_bytes(id)).into_owned()
}

/// OpenAI's logprobs object for `tokens`: chat's `{content: [...]}` or completions'
/// parallel lists (`text_offset` counted from `offset`).
fn logprobs_json(
    s: &Server,
    endpoint: Endpoint,
    tokens: &[(u32, TokenLogprob)],
    offset: usize,
) -> Value {
    match endpoint {
        Endpoint::Chat => {
            let entry = |id: u32, lp: f32| json!({"token": token_text(s, id), "logprob": lp, "bytes": s.tokenizer.token_bytes(id)});
            let content: Vec<Value> = tokens
                .iter()
                .map(|(id, lp)| {
                    let mut e = entry(*id, lp.logprob);
                    e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
                    e
                })
                .collect();
            json!({ "content": content })
        }
        Endpoint::Completions => {
            let mut at = offset;
            let mut offsets = Vec::new();
            let mut texts = Vec::new();
            for (id, _) in tokens {
                let t = token_text(s, *id);
                offsets.push(at);
                at += t.len();
                texts.push(t);
            }
            json!({
                "tokens": texts,
                "token_logprobs": tokens.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|(_, lp)| {
                    lp.top.iter().map(|&(t, l)| (token_text(s, t), json!(l))).collect::<serde_json::Map<_, _>>()
                }).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// Streams chunks as server-sent events. A task turns engine events into chunks; when the
/// client goes away the chunk channel closes, the task ends and its engine receiver with it.
fn stream(s: AppState, reply: Reply, g: Generation, mut events: Events) -> impl IntoResponse {
    let (tx, rx) = unbounded_channel::<String>();
    tokio::spawn(async move {
        let send = |v: Value| tx.send(v.to_string()).is_ok();
        let chunk = |i: usize,
                     content: Option<&str>,
                     logprobs: Option<Value>,
                     finish: Option<&str>| {
            let choice = match reply.endpoint {
                Endpoint::Chat => {
                    let delta = content.map_or(json!({}), |c| json!({"content": c}));
                    json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
                }
                Endpoint::Completions => json!({
                    "index": i, "text": content.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
                }),
            };
            reply_chunk(&reply, vec![choice])
        };
        for i in 0..g.n {
            let first = match reply.endpoint {
                Endpoint::Chat => {
                    let choice = json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    reply_chunk(&reply, vec![choice])
                }
                Endpoint::Completions if g.echo => chunk(i, Some(&g.prompt_text), None, None),
                Endpoint::Completions => continue,
            };
            if !send(first) {
                return;
            }
        }
        let mut choices: Vec<Choice> = (0..g.n).map(|_| Choice::default()).collect();
        let (mut completion, mut cached, mut open) = (0, 0, g.n);
        while open > 0 {
            // The client leaving closes the chunk channel: stop waiting for the engine then,
            // not at the next token (a long prefill may be running), and cancel.
            let next = tokio::select! {
                next = events.recv() => next,
                () = tx.closed() => None,
            };
            let Some((i, event)) = next else {
                return;
            };
            let c = &mut choices[i];
            let ok = match event {
                Event::Token { id, text, logprob } => {
                    observe_token(&s, c);
                    let logprobs = logprob.map(|lp| {
                        let at = c.text.len();
                        logprobs_json(&s, reply.endpoint, &[(id, lp)], at)
                    });
                    c.text.push_str(&text);
                    if text.is_empty() && logprobs.is_none() {
                        true
                    } else {
                        send(chunk(i, Some(&text), logprobs, None))
                    }
                }
                Event::Done {
                    reason,
                    text,
                    usage,
                } => {
                    open -= 1;
                    completion += usage.completion_tokens;
                    cached = cached.max(usage.cached_tokens);
                    observe_done(&s, &usage, i == 0);
                    (text.is_empty() || send(chunk(i, Some(&text), None, None)))
                        && send(chunk(i, None, None, Some(finish_reason(reason))))
                }
                Event::Failed(e) => {
                    send(ApiError::from(e).body());
                    return;
                }
            };
            if !ok {
                return;
            }
        }
        if g.include_usage {
            let mut last = reply_chunk(&reply, Vec::new());
            last["usage"] = usage_json(g.prompt.len(), completion, cached);
            send(last);
        }
        tx.send("[DONE]".to_string()).ok();
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, Infallible>(SseEvent::default().data(data)), rx))
    });
    Sse::new(body).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn reply_chunk(reply: &Reply, choices: Vec<Value>) -> Value {
    json!({
        "id": reply.id,
        "object": match reply.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        },
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
    })
}
