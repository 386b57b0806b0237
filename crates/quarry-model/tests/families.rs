//! The tiny reference models of `fixtures/families/` (scripts/make-fixtures): each family's
//! model as llama.cpp's converter writes it to GGUF, and as transformers saved it
//! (safetensors), run teacher-forced over fixed token ids, must give transformers' f32 logits
//! (max abs difference ≤ 1e-3 × the logit range, issue 17).
//! Every family of the fixtures runs; files that break their family's spec are named errors.

use std::sync::Arc;

use quarry_fixtures::workspace_root;
use std::borrow::Cow;

use quarry_format::{gguf::GgufWriter, GgmlType, GgufFile, Value};
use quarry_model::hf::open_hf_dir;
use quarry_model::{Model, SequenceBatch};

/// Families Quarry runs from GGUF today.
const FAMILIES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo2",
    "phi3",
    "gemma2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
];

/// Quarry's logits on `file` (the model of `family`) against transformers' f32 logits; returns
/// the largest difference and the logit range.
fn check_logits(family: &str, source: &str, file: Arc<GgufFile>) {
    let dir = workspace_root().join("fixtures/families").join(family);
    let ids: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("ids.json")).unwrap()).unwrap();
    let ids: Vec<u32> = ids["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let golden: Vec<f32> = std::fs::read(dir.join("logits.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let model = Model::load(file).unwrap_or_else(|e| panic!("{family} ({source}): {e}"));
    let vocab = model.config().vocab_size;
    assert_eq!(golden.len(), ids.len() * vocab, "{family}");
    let mut cache = model.new_cache(ids.len());
    let logits = model.forward(&ids, &mut cache, 0..ids.len()).unwrap();
    let (lo, hi) = golden
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let worst = logits
        .iter()
        .zip(&golden)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{family} ({source}): max |Δ| {worst:.2e} over a logit range of {:.3}",
        hi - lo
    );
    assert!(
        worst <= 1e-3 * (hi - lo),
        "{family} ({source}): max |Δ| {worst} against range {}",
        hi - lo
    );
}

#[test]
fn gguf_logits_equal_transformers_f32() {
    for family in FAMILIES {
        let path = workspace_root()
            .join("fixtures/families")
            .join(family)
            .join("model-f32.gguf");
        check_logits(family, "GGUF", Arc::new(GgufFile::open(path).unwrap()));
    }
}

#[test]
fn safetensors_logits_equal_transformers_f32() {
    for family in FAMILIES {
        let dir = workspace_root().join("fixtures/families").join(family);
        let file = open_hf_dir(&dir, None).unwrap_or_else(|e| panic!("{family}: {e}"));
        check_logits(family, "safetensors", file);
    }
}

/// `family`'s fixture GGUF with metadata `set` (replacing any key of that name) and without
/// the tensor `drop`.
fn altered(family: &str, set: &[(&str, Value)], drop: Option<&str>) -> Arc<GgufFile> {
    rewritten(family, set, drop, GgmlType::F32)
}

/// [`altered`], with every matrix (2-D or 3-D tensor) stored as `dtype`.
fn rewritten(
    family: &str,
    set: &[(&str, Value)],
    drop: Option<&str>,
    dtype: GgmlType,
) -> Arc<GgufFile> {
    let path = workspace_root()
        .join("fixtures/families")
        .join(family)
        .join("model-f32.gguf");
    let file = GgufFile::open(&path).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        if key != "general.alignment" && !set.iter().any(|(k, _)| k == key) {
            w.add_metadata(key.clone(), value.clone()).unwrap();
        }
    }
    for (key, value) in set {
        w.add_metadata(*key, value.clone()).unwrap();
    }
    for info in file.tensors() {
        if Some(info.name.as_str()) == drop {
            continue;
        }
        let view = file.tensor(&info.name).unwrap();
        let data = if info.dims.len() >= 2 && dtype != info.dtype {
            let values: Vec<f32> = bytemuck::cast_slice::<u8, f32>(view.data).to_vec();
            let mut out = vec![0u8; dtype.bytes_for(values.len() as u64).unwrap() as usize];
            quarry_kernels::quantize(dtype, &values, &mut out).unwrap();
            Cow::Owned(out)
        } else {
            Cow::Borrowed(view.data)
        };
        let stored = if matches!(data, Cow::Owned(_)) {
            dtype
        } else {
            info.dtype
        };
        w.add_tensor(info.name.clone(), &info.dims, stored, data)
            .unwrap();
    }
    Arc::new(GgufFile::from_bytes(w.to_bytes(), family).unwrap())
}

