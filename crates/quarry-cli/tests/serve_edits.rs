//! `quarry serve` with `--lora` and `--allow-edits`, end to end on SmolLM2: the server
//! generates what `quarry run --lora` generates; a GGUF served with `--allow-edits` answers the
//! edit routes (with the executor over the served file), and without it they are 403.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_model::{write_adapter, FfnOverlay, LowRank, ModelConfig};

const QUARRY: &str = env!("CARGO_BIN_EXE_quarry");
const PROMPT: &str = "The capital of France is";

/// A running `quarry serve`, killed and reaped when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(QUARRY)
            .arg("serve")
            .arg(model_path(TestModel::SmolLm2))
            .args(["--port", "0", "--ctx", "256", "--parallel", "1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Reads stderr to the end, so the pipe never fills up.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once("listening on http://") {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("quarry serve did not start listening");
        Server { child, addr }
    }

    /// One HTTP/1.1 request; (status, JSON body).
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (
            status,
            serde_json::from_str(body).unwrap_or_else(|_| panic!("{response}")),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rank-2 delta on three middle layers of SmolLM2 as an adapter in `dir`: fixed factors
/// scaled to the norm of each layer's down projection, enough to change the greedy
/// continuation of [`PROMPT`].
fn adapter(dir: &Path) -> std::path::PathBuf {
    let base = GgufFile::open(model_path(TestModel::SmolLm2)).unwrap();
    let c = ModelConfig::from_gguf(&base).unwrap();
    let (rows, cols, rank) = (c.d_model, c.ff_dim, 2);
    let wave = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let overlay = FfnOverlay::new(
        c.n_layers,
        [8, 9, 10].map(|l| {
            let view = base.tensor(&format!("blk.{l}.ffn_down.weight")).unwrap();
            let mut w = vec![0.0f32; rows * cols];
            quarry_kernels::dequantize(view.info.dtype, view.data, &mut w).unwrap();
            let delta = LowRank::new(
                rows,
                cols,
                rank,
                wave(rank * cols, 0.37),
                wave(rows * rank, 0.91),
            )
            .unwrap();
            let scale = (norm(&w) / norm(&delta.dense())) as f32;
            let b = delta.b.iter().map(|x| x * scale).collect();
            (l, LowRank::new(rows, cols, rank, delta.a, b).unwrap())
        }),
    );
    let path = dir.join("edit-lora.gguf");
    write_adapter(&overlay, &c, &path).unwrap();
    path
}

#[test]
fn serve_lora_generates_what_run_lora_generates() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = adapter(dir.path());
    let adapter = adapter.to_str().unwrap();
    let run = |extra: &[&str]| -> String {
        let mut args = vec![
            "run",
            "smollm2",
            PROMPT,
            "-n",
            "6",
            "--temperature",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let out = Command::new(QUARRY).args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let (base, with_lora) = (run(&[]), run(&["--lora", adapter]));
    assert_ne!(base, with_lora, "the adapter changed nothing");
    let server = Server::start(&["--lora", adapter]);
    let (status, b) = server.call(
        "POST",
        "/v1/completions",
        Some(&serde_json::json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0})),
    );
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["choices"][0]["text"], with_lora.as_str(), "{b}");
}

#[test]
fn a_gguf_served_with_allow_edits_answers_the_edit_routes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&["--allow-edits", "--edits-dir", dir.path().to_str().unwrap()]);
    let (status, b) = server.call("GET", "/v1/patches", None);
    assert_eq!(status, 200, "{b}");
    assert!(b["rows"].as_array().unwrap().is_empty(), "{b}");
    // The model is listed once: the knowledge executor serves the same file.
    let (_, models) = server.call("GET", "/v1/models", None);
    assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
    let (status, b) = server.call(
        "POST",
        "/v1/patches",
        Some(&serde_json::json!({"apply": "../elsewhere.vlp"})),
    );
    assert_eq!(
        (status, b["error"]["param"].as_str()),
        (400, Some("apply")),
        "{b}"
    );
    drop(server);

    let server = Server::start(&[]);
    let (status, b) = server.call("GET", "/v1/patches", None);
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (403, Some("edits_not_allowed")),
        "{b}"
    );
}
