//! The subcommands. Each returns `anyhow::Result`; `main` turns errors into one line + exit 1.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quarry_engine::{perplexity as ppl, GenerateOptions, Generation, SamplingParams, Session};
use quarry_format::GgmlType;
use quarry_format::GgufFile;
use quarry_model::hf::{open_hf_dir, QUANTIZE_TYPES};
use quarry_model::{read_adapter, Model};
use quarry_tokenize::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::json;

use crate::limits::{self, check_memory, forward_bytes, kv_bytes};
use crate::{
    models, BenchArgs, ChatArgs, GenArgs, InfoArgs, PerplexityArgs, RunArgs, TokenizeArgs,
};

/// Largest default context: enough for chat, small enough that the KV cache stays modest.
pub(crate) const DEFAULT_CTX_LIMIT: usize = 4096;

/// How `--quantize` asked safetensors weights to be stored (set once, from the command line).
static QUANTIZE: OnceLock<Option<GgmlType>> = OnceLock::new();

/// Where `--device` asked the forward pass to run (set once, from the command line).
static DEVICE: OnceLock<Device> = OnceLock::new();

/// The `--device` choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU kernels (the default).
    Cpu,
    /// The first GPU adapter wgpu finds, software ones (lavapipe) included; an error if none.
    Gpu,
    /// A discrete or integrated GPU if there is one, else the CPU.
    Auto,
}

/// Records `--device` for every model `run`, `chat`, `perplexity`, `bench` and `serve` load.
pub(crate) fn set_device(device: Device) {
    DEVICE.get_or_init(|| device);
}

/// The GPU `--device` asks for, `None` for the CPU; says on stderr why `auto` stays on the
/// CPU.
fn chosen_gpu() -> Result<Option<quarry_gpu::Gpu>> {
    match DEVICE.get().copied().unwrap_or(Device::Cpu) {
        Device::Cpu => Ok(None),
        Device::Gpu => Ok(Some(quarry_gpu::Gpu::new().context("--device gpu")?)),
        Device::Auto => match quarry_gpu::Gpu::new() {
            Ok(gpu) if gpu.adapter().kind != quarry_gpu::DeviceKind::Cpu => Ok(Some(gpu)),
            Ok(gpu) => {
                eprintln!(
                    "device: cpu (--device auto: the only GPU adapter, {}, is a software one)",
                    gpu.adapter().name
                );
                Ok(None)
            }
            Err(e) => {
                eprintln!("device: cpu (--device auto: {e})");
                Ok(None)
            }
        },
    }
}

/// What to do when a model cannot go to the GPU: `auto` says why and stays on the CPU
/// (`None`), `gpu` fails.
fn device_refused(e: quarry_model::ModelError) -> Result<()> {
    match DEVICE.get() {
        Some(Device::Auto) => {
            eprintln!("device: cpu (--device auto: {e})");
            Ok(())
        }
        _ => Err(e).context("--device gpu"),
    }
}

/// `model` (already loaded for the CPU) on the device `--device` names; says where it runs
/// on stderr when that is not the CPU.
pub(crate) fn on_device(model: Model) -> Result<Model> {
    let Some(gpu) = chosen_gpu()? else {
        return Ok(model);
    };
    match model.on_device(quarry_gpu::GpuBackend::new(gpu)) {
        Ok(on_gpu) => {
            eprintln!("device: {}", on_gpu.device().unwrap_or_default());
            Ok(on_gpu)
        }
        Err(e) => device_refused(e).map(|()| model),
    }
}

/// Records `--quantize` (`q8_0`, `q4_k`; any case) for every model this process opens.
pub(crate) fn set_quantize(name: Option<&str>) -> Result<()> {
    let dtype = match name {
        None => None,
        Some(name) => Some(
            QUANTIZE_TYPES
                .iter()
                .copied()
                .find(|t| t.to_string().eq_ignore_ascii_case(name))
                .with_context(|| format!("--quantize {name}: not offered (q8_0 or q4_k)"))?,
        ),
    };
    QUANTIZE.get_or_init(|| dtype);
    Ok(())
}

