//! The executor on real vindexes: Gemma 3 270M (inference level, extracted once per run of
//! this test binary, ~2 min) for the acceptance checks of INFER and TRACE, SmolLM2 for the rest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_query::{Cell, Executor, QueryError, ResultSet};
use quarry_tokenize::Tokenizer;
use quarry_vindex::{extract, Dtype, ExtractOptions, Level};

fn vindex(model: TestModel) -> &'static Path {
    static GEMMA: OnceLock<PathBuf> = OnceLock::new();
    static SMOL: OnceLock<PathBuf> = OnceLock::new();
    let cell = match model {
        TestModel::Gemma3 => &GEMMA,
        TestModel::SmolLm2 => &SMOL,
    };
    cell.get_or_init(|| {
        let dir = quarry_fixtures::fresh_dir(&format!("quarry-acceptance-{model:?}"));
        let out = dir.join("model.vindex");
        let options = ExtractOptions {
            level: Level::Inference,
            dtype: Dtype::F16,
            top_k: 10,
        };
        extract(&model_path(model), &out, &options, &mut |_| {}).unwrap();
        out
    })
}

fn query(model: TestModel, script: &str) -> Vec<ResultSet> {
    Executor::with_vindex(vindex(model))
        .unwrap()
        .run_script(script)
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

fn float(c: &Cell) -> f64 {
    c.as_f64().unwrap_or_else(|| panic!("not a number: {c:?}"))
}

fn int(c: &Cell) -> i64 {
    match c {
        Cell::Int(i) => *i,
        other => panic!("not an int: {other:?}"),
    }
}

/// The last position's logits and final normed hidden state of a plain forward pass.
fn plain_forward(model: TestModel, prompt: &str) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = Model::load(Arc::new(GgufFile::open(model_path(model)).unwrap())).unwrap();
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let ids = tok.encode(prompt, true, true);
    let n = ids.len();
    let hidden = m
        .forward_hidden(&ids, &mut m.new_cache(n), n - 1..n)
        .unwrap();
    let logits = m.logits(&hidden).unwrap();
    let mut head_row = vec![0.0f32; hidden.len()];
    let best = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap();
    m.output_head().dequantize_row(best, &mut head_row);
    (logits, hidden, head_row)
}

#[test]
fn infer_equals_the_plain_forward_pass_on_gemma() {
    let prompt = "The capital of France is";
    let r = &query(TestModel::Gemma3, &format!("INFER \"{prompt}\" TOP 5"))[0];
    let (logits, _, _) = plain_forward(TestModel::Gemma3, prompt);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(r.rows.len(), 5);
    let (id, p) = (
        r.column("token_id").unwrap(),
        r.column("probability").unwrap(),
    );
    for (row, &expected) in r.rows.iter().zip(&order) {
        assert_eq!(int(&row[id]) as usize, expected);
        let want = (logits[expected] as f64 - max).exp() / sum;
        assert!((float(&row[p]) - want).abs() < 1e-4, "{row:?} vs {want}");
    }
}

