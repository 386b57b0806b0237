//! The knowledge API of a served vindex. Each parameter route builds one typed LQL
//! [`Statement`] from its parameters (so there is no quoting to get wrong, and every bad value
//! is refused naming its parameter); `POST /v1/select` and `POST /v1/lql` parse the LQL text
//! they are given. Answers are the typed result sets of `quarry lql --json` (`columns`,
//! `rows`, `notes`). LQL syntax errors are 400s carrying the parser's line:column message.
//!
//! Bounds: every prompt, entity and query is checked before anything runs — its length in
//! bytes and, for text the model reads, in tokens against the served context (400 naming the
//! field); the token counts are taken off the async workers. Statements run in blocking tasks,
//! at most [`Pool`]'s size at once, each on its own executor over the same open (memory-mapped)
//! vindex; a request that waits longer than the queue timeout for a slot gets a 503. A statement still running at the request timeout is interrupted and
//! answered with a 504, and one whose client hangs up is interrupted too: the forward passes
//! check their [`Interrupt`] between chunks of [`quarry_query::CHUNK_TOKENS`] tokens, and the
//! executor is busy until the work has actually stopped.
//!
//! The executor is shared by every client and keeps state between statements, so statements
//! that would change or reveal the server's files are refused: `USE` (it would swap the
//! served vindex for everyone) and `SHOW MODELS` (it lists the server's working directory).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use quarry_lql::{DescribeMethod, DescribeScope, Detail, LayerRange, ShowTarget, Statement};
use quarry_query::{Executor, Interrupt};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;

use crate::edits::{self, EditPolicy, Editing};
use crate::error::ApiError;
use crate::params::{self, Fields};
use crate::{openai, AppState, Server};

/// Most results `INFER` may ask for.
const MAX_INFER_TOP: u64 = 1000;
/// Longest prompt of INFER, TRACE and WALK, in bytes (its tokens are bounded by the context).
pub const MAX_PROMPT_BYTES: usize = 16 << 10;
/// Longest DESCRIBE entity, in bytes and in tokens.
pub const MAX_ENTITY_BYTES: usize = 256;
pub const MAX_ENTITY_TOKENS: usize = 16;
/// Longest TRACE target (`for`), in bytes (it must be one token anyway).
pub const MAX_TARGET_BYTES: usize = 256;
/// Longest LQL text of `/v1/select` and `/v1/lql`, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 << 10;
/// Most statements in one `/v1/lql` script.
pub const MAX_STATEMENTS: usize = 16;

/// The served vindex's executor and the slots of statements that may run at once; each running
/// statement holds a slot and its own clone of the executor (all over the same open vindex,
/// sharing its edits).
pub struct Pool {
    executor: Executor,
    slots: Arc<Semaphore>,
    size: usize,
    /// With `--allow-edits`.
    editing: Option<Editing>,
}

impl Pool {
    pub fn new(executor: Executor, size: usize, edits: Option<EditPolicy>) -> Pool {
        let size = size.max(1);
        Pool {
            executor,
            slots: Arc::new(Semaphore::new(size)),
            size,
            editing: edits.map(Editing::new),
        }
    }

    pub(crate) fn editing(&self) -> Option<&Editing> {
        self.editing.as_ref()
    }
}

/// Interrupts the statement when dropped: the handler's future is dropped when its client
/// hangs up.
struct InterruptOnDrop(Interrupt);

impl Drop for InterruptOnDrop {
    fn drop(&mut self) {
        self.0.interrupt();
    }
}

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

