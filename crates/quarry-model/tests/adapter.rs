//! LoRA adapter files and patched models: an overlay survives write_adapter → read_adapter
//! exactly, every malformed adapter gives its own error naming the file and the tensor or key,
//! and write_patched_model changes exactly the overlaid down projections (to `Q(W + B·A)`),
//! copying everything else byte for byte, and never replaces an existing file.

use std::borrow::Cow;
use std::path::Path;

use quarry_format::{gguf::GgufWriter, GgmlType, GgufFile, Value};
use quarry_model::{
    read_adapter, write_adapter, write_patched_model, FfnOverlay, LowRank, ModelConfig, ModelError,
    DEFAULT_PATCHED_TYPE,
};

const D: usize = 32;
const FF: usize = 256;
const LAYERS: usize = 3;
const VOCAB: usize = 16;

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

fn encode(dtype: GgmlType, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; dtype.bytes_for(values.len() as u64).unwrap() as usize];
    quarry_kernels::quantize(dtype, values, &mut out).unwrap();
    out
}

fn decode(dtype: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    quarry_kernels::dequantize(dtype, bytes, &mut out).unwrap();
    out
}

/// A small llama-architecture base: enough metadata for a [`ModelConfig`], a few tensors of
/// several types, ffn_down in Q8_0, and an alignment of 64 (not the default) to show it kept.
fn base_model() -> GgufFile {
    let mut rng = Lcg(11);
    let mut w = GgufWriter::new();
    let mut meta = |k: &str, v: Value| w.add_metadata(k, v).unwrap();
    meta("general.architecture", Value::String("llama".into()));
    meta("general.alignment", Value::U32(64));
    meta("general.name", Value::String("tiny".into()));
    meta("llama.block_count", Value::U32(LAYERS as u32));
    meta("llama.embedding_length", Value::U32(D as u32));
    meta("llama.feed_forward_length", Value::U32(FF as u32));
    meta("llama.attention.head_count", Value::U32(4));
    meta("llama.vocab_size", Value::U32(VOCAB as u32));
    let mut add = |name: String, dims: &[u64], dtype: GgmlType, values: Vec<f32>| {
        w.add_tensor(name, dims, dtype, Cow::Owned(encode(dtype, &values)))
            .unwrap()
    };
    add(
        "token_embd.weight".into(),
        &[D as u64, VOCAB as u64],
        GgmlType::F16,
        rng.vec(D * VOCAB, 0.5),
    );
    for i in 0..LAYERS {
        add(
            format!("blk.{i}.attn_norm.weight"),
            &[D as u64],
            GgmlType::F32,
            rng.vec(D, 1.0),
        );
        add(
            format!("blk.{i}.ffn_up.weight"),
            &[D as u64, FF as u64],
            GgmlType::Q8_0,
            rng.vec(D * FF, 0.2),
        );
        add(
            format!("blk.{i}.ffn_down.weight"),
            &[FF as u64, D as u64],
            GgmlType::Q8_0,
            rng.vec(FF * D, 0.2),
        );
    }
    GgufFile::from_bytes(w.to_bytes(), "base.gguf").unwrap()
}

fn config() -> ModelConfig {
    ModelConfig::from_gguf(&base_model()).unwrap()
}

fn delta(rank: usize, seed: u64) -> LowRank {
    let mut rng = Lcg(seed);
    LowRank::new(D, FF, rank, rng.vec(rank * FF, 0.1), rng.vec(D * rank, 0.1)).unwrap()
}

/// An adapter built by hand: `general.*`/`adapter.*` keys as given, then the tensors.
struct AdapterSpec {
    general_type: Option<&'static str>,
    arch: &'static str,
    adapter_type: Option<&'static str>,
    alpha: Option<Value>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<f32>)>,
}