#[test]
fn the_model_is_loaded_once_per_vindex_and_shared_by_clones() {
    let dir = vindex(TestModel::SmolLm2);
    let mut e = Executor::with_vindex(dir).unwrap();
    let file = e.vindex().unwrap().model_file().unwrap();
    // The vindex and this test hold the file; no model is loaded before it is needed.
    assert_eq!(Arc::strong_count(&file), 2);
    e.run_script(r#"INFER "The capital of France is" TOP 1"#)
        .unwrap();
    // The model INFER loaded stays, holding the file.
    assert_eq!(Arc::strong_count(&file), 3);
    let mut clone = e.clone();
    clone
        .run_script(r#"INFER "Water boils at" TOP 1; TRACE "Water boils at""#)
        .unwrap();
    assert_eq!(
        Arc::strong_count(&file),
        3,
        "the clone runs on the same model"
    );
    // USE opens the vindex afresh (a model of its own later); the clone keeps the old one.
    e.run_script(&format!("USE \"{}\"", dir.display())).unwrap();
    assert_eq!(Arc::strong_count(&file), 3);
    drop(clone);
    assert_eq!(Arc::strong_count(&file), 1);
}

#[test]
fn trace_contributions_add_up_to_the_final_logit_on_gemma() {
    let prompt = "The capital of France is";
    let (_, hidden, head_row) = plain_forward(TestModel::Gemma3, prompt);
    let exact: f64 = hidden
        .iter()
        .zip(&head_row)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let results = query(
        TestModel::Gemma3,
        &format!("TRACE \"{prompt}\"; TRACE \"{prompt}\" DECOMPOSE"),
    );
    let plain = &results[0];
    let cumulative = plain.column("cumulative").unwrap();
    let last = float(&plain.rows.last().unwrap()[cumulative]);
    assert!((last - exact).abs() < 1e-3, "sum {last} vs logit {exact}");
    assert_eq!(plain.rows.len(), 18);

    let decomposed = &results[1];
    let c = decomposed.column("contribution").unwrap();
    let total: f64 = decomposed.rows.iter().map(|r| float(&r[c])).sum();
    assert!(
        (total - exact).abs() < 1e-3,
        "decomposed sum {total} vs logit {exact}"
    );
}

#[test]
fn trace_for_a_named_token_and_its_errors() {
    let r = &query(
        TestModel::SmolLm2,
        "TRACE \"The capital of France is\" FOR \"Paris\" LAYERS 20-29",
    )[0];
    assert_eq!(r.rows.len(), 10);
    assert!(r.notes[0].contains("Paris"), "{}", r.notes[0]);
    let err = Executor::with_vindex(vindex(TestModel::SmolLm2))
        .unwrap()
        .run_script("TRACE \"x\" FOR \"antidisestablishmentarianism\"")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a single token"), "{err}");
    // An empty target is refused rather than traced as whatever " " encodes to.
    let err = Executor::with_vindex(vindex(TestModel::SmolLm2))
        .unwrap()
        .run_script("TRACE \"The capital of France is\" FOR \"\"")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("FOR \"\" names no token"), "{err}");
}

#[test]
fn select_projects_filters_orders_and_limits() {
    let r = &query(
        TestModel::SmolLm2,
        "SELECT layer, feature, top_logit FROM FEATURES \
         WHERE (layer BETWEEN 3 AND 5 OR layer IN (20)) AND NOT top_logit < 0.5 \
         ORDER BY top_logit DESC, feature LIMIT 7",
    )[0];
    let names: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["layer", "feature", "top_logit"]);
    assert_eq!(r.rows.len(), 7);
    for pair in r.rows.windows(2) {
        assert!(float(&pair[0][2]) >= float(&pair[1][2]));
    }
    for row in &r.rows {
        let layer = int(&row[0]);
        assert!((3..=5).contains(&layer) || layer == 20);
        assert!(float(&row[2]) >= 0.5);
    }

    let edges = &query(
        TestModel::SmolLm2,
        "SELECT * FROM EDGES WHERE layer = 2 AND feature = 7 AND direction = 'up'",
    )[0];
    assert_eq!(edges.rows.len(), 10);
    let like = &query(
        TestModel::SmolLm2,
        "SELECT id, token FROM ENTITIES WHERE token LIKE ' Par%' LIMIT 3",
    )[0];
    assert!(!like.rows.is_empty());
    for row in &like.rows {
        assert!(row[1].as_str().unwrap().starts_with(" Par"));
    }
}

#[test]
fn bad_queries_name_the_problem() {
    let mut e = Executor::with_vindex(vindex(TestModel::SmolLm2)).unwrap();
    let err = e
        .run_script("SELECT nope FROM FEATURES")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("no column \"nope\"") && err.contains("top_token"),
        "{err}"
    );
    let err = e
        .run_script("SELECT * FROM FEATURES WHERE layer = 'x'")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("column layer is int"), "{err}");
    let err = e.run_script("SHOW FEATURES 999").err().unwrap().to_string();
    assert!(err.contains("layers 0-29"), "{err}");
    let err = e.run_script("WALK 42").err().unwrap();
    assert!(matches!(err, QueryError::Parse(_)), "{err}");
    assert!(err.to_string().starts_with("line 1, column 6"), "{err}");
    let err = Executor::new()
        .run_script("STATS")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("USE"), "{err}");
}

#[test]
fn describe_walk_and_explain_return_ranked_rows() {
    let results = query(
        TestModel::SmolLm2,
        "DESCRIBE \"France\" VIA FEATURES; DESCRIBE \"France\" BRIEF RAW; \
         DESCRIBE \"France\" AT LAYER 3 VERBOSE VIA FEATURES; \
         WALK \"The capital of France\" TOP 3 LAYERS 0-1; EXPLAIN INFER \"The capital of France is\" TOP 2 LAYERS 5-6; \
         STATS; SHOW LAYERS",
    );
    assert_eq!(results[0].rows.len(), 20);
    assert_eq!(results[1].rows.len(), 10);
    for r in &results[..3] {
        let s = r.column("score").unwrap();
        for pair in r.rows.windows(2) {
            assert!(float(&pair[0][s]) >= float(&pair[1][s]));
        }
        assert!(r.rows.iter().all(|row| float(&row[s]) > 0.0));
    }
    assert!(results[2].rows.iter().all(|row| int(&row[5]) == 3));
    assert_eq!(results[3].rows.len(), 6);
    assert_eq!(results[4].rows.len(), 4);
    assert_eq!(results[6].rows.len(), 30);
}

