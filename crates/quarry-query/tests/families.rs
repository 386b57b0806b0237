//! Vindexes of the families whose FFN is not one gated FFN after a norm: mixtures of experts
//! (features per expert, the router kept and used) and OLMo 2 (the FFN reads the residual),
//! on the reference models of `fixtures/families` (transformers' random weights, converted by
//! llama.cpp; scripts/make-fixtures).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use quarry_fixtures::family_dir;
use quarry_format::GgufFile;
use quarry_model::ops::rms_norm;
use quarry_model::{FeatureOwner, ForwardObserver, Model};
use quarry_query::{Cell, Executor};
use quarry_vindex::{extract, Dtype, ExtractOptions, Level, Vindex};

const MIXTURES: [&str; 4] = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"];

fn model(family: &str) -> Model {
    let path = family_dir(family).join("model-f32.gguf");
    Model::load(Arc::new(GgufFile::open(path).unwrap())).unwrap()
}

/// An `all`-level, `f32` vindex of `family`'s f32 GGUF, in a directory of its own.
fn vindex(family: &str, tmp: &Path) -> PathBuf {
    let out = tmp.join(format!("{family}.vindex"));
    let options = ExtractOptions {
        level: Level::All,
        dtype: Dtype::F32,
        top_k: 5,
    };
    extract(
        &family_dir(family).join("model-f32.gguf"),
        &out,
        &options,
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("{family}: {e}"));
    out
}

fn ids(family: &str) -> Vec<u32> {
    let text = std::fs::read_to_string(family_dir(family).join("ids.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    quarry_fixtures::ids(&value["ids"])
}

/// Every row of every layer's FFN input, activations and projection.
#[derive(Default)]
struct Ffns {
    input: Vec<Vec<f32>>,
    activations: Vec<Vec<f32>>,
    projection: Vec<Vec<f32>>,
}

impl ForwardObserver for Ffns {
    fn ffn_activations(&mut self, _layer: usize, input: &[f32], activations: &[f32]) {
        self.input.push(input.to_vec());
        self.activations.push(activations.to_vec());
    }
    fn ffn_projection(&mut self, _layer: usize, y: &[f32]) {
        self.projection.push(y.to_vec());
    }
}

fn close(a: &[f32], b: &[f32], what: &str) {
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    let worst = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "{what}: off by {worst} (scale {scale})"
    );
}

#[test]
fn a_mixtures_features_are_its_experts_and_the_forward_pass_is_their_weighted_sum() {
    for family in MIXTURES {
        let m = model(family);
        let cfg = m.config();
        let spec = cfg.experts.clone().expect("a mixture of experts");
        let tokens = &ids(family)[..16];
        let mut seen = Ffns::default();
        m.forward_observed(tokens, &mut m.new_cache(tokens.len()), 0..1, &mut seen)
            .unwrap();
        assert_eq!(seen.activations.len(), cfg.n_layers, "{family}");
        let d = cfg.d_model;
        for layer in 0..cfg.n_layers {
            let features = m.ffn_features(layer);
            let router = features.router.expect("an expert layer has a router");
            let width = features.width();
            assert_eq!(
                width,
                spec.count * spec.ff_dim + features.blocks.get(spec.count).map_or(0, |b| b.width()),
                "{family}"
            );
            for (row, x) in seen.input[layer].chunks_exact(d).enumerate() {
                let a = &seen.activations[layer][row * width..(row + 1) * width];
                // The features that fire are those of the experts the router picks (and the
                // shared expert's), and the FFN's output is Σ a_f · down_f.
                let weights = features.block_weights(x);
                let routed = weights[..spec.count].iter().filter(|&&w| w != 0.0).count();
                assert_eq!(routed, spec.used, "{family} layer {layer} row {row}");
                for (f, &af) in a.iter().enumerate() {
                    let block = match features.owner(f).unwrap() {
                        FeatureOwner::Expert { expert, .. } => expert,
                        FeatureOwner::Shared { .. } => spec.count,
                        FeatureOwner::Dense { .. } => panic!("{family}: a dense feature"),
                    };
                    if weights[block] == 0.0 {
                        assert_eq!(af, 0.0, "{family} layer {layer} feature {f}");
                    }
                }
                let y = &seen.projection[layer][row * d..(row + 1) * d];
                close(
                    &features.write(a),
                    y,
                    &format!("{family} layer {layer} row {row}"),
                );
                assert_eq!(router.route(x).len(), spec.used);
            }
        }
    }
}

#[test]
fn a_mixture_vindex_keeps_each_experts_vectors_and_the_router() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["qwen2_moe", "mixtral"] {
        let m = model(family);
        let v = Vindex::open(vindex(family, tmp.path())).unwrap();
        let info = v.index().model.experts.clone().expect("experts recorded");
        let spec = m.config().experts.clone().unwrap();
        assert_eq!(
            (info.count, info.used, info.ff_dim),
            (spec.count, spec.used, spec.ff_dim)
        );
        assert_eq!(info.shared_gate, family == "qwen2_moe");
        let d = v.index().model.d_model;
        for layer in 0..v.index().model.n_layers {
            let features = m.ffn_features(layer);
            assert_eq!(v.index().model.ff_dim, features.width());
            let mut first = 0;
            let mut row = vec![0.0f32; d];
            for block in &features.blocks {
                for n in 0..block.width() {
                    block.gate.dequantize_row(n, &mut row);
                    assert_eq!(v.gate_vector(layer, first + n), row, "{family} gate");
                }
                let mut down = vec![0.0f32; block.width()];
                for j in 0..d {
                    block.down.dequantize_row(j, &mut down);
                    for (n, &value) in down.iter().enumerate() {
                        assert_eq!(v.down_vector(layer, first + n).unwrap()[j], value);
                    }
                }
                first += block.width();
            }
            // The stored router routes as the model's.
            let stored = v.router(layer).unwrap();
            let own = features.router.unwrap();
            assert_eq!(stored.weights, own.weights);
            assert_eq!(stored.shared_gate, own.shared_gate);
            for token in [3u32, 77, 200, 411] {
                let mut x = v.embedding(token);
                rms_norm(&mut x, v.norm(layer), v.index().model.norm_eps);
                assert_eq!(stored.route(&x), own.route(&x));
                let weights = v.feature_weights(layer, &x);
                let firing = weights.iter().filter(|&&w| w != 0.0).count();
                assert_eq!(
                    firing,
                    spec.used * spec.ff_dim + info.shared_ff_dim,
                    "{family}"
                );
            }
        }
    }
}

