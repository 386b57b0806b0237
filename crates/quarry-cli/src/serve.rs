//! `quarry serve`: loads the model once for the life of the process, runs the batching engine
//! on its own thread and the HTTP server on a small tokio runtime; Ctrl-C or SIGTERM stops
//! accepting connections, lets in-flight requests finish and closes WebSockets, then stops the
//! engine. A second Ctrl-C or SIGTERM exits at once.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use quarry_engine::{Engine, EngineConfig};
use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_query::Executor;
use quarry_server::{router, ServerConfig};
use quarry_tokenize::{ChatTemplate, Tokenizer};

use crate::commands::{init_threads, DEFAULT_CTX_LIMIT};
use crate::{models, ServeArgs};

/// Positions per KV block (the attention kernel's key block: see docs/serve.md).
const BLOCK_SIZE: usize = 64;
/// Tokens evaluated per engine step at most.
const STEP_TOKENS: usize = 512;

pub fn run(a: ServeArgs) -> Result<()> {
    init_threads(a.threads)?;
    let is_vindex = Path::new(&a.model).is_dir();
    let (model_path, vindex) = if is_vindex {
        let executor = Executor::with_vindex(&a.model)
            .with_context(|| format!("opening the vindex {}", a.model))?;
        let path = executor
            .vindex()
            .context("the vindex did not open")?
            .model_path()
            .with_context(|| format!("{}: no model file to serve", a.model))?;
        let id = Path::new(&a.model)
            .file_name()
            .map_or_else(|| a.model.clone(), |n| n.to_string_lossy().into_owned());
        (path, Some((id, executor)))
    } else {
        (models::resolve(&a.model)?, None)
    };
    // The server lives as long as the process: the file, model, tokenizer and template are
    // leaked so that request handlers on any thread can borrow them.
    let file: &'static GgufFile = Box::leak(Box::new(GgufFile::open(&model_path)?));
    let model: &'static Model<'static> = Box::leak(Box::new(Model::load(file)?));
    let tokenizer: &'static Tokenizer = Box::leak(Box::new(Tokenizer::from_gguf(file)?));
    let template: &'static ChatTemplate =
        Box::leak(Box::new(ChatTemplate::from_gguf(file, tokenizer)?));
    let cfg = model.config();
    let context = a
        .ctx
        .unwrap_or(cfg.context_length.min(DEFAULT_CTX_LIMIT))
        .min(cfg.context_length);
    anyhow::ensure!(context >= 2, "invalid --ctx {context}: must be at least 2");
    anyhow::ensure!(a.parallel >= 1, "invalid --parallel 0: must be at least 1");
    let bytes_per_position = cfg.n_layers * 2 * cfg.kv_dim() * quarry_model::KV_BYTES_PER_VALUE;
    let kv_bytes = match a.kv_mem {
        Some(mib) => mib << 20,
        None => a.parallel * context.next_multiple_of(BLOCK_SIZE) * bytes_per_position,
    };
    let (engine, handle) = Engine::new(
        model,
        tokenizer,
        EngineConfig {
            parallel: a.parallel,
            context,
            kv_bytes,
            block_size: BLOCK_SIZE,
            step_tokens: STEP_TOKENS,
            queue_timeout: Duration::from_secs(a.queue_timeout),
        },
    )
    .context("invalid --kv-mem / --ctx / --parallel")?;
    let engine_thread = std::thread::Builder::new()
        .name("quarry-engine".into())
        .spawn(move || engine.run())?;
    let model_id = model_path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let app = router(
        handle.clone(),
        tokenizer,
        template,
        ServerConfig {
            model_id,
            api_key: a.api_key,
            request_timeout: Duration::from_secs(a.timeout),
            vindex,
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("binding {}:{}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "quarry serve: {} ({} sequences × {context} tokens, KV {} MiB); listening on http://{addr}",
            model_path.display(),
            a.parallel,
            kv_bytes >> 20
        );
        let shutdown = async {
            shutdown_signal().await;
            eprintln!(
                "quarry serve: shutting down: finishing in-flight requests (Ctrl-C again to stop now)"
            );
            tokio::spawn(async {
                shutdown_signal().await;
                eprintln!("quarry serve: stopped with requests in flight");
                std::process::exit(130);
            });
        };
        quarry_server::serve(listener, app, shutdown)
            .await
            .context("serving")
    })?;
    // Tasks still alive (a WebSocket session that did not close in time) hold engine handles:
    // dropping the runtime drops them, so that the engine's loop can end.
    runtime.shutdown_timeout(Duration::from_secs(1));
    handle.shutdown();
    drop(handle);
    engine_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.ok();
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
