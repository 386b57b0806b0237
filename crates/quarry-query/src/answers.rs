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
use quarry_relations::readout::{describe as ask, Baseline};
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
/// [`MIN_SCORE`] above `baseline`'s, highest score first, at most 10 (BRIEF), 20 or 50
/// (VERBOSE).
pub fn describe(
    tokenizer: &Tokenizer,
    model: &Model,
    baseline: &Baseline,
    entity: &str,
    detail: Detail,
) -> Result<ResultSet, String> {
    if entity.trim().is_empty() {
        return Err("the entity is empty".into());
    }
    let asks = asks();
    let edges = ask(model, tokenizer, entity, &asks, baseline).map_err(|e| e.to_string())?;
    let limit = match detail {
        Detail::Brief => 10,
        Detail::Normal => 20,
        Detail::Verbose => 50,
    };
    let mut r = ResultSet::new(&[
        ("rank", ColumnType::Int),
        ("relation", ColumnType::Text),
        ("target", ColumnType::Text),
        ("score", ColumnType::Float),
        ("probability", ColumnType::Float),
        ("baseline", ColumnType::Float),
        ("evidence", ColumnType::Text),
    ]);
    let kept: Vec<_> = edges.iter().filter(|e| e.score >= MIN_SCORE).collect();
    for (rank, e) in kept.iter().take(limit).enumerate() {
        r.push(vec![
            Cell::Int(rank as i64 + 1),
            Cell::Text(e.relation.name.to_string()),
            Cell::Text(e.target.clone()),
            Cell::Float(e.score as f64),
            Cell::Float(e.probability as f64),
            Cell::Float(e.baseline as f64),
            Cell::Text(e.prompt.clone()),
        ]);
    }
    r.notes.push(format!(
        "answers: {} catalogue relations asked as one batch; {} answers at least {MIN_SCORE} more likely than for a made-up name (score = probability − baseline, of the first token)",
        asks.len(),
        kept.len()
    ));
    Ok(r)
}
