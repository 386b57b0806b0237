//! Server resources under careless and hostile clients, on a real server over SmolLM2 and a
//! real socket: half-sent requests time out and cannot starve `/health`, the connection limit
//! holds, a slow body gets a 408, a client that leaves during a long prefill (streaming or
//! not, running or queued) frees its sequence at once, and the knowledge routes refuse
//! oversized input up front, time out, are interrupted when their client leaves, and one slow
//! statement does not block the others; text that cannot fit is refused before tokenizing;
//! upgraded WebSockets keep their connection slot.
//!
//! The tests compare latencies and durations, so they run one at a time ([`serial`]): each
//! would otherwise share the CI machine's two cores with another's prefill.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quarry_engine::EngineConfig;
use quarry_fixtures::{model_path, TestModel};
use quarry_query::Executor;
use quarry_server::{Limits, ServedVindex};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Held by each test for as long as it runs: one at a time.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

fn engine(parallel: usize, context: usize, step_tokens: usize) -> EngineConfig {
    EngineConfig {
        parallel,
        context,
        kv_bytes: 256 << 20,
        block_size: 64,
        step_tokens,
        queue_timeout: Duration::from_secs(60),
    }
}

/// A server on a free port with `limits`, running until the test ends.
async fn start(
    config: EngineConfig,
    limits: Limits,
    timeout: Duration,
    vindex: Option<ServedVindex>,
) -> SocketAddr {
    let app = common::smollm2_app_with(config, None, vindex, timeout);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(quarry_server::serve_with(
        listener,
        app,
        limits,
        std::future::pending(),
    ));
    addr
}

/// Sends `raw` on a new connection and reads the whole answer (the request should say
/// `Connection: close`); `None` when nothing came within `within`.
async fn exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> Option<String> {
    tokio::time::timeout(within, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok();
        String::from_utf8_lossy(&response).into_owned()
    })
    .await
    .ok()
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").into_bytes()
}

fn post_request(path: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Status and JSON body (or the raw body as a string) of an HTTP/1.1 answer.
fn parse(response: &str) -> (u16, Value) {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (status, json)
}

async fn call(addr: SocketAddr, raw: &[u8]) -> (u16, Value) {
    let response = exchange(addr, raw, Duration::from_secs(120))
        .await
        .expect("an answer within 120 s");
    parse(&response)
}

async fn health_latency(addr: SocketAddr, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let response = exchange(addr, &get_request("/health"), within).await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    Some(t0.elapsed())
}

/// A gauge or counter from `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, page) = call(addr, &get_request("/metrics")).await;
    assert_eq!(status, 200);
    let page = page.as_str().unwrap().to_string();
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{page}"))
}

/// Waits (up to `within`) until `condition` holds of (running, queued, KV blocks used).
async fn wait_engine(
    addr: SocketAddr,
    within: Duration,
    condition: impl Fn(f64, f64, f64) -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let (running, queued, used) = (
            metric(addr, "quarry_running_sequences").await,
            metric(addr, "quarry_queue_depth").await,
            metric(addr, "quarry_kv_blocks_used").await,
        );
        if condition(running, queued, used) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "running {running}, queued {queued}, KV blocks used {used} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the server closes `stream`; how long that took.
async fn closed_within(mut stream: TcpStream, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()?;
    Some(t0.elapsed())
}

#[tokio::test]
async fn half_sent_requests_time_out_and_the_connection_limit_holds() {
    let _serial = serial().await;
    let limits = Limits {
        max_connections: 16,
        header_read_timeout: Duration::from_secs(1),
    };
    let addr = start(engine(1, 256, 512), limits, Duration::from_secs(60), None).await;
    // Fewer idle half-sent requests than the limit: /health answers at once.
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        idle.push(s);
    }
    let latency = health_latency(addr, Duration::from_secs(5)).await;
    assert!(
        latency.is_some_and(|l| l < Duration::from_millis(500)),
        "{latency:?}"
    );
    // Each is closed once its header-read time is up.
    for s in idle {
        let closed = closed_within(s, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "a half-sent request stayed open");
    }
    // A slowloris trickling one header byte every 200 ms is cut at the timeout too.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let t0 = Instant::now();
    let mut cut = false;
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    {
        if slow.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !cut {
        cut = closed_within(slow, Duration::from_secs(3)).await.is_some();
    }
    assert!(
        cut && t0.elapsed() < Duration::from_secs(6),
        "{:?}",
        t0.elapsed()
    );

    // More than the limit: at most 16 are served at once, the rest wait in the backlog and
    // are served as the idle ones time out; the server never holds more than its limit.
    let mut flood = Vec::new();
    for _ in 0..48 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            .await
            .ok();
        flood.push(s);
    }
    let t0 = Instant::now();
    let latency = health_latency(addr, Duration::from_secs(30)).await;
    // Three waves of 16 at 1 s each, then /health: a few seconds, never forever.
    assert!(latency.is_some(), "/health never answered");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for s in flood {
        assert!(closed_within(s, Duration::from_secs(10)).await.is_some());
    }
    // Afterwards the server is as responsive as before.
    let latency = health_latency(addr, Duration::from_secs(5)).await;
    assert!(
        latency.is_some_and(|l| l < Duration::from_millis(500)),
        "{latency:?}"
    );
}

