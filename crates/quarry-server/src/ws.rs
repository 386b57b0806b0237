//! `GET /v1/stream`: generation over a WebSocket.
//!
//! The client sends JSON text frames:
//! - `{"type": "generate", "id": any, "prompt": "…"}` (or `"messages": [...]` for a chat), with
//!   the sampling fields of the HTTP API; the server answers one
//!   `{"type": "token", "id", "token", "text"}` frame per token, then
//!   `{"type": "done", "id", "finish_reason", "text", "usage", "timings"}` (`text` is any
//!   held-back tail);
//! - `{"type": "cancel", "id": any}` stops that generation (`{"type": "cancelled", "id"}`).
//!
//! Errors come as `{"type": "error", "id", "message", "param"}`. Several generations may run at
//! once on one socket; closing the socket cancels them all (and frees their KV blocks at the
//! engine's next step). A client's close frame is answered with a close frame carrying its
//! code. When the server shuts down, each running generation gets an error frame and the
//! socket a close frame (1001, going away).

use std::collections::HashMap;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use quarry_engine::Event;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::error::ApiError;
use crate::params::{self, Endpoint};
use crate::{openai, AppState, Closing, ConnectionSlot};

pub async fn stream(
    State(s): State<AppState>,
    closing: Option<Extension<Closing>>,
    slot: Option<Extension<ConnectionSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.on_upgrade(move |socket| async move {
        // The upgraded socket keeps its connection's slot for as long as the session lasts.
        let _slot = slot;
        session(s, socket, closing.map(|Extension(c)| c)).await;
    })
}

/// The running generations of a socket by their id's JSON text: the id and the task.
type Running = HashMap<String, (Value, AbortHandle)>;

/// Serves one socket until the client closes it or, when `closing` says so, the server
/// shuts down (outside [`crate::serve`], as under tests' `oneshot`, there is no `closing`).
/// A client's close frame is answered with a close frame (RFC 6455 §5.5.1) carrying its code.
async fn session(s: AppState, socket: WebSocket, closing: Option<Closing>) {
    let (mut to_client, mut from_client) = socket.split();
    let (out, mut outgoing) = unbounded_channel::<Value>();
    // Sent when the client's close frame arrives; dropped unsent when the session ends otherwise.
    let (farewell, mut client_closed) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        // Until the session has said whether the client sent a close frame.
        let mut undecided = true;
        loop {
            tokio::select! {
                biased;
                closed = &mut client_closed, if undecided => {
                    undecided = false;
                    if closed.is_ok() {
                        // The WebSocket layer queued the answer (the client's code echoed)
                        // when it read the close frame; closing our side sends it.
                        to_client.close().await.ok();
                        return;
                    }
                    // The session ended without a close frame: send what is queued.
                }
                frame = outgoing.recv() => match frame {
                    Some(frame) => {
                        let text = Message::Text(frame.to_string().into());
                        if to_client.send(text).await.is_ok() {
                            continue;
                        }
                        // Refused once the client's close frame has been read: answer it. If
                        // the connection broke, the session drops `farewell` unsent.
                        if undecided && (&mut client_closed).await.is_ok() {
                            to_client.close().await.ok();
                        }
                        return;
                    }
                    None => break,
                },
            }
        }
        // Every sender is gone: the session ended because the server is shutting down.
        let frame = CloseFrame {
            code: close_code::AWAY,
            reason: "the server is shutting down".into(),
        };
        to_client.send(Message::Close(Some(frame))).await.ok();
    });
    let mut running = Running::new();
    let mut farewell = Some(farewell);
    let shutting_down = loop {
        tokio::select! {
            message = from_client.next() => match message {
                Some(Ok(Message::Text(text))) => handle(&s, &text, &out, &mut running),
                Some(Ok(Message::Close(_))) => {
                    if let Some(f) = farewell.take() {
                        f.send(()).ok();
                    }
                    break false;
                }
                Some(Err(_)) | None => break false,
                Some(Ok(_)) => {}
            },
            () = shutdown(closing.as_ref()) => break true,
        }
    };
    for (id, task) in running.into_values() {
        task.abort();
        if shutting_down && !task.is_finished() {
            out.send(json!({"type": "error", "id": id, "message": "the server is shutting down"}))
                .ok();
        }
    }
    let answer_close = farewell.is_none();
    // A writer whose send failed waits on `client_closed`: dropping the sender unblocks it.
    drop(farewell);
    if shutting_down {
        // The writer sends what is queued, then the close frame, once the aborted generation
        // tasks have dropped their senders too.
        drop(out);
        writer.await.ok();
    } else if answer_close {
        // Answer the client's close frame, then let the connection go; a client that stops
        // reading does not keep the writer (and the socket) alive past the grace.
        let abort = writer.abort_handle();
        if tokio::time::timeout(CLOSE_REPLY_GRACE, writer)
            .await
            .is_err()
        {
            abort.abort();
        }
    } else {
        writer.abort();
    }
}

