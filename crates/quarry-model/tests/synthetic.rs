//! Invariants of the forward pass on tiny random models written with the GGUF writer:
//! batched prefill equals token-by-token decoding through the KV cache, sliding windows really
//! bound what a local layer sees, malformed files give errors that name the problem, and an
//! FFN overlay acts exactly as the dense weight it stands for.

use std::borrow::Cow;
use std::sync::Arc;

use quarry_format::{gguf::GgufWriter, GgmlType, GgufFile, Value};
use quarry_model::{FfnOverlay, KvCache, LowRank, Model, ModelError, NeuronRows, SequenceBatch};

const D: usize = 32;
const HEAD: usize = 16;
const FF: usize = 64;
const VOCAB: usize = 50;

/// Deterministic pseudo-random values in [-scale, scale].
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, scale: f32) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(scale)).collect()
    }
}

struct Spec {
    arch: &'static str,
    layers: usize,
    sliding_window: Option<u32>,
    pattern: Option<u32>,
    skip_tensor: Option<&'static str>,
    bad_shape: Option<&'static str>,
    /// A float hyper-parameter (key suffix after the architecture) set to a value.
    float: Option<(&'static str, f32)>,
}

impl Spec {
    fn llama() -> Spec {
        Spec {
            arch: "llama",
            layers: 2,
            sliding_window: None,
            pattern: None,
            skip_tensor: None,
            bad_shape: None,
            float: None,
        }
    }
    fn gemma3(window: u32, pattern: u32) -> Spec {
        Spec {
            arch: "gemma3",
            layers: 2,
            sliding_window: Some(window),
            pattern: Some(pattern),
            ..Spec::llama()
        }
    }
}

fn quantized(dtype: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; dtype.bytes_for(values.len() as u64).unwrap() as usize];
    quarry_kernels::quantize(dtype, values, &mut out).unwrap();
    out
}

fn build(spec: &Spec) -> Arc<GgufFile> {
    let mut rng = Lcg(7);
    let mut w = GgufWriter::new();
    let a = spec.arch;
    let mut meta = |k: &str, v: Value| w.add_metadata(k, v).unwrap();
    meta("general.architecture", Value::String(a.into()));
    meta(&format!("{a}.block_count"), Value::U32(spec.layers as u32));
    meta(&format!("{a}.embedding_length"), Value::U32(D as u32));
    meta(&format!("{a}.feed_forward_length"), Value::U32(FF as u32));
    meta(&format!("{a}.attention.head_count"), Value::U32(4));
    meta(&format!("{a}.attention.head_count_kv"), Value::U32(2));
    meta(
        &format!("{a}.attention.key_length"),
        Value::U32(HEAD as u32),
    );
    meta(
        &format!("{a}.attention.value_length"),
        Value::U32(HEAD as u32),
    );
    meta(&format!("{a}.context_length"), Value::U32(64));
    meta(&format!("{a}.vocab_size"), Value::U32(VOCAB as u32));
    let eps = "attention.layer_norm_rms_epsilon";
    if spec.float.map(|(suffix, _)| suffix) != Some(eps) {
        meta(&format!("{a}.{eps}"), Value::F32(1e-6));
    }
    if let Some((suffix, value)) = spec.float {
        meta(&format!("{a}.{suffix}"), Value::F32(value));
    }
    if let Some(win) = spec.sliding_window {
        meta(&format!("{a}.attention.sliding_window"), Value::U32(win));
    }
    if let Some(p) = spec.pattern {
        meta(
            &format!("{a}.attention.sliding_window_pattern"),
            Value::U32(p),
        );
    }
    let mut tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)> = Vec::new();
    let matrix = |name: String, rows: usize, cols: usize, rng: &mut Lcg| {
        // F32 matrices: single-token steps would otherwise take the 8-bit-activation path
        // and batches the f32 one, and these tests check the cache, not quantization.
        let data = quantized(GgmlType::F32, &rng.vec(rows * cols, 0.3));
        (name, vec![cols as u64, rows as u64], GgmlType::F32, data)
    };
    let norm = |name: String, n: usize, rng: &mut Lcg| {
        let v: Vec<f32> = rng.vec(n, 0.2).iter().map(|x| 1.0 + x).collect();
        (name, vec![n as u64], GgmlType::F32, bytemuck_f32(&v))
    };
    tensors.push(matrix("token_embd.weight".into(), VOCAB, D, &mut rng));
    tensors.push(norm("output_norm.weight".into(), D, &mut rng));
    for i in 0..spec.layers {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        tensors.push(norm(n("attn_norm"), D, &mut rng));
        tensors.push(matrix(n("attn_q"), 4 * HEAD, D, &mut rng));
        tensors.push(matrix(n("attn_k"), 2 * HEAD, D, &mut rng));
        tensors.push(matrix(n("attn_v"), 2 * HEAD, D, &mut rng));
        tensors.push(matrix(n("attn_output"), D, 4 * HEAD, &mut rng));
        tensors.push(norm(n("ffn_norm"), D, &mut rng));
        tensors.push(matrix(n("ffn_gate"), FF, D, &mut rng));
        tensors.push(matrix(n("ffn_up"), FF, D, &mut rng));
        tensors.push(matrix(n("ffn_down"), D, FF, &mut rng));
        if a == "gemma3" {
            tensors.push(norm(n("attn_q_norm"), HEAD, &mut rng));
            tensors.push(norm(n("attn_k_norm"), HEAD, &mut rng));
            tensors.push(norm(n("post_attention_norm"), D, &mut rng));
            tensors.push(norm(n("post_ffw_norm"), D, &mut rng));
        }
    }
    for (name, mut dims, dtype, data) in tensors {
        if spec.skip_tensor == Some(name.as_str()) {
            continue;
        }
        let data = if spec.bad_shape == Some(name.as_str()) {
            dims[0] *= 2;
            [data.clone(), data].concat()
        } else {
            data
        };
        w.add_tensor(name, &dims, dtype, Cow::Owned(data)).unwrap();
    }
    Arc::new(GgufFile::from_bytes(w.to_bytes(), "synthetic.gguf").unwrap())
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + 3) % VOCAB) as u32).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
            "{what}: element {i}: {x} vs {y}"
        );
    }
}

