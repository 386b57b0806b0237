//! `quarry serve`: an OpenAI-compatible HTTP server over the batching engine, plus WebSocket
//! streaming and, when a vindex is served, the knowledge API (LQL over HTTP).
//!
//! The server owns no model state: every generation is a [`quarry_engine::Request`] handed to
//! the engine thread through an [`EngineHandle`], whose events come back over a channel. A
//! handler that is dropped (the client hung up) drops its receiver, and the engine cancels the
//! sequence at its next token — so a disconnect stops generation within one step and frees its
//! KV blocks. Errors have OpenAI's shape ([`error::ApiError`]).
//!
//! Shutdown ([`serve`]): once its signal completes the server stops accepting connections,
//! lets in-flight HTTP requests finish, and tells WebSocket sessions (which outlive their HTTP
//! request) to send their clients an error per running generation and a close frame.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics`, `GET /v1/stream`
//! (WebSocket) and, with a vindex, `GET /v1/describe`, `GET /v1/walk`, `POST /v1/select`,
//! `POST /v1/infer`, `POST /v1/trace`, `POST /v1/lql`, `GET /v1/stats`, `GET /v1/relations`.

mod error;
mod knowledge;
mod metrics;
mod openai;
mod params;
mod ws;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use quarry_engine::EngineHandle;
use quarry_query::Executor;
use quarry_tokenize::{ChatTemplate, Tokenizer};
use serde_json::json;
use tokio::sync::{mpsc, watch};

pub use error::ApiError;

/// Largest request body accepted (413 beyond).
pub const BODY_LIMIT: usize = 8 << 20;

/// How long [`serve`] waits, after its last HTTP request, for WebSocket sessions to close.
const WEBSOCKET_GRACE: Duration = Duration::from_secs(5);

/// What a server serves and how.
pub struct ServerConfig {
    /// The model's id in `/v1/models` and responses (the file's stem).
    pub model_id: String,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// A request that has not finished after this long fails (504, or an error event).
    pub request_timeout: Duration,
    /// The vindex behind the knowledge routes, and its id.
    pub vindex: Option<(String, Executor)>,
}

/// Everything handlers share.
pub struct Server {
    engine: EngineHandle,
    tokenizer: &'static Tokenizer,
    template: &'static ChatTemplate,
    config: ServerConfig,
    knowledge: Option<(String, Arc<Mutex<Executor>>)>,
    metrics: metrics::Metrics,
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
        .map(|(id, executor)| (id, Arc::new(Mutex::new(executor))));
    let state = Arc::new(Server {
        engine,
        tokenizer,
        template,
        config,
        knowledge,
        metrics: metrics::Metrics::default(),
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

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish
/// and WebSocket sessions close (for at most a few seconds more).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (close, signal) = watch::channel(false);
    let (alive, mut sessions) = mpsc::channel(1);
    let app = app.layer(Extension(Closing {
        signal,
        _alive: alive,
    }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            close.send_replace(true);
        })
        .await?;
    // The router and its copy of `_alive` are gone; this ends when the last session's is.
    tokio::time::timeout(WEBSOCKET_GRACE, sessions.recv())
        .await
        .ok();
    Ok(())
}

/// Checks the API key and counts every request by route and status.
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
        _ => next.run(request).await,
    };
    s.metrics.request(&route, response.status().as_u16());
    response
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
    if let Some((id, _)) = &s.knowledge {
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
    let content = f.string("content")?.ok_or_else(|| {
        ApiError::invalid("content", "'content' (the text to tokenize) is required")
    })?;
    let tokens = s.tokenizer.encode(content, f.boolean("add_special")?, true);
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