/// Runs `statements` on the vindex, stopping at the first error; one result set each. An
/// execution error is a 400 naming `param` (the route's input that led to it). Waits at most
/// the queue timeout for an executor (503), and interrupts the statements at the request
/// timeout (504) or when the caller's future is dropped.
///
/// A script with an editing statement (checked by [`edits::check_script`]) first takes the
/// edit lock, within the same queue timeout, and holds it until its work has stopped and the
/// engine runs under the overlay it left ([`edits::publish`]) — whether it succeeded, failed
/// or was interrupted, since the statements before the one that failed stay done.
async fn run(
    s: &AppState,
    statements: Vec<Statement>,
    param: Option<&'static str>,
) -> Result<Vec<Value>, ApiError> {
    let Some((_, pool)) = &s.knowledge else {
        return Err(ApiError::not_found(
            "this server serves a model, not a vindex: start `quarry serve NAME.vindex` for the knowledge routes",
        ));
    };
    let started = Instant::now();
    let deadline = started + s.config.request_timeout;
    let wait_until = started + s.config.queue_timeout.min(s.config.request_timeout);
    let busy = |what: String| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "the server is busy: {what} within {} s (--queue-timeout); retry later",
            s.config
                .queue_timeout
                .min(s.config.request_timeout)
                .as_secs_f64()
        ),
        kind: "server_error",
        param: None,
        code: Some("server_busy"),
    };
    let edit_lock = match pool.editing() {
        Some(e) if statements.iter().any(edits::is_edit) => {
            match tokio::time::timeout_at(wait_until.into(), e.lock().lock_owned()).await {
                Ok(guard) => Some(guard),
                Err(_) => return Err(busy("another edit did not finish".into())),
            }
        }
        _ => None,
    };
    let Ok(Ok(permit)) =
        tokio::time::timeout_at(wait_until.into(), pool.slots.clone().acquire_owned()).await
    else {
        return Err(busy(format!(
            "{} knowledge statement(s) running, none finished",
            pool.size
        )));
    };
    let interrupt = Interrupt::new();
    let _stop_on_drop = InterruptOnDrop(interrupt.clone());
    let (mut executor, stop) = (pool.executor.clone(), interrupt.clone());
    let engine = s.engine.clone();
    let layers = pool.editing().map(Editing::layers);
    let task = crate::blocking(move || {
        // The slot is free again only once the work has stopped.
        let _permit = permit;
        let mut sets = Vec::with_capacity(statements.len());
        let mut result = Ok(());
        for statement in &statements {
            if stop.is_interrupted() {
                result = Err(ApiError::bad_request(quarry_query::INTERRUPTED));
                break;
            }
            // Under the edit lock (a statement naming a layer is an edit).
            if let Some(layers) = &layers {
                if let Err(e) = layers.check(statement, param) {
                    result = Err(e);
                    break;
                }
            }
            match executor.execute_interruptible(statement, &stop) {
                Ok(set) => {
                    if let Some(layers) = &layers {
                        layers.record(statement);
                    }
                    sets.push(set.to_json())
                }
                Err(e) => {
                    result = Err(ApiError {
                        param: param.map(str::to_string),
                        ..ApiError::bad_request(e.to_string())
                    });
                    break;
                }
            }
        }
        if let Some(_held) = edit_lock {
            edits::publish(&engine, &executor)?;
        }
        result.map(|()| sets)
    });
    match tokio::time::timeout_at(deadline.into(), task).await {
        Ok(result) => result,
        Err(_) => {
            interrupt.interrupt();
            Err(timeout_error(s.config.request_timeout))
        }
    }
}

fn timeout_error(timeout: Duration) -> ApiError {
    ApiError {
        status: StatusCode::GATEWAY_TIMEOUT,
        message: format!(
            "the statement did not finish within {} s (--timeout) and was stopped",
            timeout.as_secs_f64()
        ),
        kind: "server_error",
        param: None,
        code: Some("timeout"),
    }
}

