//! Bad input gets OpenAI-shaped errors with the right status and the field at fault, on a
//! real engine over SmolLM2: malformed JSON, wrong types, unknown model, max_tokens < 1, n
//! too large, a prompt longer than the context, a body over the limit, a missing API key, a
//! full server, unknown routes and methods, knowledge routes without a vindex. Plus the small routes, and
//! the knowledge routes on a SmolLM2 vindex.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use quarry_engine::EngineConfig;
use quarry_fixtures::{model_path, TestModel};
use quarry_query::Executor;
use quarry_server::ServedVindex;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The application over a fresh engine (its thread ends when the router is dropped).
fn app(api_key: Option<&str>, context: usize, queue_timeout: Duration) -> Router {
    app_with(api_key, context, queue_timeout, None)
}

fn app_with(
    api_key: Option<&str>,
    context: usize,
    queue_timeout: Duration,
    vindex: Option<ServedVindex>,
) -> Router {
    let config = EngineConfig {
        parallel: 1,
        context,
        kv_bytes: 64 << 20,
        block_size: 64,
        step_tokens: 512,
        queue_timeout,
    };
    common::smollm2_app(config, api_key, vindex)
}

fn default_app() -> Router {
    app(None, 256, Duration::from_secs(30))
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    body: Body,
    key: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(body).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    call(app, "POST", uri, Body::from(body.to_string()), None).await
}

/// Checks OpenAI's error shape; returns the message.
fn error(status: StatusCode, body: &Value, want: StatusCode, param: Option<&str>) -> String {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    assert_eq!(e["param"].as_str(), param, "{body}");
    e["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn malformed_and_mistyped_bodies_are_400s_naming_the_field() {
    let app = default_app();
    let (s, b) = call(
        &app,
        "POST",
        "/v1/completions",
        Body::from("{\"prompt\": "),
        None,
    )
    .await;
    assert!(error(s, &b, StatusCode::BAD_REQUEST, None).contains("not valid JSON"));
    let (s, b) = post(&app, "/v1/completions", json!(["a list"])).await;
    assert!(error(s, &b, StatusCode::BAD_REQUEST, None).contains("JSON object"));
    let cases = [
        ("/v1/completions", json!({"prompt": 5}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": "hot"}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "temperature": 3}),
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": -3}),
            "max_tokens",
        ),
        ("/v1/completions", json!({"prompt": "x", "n": 17}), "n"),
        (
            "/v1/completions",
            json!({"prompt": "x", "stop": [1]}),
            "stop",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "stream": "yes"}),
            "stream",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 99999999]}),
            "prompt",
        ),
        ("/v1/completions", json!({"prompt": ["a", "b"]}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 21}),
            "logprobs",
        ),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            "messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 3}]}),
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
            "top_logprobs",
        ),
        ("/tokenize", json!({"text": "x"}), "content"),
        ("/detokenize", json!({"tokens": [-1]}), "tokens"),
    ];
    for (uri, body, param) in cases {
        let (s, b) = post(&app, uri, body.clone()).await;
        error(s, &b, StatusCode::BAD_REQUEST, Some(param));
    }
}

#[tokio::test]
async fn unknown_models_long_prompts_and_big_bodies() {
    let app = default_app();
    let (s, b) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "x", "model": "gpt-4"}),
    )
    .await;
    error(s, &b, StatusCode::NOT_FOUND, Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    let long = "word ".repeat(400);
    let (s, b) = post(&app, "/v1/completions", json!({"prompt": long})).await;
    let message = error(s, &b, StatusCode::BAD_REQUEST, Some("prompt"));
    assert!(message.contains("256"), "{message}");
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let huge = json!({"prompt": "x".repeat(quarry_server::BODY_LIMIT + 1)});
    let (s, b) = post(&app, "/v1/completions", huge).await;
    error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, None);
    let (s, b) = call(&app, "GET", "/v1/nothing", Body::empty(), None).await;
    error(s, &b, StatusCode::NOT_FOUND, None);
    let (s, b) = call(&app, "GET", "/v1/completions", Body::empty(), None).await;
    error(s, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    let (s, b) = call(
        &app,
        "GET",
        "/v1/describe?entity=France",
        Body::empty(),
        None,
    )
    .await;
    assert!(error(s, &b, StatusCode::NOT_FOUND, None).contains("vindex"));
}

#[tokio::test]
async fn the_api_key_guards_every_route_but_health() {
    let app = app(Some("sesame"), 256, Duration::from_secs(30));
    let (s, _) = call(&app, "GET", "/health", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK);
    for (method, uri) in [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("GET", "/metrics"),
    ] {
        let (s, b) = call(&app, method, uri, Body::from("{}"), None).await;
        error(s, &b, StatusCode::UNAUTHORIZED, None);
        let (s, b) = call(&app, method, uri, Body::from("{}"), Some("wrong")).await;
        error(s, &b, StatusCode::UNAUTHORIZED, None);
    }
    let (s, b) = call(&app, "GET", "/v1/models", Body::empty(), Some("sesame")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["data"][0]["id"], "smollm2");
}

