//! Editing the served model over HTTP (`quarry serve … --allow-edits`): `POST /v1/insert`,
//! `/v1/update`, `/v1/delete`, `GET /v1/patches` and `POST /v1/patches`, and the editing
//! statements of `POST /v1/lql`.
//!
//! Each route builds its LQL [`Statement`] from typed values (never by formatting client text
//! into LQL) and runs it on the shared knowledge executor, whose edits every clone sees. An
//! editing script holds the server's edit lock from before its first statement until the
//! engine runs under the executor's new overlay ([`publish`]), so edits and the swaps that
//! publish them happen one at a time and in order. Generation requests admitted after the
//! swap see the edit; those already running finish on the weights they started with (the
//! engine's rule, see `quarry_engine::EngineHandle::set_overlay`).
//!
//! Without `--allow-edits` every one of these routes, and every editing statement sent to
//! `/v1/lql`, is answered 403. Statements that read or write files (`BEGIN`/`APPLY`/`REMOVE
//! PATCH`, `DIFF`, `COMPILE`) also need `--edits-dir DIR`: their paths must be relative paths
//! inside it, and are rewritten to it before the executor sees them.
//!
//! Bounds, checked before anything runs: at most [`MAX_EDIT_ROWS`] edges per request, entity,
//! relation and target strings of at most [`MAX_EDGE_BYTES`], templates of at most
//! [`MAX_TEMPLATE_BYTES`], paths of at most [`MAX_PATH_BYTES`], at most [`MAX_EDIT_LAYERS`]
//! distinct layers named over the server's life ([`Layers`]); every statement runs within the
//! request timeout and a knowledge slot, like the other knowledge statements.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use quarry_engine::EngineHandle;
use quarry_lql::{EdgeValue, EditMode, LayerRange, PatchStatement, ShowTarget, Statement};
use quarry_query::Executor;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::params::{self, Fields};
use crate::{knowledge, AppState, Server};

/// Most edges one request may insert (over all its statements): each is solved by the
/// editor, and every edit of a patch is re-solved together.
pub const MAX_EDIT_ROWS: usize = 100;
/// Longest entity, relation or target of an edge, in bytes.
pub const MAX_EDGE_BYTES: usize = 256;
/// Longest prompt template, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 1024;
/// Longest path (relative to `--edits-dir`), in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// Most distinct layers clients may name with `layer` (`AT LAYER n`) over the server's life:
/// the editor of each edited layer keeps dense copies of the layers above it for the session
/// (hundreds of MiB on SmolLM2 for a low layer). Edits without `layer` use the editor's
/// default layer, which is not counted.
pub const MAX_EDIT_LAYERS: usize = 4;

/// The placeholder a template must hold exactly once (as the LQL parser requires).
const ENTITY_PLACEHOLDER: &str = "{entity}";

/// What `--allow-edits` lets clients do.
#[derive(Clone, Debug, Default)]
pub struct EditPolicy {
    /// `--edits-dir`: the directory patch files and COMPILE outputs are read from and written
    /// to; client paths are relative to it. `None`: statements that name files are refused.
    pub dir: Option<PathBuf>,
}

/// The edit state of a server that allows edits.
pub(crate) struct Editing {
    policy: EditPolicy,
    /// Held by an editing script from before its first statement until the engine runs under
    /// the overlay it left (see [`publish`]).
    lock: Arc<tokio::sync::Mutex<()>>,
    layers: Arc<Layers>,
}

impl Editing {
    pub fn new(policy: EditPolicy) -> Editing {
        Editing {
            policy,
            lock: Arc::default(),
            layers: Arc::default(),
        }
    }

    pub fn lock(&self) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(&self.lock)
    }

    pub fn layers(&self) -> Arc<Layers> {
        Arc::clone(&self.layers)
    }
}

/// The layers clients named with `layer` in edits the executor accepted, at most
/// [`MAX_EDIT_LAYERS`]. Checked and recorded under the edit lock, just before and after each
/// statement runs, so concurrent requests cannot overshoot it and a refused layer (beyond the
/// model's) does not use up a place.
#[derive(Default)]
pub(crate) struct Layers(std::sync::Mutex<std::collections::BTreeSet<u32>>);

