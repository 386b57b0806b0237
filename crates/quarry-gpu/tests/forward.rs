//! The whole forward pass on the GPU (`Model::on_device` with `GpuBackend`) against the CPU
//! backend, on both real models, on whatever adapter is present (Mesa's lavapipe in CI):
//! - along llama.cpp's greedy path (prefill, then one token at a time through the keys and
//!   values kept on the device), the GPU's argmax equals the CPU's at every step where
//!   llama.cpp's own top-1/top-2 gap (`step_top1_minus_top2` in
//!   `fixtures/goldens/llamacpp.json`) is at least 0.5;
//! - after each golden prompt, the GPU's logits equal transformers' `f32` logits;
//! - perplexity on the golden text lies within 0.5% of the CPU's over the same windows.

use std::sync::Arc;
use std::time::Instant;

use quarry_engine::perplexity::perplexity;
use quarry_fixtures::{
    argmax, assert_family_logits, family_dir, family_ids, ids, model_goldens, model_path,
    perplexity_text, TestModel, FAMILIES,
};
use quarry_format::GgufFile;
use quarry_gpu::GpuBackend;
use quarry_model::Model;
use quarry_tokenize::Tokenizer;

mod common;
use common::test_gpu;

const DECISIVE_GAP: f64 = 0.5;

/// How far a first-position logit may lie from transformers' (f32 over the dequantized
/// weights, `hf_dequant_f32.<prompt>.hf_top5_first`). The GPU multiplies `f32` activations
/// by the decoded weights, so it is exact up to summation order; the CPU, like llama.cpp,
/// multiplies 8-bit activations and lies up to 0.36 away.
const TRANSFORMERS_TOLERANCE: f64 = 0.01;

/// Perplexity windows of 128 tokens (64 scored each), the first ones of the text: enough to
/// tell a wrong kernel from rounding (a broken norm, rotation or mask moves PPL by far more than
/// 0.5%), few enough for a software adapter.
const PPL_CTX: usize = 128;

/// Windows per model. The CPU multiplies 8-bit activations and the GPU `f32` ones, so their
/// per-token NLLs differ by rounding; the mean settles as tokens are added. Measured on
/// SmolLM2 (Q4_1, whose small model feels the rounding most): 4 windows +1.2%, 16 windows
/// -0.04%. Gemma 3: 4 windows -0.33%. Gemma's 262 144-token head makes its windows 3x slower on
/// lavapipe, so it gets 4.
fn ppl_chunks(model: TestModel) -> usize {
    match model {
        TestModel::SmolLm2 => 16,
        TestModel::Gemma3 => 4,
    }
}

