//! `quarry serve`: loads the model once for the life of the process, runs the batching engine
//! on its own thread and the HTTP server on a small tokio runtime; Ctrl-C or SIGTERM stops
//! accepting connections, lets in-flight requests finish and closes WebSockets, then stops the
//! engine. A second Ctrl-C or SIGTERM exits at once.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use quarry_engine::{Engine, EngineConfig};
use quarry_model::Model;
use quarry_query::Executor;
use quarry_server::{router, EditPolicy, ServedVindex, ServerConfig};
use quarry_tokenize::{ChatTemplate, Tokenizer};

use crate::commands::{init_threads, with_lora, DEFAULT_CTX_LIMIT};
use crate::{limits, models, ServeArgs};

/// Positions per KV block (the attention kernel's key block: see docs/serve.md).
const BLOCK_SIZE: usize = 64;
/// Tokens evaluated per engine step at most.
const STEP_TOKENS: usize = 512;

/// Longest `--timeout`, `--queue-timeout` and `--header-timeout`: a week.
const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Most `--parallel` sequences and `--knowledge-parallel` statements.
const MAX_PARALLEL: usize = 1024;
const MAX_KNOWLEDGE_PARALLEL: usize = 64;
/// File descriptors kept for everything but connections (model, vindex files, stdio, epoll…).
const RESERVED_FDS: usize = 64;

/// The flags that need neither the model nor the machine, checked before anything loads.
fn check_flags(a: &ServeArgs) -> Result<()> {
    if let Some(key) = &a.api_key {
        anyhow::ensure!(
            !key.trim().is_empty(),
            "invalid --api-key '{key}': the key must not be empty (leave out --api-key to serve without one)"
        );
        anyhow::ensure!(
            key.bytes().all(|b| b.is_ascii_graphic()),
            "invalid --api-key: the key must be printable ASCII without spaces (clients send it in an HTTP header)"
        );
    }
    for (flag, secs) in [
        ("--timeout", a.timeout),
        ("--queue-timeout", a.queue_timeout),
        ("--header-timeout", a.header_timeout),
    ] {
        anyhow::ensure!(
            (1..=MAX_TIMEOUT_SECS).contains(&secs),
            "invalid {flag} {secs}: must be between 1 and {MAX_TIMEOUT_SECS} seconds"
        );
    }
    limits::count(
        "--parallel",
        a.parallel,
        MAX_PARALLEL,
        "sequences generating at once",
    )?;
    limits::count(
        "--knowledge-parallel",
        a.knowledge_parallel,
        MAX_KNOWLEDGE_PARALLEL,
        "knowledge statements running at once",
    )?;
    if let Some(mib) = a.kv_mem {
        anyhow::ensure!(mib >= 1, "invalid --kv-mem 0: must be at least 1 MiB");
    }
    anyhow::ensure!(
        !(a.allow_edits && a.lora.is_some()),
        "--lora with --allow-edits: edits are solved against the base weights and would replace the adapter; compile the adapter into the model first (COMPILE CURRENT INTO MODEL after APPLY, or serve without one of the flags)"
    );
    Ok(())
}

/// What `--allow-edits` allows, with `--edits-dir` checked: an existing directory, kept as its
/// canonical path (UTF-8, since LQL paths are strings).
fn edit_policy(a: &ServeArgs) -> Result<Option<EditPolicy>> {
    if !a.allow_edits {
        return Ok(None);
    }
    let dir = match &a.edits_dir {
        None => None,
        Some(d) => {
            let canonical = std::fs::canonicalize(d)
                .with_context(|| format!("invalid --edits-dir {}", d.display()))?;
            anyhow::ensure!(
                canonical.is_dir(),
                "invalid --edits-dir {}: not a directory",
                d.display()
            );
            anyhow::ensure!(
                canonical.to_str().is_some(),
                "invalid --edits-dir {}: the path is not valid UTF-8",
                d.display()
            );
            Some(canonical)
        }
    };
    Ok(Some(EditPolicy { dir }))
}

/// `--max-connections`, checked against the open-file limit (default: 4096, or what the
/// limit leaves room for).
fn max_connections(a: &ServeArgs) -> Result<usize> {
    let fds = open_file_limit();
    let room = fds.map(|n| n.saturating_sub(RESERVED_FDS));
    match a.max_connections {
        Some(0) => anyhow::bail!("invalid --max-connections 0: must be at least 1"),
        Some(n) => {
            if let (Some(room), Some(fds)) = (room, fds) {
                anyhow::ensure!(
                    n <= room,
                    "invalid --max-connections {n}: the open-file limit is {fds} (ulimit -n), which leaves room for {room} connections"
                );
            }
            Ok(n)
        }
        None => {
            let n = room.map_or(quarry_server::DEFAULT_MAX_CONNECTIONS, |r| {
                r.min(quarry_server::DEFAULT_MAX_CONNECTIONS)
            });
            anyhow::ensure!(
                n >= 1,
                "the open-file limit ({} , ulimit -n) leaves no room for connections",
                fds.unwrap_or(0)
            );
            Ok(n)
        }
    }
}

/// The soft limit on open files (Linux: /proc/self/limits), if known.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(usize::MAX),
        n => n.parse().ok(),
    }
}