#[test]
fn lql_on_a_mixture_names_experts_and_lists_only_routed_features() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vindex("qwen2_moe", tmp.path());
    let v = Vindex::open(&dir).unwrap();
    let prompt = "The capital of France is";
    let mut ex = Executor::with_vindex(&dir).unwrap();
    let results = ex
        .run_script(&format!(
            "WALK \"{prompt}\" TOP 5; TRACE \"{prompt}\" DECOMPOSE; EXPLAIN INFER \"{prompt}\" TOP 5"
        ))
        .unwrap();

    // WALK reads the last token's embedding through each layer's norm: only features of
    // the experts the stored router picks for that input may be listed.
    let walk = &results[0];
    let (layer_col, feature_col, expert_col) = (
        walk.column("layer").unwrap(),
        walk.column("feature").unwrap(),
        walk.column("expert").unwrap(),
    );
    let ids = v.tokenizer().encode(prompt, false, true);
    assert!(!walk.rows.is_empty());
    for row in &walk.rows {
        let (Cell::Int(layer), Cell::Int(feature)) = (&row[layer_col], &row[feature_col]) else {
            panic!("{row:?}");
        };
        let mut x = v.embedding(*ids.last().unwrap());
        rms_norm(&mut x, v.norm(*layer as usize), v.index().model.norm_eps);
        let weights = v.feature_weights(*layer as usize, &x);
        assert_ne!(weights[*feature as usize], 0.0, "{row:?} was not routed");
        let named = match v.feature_owner(*feature as usize).unwrap() {
            FeatureOwner::Expert { expert, .. } => expert.to_string(),
            FeatureOwner::Shared { .. } => "shared".into(),
            FeatureOwner::Dense { .. } => panic!("dense"),
        };
        assert_eq!(row[expert_col], Cell::Text(named));
    }

    // DECOMPOSE splits every layer's FFN term over its experts' features: the listed shares
    // and the rest add up to the FFN column of the plain TRACE.
    let trace = &results[1];
    let (part, contribution) = (
        trace.column("part").unwrap(),
        trace.column("contribution").unwrap(),
    );
    let parts: Vec<String> = trace
        .rows
        .iter()
        .map(|r| match &r[part] {
            Cell::Text(t) => t.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        parts.iter().any(|p| p.starts_with("ffn feature of")),
        "{parts:?}"
    );
    let total: f64 = trace
        .rows
        .iter()
        .map(|r| r[contribution].as_f64().unwrap())
        .sum();
    let note = &trace.notes[0];
    let logit: f64 = note
        .split("final logit ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!((total - logit).abs() < 1e-3, "{total} vs {logit}");

    let explain = &results[2];
    assert!(explain.column("expert").is_some());
    assert!(!explain.rows.is_empty());
}

#[test]
fn olmo2s_vindex_reads_the_residual_without_a_norm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vindex("olmo2", tmp.path());
    let v = Vindex::open(&dir).unwrap();
    let m = model("olmo2");
    assert!(v.index().model.ffn_reads_residual);
    assert!(v.index().model.experts.is_none());
    let d = v.index().model.d_model;
    for layer in 0..v.index().model.n_layers {
        assert!(v.norm(layer).iter().all(|&g| g == 1.0));
        let features = m.ffn_features(layer);
        assert!(features.norm.is_none() && features.post_norm.is_some());
        let mut row = vec![0.0f32; d];
        features.blocks[0].gate.dequantize_row(7, &mut row);
        assert_eq!(v.gate_vector(layer, 7), row);
    }
    let results = Executor::with_vindex(&dir)
        .unwrap()
        .run_script("WALK \"The capital of France is\" TOP 3")
        .unwrap();
    assert_eq!(results[0].rows.len(), 3 * v.index().model.n_layers);
    assert!(results[0].column("expert").is_none());
}