/// The model on the CPU and, loaded for it, on the GPU (`None` where there is no adapter and
/// `QUARRY_GPU_TESTS=skip`).
fn models(model: TestModel) -> Option<(Model, Model)> {
    let gpu = test_gpu()?;
    let file = Arc::new(GgufFile::open(model_path(model)).unwrap());
    let cpu = Model::load(Arc::clone(&file)).unwrap();
    let t = Instant::now();
    // Loaded for the device, as the CLI does (the family test covers `on_device` of a CPU
    // model).
    let on_gpu = Model::load_on_device(file, GpuBackend::new(gpu)).unwrap();
    eprintln!(
        "{model:?}: weights uploaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Some((cpu, on_gpu))
}

/// The logits of the prompt's last token and then of each of `forced` fed one decode step at
/// a time (the GPU keeps the keys and values on the device), `vocab` per step.
fn decode_along(m: &Model, prompt: &[u32], forced: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = m.new_cache(prompt.len() + forced.len());
    let n = prompt.len();
    let mut steps = vec![m.forward(prompt, &mut cache, n - 1..n).unwrap()];
    for &id in &forced[..forced.len() - 1] {
        steps.push(m.forward(&[id], &mut cache, 0..1).unwrap());
    }
    steps
}

/// The GPU's logits after each golden prompt equal transformers' f32 logits.
fn first_logits_match_transformers(model: TestModel) {
    let Some((_, gpu)) = models(model) else {
        return;
    };
    let goldens = model_goldens(model);
    let (mut checked, mut largest) = (0, 0.0f64);
    for (prompt, hf) in goldens["hf_dequant_f32"].as_object().unwrap() {
        if prompt == "hf_tokenize" {
            continue;
        }
        let prompt_ids = ids(&goldens["greedy_fa_on"][prompt]["model_default"]["prompt_ids"]);
        let n = prompt_ids.len();
        let logits = gpu
            .forward(&prompt_ids, &mut gpu.new_cache(n), n - 1..n)
            .unwrap();
        for entry in hf["hf_top5_first"].as_array().unwrap() {
            let id = entry["id"].as_u64().unwrap() as usize;
            let reference = entry["logit"].as_f64().unwrap();
            let ours = logits[id] as f64;
            assert!(
                (ours - reference).abs() <= TRANSFORMERS_TOLERANCE,
                "{model:?} {prompt:?} token {id}: GPU logit {ours}, transformers {reference}"
            );
            checked += 1;
            largest = largest.max((ours - reference).abs());
        }
    }
    assert!(checked >= 10, "expected two prompts of five logits");
    eprintln!(
        "{model:?}: {checked} first-position logits within {TRANSFORMERS_TOLERANCE} of \
         transformers' (largest difference {largest:.2e})"
    );
}

/// Along llama.cpp's greedy path, the GPU's argmax is the CPU's at every decisive step.
fn greedy_equals_cpu(model: TestModel) {
    let Some((cpu, gpu)) = models(model) else {
        return;
    };
    for (prompt, variants) in model_goldens(model)["greedy_fa_off"].as_object().unwrap() {
        for (variant, g) in variants.as_object().unwrap() {
            let prompt_ids = ids(&g["prompt_ids"]);
            let path = ids(&g["greedy_ids"]);
            let gaps = g["step_top1_minus_top2"].as_array().unwrap();
            let t = Instant::now();
            let on_gpu = decode_along(&gpu, &prompt_ids, &path);
            let gpu_s = t.elapsed().as_secs_f64();
            let on_cpu = decode_along(&cpu, &prompt_ids, &path);
            let (mut decisive, mut max_diff) = (0, 0.0f32);
            for (step, (a, b)) in on_gpu.iter().zip(&on_cpu).enumerate() {
                let diff = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                max_diff = max_diff.max(diff);
                if gaps[step].as_f64().unwrap() >= DECISIVE_GAP {
                    decisive += 1;
                    assert_eq!(
                        argmax(a),
                        argmax(b),
                        "{model:?} {prompt:?} ({variant}) step {step}: GPU and CPU argmax differ \
                         (llama.cpp's gap {})",
                        gaps[step]
                    );
                }
            }
            assert!(decisive >= 8, "too few decisive steps to compare");
            eprintln!(
                "{model:?} {prompt:?} ({variant}): GPU argmax equals the CPU's on {decisive}/{} \
                 decisive steps; max |logit difference| {max_diff:.3} ({gpu_s:.1} s on the GPU)",
                path.len()
            );
        }
    }
}

fn perplexity_near_cpu(model: TestModel) {
    let Some((cpu, gpu)) = models(model) else {
        return;
    };
    let tok = Tokenizer::from_gguf(cpu.file()).unwrap();
    let mut tokens = tok.encode(&perplexity_text(), true, true);
    tokens.truncate(PPL_CTX * ppl_chunks(model));
    let bos = tok.bos_id().filter(|_| tok.add_bos());
    let t = Instant::now();
    let on_gpu = perplexity(&gpu, &tokens, PPL_CTX, bos, |_, _, _| {}).unwrap();
    let gpu_s = t.elapsed().as_secs_f64();
    let on_cpu = perplexity(&cpu, &tokens, PPL_CTX, bos, |_, _, _| {}).unwrap();
    let rel = (on_gpu.ppl - on_cpu.ppl).abs() / on_cpu.ppl;
    eprintln!(
        "{model:?}: PPL (ctx {PPL_CTX}, {} chunks) GPU {:.4} CPU {:.4} ({:+.3}%), {gpu_s:.1} s \
         on the GPU",
        on_gpu.chunks,
        on_gpu.ppl,
        on_cpu.ppl,
        100.0 * (on_gpu.ppl - on_cpu.ppl) / on_cpu.ppl
    );
    assert_eq!(on_gpu.chunks, ppl_chunks(model));
    assert!(
        rel < 0.005,
        "{model:?}: GPU PPL {} vs CPU {}",
        on_gpu.ppl,
        on_cpu.ppl
    );
}

#[test]
fn smollm2_greedy_on_the_gpu_equals_the_cpu() {
    greedy_equals_cpu(TestModel::SmolLm2);
}

#[test]
fn gemma3_greedy_on_the_gpu_equals_the_cpu() {
    greedy_equals_cpu(TestModel::Gemma3);
}

#[test]
fn smollm2_perplexity_on_the_gpu_matches_the_cpu() {
    perplexity_near_cpu(TestModel::SmolLm2);
}

#[test]
fn gemma3_perplexity_on_the_gpu_matches_the_cpu() {
    perplexity_near_cpu(TestModel::Gemma3);
}

#[test]
fn smollm2_first_logits_on_the_gpu_equal_transformers() {
    first_logits_match_transformers(TestModel::SmolLm2);
}

#[test]
fn gemma3_first_logits_on_the_gpu_equal_transformers() {
    first_logits_match_transformers(TestModel::Gemma3);
}

/// Every family of the tiny reference models (`fixtures/families/`, scripts/make-fixtures) on
/// the GPU: the f32 GGUF, teacher-forced over the fixture's ids, gives transformers' f32 logits
/// (max abs difference ≤ 1e-3 × their range, as on the CPU). This runs what the real models
/// do not: QKV biases (Qwen 2), QK-norm (Qwen 3, OLMo 2), post-norms without pre-norms
/// (OLMo 2), soft-caps and a sliding window shorter than the ids (Gemma 2), fused QKV and
/// gate-up (Phi-3), LongRoPE and YaRN, and mixtures of experts (Mixtral, OLMoE, Qwen 2 MoE
/// with its gated shared expert, Qwen 3 MoE), routed on the host.
#[test]
fn every_family_on_the_gpu_equals_transformers() {
    let Some(gpu) = test_gpu() else { return };
    for family in FAMILIES {
        let dir = family_dir(family);
        let file = Arc::new(GgufFile::open(dir.join("model-f32.gguf")).unwrap());
        let model = Model::load(file)
            .unwrap()
            .on_device(GpuBackend::new(gpu.clone()))
            .unwrap();
        let ids = family_ids(family);
        let logits = model
            .forward(&ids, &mut model.new_cache(ids.len()), 0..ids.len())
            .unwrap();
        assert_family_logits(family, "GGUF on the GPU", &logits);
    }
}

/// What the GPU backend does not run is refused in one named error, not run wrongly: edit
/// overlays, observed forward passes, a cache whose positions it does not hold.
#[test]
fn what_the_gpu_does_not_run_is_refused_by_name() {
    let Some((cpu, gpu)) = models(TestModel::SmolLm2) else {
        return;
    };
    let ids = [1u32, 2, 3];
    // A cache filled on the CPU holds no device keys and values.
    let mut cache = cpu.new_cache(8);
    cpu.forward(&ids, &mut cache, 2..3).unwrap();
    let err = gpu.forward(&[4], &mut cache, 0..1).unwrap_err().to_string();
    assert!(err.contains("not on the"), "{err}");
    // Nor does a clone of a cache the GPU filled.
    let mut cache = gpu.new_cache(8);
    gpu.forward(&ids, &mut cache, 2..3).unwrap();
    let mut cloned = cache.clone();
    assert!(gpu.forward(&[4], &mut cloned, 0..1).is_err());
    assert!(gpu.forward(&[4], &mut cache, 0..1).is_ok());
    struct Watch;
    impl quarry_model::ForwardObserver for Watch {}
    let err = gpu
        .forward_observed(&ids, &mut gpu.new_cache(8), 2..3, &mut Watch)
        .unwrap_err()
        .to_string();
    assert!(err.contains("observed"), "{err}");
    let overlay = quarry_model::FfnOverlay::new(cpu.config().n_layers, []);
    let err = gpu
        .with_overlay(Some(Arc::new(overlay)))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("overlay"), "{err}");
    let err = gpu
        .forward(&[u32::MAX], &mut gpu.new_cache(8), 0..1)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

/// The batching engine (what `serve` runs) over the GPU model: concurrent greedy requests,
/// then prompts that start like earlier ones (their keys and values taken from the device's
/// prefix cache: whole blocks, and part of a block copied on the device), give what a lone
/// session on the GPU gives.
#[test]
fn the_engine_on_the_gpu_equals_lone_gpu_sessions() {
    use quarry_engine::{
        Engine, EngineConfig, EngineHandle, Event, GenerateOptions, Request, SamplingParams,
        Session,
    };
    let Some((_, gpu)) = models(TestModel::SmolLm2) else {
        return;
    };
    let tokenizer = Tokenizer::from_gguf(gpu.file()).unwrap();
    let options = GenerateOptions {
        max_tokens: 12,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_at_eog: true,
    };
    let config = EngineConfig {
        parallel: 3,
        context: 256,
        kv_bytes: 64 << 20,
        block_size: 16,
        step_tokens: 24,
        queue_timeout: std::time::Duration::from_secs(600),
    };
    let planets =
        "Here is a list of the planets of the solar system, in order from the sun: Mercury,";
    let encode = |t: &str| tokenizer.encode(t, true, true);
    let first = [
        "The capital of France is",
        planets,
        "The capital of France is",
        "def fibonacci(n):",
    ];
    // The same prompt again (its first block cached), and one whose start agrees with the
    // middle of a cached block.
    let second = [planets, "Here is a list of the planets of the solar"];
    // Each request's tokens and the prompt tokens it took from the cache.
    let wave = |handle: &EngineHandle, prompts: &[Vec<u32>]| {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, p) in prompts.iter().enumerate() {
            let tx = tx.clone();
            let request = Request {
                prompt: p.clone(),
                options: options.clone(),
                logprobs: None,
                deadline: None,
                cancel: None,
            };
            handle
                .submit(request, Box::new(move |e| tx.send((i, e)).is_ok()))
                .unwrap();
        }
        drop(tx);
        let mut got = vec![(Vec::new(), 0); prompts.len()];
        for (i, event) in rx {
            match event {
                Event::Token { id, .. } => got[i].0.push(id),
                Event::Done { usage, .. } => got[i].1 = usage.cached_tokens,
                Event::Failed(e) => panic!("request {i}: {e}"),
            }
        }
        got
    };
    let first: Vec<Vec<u32>> = first.iter().map(|t| encode(t)).collect();
    let second: Vec<Vec<u32>> = second.iter().map(|t| encode(t)).collect();
    let (engine, handle) = Engine::new(gpu.clone(), &tokenizer, config).unwrap();
    let (got_first, got_second) = std::thread::scope(|s| {
        s.spawn(move || engine.run());
        let got = (wave(&handle, &first), wave(&handle, &second));
        drop(handle);
        got
    });
    let cached: Vec<usize> = got_second.iter().map(|g| g.1).collect();
    assert!(
        cached[0] >= 16,
        "the repeated prompt's first block comes from the cache: {cached:?}"
    );
    assert!(
        cached[1] > 0 && !cached[1].is_multiple_of(16),
        "the shorter prompt takes part of a cached block: {cached:?}"
    );
    for (p, (tokens, _)) in first
        .iter()
        .chain(&second)
        .zip(got_first.iter().chain(&got_second))
    {
        let lone = Session::new(&gpu, &tokenizer, 256)
            .generate(p, &options, |_| {})
            .unwrap();
        assert_eq!(tokens, &lone.tokens, "prompt {p:?}");
    }
}

