//! SHOW RELATIONS and SHOW ENTITIES.
//!
//! Two kinds of relation: the catalogue's, which the model is asked in words
//! (quarry_relations) and which DESCRIBE lists edges of, each with the accuracy the model
//! reached on the relation's known pairs; and the clusters of feature edges found at
//! extraction (quarry_vindex::relations), which are what the FFN weights group together and
//! mostly not relations a person would name. They are listed separately (`SHOW RELATIONS`,
//! `SHOW RELATIONS VIA FEATURES`). A feature edge whose output word is an object of a
//! catalogue relation's pairs is counted as answering that relation, which is how a cluster
//! gets a readable label when it has one.

use std::collections::HashMap;

use quarry_relations::accuracy::RelationAccuracy;
use quarry_relations::catalogue;
use quarry_vindex::relations::FeatureEdge;
use quarry_vindex::Vindex;

use crate::executor::quoted;
use crate::result::{Cell, ColumnType, ResultSet};

/// A cluster is labelled with a catalogue relation when at least this share of its edges
/// write one of the relation's objects.
const LABEL_SHARE: f64 = 0.2;

/// The catalogue relations the model answers, best first: accuracy on the relation's pairs,
/// and with `examples` the pairs it answered.
pub fn catalogue_relations(measured: &[RelationAccuracy], examples: bool) -> ResultSet {
    let mut columns = vec![
        ("relation", ColumnType::Text),
        ("label", ColumnType::Text),
        ("answer", ColumnType::Text),
        ("accuracy", ColumnType::Float),
        ("answered", ColumnType::Int),
        ("asked", ColumnType::Int),
    ];
    if examples {
        columns.push(("examples", ColumnType::Text));
    }
    let mut r = ResultSet::new(&columns);
    let mut answered: Vec<&RelationAccuracy> = measured.iter().filter(|m| m.answered > 0).collect();
    answered.sort_by(|a, b| b.accuracy().total_cmp(&a.accuracy()));
    for m in &answered {
        let Some(relation) = catalogue::find(&m.relation) else {
            continue;
        };
        let mut row = vec![
            Cell::Text(relation.name.into()),
            Cell::Text(relation.label.into()),
            Cell::Text(relation.answer.into()),
            Cell::Float(m.accuracy()),
            Cell::Int(m.answered as i64),
            Cell::Int(m.asked as i64),
        ];
        if examples {
            let shown: Vec<String> = m
                .examples
                .iter()
                .map(|(subject, answer)| format!("{subject} → {answer}"))
                .collect();
            row.push(Cell::Text(shown.join(", ")));
        }
        r.push(row);
    }
    let never: Vec<&str> = measured
        .iter()
        .filter(|m| m.answered == 0)
        .map(|m| m.relation.as_str())
        .collect();
    let unmeasured: Vec<&str> = catalogue::all()
        .filter(|c| !measured.iter().any(|m| m.relation == c.name))
        .map(|c| c.name)
        .collect();
    r.notes.push(
        "accuracy: the relation's DESCRIBE template asked about its first known pairs (from \
         LRE), greedy answers compared with the known objects"
            .into(),
    );
    if !never.is_empty() {
        r.notes.push(format!(
            "answered for none of their pairs: {}",
            never.join(", ")
        ));
    }
    if !unmeasured.is_empty() {
        r.notes.push(format!(
            "no known pairs to measure (DESCRIBE still asks them): {}",
            unmeasured.join(", ")
        ));
    }
    r.notes.push(
        "the clusters of feature edges found at extraction: SHOW RELATIONS VIA FEATURES".into(),
    );
    r
}