#[test]
fn relations_cluster_word_edges_of_the_knowledge_band() {
    let v = quarry_vindex::Vindex::open(vindex(TestModel::Gemma3)).unwrap();
    let rel = v.relations();
    let knowledge = v.index().bands.knowledge;
    assert_eq!(rel.layers, knowledge);
    assert!(rel.relations.len() > 1, "{} relations", rel.relations.len());
    let tok = v.tokenizer();
    let word = |id: u32| tok.decode(&[id]);
    for e in &rel.edges {
        assert!((knowledge[0]..=knowledge[1]).contains(&e.layer));
        assert!(quarry_vindex::relations::is_word(&word(e.input)));
        assert!(quarry_vindex::relations::is_word(&word(e.output)));
        assert_ne!(word(e.input).to_lowercase(), word(e.output).to_lowercase());
        // The edge's output is among the feature's stored top writes.
        let (top, _) = v.writes(e.layer, e.feature);
        assert!(top.iter().any(|r| r.token == e.output));
    }
    let [shown, layer] = &query(
        TestModel::Gemma3,
        &format!(
            "SHOW RELATIONS VIA FEATURES; SHOW RELATIONS AT LAYER {} WITH EXAMPLES",
            knowledge[0]
        ),
    )[..] else {
        panic!("two results")
    };
    assert_eq!(shown.rows.len(), rel.relations.len());
    let total: i64 = shown.rows.iter().map(|r| int(&r[3])).sum();
    assert_eq!(total as usize, rel.edges.len());
    for row in &shown.rows {
        let i = int(&row[0]) as usize;
        let members = rel.edges.iter().filter(|e| e.relation == i).count();
        assert_eq!(int(&row[3]) as usize, members, "relation {i}");
        // A cluster is named by the catalogue relation its edges answer, or by its most
        // central edge.
        let (label, answers) = (row[1].as_str().unwrap(), row[2].as_str().unwrap());
        if answers.is_empty() {
            assert_eq!(label, rel.relations[i].label);
        } else {
            assert!(answers.starts_with(&format!("{label}: ")), "{answers}");
            assert!(
                quarry_relations::catalogue::find(label).is_some(),
                "{label}"
            );
        }
    }
    for pair in shown.rows.windows(2) {
        assert!(int(&pair[0][3]) >= int(&pair[1][3]), "largest first");
    }
    let at_layer = rel.edges.iter().filter(|e| e.layer == knowledge[0]).count();
    let total: i64 = layer.rows.iter().map(|r| int(&r[3])).sum();
    assert_eq!(total as usize, at_layer);
    assert!(layer.column("examples").is_some());
    let [entities, limited] = &query(
        TestModel::Gemma3,
        &format!(
            "SHOW ENTITIES; SHOW ENTITIES AT LAYER {} LIMIT 3",
            knowledge[0]
        ),
    )[..] else {
        panic!("two results")
    };
    let total: i64 = entities.rows.iter().map(|r| int(&r[2])).sum();
    assert_eq!(total as usize, rel.edges.len());
    assert_eq!(limited.rows.len(), 3);
    let err = Executor::with_vindex(vindex(TestModel::Gemma3))
        .unwrap()
        .run_script("SHOW ENTITIES AT LAYER 0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("feature edges were read from layers"), "{err}");
}

/// SHOW RELATIONS lists the catalogue relations with the accuracy measured at extraction,
/// best first; the relations DESCRIBE finds France's capital and language under are among
/// the best.
#[test]
fn show_relations_lists_catalogue_relations_with_their_accuracy() {
    let [plain, examples] = &query(
        TestModel::Gemma3,
        "SHOW RELATIONS; SHOW RELATIONS WITH EXAMPLES",
    )[..] else {
        panic!("two results")
    };
    let col = |name: &str| plain.column(name).unwrap();
    let (acc, answered, asked) = (col("accuracy"), col("answered"), col("asked"));
    assert!(plain.rows.len() >= 8, "{}", plain.render_table());
    for row in &plain.rows {
        let name = row[col("relation")].as_str().unwrap();
        assert!(quarry_relations::catalogue::find(name).is_some(), "{name}");
        assert!(int(&row[answered]) > 0, "only relations the model answers");
        let expected = int(&row[answered]) as f64 / int(&row[asked]) as f64;
        assert!((float(&row[acc]) - expected).abs() < 1e-9);
    }
    assert!(plain
        .rows
        .windows(2)
        .all(|p| float(&p[0][acc]) >= float(&p[1][acc])));
    for relation in ["capital", "language"] {
        let row = plain
            .rows
            .iter()
            .find(|r| r[0].as_str() == Some(relation))
            .unwrap_or_else(|| panic!("{relation}: {}", plain.render_table()));
        assert!(float(&row[acc]) >= 0.5, "{}", plain.render_table());
    }
    assert!(plain.column("examples").is_none());
    let ex = examples.column("examples").unwrap();
    assert!(examples.rows[0][ex].as_str().unwrap().contains(" → "));
    assert!(plain.notes.iter().any(|n| n.contains("VIA FEATURES")));
}

/// On a model file the first SHOW RELATIONS measures the accuracy and the session keeps it;
/// it is what extraction stored in the vindex of the same model.
#[test]
fn a_model_file_measures_relation_accuracy_once_per_session() {
    let model = model_path(TestModel::SmolLm2);
    let results = Executor::new()
        .run_script(&format!(
            "USE {:?}; SHOW RELATIONS; SHOW RELATIONS; \
             SELECT target FROM EDGES WHERE entity = \"France\" AND relation = \"capital\"",
            model.to_str().unwrap()
        ))
        .unwrap();
    let [_, first, second, capital] = &results[..] else {
        panic!("four results")
    };
    let measured_now = |r: &ResultSet| r.notes.iter().any(|n| n.contains("measured now"));
    assert!(measured_now(first), "{:?}", first.notes);
    assert!(!measured_now(second), "{:?}", second.notes);
    assert_eq!(first.rows, second.rows);
    let [stored] = &query(TestModel::SmolLm2, "SHOW RELATIONS")[..] else {
        panic!("one result")
    };
    assert_eq!(stored.rows, first.rows);
    assert_eq!(capital.rows, [[Cell::Text("Paris".into())]]);
}

/// `SELECT … FROM EDGES WHERE entity = …` reads the edges DESCRIBE lists, and the rest of
/// the condition filters them.
#[test]
fn select_from_edges_of_an_entity_reads_the_describe_edges() {
    let [describe, all, capital, both] = &query(
        TestModel::Gemma3,
        "DESCRIBE \"France\" VERBOSE; SELECT * FROM EDGES WHERE entity = \"France\"; \
         SELECT target, score FROM EDGES WHERE relation = \"capital\" AND entity = \"France\"; \
         SELECT entity, relation, target FROM EDGES WHERE entity IN (\"France\", \"Japan\") \
         AND relation = \"capital\" ORDER BY entity",
    )[..] else {
        panic!("four results")
    };
    let triples = |r: &ResultSet| -> Vec<(String, String, String)> {
        let at = |n: &str| r.column(n).unwrap();
        r.rows
            .iter()
            .map(|row| {
                (
                    row[at("relation")].as_str().unwrap().to_string(),
                    row[at("target")].as_str().unwrap().to_string(),
                    format!("{:.6}", float(&row[at("score")])),
                )
            })
            .collect()
    };
    assert_eq!(triples(all), triples(describe));
    assert_eq!(capital.rows.len(), 1, "{}", capital.render_table());
    assert_eq!(capital.rows[0][0].as_str(), Some("Paris"));
    let both: Vec<(&str, &str)> = both
        .rows
        .iter()
        .map(|r| (r[0].as_str().unwrap(), r[2].as_str().unwrap()))
        .collect();
    assert_eq!(both, [("France", "Paris"), ("Japan", "Tokyo")]);
    let mut e = Executor::with_vindex(vindex(TestModel::Gemma3)).unwrap();
    for (script, needle) in [
        (
            "SELECT * FROM EDGES WHERE entity = \"France\" OR layer = 2",
            "entity IN",
        ),
        (
            "SELECT * FROM EDGES NEAREST TO \"France\" AT LAYER 3 WHERE entity = \"France\"",
            "NEAREST TO",
        ),
    ] {
        let err = e.run_script(script).unwrap_err().to_string();
        assert!(err.contains(needle), "{script}: {err}");
    }
}

/// LARQL's forms: SHOW FEATURES with WHERE and LIMIT, DESCRIBE … RELATIONS ONLY.
#[test]
fn show_features_filters_and_describe_keeps_only_relation_edges() {
    let v = quarry_vindex::Vindex::open(vindex(TestModel::Gemma3)).unwrap();
    let layer = v.index().bands.knowledge[0];
    let [all, capital, limited, only] = &query(
        TestModel::Gemma3,
        &format!(
            "SHOW FEATURES {layer}; SHOW FEATURES {layer} WHERE relation = \"capital\"; \
             SHOW FEATURES {layer} WHERE top_logit > 0 LIMIT 5; \
             DESCRIBE \"Japan\" RELATIONS ONLY VIA FEATURES"
        ),
    )[..] else {
        panic!("four results")
    };
    let rel = all.column("relation").unwrap();
    let expected = all
        .rows
        .iter()
        .filter(|r| r[rel].as_str() == Some("capital"))
        .count();
    assert_eq!(capital.rows.len(), expected);
    assert!(capital
        .rows
        .iter()
        .all(|r| r[rel].as_str() == Some("capital")));
    assert_eq!(limited.rows.len(), 5);
    let rel = only.column("relation").unwrap();
    assert!(
        only.rows.iter().all(|r| r[rel] != Cell::Null),
        "{}",
        only.render_table()
    );
}

#[test]
fn describe_asks_the_model_and_says_what_it_answers() {
    let [france, japan, unknown, brief] = &query(
        TestModel::Gemma3,
        "DESCRIBE \"France\"; DESCRIBE \"Japan\"; DESCRIBE \"Zorblax Quintavenu\"; \
         DESCRIBE \"France\" BRIEF",
    )[..] else {
        panic!("four results")
    };
    let edges = |r: &ResultSet| -> Vec<(String, String, f64)> {
        let (rel, target, score) = (
            r.column("relation").unwrap(),
            r.column("target").unwrap(),
            r.column("score").unwrap(),
        );
        r.rows
            .iter()
            .map(|row| {
                let text = |i: usize| row[i].as_str().unwrap().to_string();
                (text(rel), text(target), float(&row[score]))
            })
            .collect()
    };
    let (france, japan, unknown) = (edges(france), edges(japan), edges(unknown));
    // Known facts come back under their relation, from the model's own answers.
    for (edges, relation, target) in [
        (&france, "capital", "Paris"),
        (&france, "language", "French"),
        (&japan, "capital", "Tokyo"),
        (&japan, "language", "Japanese"),
    ] {
        assert!(
            edges.iter().any(|(r, t, _)| r == relation && t == target),
            "{relation} {target}: {edges:?}"
        );
    }
    for edges in [&france, &japan, &unknown] {
        assert!(edges.windows(2).all(|p| p[0].2 >= p[1].2), "{edges:?}");
        assert!(edges.iter().all(|e| e.2 >= 0.05), "{edges:?}");
    }
    // A name the model cannot know gets fewer edges, all weaker than the known entity's best,
    // and less than half its total score (measured: 6 edges summing to 0.74 against France's
    // 12 summing to 4.55).
    let best = |e: &[(String, String, f64)]| e.iter().map(|e| e.2).fold(0.0, f64::max);
    let mass = |e: &[(String, String, f64)]| e.iter().map(|e| e.2).sum::<f64>();
    assert!(unknown.len() < france.len(), "{unknown:?}");
    assert!(mass(&unknown) < mass(&france) / 2.0, "{unknown:?}");
    assert!(best(&unknown) < best(&france), "{unknown:?}");
    assert!(brief.rows.len() <= 10);
    assert!(brief.notes[0].starts_with("answers"), "{:?}", brief.notes);
}

#[test]
fn describe_with_the_model_contrasts_the_entity_with_its_neighbours() {
    let [ours, raw] = &query(
        TestModel::Gemma3,
        "DESCRIBE \"Japan\" VIA FEATURES; DESCRIBE \"Japan\" RAW",
    )[..] else {
        panic!("two results")
    };
    assert!(ours.notes[0].contains("in-context"), "{:?}", ours.notes);
    assert!(raw.notes[0].contains("RAW"), "{:?}", raw.notes);
    let tokens: Vec<&str> = ours.rows.iter().map(|r| r[1].as_str().unwrap()).collect();
    assert_eq!(tokens.len(), 20);
    assert!(tokens.contains(&" Tokyo"), "{tokens:?}");
    let knowledge = quarry_vindex::Vindex::open(vindex(TestModel::Gemma3))
        .unwrap()
        .index()
        .bands
        .knowledge;
    for row in &ours.rows {
        assert!(quarry_vindex::relations::is_word(row[1].as_str().unwrap()));
        let layer = int(&row[5]) as usize;
        assert!((knowledge[0]..=knowledge[1]).contains(&layer));
    }
    for pair in ours.rows.windows(2) {
        assert!(float(&pair[0][3]) >= float(&pair[1][3]));
    }
}