impl AdapterSpec {
    /// A valid adapter: layer 1, rank 2, F32, no alpha.
    fn good() -> AdapterSpec {
        let d = delta(2, 5);
        AdapterSpec {
            general_type: Some("adapter"),
            arch: "llama",
            adapter_type: Some("lora"),
            alpha: None,
            tensors: vec![
                pair_a(1, &[FF as u64, 2], d.a.clone()),
                pair_b(1, &[2, D as u64], d.b.clone()),
            ],
        }
    }
    fn file(&self) -> GgufFile {
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", Value::String(self.arch.into()))
            .unwrap();
        if let Some(t) = self.general_type {
            w.add_metadata("general.type", Value::String(t.into()))
                .unwrap();
        }
        if let Some(t) = self.adapter_type {
            w.add_metadata("adapter.type", Value::String(t.into()))
                .unwrap();
        }
        if let Some(a) = &self.alpha {
            w.add_metadata("adapter.lora.alpha", a.clone()).unwrap();
        }
        for (name, dims, dtype, values) in &self.tensors {
            let bytes = if *dtype == GgmlType::F32 {
                // Bit patterns as given (NaN included), not through a quantizer.
                values.iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                encode(*dtype, values)
            };
            w.add_tensor(name.clone(), dims, *dtype, Cow::Owned(bytes))
                .unwrap();
        }
        GgufFile::from_bytes(w.to_bytes(), "edit-lora.gguf").unwrap()
    }
}

fn pair_a(layer: usize, dims: &[u64], v: Vec<f32>) -> (String, Vec<u64>, GgmlType, Vec<f32>) {
    (
        format!("blk.{layer}.ffn_down.weight.lora_a"),
        dims.to_vec(),
        GgmlType::F32,
        v,
    )
}

fn pair_b(layer: usize, dims: &[u64], v: Vec<f32>) -> (String, Vec<u64>, GgmlType, Vec<f32>) {
    (
        format!("blk.{layer}.ffn_down.weight.lora_b"),
        dims.to_vec(),
        GgmlType::F32,
        v,
    )
}

/// The error reading `spec` gives, as text; asserts it names the file and every `needle`.
fn read_error(spec: &AdapterSpec, needles: &[&str]) -> ModelError {
    let err = read_adapter(&spec.file(), &config()).expect_err("adapter should be refused");
    let msg = err.to_string();
    assert!(msg.starts_with("edit-lora.gguf: "), "{msg}");
    for n in needles {
        assert!(msg.contains(n), "'{n}' not in: {msg}");
    }
    err
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn overlays_round_trip_through_adapter_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    // Same ranks (alpha = rank is written) and mixed ranks (no alpha): both read back as is.
    for (name, ranks) in [("same.gguf", [3, 3]), ("mixed.gguf", [1, 4])] {
        let overlay = FfnOverlay::new(LAYERS, [(0, delta(ranks[0], 1)), (2, delta(ranks[1], 2))]);
        let path = dir.path().join(name);
        write_adapter(&overlay, &cfg, &path).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.get_str("general.type").unwrap(), "adapter");
        assert_eq!(file.get_str("adapter.type").unwrap(), "lora");
        assert_eq!(file.architecture().unwrap(), "llama");
        let alpha = file.get("adapter.lora.alpha");
        if ranks[0] == ranks[1] {
            assert_eq!(alpha, Some(&Value::F32(ranks[0] as f32)));
        } else {
            assert_eq!(alpha, None);
        }
        let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "blk.0.ffn_down.weight.lora_a",
                "blk.0.ffn_down.weight.lora_b",
                "blk.2.ffn_down.weight.lora_a",
                "blk.2.ffn_down.weight.lora_b",
            ]
        );
        assert_eq!(file.tensors()[0].dims, [FF as u64, ranks[0] as u64]);
        assert_eq!(file.tensors()[1].dims, [ranks[0] as u64, D as u64]);

        let back = read_adapter(&file, &cfg).unwrap();
        let got: Vec<(usize, &LowRank)> = back.deltas().collect();
        let want: Vec<(usize, &LowRank)> = overlay.deltas().collect();
        assert_eq!(got, want);
    }

    // An empty overlay is an adapter with no tensors, and reads back empty.
    let path = dir.path().join("empty.gguf");
    write_adapter(&FfnOverlay::new(LAYERS, []), &cfg, &path).unwrap();
    assert!(read_adapter(&GgufFile::open(&path).unwrap(), &cfg)
        .unwrap()
        .is_empty());
    assert_eq!(
        dir_names(dir.path()),
        ["empty.gguf", "mixed.gguf", "same.gguf"]
    );
}

