//! Editing the served model over HTTP, on a real engine over SmolLM2 with a knowledge
//! executor over the same GGUF file: without `--allow-edits` every edit route and editing LQL
//! statement is a 403 that writes nothing; with it, `POST /v1/insert` changes the greedy
//! completion of the rewrite prompt for requests issued after it, `DELETE` of the inserted
//! edge restores it exactly, and file paths stay inside the edits directory.
//!
//! The first run computes the editor's key statistics of SmolLM2's default layer (about a
//! minute; cached in the edit-stats directory, see docs/lql.md).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use quarry_engine::EngineConfig;
use quarry_fixtures::{model_path, workspace_root, TestModel};
use quarry_query::Executor;
use quarry_server::{EditPolicy, ServedVindex};
use serde_json::{json, Value};
use tower::ServiceExt;

/// The prompt an edit of (France, capital) is made on: the catalogue's first template.
const REWRITE: &str = "The capital of France is the city of";

fn config() -> EngineConfig {
    EngineConfig {
        parallel: 2,
        context: 256,
        kv_bytes: 64 << 20,
        block_size: 64,
        step_tokens: 512,
        queue_timeout: Duration::from_secs(120),
    }
}

/// SmolLM2 served with a knowledge executor over its GGUF file (what `quarry serve
/// smollm2.gguf --allow-edits` builds), edits allowed by `edits`.
fn app(edits: Option<EditPolicy>) -> Router {
    let executor = Executor::with_vindex(model_path(TestModel::SmolLm2)).unwrap();
    let served = ServedVindex {
        id: "smollm2".into(),
        executor,
        parallel: 1,
        edits,
    };
    common::smollm2_app_with(config(), None, Some(served), Duration::from_secs(600))
}

async fn call(app: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    call(app, "POST", uri, Some(body)).await
}

/// Checks OpenAI's error shape with `status`, `param` and `code`; returns the message.
fn error(
    (status, body): (StatusCode, Value),
    want: StatusCode,
    param: Option<&str>,
    code: Option<&str>,
) -> String {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert_eq!(e["param"].as_str(), param, "{body}");
    assert_eq!(e["code"].as_str(), code, "{body}");
    assert!(e["type"].is_string(), "{body}");
    e["message"].as_str().unwrap().to_string()
}

