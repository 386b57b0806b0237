//! How well a model answers each catalogue relation, measured on the relation's pairs.
//!
//! A relation is asked with its DESCRIBE template about the subjects of its first
//! [`PAIRS_ASKED`] pairs (catalogue::Relation::pairs, from LRE); a pair counts as answered
//! when the greedy answer gives its object ([`gives`]). This is the accuracy SHOW RELATIONS
//! lists: a relation the model answers 0 of 30 times is not one DESCRIBE can read out of it,
//! whatever its catalogue entry says. Extraction measures it once and keeps it in the vindex;
//! a model file queried without a vindex measures it on first use. Each relation's prompts run
//! in batches of [`BATCH`] (readout::answers).

use quarry_model::{Model, ModelError};
use quarry_tokenize::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::catalogue::{self, fill, Pair};
use crate::readout::{answers, gives, Answer, ANSWER_TOKENS};

/// Pairs asked per relation (the first ones): enough to tell a relation the model answers
/// from one it does not, few enough that all relations take seconds.
pub const PAIRS_ASKED: usize = 30;
/// Prompts run together.
const BATCH: usize = 32;
/// Answered pairs kept per relation as examples.
const EXAMPLES: usize = 5;

/// A relation's accuracy on its pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelationAccuracy {
    /// The catalogue name.
    pub relation: String,
    pub asked: usize,
    pub answered: usize,
    /// The first answered pairs: the subject and the model's answer.
    pub examples: Vec<(String, String)>,
}

impl RelationAccuracy {
    /// `answered / asked` (0 when nothing was asked).
    pub fn accuracy(&self) -> f64 {
        self.answered as f64 / self.asked.max(1) as f64
    }
}

/// The greedy answer to `template` about each pair's subject, and whether it gives the
/// object.
pub fn ask(
    model: &Model,
    tokenizer: &Tokenizer,
    template: &str,
    pairs: &[Pair],
) -> Result<Vec<(Answer, bool)>, ModelError> {
    let prompts: Vec<String> = pairs.iter().map(|(s, _)| fill(template, s)).collect();
    let mut got = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(BATCH) {
        got.extend(answers(model, tokenizer, chunk, ANSWER_TOKENS)?);
    }
    Ok(got
        .into_iter()
        .zip(pairs)
        .map(|(a, (_, object))| {
            let right = gives(&a.text, object);
            (a, right)
        })
        .collect())
}

/// Every catalogue relation that has pairs, asked about its first [`PAIRS_ASKED`], in
/// catalogue order.
pub fn measure(model: &Model, tokenizer: &Tokenizer) -> Result<Vec<RelationAccuracy>, ModelError> {
    catalogue::all()
        .filter(|r| !r.pairs.is_empty())
        .map(|r| {
            let pairs = &r.pairs[..r.pairs.len().min(PAIRS_ASKED)];
            let got = ask(model, tokenizer, &r.templates[r.describe], pairs)?;
            let right: Vec<(String, String)> = got
                .into_iter()
                .zip(pairs)
                .filter(|((_, right), _)| *right)
                .map(|((answer, _), (subject, _))| (subject.clone(), answer.text))
                .collect();
            Ok(RelationAccuracy {
                relation: r.name.to_string(),
                asked: pairs.len(),
                answered: right.len(),
                examples: right.into_iter().take(EXAMPLES).collect(),
            })
        })
        .collect()
}
