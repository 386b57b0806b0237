//! Extraction of a real model (SmolLM2-135M, ~25 s once per test binary) and the checks a
//! reader makes when opening and verifying it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_kernels::pool;
use quarry_model::Model;
use quarry_vindex::{extract, layout, Dtype, ExtractOptions, Level, Vindex, VindexError};

fn smollm2() -> Model {
    Model::load(Arc::new(
        GgufFile::open(model_path(TestModel::SmolLm2)).unwrap(),
    ))
    .unwrap()
}

/// One `all`-level f32 extraction shared by the tests (read-only).
fn vindex_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = quarry_fixtures::fresh_dir("quarry-extract-smollm2").join("smollm2.vindex");
        let options = ExtractOptions {
            level: Level::All,
            dtype: Dtype::F32,
            top_k: 5,
        };
        extract(&model_path(TestModel::SmolLm2), &out, &options, &mut |_| {}).unwrap();
        out
    })
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
    let model = smollm2();
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
    assert_eq!(Some(v.norm(layer)), w.norm);
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
    let model = smollm2();
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
    let model = smollm2();
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
        let xn: Vec<f32> = x
            .iter()
            .zip(w.norm.unwrap())
            .map(|(a, g)| a / rms * g)
            .collect();
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

/// A copy of the shared vindex whose files are hard links (cheap; tests must [`replace`] a
/// file rather than write through the link, which would change the original).
fn linked_copy(tmp: &Path) -> PathBuf {
    let copy = tmp.join("linked.vindex");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(vindex_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::hard_link(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    copy
}

fn replace(path: &Path, bytes: &[u8]) {
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Rewrites the copy's manifest through `edit` on its JSON value.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(layout::INDEX);
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut value);
    replace(&path, &serde_json::to_vec(&value).unwrap());
}

/// Opens `dir` expecting an error; returns its text.
fn refused(dir: &Path) -> String {
    match Vindex::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn manifest_values_are_checked_against_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = linked_copy(tmp.path());
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "/bands/knowledge",
            serde_json::json!([20, 10]),
            "bands.knowledge [20, 10] is reversed",
        ),
        (
            "/bands/output",
            serde_json::json!([25, 30]),
            "bands.output [25, 30] reaches beyond the model's layers 0-29",
        ),
        (
            "/bands/syntax",
            serde_json::json!([0, 4000000000u64]),
            "bands.syntax",
        ),
        (
            "/model/activation",
            serde_json::json!("relu"),
            "model.activation is \"relu\"",
        ),
        (
            "/model/embed_scale",
            serde_json::json!(1e39),
            "model.embed_scale",
        ),
        (
            "/model/norm_eps",
            serde_json::json!(-1e-5),
            "model.norm_eps is -0.00001",
        ),
        (
            "/model/n_layers",
            serde_json::json!(0),
            "model.n_layers is 0",
        ),
        ("/top_k", serde_json::json!(0), "top_k is 0"),
        (
            "/calibration_tokens",
            serde_json::json!(1u64 << 40),
            "calibration_tokens",
        ),
        (
            "/files/0/name",
            serde_json::json!("../../etc/passwd"),
            "names \"../../etc/passwd\", which is not a vindex file",
        ),
        (
            "/files/0/name",
            serde_json::json!("/etc/passwd"),
            "which is not a vindex file",
        ),
        (
            "/files/0/sha256",
            serde_json::json!("nothex"),
            "is not 64 lowercase hex digits",
        ),
    ];
    for (pointer, value, expected) in cases {
        edit_manifest(&dir, |v| *v.pointer_mut(pointer).unwrap() = value.clone());
        let err = refused(&dir);
        assert!(
            err.contains("index.json") && err.contains(expected),
            "{pointer} = {value}: {err}"
        );
        replace(
            &dir.join(layout::INDEX),
            &std::fs::read(vindex_dir().join(layout::INDEX)).unwrap(),
        );
    }
    // NaN cannot be written in JSON; null in a float field is a manifest error naming the line.
    edit_manifest(&dir, |v| v["model"]["norm_eps"] = serde_json::Value::Null);
    assert!(refused(&dir).contains("not a valid vindex manifest"));
    replace(
        &dir.join(layout::INDEX),
        &std::fs::read(vindex_dir().join(layout::INDEX)).unwrap(),
    );

    // A duplicated entry, and verify refuses the same manifests open does.
    edit_manifest(&dir, |v| {
        let first = v["files"][0].clone();
        v["files"].as_array_mut().unwrap().push(first);
    });
    assert!(refused(&dir).contains("a second time"));
    let err = Vindex::verify(&dir).err().unwrap().to_string();
    assert!(err.contains("a second time"), "{err}");
}

#[test]
fn verify_checks_structure_not_only_hashes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = linked_copy(tmp.path());
    // An empty file list is not a vindex that verifies: every file the level needs is named.
    edit_manifest(&dir, |v| v["files"] = serde_json::json!([]));
    let found = Vindex::verify(&dir).unwrap();
    let names: Vec<&str> = found.iter().map(|m| m.file.as_str()).collect();
    assert!(
        names.contains(&layout::GATE) && names.contains(&layout::MODEL),
        "{found:?}"
    );
    assert!(
        found.iter().all(|m| m.problem.contains("is not listed")),
        "{found:?}"
    );

    // Hashes that match but contents that disagree with the manifest: verify reports the error.
    replace(
        &dir.join(layout::INDEX),
        &std::fs::read(vindex_dir().join(layout::INDEX)).unwrap(),
    );
    edit_manifest(&dir, |v| {
        v["bands"]["knowledge"] = serde_json::json!([9, 3])
    });
    let err = Vindex::verify(&dir).err().unwrap().to_string();
    assert!(err.contains("bands.knowledge"), "{err}");
}

