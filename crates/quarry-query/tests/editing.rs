//! The editing statements on a real model (SmolLM2-135M opened with `USE` of its GGUF file):
//! an INSERT changes what INFER says on the rewrite prompt and not on an unrelated one, a
//! saved patch applied in a fresh executor gives the same logits, REMOVE and DELETE restore
//! the base logits exactly, the model compiled to GGUF says the new target on its own, a
//! native fact is suppressed, and each bad input of issue 15 is one clear error that changes
//! nothing, writes nothing and leaves the base file alone.
//!
//! The first run computes the editor's key statistics of SmolLM2's default layer (about a
//! minute; cached in the edit-stats directory, see docs/lql.md).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use quarry_edit::patch::file_sha256;
use quarry_edit::Patch;
use quarry_fixtures::{model_path, workspace_root, TestModel};
use quarry_query::{Cell, Executor, QueryError, ResultSet};

const REWRITE: &str = "The capital of France is the city of";
const UNRELATED: &str = "The opposite of hot is";

/// The key-statistics text, written by the fetch script when missing.
fn corpus() {
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

fn open(model: &Path) -> Executor {
    corpus();
    Executor::with_vindex(model).unwrap()
}

fn run(ex: &mut Executor, statement: &str) -> ResultSet {
    ex.run_script(statement)
        .unwrap_or_else(|e| panic!("{statement}: {e}"))
        .remove(0)
}

fn fails(ex: &mut Executor, statement: &str) -> String {
    match ex.run_script(statement) {
        Ok(r) => panic!("{statement} succeeded: {r:?}"),
        Err(e) => e.to_string(),
    }
}

/// (token, logit) of INFER's top 5.
fn infer(ex: &mut Executor, prompt: &str) -> Vec<(String, f64)> {
    let r = run(ex, &format!("INFER \"{prompt}\" TOP 5"));
    r.rows
        .iter()
        .map(|row| {
            (
                row[1].as_str().unwrap().to_string(),
                row[4].as_f64().unwrap(),
            )
        })
        .collect()
}

fn text(c: &Cell) -> &str {
    c.as_str().unwrap_or_else(|| panic!("not text: {c:?}"))
}

/// What must not change: the base file's bytes and modification time.
fn fingerprint(path: &Path) -> (String, SystemTime) {
    (
        file_sha256(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn insert_save_apply_remove_and_the_bad_inputs_on_smollm2() {
    let model = model_path(TestModel::SmolLm2);
    let before = fingerprint(&model);
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).display().to_string();
    let mut ex = open(&model);

    let base_rewrite = infer(&mut ex, REWRITE);
    let base_unrelated = infer(&mut ex, UNRELATED);
    assert_ne!(base_rewrite[0].0.trim(), "Rome", "{base_rewrite:?}");

    // Bad rows that need the editor's tokenizer: each one error, and the session unchanged.
    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("Fr", "capital", "Rome") TEMPLATE "{entity}ance has its capital in""#,
    );
    assert!(e.contains("\"Fr\": has no tokens of its own"), "{e}");
    for target in ["", "   "] {
        let e = fails(
            &mut ex,
            &format!(
                r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "{target}")"#
            ),
        );
        assert!(e.contains("tokenizes to nothing"), "{e}");
    }
    // One bad row among good ones: nothing is solved or recorded.
    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome"), ("Japan", "capital", "")"#,
    );
    assert!(e.contains("tokenizes to nothing"), "{e}");
    assert!(run(&mut ex, "SHOW PATCHES").rows.is_empty());
    assert!(ex.overlay().is_none());

    // The insert: the rewrite prompt now says Rome, the unrelated prompt what it said.
    let r = run(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome")"#,
    );
    assert_eq!(r.rows.len(), 1);
    assert_eq!(text(&r.rows[0][0]), "inserted");
    assert_eq!(text(&r.rows[0][3]), "Rome");
    let layer = match r.rows[0][4] {
        Cell::Int(l) => l,
        ref c => panic!("{c:?}"),
    };
    assert_eq!(layer, 30 / 3, "SmolLM2's default layer");
    let edited = infer(&mut ex, REWRITE);
    assert_eq!(edited[0].0.trim(), "Rome", "{edited:?}");
    assert_eq!(infer(&mut ex, UNRELATED)[0].0, base_unrelated[0].0);
    assert!(ex.overlay().is_some());
    assert!(
        ex.model().unwrap().overlay().is_some(),
        "the server's model carries the edits"
    );

    // The unnamed session patch cannot be saved until it is named; BEGIN keeps its edits.
    let e = fails(&mut ex, "SAVE PATCH");
    assert!(e.contains("BEGIN PATCH"), "{e}");
    let patch = at("capitals.vlp");
    run(&mut ex, &format!("BEGIN PATCH \"{patch}\""));
    let saved = run(&mut ex, "SAVE PATCH");
    assert_eq!(text(&saved.rows[0][1]), "saved");
    assert_eq!(infer(&mut ex, REWRITE), edited);

    // A fresh executor applying the file computes exactly the same logits; REMOVE restores the
    // base ones exactly.
    let mut fresh = open(&model);
    run(&mut fresh, &format!("APPLY PATCH \"{patch}\""));
    assert_eq!(infer(&mut fresh, REWRITE), edited);
    let shown = run(&mut fresh, "SHOW PATCHES");
    assert_eq!(text(&shown.rows[0][1]), "applied");
    assert_eq!(shown.rows[0][2], Cell::Int(1));
    let e = fails(&mut fresh, &format!("APPLY PATCH \"{patch}\""));
    assert!(e.contains("already applied"), "{e}");
    run(&mut fresh, &format!("REMOVE PATCH \"{patch}\""));
    assert_eq!(infer(&mut fresh, REWRITE), base_rewrite);
    assert!(fresh.overlay().is_none());
    // BEGIN PATCH of an existing file continues it: in effect at once, nothing solved.
    let begun = run(&mut fresh, &format!("BEGIN PATCH \"{patch}\""));
    assert_eq!(begun.rows[0][2], Cell::Int(1));
    assert_eq!(infer(&mut fresh, REWRITE), edited);
    run(&mut fresh, &format!("REMOVE PATCH \"{patch}\""));
    assert_eq!(infer(&mut fresh, REWRITE), base_rewrite);

    // DIFF against the base: the edge and what the base model says instead.
    let d = run(&mut fresh, &format!("DIFF \"{patch}\""));
    assert_eq!(text(&d.rows[0][3]), "Rome");
    assert_eq!(text(&d.rows[0][4]), base_rewrite[0].0.trim());

    // A patch made on another model (same shapes, another checksum).
    let mut other = Patch::load(Path::new(&patch)).unwrap();
    let real_sha = other.base.sha256.clone();
    other.base.sha256 = "0".repeat(64);
    let other_path = at("other-base.vlp");
    other.save(Path::new(&other_path)).unwrap();
    let e = fails(&mut fresh, &format!("APPLY PATCH \"{other_path}\""));
    assert!(e.contains(&"0".repeat(64)) && e.contains(&real_sha), "{e}");

    // Truncated and tampered copies of the real patch.
    let bytes = std::fs::read(&patch).unwrap();
    let truncated = at("truncated.vlp");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 1;
    let tampered = at("tampered.vlp");
    std::fs::write(&tampered, &flipped).unwrap();
    for bad in [&truncated, &tampered] {
        let e = fails(&mut fresh, &format!("APPLY PATCH \"{bad}\""));
        assert!(e.contains("truncated or tampered"), "{e}");
    }
    assert!(run(&mut fresh, "SHOW PATCHES").rows.is_empty());

    // COMPILE into an existing path: refused, the file untouched, nothing else written.
    let listing = files(dir.path());
    for target in ["ADAPTER", "MODEL", "VINDEX"] {
        let e = fails(
            &mut ex,
            &format!("COMPILE CURRENT INTO {target} \"{patch}\""),
        );
        assert!(e.contains("already exists"), "{e}");
    }
    assert_eq!(std::fs::read(&patch).unwrap(), bytes);
    assert_eq!(files(dir.path()), listing);
    // The adapter of the edits: a llama.cpp LoRA GGUF holding the edited layer.
    let adapter = at("capitals-lora.gguf");
    let c = run(
        &mut ex,
        &format!("COMPILE CURRENT INTO ADAPTER \"{adapter}\""),
    );
    assert!(
        c.rows
            .iter()
            .any(|r| text(&r[0]) == "layers"
                && text(&r[1]).split(',').any(|l| l == layer.to_string())),
        "{c:?}"
    );
    let lora = quarry_format::GgufFile::open(&adapter).unwrap();
    assert!(lora
        .tensor(&format!("blk.{layer}.ffn_down.weight.lora_a"))
        .is_ok());

    // The model compiled to GGUF says the new target by itself, and the unrelated answer.
    let compiled = at("capitals.gguf");
    run(
        &mut ex,
        &format!("COMPILE CURRENT INTO MODEL \"{compiled}\" FORMAT GGUF"),
    );
    let mut on_compiled = open(Path::new(&compiled));
    assert_eq!(infer(&mut on_compiled, REWRITE)[0].0.trim(), "Rome");
    assert_eq!(infer(&mut on_compiled, UNRELATED)[0].0, base_unrelated[0].0);

    // UPDATE of an edge of the open patch replaces its target.
    let r = run(
        &mut ex,
        r#"UPDATE EDGES SET target = "Berlin" WHERE entity = "France" AND relation = "capital""#,
    );
    assert_eq!(text(&r.rows[0][0]), "replaced");
    assert_eq!(infer(&mut ex, REWRITE)[0].0.trim(), "Berlin");

    // DELETE of the inserted edge drops it: the base logits exactly.
    let r = run(
        &mut ex,
        r#"DELETE FROM EDGES WHERE entity = "France" AND relation = "capital""#,
    );
    assert_eq!(text(&r.rows[0][0]), "dropped");
    assert_eq!(infer(&mut ex, REWRITE), base_rewrite);
    let e = fails(&mut ex, &format!("REMOVE PATCH \"{patch}\""));
    assert!(e.contains("unsaved"), "{e}");

    // DELETE of a fact the model knows natively suppresses the answer it gives.
    let japan = "The capital of Japan is the city of";
    let base_japan = infer(&mut ex, japan);
    let r = run(
        &mut ex,
        r#"DELETE FROM EDGES WHERE entity = "Japan" AND relation = "capital""#,
    );
    assert_eq!(text(&r.rows[0][0]), "suppressed");
    assert_eq!(text(&r.rows[0][3]), base_japan[0].0.trim());
    let suppressed = infer(&mut ex, japan);
    assert_ne!(suppressed[0].0, base_japan[0].0, "{suppressed:?}");

    // LAYERS a-b spreads an edit over the range: its value found at b, every layer written
    // (and saved, applied and compiled as such).
    let mut spread = open(&model);
    let r = run(
        &mut spread,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome") LAYERS 8-10"#,
    );
    assert_eq!(r.rows[0][4], Cell::Int(10));
    let spread_edited = infer(&mut spread, REWRITE);
    assert_eq!(spread_edited[0].0.trim(), "Rome", "{spread_edited:?}");
    assert_eq!(infer(&mut spread, UNRELATED)[0].0, base_unrelated[0].0);
    let spread_patch = at("spread.vlp");
    run(&mut spread, &format!("BEGIN PATCH \"{spread_patch}\""));
    let shown = run(&mut spread, "SAVE PATCH");
    assert_eq!(text(&shown.rows[0][3]), "8,9,10");
    let mut applied = open(&model);
    run(&mut applied, &format!("APPLY PATCH \"{spread_patch}\""));
    assert_eq!(infer(&mut applied, REWRITE), spread_edited);
    let adapter = at("spread-lora.gguf");
    run(
        &mut applied,
        &format!("COMPILE CURRENT INTO ADAPTER \"{adapter}\""),
    );
    let lora = quarry_format::GgufFile::open(&adapter).unwrap();
    for layer in 8..=10 {
        assert!(lora
            .tensor(&format!("blk.{layer}.ffn_down.weight.lora_a"))
            .is_ok());
    }
    // An edit made while that patch is applied is solved on top of it: both hold.
    let berlin = "The capital of Japan is the city of";
    run(
        &mut applied,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("Japan", "capital", "Berlin")"#,
    );
    assert_eq!(infer(&mut applied, berlin)[0].0.trim(), "Berlin");
    assert_eq!(infer(&mut applied, REWRITE)[0].0.trim(), "Rome");
    assert_eq!(infer(&mut applied, UNRELATED)[0].0, base_unrelated[0].0);

    assert_eq!(fingerprint(&model), before, "the base file changed");
}