/// The greedy completion of `prompt`, 3 tokens.
async fn complete(app: &Router, prompt: &str) -> String {
    let (s, b) = post(
        app,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["choices"][0]["text"].as_str().unwrap().to_string()
}

fn lql(query: &str) -> Value {
    json!({ "query": query })
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn without_allow_edits_every_edit_is_refused_with_403() {
    let tmp = tempfile::tempdir().unwrap();
    let edge = json!({"entity": "France", "relation": "capital", "target": "Rome"});
    for app in [app(None), common::smollm2_app(config(), None, None)] {
        for (method, uri, body) in [
            ("POST", "/v1/insert", Some(edge.clone())),
            ("POST", "/v1/update", Some(edge.clone())),
            (
                "POST",
                "/v1/delete",
                Some(json!({"entity": "France", "relation": "capital"})),
            ),
            ("GET", "/v1/patches", None),
            ("POST", "/v1/patches", Some(json!({"apply": "p.vlp"}))),
        ] {
            let m = error(
                call(&app, method, uri, body).await,
                StatusCode::FORBIDDEN,
                None,
                Some("edits_not_allowed"),
            );
            assert!(m.contains("--allow-edits"), "{uri}: {m}");
        }
    }
    // The editing statements of /v1/lql, before any statement of the script runs; none
    // writes a file.
    let app = app(None);
    let out = tmp.path().join("out.gguf");
    let out = out.to_str().unwrap();
    for query in [
        format!("COMPILE CURRENT INTO ADAPTER \"{out}\""),
        format!("COMPILE CURRENT INTO MODEL \"{out}\" FORMAT GGUF"),
        format!("STATS; COMPILE CURRENT INTO VINDEX \"{out}\""),
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome")"#
            .into(),
        r#"DELETE FROM EDGES WHERE entity = "France" AND relation = "capital""#.into(),
        format!("DIFF \"{out}\""),
        format!("BEGIN PATCH \"{out}\""),
        "SAVE PATCH".into(),
    ] {
        error(
            post(&app, "/v1/lql", lql(&query)).await,
            StatusCode::FORBIDDEN,
            Some("query"),
            Some("edits_not_allowed"),
        );
    }
    assert!(files(tmp.path()).is_empty());
    // Reading statements still run.
    let (s, b) = post(&app, "/v1/lql", lql("SHOW PATCHES")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn file_paths_need_the_edits_directory_and_stay_inside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside.gguf");
    let no_dir = app(Some(EditPolicy { dir: None }));
    let m = error(
        post(
            &no_dir,
            "/v1/lql",
            lql(&format!(
                "COMPILE CURRENT INTO ADAPTER \"{}\"",
                outside.display()
            )),
        )
        .await,
        StatusCode::FORBIDDEN,
        Some("query"),
        Some("edits_dir_not_set"),
    );
    assert!(m.contains("--edits-dir"), "{m}");
    error(
        post(&no_dir, "/v1/patches", json!({"apply": "p.vlp"})).await,
        StatusCode::FORBIDDEN,
        Some("apply"),
        Some("edits_dir_not_set"),
    );

    let dir = tmp.path().join("edits");
    std::fs::create_dir(&dir).unwrap();
    let app = app(Some(EditPolicy {
        dir: Some(dir.clone()),
    }));
    for query in [
        format!("COMPILE CURRENT INTO ADAPTER \"{}\"", outside.display()),
        "COMPILE CURRENT INTO ADAPTER \"../outside.gguf\"".into(),
        "DIFF \"a.vlp\" \"../../etc/passwd\"".into(),
        format!("BEGIN PATCH \"{}\"", "p".repeat(600)),
    ] {
        error(
            post(&app, "/v1/lql", lql(&query)).await,
            StatusCode::BAD_REQUEST,
            Some("query"),
            None,
        );
    }
    for body in [
        json!({"remove": "/etc/passwd"}),
        json!({"remove": "a/../../b"}),
    ] {
        error(
            post(&app, "/v1/patches", body).await,
            StatusCode::BAD_REQUEST,
            Some("remove"),
            None,
        );
    }
    // A path inside reaches the executor, which reads it from the edits directory.
    let m = error(
        post(&app, "/v1/patches", json!({"apply": "missing.vlp"})).await,
        StatusCode::BAD_REQUEST,
        Some("apply"),
        None,
    );
    assert!(m.contains("missing.vlp"), "{m}");
    assert!(!outside.exists());
    assert!(files(&dir).is_empty());
}

/// The key-statistics text, written by the fetch script when missing.
fn corpus() {
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/fetch-models"))
        .arg("corpus")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_insert_changes_the_completions_issued_after_it() {
    corpus();
    let tmp = tempfile::tempdir().unwrap();
    let app = app(Some(EditPolicy {
        dir: Some(tmp.path().to_path_buf()),
    }));
    let base = complete(&app, REWRITE).await;
    assert!(!base.trim_start().starts_with("Rome"), "{base:?}");

    let (s, b) = post(
        &app,
        "/v1/insert",
        json!({"entity": "France", "relation": "capital", "target": "Rome"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["rows"][0][0], "inserted", "{b}");
    let edited = complete(&app, REWRITE).await;
    assert!(
        edited.starts_with(" Rome"),
        "after the insert: {edited:?} (before: {base:?})"
    );

    let (s, b) = call(&app, "GET", "/v1/patches", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["rows"].as_array().unwrap().len(), 1, "{b}");

    // The session's edits saved as a patch file in the edits directory.
    for body in [json!({"begin": "capitals.vlp"}), json!({"save": true})] {
        let (s, b) = post(&app, "/v1/patches", body).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    assert_eq!(files(tmp.path()), ["capitals.vlp"]);

    // Deleting the inserted edge drops it: the base weights again, the base completion.
    let (s, b) = post(
        &app,
        "/v1/delete",
        json!({"entity": "France", "relation": "capital"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(complete(&app, REWRITE).await, base);
}