#[test]
fn relation_table_ids_are_checked_against_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = linked_copy(tmp.path());
    let original = std::fs::read(vindex_dir().join(layout::RELATIONS)).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&original).unwrap();
    assert!(
        !value["edges"].as_array().unwrap().is_empty(),
        "the real table has edges"
    );
    let n_relations = value["relations"].as_array().unwrap().len();
    let cases: Vec<(&str, serde_json::Value, String)> = vec![
        (
            "/edges/0/relation",
            serde_json::json!(n_relations),
            format!("edges[0] relation {n_relations} is not one of the {n_relations} relations"),
        ),
        (
            "/edges/3/layer",
            serde_json::json!(30),
            "edges[3] layer 30 is not one of the model's 30 layers".into(),
        ),
        (
            "/edges/1/feature",
            serde_json::json!(1536),
            "edges[1] feature 1536".into(),
        ),
        (
            "/edges/2/output",
            serde_json::json!(49152),
            "edges[2] token".into(),
        ),
        (
            "/relations/0/id",
            serde_json::json!(7),
            "relations[0].id is 7".into(),
        ),
        (
            "/layers",
            serde_json::json!([12, 99]),
            "layers [12, 99] reaches beyond".into(),
        ),
        (
            "/catalogue/0/relation",
            serde_json::json!("shoe size"),
            "catalogue[0] relation \"shoe size\" is not in the catalogue".into(),
        ),
        (
            "/catalogue/1/answered",
            serde_json::json!(1000),
            "catalogue[1] 1000 of".into(),
        ),
    ];
    for (pointer, new, expected) in cases {
        let mut v = value.clone();
        *v.pointer_mut(pointer).unwrap() = new;
        let bytes = serde_json::to_vec(&v).unwrap();
        replace(&dir.join(layout::RELATIONS), &bytes);
        // Keep the manifest's size right so the check reached is the contents', not the size's.
        edit_manifest(&dir, |m| {
            for f in m["files"].as_array_mut().unwrap() {
                if f["name"] == layout::RELATIONS {
                    f["bytes"] = serde_json::json!(bytes.len());
                }
            }
        });
        let err = refused(&dir);
        assert!(
            err.contains("relations.json") && err.contains(&expected),
            "{pointer}: {err}"
        );
    }
}

#[test]
fn data_files_and_the_embedded_model_are_checked_against_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = linked_copy(tmp.path());
    // A token id outside the vocabulary in writes.bin.
    let mut writes = std::fs::read(vindex_dir().join(layout::WRITES)).unwrap();
    writes[8 * 5..8 * 5 + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    replace(&dir.join(layout::WRITES), &writes);
    let err = refused(&dir);
    assert!(
        err.contains("writes.bin: record 5 names token 4294967295"),
        "{err}"
    );
    std::fs::remove_file(dir.join(layout::WRITES)).unwrap();
    std::fs::hard_link(vindex_dir().join(layout::WRITES), dir.join(layout::WRITES)).unwrap();

    // The model file's configuration disagrees with the manifest's.
    edit_manifest(&dir, |v| v["model"]["norm_eps"] = serde_json::json!(0.001));
    let err = refused(&dir);
    assert!(
        err.contains("model.gguf: norm_eps is 0.00001 in the model but 0.001 in index.json"),
        "{err}"
    );
}

#[test]
fn special_files_in_a_vindex_are_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = linked_copy(tmp.path());
    let fifo = |path: &Path| {
        std::fs::remove_file(path).unwrap();
        assert!(std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap()
            .success());
    };
    fifo(&dir.join(layout::INDEX));
    let err = refused(&dir);
    assert!(err.contains("index.json") && err.contains("FIFO"), "{err}");
    let err = Vindex::verify(&dir).err().unwrap().to_string();
    assert!(err.contains("FIFO"), "{err}");

    std::fs::remove_file(dir.join(layout::INDEX)).unwrap();
    std::fs::hard_link(vindex_dir().join(layout::INDEX), dir.join(layout::INDEX)).unwrap();
    fifo(&dir.join(layout::GATE));
    let err = refused(&dir);
    assert!(err.contains("gate.bin") && err.contains("FIFO"), "{err}");
    let found = Vindex::verify(&dir).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].problem.contains("FIFO"), "{found:?}");

    std::fs::remove_file(dir.join(layout::GATE)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join(layout::GATE)).unwrap();
    let err = refused(&dir);
    assert!(err.contains("character device"), "{err}");

    std::fs::remove_file(dir.join(layout::GATE)).unwrap();
    std::fs::create_dir(dir.join(layout::GATE)).unwrap();
    let found = Vindex::verify(&dir).unwrap();
    assert!(found[0].problem.contains("is a directory"), "{found:?}");
}