#[tokio::test]
async fn a_full_server_answers_503_after_the_queue_timeout() {
    let app = app(None, 256, Duration::from_millis(200));
    // One slot: a long generation holds it while a second request waits and gives up.
    let busy = {
        let app = app.clone();
        tokio::spawn(async move {
            post(
                &app,
                "/v1/completions",
                json!({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, b) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hello", "max_tokens": 2}),
    )
    .await;
    let message = error(s, &b, StatusCode::SERVICE_UNAVAILABLE, None);
    assert!(message.contains("busy"), "{message}");
    let (s, b) = busy.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn tokenize_detokenize_health_models_and_metrics() {
    let app = default_app();
    let (s, b) = post(
        &app,
        "/tokenize",
        json!({"content": "The capital of France"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let tokens = b["tokens"].clone();
    assert!(tokens.as_array().unwrap().len() >= 4);
    let (_, b) = post(&app, "/detokenize", json!({ "tokens": tokens })).await;
    assert_eq!(b["content"], "The capital of France");
    let (s, b) = call(&app, "GET", "/health", Body::empty(), None).await;
    assert_eq!((s, b["status"].as_str()), (StatusCode::OK, Some("ok")));
    let (s, b) = post(
        &app,
        "/v1/completions",
        json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["usage"]["completion_tokens"], 3);
    // The engine publishes its gauges after each step, a moment after the last event.
    let mut page = String::new();
    for _ in 0..200 {
        let (s, text) = call(&app, "GET", "/metrics", Body::empty(), None).await;
        assert_eq!(s, StatusCode::OK);
        page = text.as_str().unwrap().to_string();
        if page.contains("quarry_running_sequences 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for needle in [
        "quarry_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
        "quarry_requests_total{route=\"/tokenize\",status=\"200\"} 1",
        "quarry_generated_tokens_total 3",
        "quarry_time_to_first_token_seconds_count 1",
        "quarry_inter_token_latency_seconds_count 2",
        "quarry_kv_blocks_used 0",
        "quarry_queue_depth 0",
        "quarry_running_sequences 0",
    ] {
        assert!(page.contains(needle), "no {needle:?} in\n{page}");
    }
}

#[tokio::test]
async fn knowledge_routes_run_lql_on_the_served_vindex() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2.vindex");
    let options = quarry_vindex::ExtractOptions {
        level: quarry_vindex::Level::Inference,
        dtype: quarry_vindex::Dtype::F16,
        top_k: 10,
    };
    quarry_vindex::extract(&model_path(TestModel::SmolLm2), &dir, &options, &mut |_| {}).unwrap();
    let executor = Executor::with_vindex(&dir).unwrap();
    let app = app_with(
        None,
        256,
        Duration::from_secs(30),
        Some(ServedVindex {
            id: "smollm2.vindex".into(),
            executor,
            parallel: 1,
            edits: None,
        }),
    );
    let columns = |b: &Value| -> Vec<String> {
        b["columns"]
            .as_array()
            .unwrap_or_else(|| panic!("{b}"))
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (s, b) = post(
        &app,
        "/v1/infer",
        json!({"prompt": "The capital of France is", "top": 3}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["rows"].as_array().unwrap().len(), 3);
    assert!(
        b["rows"][0]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == " Paris"),
        "{b}"
    );
    for uri in [
        "/v1/describe?entity=France",
        "/v1/describe?entity=France&scope=all&raw=true",
        "/v1/walk?prompt=Paris&top=5",
        "/v1/stats",
        "/v1/relations",
        "/v1/relations?features=true&examples=true",
        "/v1/describe?entity=France&method=features&relations_only=true",
    ] {
        let (s, b) = call(&app, "GET", uri, Body::empty(), None).await;
        assert_eq!(s, StatusCode::OK, "{uri}: {b}");
        assert!(!columns(&b).is_empty(), "{uri}: {b}");
    }
    let (s, b) = post(
        &app,
        "/v1/trace",
        json!({"prompt": "The capital of France is", "for": " Paris"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = post(
        &app,
        "/v1/select",
        json!({"query": "SELECT * FROM FEATURES LIMIT 2"}),
    )
    .await;
    assert_eq!(
        (s, b["rows"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(2)),
        "{b}"
    );
    let (s, b) = post(&app, "/v1/lql", json!({"query": "STATS; SHOW LAYERS"})).await;
    assert_eq!(
        (s, b["results"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(2)),
        "{b}"
    );
    let (s, b) = post(&app, "/v1/lql", json!({"query": "DESCRIBE France"})).await;
    let message = error(s, &b, StatusCode::BAD_REQUEST, Some("query"));
    assert!(message.contains("line 1, column 10"), "{message}");
    let (s, b) = post(&app, "/v1/select", json!({"query": "STATS"})).await;
    error(s, &b, StatusCode::BAD_REQUEST, Some("query"));
    // The executor is shared: nobody may swap the served vindex.
    let (s, b) = post(&app, "/v1/lql", json!({"query": "USE \"/tmp\""})).await;
    assert!(error(s, &b, StatusCode::BAD_REQUEST, Some("query")).contains("USE"));
    let (s, b) = call(
        &app,
        "GET",
        "/v1/walk?prompt=x&layers=9-2",
        Body::empty(),
        None,
    )
    .await;
    error(s, &b, StatusCode::BAD_REQUEST, Some("layers"));
    let (s, b) = call(&app, "GET", "/v1/describe", Body::empty(), None).await;
    error(s, &b, StatusCode::BAD_REQUEST, Some("entity"));
    let (s, b) = call(&app, "GET", "/v1/relations?examples=2", Body::empty(), None).await;
    error(s, &b, StatusCode::BAD_REQUEST, Some("examples"));
    let (s, b) = call(&app, "GET", "/v1/relations", Body::empty(), None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(columns(&b).contains(&"accuracy".to_string()), "{b}");
    let (s, b) = call(&app, "GET", "/v1/models", Body::empty(), None).await;
    assert_eq!(
        (s, b["data"][1]["id"].as_str()),
        (StatusCode::OK, Some("smollm2.vindex"))
    );
}