/// Refuses text longer than `max_bytes`, or, when `max_tokens` is given, longer than that
/// many tokens of the served model, naming `param`.
fn check_text(
    s: &Server,
    param: &str,
    what: &str,
    text: &str,
    max_bytes: usize,
    max_tokens: Option<usize>,
) -> Result<(), ApiError> {
    params::within_bytes(param, &format!("the {what}"), text.len(), max_bytes)?;
    if let Some(max) = max_tokens {
        let tokens = s.tokenizer.encode(text, true, true).len();
        if tokens > max {
            return Err(ApiError::invalid(
                param,
                format!("the {what} is {tokens} tokens; the limit is {max}"),
            )
            .with_code("context_length_exceeded"));
        }
    }
    Ok(())
}

/// Checks the sizes of what `statement` would run on, before it runs: prompts within the
/// served context, entities short. `param` names the request field when the statement came
/// from LQL text (`query`); otherwise each field names itself.
fn check_statement(
    s: &Server,
    statement: &Statement,
    param: Option<&'static str>,
) -> Result<(), ApiError> {
    let context = s.context().saturating_sub(1);
    match statement {
        Statement::Describe { entity, .. } => check_text(
            s,
            param.unwrap_or("entity"),
            "entity",
            entity,
            MAX_ENTITY_BYTES,
            Some(MAX_ENTITY_TOKENS),
        ),
        Statement::Walk { prompt, .. } => check_text(
            s,
            param.unwrap_or("prompt"),
            "prompt",
            prompt,
            MAX_PROMPT_BYTES,
            Some(context),
        ),
        Statement::Infer { prompt, .. } => check_text(
            s,
            param.unwrap_or("prompt"),
            "prompt",
            prompt,
            MAX_PROMPT_BYTES,
            Some(context),
        ),
        Statement::Trace { prompt, target, .. } => {
            check_text(
                s,
                param.unwrap_or("prompt"),
                "prompt",
                prompt,
                MAX_PROMPT_BYTES,
                Some(context),
            )?;
            match target {
                Some(t) => check_text(
                    s,
                    param.unwrap_or("for"),
                    "target",
                    t,
                    MAX_TARGET_BYTES,
                    None,
                ),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Checks `statements` (editing ones with [`edits::check_script`]), then runs them.
pub(crate) async fn checked_run(
    s: &AppState,
    mut statements: Vec<Statement>,
    param: Option<&'static str>,
) -> Result<Vec<Value>, ApiError> {
    let statements = if s.knowledge.is_some() {
        // Measuring prompts in tokens tokenizes up to MAX_STATEMENTS × MAX_PROMPT_BYTES, and
        // edit paths are looked up on disk: off the async workers.
        let server = s.clone();
        crate::blocking(move || {
            edits::check_script(&server, &mut statements, param)?;
            for statement in &statements {
                check_statement(&server, statement, param)?;
            }
            Ok(statements)
        })
        .await?
    } else {
        statements
    };
    run(s, statements, param).await
}

/// Runs one statement and answers its result set.
pub(crate) async fn one(
    s: &AppState,
    statement: Statement,
    param: Option<&'static str>,
) -> Result<Json<Value>, ApiError> {
    let mut sets = checked_run(s, vec![statement], param).await?;
    Ok(Json(sets.pop().unwrap_or(Value::Null)))
}

/// Parses the LQL text of `query`, refusing statements that are not for remote clients.
fn parse_query(query: &str) -> Result<Vec<Statement>, ApiError> {
    params::within_bytes("query", "the query", query.len(), MAX_QUERY_BYTES)?;
    let statements =
        quarry_lql::parse(query).map_err(|e| ApiError::invalid("query", e.to_string()))?;
    if statements.len() > MAX_STATEMENTS {
        return Err(ApiError::invalid(
            "query",
            format!(
                "the script has {} statements; the limit is {MAX_STATEMENTS} per request",
                statements.len()
            ),
        ));
    }
    for statement in &statements {
        match statement {
            Statement::Use { .. } => {
                return Err(ApiError::invalid(
                    "query",
                    "USE is not available over HTTP: this server serves one vindex to every client",
                ))
            }
            Statement::Show(ShowTarget::Models) => {
                return Err(ApiError::invalid(
                    "query",
                    "SHOW MODELS is not available over HTTP (it lists the server's directory); GET /v1/models lists what is served",
                ))
            }
            _ => {}
        }
    }
    Ok(statements)
}

fn required<'q>(q: &'q HashMap<String, String>, name: &str) -> Result<&'q str, ApiError> {
    q.get(name)
        .map(String::as_str)
        .ok_or_else(|| ApiError::invalid(name, format!("'{name}' is required")))
}

fn query_u32(q: &HashMap<String, String>, name: &str) -> Result<Option<u32>, ApiError> {
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

fn query_bool(q: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(v) => Err(ApiError::invalid(
            name,
            format!("'{name}' must be true or false, not {v:?}"),
        )),
    }
}

/// `?entity=France[&layer=N | &scope=all|syntax|knowledge|output][&verbose=true]
/// [&method=answers|features|raw][&relations_only=true]` (`&raw=true`, the older spelling, is
/// `method=raw`)
fn describe_statement(q: &HashMap<String, String>) -> Result<Statement, ApiError> {
    let entity = required(q, "entity")?.to_string();
    let scope = match (query_u32(q, "layer")?, q.get("scope").map(String::as_str)) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "scope",
                "give 'layer' or 'scope', not both",
            ))
        }
        (Some(layer), None) => DescribeScope::AtLayer(layer),
        (None, None) => DescribeScope::Default,
        (None, Some("all")) => DescribeScope::AllLayers,
        (None, Some("syntax")) => DescribeScope::Syntax,
        (None, Some("knowledge")) => DescribeScope::Knowledge,
        (None, Some("output")) => DescribeScope::Output,
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "scope",
                "'scope' must be all, syntax, knowledge or output",
            ))
        }
    };
    let detail = if query_bool(q, "verbose")? {
        Detail::Verbose
    } else {
        Detail::Normal
    };
    let method = match (q.get("method").map(String::as_str), query_bool(q, "raw")?) {
        (None, false) | (Some("answers"), false) => DescribeMethod::Answers,
        (Some("features"), false) => DescribeMethod::Features,
        (None, true) | (Some("raw"), _) => DescribeMethod::Raw,
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "method",
                "'method' must be answers, features or raw",
            ))
        }
    };
    Ok(Statement::Describe {
        entity,
        scope,
        detail,
        relations_only: query_bool(q, "relations_only")?,
        method,
    })
}

