//! DESCRIBE's default method: ask the model each catalogue relation about the entity and keep
//! what it answers.
//!
//! Every relation's describe template is filled with the entity and all of them are run as one
//! batch (quarry_relations::readout), so an edge is what the model itself says ("The capital
//! of France is the city of" → "Paris"), with the probability of its first token as the
//! score. Relations that do not apply to the entity still get an answer; most of those answers
//! are unlikely and fall under [`MIN_SCORE`], which is what keeps an entity the model knows
//! nothing about from coming back with a page of guesses. The feature-level methods
//! (`VIA FEATURES`, `RAW`) stay for comparison (docs/lql.md has the measurements).

use quarry_lql::Detail;
use quarry_model::Model;
use quarry_relations::catalogue::{self, Relation};
use quarry_relations::readout::{describe as ask, Baseline, Edge};
use quarry_tokenize::Tokenizer;

use crate::result::{Cell, ColumnType, ResultSet};

/// Answers the entity raises by less than this over the baseline are not edges (measured:
/// docs/lql.md, "DESCRIBE").
pub const MIN_SCORE: f32 = 0.05;

/// Every catalogue relation, with the template DESCRIBE asks it with.
pub fn asks() -> Vec<(Relation, usize)> {
    catalogue::all().map(|r| (r, r.describe)).collect()
}

/// The edges of `entity`: one per relation whose answer's probability is at least
/// [`MIN_SCORE`] above `baseline`'s, highest score first.
pub fn edges(
    tokenizer: &Tokenizer,
    model: &Model,
    baseline: &Baseline,
    entity: &str,
) -> Result<Vec<Edge>, String> {
    if entity.trim().is_empty() {
        return Err("the entity is empty".into());
    }
    let mut edges = ask(model, tokenizer, entity, &asks(), baseline).map_err(|e| e.to_string())?;
    edges.retain(|e| e.score >= MIN_SCORE);
    Ok(edges)
}

/// DESCRIBE: [`edges`], at most 10 (BRIEF), 20 or 50 (VERBOSE).
pub fn describe(
    tokenizer: &Tokenizer,
    model: &Model,
    baseline: &Baseline,
    entity: &str,
    detail: Detail,
) -> Result<ResultSet, String> {
    let edges = edges(tokenizer, model, baseline, entity)?;
    let limit = match detail {
        Detail::Brief => 10,
        Detail::Normal => 20,
        Detail::Verbose => 50,
    };
    let mut r = ResultSet::new(&[("rank", ColumnType::Int)]);
    r.columns.extend(ResultSet::new(EDGE_COLUMNS).columns);
    for (rank, e) in edges.iter().take(limit).enumerate() {
        let mut row = vec![Cell::Int(rank as i64 + 1)];
        row.extend(edge_cells(e));
        r.push(row);
    }
    r.notes.push(format!(
        "answers: {} catalogue relations asked as one batch; {} answers at least {MIN_SCORE} more likely than for a made-up name (score = probability − baseline, of the first token)",
        asks().len(),
        edges.len()
    ));
    Ok(r)
}

/// The table `SELECT … FROM EDGES WHERE entity = …` reads: every edge of each entity (as
/// [`edges`]), in the order asked, each entity's highest score first.
pub fn entity_edges(
    tokenizer: &Tokenizer,
    model: &Model,
    baseline: &Baseline,
    entities: &[String],
) -> Result<ResultSet, String> {
    if entities.len() > MAX_ENTITIES {
        return Err(format!(
            "{} entities named; EDGES asks the model about at most {MAX_ENTITIES} per statement",
            entities.len()
        ));
    }
    let mut r = ResultSet::new(&[("entity", ColumnType::Text)]);
    r.columns.extend(ResultSet::new(EDGE_COLUMNS).columns);
    for entity in entities {
        for e in edges(tokenizer, model, baseline, entity)? {
            let mut row = vec![Cell::Text(entity.clone())];
            row.extend(edge_cells(&e));
            r.push(row);
        }
    }
    Ok(r)
}

/// Entities one `SELECT … FROM EDGES` may ask about (each costs one batch, about 0.5 s).
pub const MAX_ENTITIES: usize = 64;

const EDGE_COLUMNS: &[(&str, ColumnType)] = &[
    ("relation", ColumnType::Text),
    ("target", ColumnType::Text),
    ("score", ColumnType::Float),
    ("probability", ColumnType::Float),
    ("baseline", ColumnType::Float),
    ("evidence", ColumnType::Text),
];

fn edge_cells(e: &Edge) -> Vec<Cell> {
    vec![
        Cell::Text(e.relation.name.to_string()),
        Cell::Text(e.target.clone()),
        Cell::Float(e.score as f64),
        Cell::Float(e.probability as f64),
        Cell::Float(e.baseline as f64),
        Cell::Text(e.prompt.clone()),
    ]
}