fn prefill_equals_incremental(spec: Spec) {
    let file = build(&spec);
    let m = Model::load(file).unwrap();
    let toks = tokens(20);
    let mut cache = m.new_cache(32);
    let all = m.forward(&toks, &mut cache, 0..toks.len()).unwrap();

    // One token at a time, and in uneven chunks: every row must equal the batched one.
    let mut one = m.new_cache(32);
    let mut chunked = m.new_cache(32);
    let mut done = 0;
    for (step, &t) in toks.iter().enumerate() {
        let row = m.forward(&[t], &mut one, 0..1).unwrap();
        assert_close(
            &row,
            &all[step * VOCAB..(step + 1) * VOCAB],
            &format!("{} token {step}", spec.arch),
        );
    }
    for size in [3, 5, 1, 7, 4] {
        let chunk = &toks[done..done + size];
        let rows = m.forward(chunk, &mut chunked, 0..size).unwrap();
        assert_close(
            &rows,
            &all[done * VOCAB..(done + size) * VOCAB],
            &format!("{} chunk at {done}", spec.arch),
        );
        done += size;
    }

    // Sequences at different points in one batch (a prompt chunk, a decode token, a later
    // chunk): every row equals the same tokens run alone.
    let mut caches = [m.new_cache(32), m.new_cache(32), m.new_cache(32)];
    let parts = [(0, 6), (4, 5), (9, 12)];
    for (cache, &(past, _)) in caches.iter_mut().zip(&parts) {
        m.forward(&toks[..past.max(1)], cache, 0..0).unwrap();
        cache.truncate(past);
    }
    let mut batch: Vec<SequenceBatch<'_, '_, _>> = caches
        .iter_mut()
        .zip(&parts)
        .map(|(cache, &(past, end))| SequenceBatch {
            tokens: &toks[past..end],
            cache,
            rows: 0..end - past,
            overlay: None,
        })
        .collect();
    let rows = m.forward_batch(&mut batch).unwrap();
    let expected: Vec<f32> = parts
        .iter()
        .flat_map(|&(past, end)| all[past * VOCAB..end * VOCAB].iter().copied())
        .collect();
    assert_close(
        &rows,
        &expected,
        &format!("{} batch of sequences", spec.arch),
    );
}