/// `?prompt=…[&top=N][&layers=a-b or n]`
fn walk_statement(q: &HashMap<String, String>) -> Result<Statement, ApiError> {
    let prompt = required(q, "prompt")?.to_string();
    let layers = q
        .get("layers")
        .map(|text| {
            let (first, last) = text.split_once('-').unwrap_or((text, text));
            match (first.parse(), last.parse()) {
                (Ok(first), Ok(last)) if first <= last => Ok(LayerRange { first, last }),
                _ => Err(ApiError::invalid(
                    "layers",
                    format!(
                        "'layers' must be a layer range like 6-14 (first ≤ last), not {text:?}"
                    ),
                )),
            }
        })
        .transpose()?;
    Ok(Statement::Walk {
        prompt,
        top: query_u32(q, "top")?,
        layers,
        explain: false,
    })
}

/// `{"prompt", "top"?}` (top 10 by default).
fn infer_statement(body: &Map<String, Value>) -> Result<Statement, ApiError> {
    let f = Fields(body);
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "'prompt' is required"))?;
    let top = f.integer("top", 1, MAX_INFER_TOP)?.unwrap_or(10);
    Ok(Statement::Infer {
        prompt: prompt.to_string(),
        top: Some(top as u32),
        explain: false,
        layers: None,
    })
}

