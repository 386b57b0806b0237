//! Extraction of a real model (SmolLM2-135M, ~25 s once per test binary) and the checks a
//! reader makes when opening and verifying it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_kernels::pool;
use quarry_model::Model;
use quarry_vindex::{extract, layout, Dtype, ExtractOptions, Level, Vindex, VindexError};

/// One `all`-level f32 extraction shared by the tests (read-only).
fn vindex_dir() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("smollm2.vindex");
        let options = ExtractOptions {
            level: Level::All,
            dtype: Dtype::F32,
            top_k: 5,
        };
        extract(&model_path(TestModel::SmolLm2), &out, &options, &mut |_| {}).unwrap();
        (tmp, out)
    })
    .1
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn vectors_equal_the_models_own_weights() {
    let v = Vindex::open(vindex_dir()).unwrap();
    let file = GgufFile::open(model_path(TestModel::SmolLm2)).unwrap();
    let model = Model::load(&file).unwrap();
    let cfg = model.config();
    assert_eq!(v.index().model.n_layers, cfg.n_layers);
    assert_eq!(v.index().model.ff_dim, cfg.ff_dim);

    let mut row = vec![0.0f32; cfg.d_model];
    model.token_embeddings().dequantize_row(1234, &mut row);
    assert_eq!(v.embedding(1234), row);

    let layer = 7;
    let w = model.ffn_weights(layer);
    w.gate.dequantize_row(99, &mut row);
    assert_eq!(v.gate_vector(layer, 99), row);
    assert_eq!(v.norm(layer), w.norm);
    assert_eq!(v.norm(cfg.n_layers), model.output_norm());

    // gate · x over all features equals row-by-row dot products.
    let x: Vec<f32> = (0..cfg.d_model).map(|i| (i as f32 * 0.37).sin()).collect();
    let scores = v.gate_scores(layer, &x);
    for f in [0, 500, cfg.ff_dim - 1] {
        w.gate.dequantize_row(f, &mut row);
        let dot: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!(
            (scores[f] - dot).abs() < 1e-4 * (1.0 + dot.abs()),
            "feature {f}"
        );
    }

    // The down vector of a feature is column f of the down matrix.
    let down = v.down_vector(layer, 3).unwrap();
    let mut drow = vec![0.0f32; cfg.ff_dim];
    w.down.dequantize_row(10, &mut drow);
    assert_eq!(down[10], drow[3]);
}

#[test]
fn writes_are_the_extremes_of_the_real_vocabulary_projection() {
    let v = Vindex::open(vindex_dir()).unwrap();
    let file = GgufFile::open(model_path(TestModel::SmolLm2)).unwrap();
    let model = Model::load(&file).unwrap();
    let (layer, feature) = (12, 345);
    let down = v.down_vector(layer, feature).unwrap();
    let gains = model.output_norm();
    let x: Vec<f32> = down.iter().zip(gains).map(|(a, g)| a * g).collect();
    let head = model.output_head();
    let mut row = vec![0.0f32; x.len()];
    let logits: Vec<f32> = (0..head.rows())
        .map(|t| {
            head.dequantize_row(t, &mut row);
            row.iter().zip(&x).map(|(a, b)| a * b).sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let (top, bottom) = v.writes(layer, feature);
    assert_eq!(top.len(), 5);
    for (i, rec) in top.iter().enumerate() {
        let expected = logits[order[i]];
        assert!(
            (rec.logit - expected).abs() < 1e-3 * (1.0 + expected.abs()),
            "top {i}"
        );
        assert!((logits[rec.token as usize] - rec.logit).abs() < 1e-3 * (1.0 + expected.abs()));
    }
    for (i, rec) in bottom.iter().enumerate() {
        let expected = logits[order[order.len() - 1 - i]];
        assert!(
            (rec.logit - expected).abs() < 1e-3 * (1.0 + expected.abs()),
            "bottom {i}"
        );
    }
    assert!(pool::global().n_threads() >= 1);
}

#[test]
fn verify_finds_a_changed_byte_and_open_refuses_truncation() {
    assert!(Vindex::verify(vindex_dir()).unwrap().is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy.vindex");
    copy_dir(vindex_dir(), &copy);

    let gate = copy.join(layout::GATE);
    let mut bytes = std::fs::read(&gate).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&gate, &bytes).unwrap();
    let found = Vindex::verify(&copy).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].file, layout::GATE);
    assert!(found[0].problem.contains("sha256"), "{}", found[0].problem);

    std::fs::write(&gate, &bytes[..bytes.len() - 8]).unwrap();
    let err = Vindex::open(&copy).err().unwrap().to_string();
    assert!(
        err.contains("gate.bin") && err.contains("truncated"),
        "{err}"
    );

    // A relation table of the right size that is not JSON is named, not a panic.
    std::fs::copy(vindex_dir().join(layout::GATE), &gate).unwrap();
    let relations = copy.join(layout::RELATIONS);
    let size = std::fs::metadata(&relations).unwrap().len() as usize;
    std::fs::write(&relations, vec![b'x'; size]).unwrap();
    let err = Vindex::open(&copy).err().unwrap().to_string();
    assert!(
        err.contains("relations.json") && err.contains("not a relation table"),
        "{err}"
    );
}

