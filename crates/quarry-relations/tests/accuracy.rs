//! The per-relation accuracy SHOW RELATIONS lists, on a real model.

use std::sync::Arc;
use std::time::Instant;

use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_relations::accuracy::{ask, measure, PAIRS_ASKED};
use quarry_relations::catalogue;
use quarry_tokenize::Tokenizer;

/// Every relation with pairs is measured on its first pairs; SmolLM2 answers most capitals
/// and no sport a player plays (0 of 30 when measured), and an answered example really is
/// what the model says.
#[test]
fn accuracy_tells_relations_the_model_answers_from_the_ones_it_does_not() {
    let file = Arc::new(GgufFile::open(model_path(TestModel::SmolLm2)).unwrap());
    let tok = Tokenizer::from_gguf(&file).unwrap();
    let model = Model::load(file).unwrap();
    let start = Instant::now();
    let measured = measure(&model, &tok).unwrap();
    eprintln!(
        "measured {} relations in {:?}",
        measured.len(),
        start.elapsed()
    );
    let with_pairs: Vec<&str> = catalogue::all()
        .filter(|r| !r.pairs.is_empty())
        .map(|r| r.name)
        .collect();
    assert_eq!(
        measured
            .iter()
            .map(|m| m.relation.as_str())
            .collect::<Vec<_>>(),
        with_pairs
    );
    let of = |name: &str| measured.iter().find(|m| m.relation == name).unwrap();
    for m in &measured {
        eprintln!(
            "{:>18} {:2}/{:2} {:?}",
            m.relation, m.answered, m.asked, m.examples
        );
        assert!(m.asked <= PAIRS_ASKED && m.answered <= m.asked);
        assert!(m.examples.len() <= m.answered);
    }
    assert!(of("capital").accuracy() >= 0.5, "{:?}", of("capital"));
    assert!(of("sport").accuracy() <= 0.1, "{:?}", of("sport"));
    let capital = catalogue::find("capital").unwrap();
    let (subject, answer) = &of("capital").examples[0];
    let again = ask(
        &model,
        &tok,
        &capital.templates[capital.describe],
        &[(subject.clone(), answer.clone())],
    )
    .unwrap();
    assert_eq!(&again[0].0.text, answer);
    assert!(again[0].1);
}
