//! `GET /v1/stream` on a real server over SmolLM2: a generation streams one frame per token
//! then `done` with usage and timings, its text equals the HTTP completion's, and `cancel`
//! stops a long one; a client's close frame is answered with one; at shutdown a running generation gets an error frame and the socket a
//! close frame, and the server returns.

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use quarry_engine::EngineConfig;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A server on a free port, until `shutdown` completes.
async fn start_until(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let config = EngineConfig {
        parallel: 2,
        context: 512,
        kv_bytes: 128 << 20,
        block_size: 64,
        step_tokens: 512,
        queue_timeout: Duration::from_secs(30),
    };
    let app = common::smollm2_app(config, None, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(quarry_server::serve(listener, app, shutdown)),
    )
}

async fn start() -> std::net::SocketAddr {
    start_until(std::future::pending()).await.0
}

async fn next_frame<S>(ws: &mut S) -> Value
where
    S: StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a frame within 30 s")
            .expect("the socket stays open")
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test]
async fn generate_streams_tokens_then_done_and_cancel_stops() {
    let addr = start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/stream"))
        .await
        .unwrap();
    let prompt = "The capital of France is";
    let generate =
        json!({"type": "generate", "id": 1, "prompt": prompt, "max_tokens": 8, "temperature": 0});
    ws.send(Message::Text(generate.to_string().into()))
        .await
        .unwrap();
    let mut text = String::new();
    let mut tokens = 0;
    let done = loop {
        let frame = next_frame(&mut ws).await;
        assert_eq!(frame["id"], 1, "{frame}");
        match frame["type"].as_str() {
            Some("token") => {
                tokens += 1;
                text.push_str(frame["text"].as_str().unwrap());
            }
            Some("done") => break frame,
            _ => panic!("unexpected frame {frame}"),
        }
    };
    text.push_str(done["text"].as_str().unwrap());
    assert_eq!(tokens, 8);
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], 8);
    assert!(done["timings"]["ttft_ms"].as_f64().unwrap() > 0.0);

    // The same text as a plain HTTP completion gives.
    let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}).to_string();
    let reply = http_post(addr, "/v1/completions", &body).await;
    assert_eq!(reply["choices"][0]["text"].as_str().unwrap(), text);

    // A long generation, cancelled after its first token.
    let long = json!({"type": "generate", "id": "long", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0});
    ws.send(Message::Text(long.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "token");
    ws.send(Message::Text(
        json!({"type": "cancel", "id": "long"}).to_string().into(),
    ))
    .await
    .unwrap();
    loop {
        let frame = next_frame(&mut ws).await;
        match frame["type"].as_str() {
            Some("token") => continue,
            Some("cancelled") => break,
            _ => panic!("unexpected frame {frame}"),
        }
    }
    // Bad frames get an error frame, and the socket stays usable.
    ws.send(Message::Text("{\"type\": \"dance\"}".into()))
        .await
        .unwrap();
    let frame = next_frame(&mut ws).await;
    assert_eq!(
        (frame["type"].as_str(), frame["param"].as_str()),
        (Some("error"), Some("type"))
    );
}

#[tokio::test]
async fn a_client_close_frame_is_answered_with_a_close_frame() {
    let addr = start().await;
    for code in [1000u16, 4001] {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/stream"))
            .await
            .unwrap();
        // A generation running while the client closes must not keep the answer back.
        let long = json!({"type": "generate", "id": 1, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0});
        ws.send(Message::Text(long.to_string().into()))
            .await
            .unwrap();
        assert_eq!(next_frame(&mut ws).await["type"], "token");
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: code.into(),
            reason: "bye".into(),
        };
        ws.send(Message::Close(Some(frame))).await.unwrap();
        let reply = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => break frame,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no close frame in answer to {code}: {other:?}"),
            }
        };
        // RFC 6455 §5.5.1: the answer echoes the status code.
        assert_eq!(reply.map(|f| u16::from(f.code)), Some(code));
        // Then the server closes the connection.
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(None | Some(Err(_))) => {}
            other => panic!("the connection stays open: {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_ends_running_generations_and_closes_the_socket() {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = start_until(async {
        stopped.await.ok();
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/stream"))
        .await
        .unwrap();
    let long = json!({"type": "generate", "id": 7, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0});
    ws.send(Message::Text(long.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "token");
    stop.send(()).unwrap();
    let error = loop {
        let frame = next_frame(&mut ws).await;
        if frame["type"] != "token" {
            break frame;
        }
    };
    assert_eq!(
        (error["type"].as_str(), &error["id"]),
        (Some("error"), &json!(7))
    );
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1001);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server returns")
        .unwrap()
        .unwrap();
}

/// A minimal HTTP/1.1 POST (one request per connection).
async fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (_, json) = response.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(json).unwrap()
}