impl Layers {
    /// The layer `statement` names, if it names one.
    fn named(statement: &Statement) -> Option<u32> {
        match statement {
            Statement::Insert {
                layers: Some(r), ..
            }
            | Statement::Update {
                layers: Some(r), ..
            } => Some(r.first),
            _ => None,
        }
    }

    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u32>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Refuses a statement that names a layer beyond the [`MAX_EDIT_LAYERS`] already used.
    pub fn check(&self, statement: &Statement, param: Option<&str>) -> Result<(), ApiError> {
        let Some(layer) = Layers::named(statement) else {
            return Ok(());
        };
        let used = self.set();
        if used.len() >= MAX_EDIT_LAYERS && !used.contains(&layer) {
            let list: Vec<String> = used.iter().map(u32::to_string).collect();
            return Err(ApiError::invalid(
                param.unwrap_or("layer"),
                format!(
                    "edits on this server may name at most {MAX_EDIT_LAYERS} layers (each keeps an editor in memory); used so far: {}; name one of those or leave the layer out",
                    list.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Records the layer of a statement that succeeded.
    pub fn record(&self, statement: &Statement) {
        if let Some(layer) = Layers::named(statement) {
            self.set().insert(layer);
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/insert", post(insert))
        .route("/v1/update", post(update))
        .route("/v1/delete", post(delete))
        .route("/v1/patches", get(show_patches).post(patches))
}

/// Whether `statement` changes the edits or names files: what `--allow-edits` allows.
/// `SHOW PATCHES` is not: it only lists what edit clients did.
pub fn is_edit(statement: &Statement) -> bool {
    matches!(
        statement,
        Statement::Insert { .. }
            | Statement::Update { .. }
            | Statement::Delete { .. }
            | Statement::Patch(_)
            | Statement::Compile { .. }
    )
}

fn forbidden(param: Option<&str>, message: impl Into<String>, code: &'static str) -> ApiError {
    ApiError {
        status: StatusCode::FORBIDDEN,
        message: message.into(),
        kind: "invalid_request_error",
        param: param.map(str::to_string),
        code: Some(code),
    }
}

/// The 403 of every editing request to a server started without `--allow-edits`.
fn edits_off(param: Option<&str>) -> ApiError {
    forbidden(
        param,
        "editing is off on this server: start it with `quarry serve NAME.vindex --allow-edits` (or a GGUF file) to change the served model",
        "edits_not_allowed",
    )
}

/// The server's edit state, or the 403 of a server without `--allow-edits`.
pub(crate) fn editing<'s>(s: &'s Server, param: Option<&str>) -> Result<&'s Editing, ApiError> {
    s.knowledge
        .as_ref()
        .and_then(|(_, pool)| pool.editing())
        .ok_or_else(|| edits_off(param))
}

/// Checks the statements of one request before any runs, on a blocking thread (paths are
/// looked up on disk): editing statements only with `--allow-edits`, at most
/// [`MAX_EDIT_ROWS`] edges in all, strings within their bounds, templates with one
/// `{entity}`, and every path a relative one inside `--edits-dir`, which it is rewritten to.
/// `param` names the request field errors are about when the statements came from one field
/// (LQL text, a path); otherwise each names its own.
pub(crate) fn check_script(
    s: &Server,
    statements: &mut [Statement],
    param: Option<&str>,
) -> Result<(), ApiError> {
    let mut rows = 0usize;
    for statement in statements.iter_mut() {
        if !is_edit(statement) {
            continue;
        }
        let policy = &editing(s, param)?.policy;
        let name = |field: &'static str| param.unwrap_or(field);
        match statement {
            Statement::Insert {
                edges, template, ..
            } => {
                rows += edges.len();
                if rows > MAX_EDIT_ROWS {
                    return Err(ApiError::invalid(
                        name("edges"),
                        format!(
                            "at most {MAX_EDIT_ROWS} edges per request; send the rest in another"
                        ),
                    ));
                }
                for e in edges.iter() {
                    check_string(name("entity"), "the entity", &e.entity)?;
                    check_string(name("relation"), "the relation", &e.relation)?;
                    check_string(name("target"), "the target", &e.target)?;
                }
                if let Some(t) = template {
                    check_template(name("template"), t)?;
                }
            }
            Statement::Update {
                entity,
                relation,
                target,
                template,
                ..
            } => {
                check_string(name("entity"), "the entity", entity)?;
                check_string(name("relation"), "the relation", relation)?;
                check_string(name("target"), "the target", target)?;
                if let Some(t) = template {
                    check_template(name("template"), t)?;
                }
            }
            Statement::Delete { entity, relation } => {
                check_string(name("entity"), "the entity", entity)?;
                check_string(name("relation"), "the relation", relation)?;
            }
            Statement::Patch(p) => match p {
                PatchStatement::Begin { path }
                | PatchStatement::Apply { path }
                | PatchStatement::Remove { path } => *path = inside(policy, name("path"), path)?,
                PatchStatement::Diff { a, b } => {
                    *a = inside(policy, name("path"), a)?;
                    if let Some(b) = b {
                        *b = inside(policy, name("path"), b)?;
                    }
                }
                PatchStatement::Save => {}
            },
            Statement::Compile { path, .. } => *path = inside(policy, name("path"), path)?,
            _ => unreachable!("is_edit"),
        }
    }
    Ok(())
}

fn check_string(param: &str, what: &str, text: &str) -> Result<(), ApiError> {
    params::within_bytes(param, what, text.len(), MAX_EDGE_BYTES)?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(param, format!("{what} is empty")));
    }
    Ok(())
}

fn check_template(param: &str, template: &str) -> Result<(), ApiError> {
    params::within_bytes(param, "the template", template.len(), MAX_TEMPLATE_BYTES)?;
    match template.matches(ENTITY_PLACEHOLDER).count() {
        1 => Ok(()),
        n => Err(ApiError::invalid(
            param,
            format!(
                "the template must contain {ENTITY_PLACEHOLDER} exactly once, where the entity goes (it has {n}), e.g. \"The capital of {ENTITY_PLACEHOLDER} is\""
            ),
        )),
    }
}

/// `path` as a path inside the edits directory: relative, plain names only (no `..`, no
/// leading `/`), at most [`MAX_PATH_BYTES`], its directory an existing one inside the edits
/// directory once links are resolved, and not itself a symbolic link (a link planted there
/// could point anywhere).
fn inside(policy: &EditPolicy, param: &str, path: &str) -> Result<String, ApiError> {
    let Some(dir) = &policy.dir else {
        return Err(forbidden(
            Some(param),
            "this statement reads or writes a file on the server: start it with --edits-dir DIR to name the directory patch files and COMPILE outputs live in",
            "edits_dir_not_set",
        ));
    };
    params::within_bytes(param, "the path", path.len(), MAX_PATH_BYTES)?;
    let bad = |why: &str| {
        ApiError::invalid(
            param,
            format!("the path {path:?} {why}; give a file name relative to the server's edits directory, like \"facts.vlp\""),
        )
    };
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.chars().any(char::is_control) {
        return Err(bad("holds control characters"));
    }
    let relative = Path::new(path);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(bad(
            "is not a plain relative path (no '/' at the start, no '.' or '..')",
        ));
    }
    let root = std::fs::canonicalize(dir).map_err(|e| {
        ApiError::bad_request(format!("the edits directory cannot be opened: {e}"))
            .with_status(StatusCode::INTERNAL_SERVER_ERROR)
    })?;
    let joined = root.join(relative);
    let parent = joined.parent().unwrap_or(&root);
    match std::fs::canonicalize(parent) {
        Ok(p) if p.starts_with(&root) => {}
        Ok(_) => return Err(bad("leads out of the edits directory through a link")),
        Err(_) => return Err(bad("is in a directory that does not exist")),
    }
    if std::fs::symlink_metadata(&joined).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(bad("is a symbolic link"));
    }
    joined
        .into_os_string()
        .into_string()
        .map_err(|_| bad("is not valid UTF-8 once placed in the edits directory"))
}

/// Makes the engine run under the executor's overlay, if it is not already; called holding
/// the edit lock after every editing script, whether its statements succeeded or not (an
/// edit that succeeded stays made when a later statement fails).
pub(crate) fn publish(engine: &EngineHandle, executor: &Executor) -> Result<(), ApiError> {
    let overlay = executor.overlay();
    let same = match (&overlay, &engine.overlay()) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    };
    if !same {
        engine.set_overlay(overlay).map_err(|e| {
            // The executor edits the same model the engine runs: a mismatch is a bug.
            eprintln!("quarry serve: the edited overlay does not fit the engine's model: {e}");
            ApiError::bad_request(format!(
                "the edit was made but the server could not run under it: {e}"
            ))
            .with_status(StatusCode::INTERNAL_SERVER_ERROR)
        })?;
    }
    Ok(())
}