#[tokio::test]
async fn post_routes_take_only_json_and_a_slow_body_gets_a_408() {
    let _serial = serial().await;
    let addr = start(
        engine(1, 256, 512),
        Limits::default(),
        Duration::from_secs(60),
        None,
    )
    .await;
    let body = json!({"prompt": "Hello", "max_tokens": 1}).to_string();
    for route in [
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/v1/lql",
    ] {
        for content_type in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
        ] {
            let (status, b) = call(addr, &post_request(route, content_type, &body)).await;
            assert_eq!(status, 415, "{route} {content_type}: {b}");
            assert_eq!(b["error"]["code"], "unsupported_media_type", "{b}");
            assert!(
                b["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("application/json"),
                "{b}"
            );
        }
        // No Content-Type at all.
        let raw = format!(
            "POST {route} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(call(addr, raw.as_bytes()).await.0, 415, "{route}");
    }
    // JSON with parameters, in any case, is fine.
    for content_type in ["application/json", "Application/JSON; charset=utf-8"] {
        let (status, b) = call(addr, &post_request("/v1/completions", content_type, &body)).await;
        assert_eq!(status, 200, "{content_type}: {b}");
    }
    // A body that does not arrive in full within the body-read timeout (2 s here).
    let t0 = Instant::now();
    let raw = "POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"prompt\":";
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .expect("an answer")
        .ok();
    let (status, b) = parse(&String::from_utf8_lossy(&response));
    assert_eq!(status, 408, "{b}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn clients_that_leave_mid_prefill_free_their_sequences() {
    let _serial = serial().await;
    // 4 prompt tokens per step and one slot: a ~1900-token prompt needs ~475 steps, each at
    // least one pass over the weights (seconds in all, on any machine), and a second request
    // waits in the queue.
    let addr = start(
        engine(1, 2048, 4),
        Limits::default(),
        Duration::from_secs(600),
        None,
    )
    .await;
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(190);
    for (first_streams, second_streams) in [(false, true), (true, false)] {
        let body = |stream: bool| {
            json!({"prompt": prompt, "max_tokens": 20, "stream": stream, "temperature": 0})
                .to_string()
        };
        let mut running = TcpStream::connect(addr).await.unwrap();
        running
            .write_all(&post_request(
                "/v1/completions",
                "application/json",
                &body(first_streams),
            ))
            .await
            .unwrap();
        wait_engine(addr, Duration::from_secs(10), |r, _, _| r == 1.0).await;
        let mut queued = TcpStream::connect(addr).await.unwrap();
        queued
            .write_all(&post_request(
                "/v1/completions",
                "application/json",
                &body(second_streams),
            ))
            .await
            .unwrap();
        wait_engine(addr, Duration::from_secs(10), |r, q, _| {
            r == 1.0 && q == 1.0
        })
        .await;
        // The queued client leaves: its request leaves the queue, the prefill goes on.
        drop(queued);
        wait_engine(addr, Duration::from_secs(3), |r, q, _| r == 1.0 && q == 0.0).await;
        // The running client leaves mid-prefill: its sequence and blocks go within a step.
        drop(running);
        let took = wait_engine(addr, Duration::from_secs(5), |r, q, used| {
            r == 0.0 && q == 0.0 && used == 0.0
        })
        .await;
        assert!(took < Duration::from_secs(3), "{took:?}");
        // Nothing was generated: the prompt was never finished.
        assert_eq!(metric(addr, "quarry_generated_tokens_total").await, 0.0);
    }
}

fn smollm2_vindex(dir: &std::path::Path) {
    let options = quarry_vindex::ExtractOptions {
        level: quarry_vindex::Level::Inference,
        dtype: quarry_vindex::Dtype::F16,
        top_k: 10,
    };
    quarry_vindex::extract(&model_path(TestModel::SmolLm2), dir, &options, &mut |_| {}).unwrap();
}

/// `executor`'s vindex served with `parallel` knowledge statements at once.
fn served(executor: &Executor, parallel: usize) -> Option<ServedVindex> {
    Some(ServedVindex {
        id: "smollm2.vindex".into(),
        executor: executor.clone(),
        parallel,
        edits: None,
    })
}

fn lql(query: &str) -> Vec<u8> {
    post_request(
        "/v1/lql",
        "application/json",
        &json!({ "query": query }).to_string(),
    )
}

#[tokio::test]
async fn knowledge_routes_bound_their_input_time_and_concurrency() {
    let _serial = serial().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("smollm2.vindex");
    smollm2_vindex(&dir);
    // Opened once; every server below shares it.
    let executor = Executor::with_vindex(&dir).unwrap();
    // A ~1800-token prompt: an INFER of a few seconds.
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(180);
    let infer = |prompt: &str| {
        post_request(
            "/v1/infer",
            "application/json",
            &json!({ "prompt": prompt }).to_string(),
        )
    };

    // Sizes are refused before anything runs, naming the field.
    let addr = start(
        engine(1, 256, 512),
        Limits::default(),
        Duration::from_secs(60),
        served(&executor, 1),
    )
    .await;
    let huge = "x".repeat(1 << 20);
    let t0 = Instant::now();
    let (status, b) = call(addr, &lql(&format!("DESCRIBE \"{}\"", &huge[..1000]))).await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("query")),
        "{b}"
    );
    let (status, b) = call(addr, &lql(&format!("DESCRIBE \"{huge}\""))).await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("query")),
        "{b}"
    );
    let (status, b) = call(
        addr,
        &get_request(&format!("/v1/describe?entity={}", "y".repeat(300))),
    )
    .await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("entity")),
        "{b}"
    );
    assert!(
        b["error"]["message"].as_str().unwrap().contains("256"),
        "{b}"
    );
    let (status, b) = call(addr, &infer(&long)).await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("prompt")),
        "{b}"
    );
    assert_eq!(b["error"]["code"], "context_length_exceeded", "{b}");
    let (status, b) = call(
        addr,
        &post_request(
            "/v1/trace",
            "application/json",
            &json!({"prompt": "x", "for": "z".repeat(1000)}).to_string(),
        ),
    )
    .await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("for")),
        "{b}"
    );
    let (status, b) = call(addr, &lql(&"STATS;".repeat(17))).await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("query")),
        "{b}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Within the limits, statements run.
    let (status, b) = call(addr, &get_request("/v1/describe?entity=France")).await;
    assert_eq!(status, 200, "{b}");

    // How long the whole INFER takes on this machine, for the timings below.
    let addr = start(
        engine(1, 2048, 512),
        Limits::default(),
        Duration::from_secs(600),
        served(&executor, 2),
    )
    .await;
    let t0 = Instant::now();
    let (status, b) = call(addr, &infer(&long)).await;
    assert_eq!(status, 200, "{b}");
    let full = t0.elapsed();

    // A request timeout of a third of that interrupts the INFER: a 504, and the executor is
    // free again soon after (the work stopped, it was not merely abandoned).
    let timeout = full / 3;
    let timed = start(
        engine(1, 2048, 512),
        Limits::default(),
        timeout,
        served(&executor, 1),
    )
    .await;
    let t0 = Instant::now();
    let (status, b) = call(timed, &infer(&long)).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{b} (timeout {timeout:?}; a full INFER takes {full:?})"
    );
    assert!(
        t0.elapsed() < timeout + full / 3,
        "504 after {:?} (timeout {timeout:?})",
        t0.elapsed()
    );
    let t0 = Instant::now();
    let (status, b) = call(timed, &lql("STATS")).await;
    assert_eq!(status, 200, "{b}");
    let freed = t0.elapsed();
    eprintln!(
        "INFER of {} bytes: {full:?}; executor free {freed:?} after the 504",
        long.len()
    );
    assert!(
        freed < full / 2,
        "freed after {freed:?}; a full INFER takes {full:?}"
    );

    // With two executors, a slow statement leaves the other free.
    let slow = tokio::spawn(call(addr, infer(&long).leak()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let (status, b) = call(addr, &lql("STATS")).await;
    assert_eq!(status, 200, "{b}");
    assert!(
        t0.elapsed() < full / 2,
        "{:?} (INFER: {full:?})",
        t0.elapsed()
    );
    assert_eq!(slow.await.unwrap().0, 200);

    // One executor: a client that leaves mid-INFER frees it long before the INFER would
    // have ended.
    let addr = start(
        engine(1, 2048, 512),
        Limits::default(),
        Duration::from_secs(600),
        served(&executor, 1),
    )
    .await;
    let mut leaving = TcpStream::connect(addr).await.unwrap();
    leaving.write_all(&infer(&long)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(leaving);
    let t0 = Instant::now();
    let (status, b) = call(addr, &lql("STATS")).await;
    assert_eq!(status, 200, "{b}");
    assert!(
        t0.elapsed() < full / 2,
        "{:?} (INFER: {full:?})",
        t0.elapsed()
    );
}

#[tokio::test]
async fn text_that_cannot_fit_is_refused_before_it_is_tokenized() {
    let _serial = serial().await;
    let addr = start(
        engine(1, 256, 512),
        Limits::default(),
        Duration::from_secs(60),
        None,
    )
    .await;
    // 7 MiB of one letter: about 7 s of tokenizing, were it tokenized.
    let huge = "a".repeat(7 << 20);
    let cases = [
        (
            "/v1/completions",
            json!({"prompt": huge, "max_tokens": 1}),
            "prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": [huge], "max_tokens": 1}),
            "prompt",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": huge}]}]}),
            "messages",
        ),
    ];
    for (route, body, param) in cases {
        let t0 = Instant::now();
        let (status, b) = call(
            addr,
            &post_request(route, "application/json", &body.to_string()),
        )
        .await;
        assert_eq!(
            (status, b["error"]["param"].as_str()),
            (400, Some(param)),
            "{b}"
        );
        assert_eq!(b["error"]["code"], "context_length_exceeded", "{b}");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "{route}: {:?}",
            t0.elapsed()
        );
    }
    // Text that might fit is tokenized and measured as before.
    let (status, b) = call(
        addr,
        &post_request(
            "/v1/completions",
            "application/json",
            &json!({"prompt": "word ".repeat(300), "max_tokens": 1}).to_string(),
        ),
    )
    .await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("prompt")),
        "{b}"
    );
    assert!(
        b["error"]["message"].as_str().unwrap().contains("tokens"),
        "{b}"
    );
    // /tokenize takes at most 1 MiB, and tokenizes off the async workers: /health answers
    // meanwhile.
    let body = json!({"content": "b".repeat(2 << 20)}).to_string();
    let (status, b) = call(addr, &post_request("/tokenize", "application/json", &body)).await;
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("content")),
        "{b}"
    );
    let body = json!({"content": "b".repeat(1 << 20)}).to_string();
    let tokenizing = tokio::spawn(async move {
        call(
            addr,
            post_request("/tokenize", "application/json", &body).leak(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let latency = health_latency(addr, Duration::from_secs(5)).await;
    assert!(
        latency.is_some_and(|l| l < Duration::from_millis(500)),
        "{latency:?}"
    );
    let (status, b) = tokenizing.await.unwrap();
    assert_eq!(status, 200);
    assert!(b["tokens"].as_array().unwrap().len() > 1000);
}

#[tokio::test]
async fn websocket_sessions_hold_their_connection_slot() {
    let _serial = serial().await;
    let limits = Limits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(10),
    };
    let addr = start(engine(1, 256, 512), limits, Duration::from_secs(60), None).await;
    let url = format!("ws://{addr}/v1/stream");
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // Both slots are held by the upgraded sockets: a third connection waits.
    assert_eq!(health_latency(addr, Duration::from_millis(700)).await, None);
    // Closing one frees its slot.
    first.close(None).await.unwrap();
    drop(first);
    let latency = health_latency(addr, Duration::from_secs(5)).await;
    assert!(latency.is_some(), "/health never answered");
}
