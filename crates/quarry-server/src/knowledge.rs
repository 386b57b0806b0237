//! The knowledge API of a served vindex: each route builds one LQL statement from its
//! parameters (strings quoted as LQL literals, numbers checked) and runs it on the vindex's
//! [`quarry_query::Executor`] in a blocking task; `POST /v1/lql` runs any script. Answers are
//! the typed result sets of `quarry lql --json` (`columns`, `rows`, `notes`). LQL errors are
//! 400s carrying the parser's line:column message.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::params::{self, Fields};
use crate::{openai, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/describe", get(describe))
        .route("/v1/walk", get(walk))
        .route("/v1/stats", get(stats))
        .route("/v1/relations", get(relations))
        .route("/v1/select", post(select))
        .route("/v1/infer", post(infer))
        .route("/v1/trace", post(trace))
        .route("/v1/lql", post(lql))
}

/// An LQL string literal.
fn quoted(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// Runs `script` on the vindex; one result set per statement.
async fn run(s: &AppState, script: String) -> Result<Vec<Value>, ApiError> {
    let Some((_, executor)) = &s.knowledge else {
        return Err(ApiError::not_found(
            "this server serves a model, not a vindex: start `quarry serve NAME.vindex` for the knowledge routes",
        ));
    };
    let executor = executor.clone();
    tokio::task::spawn_blocking(move || {
        let mut executor = executor.lock().unwrap_or_else(|e| e.into_inner());
        executor
            .run_script(&script)
            .map(|sets| sets.iter().map(|r| r.to_json()).collect())
            .map_err(|e| ApiError::invalid("query", e.to_string()))
    })
    .await
    .map_err(|e| {
        ApiError::bad_request(format!("the query task failed: {e}"))
            .with_status(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    })?
}

/// Runs one statement and answers its result set.
async fn one(s: &AppState, statement: String) -> Result<Json<Value>, ApiError> {
    let mut sets = run(s, statement).await?;
    Ok(Json(sets.pop().unwrap_or(Value::Null)))
}

fn required<'q>(q: &'q HashMap<String, String>, name: &str) -> Result<&'q str, ApiError> {
    q.get(name)
        .map(String::as_str)
        .ok_or_else(|| ApiError::invalid(name, format!("'{name}' is required")))
}

fn query_number(q: &HashMap<String, String>, name: &str) -> Result<Option<usize>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse().map_err(|_| {
                ApiError::invalid(
                    name,
                    format!("'{name}' must be a non-negative integer, not {v:?}"),
                )
            })
        })
        .transpose()
}

/// `GET /v1/describe?entity=France[&layer=N | &scope=all|syntax|knowledge|output][&raw=true][&verbose=true]`
async fn describe(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let entity = required(&q, "entity")?;
    let mut statement = format!("DESCRIBE {}", quoted(entity));
    if let Some(layer) = query_number(&q, "layer")? {
        statement += &format!(" AT LAYER {layer}");
    } else if let Some(scope) = q.get("scope") {
        statement += match scope.as_str() {
            "all" => " ALL LAYERS",
            "syntax" => " SYNTAX",
            "knowledge" => " KNOWLEDGE",
            "output" => " OUTPUT",
            _ => {
                return Err(ApiError::invalid(
                    "scope",
                    "'scope' must be all, syntax, knowledge or output",
                ))
            }
        };
    }
    if q.get("verbose").is_some_and(|v| v == "true") {
        statement += " VERBOSE";
    }
    if q.get("raw").is_some_and(|v| v == "true") {
        statement += " RAW";
    }
    one(&s, statement).await
}

/// `GET /v1/walk?prompt=…[&top=N][&layers=a-b]`
async fn walk(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let prompt = required(&q, "prompt")?;
    let mut statement = format!("WALK {}", quoted(prompt));
    if let Some(top) = query_number(&q, "top")? {
        statement += &format!(" TOP {top}");
    }
    if let Some(layers) = q.get("layers") {
        let ok = layers
            .split_once('-')
            .is_some_and(|(a, b)| a.parse::<usize>().is_ok() && b.parse::<usize>().is_ok());
        if !ok {
            return Err(ApiError::invalid("layers", "'layers' must look like 6-14"));
        }
        statement += &format!(" LAYERS {layers}");
    }
    one(&s, statement).await
}

async fn stats(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    one(&s, "STATS".into()).await
}

async fn relations(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    one(&s, "SHOW RELATIONS".into()).await
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<serde_json::Map<String, Value>, ApiError> {
    params::object(&body.map_err(openai::rejection)?)
}

/// `POST /v1/select {"query": "SELECT …"}`
async fn select(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b = body(b)?;
    let query = Fields(&b)
        .string("query")?
        .ok_or_else(|| ApiError::invalid("query", "'query' (a SELECT statement) is required"))?;
    if !query
        .trim_start()
        .to_ascii_uppercase()
        .starts_with("SELECT")
    {
        return Err(ApiError::invalid(
            "query",
            "'query' must be a SELECT statement",
        ));
    }
    one(&s, query.to_string()).await
}

/// `POST /v1/infer {"prompt", "top"}`
async fn infer(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b = body(b)?;
    let f = Fields(&b);
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "'prompt' is required"))?;
    let top = f.integer("top", 1, 1000)?.unwrap_or(10);
    one(&s, format!("INFER {} TOP {top}", quoted(prompt))).await
}

/// `POST /v1/trace {"prompt", "for"?, "decompose"?}`
async fn trace(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b = body(b)?;
    let f = Fields(&b);
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "'prompt' is required"))?;
    let mut statement = format!("TRACE {}", quoted(prompt));
    if let Some(token) = f.string("for")? {
        statement += &format!(" FOR {}", quoted(token));
    }
    if f.boolean("decompose")? {
        statement += " DECOMPOSE";
    }
    one(&s, statement).await
}

/// `POST /v1/lql {"query": "LQL; LQL"}` → `{"results": [result set, …]}`
async fn lql(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b = body(b)?;
    let query = Fields(&b)
        .string("query")?
        .ok_or_else(|| ApiError::invalid("query", "'query' (LQL text) is required"))?;
    Ok(Json(
        json!({ "results": run(&s, query.to_string()).await? }),
    ))
}