#[test]
fn foreign_or_newer_manifests_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("x.vindex");
    std::fs::create_dir(&dir).unwrap();
    let index = dir.join(layout::INDEX);

    std::fs::write(&index, "{ not json").unwrap();
    let err = Vindex::open(&dir).err().unwrap();
    assert!(matches!(err, VindexError::Manifest { .. }), "{err}");

    std::fs::write(&index, r#"{"format": "larql", "version": 1}"#).unwrap();
    let err = Vindex::open(&dir).err().unwrap().to_string();
    assert!(err.contains("not a Quarry vindex"), "{err}");

    std::fs::write(&index, r#"{"format": "quarry-vindex", "version": 99}"#).unwrap();
    let err = Vindex::open(&dir).err().unwrap().to_string();
    assert!(err.contains("version 99"), "{err}");

    let err = Vindex::open(tmp.path().join("missing.vindex"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing.vindex") && err.contains("manifest"),
        "{err}"
    );
}

#[test]
fn extract_refuses_an_existing_output_and_leaves_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("taken.vindex");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let err = extract(
        &model_path(TestModel::SmolLm2),
        &out,
        &ExtractOptions::default(),
        &mut |_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep")).unwrap(), "x");
    let leftovers = std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(leftovers, 1, "no temporary directory left behind");
}

#[test]
fn a_lower_level_vindex_names_the_level_a_query_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("browse.vindex");
    copy_dir(vindex_dir(), &copy);
    // Rewrite the manifest as a browse-level one without the higher-level files.
    let path = copy.join(layout::INDEX);
    let mut index: layout::Index = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    index.level = Level::Browse;
    index
        .files
        .retain(|f| f.name != layout::MODEL && f.name != layout::DOWN);
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    let v = Vindex::open(&copy).unwrap();
    let err = v.down_vector(0, 0).err().unwrap().to_string();
    assert!(err.contains("--level all"), "{err}");
    let err = v.model_path().err().unwrap().to_string();
    assert!(err.contains("--level inference"), "{err}");
}

#[test]
fn feature_stats_are_the_mean_and_spread_over_the_calibration_embeddings() {
    let v = Vindex::open(vindex_dir()).unwrap();
    let file = GgufFile::open(model_path(TestModel::SmolLm2)).unwrap();
    let model = Model::load(&file).unwrap();
    let cfg = model.config();
    let (layer, feature) = (5, 17);
    let w = model.ffn_weights(layer);
    let (mut gate, mut up) = (vec![0.0f32; cfg.d_model], vec![0.0f32; cfg.d_model]);
    w.gate.dequantize_row(feature, &mut gate);
    w.up.dequantize_row(feature, &mut up);
    let n = v.index().calibration_tokens;
    assert_eq!(n, 4096);
    let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
    let mut x = vec![0.0f32; cfg.d_model];
    for i in 0..n {
        model
            .token_embeddings()
            .dequantize_row(i * cfg.vocab_size / n, &mut x);
        let rms = (x.iter().map(|a| a * a).sum::<f32>() / x.len() as f32 + cfg.norm_eps).sqrt();
        let xn: Vec<f32> = x.iter().zip(w.norm).map(|(a, g)| a / rms * g).collect();
        let g: f32 = gate.iter().zip(&xn).map(|(a, b)| a * b).sum();
        let u: f32 = up.iter().zip(&xn).map(|(a, b)| a * b).sum();
        let act = (g / (1.0 + (-g).exp()) * u) as f64;
        sum += act;
        sum_sq += act * act;
    }
    let mean = sum / n as f64;
    let std = (sum_sq / n as f64 - mean * mean).sqrt();
    let (m, s) = v.activation_stats(layer, feature);
    assert!(
        (m as f64 - mean).abs() < 1e-3 * (1.0 + mean.abs()),
        "mean {m} vs {mean}"
    );
    assert!(
        (s as f64 - std).abs() < 1e-3 * (1.0 + std),
        "std {s} vs {std}"
    );
}

#[test]
fn bad_extract_options_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let options = ExtractOptions {
        top_k: 0,
        ..ExtractOptions::default()
    };
    let out = tmp.path().join("x.vindex");
    let err = extract(&model_path(TestModel::SmolLm2), &out, &options, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("top_k must be at least 1"), "{err}");
    assert!(!out.exists());
    let options = ExtractOptions {
        top_k: 1 << 20,
        ..ExtractOptions::default()
    };
    let err = extract(&model_path(TestModel::SmolLm2), &out, &options, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("exceeds the vocabulary of 49152"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