#[test]
fn a_mixture_manifest_that_lies_about_its_experts_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = vindex("qwen2_moe", tmp.path());
    let manifest = dir.join("index.json");
    let original = std::fs::read(&manifest).unwrap();
    let edit = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut value: serde_json::Value = serde_json::from_slice(&original).unwrap();
        change(&mut value);
        std::fs::write(&manifest, serde_json::to_vec(&value).unwrap()).unwrap();
        let err = match Vindex::open(&dir) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        std::fs::write(&manifest, &original).unwrap();
        err
    };
    type Change = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|v| v["model"]["experts"]["used"] = 9.into()),
            "model.experts.used is 9; it must be between 1 and the 4 experts",
        ),
        (
            Box::new(|v| v["model"]["experts"]["ff_dim"] = 63.into()),
            "model.experts.ff_dim is 63",
        ),
        (
            Box::new(|v| v["model"]["experts"]["shared_ff_dim"] = 0.into()),
            "model.experts.ff_dim is 64: 4 experts of it and a shared expert of 0",
        ),
        (
            Box::new(|v| v["model"]["experts"]["scale"] = (-1.0).into()),
            "model.experts.scale is -1",
        ),
        (
            Box::new(|v| {
                let files = v["files"].as_array_mut().unwrap();
                files.retain(|f| f["name"] != "router.bin");
            }),
            "router.bin",
        ),
        // Consistent in itself, but not the model inside.
        (
            Box::new(|v| v["model"]["experts"]["normalize"] = true.into()),
            "4 experts of 64 features, 2 used (normalize false, scale 1) in the model",
        ),
        (
            Box::new(|v| {
                v["model"].as_object_mut().unwrap().remove("experts");
            }),
            "in the model but a dense FFN of 352 features in index.json",
        ),
    ];
    for (change, expected) in cases {
        let err = edit(&*change);
        assert!(err.contains(expected), "{expected}: {err}");
    }
    // A router file shorter than its shape.
    let router = dir.join("router.bin");
    let bytes = std::fs::read(&router).unwrap();
    std::fs::write(&router, &bytes[..bytes.len() - 4]).unwrap();
    let err = Vindex::open(&dir).err().unwrap().to_string();
    assert!(
        err.contains("router.bin") && err.contains("bytes on disk"),
        "{err}"
    );
}
