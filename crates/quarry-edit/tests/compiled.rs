//! One edit on SmolLM2, end to end outside the query layer: solved, then read three ways — as
//! the forward pass's overlay, compiled into a GGUF (its ffn_down requantized to Q8_0) and
//! written as a llama.cpp LoRA adapter read back — and each makes the rewrite prompt's greedy
//! answer the new target while the base file stays as it was.
//!
//! Needs the key-statistics text `scripts/fetch-models corpus` writes (run here when missing);
//! the statistics themselves are cached in `~/.cache/quarry/edit-stats` (about a minute the
//! first time).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use quarry_edit::eval::greedy_token;
use quarry_edit::patch::file_sha256;
use quarry_edit::{key_stats, EditKind, EditRequest, Editor, Hyper};
use quarry_fixtures::{model_path, workspace_root, TestModel};
use quarry_format::GgufFile;
use quarry_model::{read_adapter, write_adapter, write_patched_model, FfnOverlay, Model};
use quarry_tokenize::Tokenizer;

const REWRITE: &str = "The capital of France is the city of";

fn corpus(models: &std::path::Path) -> String {
    let path = models.join("edit-corpus.txt");
    if !path.exists() {
        let out = Command::new("bash")
            .arg(workspace_root().join("scripts/fetch-models"))
            .arg("corpus")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read_to_string(path).unwrap()
}

fn stats_dir() -> PathBuf {
    std::env::var_os("QUARRY_EDIT_STATS_DIR").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/quarry/edit-stats"),
        PathBuf::from,
    )
}

#[test]
fn one_edit_as_overlay_compiled_gguf_and_lora_adapter() {
    let path = model_path(TestModel::SmolLm2);
    let base_bytes_sha = file_sha256(&path).unwrap();
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let base = Model::load(Arc::clone(&file)).unwrap();
    // One layer: what compiling writes is the same for every edited layer.
    let mut hyper = Hyper::for_model(&base);
    hyper.spread = 1;
    let layer = hyper.layer;
    let text = corpus(path.parent().unwrap());
    let stats = key_stats(
        &base,
        &tokenizer,
        &base_bytes_sha,
        &[layer],
        &text,
        Some(&stats_dir()),
    )
    .unwrap();
    let editor = Editor::new(
        base.clone(),
        Tokenizer::from_gguf(&file).unwrap(),
        hyper,
        &stats,
    )
    .unwrap();
    let new_first = tokenizer.encode(" Rome", false, false)[0];
    assert_ne!(greedy_token(&base, &tokenizer, REWRITE).unwrap(), new_first);

    let edit = editor
        .solve(&EditRequest {
            entity: "France".into(),
            relation: "capital".into(),
            target: "Rome".into(),
            prompt: REWRITE.into(),
            kind: EditKind::Insert,
        })
        .unwrap();
    let deltas = editor.deltas(std::slice::from_ref(&edit));
    assert_eq!(deltas.len(), 1);
    let overlay = FfnOverlay::new(base.config().n_layers, deltas);
    let patched = base.with_overlay(Some(Arc::new(overlay))).unwrap();
    assert_eq!(
        greedy_token(&patched, &tokenizer, REWRITE).unwrap(),
        new_first
    );
    let overlay = patched.overlay().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let compiled_path = dir.path().join("edited.gguf");
    write_patched_model(&file, overlay, None, &compiled_path).unwrap();
    let compiled = Model::load(Arc::new(GgufFile::open(&compiled_path).unwrap())).unwrap();
    assert_eq!(
        greedy_token(&compiled, &tokenizer, REWRITE).unwrap(),
        new_first,
        "the edit did not survive requantization into the compiled GGUF"
    );

    let adapter_path = dir.path().join("edited-lora.gguf");
    write_adapter(overlay, base.config(), &adapter_path).unwrap();
    let adapter = read_adapter(&GgufFile::open(&adapter_path).unwrap(), base.config()).unwrap();
    let via_lora = base.with_overlay(Some(Arc::new(adapter))).unwrap();
    assert_eq!(
        greedy_token(&via_lora, &tokenizer, REWRITE).unwrap(),
        new_first
    );

    assert_eq!(
        file_sha256(&path).unwrap(),
        base_bytes_sha,
        "the base file changed"
    );
}
