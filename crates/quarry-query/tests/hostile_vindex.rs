//! Property: opening a vindex either fails with a one-line error, or succeeds on a vindex every
//! kind of statement can then run on without a panic (a statement may still answer with an
//! error; the unchanged vindex must answer every one). Each case takes a real SmolLM2 vindex
//! (extracted once, inference level, ~30 s), changes a few values in its manifest, relation
//! table or data files to awkward ones (zero, one past the end, huge, reversed, NaN, foreign
//! names), opens it and, when that succeeds, runs every statement on it (about 3 s a case, most
//! of it the in-context DESCRIBE).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use quarry_fixtures::{model_path, TestModel};
use quarry_query::Executor;
use quarry_vindex::{extract, layout, Dtype, ExtractOptions, Level};
use serde_json::{json, Value};

fn vindex() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = quarry_fixtures::fresh_dir("quarry-hostile-smollm2").join("smollm2.vindex");
        let options = ExtractOptions {
            level: Level::Inference,
            dtype: Dtype::F16,
            top_k: 5,
        };
        extract(&model_path(TestModel::SmolLm2), &out, &options, &mut |_| {}).unwrap();
        out
    })
}

/// Every kind of statement, each run on its own so one error does not skip the rest.
const STATEMENTS: &[&str] = &[
    "STATS",
    "SHOW LAYERS",
    "SHOW FEATURES 3",
    "SHOW RELATIONS",
    "SHOW RELATIONS WITH EXAMPLES",
    "SHOW RELATIONS VIA FEATURES AT LAYER 12 WITH EXAMPLES",
    "SHOW ENTITIES",
    "SHOW ENTITIES AT LAYER 12 LIMIT 3",
    "SHOW FEATURES 3 WHERE relation = \"capital\" LIMIT 2",
    "DESCRIBE \"France\"",
    "DESCRIBE \"France\" VIA FEATURES",
    "DESCRIBE \"France\" ALL LAYERS BRIEF RAW",
    "DESCRIBE \"France\" SYNTAX RAW",
    "DESCRIBE \"France\" OUTPUT VERBOSE RAW",
    "DESCRIBE \"France\" BRIEF RELATIONS ONLY RAW",
    "WALK \"The capital of France\" TOP 3",
    "EXPLAIN WALK \"France\" TOP 2 LAYERS 0-1",
    "SELECT * FROM EDGES LIMIT 5",
    "SELECT relation, target FROM EDGES WHERE entity = \"France\" AND relation = \"capital\"",
    "SELECT * FROM FEATURES WHERE layer = 2 LIMIT 3",
    "SELECT * FROM ENTITIES NEAREST TO \"France\" AT LAYER 3 LIMIT 3",
    "INFER \"The capital of France is\" TOP 3",
    "EXPLAIN INFER \"Paris is in\" TOP 2 LAYERS 5-6",
    "TRACE \"The capital of France is\" FOR \" Paris\" DECOMPOSE LAYERS 20-21",
];

#[derive(Clone, Debug)]
enum Change {
    /// A JSON pointer in `index.json` and its new value.
    Manifest(String, Value),
    /// A JSON pointer in `relations.json` and its new value.
    Relations(String, Value),
    /// Record `n` of `writes.bin` names token `t`.
    WritesToken(usize, u32),
    /// Value `n` of `norms.bin` (f32) set.
    Norm(usize, f32),
    /// Value `n` of `gate.bin` (f16 bits) set.
    Gate(usize, u16),
}

fn awkward_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        (0u64..64).prop_map(|n| json!(n)),
        Just(json!(29)),
        Just(json!(30)),
        Just(json!(576)),
        Just(json!(1535)),
        Just(json!(1536)),
        Just(json!(49152)),
        Just(json!(u32::MAX)),
        Just(json!(1u64 << 40)),
        any::<u64>().prop_map(|n| json!(n)),
        Just(json!(-1)),
    ]
}