#[test]
fn llama_prefill_equals_incremental_decoding() {
    prefill_equals_incremental(Spec::llama());
}

#[test]
fn gemma3_prefill_equals_incremental_decoding_across_windows() {
    prefill_equals_incremental(Spec::gemma3(4, 2));
}

#[test]
fn sliding_window_bounds_what_local_layers_see() {
    // Two local layers with a window of 4: position 12 sees back at most 2 × 3 positions.
    let local = build(&Spec::gemma3(4, 100));
    let m = Model::load(local).unwrap();
    assert_eq!(m.config().global_layers, vec![false, false]);
    let a = tokens(13);
    let mut b = a.clone();
    b[0] = (b[0] + 1) % VOCAB as u32;
    let la = m.forward(&a, &mut m.new_cache(13), 12..13).unwrap();
    let lb = m.forward(&b, &mut m.new_cache(13), 12..13).unwrap();
    assert_eq!(
        la, lb,
        "token 0 is outside the receptive field of position 12"
    );

    // With the second layer global, the change reaches position 12.
    let mixed = build(&Spec::gemma3(4, 2));
    let m = Model::load(mixed).unwrap();
    assert_eq!(m.config().global_layers, vec![false, true]);
    let la = m.forward(&a, &mut m.new_cache(13), 12..13).unwrap();
    let lb = m.forward(&b, &mut m.new_cache(13), 12..13).unwrap();
    assert_ne!(la, lb);
}

#[test]
fn context_overflow_is_an_error() {
    let file = build(&Spec::llama());
    let m = Model::load(file).unwrap();
    let err = m
        .forward(&tokens(9), &mut m.new_cache(8), 8..9)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextOverflow {
                needed: 9,
                capacity: 8
            }
        ),
        "{err}"
    );
    let err = m
        .forward(&[VOCAB as u32], &mut m.new_cache(8), 0..1)
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn load_errors_name_the_problem() {
    let missing = build(&Spec {
        skip_tensor: Some("blk.1.ffn_up.weight"),
        ..Spec::llama()
    });
    let err = Model::load(missing).err().unwrap().to_string();
    assert!(
        err.contains("blk.1.ffn_up.weight") && err.contains("synthetic.gguf"),
        "{err}"
    );

    let shape = build(&Spec {
        bad_shape: Some("blk.0.attn_k.weight"),
        ..Spec::llama()
    });
    let err = Model::load(shape).err().unwrap();
    assert!(matches!(err, ModelError::WrongShape { .. }), "{err}");
    assert!(err.to_string().contains("blk.0.attn_k.weight"), "{err}");

    let arch = build(&Spec {
        arch: "mamba",
        ..Spec::llama()
    });
    let err = Model::load(arch).err().unwrap().to_string();
    assert!(err.contains("unsupported architecture 'mamba'"), "{err}");

    // Float hyper-parameters that would run and produce garbage are refused by key.
    for (suffix, value) in [
        ("rope.freq_base", f32::NAN),
        ("attention.layer_norm_rms_epsilon", -1e-5),
        ("attention.layer_norm_rms_epsilon", 0.0),
        ("rope.freq_base", f32::INFINITY),
        ("final_logit_softcapping", -30.0),
    ] {
        let file = build(&Spec {
            float: Some((suffix, value)),
            ..Spec::llama()
        });
        let err = Model::load(file).err().unwrap().to_string();
        assert!(
            err.contains(&format!("llama.{suffix}")) && err.contains("positive finite"),
            "{suffix} = {value}: {err}"
        );
    }
}

/// Records the residual stream's pieces as a forward pass reports them.
#[derive(Default)]
struct Pieces {
    sum: Vec<f32>,
    final_residual: Vec<f32>,
    ffn_calls: usize,
}

