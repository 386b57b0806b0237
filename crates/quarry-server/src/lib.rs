//! `quarry serve`: an OpenAI-compatible HTTP server over the batching engine, plus WebSocket
//! streaming and, when a vindex is served, the knowledge API (LQL over HTTP).
//!
//! The server owns no model state: every generation is a [`quarry_engine::Request`] handed to
//! the engine thread through an [`EngineHandle`], whose events come back over a channel. A
//! handler that is dropped (the client hung up) drops its receiver, and the engine cancels the
//! sequence at its next token — so a disconnect stops generation within one step and frees its
//! KV blocks. Errors have OpenAI's shape ([`error::ApiError`]).
//!
//! Edits: the weights generation runs on are the base model plus the engine's current FFN
//! overlay, which [`EngineHandle::set_overlay`] swaps atomically (handlers reach it as
//! `state.engine`; `quarry serve` holds a clone of the handle too); the edit routes set it to
//! the knowledge executor's overlay after every editing script. Each generation request
//! reads it once, when the engine admits it, and keeps it to its end: requests admitted after
//! a swap see the new overlay, those in flight finish on the one they started with, and the
//! prefix cache never hands one overlay's KV blocks to another.
//!
//! Shutdown ([`serve`]): once its signal completes the server stops accepting connections,
//! lets in-flight HTTP requests finish, and tells WebSocket sessions (which outlive their HTTP
//! request) to send their clients an error per running generation and a close frame.
//!
//! Resource bounds (see [`Limits`], docs/serve.md): at most `max_connections` connections
//! (WebSocket sessions included) are served at once, further ones wait in the listen backlog;
//! a client must send a request's headers within `header_read_timeout` of connecting or of its
//! previous response (so idle keep-alive connections close too), and its body within
//! `body_read_timeout` of the headers. POST routes take only `Content-Type: application/json`
//! (415 otherwise), so a browser cannot post to them cross-site without a CORS preflight.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics`, `GET /v1/stream`
//! (WebSocket) and, with a vindex, `GET /v1/describe`, `GET /v1/walk`, `POST /v1/select`,
//! `POST /v1/infer`, `POST /v1/trace`, `POST /v1/lql`, `GET /v1/stats`, `GET /v1/relations`;
//! with edits allowed ([`ServedVindex::edits`]; 403 otherwise), `POST /v1/insert`,
//! `POST /v1/update`, `POST /v1/delete`, `GET /v1/patches`, `POST /v1/patches`.

mod edits;
mod error;
mod knowledge;
mod metrics;
mod openai;
mod params;
mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use quarry_engine::EngineHandle;
use quarry_query::Executor;
use quarry_tokenize::{ChatTemplate, Tokenizer};
use serde_json::json;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

pub use edits::{EditPolicy, MAX_EDGE_BYTES, MAX_EDIT_ROWS, MAX_PATH_BYTES, MAX_TEMPLATE_BYTES};
pub use error::ApiError;

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 8 << 20;

/// Longest text `POST /tokenize` takes.
pub const MAX_TOKENIZE_BYTES: usize = 1 << 20;

/// How long [`serve`] waits, after its last HTTP request, for WebSocket sessions to close.
const WEBSOCKET_GRACE: Duration = Duration::from_secs(5);

/// What a server serves and how.
pub struct ServerConfig {
    /// The model's id in `/v1/models` and responses (the file's stem).
    pub model_id: String,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// A request that has not finished after this long fails (504, or an error event);
    /// knowledge statements are interrupted then too.
    pub request_timeout: Duration,
    /// A knowledge request still waiting for a free executor after this long gets a 503.
    pub queue_timeout: Duration,
    /// A request body not received in full this long after its headers gets a 408.
    pub body_read_timeout: Duration,
    /// The vindex behind the knowledge routes.
    pub vindex: Option<ServedVindex>,
}

/// A vindex (or, for editing, a model file) served with the knowledge routes.
pub struct ServedVindex {
    /// Its id in `/v1/models` (the directory's name; a model file's is the model's id, and
    /// is listed once).
    pub id: String,
    /// An executor with the vindex or model file open: each running statement gets a clone,
    /// all of them over the same open (memory-mapped) vindex and sharing its edits.
    pub executor: Executor,
    /// Knowledge statements that may run at once (at least one).
    pub parallel: usize,
    /// `Some` with `--allow-edits`: the edit routes and editing statements are allowed, and
    /// each edit's overlay is pushed to the engine. The executor must have the model the
    /// engine runs open.
    pub edits: Option<EditPolicy>,
}