/// `{"prompt", "for"?, "decompose"?}`
fn trace_statement(body: &Map<String, Value>) -> Result<Statement, ApiError> {
    let f = Fields(body);
    let prompt = f
        .string("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "'prompt' is required"))?;
    Ok(Statement::Trace {
        prompt: prompt.to_string(),
        target: f.string("for")?.map(str::to_string),
        decompose: f.boolean("decompose")?,
        layers: None,
    })
}

/// `{"query": "SELECT …"}`: exactly one SELECT statement.
fn select_statement(body: &Map<String, Value>) -> Result<Statement, ApiError> {
    let query = Fields(body)
        .string("query")?
        .ok_or_else(|| ApiError::invalid("query", "'query' (a SELECT statement) is required"))?;
    match <[Statement; 1]>::try_from(parse_query(query)?) {
        Ok([statement @ Statement::Select(_)]) => Ok(statement),
        _ => Err(ApiError::invalid(
            "query",
            "'query' must be one SELECT statement (POST /v1/lql runs any script)",
        )),
    }
}

/// `{"query": "LQL; LQL"}`
fn script(body: &Map<String, Value>) -> Result<Vec<Statement>, ApiError> {
    let query = Fields(body)
        .string("query")?
        .ok_or_else(|| ApiError::invalid("query", "'query' (LQL text) is required"))?;
    parse_query(query)
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    params::object(&body.map_err(openai::rejection)?)
}

/// `GET /v1/describe`
async fn describe(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    one(&s, describe_statement(&q)?, None).await
}

/// `GET /v1/walk`
async fn walk(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    one(&s, walk_statement(&q)?, None).await
}

async fn stats(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    one(&s, Statement::Stats, None).await
}

/// `GET /v1/relations[?features=true][&layer=N][&examples=true]`: the catalogue relations
/// the model answers, or (`features`, `layer`) the clusters of feature edges.
async fn relations(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let target = ShowTarget::Relations {
        features: query_bool(&q, "features")?,
        layer: query_u32(&q, "layer")?,
        examples: query_bool(&q, "examples")?,
    };
    one(&s, Statement::Show(target), None).await
}

/// `POST /v1/select`
async fn select(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    one(&s, select_statement(&body(b)?)?, Some("query")).await
}

/// `POST /v1/infer`
async fn infer(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    one(&s, infer_statement(&body(b)?)?, None).await
}

/// `POST /v1/trace`
async fn trace(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    one(&s, trace_statement(&body(b)?)?, None).await
}

/// `POST /v1/lql` → `{"results": [result set, …]}`
async fn lql(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let statements = script(&body(b)?)?;
    Ok(Json(
        json!({ "results": checked_run(&s, statements, Some("query")).await? }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// The statement's canonical text, which must parse back to the same statement.
    fn text(statement: &Statement) -> String {
        let text = statement.to_string();
        assert_eq!(quarry_lql::parse(&text).unwrap(), vec![statement.clone()]);
        text
    }

    fn param(e: ApiError) -> Option<String> {
        e.param
    }

    #[test]
    fn describe_reads_entity_scope_detail_and_raw() {
        let s = describe_statement(&query(&[("entity", "Fr\"an\\ce\n")])).unwrap();
        assert_eq!(text(&s), r#"DESCRIBE "Fr\"an\\ce\n""#);
        let s = describe_statement(&query(&[("entity", "France"), ("layer", "3")])).unwrap();
        assert_eq!(text(&s), r#"DESCRIBE "France" AT LAYER 3"#);
        let s = describe_statement(&query(&[
            ("entity", "France"),
            ("scope", "all"),
            ("verbose", "true"),
            ("raw", "1"),
        ]))
        .unwrap();
        assert_eq!(text(&s), r#"DESCRIBE "France" ALL LAYERS VERBOSE RAW"#);
        let s =
            describe_statement(&query(&[("entity", "France"), ("method", "features")])).unwrap();
        assert_eq!(text(&s), r#"DESCRIBE "France" VIA FEATURES"#);
        for (q, want) in [
            (query(&[]), "entity"),
            (query(&[("entity", "x"), ("layer", "-1")]), "layer"),
            (query(&[("entity", "x"), ("scope", "some")]), "scope"),
            (
                query(&[("entity", "x"), ("scope", "all"), ("layer", "1")]),
                "scope",
            ),
            (query(&[("entity", "x"), ("raw", "yes")]), "raw"),
            (query(&[("entity", "x"), ("method", "tokens")]), "method"),
            (
                query(&[("entity", "x"), ("method", "features"), ("raw", "1")]),
                "method",
            ),
        ] {
            assert_eq!(
                param(describe_statement(&q).unwrap_err()).as_deref(),
                Some(want)
            );
        }
    }

    #[test]
    fn walk_reads_top_and_layer_ranges() {
        let s = walk_statement(&query(&[
            ("prompt", "Paris"),
            ("top", "5"),
            ("layers", "2-4"),
        ]))
        .unwrap();
        assert_eq!(text(&s), r#"WALK "Paris" TOP 5 LAYERS 2-4"#);
        let s = walk_statement(&query(&[("prompt", "Paris"), ("layers", "3")])).unwrap();
        assert_eq!(text(&s), r#"WALK "Paris" LAYERS 3"#);
        for (q, want) in [
            (query(&[("top", "5")]), "prompt"),
            (query(&[("prompt", "x"), ("top", "many")]), "top"),
            (query(&[("prompt", "x"), ("top", "99999999999")]), "top"),
            (query(&[("prompt", "x"), ("layers", "4-2")]), "layers"),
            (query(&[("prompt", "x"), ("layers", "a-b")]), "layers"),
        ] {
            assert_eq!(
                param(walk_statement(&q).unwrap_err()).as_deref(),
                Some(want)
            );
        }
    }

    #[test]
    fn infer_and_trace_read_their_bodies() {
        let s = infer_statement(&object(json!({"prompt": "The capital is"}))).unwrap();
        assert_eq!(text(&s), r#"INFER "The capital is" TOP 10"#);
        let e = infer_statement(&object(json!({"prompt": "x", "top": 0}))).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("top"));
        let e = infer_statement(&object(json!({"top": 3}))).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("prompt"));
        let s = trace_statement(&object(
            json!({"prompt": "The capital is", "for": " Paris", "decompose": true}),
        ))
        .unwrap();
        assert_eq!(text(&s), r#"TRACE "The capital is" FOR " Paris" DECOMPOSE"#);
        let e = trace_statement(&object(json!({"prompt": "x", "for": 3}))).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("for"));
    }

    #[test]
    fn select_takes_exactly_one_select() {
        let s =
            select_statement(&object(json!({"query": "select * from features limit 2"}))).unwrap();
        assert!(matches!(s, Statement::Select(_)));
        for query in [
            "STATS",
            "SELECT * FROM FEATURES LIMIT 1; SELECT * FROM FEATURES LIMIT 1",
            r#"SELECT * FROM FEATURES LIMIT 1; USE "/elsewhere""#,
            "",
        ] {
            let e = select_statement(&object(json!({ "query": query }))).unwrap_err();
            assert_eq!(param(e).as_deref(), Some("query"), "{query}");
        }
    }

    #[test]
    fn scripts_refuse_use_and_show_models_and_report_positions() {
        assert_eq!(
            script(&object(json!({"query": "STATS; SHOW LAYERS;"})))
                .unwrap()
                .len(),
            2
        );
        for query in [r#"STATS; USE "/etc""#, "SHOW MODELS"] {
            let e = script(&object(json!({ "query": query }))).unwrap_err();
            assert!(
                e.message.contains("not available over HTTP"),
                "{}",
                e.message
            );
        }
        let e = script(&object(json!({"query": "DESCRIBE France"}))).unwrap_err();
        assert!(e.message.starts_with("line 1, column 10"), "{}", e.message);
        let e = script(&object(json!({"statements": "STATS"}))).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("query"));
    }
}