impl quarry_model::ForwardObserver for Pieces {
    fn embeddings(&mut self, x: &[f32]) {
        self.sum = x.to_vec();
    }
    fn attention_output(&mut self, _layer: usize, added: &[f32]) {
        self.sum.iter_mut().zip(added).for_each(|(s, a)| *s += a);
    }
    fn ffn_activations(&mut self, _layer: usize, input: &[f32], activations: &[f32]) {
        assert_eq!(input.len() / D, activations.len() / FF);
        self.ffn_calls += 1;
    }
    fn ffn_output(&mut self, _layer: usize, added: &[f32]) {
        self.sum.iter_mut().zip(added).for_each(|(s, a)| *s += a);
    }
    fn final_residual(&mut self, x: &[f32]) {
        self.final_residual = x.to_vec();
    }
}

#[test]
fn observed_pieces_add_up_to_the_final_residual() {
    for (spec, edited) in [
        (Spec::llama(), false),
        (Spec::gemma3(4, 2), false),
        // The observer's FFN output includes the overlay's share.
        (Spec::gemma3(4, 2), true),
    ] {
        let file = build(&spec);
        let m = Model::load(file).unwrap();
        let overlay = FfnOverlay::new(spec.layers, [(1, delta(3, 2, 0.3))]);
        let m = m.with_overlay(edited.then(|| Arc::new(overlay))).unwrap();
        let toks = tokens(9);
        let mut pieces = Pieces::default();
        let observed = m
            .forward_observed(&toks, &mut m.new_cache(16), 8..9, &mut pieces)
            .unwrap();
        let plain = m.forward_hidden(&toks, &mut m.new_cache(16), 8..9).unwrap();
        assert_eq!(observed, plain, "{}: observing changes nothing", spec.arch);
        assert_eq!(pieces.ffn_calls, spec.layers);
        assert_close(&pieces.sum, &pieces.final_residual, spec.arch);
    }
}

/// A rank-`rank` delta for a down projection, its factors' values in ±`scale`.
fn delta(seed: u64, rank: usize, scale: f32) -> LowRank {
    let mut rng = Lcg(seed);
    let a = rng.vec(rank * FF, scale);
    LowRank::new(D, FF, rank, a, rng.vec(D * rank, scale)).unwrap()
}

/// `file` with the down projection of each listed layer replaced by `W + B·A` and the gate and
/// up rows of each listed neuron replaced (its weights are `F32`, so the results are stored
/// exactly as computed).
fn with_dense_deltas(
    file: &GgufFile,
    deltas: &[(usize, &LowRank)],
    neurons: &[(usize, &NeuronRows)],
) -> Arc<GgufFile> {
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        w.add_metadata(key, value.clone()).unwrap();
    }
    for info in file.tensors() {
        let data = file.tensor(&info.name).unwrap().data;
        let replaced = deltas
            .iter()
            .find(|(layer, _)| info.name == format!("blk.{layer}.ffn_down.weight"));
        let data = match replaced {
            Some((_, delta)) => {
                assert_eq!(info.dtype, GgmlType::F32);
                let sum: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .zip(delta.dense())
                    .map(|(w, d)| w + d)
                    .collect();
                Cow::Owned(bytemuck_f32(&sum))
            }
            None => Cow::Borrowed(data),
        };
        let rewritten = neurons.iter().find_map(|(layer, n)| {
            let rows = if info.name == format!("blk.{layer}.ffn_gate.weight") {
                &n.gate
            } else if info.name == format!("blk.{layer}.ffn_up.weight") {
                &n.up
            } else {
                return None;
            };
            assert_eq!(info.dtype, GgmlType::F32);
            let mut w: Vec<f32> = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            for (i, &j) in n.index.iter().enumerate() {
                w[j * D..(j + 1) * D].copy_from_slice(&rows[i * D..(i + 1) * D]);
            }
            Some(Cow::Owned(bytemuck_f32(&w)))
        });
        let data = rewritten.unwrap_or(data);
        w.add_tensor(info.name.clone(), &info.dims, info.dtype, data)
            .unwrap();
    }
    Arc::new(GgufFile::from_bytes(w.to_bytes(), "dense.gguf").unwrap())
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn an_overlay_gives_the_logits_of_the_dense_weight_it_stands_for() {
    for spec in [Spec::llama(), Spec::gemma3(4, 2)] {
        let file = build(&spec);
        let (d0, d1) = (delta(11, 3, 0.3), delta(12, 2, 0.3));
        let overlay = FfnOverlay::new(spec.layers, [(0, d0.clone()), (1, d1.clone())]);
        let base = Model::load(Arc::clone(&file)).unwrap();
        let edited = base.with_overlay(Some(Arc::new(overlay))).unwrap();
        let dense = Model::load(with_dense_deltas(&file, &[(0, &d0), (1, &d1)], &[])).unwrap();
        let toks = tokens(12);
        let n = toks.len();
        let got = edited.forward(&toks, &mut edited.new_cache(16), 0..n);
        let want = dense.forward(&toks, &mut dense.new_cache(16), 0..n);
        let (got, want) = (got.unwrap(), want.unwrap());
        assert_close(&got, &want, &format!("{}: prompt", spec.arch));
        // Decode steps, one token at a time through the cache.
        let (mut cache, mut dense_cache) = (edited.new_cache(16), dense.new_cache(16));
        for (step, &t) in toks.iter().take(4).enumerate() {
            let got = edited.forward(&[t], &mut cache, 0..1).unwrap();
            let want = dense.forward(&[t], &mut dense_cache, 0..1).unwrap();
            assert_close(&got, &want, &format!("{}: step {step}", spec.arch));
        }
        let plain = base.forward(&toks, &mut base.new_cache(16), 0..n).unwrap();
        assert!(
            max_difference(&plain, &got) > 0.05,
            "{}: the deltas are large enough to matter",
            spec.arch
        );
    }
}

