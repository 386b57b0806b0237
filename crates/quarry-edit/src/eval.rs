//! Measuring edits the way the knowledge-editing literature does (CounterFact's protocol):
//! efficacy (the rewrite prompt prefers the new target to the old), paraphrase success (the
//! same on prompts of other templates), neighbourhood (prompts about other subjects keep
//! their greedy answer) and perplexity on unrelated text.
//!
//! Every probability is the quantized forward pass's, with the edits' overlay installed
//! exactly as generation uses it.

use std::sync::Arc;

use quarry_engine::perplexity;
use quarry_model::{FfnOverlay, LowRank, Model};
use quarry_tokenize::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::EditError;

/// One counterfactual of an evaluation set (`fixtures/edits/*.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    pub entity: String,
    pub relation: String,
    pub old: String,
    pub new: String,
    pub rewrite: String,
    pub paraphrases: Vec<String>,
    pub neighbours: Vec<Neighbour>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Neighbour {
    pub prompt: String,
    pub answer: String,
}

/// The scores of one model (edited or not) on a set of cases, as fractions in `[0, 1]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Scores {
    pub efficacy: f64,
    pub paraphrase: f64,
    /// Fraction of neighbourhood prompts whose greedy first token is the unedited model's,
    /// among the [`Scores::neighbours`] that are about no subject the edits change.
    pub neighbourhood: f64,
    pub neighbours: usize,
    /// Fraction of rewrite prompts whose greedy first token is the new target's.
    pub greedy_new: f64,
}

/// `log P(target | prompt)` summed over the target's tokens (after a space).
pub fn target_logprob(
    model: &Model,
    tokenizer: &Tokenizer,
    prompt: &str,
    target: &str,
) -> Result<f64, EditError> {
    let prompt_ids = tokenizer.encode(prompt, true, false);
    let target_ids = tokenizer.encode(&format!(" {}", target.trim()), false, false);
    if target_ids.is_empty() {
        return Err(EditError::EmptyTarget {
            target: target.into(),
        });
    }
    let mut tokens = prompt_ids.clone();
    tokens.extend_from_slice(&target_ids[..target_ids.len() - 1]);
    let first = prompt_ids.len() - 1;
    let mut cache = model.new_cache(tokens.len());
    let logits = model
        .forward(&tokens, &mut cache, first..tokens.len())
        .map_err(|e| EditError::Model(e.to_string()))?;
    let vocab = model.config().vocab_size;
    Ok(logits
        .chunks_exact(vocab)
        .zip(&target_ids)
        .map(|(row, &t)| perplexity::log_softmax_at(row, t as usize))
        .sum())
}

/// The most likely next token after `prompt`.
pub fn greedy_token(model: &Model, tokenizer: &Tokenizer, prompt: &str) -> Result<u32, EditError> {
    let tokens = tokenizer.encode(prompt, true, false);
    let mut cache = model.new_cache(tokens.len());
    let logits = model
        .forward(&tokens, &mut cache, tokens.len() - 1..tokens.len())
        .map_err(|e| EditError::Model(e.to_string()))?;
    Ok(argmax(&logits))
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0 as u32
}

/// The greedy first token of every neighbourhood prompt of `cases`, in order.
pub fn neighbour_answers(
    model: &Model,
    tokenizer: &Tokenizer,
    cases: &[Case],
) -> Result<Vec<u32>, EditError> {
    cases
        .iter()
        .flat_map(|c| &c.neighbours)
        .map(|n| greedy_token(model, tokenizer, &n.prompt))
        .collect()
}