/// The llama fixture family's model on the test GPU, the GPU handle and the fixture's ids.
fn fixture_on_the_gpu() -> Option<(quarry_gpu::Gpu, Model, Vec<u32>)> {
    let gpu = test_gpu()?;
    let file = Arc::new(GgufFile::open(family_dir("llama").join("model-f32.gguf")).unwrap());
    let model = Model::load(file)
        .unwrap()
        .on_device(GpuBackend::new(gpu.clone()))
        .unwrap();
    Some((gpu, model, family_ids("llama")))
}

/// A device lost mid-run (destroyed here between two forward passes of one sequence) makes
/// the next pass fail with one error naming the loss, never a hang or a panic; so does a new
/// sequence on it.
#[test]
fn a_device_lost_mid_run_is_a_named_error() {
    let Some((gpu, model, ids)) = fixture_on_the_gpu() else {
        return;
    };
    let mut cache = model.new_cache(ids.len() + 1);
    model.forward(&ids, &mut cache, 0..1).unwrap();
    gpu.device().destroy();
    let err = model.forward(&ids[..1], &mut cache, 0..1).unwrap_err();
    assert!(err.to_string().contains("device lost"), "{err}");
    let err = model
        .forward(&ids, &mut model.new_cache(ids.len()), 0..1)
        .unwrap_err();
    assert!(err.to_string().contains("device lost"), "{err}");
}