/// The KV cache's size in bytes: `--kv-mem`, or room for `--parallel` full contexts; refused
/// when it does not fit this machine's available memory.
fn kv_bytes(a: &ServeArgs, context: usize, bytes_per_position: usize) -> Result<usize> {
    let (bytes, what, advice) = match a.kv_mem {
        Some(mib) => (
            mib.checked_mul(1 << 20),
            format!("--kv-mem {mib} asks for"),
            "lower --kv-mem",
        ),
        None => (
            context
                .next_multiple_of(BLOCK_SIZE)
                .checked_mul(bytes_per_position)
                .and_then(|b| b.checked_mul(a.parallel)),
            format!(
                "--parallel {} × --ctx {context} need a KV cache of",
                a.parallel
            ),
            "lower --parallel or --ctx, or set a smaller --kv-mem",
        ),
    };
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let Some(bytes) = bytes else {
        anyhow::bail!("{what} more memory than this machine can address: {advice}");
    };
    if let Some(limits::Memory { total, available }) = limits::memory() {
        let (total, available) = (total as usize, available as usize);
        anyhow::ensure!(
            bytes <= available,
            "{what} {:.1} GiB, but this machine has {:.1} GiB available ({:.1} GiB in all): {advice}",
            gib(bytes),
            gib(available),
            gib(total)
        );
    }
    Ok(bytes)
}

pub fn run(a: ServeArgs) -> Result<()> {
    limit_malloc_arenas();
    check_flags(&a)?;
    let max_connections = max_connections(&a)?;
    init_threads(a.threads)?;
    let edits = edit_policy(&a)?;
    let is_vindex =
        Path::new(&a.model).is_dir() && !quarry_model::hf::is_hf_dir(Path::new(&a.model));
    let (model_path, vindex) = if is_vindex {
        // Opened (and validated) once: every knowledge statement runs on a clone of this
        // executor, over the same memory-mapped vindex.
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
        let served = ServedVindex {
            id,
            executor,
            parallel: a.knowledge_parallel,
            edits,
        };
        (path, Some(served))
    } else {
        let path = models::resolve(&a.model)?;
        // Editing a model file needs an executor over it (INFER, TRACE and the editing
        // statements run on a model file); without edits it serves generation only.
        let served = match edits {
            None => None,
            Some(edits) => Some(ServedVindex {
                id: model_id(&path),
                executor: Executor::with_vindex(&path)
                    .with_context(|| format!("opening {} for editing", path.display()))?,
                parallel: a.knowledge_parallel,
                edits: Some(edits),
            }),
        };
        (path, served)
    };
    // One copy of the weights: the executor's model (loaded here, before any statement
    // needs it) is the one the engine runs, so edits are solved on exactly those weights.
    let model = match &vindex {
        Some(v) => v.executor.model()?,
        None => Model::load(crate::commands::open(&model_path.to_string_lossy())?)?,
    };
    // With --lora the adapter is the overlay generation starts under.
    let model = crate::commands::on_device(with_lora(model, a.lora.as_deref())?)?;
    // The server lives as long as the process: the tokenizer and template are leaked so that
    // request handlers on any thread can borrow them (the engine thread owns the model).
    let tokenizer: &'static Tokenizer = Box::leak(Box::new(Tokenizer::from_gguf(model.file())?));
    let template: &'static ChatTemplate =
        Box::leak(Box::new(ChatTemplate::from_gguf(model.file(), tokenizer)?));
    let cfg = model.config();
    let context = match a.ctx {
        Some(ctx) => limits::context("--ctx", ctx, 2, cfg)?,
        None => cfg.context_length.min(DEFAULT_CTX_LIMIT),
    };
    anyhow::ensure!(
        context >= 2,
        "the model's context ({context} tokens, context_length) is too short to serve"
    );
    let bytes_per_position = cfg.n_layers * 2 * cfg.kv_dim() * quarry_model::KV_BYTES_PER_VALUE;
    let kv_bytes = kv_bytes(&a, context, bytes_per_position)?;
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
    let model_id = model_id(&model_path);
    let app = router(
        handle.clone(),
        tokenizer,
        template,
        ServerConfig {
            model_id,
            api_key: a.api_key,
            request_timeout: Duration::from_secs(a.timeout),
            queue_timeout: Duration::from_secs(a.queue_timeout),
            body_read_timeout: quarry_server::DEFAULT_BODY_READ_TIMEOUT,
            vindex,
        },
    );
    let limits = quarry_server::Limits {
        max_connections,
        header_read_timeout: Duration::from_secs(a.header_timeout),
    };
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
            "quarry serve: {} ({} sequences × {context} tokens, KV {} MiB, at most {max_connections} connections); listening on http://{addr}",
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
        quarry_server::serve_with(listener, app, limits, shutdown)
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

/// The served model's id: its file's stem.
fn model_id(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
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

/// Caps glibc's malloc at two arenas for the server. By default glibc gives threads that
/// allocate at once their own arena, up to eight per core, and each keeps its freed memory: with
/// requests tokenized and knowledge statements run on tokio's blocking threads, a 600-s soak
/// grew the server to 2.2 GiB RSS where two arenas hold it near 0.8 GiB (the same as with
/// `MALLOC_ARENA_MAX=2`). Elsewhere the C library's default stands.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tuning parameter of the allocator; it is called before the
    // server starts its threads, and a refusal (return 0) leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