/// How long answering a client's close frame may take.
const CLOSE_REPLY_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Completes when the server starts shutting down; never without a [`Closing`].
async fn shutdown(closing: Option<&Closing>) {
    match closing {
        Some(c) => {
            // An error means the signal's sender is gone: the server is gone too.
            c.signal.clone().wait_for(|&closing| closing).await.ok();
        }
        None => std::future::pending().await,
    }
}

fn handle(s: &AppState, text: &str, out: &UnboundedSender<Value>, running: &mut Running) {
    running.retain(|_, (_, task)| !task.is_finished());
    let error = |id: &Value, e: ApiError| {
        out.send(json!({"type": "error", "id": id, "message": e.message, "param": e.param}))
            .ok();
    };
    let body = match params::object(text.as_bytes()) {
        Ok(b) => b,
        Err(e) => return error(&Value::Null, e),
    };
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    let key = id.to_string();
    let kind = body.get("type").and_then(Value::as_str).map(str::to_string);
    match kind.as_deref() {
        Some("generate") => {
            if running.contains_key(&key) {
                return error(
                    &id,
                    ApiError::invalid("id", format!("a generation with id {key} is running")),
                );
            }
            let endpoint = if body.contains_key("messages") {
                Endpoint::Chat
            } else {
                Endpoint::Completions
            };
            let started = std::time::Instant::now();
            let (s, out, frame_id) = (s.clone(), out.clone(), id.clone());
            let task = tokio::spawn(async move {
                let error = |e: ApiError| {
                    out.send(json!({"type": "error", "id": frame_id, "message": e.message, "param": e.param}))
                        .ok();
                };
                let g = match openai::generation(&s, endpoint, body).await {
                    Ok(g) if g.n == 1 => g,
                    Ok(_) => {
                        return error(ApiError::invalid("n", "one choice per generation here"))
                    }
                    Err(e) => return error(e),
                };
                let mut events = match openai::submit(&s, &g) {
                    Ok(rx) => rx,
                    Err(e) => return error(e),
                };
                while let Some((_, event)) = events.recv().await {
                    let frame = match event {
                        Event::Token { id, text, .. } => {
                            json!({"type": "token", "id": frame_id, "token": id, "text": text})
                        }
                        Event::Done {
                            reason,
                            text,
                            usage,
                        } => {
                            let total = started.elapsed().as_secs_f64();
                            let decode =
                                (total - usage.time_to_first_token.as_secs_f64()).max(1e-9);
                            out.send(json!({
                                "type": "done", "id": frame_id,
                                "finish_reason": openai::finish_reason(reason),
                                "text": text,
                                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                          "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                                          "cached_tokens": usage.cached_tokens},
                                "timings": {
                                    "ttft_ms": usage.time_to_first_token.as_secs_f64() * 1e3,
                                    "total_ms": total * 1e3,
                                    "tokens_per_second": usage.completion_tokens.saturating_sub(1) as f64 / decode,
                                },
                            }))
                            .ok();
                            return;
                        }
                        Event::Failed(e) => return error(ApiError::from(e)),
                    };
                    if out.send(frame).is_err() {
                        return;
                    }
                }
            });
            running.insert(key, (id, task.abort_handle()));
        }
        Some("cancel") => match running.remove(&key) {
            Some((_, task)) => {
                task.abort();
                out.send(json!({"type": "cancelled", "id": id})).ok();
            }
            None => error(
                &id,
                ApiError::invalid("id", format!("no running generation has id {key}")),
            ),
        },
        _ => error(
            &id,
            ApiError::invalid("type", "'type' must be \"generate\" or \"cancel\""),
        ),
    }
}