/// A server shares one executor's editing session among threads.
#[test]
fn executors_can_be_shared_between_threads() {
    fn shared<T: Send + Sync + Clone>() {}
    shared::<Executor>();
}

#[test]
fn bad_statements_fail_alone_and_change_nothing() {
    let e = Executor::new()
        .run_script(
            r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome")"#,
        )
        .unwrap_err();
    assert!(matches!(e, QueryError::NoVindex { .. }), "{e}");

    let model = model_path(TestModel::SmolLm2);
    let before = fingerprint(&model);
    let dir = tempfile::tempdir().unwrap();
    let mut ex = open(&model);

    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "captial", "Rome")"#,
    );
    assert!(
        e.contains("\"captial\" is not in the catalogue")
            && e.contains("capital, category, continent")
            && e.contains("TEMPLATE"),
        "{e}"
    );
    // A template must place the entity: refused when parsing, before anything runs.
    let e = ex
        .run_script(r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome") TEMPLATE "The capital is""#)
        .unwrap_err();
    assert!(matches!(e, QueryError::Parse(_)), "{e}");
    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome") LAYERS 28-30"#,
    );
    assert!(
        e.contains("layer 30 is outside the model's 30 layers"),
        "{e}"
    );
    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome") AT LAYER 30"#,
    );
    assert!(
        e.contains("layer 30 is outside the model's 30 layers"),
        "{e}"
    );
    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome") TEMPLATE "{entity} is" MODE COMPOSE"#,
    );
    assert!(
        e.contains("MODE COMPOSE") && e.contains("TEMPLATE does not apply"),
        "{e}"
    );
    let e = fails(&mut ex, "SAVE PATCH");
    assert!(e.contains("no patch is open"), "{e}");
    let missing = dir.path().join("missing.vlp").display().to_string();
    let e = fails(&mut ex, &format!("APPLY PATCH \"{missing}\""));
    assert!(e.contains("missing.vlp"), "{e}");
    let e = fails(&mut ex, &format!("REMOVE PATCH \"{missing}\""));
    assert!(e.contains("is not applied"), "{e}");
    let out = dir.path().join("out.gguf").display().to_string();
    let e = fails(&mut ex, &format!("COMPILE CURRENT INTO MODEL \"{out}\""));
    assert!(e.contains("no edits to compile"), "{e}");

    assert!(run(&mut ex, "SHOW PATCHES").rows.is_empty());
    assert!(ex.overlay().is_none());
    assert!(files(dir.path()).is_empty());
    assert_eq!(fingerprint(&model), before);
}

#[test]
fn compose_runs_for_comparison_and_is_never_compiled() {
    let model = model_path(TestModel::SmolLm2);
    let dir = tempfile::tempdir().unwrap();
    let mut ex = open(&model);
    let r = run(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rome") MODE COMPOSE"#,
    );
    assert_eq!(text(&r.rows[0][0]), "composed");
    // LARQL's default layer without a knowledge band: n_layers − 2.
    assert!(matches!(r.rows[0][4], Cell::Int(28)), "{:?}", r.rows[0]);
    let overlay = ex.overlay().expect("the composed fact is in the overlay");
    assert!(overlay.has_neurons() && overlay.neurons(28).is_some());
    let e = fails(
        &mut ex,
        r#"INSERT INTO EDGES (entity, relation, target) VALUES ("Spain", "capital", "Rome") AT LAYER 10 MODE COMPOSE"#,
    );
    assert!(e.contains("at layer 28"), "{e}");
    let adapter = dir.path().join("c-lora.gguf");
    let e = fails(
        &mut ex,
        &format!("COMPILE CURRENT INTO ADAPTER \"{}\"", adapter.display()),
    );
    assert!(e.contains("COMPOSE"), "{e}");
    assert!(files(dir.path()).is_empty(), "nothing written");
}