/// The model `model` names: a GGUF file, a model alias, or a Hugging Face directory
/// (`config.json` and safetensors), converted in memory and quantized as `--quantize` says.
pub(crate) fn open(model: &str) -> Result<Arc<GgufFile>> {
    let path = models::resolve(model)?;
    let quantize = QUANTIZE.get().copied().flatten();
    if path.is_dir() {
        return Ok(open_hf_dir(&path, quantize)?);
    }
    if let Some(q) = quantize {
        anyhow::bail!(
            "--quantize {q} converts a safetensors directory; {} is a GGUF file, whose \
             types are its own",
            path.display()
        );
    }
    Ok(Arc::new(GgufFile::open(&path)?))
}

/// Loads the model in `file` with the LoRA adapter `lora` (`--lora`), if given, as its
/// overlay: the adapter is opened like any model file (a regular file, validated as GGUF) and
/// checked against the model's shapes; every error names the adapter file. On the device
/// `--device` names, when it can run there.
pub(crate) fn load_model(file: Arc<GgufFile>, lora: Option<&Path>) -> Result<Model> {
    if lora.is_some() {
        // The device refuses the adapter's overlay (or `auto` stays on the CPU) by name.
        return on_device(with_lora(Model::load(file)?, lora)?);
    }
    if let Some(gpu) = chosen_gpu()? {
        // Loaded for the GPU: no host copies of the weights beside the device's.
        match Model::load_on_device(Arc::clone(&file), quarry_gpu::GpuBackend::new(gpu)) {
            Ok(model) => {
                eprintln!("device: {}", model.device().unwrap_or_default());
                return Ok(model);
            }
            Err(e) => device_refused(e)?,
        }
    }
    Ok(Model::load(file)?)
}

/// `model` with the LoRA adapter `lora` as its overlay, if given (see [`load_model`]).
pub(crate) fn with_lora(model: Model, lora: Option<&Path>) -> Result<Model> {
    let Some(path) = lora else {
        return Ok(model);
    };
    // The adapter's data is copied into the overlay, so its file need not stay open.
    let adapter = GgufFile::open(path).context("--lora")?;
    let overlay = read_adapter(&adapter, model.config()).context("--lora")?;
    model
        .with_overlay(Some(Arc::new(overlay)))
        .with_context(|| format!("--lora {}", path.display()))
}

/// Checks `--threads` (default: one thread per physical core, like llama.cpp) and starts the
/// pool; a thread the OS refuses is an error, not a panic.
pub(crate) fn init_threads(threads: Option<usize>) -> Result<()> {
    let n = limits::threads(threads)?;
    quarry_kernels::pool::set_global_threads(n)
        .with_context(|| format!("--threads {n}: starting the thread pool"))?;
    Ok(())
}

fn generate_options(g: &GenArgs, stop_at_eog: bool) -> GenerateOptions {
    GenerateOptions {
        max_tokens: g.n_predict,
        sampling: SamplingParams {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            min_p: g.min_p,
            repeat_penalty: g.repeat_penalty,
            frequency_penalty: g.frequency_penalty,
            presence_penalty: g.presence_penalty,
            penalty_last_n: g.repeat_last_n,
            seed: g.seed,
        },
        stop: g.stop.clone(),
        stop_at_eog,
    }
}

/// What can be checked of the generation options before the model is loaded.
fn check_gen_args(g: &GenArgs) -> Result<()> {
    limits::stop_strings(&g.stop)?;
    Ok(())
}

/// The context of a session (`--ctx`, default: the model's, at most [`DEFAULT_CTX_LIMIT`]),
/// checked against the model's trained context and against memory for its KV cache and a
/// forward pass over a prompt that fills it.
fn context_size(g: &GenArgs, model: &Model) -> Result<usize> {
    let cfg = model.config();
    let ctx = match g.ctx {
        Some(ctx) => limits::context("--ctx", ctx, 2, cfg)?,
        None => cfg.context_length.min(DEFAULT_CTX_LIMIT),
    };
    check_memory(
        &format!("--ctx {ctx}: the KV cache and a forward pass over the context"),
        kv_bytes(cfg, ctx) + forward_bytes(cfg, ctx, 1),
    )?;
    Ok(ctx)
}