fn awkward_float() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0.0)),
        Just(json!(-1.0)),
        Just(json!(1e39)),
        Just(json!(1e-30)),
        Just(json!(3.0)),
        Just(json!(0.001)),
        Just(Value::Null),
    ]
}

fn awkward_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("../../etc/passwd")),
        Just(json!("/etc/passwd")),
        Just(json!("")),
        Just(json!("gate.bin")),
        Just(json!("down.bin")),
        Just(json!("relu")),
        Just(json!("gelu_tanh")),
        Just(json!("all")),
        Just(json!("f32")),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    let counts = prop::sample::select(vec![
        "/model/n_layers",
        "/model/d_model",
        "/model/ff_dim",
        "/model/vocab_size",
        "/top_k",
        "/calibration_tokens",
        "/bands/syntax/0",
        "/bands/knowledge/0",
        "/bands/knowledge/1",
        "/bands/output/1",
        "/files/0/bytes",
        "/files/2/shape/0",
        "/files/3/shape/1",
    ]);
    let floats = prop::sample::select(vec!["/model/norm_eps", "/model/embed_scale"]);
    let names = prop::sample::select(vec![
        "/files/0/name",
        "/files/4/name",
        "/model/activation",
        "/level",
        "/dtype",
        "/files/2/element",
    ]);
    let edge_fields = prop::sample::select(vec!["layer", "feature", "relation", "input", "output"]);
    let bands = prop::sample::select(vec![
        "/bands/syntax/1",
        "/bands/knowledge/0",
        "/bands/knowledge/1",
        "/bands/output/0",
        "/bands/output/1",
    ]);
    prop_oneof![
        (counts, awkward_number()).prop_map(|(p, v)| Change::Manifest(p.into(), v)),
        // Layer numbers around the model's 30: reversed bands and bands past the end.
        (bands, 0u64..40).prop_map(|(p, l)| Change::Manifest(p.into(), json!(l))),
        (floats, awkward_float()).prop_map(|(p, v)| Change::Manifest(p.into(), v)),
        (names, awkward_name()).prop_map(|(p, v)| Change::Manifest(p.into(), v)),
        (0usize..4, edge_fields, awkward_number())
            .prop_map(|(i, f, v)| Change::Relations(format!("/edges/{i}/{f}"), v)),
        (0usize..2, awkward_number())
            .prop_map(|(i, v)| Change::Relations(format!("/layers/{i}"), v)),
        (0usize..3, awkward_number())
            .prop_map(|(i, v)| Change::Relations(format!("/relations/{i}/id"), v)),
        (
            0usize..3,
            prop::sample::select(vec!["asked", "answered"]),
            awkward_number()
        )
            .prop_map(|(i, f, v)| Change::Relations(format!("/catalogue/{i}/{f}"), v)),
        (0usize..1000, any::<u32>()).prop_map(|(n, t)| Change::WritesToken(n, t)),
        (
            0usize..1000,
            prop_oneof![
                Just(f32::NAN),
                Just(f32::INFINITY),
                Just(0.0f32),
                Just(-1e30f32)
            ]
        )
            .prop_map(|(n, x)| Change::Norm(n, x)),
        (
            0usize..100_000,
            prop_oneof![Just(0x7e00u16), Just(0x7c00u16), Just(0xfc00u16)]
        )
            .prop_map(|(n, h)| Change::Gate(n, h)),
    ]
}