#[test]
fn alpha_scales_b_like_llama_cpp_and_half_precision_factors_load() {
    let d = delta(2, 5);
    let mut spec = AdapterSpec::good();
    spec.alpha = Some(Value::F32(8.0));
    spec.tensors[0].2 = GgmlType::F16;
    spec.tensors[1].2 = GgmlType::BF16;
    let overlay = read_adapter(&spec.file(), &config()).unwrap();
    assert_eq!(overlay.deltas().count(), 1);
    let got = overlay.layer(1).unwrap();
    assert_eq!((got.rows, got.cols, got.rank), (D, FF, 2));
    // alpha / rank = 4, applied to B; A and B rounded to their half types on the way.
    for (x, y) in got.a.iter().zip(&d.a) {
        assert!((x - y).abs() <= 1e-3 * y.abs().max(1e-2), "{x} vs {y}");
    }
    for (x, y) in got.b.iter().zip(&d.b) {
        assert!(
            (x - 4.0 * y).abs() <= 4.0 * 1e-2 * y.abs().max(1e-2),
            "{x} vs 4·{y}"
        );
    }

    // alpha = 0 means "unset" to llama.cpp: scale 1.
    let mut spec = AdapterSpec::good();
    spec.alpha = Some(Value::F32(0.0));
    assert_eq!(
        read_adapter(&spec.file(), &config()).unwrap().layer(1),
        Some(&d)
    );

    // ggml writes a rank-1 lora_a without its trailing dimension of 1.
    let d1 = delta(1, 9);
    let mut spec = AdapterSpec::good();
    spec.tensors = vec![
        pair_a(0, &[FF as u64], d1.a.clone()),
        pair_b(0, &[1, D as u64], d1.b.clone()),
    ];
    assert_eq!(
        read_adapter(&spec.file(), &config()).unwrap().layer(0),
        Some(&d1)
    );
}

