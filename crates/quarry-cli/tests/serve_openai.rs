//! `quarry serve` behaves like the OpenAI API for the real `openai` Python client: the
//! acceptance script `tests/serve/openai_acceptance.py` (chat and completions, streaming and
//! not, logprobs, stop, n, usage, echo, greedy output equal to `quarry run`'s, a hung-up stream
//! freeing its KV blocks) runs against a server started on SmolLM2; and a Hugging Face
//! directory of a mixture of experts serves `quarry run`'s greedy text to concurrent requests.
//!
//! The Python packages come from `scripts/python-deps` (run by `scripts/test`, which exports
//! their directory as `QUARRY_PYTHONPATH`); without them the test fails and says so.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use quarry_fixtures::{model_path, workspace_root, TestModel};

const QUARRY: &str = env!("CARGO_BIN_EXE_quarry");

/// A running `quarry serve`; killed and reaped when dropped, so a failing test leaves no server.
struct Server {
    child: Child,
    /// Everything the server wrote to stderr so far.
    log: Arc<Mutex<String>>,
    /// `HOST:PORT` from its `listening on http://HOST:PORT` line.
    addr: String,
}

impl Server {
    /// Starts `quarry serve MODEL --port 0 ARGS…` and waits for it to listen.
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(QUARRY)
            .arg("serve")
            .arg(model)
            .args(["--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn quarry serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        // Reads stderr to the end (the pipe must never fill up), handing over the address.
        thread::spawn({
            let log = Arc::clone(&log);
            move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some((_, rest)) = line.split_once("listening on http://") {
                        let addr: String = rest
                            .chars()
                            .take_while(|c| !c.is_whitespace() && *c != '/')
                            .collect();
                        let _ = tx.send(addr);
                    }
                    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let mut server = Server {
            child,
            log,
            addr: String::new(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => server.addr = addr,
            Err(e) => panic!(
                "quarry serve did not print `listening on http://HOST:PORT` ({e}); status {:?}; \
                 its stderr:\n{}",
                server.child.try_wait(),
                server.log()
            ),
        }
        server
    }

    fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// The directory holding the `openai` package: `$QUARRY_PYTHONPATH`, else the one
/// `scripts/python-deps` installs into (checked, never installed from here).
fn python_deps() -> String {
    const HINT: &str = "run scripts/python-deps to install them \
        (scripts/test does, and exports QUARRY_PYTHONPATH)";
    let dir = match std::env::var("QUARRY_PYTHONPATH") {
        Ok(dir) if !dir.is_empty() => dir,
        _ => {
            let script = workspace_root().join("scripts/python-deps");
            let out = Command::new("bash")
                .arg(&script)
                .arg("--check")
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "the Python packages of this test (the `openai` client) are missing: {HINT}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    let import = Command::new(python())
        .args(["-c", "import openai"])
        .env("PYTHONPATH", &dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        import.status.success(),
        "`import openai` fails with PYTHONPATH={dir}: {HINT}\n{}",
        String::from_utf8_lossy(&import.stderr)
    );
    dir
}

#[test]
fn openai_client_acceptance_on_smollm2() {
    let deps = python_deps();
    let model = model_path(TestModel::SmolLm2);
    let server = Server::start(&model, &["--parallel", "4"]);
    let script = workspace_root().join("tests/serve/openai_acceptance.py");
    let out = Command::new(python())
        .arg(&script)
        .arg("--base-url")
        .arg(format!("http://{}/v1", server.addr))
        .arg("--model-path")
        .arg(&model)
        .arg("--quarry")
        .arg(QUARRY)
        .env("PYTHONPATH", &deps)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The per-check lines, visible with --nocapture and on failure.
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}{stderr}\nserver stderr:\n{}",
        script.display(),
        out.status,
        server.log()
    );
}

/// A Hugging Face directory of a mixture of experts serves like a GGUF: two completions sent
/// at once (batched together) each get `quarry run`'s greedy text for their prompt.
#[test]
fn a_safetensors_mixture_of_experts_serves_quarry_runs_text() {
    use std::io::{Read, Write};
    let dir = quarry_fixtures::family_dir("qwen2_moe");
    let server = Server::start(&dir, &["--parallel", "2"]);
    let ask = |prompt: &'static str, addr: String| {
        thread::spawn(move || {
            let body = format!(r#"{{"prompt":"{prompt}","max_tokens":6,"temperature":0}}"#);
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            write!(
                stream,
                "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let json = response.split_once("\r\n\r\n").unwrap().1;
            let json: serde_json::Value = serde_json::from_str(json).unwrap();
            json["choices"][0]["text"].as_str().unwrap().to_string()
        })
    };
    let prompts = ["The model", "Quarry runs"];
    let answers: Vec<_> = prompts
        .iter()
        .map(|p| ask(p, server.addr.clone()))
        .collect();
    for (prompt, answer) in prompts.iter().zip(answers) {
        let served = answer.join().unwrap();
        let out = Command::new(QUARRY)
            .args([
                "run",
                dir.to_str().unwrap(),
                prompt,
                "-n",
                "6",
                "--temperature",
                "0",
                "--json",
            ])
            .output()
            .unwrap();
        let run: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            served,
            run["text"].as_str().unwrap(),
            "{prompt}; log: {}",
            server.log()
        );
    }
}