/// A steady decode step makes few device objects: activations come back from earlier steps
/// and a product's bindings are kept for the buffers it saw last. Each object costs the host
/// time that, on a fast GPU, bounds how fast decode can go.
#[test]
fn a_decode_step_reuses_its_buffers_and_bindings() {
    let Some((gpu, model, ids)) = fixture_on_the_gpu() else {
        return;
    };
    let mut cache = model.new_cache(ids.len() + 12);
    model.forward(&ids, &mut cache, 0..1).unwrap();
    let mut made = Vec::new();
    for step in 0..8 {
        let before = gpu.objects_made();
        let pos = quarry_model::KvCache::len(&cache);
        model
            .forward(&ids[step..step + 1], &mut cache, 0..1)
            .unwrap();
        assert_eq!(quarry_model::KvCache::len(&cache), pos + 1);
        made.push(gpu.objects_made() - before);
    }
    eprintln!("objects made per decode step: {made:?}");
    // After the first steps (which make the spares), none.
    assert!(made[3..].iter().all(|&n| n == 0), "{made:?}");
}

/// A KV cache the device cannot bind is refused where it is asked for, naming the sizes: the
/// engine's pool (as its `kv_bytes`), and a pool of no blocks.
#[test]
fn a_kv_cache_the_device_cannot_bind_is_refused_by_name() {
    use quarry_engine::{Engine, EngineConfig};
    let options = quarry_gpu::GpuOptions {
        max_binding_bytes: Some(1 << 16),
        ..quarry_gpu::GpuOptions::default()
    };
    let Ok(gpu) = quarry_gpu::Gpu::with_options(options) else {
        assert!(test_gpu().is_none(), "an adapter exists but would not open");
        return;
    };
    let file = Arc::new(GgufFile::open(family_dir("llama").join("model-f32.gguf")).unwrap());
    let model = Model::load(file)
        .unwrap()
        .on_device(GpuBackend::new(gpu))
        .unwrap();
    let err = model.device_kv_pool(16, 0).unwrap_err().to_string();
    assert!(err.contains("0 blocks"), "{err}");
    let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
    let config = EngineConfig {
        parallel: 1,
        context: 64,
        kv_bytes: 64 << 20,
        block_size: 16,
        step_tokens: 16,
        queue_timeout: std::time::Duration::from_secs(1),
    };
    let err = Engine::new(model, &tokenizer, config)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("kv_bytes") && err.contains("one binding"),
        "{err}"
    );
}