#[test]
fn malformed_adapters_give_one_clear_error_each() {
    let d = delta(2, 5);

    let mut s = AdapterSpec::good();
    s.general_type = Some("model");
    read_error(&s, &["general.type", "\"model\"", "expected \"adapter\""]);

    let mut s = AdapterSpec::good();
    s.general_type = None;
    read_error(&s, &["general.type", "missing"]);

    let mut s = AdapterSpec::good();
    s.arch = "gemma3";
    read_error(&s, &["general.architecture", "\"gemma3\"", "\"llama\""]);

    let mut s = AdapterSpec::good();
    s.adapter_type = Some("control_vector");
    read_error(&s, &["adapter.type", "\"control_vector\"", "only \"lora\""]);

    let mut s = AdapterSpec::good();
    s.adapter_type = None;
    read_error(&s, &["adapter.type", "missing"]);

    let mut s = AdapterSpec::good();
    s.alpha = Some(Value::U32(16));
    read_error(&s, &["adapter.lora.alpha", "expected an f32"]);

    let mut s = AdapterSpec::good();
    s.alpha = Some(Value::F32(f32::INFINITY));
    read_error(&s, &["adapter.lora.alpha", "not a finite number"]);

    // A pair for another weight, well formed in every other way.
    let mut s = AdapterSpec::good();
    s.tensors.push((
        "blk.0.attn_q.weight.lora_a".into(),
        vec![D as u64, 2],
        GgmlType::F32,
        vec![0.0; D * 2],
    ));
    read_error(
        &s,
        &[
            "tensor 'blk.0.attn_q.weight.lora_a'",
            "only ffn_down adapters are supported",
        ],
    );

    let mut s = AdapterSpec::good();
    s.tensors.push((
        "output_norm.weight".into(),
        vec![D as u64],
        GgmlType::F32,
        vec![1.0; D],
    ));
    read_error(&s, &["tensor 'output_norm.weight'", "not a LoRA factor"]);

    let mut s = AdapterSpec::good();
    s.tensors.remove(1);
    read_error(&s, &["tensor 'blk.1.ffn_down.weight.lora_b'", "is missing"]);
    let mut s = AdapterSpec::good();
    s.tensors.remove(0);
    read_error(&s, &["tensor 'blk.1.ffn_down.weight.lora_a'", "is missing"]);

    let mut s = AdapterSpec::good();
    s.tensors[0] = pair_a(1, &[FF as u64 / 2, 4], d.a.clone());
    let err = read_error(&s, &["blk.1.ffn_down.weight.lora_a", "shape [128, 4]"]);
    assert!(matches!(err, ModelError::WrongShape { expected, .. } if expected == [256, 4]));

    let mut s = AdapterSpec::good();
    s.tensors[1] = pair_b(1, &[1, 2 * D as u64], d.b.clone());
    read_error(&s, &["blk.1.ffn_down.weight.lora_b", "shape [1, 64]"]);

    let mut s = AdapterSpec::good();
    s.tensors = vec![
        pair_a(LAYERS, &[FF as u64, 2], d.a.clone()),
        pair_b(LAYERS, &[2, D as u64], d.b.clone()),
    ];
    read_error(
        &s,
        &[
            "tensor 'blk.3.ffn_down.weight.lora_a'",
            "layer 3 is out of range",
            "3 layers",
        ],
    );

    // A name the base does not have (leading zero) is not taken for layer 1.
    let mut s = AdapterSpec::good();
    s.tensors[0].0 = "blk.01.ffn_down.weight.lora_a".into();
    read_error(&s, &["blk.01.ffn_down.weight.lora_a", "only ffn_down"]);

    let mut s = AdapterSpec::good();
    s.tensors[1] = pair_b(1, &[3, D as u64], delta(3, 1).b);
    read_error(
        &s,
        &[
            "tensor 'blk.1.ffn_down.weight.lora_b'",
            "has rank 3",
            "'blk.1.ffn_down.weight.lora_a' has rank 2",
        ],
    );

    let mut s = AdapterSpec::good();
    s.tensors[0].3[17] = f32::NAN;
    read_error(
        &s,
        &["tensor 'blk.1.ffn_down.weight.lora_a'", "value 17 is NaN"],
    );

    let mut s = AdapterSpec::good();
    s.tensors[0].2 = GgmlType::Q8_0;
    let err = read_error(
        &s,
        &[
            "blk.1.ffn_down.weight.lora_a",
            "type Q8_0",
            "F32, F16 or BF16",
        ],
    );
    assert!(matches!(err, ModelError::WrongType { .. }), "{err}");

    let mut s = AdapterSpec::good();
    s.tensors[0].1 = vec![FF as u64, 1, 2];
    s.tensors[0].3 = d.a.clone();
    read_error(
        &s,
        &["blk.1.ffn_down.weight.lora_a", "a LoRA factor is a matrix"],
    );
}

#[test]
fn write_adapter_refuses_existing_paths_and_bad_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config();
    let overlay = FfnOverlay::new(LAYERS, [(1, delta(2, 3))]);
    let taken = dir.path().join("taken-lora.gguf");
    std::fs::write(&taken, b"precious").unwrap();
    let msg = write_adapter(&overlay, &cfg, &taken)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("taken-lora.gguf") && msg.contains("already exists"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"precious");

    // A delta whose shape is not the model's, and one holding a NaN: refused, nothing written.
    let wrong = LowRank::new(D + 1, FF, 1, vec![0.0; FF], vec![0.0; D + 1]).unwrap();
    let out = dir.path().join("out-lora.gguf");
    let msg = write_adapter(&FfnOverlay::new(LAYERS, [(2, wrong)]), &cfg, &out)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("out-lora.gguf: delta of layer 2") && msg.contains("33 × 256"),
        "{msg}"
    );
    let mut nan = delta(1, 4);
    nan.b[3] = f32::NAN;
    let msg = write_adapter(&FfnOverlay::new(LAYERS, [(0, nan)]), &cfg, &out)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("delta of layer 0") && msg.contains("not finite"),
        "{msg}"
    );
    assert_eq!(dir_names(dir.path()), ["taken-lora.gguf"]);
}