/// Bounds on connections that [`serve_with`] enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once (WebSocket sessions included); more wait in the backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from connecting or from its previous
    /// response.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// `--max-connections` by default: room for a few thousand idle or slow clients (each holds a
/// socket and a few KiB until the header-read timeout closes it) before new ones must wait.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// `--header-timeout` by default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// [`ServerConfig::body_read_timeout`] of `quarry serve`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything handlers share.
pub struct Server {
    engine: EngineHandle,
    tokenizer: &'static Tokenizer,
    template: &'static ChatTemplate,
    config: ServerConfig,
    knowledge: Option<(String, knowledge::Pool)>,
    metrics: metrics::Metrics,
    /// The longest token's text, in bytes: text longer than the context times this cannot
    /// fit, and is refused without being tokenized.
    max_token_bytes: usize,
}

type AppState = Arc<Server>;

impl Server {
    fn context(&self) -> usize {
        self.engine.config().context
    }

    /// Refuses a `model` field that names something this server does not serve.
    fn check_model(
        &self,
        body: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ApiError> {
        match params::Fields(body).string("model")? {
            None => Ok(()),
            Some(m) if m == self.config.model_id => Ok(()),
            Some(m) if self.knowledge.as_ref().is_some_and(|(id, _)| id == m) => Ok(()),
            Some(m) => Err(ApiError::invalid(
                "model",
                format!(
                    "the model '{m}' does not exist here; this server serves '{}'",
                    self.config.model_id
                ),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found")),
        }
    }
}

/// The application: every route, authentication, request metrics and the body limit.
pub fn router(
    engine: EngineHandle,
    tokenizer: &'static Tokenizer,
    template: &'static ChatTemplate,
    mut config: ServerConfig,
) -> Router {
    let knowledge = config
        .vindex
        .take()
        .map(|v| (v.id, knowledge::Pool::new(v.executor, v.parallel, v.edits)));
    let max_token_bytes = (0..tokenizer.vocab_size() as u32)
        .map(|id| tokenizer.token_bytes(id).len())
        .max()
        .unwrap_or(1);
    let state = Arc::new(Server {
        engine,
        tokenizer,
        template,
        config,
        knowledge,
        metrics: metrics::Metrics::default(),
        max_token_bytes,
    });
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(health))
        .route("/metrics", get(metrics_page))
        .route("/v1/stream", get(ws::stream))
        .merge(knowledge::routes())
        .merge(edits::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::bad_request("this route does not take that method")
                .with_status(StatusCode::METHOD_NOT_ALLOWED)
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// What [`serve`] gives every request, for WebSocket sessions: `signal` turns true when the
/// server shuts down, and every session holds `_alive` until it has closed, so that `serve`
/// can wait for them.
#[derive(Clone)]
struct Closing {
    signal: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

/// A connection's slot among [`Limits::max_connections`], given to each of its requests: a
/// WebSocket session keeps it, so that the upgraded socket still counts.
#[derive(Clone)]
struct ConnectionSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// [`serve_with`] with the default [`Limits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, Limits::default(), shutdown).await
}

/// Serves `app` on `listener` (HTTP/1.1, with upgrades for WebSockets) within `limits` until
/// `shutdown` completes, then lets in-flight requests finish and WebSocket sessions close
/// (for at most a few seconds more).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (close, signal) = watch::channel(false);
    let (alive, mut sessions) = mpsc::channel(1);
    let app = app.layer(Extension(Closing {
        signal: signal.clone(),
        _alive: alive,
    }));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Each connection task holds a clone; `recv` returns once they are all gone.
    let (connections, mut drained) = mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A slot first: at the limit, new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: wait a
                    // moment rather than spin, as axum does.
                    if !is_connection_error(&e) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        stream.set_nodelay(true).ok();
        let slot = ConnectionSlot(Arc::new(slot));
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request.extensions_mut().insert(slot.clone());
            app.clone().oneshot(request.map(Body::new))
        });
        let mut signal = signal.clone();
        let done = connections.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades());
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    changed = signal.wait_for(|&c| c), if !closing => {
                        closing = true;
                        if changed.is_ok() {
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(done);
        });
    }
    drop(listener);
    close.send_replace(true);
    drop(connections);
    drained.recv().await;
    // The router and its copy of `_alive` are gone; this ends when the last session's is.
    drop(app);
    tokio::time::timeout(WEBSOCKET_GRACE, sessions.recv())
        .await
        .ok();
    Ok(())
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Checks the API key, the content type and the time the body takes to arrive, and counts
/// every request by route and status.
async fn track(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let response = match &s.config.api_key {
        Some(key) if route != "/health" && !authorized(&request, key) => ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong API key: send 'Authorization: Bearer <key>'".into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
        .into_response(),
        _ if request.method() == Method::POST => match read_json_body(&s, request).await {
            Ok(request) => next.run(request).await,
            Err(e) => e.into_response(),
        },
        _ => next.run(request).await,
    };
    s.metrics.request(&route, response.status().as_u16());
    response
}