fn tok_per_s(tokens: usize, time: Duration) -> f64 {
    tokens as f64 / time.as_secs_f64().max(1e-9)
}

fn print_timings(g: &Generation, load: Duration) {
    eprintln!(
        "\n[load {:.0} ms | prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | finish: {}]",
        load.as_secs_f64() * 1e3,
        g.prompt_eval_tokens,
        tok_per_s(g.prompt_eval_tokens, g.prompt_eval_time),
        g.decode_tokens,
        tok_per_s(g.decode_tokens, g.decode_time),
        g.finish.as_str()
    );
}

pub fn run(a: RunArgs) -> Result<()> {
    check_gen_args(&a.gen)?;
    init_threads(a.gen.threads)?;
    let t0 = Instant::now();
    let file = open(&a.model)?;
    let model = load_model(Arc::clone(&file), a.gen.lora.as_deref())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let load = t0.elapsed();
    let context = context_size(&a.gen, &model)?;
    let prompt = tokenizer.encode(&a.prompt, !a.no_bos, true);
    let mut session = Session::new(&model, &tokenizer, context);
    let options = generate_options(&a.gen, true);
    let mut out = io::stdout().lock();
    let json = a.json;
    let g = session.generate(&prompt, &options, |piece| {
        if !json {
            // A closed stdout (e.g. `| head`) must not abort generation with a panic.
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
    })?;
    if json {
        let v = json!({
            "model": file.source(),
            "prompt": a.prompt,
            "prompt_ids": prompt,
            "ids": g.tokens,
            "text": g.text,
            "finish_reason": g.finish.as_str(),
            "timings": {
                "load_ms": load.as_secs_f64() * 1e3,
                "prompt_tokens": g.prompt_eval_tokens,
                "prompt_ms": g.prompt_eval_time.as_secs_f64() * 1e3,
                "prompt_tok_s": tok_per_s(g.prompt_eval_tokens, g.prompt_eval_time),
                "decode_tokens": g.decode_tokens,
                "decode_ms": g.decode_time.as_secs_f64() * 1e3,
                "decode_tok_s": tok_per_s(g.decode_tokens, g.decode_time),
            }
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
        print_timings(&g, load);
    }
    Ok(())
}

pub fn chat(a: ChatArgs) -> Result<()> {
    check_gen_args(&a.gen)?;
    init_threads(a.gen.threads)?;
    let t0 = Instant::now();
    let file = open(&a.model)?;
    let model = load_model(Arc::clone(&file), a.gen.lora.as_deref())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let template = ChatTemplate::from_gguf(&file, &tokenizer)?;
    let load = t0.elapsed();
    if template.is_fallback() {
        eprintln!("note: {}", template.description());
    }
    let context = context_size(&a.gen, &model)?;
    let mut session = Session::new(&model, &tokenizer, context);
    let options = generate_options(&a.gen, true);
    let mut messages = Vec::new();
    if let Some(system) = &a.system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    eprintln!("[chat with {}; end with Ctrl-D or /exit]", file.source());
    let mut stdin = io::stdin().lock();
    loop {
        eprint!("> ");
        let Some(line) = limits::read_line(&mut stdin)? else {
            break;
        };
        let line = line.trim();
        if line == "/exit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: line.to_string(),
        });
        // Special tokens are parsed in the template's markup only; contents stay text.
        let mut prompt = template.render(&messages, true)?.encode(&tokenizer);
        // Templates normally spell out BOS; add it when the model wants one and it is missing.
        if let Some(bos) = tokenizer.bos_id().filter(|_| tokenizer.add_bos()) {
            if prompt.first() != Some(&bos) {
                prompt.insert(0, bos);
            }
        }
        let mut out = io::stdout().lock();
        let g = session.generate(&prompt, &options, |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        drop(out);
        print_timings(&g, load);
        messages.push(ChatMessage {
            role: "assistant".into(),
            content: g.text.trim().to_string(),
        });
    }
    Ok(())
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    if a.chunks == Some(0) {
        anyhow::bail!("invalid --chunks 0: must be at least 1");
    }
    init_threads(a.threads)?;
    let text = limits::read_text(
        &a.file,
        limits::PERPLEXITY_TEXT_MAX,
        "perplexity text",
        "a perplexity text",
    )?;
    let file = open(&a.model)?;
    let model = load_model(Arc::clone(&file), a.lora.as_deref())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    // The window is evaluated whole, and its scored half projected a few rows at a time.
    let cfg = model.config();
    limits::context("--ctx", a.ctx, ppl::MIN_CTX, cfg)?;
    check_memory(
        &format!(
            "--ctx {}: the KV cache and a forward pass over one window",
            a.ctx
        ),
        kv_bytes(cfg, a.ctx) + forward_bytes(cfg, a.ctx, ppl::LOGIT_ROWS_PER_PASS),
    )?;
    let mut tokens = tokenizer.encode(&text, true, true);
    if let Some(max) = a.chunks {
        tokens.truncate(max.saturating_mul(a.ctx));
    }
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    let bar = ProgressBar::new((tokens.len() / a.ctx.max(1)) as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} perplexity [{bar:30}] {pos}/{len} chunks {msg} ({eta})",
        )
        .expect("valid template"),
    );
    let t0 = Instant::now();
    let report = ppl::perplexity(&model, &tokens, a.ctx, bos, |_, _, running| {
        bar.inc(1);
        bar.set_message(format!("ppl {running:.4}"));
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let v = json!({
            "model": file.source(),
            "file": a.file,
            "tokens": tokens.len(),
            "ctx": report.ctx,
            "chunks": report.chunks,
            "scored_tokens": report.scored_tokens,
            "ppl": report.ppl,
            "ppl_stderr": report.ppl_stderr,
            "running_ppl": report.running_ppl,
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "PPL = {:.4} +/- {:.4} ({} chunks of {} tokens, {} scored, {:.1} s)",
            report.ppl, report.ppl_stderr, report.chunks, report.ctx, report.scored_tokens, secs
        );
    }
    Ok(())
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let file = open(&a.model)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let ids = tokenizer.encode(&a.text, !a.no_bos, !a.no_parse_special);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| {
            if tokenizer.is_control(id) {
                tokenizer.token_text(id).to_string()
            } else {
                String::from_utf8_lossy(&tokenizer.token_bytes(id)).into_owned()
            }
        })
        .collect();
    if a.json {
        println!("{}", json!({ "ids": ids, "pieces": pieces }));
    } else {
        for (id, piece) in ids.iter().zip(&pieces) {
            println!("{id:>8} -> {piece:?}");
        }
    }
    Ok(())
}

pub fn info(a: InfoArgs) -> Result<()> {
    if a.devices {
        return list_devices(a.json);
    }
    let Some(model) = &a.model else {
        anyhow::bail!("info needs a model (or --devices)");
    };
    let file = open(model)?;
    let model = Model::load(Arc::clone(&file))?;
    let c = model.config();
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut params = 0u64;
    for t in file.tensors() {
        let e = by_type.entry(t.dtype.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
        params += t.n_elements();
    }
    // A Hugging Face directory's size is its files'; a GGUF file's its own.
    let source = Path::new(file.source());
    let size = match std::fs::read_dir(source) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(source).map(|m| m.len()).unwrap_or(0),
    };
    let name = file
        .get("general.name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if a.json {
        let types: serde_json::Map<String, serde_json::Value> = by_type
            .iter()
            .map(|(k, (n, b))| (k.clone(), json!({ "tensors": n, "bytes": b })))
            .collect();
        let v = json!({
            "file": file.source(), "name": name, "size_bytes": size, "gguf_version": file.version(),
            "architecture": c.architecture, "parameters": params,
            "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "ff_dim": c.ff_dim,
            "vocab_size": c.vocab_size, "context_length": c.context_length,
            "norm_eps": c.norm_eps, "activation": format!("{:?}", c.activation),
            "rope_style": format!("{:?}", c.rope_style), "rope_base": c.rope_base,
            "rope_base_local": c.rope_base_local, "sliding_window": c.sliding_window,
            "experts": c.experts.as_ref().map(|e| json!({
                "count": e.count, "used": e.used, "ff_dim": e.ff_dim,
                "shared_ff_dim": e.shared_ff_dim, "normalized": e.normalize,
            })),
            "global_layers": c.global_layers.iter().enumerate().filter(|(_, g)| **g).map(|(i, _)| i).collect::<Vec<_>>(),
            "attn_softcap": c.attn_softcap, "final_softcap": c.final_softcap,
            "embed_scale": c.embed_scale, "tensor_types": types,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "file          {} ({:.1} MiB, {})",
        file.source(),
        size as f64 / 1048576.0,
        match source.is_dir() {
            true => "Hugging Face safetensors".to_string(),
            false => format!("GGUF v{}", file.version()),
        }
    );
    println!("name          {name}");
    println!(
        "architecture  {} ({:.1} M parameters)",
        c.architecture,
        params as f64 / 1e6
    );
    println!("layers        {}", c.n_layers);
    println!(
        "d_model       {}   ff {}   vocab {}",
        c.d_model, c.ff_dim, c.vocab_size
    );
    println!(
        "heads         {} query / {} kv, head dim {}",
        c.n_heads, c.n_kv_heads, c.head_dim
    );
    println!("context       {}", c.context_length);
    println!("norm          RMSNorm eps {:e}", c.norm_eps);
    println!("activation    {:?}", c.activation);
    println!(
        "rope          {:?}, {} dims, base {} (local {})",
        c.rope_style, c.rope_dims, c.rope_base, c.rope_base_local
    );
    if let Some(w) = c.sliding_window {
        let globals: Vec<usize> = c
            .global_layers
            .iter()
            .enumerate()
            .filter(|(_, g)| **g)
            .map(|(i, _)| i)
            .collect();
        println!("sliding       window {w}; global layers {globals:?}");
    }
    if let Some(e) = &c.experts {
        println!(
            "experts       {} per layer, {} used per token{}, ff {}",
            e.count,
            e.used,
            if e.normalize {
                " (weights renormalised)"
            } else {
                ""
            },
            e.ff_dim
        );
    }
    println!("tensors       {}", file.tensors().len());
    for (t, (n, bytes)) in &by_type {
        println!(
            "  {t:<6} {n:>4} tensors {:>9.1} MiB",
            *bytes as f64 / 1048576.0
        );
    }
    Ok(())
}

/// `info --devices`: every adapter wgpu finds, best first (the one `--device gpu` takes), and
/// whether `--device auto` would use it.
fn list_devices(json_out: bool) -> Result<()> {
    let adapters = quarry_gpu::list_adapters();
    let auto = |a: &quarry_gpu::AdapterSummary| a.kind != quarry_gpu::DeviceKind::Cpu;
    if json_out {
        let list: Vec<serde_json::Value> = adapters
            .iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "backend": a.backend,
                    "kind": format!("{:?}", a.kind),
                    "driver": a.driver,
                    "max_binding_bytes": a.max_binding_bytes,
                    "auto": auto(a),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "adapters": list }))?
        );
        return Ok(());
    }
    if adapters.is_empty() {
        println!("no GPU adapter (Vulkan, Metal or DX12); --device gpu fails, auto uses the CPU");
    }
    for (i, a) in adapters.iter().enumerate() {
        let used = match (i, auto(a)) {
            (0, true) => "  [--device gpu, --device auto]",
            (0, false) => "  [--device gpu; auto skips software adapters]",
            _ => "",
        };
        println!("{i}: {a}{used}");
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    crate::bench::check_args(&a)?;
    init_threads(a.threads)?;
    let file = open(&a.model)?;
    let model = load_model(Arc::clone(&file), a.lora.as_deref())?;
    crate::bench::check_sizes(&a, model.config())?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
    crate::bench::run(&model, file.source(), bos, &a)
}