#[test]
fn replaced_neurons_give_the_logits_of_the_rewritten_weights() {
    for spec in [Spec::llama(), Spec::gemma3(4, 2)] {
        let file = build(&spec);
        let mut rng = Lcg(31);
        let rows = NeuronRows {
            index: vec![3, 17],
            gate: rng.vec(2 * D, 0.5),
            up: rng.vec(2 * D, 0.5),
        };
        let down = delta(13, 2, 0.3);
        let overlay =
            FfnOverlay::new(spec.layers, [(1, down.clone())]).with_neurons([(1, rows.clone())]);
        let base = Model::load(Arc::clone(&file)).unwrap();
        let edited = base.with_overlay(Some(Arc::new(overlay))).unwrap();
        let dense = Model::load(with_dense_deltas(&file, &[(1, &down)], &[(1, &rows)])).unwrap();
        let toks = tokens(12);
        let n = toks.len();
        let got = edited
            .forward(&toks, &mut edited.new_cache(16), 0..n)
            .unwrap();
        let want = dense
            .forward(&toks, &mut dense.new_cache(16), 0..n)
            .unwrap();
        assert_close(&got, &want, &format!("{}: rewritten neurons", spec.arch));
        let only_down = base
            .with_overlay(Some(Arc::new(FfnOverlay::new(
                spec.layers,
                [(1, down.clone())],
            ))))
            .unwrap();
        let plain = only_down
            .forward(&toks, &mut only_down.new_cache(16), 0..n)
            .unwrap();
        assert!(
            max_difference(&plain, &got) > 0.01,
            "{}: the neurons matter",
            spec.arch
        );
    }
}