#[test]
fn patched_models_hold_the_requantized_sum_and_copy_everything_else() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_model();
    let d = delta(3, 21);
    let overlay = FfnOverlay::new(LAYERS, [(1, d.clone())]);
    let target = "blk.1.ffn_down.weight";
    let view = base.tensor(target).unwrap();
    let mut sum = decode(view.info.dtype, view.data, D * FF);
    sum.iter_mut().zip(d.dense()).for_each(|(w, x)| *w += x);
    let rms = (sum.iter().map(|x| x * x).sum::<f32>() / sum.len() as f32).sqrt();

    // Per type: the largest RMS error relative to the sum's RMS the type may add.
    let cases = [
        (None, DEFAULT_PATCHED_TYPE, 0.01),
        (Some(GgmlType::F32), GgmlType::F32, 0.0),
        (Some(GgmlType::F16), GgmlType::F16, 1e-3),
        (Some(GgmlType::Q8_0), GgmlType::Q8_0, 0.01),
        (Some(GgmlType::Q6_K), GgmlType::Q6_K, 0.03),
        (Some(GgmlType::Q4_K), GgmlType::Q4_K, 0.12),
    ];
    for (i, (requested, dtype, tolerance)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("patched-{i}.gguf"));
        write_patched_model(&base, &overlay, requested, &path).unwrap();
        let out = GgufFile::open(&path).unwrap();

        assert_eq!(
            out.metadata().collect::<Vec<_>>(),
            base.metadata().collect::<Vec<_>>()
        );
        assert_eq!(out.alignment(), 64);
        let names =
            |f: &GgufFile| -> Vec<String> { f.tensors().iter().map(|t| t.name.clone()).collect() };
        assert_eq!(names(&out), names(&base));
        for t in base.tensors() {
            let got = out.tensor(&t.name).unwrap();
            assert_eq!(got.info.dims, t.dims, "{}", t.name);
            assert_eq!(got.info.offset % 64, 0, "{}", t.name);
            if t.name == target {
                continue;
            }
            assert_eq!(got.info.dtype, t.dtype, "{}", t.name);
            assert_eq!(got.data, base.tensor(&t.name).unwrap().data, "{}", t.name);
        }

        let got = out.tensor(target).unwrap();
        assert_eq!(got.info.dtype, dtype);
        // Exactly the quantizer's encoding of W + B·A ...
        assert_eq!(got.data, encode(dtype, &sum), "{dtype}");
        // ... which is W + B·A within the type's error.
        let values = decode(dtype, got.data, D * FF);
        let err = (values
            .iter()
            .zip(&sum)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            / sum.len() as f32)
            .sqrt();
        assert!(err <= tolerance * rms, "{dtype}: RMS error {err} vs {rms}");
    }
}

#[test]
fn write_patched_model_refuses_existing_paths_and_bad_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_model();
    let overlay = FfnOverlay::new(LAYERS, [(0, delta(1, 8))]);
    let taken = dir.path().join("taken.gguf");
    std::fs::write(&taken, b"do not touch").unwrap();
    let msg = write_patched_model(&base, &overlay, None, &taken)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("taken.gguf") && msg.contains("already exists"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"do not touch");

    let out = dir.path().join("out.gguf");
    let wrong = LowRank::new(D, FF + 1, 1, vec![0.0; FF + 1], vec![0.0; D]).unwrap();
    let msg = write_patched_model(&base, &FfnOverlay::new(LAYERS, [(1, wrong)]), None, &out)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("out.gguf: delta of layer 1"), "{msg}");

    // Types Quarry cannot quantize to, or that llama.cpp cannot use for a weight (Q8_K).
    for dtype in [GgmlType::Q4_1, GgmlType::Q8_K] {
        let msg = write_patched_model(&base, &overlay, Some(dtype), &out)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("out.gguf: requantization type")
                && msg.contains(&dtype.to_string())
                && msg.contains("Q4_K"),
            "{msg}"
        );
    }
    assert_eq!(dir_names(dir.path()), ["taken.gguf"]);
}