/// What a family's spec requires is checked against the file, and each gap is one error
/// naming the key or tensor.
#[test]
fn files_that_break_their_family_are_named_errors() {
    for (family, set, drop, needle) in [
        (
            "mixtral",
            vec![("llama.expert_used_count", Value::U32(5))],
            None,
            "llama.expert_used_count = 5: must be at most expert_count",
        ),
        (
            "qwen2_moe",
            vec![("qwen2moe.expert_weights_norm", Value::U32(1))],
            None,
            "qwen2moe.expert_weights_norm = ?: must be a boolean",
        ),
        (
            "olmoe",
            vec![],
            Some("blk.1.ffn_up_exps.weight"),
            "blk.1.ffn_up_exps.weight",
        ),
        (
            "olmo2",
            vec![],
            Some("blk.0.post_ffw_norm.weight"),
            "blk.0.post_ffw_norm.weight",
        ),
        (
            "qwen3",
            vec![],
            Some("blk.1.attn_k_norm.weight"),
            "blk.1.attn_k_norm.weight",
        ),
        (
            "phi3",
            vec![],
            Some("blk.0.attn_qkv.weight"),
            "blk.0.attn_qkv.weight",
        ),
        (
            "gemma2",
            vec![("gemma2.attention.sliding_window", Value::U64(1 << 40))],
            None,
            "gemma2.attention.sliding_window",
        ),
    ] {
        let err = Model::load(altered(family, &set, drop))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(needle), "{family}: {err}");
    }
}

/// A file's `expert_weights_norm` overrides the family's default: OLMoE's top-2 weights
/// renormalised change the logits (and the routing stays the same).
#[test]
fn expert_weights_norm_is_read_from_the_file() {
    let logits = |file: Arc<GgufFile>| {
        let model = Model::load(file).unwrap();
        let mut cache = model.new_cache(8);
        model
            .forward(&[1, 2, 3, 4, 5, 6, 7, 8], &mut cache, 0..8)
            .unwrap()
    };
    let plain = logits(altered("olmoe", &[], None));
    let same = logits(altered(
        "olmoe",
        &[("olmoe.expert_weights_norm", Value::Bool(false))],
        None,
    ));
    let normed = logits(altered(
        "olmoe",
        &[("olmoe.expert_weights_norm", Value::Bool(true))],
        None,
    ));
    assert_eq!(plain, same);
    let moved = plain
        .iter()
        .zip(&normed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        moved > 1e-3,
        "renormalising moved the logits by only {moved}"
    );
}

/// A mixture of experts batches like a dense model: sequences run together (a decode step
/// first, then two prompts) get exactly the logits each gets alone, though their tokens share
/// experts; and prefilling a prompt equals decoding it token by token up to the decode
/// path's 8-bit activations: within 2% of the logit range (measured: 1.0–1.1% for the
/// experts, 1.3% for dense llama and qwen2). On Q8_0 copies of the fixtures, so that decode
/// rows really take the integer path; llama is the dense reference.
#[test]
fn expert_layers_batch_exactly_and_decode_like_prefill() {
    let ids: Vec<u32> = (1..=24).map(|i| (i * 37 % 500) as u32).collect();
    for family in ["llama", "mixtral", "qwen2_moe"] {
        let model = Model::load(rewritten(family, &[], None, GgmlType::Q8_0)).unwrap();
        let vocab = model.config().vocab_size;
        // Alone: a cache holding 5 tokens then one decode step; two fresh prompts.
        let mut decode_cache = model.new_cache(32);
        model.forward(&ids[..5], &mut decode_cache, 0..5).unwrap();
        let mut replay = model.new_cache(32);
        model.forward(&ids[..5], &mut replay, 0..5).unwrap();
        let step = model.forward(&ids[5..6], &mut replay, 0..1).unwrap();
        let prompts = [&ids[6..15], &ids[15..24]];
        // Alone through `forward_batch` too, whose output head takes 8-bit rows.
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let mut cache = model.new_cache(32);
                let mut one = [SequenceBatch {
                    tokens: p,
                    cache: &mut cache,
                    rows: 0..p.len(),
                    overlay: None,
                }];
                model.forward_batch(&mut one).unwrap()
            })
            .collect();
        let mut caches = [model.new_cache(32), model.new_cache(32)];
        let [a, b] = &mut caches;
        let mut batch = vec![
            SequenceBatch {
                tokens: &ids[5..6],
                cache: &mut decode_cache,
                rows: 0..1,
                overlay: None,
            },
            SequenceBatch {
                tokens: prompts[0],
                cache: a,
                rows: 0..prompts[0].len(),
                overlay: None,
            },
            SequenceBatch {
                tokens: prompts[1],
                cache: b,
                rows: 0..prompts[1].len(),
                overlay: None,
            },
        ];
        let together = model.forward_batch(&mut batch).unwrap();
        let expected = [step, alone[0].clone(), alone[1].clone()].concat();
        let worst = together
            .chunks(vocab)
            .zip(expected.chunks(vocab))
            .map(|(a, b)| {
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max)
            })
            .collect::<Vec<_>>();
        assert!(together == expected, "{family}: row differences {worst:?}");

        let mut cache = model.new_cache(32);
        for (i, &id) in prompts[0].iter().enumerate() {
            let one = model.forward(&[id], &mut cache, 0..1).unwrap();
            let row = &alone[0][i * vocab..(i + 1) * vocab];
            let (lo, hi) = row
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let worst = one
                .iter()
                .zip(row)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= 0.02 * (hi - lo),
                "{family} position {i}: decode differs by {worst} over a range of {}",
                hi - lo
            );
        }
    }
}