/// A POST's body, which must be JSON (every POST route takes JSON) and arrive in full within
/// the body-read timeout; the request is given back with the body read.
async fn read_json_body(s: &Server, request: Request) -> Result<Request, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let is_json = content_type.as_deref().is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!(
                "the body must be JSON sent with 'Content-Type: application/json', not {}",
                content_type.map_or("no Content-Type".into(), |t| format!("{t:?}"))
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unsupported_media_type"),
        });
    }
    let (parts, body) = request.into_parts();
    let limit = http_body_util::Limited::new(body, BODY_LIMIT);
    let timeout = s.config.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, http_body_util::BodyExt::collect(limit)).await {
        Err(_) => {
            return Err(ApiError::bad_request(format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ))
            .with_status(StatusCode::REQUEST_TIMEOUT)
            .with_code("timeout"))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::bad_request(format!(
                "the request body is larger than the limit of {BODY_LIMIT} bytes"
            ))
            .with_status(StatusCode::PAYLOAD_TOO_LARGE))
        }
        Ok(Err(e)) => {
            return Err(ApiError::bad_request(format!(
                "could not read the request body: {e}"
            )))
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Runs `f` on tokio's blocking threads, off the async workers that answer every client:
/// for tokenizing (about a second per MiB of text) and knowledge statements.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        // A panic's text is for the server's log, not for clients.
        eprintln!("quarry serve: a request's task failed: {e}");
        Err(
            ApiError::bad_request("the server failed on this request (see its log)")
                .with_status(StatusCode::INTERNAL_SERVER_ERROR),
        )
    })
}

fn authorized(request: &Request, key: &str) -> bool {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given.trim() == key)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(s): State<AppState>) -> Json<serde_json::Value> {
    let mut data = vec![json!({
        "id": s.config.model_id, "object": "model", "created": openai::now(), "owned_by": "quarry",
    })];
    if let Some((id, _)) = s
        .knowledge
        .as_ref()
        .filter(|(id, _)| *id != s.config.model_id)
    {
        data.push(
            json!({"id": id, "object": "model", "created": openai::now(), "owned_by": "quarry"}),
        );
    }
    Json(json!({"object": "list", "data": data}))
}

async fn metrics_page(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.engine.stats()),
    )
}

/// `{"content": text, "add_special": bool}` → `{"tokens": [...]}` (llama.cpp's shape).
async fn tokenize(
    State(s): State<AppState>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = params::object(&body.map_err(openai::rejection)?)?;
    let f = params::Fields(&body);
    let content = f
        .string("content")?
        .ok_or_else(|| {
            ApiError::invalid("content", "'content' (the text to tokenize) is required")
        })?
        .to_string();
    params::within_bytes("content", "'content'", content.len(), MAX_TOKENIZE_BYTES)?;
    let add_special = f.boolean("add_special")?;
    // Off the async workers: a MiB takes about a second.
    let tokenizer = s.tokenizer;
    let tokens = blocking(move || Ok(tokenizer.encode(&content, add_special, true))).await?;
    Ok(Json(json!({ "tokens": tokens })))
}

/// `{"tokens": [...]}` → `{"content": text}`.
async fn detokenize(
    State(s): State<AppState>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = params::object(&body.map_err(openai::rejection)?)?;
    let Some(serde_json::Value::Array(items)) = body.get("tokens") else {
        return Err(ApiError::invalid(
            "tokens",
            "'tokens' must be a list of token ids",
        ));
    };
    let vocab = s.tokenizer.vocab_size();
    let ids = items
        .iter()
        .map(|v| {
            v.as_u64()
                .filter(|&id| (id as usize) < vocab)
                .map(|id| id as u32)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tokens",
                        format!("{v} is not a token id of this model (0..{vocab})"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "content": s.tokenizer.decode(&ids) })))
}
