//! The tiny reference models of `fixtures/families/` (scripts/make-fixtures): each family's
//! model as llama.cpp's converter writes it to GGUF, run teacher-forced over fixed token ids,
//! must give transformers' f32 logits (max abs difference ≤ 1e-3 × the logit range, issue 17).
//! Families join this list as Quarry learns to run them.

use std::sync::Arc;

use quarry_fixtures::workspace_root;
use quarry_format::GgufFile;
use quarry_model::Model;

/// Families Quarry runs from GGUF today.
const FAMILIES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gemma2",
];

#[test]
fn gguf_logits_equal_transformers_f32() {
    for family in FAMILIES {
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
        let file = Arc::new(GgufFile::open(dir.join("model-f32.gguf")).unwrap());
        let model = Model::load(file).unwrap_or_else(|e| panic!("{family}: {e}"));
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
            "{family}: max |Δ| {worst:.2e} over a logit range of {:.3}",
            hi - lo
        );
        assert!(
            worst <= 1e-3 * (hi - lo),
            "{family}: max |Δ| {worst} against range {}",
            hi - lo
        );
    }
}

/// The families Quarry does not run yet are refused with one error naming what the file is,
/// not a missing tensor or a panic.
#[test]
fn families_not_run_yet_are_named_errors() {
    for (family, needle) in [
        (
            "mixtral",
            "llama.expert_count: a mixture-of-experts model (4 experts)",
        ),
        ("qwen2_moe", "unsupported architecture 'qwen2moe'"),
        ("qwen3_moe", "unsupported architecture 'qwen3moe'"),
        ("olmoe", "unsupported architecture 'olmoe'"),
    ] {
        let path = workspace_root()
            .join("fixtures/families")
            .join(family)
            .join("model-f32.gguf");
        let file = Arc::new(GgufFile::open(&path).unwrap());
        let err = Model::load(file).err().unwrap().to_string();
        assert!(err.contains(needle), "{family}: {err}");
    }
}