/// A copy of the vindex (hard links; a changed file is written anew, never through a link).
fn copy_with(changes: &[Change], to: &Path) -> PathBuf {
    let dir = to.join("case.vindex");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(vindex()).unwrap() {
        let entry = entry.unwrap();
        std::fs::hard_link(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let read_json = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(vindex().join(name)).unwrap()).unwrap()
    };
    let mut manifest = read_json(layout::INDEX);
    let mut relations = read_json(layout::RELATIONS);
    let mut writes = std::fs::read(vindex().join(layout::WRITES)).unwrap();
    let mut norms = std::fs::read(vindex().join(layout::NORMS)).unwrap();
    let mut gate = None;
    for c in changes {
        match c {
            Change::Manifest(p, v) => set(&mut manifest, p, v.clone()),
            Change::Relations(p, v) => set(&mut relations, p, v.clone()),
            Change::WritesToken(n, t) => writes[n * 8..n * 8 + 4].copy_from_slice(&t.to_le_bytes()),
            Change::Norm(n, x) => norms[n * 4..n * 4 + 4].copy_from_slice(&x.to_le_bytes()),
            Change::Gate(n, h) => {
                let g =
                    gate.get_or_insert_with(|| std::fs::read(vindex().join(layout::GATE)).unwrap());
                g[n * 2..n * 2 + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
    }
    let relations = serde_json::to_vec(&relations).unwrap();
    // The relation table's size stays consistent unless a change targets that entry.
    if let Some(files) = manifest["files"].as_array_mut() {
        for f in files {
            if f["name"] == layout::RELATIONS && f["bytes"].is_u64() {
                f["bytes"] = json!(relations.len());
            }
        }
    }
    let write = |name: &str, bytes: &[u8]| {
        std::fs::remove_file(dir.join(name)).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    write(layout::INDEX, &serde_json::to_vec(&manifest).unwrap());
    write(layout::RELATIONS, &relations);
    write(layout::WRITES, &writes);
    write(layout::NORMS, &norms);
    if let Some(g) = gate {
        write(layout::GATE, &g);
    }
    dir
}

/// Sets `pointer` in `value` when its parent exists (a pointer into a missing entry is a no-op).
fn set(value: &mut Value, pointer: &str, new: Value) {
    if let Some(slot) = value.pointer_mut(pointer) {
        *slot = new;
    }
}

#[test]
fn open_fails_cleanly_or_no_statement_panics() {
    let (opened, refused) = (Cell::new(0), Cell::new(0));
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(change(), 1..3), |changes| {
            let tmp = tempfile::tempdir().unwrap();
            let dir = copy_with(&changes, tmp.path());
            match Executor::with_vindex(&dir) {
                Err(e) => {
                    refused.set(refused.get() + 1);
                    let text = e.to_string();
                    prop_assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
                }
                Ok(mut executor) => {
                    opened.set(opened.get() + 1);
                    for statement in STATEMENTS {
                        // An error is a fine answer; a panic fails the case.
                        let _ = executor.run_script(statement);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    // Both outcomes were exercised (NaN weights open; foreign names do not).
    assert!(
        opened.get() > 0 && refused.get() > 0,
        "opened {opened:?}, refused {refused:?}"
    );
}

#[test]
fn the_unchanged_vindex_answers_every_statement() {
    let mut executor = Executor::with_vindex(vindex()).unwrap();
    for statement in STATEMENTS {
        executor
            .run_script(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// A browse-level vindex from before extraction measured relation accuracy holds neither the
/// accuracy nor a model to measure it with: SHOW RELATIONS and the EDGES of an entity say so
/// and what to do, and the feature clusters are still listed.
#[test]
fn a_browse_vindex_without_accuracy_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_with(
        &[
            Change::Manifest("/level".into(), json!("browse")),
            Change::Relations("/catalogue".into(), json!([])),
        ],
        tmp.path(),
    );
    let mut executor = Executor::with_vindex(&dir).unwrap();
    for (statement, needle) in [
        ("SHOW RELATIONS", "extract it again"),
        (
            "SELECT * FROM EDGES WHERE entity = \"France\"",
            "this vindex holds none (browse level)",
        ),
    ] {
        let err = executor.run_script(statement).unwrap_err().to_string();
        assert!(
            err.contains(needle) && !err.contains('\n'),
            "{statement}: {err}"
        );
    }
    executor.run_script("SHOW RELATIONS VIA FEATURES").unwrap();
}