/// The clusters of feature edges (of `layer`, if given), largest first, each with the
/// catalogue relation most of its edges answer, if one does.
pub fn feature_clusters(
    v: &Vindex,
    layer: Option<u32>,
    examples: bool,
) -> Result<ResultSet, String> {
    let rel = v.relations();
    let layer = check_layer(v, layer)?;
    let mut members: Vec<Vec<&FeatureEdge>> = vec![Vec::new(); rel.relations.len()];
    for e in rel
        .edges
        .iter()
        .filter(|e| layer.is_none_or(|l| e.layer == l))
    {
        members[e.relation].push(e);
    }
    let mut columns = vec![
        ("relation", ColumnType::Int),
        ("label", ColumnType::Text),
        ("answers", ColumnType::Text),
        ("features", ColumnType::Int),
    ];
    if examples {
        columns.push(("examples", ColumnType::Text));
    }
    let mut r = ResultSet::new(&columns);
    let mut labelled = 0;
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| !members[i].is_empty())
        .collect();
    order.sort_by_key(|&i| std::cmp::Reverse(members[i].len()));
    for i in order {
        let edges = &members[i];
        let answers = majority_answer(v, edges);
        labelled += usize::from(answers.is_some());
        let mut row = vec![
            Cell::Int(i as i64),
            Cell::Text(match answers {
                Some((name, _)) => name.to_string(),
                None => rel.relations[i].label.clone(),
            }),
            Cell::Text(answers.map_or(String::new(), |(name, n)| {
                format!("{name}: {n} of {} edges", edges.len())
            })),
            Cell::Int(edges.len() as i64),
        ];
        if examples {
            row.push(Cell::Text(rel.relations[i].examples.join(", ")));
        }
        r.push(row);
    }
    r.notes.push(format!(
        "features of layers {}-{} read as input word → output word, clustered by embedding \
         offset; {labelled} of {} clusters have at least {:.0}% of their edges writing objects \
         of one catalogue relation and are labelled with it, the rest with their most central \
         edge",
        rel.layers[0],
        rel.layers[1],
        r.rows.len(),
        LABEL_SHARE * 100.0
    ));
    Ok(r)
}

/// The catalogue relation most of `edges` answer (see [`catalogue::answered_by`]) and how
/// many do, when that is at least [`LABEL_SHARE`] of them.
fn majority_answer(v: &Vindex, edges: &[&FeatureEdge]) -> Option<(&'static str, usize)> {
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for e in edges {
        if let Some(r) = catalogue::answered_by(&v.tokenizer().decode(&[e.output])) {
            *counts.entry(r.name).or_default() += 1;
        }
    }
    let (name, n) = counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))?;
    (n as f64 >= LABEL_SHARE * edges.len() as f64).then_some((name, n))
}

/// The input words of the feature edges (of `layer`, if given), by how many features read
/// them, at most `limit`.
pub fn entities(v: &Vindex, layer: Option<u32>, limit: Option<u64>) -> Result<ResultSet, String> {
    let rel = v.relations();
    let layer = check_layer(v, layer)?;
    let mut by_entity: HashMap<u32, Vec<&FeatureEdge>> = HashMap::new();
    for e in rel
        .edges
        .iter()
        .filter(|e| layer.is_none_or(|l| e.layer == l))
    {
        by_entity.entry(e.input).or_default().push(e);
    }
    let mut entities: Vec<(u32, Vec<&FeatureEdge>)> = by_entity.into_iter().collect();
    entities.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let mut r = ResultSet::new(&[
        ("entity", ColumnType::Text),
        ("token_id", ColumnType::Int),
        ("features", ColumnType::Int),
        ("relations", ColumnType::Int),
        ("outputs", ColumnType::Text),
    ]);
    for (id, edges) in entities {
        let mut relations: Vec<usize> = edges.iter().map(|e| e.relation).collect();
        relations.sort_unstable();
        relations.dedup();
        let mut outputs: Vec<String> = Vec::new();
        for e in &edges {
            let o = quoted(v, e.output);
            if !outputs.contains(&o) {
                outputs.push(o);
            }
        }
        r.push(vec![
            Cell::Text(v.tokenizer().decode(&[id]).trim().to_string()),
            Cell::Int(id as i64),
            Cell::Int(edges.len() as i64),
            Cell::Int(relations.len() as i64),
            Cell::Text(outputs.into_iter().take(5).collect::<Vec<_>>().join(" ")),
        ]);
    }
    crate::select::limit(&mut r, limit);
    Ok(r)
}

/// `layer` as an index, when it is one of the layers the feature edges were read from.
fn check_layer(v: &Vindex, layer: Option<u32>) -> Result<Option<usize>, String> {
    let [first, last] = v.relations().layers;
    match layer {
        Some(l) if !(first..=last).contains(&(l as usize)) => Err(format!(
            "AT LAYER {l}: feature edges were read from layers {first}-{last} (the knowledge band)"
        )),
        other => Ok(other.map(|l| l as usize)),
    }
}