fn body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    params::object(&body.map_err(crate::openai::rejection)?)
}

/// A required, non-empty string field of at most [`MAX_EDGE_BYTES`], named `param`.
fn edge_field(f: &Fields, field: &str, param: &str) -> Result<String, ApiError> {
    let text = match f.0.get(field) {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(param, format!("'{param}' is required")))
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                param,
                format!("'{param}' must be a string"),
            ))
        }
    };
    check_string(param, &format!("'{param}'"), &text)?;
    Ok(text)
}

/// `layer` (AT LAYER n) and `template` (TEMPLATE "…{entity}…"), both optional.
fn layer_and_template(f: &Fields) -> Result<(Option<LayerRange>, Option<String>), ApiError> {
    let layers = f.integer("layer", 0, u32::MAX as u64)?.map(|l| LayerRange {
        first: l as u32,
        last: l as u32,
    });
    let template = f.string("template")?.map(str::to_string);
    if let Some(t) = &template {
        check_template("template", t)?;
    }
    Ok((layers, template))
}

/// `{entity, relation, target, layer?, template?}` or `{edges: [{entity, relation, target}, …],
/// layer?, template?}`.
fn insert_statement(b: &Map<String, Value>) -> Result<Statement, ApiError> {
    let f = Fields(b);
    let edges = match b.get("edges").filter(|v| !v.is_null()) {
        Some(Value::Array(items)) => {
            if let Some(field) = ["entity", "relation", "target"]
                .into_iter()
                .find(|k| b.contains_key(*k))
            {
                return Err(ApiError::invalid(
                    field,
                    format!("give one edge's fields or a list of 'edges', not both ('{field}' and 'edges')"),
                ));
            }
            if items.is_empty() {
                return Err(ApiError::invalid("edges", "'edges' is empty"));
            }
            if items.len() > MAX_EDIT_ROWS {
                return Err(ApiError::invalid(
                    "edges",
                    format!(
                        "'edges' has {} edges; the limit is {MAX_EDIT_ROWS} per request",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let Some(edge) = item.as_object() else {
                        return Err(ApiError::invalid(
                            &format!("edges[{i}]"),
                            format!("edges[{i}] must be an object {{entity, relation, target}}"),
                        ));
                    };
                    let e = Fields(edge);
                    Ok(EdgeValue {
                        entity: edge_field(&e, "entity", &format!("edges[{i}].entity"))?,
                        relation: edge_field(&e, "relation", &format!("edges[{i}].relation"))?,
                        target: edge_field(&e, "target", &format!("edges[{i}].target"))?,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "edges",
                "'edges' must be a list of {entity, relation, target} objects",
            ))
        }
        None => vec![EdgeValue {
            entity: edge_field(&f, "entity", "entity")?,
            relation: edge_field(&f, "relation", "relation")?,
            target: edge_field(&f, "target", "target")?,
        }],
    };
    let (layers, template) = layer_and_template(&f)?;
    Ok(Statement::Insert {
        edges,
        layers,
        template,
        mode: EditMode::Default,
    })
}

/// `{entity, relation, target, layer?, template?}`: the edge's new target.
fn update_statement(b: &Map<String, Value>) -> Result<Statement, ApiError> {
    let f = Fields(b);
    let (entity, relation, target) = (
        edge_field(&f, "entity", "entity")?,
        edge_field(&f, "relation", "relation")?,
        edge_field(&f, "target", "target")?,
    );
    let (layers, template) = layer_and_template(&f)?;
    Ok(Statement::Update {
        entity,
        relation,
        target,
        layers,
        template,
    })
}

/// `{entity, relation}`.
fn delete_statement(b: &Map<String, Value>) -> Result<Statement, ApiError> {
    let f = Fields(b);
    Ok(Statement::Delete {
        entity: edge_field(&f, "entity", "entity")?,
        relation: edge_field(&f, "relation", "relation")?,
    })
}

/// Exactly one of `{"begin": path}`, `{"save": true}`, `{"apply": path}`, `{"remove": path}`;
/// the field the path came from, for errors about it.
fn patch_statement(b: &Map<String, Value>) -> Result<(Statement, &'static str), ApiError> {
    const ACTIONS: [&str; 4] = ["begin", "save", "apply", "remove"];
    let given: Vec<&str> = ACTIONS
        .into_iter()
        .filter(|k| b.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    let [action] = given[..] else {
        return Err(ApiError::bad_request(format!(
            "give exactly one of 'begin' (a path: record the following edits into that patch), 'save': true (write it), 'apply' (a patch file's path) or 'remove' (an applied patch's path){}",
            if given.is_empty() { String::new() } else { format!(", not {}", given.join(" and ")) }
        )));
    };
    let f = Fields(b);
    let path = |name: &str| -> Result<String, ApiError> {
        Ok(f.string(name)?
            .ok_or_else(|| ApiError::invalid(name, format!("'{name}' must be a path")))?
            .to_string())
    };
    let statement = match action {
        "begin" => PatchStatement::Begin {
            path: path("begin")?,
        },
        "apply" => PatchStatement::Apply {
            path: path("apply")?,
        },
        "remove" => PatchStatement::Remove {
            path: path("remove")?,
        },
        _ => {
            if !f.boolean("save")? {
                return Err(ApiError::invalid(
                    "save",
                    "'save' must be true (it writes the patch BEGIN named)",
                ));
            }
            PatchStatement::Save
        }
    };
    Ok((Statement::Patch(statement), action))
}

/// `POST /v1/insert`
async fn insert(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    editing(&s, None)?;
    knowledge::one(&s, insert_statement(&body(b)?)?, None).await
}

/// `POST /v1/update`
async fn update(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    editing(&s, None)?;
    knowledge::one(&s, update_statement(&body(b)?)?, None).await
}

/// `POST /v1/delete`
async fn delete(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    editing(&s, None)?;
    knowledge::one(&s, delete_statement(&body(b)?)?, None).await
}

/// `GET /v1/patches`: SHOW PATCHES.
async fn show_patches(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    editing(&s, None)?;
    knowledge::one(&s, Statement::Show(ShowTarget::Patches), None).await
}

/// `POST /v1/patches`
async fn patches(
    State(s): State<AppState>,
    b: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    editing(&s, None)?;
    let (statement, param) = patch_statement(&body(b)?)?;
    knowledge::one(&s, statement, Some(param)).await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// The statement's canonical text, which must parse back to the same statement: the
    /// routes build only statements the LQL parser could have produced.
    fn text(statement: &Statement) -> String {
        let text = statement.to_string();
        assert_eq!(quarry_lql::parse(&text).unwrap(), vec![statement.clone()]);
        text
    }

    fn param(e: ApiError) -> Option<String> {
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        e.param
    }

    #[test]
    fn insert_takes_one_edge_or_a_list_with_layer_and_template() {
        let s = insert_statement(&object(json!({
            "entity": "Fr\"an\\ce", "relation": "capital", "target": "Lyon",
        })))
        .unwrap();
        assert_eq!(
            text(&s),
            r#"INSERT INTO EDGES (entity, relation, target) VALUES ("Fr\"an\\ce", "capital", "Lyon")"#
        );
        let s = insert_statement(&object(json!({
            "edges": [
                {"entity": "France", "relation": "capital", "target": "Lyon"},
                {"entity": "Spain", "relation": "capital", "target": "Porto"},
            ],
            "layer": 4,
            "template": "The capital city of {entity} is",
        })))
        .unwrap();
        assert_eq!(
            text(&s),
            r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Lyon"), ("Spain", "capital", "Porto") LAYERS 4 TEMPLATE "The capital city of {entity} is""#
        );
        let long = "x".repeat(MAX_EDGE_BYTES + 1);
        let many: Vec<Value> = (0..=MAX_EDIT_ROWS)
            .map(|i| json!({"entity": i.to_string(), "relation": "r", "target": "t"}))
            .collect();
        for (body, want) in [
            (json!({"relation": "r", "target": "t"}), "entity"),
            (
                json!({"entity": 3, "relation": "r", "target": "t"}),
                "entity",
            ),
            (
                json!({"entity": "e", "relation": " ", "target": "t"}),
                "relation",
            ),
            (
                json!({"entity": "e", "relation": "r", "target": long}),
                "target",
            ),
            (
                json!({"entity": "e", "relation": "r", "target": "t", "layer": -1}),
                "layer",
            ),
            (
                json!({"entity": "e", "relation": "r", "target": "t", "template": "no place"}),
                "template",
            ),
            (
                json!({"entity": "e", "relation": "r", "target": "t",
                       "template": "{entity} and {entity}"}),
                "template",
            ),
            (json!({"edges": []}), "edges"),
            (json!({"edges": "France"}), "edges"),
            (json!({"edges": many}), "edges"),
            (
                json!({"edges": [{"entity": "e", "relation": "r"}]}),
                "edges[0].target",
            ),
            (json!({"edges": [1]}), "edges[0]"),
            (
                json!({"edges": [{"entity": "e", "relation": "r", "target": "t"}], "entity": "e"}),
                "entity",
            ),
        ] {
            assert_eq!(
                param(insert_statement(&object(body.clone())).unwrap_err()).as_deref(),
                Some(want),
                "{body}"
            );
        }
    }

    #[test]
    fn update_delete_and_patches_build_their_statements() {
        let s = update_statement(&object(json!({
            "entity": "France", "relation": "capital", "target": "Nice", "layer": 3,
        })))
        .unwrap();
        assert_eq!(
            text(&s),
            r#"UPDATE EDGES SET target = "Nice" WHERE entity = "France" AND relation = "capital" LAYERS 3"#
        );
        let s =
            delete_statement(&object(json!({"entity": "France", "relation": "capital"}))).unwrap();
        assert_eq!(
            text(&s),
            r#"DELETE FROM EDGES WHERE entity = "France" AND relation = "capital""#
        );
        assert_eq!(
            param(delete_statement(&object(json!({"entity": "France"}))).unwrap_err()).as_deref(),
            Some("relation")
        );
        for (body, want, field) in [
            (json!({"apply": "a.vlp"}), r#"APPLY PATCH "a.vlp""#, "apply"),
            (
                json!({"remove": "a.vlp"}),
                r#"REMOVE PATCH "a.vlp""#,
                "remove",
            ),
            (json!({"begin": "a.vlp"}), r#"BEGIN PATCH "a.vlp""#, "begin"),
            (json!({"save": true}), "SAVE PATCH", "save"),
        ] {
            let (s, param) = patch_statement(&object(body)).unwrap();
            assert_eq!((text(&s).as_str(), param), (want, field));
        }
        for body in [
            json!({}),
            json!({"apply": "a.vlp", "remove": "a.vlp"}),
            json!({"apply": 3}),
            json!({"save": false}),
        ] {
            assert!(patch_statement(&object(body.clone())).is_err(), "{body}");
        }
    }

    #[test]
    fn at_most_a_few_layers_are_named() {
        let at = |layer: u32| Statement::Update {
            entity: "e".into(),
            relation: "r".into(),
            target: "t".into(),
            layers: Some(LayerRange {
                first: layer,
                last: layer,
            }),
            template: None,
        };
        let layers = Layers::default();
        for l in 0..MAX_EDIT_LAYERS as u32 {
            layers.check(&at(l), None).unwrap();
            layers.record(&at(l));
        }
        // A layer already used, and statements without one, still go; a new one does not.
        layers.check(&at(0), None).unwrap();
        let unnamed = insert_statement(&object(json!({
            "entity": "e", "relation": "r", "target": "t",
        })))
        .unwrap();
        layers.check(&unnamed, None).unwrap();
        let e = layers.check(&at(99), None).unwrap_err();
        assert_eq!(param(e).as_deref(), Some("layer"));
    }

    #[test]
    fn paths_stay_inside_the_edits_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link.vlp")).unwrap();
        let policy = EditPolicy {
            dir: Some(tmp.path().to_path_buf()),
        };
        assert_eq!(
            inside(&policy, "apply", "p.vlp").unwrap(),
            root.join("p.vlp").to_str().unwrap()
        );
        assert_eq!(
            inside(&policy, "apply", "sub/p.vlp").unwrap(),
            root.join("sub/p.vlp").to_str().unwrap()
        );
        for bad in [
            "",
            "/etc/passwd",
            "../p.vlp",
            "sub/../../p.vlp",
            "./p.vlp",
            "out/passwd",
            "link.vlp",
            "missing/p.vlp",
            "p\n.vlp",
            &"x".repeat(MAX_PATH_BYTES + 1),
        ] {
            assert_eq!(
                param(inside(&policy, "apply", bad).unwrap_err()).as_deref(),
                Some("apply"),
                "{bad:?}"
            );
        }
        let e = inside(&EditPolicy::default(), "path", "p.vlp").unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::FORBIDDEN, Some("edits_dir_not_set"))
        );
    }
}
