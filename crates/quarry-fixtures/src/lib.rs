//! Test support shared by the workspace's integration tests.
//!
//! Real models are never committed: [`model_path`] runs the project's `scripts/fetch-models`
//! (idempotent; a no-op once the cache is filled) and returns the cached file. The golden
//! references measured with llama.cpp live in `fixtures/goldens/` (copied from the project's
//! shared goldens; see `fixtures/goldens/README.md` for provenance).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// The two real models the tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestModel {
    /// Gemma 3 270M "Q4_K_M" (Q8_0, Q5_0, Q4_K, Q6_K blocks), `gemma3` architecture.
    Gemma3,
    /// SmolLM2-135M-Instruct Q4_1, `llama` architecture, GPT-2 BPE tokenizer.
    SmolLm2,
}

impl TestModel {
    pub const ALL: [TestModel; 2] = [TestModel::Gemma3, TestModel::SmolLm2];

    /// The name `scripts/fetch-models` takes.
    pub fn fetch_name(self) -> &'static str {
        match self {
            TestModel::Gemma3 => "gemma",
            TestModel::SmolLm2 => "smollm2",
        }
    }

    /// The model's key in `fixtures/goldens/llamacpp.json`.
    pub fn golden_key(self) -> &'static str {
        match self {
            TestModel::Gemma3 => "gemma-3-270m-q4_k_m",
            TestModel::SmolLm2 => "SmolLM2-135M-Instruct.Q4_1",
        }
    }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crate lives two levels below the workspace root")
        .to_path_buf()
}

/// An empty directory `name` in the system's temporary directory, emptied first if an earlier
/// run left it: for an extraction a test binary shares among its tests through a `static`. A
/// `static` is never dropped, so a `tempfile::TempDir` there would leave one copy behind per
/// run; a fixed name keeps at most one. Each caller passes a name of its own.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// The tiny reference models of `fixtures/families/` (scripts/make-fixtures), one per family.
pub const FAMILIES: &[&str] = &[
    "llama",
    "llama3",
    "mistral",
    "qwen2",
    "qwen2_yarn",
    "qwen3",
    "olmo2",
    "phi3",
    "phi3_longrope",
    "gemma2",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
];

/// The Hugging Face directory of family `name`'s reference model (`model-f32.gguf` inside is
/// the GGUF llama.cpp's converter wrote from it).
pub fn family_dir(name: &str) -> PathBuf {
    workspace_root().join("fixtures/families").join(name)
}

/// The token ids the reference logits of family `name` were computed on (`ids.json`).
pub fn family_ids(name: &str) -> Vec<u32> {
    let path = family_dir(name).join("ids.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ids(&json["ids"])
}

/// A little-endian `f32` file of family `name`'s directory (`logits.f32`: transformers' logits
/// on [`family_ids`]; `llamacpp-*.f32`: llama.cpp's on each GGUF).
pub fn family_floats(name: &str, file: &str) -> Vec<f32> {
    std::fs::read(family_dir(name).join(file))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Asserts that `logits` (of family `name`'s model, run by `source`, over [`family_ids`]) equal
/// transformers' f32 logits (`logits.f32`): max abs difference ≤ 1e-3 × their range (issue 17's
/// bar), printed for the record.
pub fn assert_family_logits(name: &str, source: &str, logits: &[f32]) {
    let golden = family_floats(name, "logits.f32");
    assert_eq!(logits.len(), golden.len(), "{name} ({source})");
    let (lo, hi) = golden
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let worst = logits
        .iter()
        .zip(&golden)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{name} ({source}): max |Δ| {worst:.2e} over a logit range of {:.3}",
        hi - lo
    );
    assert!(
        worst <= 1e-3 * (hi - lo),
        "{name} ({source}): max |Δ| {worst} against range {}",
        hi - lo
    );
}

/// The index of the largest value of a row of logits (the first of equals).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Path of a real test model, fetched into the cache on first use.
///
/// Panics with the script's message when the model cannot be fetched: a test on real data must
/// fail loudly rather than pass by skipping.
pub fn model_path(model: TestModel) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let script = workspace_root().join("scripts/fetch-models");
    let out = Command::new("bash")
        .arg(&script)
        .arg(model.fetch_name())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} {} failed: {}",
        script.display(),
        model.fetch_name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "fetch-models printed {}, which is not a file",
        path.display()
    );
    path
}

/// The directory of golden reference files.
pub fn goldens_dir() -> PathBuf {
    workspace_root().join("fixtures/goldens")
}

/// `fixtures/goldens/llamacpp.json`, parsed once.
pub fn llamacpp_goldens() -> &'static serde_json::Value {
    static GOLDENS: OnceLock<serde_json::Value> = OnceLock::new();
    GOLDENS.get_or_init(|| {
        let path = goldens_dir().join("llamacpp.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// The golden entry of one model (`models.<key>` in `llamacpp.json`).
pub fn model_goldens(model: TestModel) -> &'static serde_json::Value {
    &llamacpp_goldens()["models"][model.golden_key()]
}

/// The text the golden perplexities were computed on.
pub fn perplexity_text() -> String {
    let path = goldens_dir().join("gpl-3.txt");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A JSON array of integers as token ids.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {value}"))
        .iter()
        .map(|v| v.as_u64().expect("token id") as u32)
        .collect()
}