/// Scores `model` on `cases`; `base_answers` are the unedited model's
/// [`neighbour_answers`].
pub fn score(
    model: &Model,
    tokenizer: &Tokenizer,
    cases: &[Case],
    base_answers: &[u32],
) -> Result<Scores, EditError> {
    let prefers_new = |prompt: &str, case: &Case| -> Result<bool, EditError> {
        Ok(target_logprob(model, tokenizer, prompt, &case.new)?
            > target_logprob(model, tokenizer, prompt, &case.old)?)
    };
    let (mut eff, mut para, mut para_n, mut greedy) = (0usize, 0usize, 0usize, 0usize);
    for case in cases {
        eff += usize::from(prefers_new(&case.rewrite, case)?);
        for p in &case.paraphrases {
            para += usize::from(prefers_new(p, case)?);
            para_n += 1;
        }
        let new_first = tokenizer.encode(&format!(" {}", case.new.trim()), false, false)[0];
        greedy += usize::from(greedy_token(model, tokenizer, &case.rewrite)? == new_first);
    }
    let answers = neighbour_answers(model, tokenizer, cases)?;
    let about: Vec<bool> = cases
        .iter()
        .flat_map(|c| c.neighbours.iter().map(move |n| about_an_edit(c, n, cases)))
        .collect();
    let scored = about.iter().filter(|a| !**a).count();
    let kept = answers
        .iter()
        .zip(base_answers)
        .zip(&about)
        .filter(|((a, b), about)| a == b && !**about)
        .count();
    let frac = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Scores {
        efficacy: frac(eff, cases.len()),
        paraphrase: frac(para, para_n),
        neighbourhood: frac(kept, scored),
        neighbours: scored,
        greedy_new: frac(greedy, cases.len()),
    })
}

/// Whether the neighbour prompt `n` of `case` asks about the subject of another edit of the
/// same relation in `cases`: in a large patch a case's neighbours are often other cases'
/// subjects, and their answers are meant to change.
fn about_an_edit(case: &Case, n: &Neighbour, cases: &[Case]) -> bool {
    cases.iter().any(|other| {
        other.relation == case.relation
            && other.entity != case.entity
            && contains_word(&n.prompt, &other.entity)
    })
}

/// Whether `text` contains `word` with no letter or digit right before or after it.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

/// Perplexity of `model` on `text` with llama.cpp's method (windows of `ctx`).
pub fn text_perplexity(
    model: &Model,
    tokenizer: &Tokenizer,
    text: &str,
    ctx: usize,
) -> Result<f64, EditError> {
    let tokens = tokenizer.encode(text, true, false);
    let bos = tokenizer.add_bos().then(|| tokenizer.bos_id()).flatten();
    perplexity::perplexity(model, &tokens, ctx, bos, |_, _, _| {})
        .map(|r| r.ppl)
        .map_err(|e| EditError::Model(e.to_string()))
}

/// `model` with `deltas` (`(layer, delta)`, at most one per layer) as its overlay.
pub fn patched(model: &Model, deltas: Vec<(usize, LowRank)>) -> Result<Model, EditError> {
    let overlay = FfnOverlay::new(model.config().n_layers, deltas);
    model
        .with_overlay(Some(Arc::new(overlay)))
        .map_err(|e| EditError::Model(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(entity: &str, relation: &str, neighbours: &[&str]) -> Case {
        Case {
            entity: entity.into(),
            relation: relation.into(),
            old: "a".into(),
            new: "b".into(),
            rewrite: format!("The {relation} of {entity} is"),
            paraphrases: Vec::new(),
            neighbours: neighbours
                .iter()
                .map(|p| Neighbour {
                    prompt: p.to_string(),
                    answer: "x".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn neighbours_about_other_edits_of_the_relation_are_not_scored() {
        let cases = [
            case(
                "France",
                "capital",
                &["The capital of Germany is", "The capital of Spain is"],
            ),
            case("Germany", "capital", &["The capital of France is"]),
            case("Spain", "language", &["The language of Italy is"]),
        ];
        let about = |c: usize, n: usize| about_an_edit(&cases[c], &cases[c].neighbours[n], &cases);
        assert!(about(0, 0), "Germany's capital is edited too");
        assert!(!about(0, 1), "Spain is edited for another relation only");
        assert!(about(1, 0));
        assert!(!about(2, 0));
        assert!(contains_word("The book Jane Eyre was", "Jane Eyre"));
        assert!(!contains_word("JavaScript was made by", "Java"));
        assert!(!contains_word("Spaniards", "Spain"));
    }
}