#[test]
fn each_sequence_of_a_batch_runs_under_its_own_overlay() {
    let base = Model::load(build(&Spec::gemma3(4, 2))).unwrap();
    let x = Arc::new(FfnOverlay::new(2, [(1, delta(21, 4, 0.3))]));
    let y = Arc::new(FfnOverlay::new(
        2,
        [(0, delta(22, 2, 0.3)), (1, delta(23, 3, 0.3))],
    ));
    let toks = tokens(20);
    // (overlay, tokens already cached, end): a decode step under X, then prompt chunks under
    // Y, none, and X again (apart from its first sequence).
    let parts = [
        (Some(&x), 5, 6),
        (Some(&y), 2, 9),
        (None, 3, 8),
        (Some(&x), 0, 7),
    ];
    let cached = |overlay: Option<&Arc<FfnOverlay>>, past: usize| {
        let m = base.with_overlay(overlay.cloned()).unwrap();
        let mut cache = m.new_cache(32);
        m.forward(&toks[..past.max(1)], &mut cache, 0..0).unwrap();
        cache.truncate(past);
        (m, cache)
    };
    let alone: Vec<Vec<f32>> = parts
        .iter()
        .map(|&(overlay, past, end)| {
            let (m, mut cache) = cached(overlay, past);
            m.forward(&toks[past..end], &mut cache, 0..end - past)
                .unwrap()
        })
        .collect();
    let mut caches: Vec<_> = parts
        .iter()
        .map(|&(overlay, past, _)| cached(overlay, past).1)
        .collect();
    let mut batch: Vec<SequenceBatch<'_, '_, _>> = caches
        .iter_mut()
        .zip(&parts)
        .map(|(cache, &(overlay, past, end))| SequenceBatch {
            tokens: &toks[past..end],
            cache,
            rows: 0..end - past,
            overlay: overlay.map(|o| &**o),
        })
        .collect();
    let rows = base.forward_batch(&mut batch).unwrap();
    assert_eq!(
        rows,
        alone.concat(),
        "each sequence gets the logits it gets alone"
    );

    // The overlays do change what those sequences get.
    for (&(overlay, past, end), alone) in parts.iter().zip(&alone) {
        let (_, mut cache) = cached(None, past);
        let plain = base
            .forward(&toks[past..end], &mut cache, 0..end - past)
            .unwrap();
        match overlay {
            Some(_) => assert!(max_difference(&plain, alone) > 0.05),
            None => assert_eq!(&plain, alone),
        }
    }
}

#[test]
fn without_deltas_the_forward_pass_is_unchanged() {
    let base = Model::load(build(&Spec::gemma3(4, 2))).unwrap();
    let toks = tokens(9);
    let plain = base.forward(&toks, &mut base.new_cache(16), 0..9).unwrap();
    let zero = LowRank::new(D, FF, 2, Lcg(5).vec(2 * FF, 0.3), vec![0.0; D * 2]).unwrap();
    for overlay in [
        FfnOverlay::new(2, []),
        FfnOverlay::new(2, [(0, zero.clone()), (1, zero.clone())]),
    ] {
        let m = base.with_overlay(Some(Arc::new(overlay))).unwrap();
        let logits = m.forward(&toks, &mut m.new_cache(16), 0..9).unwrap();
        assert_eq!(logits, plain);
    }
}

#[test]
fn an_overlay_that_does_not_fit_is_refused() {
    let base = Model::load(build(&Spec::llama())).unwrap();
    let wide = LowRank::new(D, FF + 1, 1, vec![0.1; FF + 1], vec![0.1; D]).unwrap();
    let err = base
        .with_overlay(Some(Arc::new(FfnOverlay::new(2, [(1, wide)]))))
        .err()
        .unwrap();
    assert!(
        matches!(err, ModelError::BadOverlay { layer: 1, .. })
            && err.to_string().contains("32 × 65"),
        "{err}"
    );
    // Factors whose lengths do not match the stated rank (the fields are public).
    let mut short = delta(1, 2, 0.3);
    short.a.pop();
    let overlay = FfnOverlay::new(2, [(0, short)]);
    let err = base.check_overlay(&overlay).unwrap_err().to_string();
    assert!(err.contains("layer 0") && err.contains("rank-2"), "{err}");
    // A batch naming it fails before touching any cache.
    let mut cache = base.new_cache(4);
    let err = base
        .forward_batch(&mut [SequenceBatch {
            tokens: &[1],
            cache: &mut cache,
            rows: 0..1,
            overlay: Some(&overlay),
        }])
        .unwrap_err();
    assert!(
        matches!(err, ModelError::BadOverlay { layer: 0, .. }),
        "{err}"
    );
    assert_eq!(cache.len(), 0);
}
