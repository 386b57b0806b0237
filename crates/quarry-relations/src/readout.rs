//! What a model answers: prompts continued greedily, as one batch, cut to the answer phrase.
//!
//! This is the ground truth DESCRIBE reads and the fact sets are checked against: the words
//! the model itself writes after "The capital of France is", not a guess from its weights.
//! Every prompt gets its own KV cache and all of them advance together through
//! [`Model::forward_batch`], so twenty relations cost one prefill of their short prompts and
//! a few batched decode steps, not twenty generations.

use quarry_model::ops::softmax;
use quarry_model::{ContiguousKvCache, Model, ModelError, SequenceBatch};
use quarry_tokenize::Tokenizer;

use crate::catalogue::{fill, Relation};

/// Words that end an answer phrase when they follow its first word ("Paris and its suburbs"
/// answers "Paris"); "of", "de", "von" and the like stay ("Bank of England").
const PHRASE_ENDERS: &[&str] = &[
    "and", "or", "but", "is", "are", "was", "were", "which", "who", "that", "in", "on", "at",
    "with", "for", "to", "a", "an", "the", "as", "from", "by", "it", "its", "has", "had",
];

/// Characters that end an answer phrase.
fn ends_phrase(c: char) -> bool {
    matches!(
        c,
        '.' | ',' | ';' | ':' | '!' | '?' | '\n' | '(' | ')' | '"' | '[' | ']'
    )
}

/// The greedy answer to one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The answer phrase (see [`phrase`]); empty when the model ends or starts with
    /// punctuation.
    pub text: String,
    /// The probability of the answer's first token after the prompt.
    pub probability: f32,
    /// Mean log-probability of the answer's tokens (each greedy, so each its step's maximum).
    pub mean_logprob: f32,
    /// The tokens the model wrote, up to where the phrase was known to be complete.
    pub tokens: Vec<u32>,
}

/// The answer phrase at the start of a continuation: leading spaces and an opening quote
/// dropped, cut at the closing quote, the first punctuation or line break, and at a function
/// word after the first word; empty when all that is left is one function word.
pub fn phrase(continuation: &str) -> &str {
    let mut text = continuation.trim_start_matches(' ');
    let mut end = text.len();
    for (open, close) in [('"', '"'), ('\'', '\''), ('“', '”'), ('‘', '’'), ('*', '*')] {
        if let Some(rest) = text.strip_prefix(open) {
            text = rest;
            end = text.find(close).unwrap_or(text.len());
            break;
        }
    }
    let mut end = text[..end].find(ends_phrase).unwrap_or(end);
    let mut words = 0;
    let mut offset = 0usize;
    for word in text[..end].split(' ') {
        if words > 0 && PHRASE_ENDERS.contains(&word.to_lowercase().as_str()) {
            end = offset.saturating_sub(1).min(end);
            break;
        }
        if !word.is_empty() {
            words += 1;
        }
        offset += word.len() + 1;
    }
    let phrase = text[..end].trim_end();
    // A lone function word ("They speak in …") is no answer.
    if PHRASE_ENDERS.contains(&phrase.to_lowercase().as_str()) {
        return "";
    }
    phrase
}

/// Whether the phrase of `continuation` is known to be complete: something after it was cut.
/// (It is when more text would not change it.)
fn complete(continuation: &str) -> bool {
    let p = phrase(continuation);
    !p.is_empty() && phrase(&format!("{continuation} more")) == p
}

/// Whether `answer` gives `expected`: equal up to case and a leading "the", or starting with it
/// followed by a word boundary ("English" is given by "English and French" but not by
/// "Englishman"; "Netherlands" by "the Netherlands").
pub fn gives(answer: &str, expected: &str) -> bool {
    let bare = |s: &str| {
        let s = s.trim().to_lowercase();
        s.strip_prefix("the ").map(str::to_string).unwrap_or(s)
    };
    let (a, e) = (bare(answer), bare(expected));
    if e.is_empty() {
        return false;
    }
    match a.strip_prefix(&e) {
        Some(rest) => rest.chars().next().is_none_or(|c| !c.is_alphanumeric()),
        None => false,
    }
}

/// The greedy answers to `prompts` (each encoded with the model's BOS, special-token text
/// read as text), at most `max_tokens` tokens each, run as one batch.
pub fn answers(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[String],
    max_tokens: usize,
) -> Result<Vec<Answer>, ModelError> {
    let vocab = model.config().vocab_size;
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tokenizer.encode(p, true, false))
        .collect();
    let mut caches: Vec<ContiguousKvCache> = encoded
        .iter()
        .map(|t| model.new_cache(t.len() + max_tokens.max(1)))
        .collect();
    let mut logits = prefill(model, &encoded, &mut caches)?;
    let mut out: Vec<Answer> = prompts
        .iter()
        .map(|_| Answer {
            text: String::new(),
            probability: 0.0,
            mean_logprob: 0.0,
            tokens: Vec::new(),
        })
        .collect();
    let mut logprob_sums = vec![0.0f32; prompts.len()];
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..max_tokens {
        let mut next = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for (row, &i) in active.iter().enumerate() {
            let (id, logprob) = greedy(&logits[row * vocab..(row + 1) * vocab]);
            if step == 0 {
                out[i].probability = logprob.exp();
            }
            if tokenizer.is_end_of_generation(id) || !tokenizer.is_text(id) {
                continue;
            }
            out[i].tokens.push(id);
            logprob_sums[i] += logprob;
            let text = tokenizer.decode(&out[i].tokens);
            if complete(&text) || text.trim_start().starts_with(ends_phrase) {
                continue;
            }
            next.push([id]);
            still.push(i);
        }
        if still.is_empty() || step + 1 == max_tokens {
            break;
        }
        let mut batch = Vec::with_capacity(still.len());
        let (mut wanted, mut tokens) = (still.iter().peekable(), next.iter());
        for (i, cache) in caches.iter_mut().enumerate() {
            if wanted.peek() == Some(&&i) {
                wanted.next();
                batch.push(SequenceBatch {
                    tokens: tokens
                        .next()
                        .expect("one token per running sequence")
                        .as_slice(),
                    cache,
                    rows: 0..1,
                    overlay: None,
                });
            }
        }
        logits = model.forward_batch(&mut batch)?;
        active = still;
    }
    for (answer, sum) in out.iter_mut().zip(logprob_sums) {
        let text = tokenizer.decode(&answer.tokens);
        answer.text = phrase(&text).to_string();
        answer.mean_logprob = sum / answer.tokens.len().max(1) as f32;
    }
    Ok(out)
}

/// Tokens an answer may take: enough for "Johann Wolfgang von Goethe" and most two-word
/// places, few enough that an unfinished phrase is rare.
pub const ANSWER_TOKENS: usize = 6;

/// One thing the model answers about an entity.
#[derive(Clone, Debug)]
pub struct Edge {
    pub relation: Relation,
    /// The answer phrase.
    pub target: String,
    /// The probability of its first token on the prompt.
    pub probability: f32,
    /// The same token's probability when the prompt names an entity the model cannot know
    /// (see [`Baseline`]).
    pub baseline: f32,
    /// What the entity adds: `probability − baseline`.
    pub score: f32,
    /// The prompt the model answered.
    pub prompt: String,
}

/// Made-up names: what a template makes the model say of an entity it knows nothing about.
const PLACEHOLDERS: [&str; 3] = ["Vorlanda", "Quenbright", "Miralto Besk"];

/// Tokens kept of each baseline distribution; the rest count as the smallest kept.
const BASELINE_TOKENS: usize = 4096;

/// What each ask's template makes the model answer whatever the entity: its first-token
/// distribution averaged over [`PLACEHOLDERS`]. "X is a country on the continent of" gets
/// " Africa" with probability 0.7 for a name the model has never seen; an edge is worth
/// showing when the entity moves its answer above that.
pub struct Baseline {
    /// Per ask: the most likely tokens and their probabilities, and the floor for the rest.
    kept: Vec<(std::collections::HashMap<u32, f32>, f32)>,
}

impl Baseline {
    /// The baseline of `asks`, one forward pass per ask and placeholder, as one batch.
    pub fn new(
        model: &Model,
        tokenizer: &Tokenizer,
        asks: &[(Relation, usize)],
    ) -> Result<Baseline, ModelError> {
        let vocab = model.config().vocab_size;
        let prompts: Vec<String> = asks
            .iter()
            .flat_map(|a| PLACEHOLDERS.map(|p| prompt(a, p)))
            .collect();
        let rows = first_token_logits(model, tokenizer, &prompts)?;
        let kept = rows
            .chunks(PLACEHOLDERS.len() * vocab)
            .map(|ask| {
                let mut mean = vec![0.0f32; vocab];
                for row in ask.chunks(vocab) {
                    for (m, p) in mean.iter_mut().zip(softmax(row)) {
                        *m += p as f32 / PLACEHOLDERS.len() as f32;
                    }
                }
                let mut order: Vec<u32> = (0..vocab as u32).collect();
                let k = BASELINE_TOKENS.min(vocab);
                order.select_nth_unstable_by(k - 1, |a, b| {
                    mean[*b as usize].total_cmp(&mean[*a as usize])
                });
                let top = &order[..k];
                let floor = top.iter().map(|&t| mean[t as usize]).fold(1.0f32, f32::min);
                (top.iter().map(|&t| (t, mean[t as usize])).collect(), floor)
            })
            .collect();
        Ok(Baseline { kept })
    }

    fn probability(&self, ask: usize, token: u32) -> f32 {
        let (kept, floor) = &self.kept[ask];
        kept.get(&token).copied().unwrap_or(*floor)
    }
}

fn prompt((relation, template): &(Relation, usize), entity: &str) -> String {
    let templates = relation.templates;
    fill(
        &templates[(*template).min(templates.len().saturating_sub(1))],
        entity,
    )
}

/// What the model answers about `entity` for each of `asks` (a relation and the index of the
/// template to ask it with), as one batch, against `baseline` (made for the same asks); edges
/// with an empty answer, or one that repeats the entity (a copy, not a fact: "the largest
/// city in Zorblax is Zorblax"), are left out, the rest sorted by score, highest first.
pub fn describe(
    model: &Model,
    tokenizer: &Tokenizer,
    entity: &str,
    asks: &[(Relation, usize)],
    baseline: &Baseline,
) -> Result<Vec<Edge>, ModelError> {
    let prompts: Vec<String> = asks.iter().map(|a| prompt(a, entity)).collect();
    let got = answers(model, tokenizer, &prompts, ANSWER_TOKENS)?;
    let mut edges: Vec<Edge> = asks
        .iter()
        .zip(prompts)
        .zip(got)
        .enumerate()
        .filter(|(_, (_, a))| !a.text.is_empty() && !names(&a.text, entity))
        .map(|(i, (((relation, _), prompt), a))| {
            let base = baseline.probability(i, a.tokens[0]);
            Edge {
                relation: *relation,
                target: a.text,
                probability: a.probability,
                baseline: base,
                score: a.probability - base,
                prompt,
            }
        })
        .collect();
    edges.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(edges)
}

/// Whether `answer` names `entity`, as whole words in any case ("Zorblax City" names
/// "Zorblax"; "Japanese" does not name "Japan").
fn names(answer: &str, entity: &str) -> bool {
    let (answer, entity) = (answer.to_lowercase(), entity.trim().to_lowercase());
    if entity.is_empty() {
        return false;
    }
    answer.match_indices(&entity).any(|(i, _)| {
        let before = answer[..i].chars().next_back();
        let after = answer[i + entity.len()..].chars().next();
        before.is_none_or(|c| !c.is_alphanumeric()) && after.is_none_or(|c| !c.is_alphanumeric())
    })
}

/// The logits after each of `prompts` (encoded as [`answers`] does), one batch.
fn first_token_logits(
    model: &Model,
    tokenizer: &Tokenizer,
    prompts: &[String],
) -> Result<Vec<f32>, ModelError> {
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tokenizer.encode(p, true, false))
        .collect();
    let mut caches: Vec<ContiguousKvCache> =
        encoded.iter().map(|t| model.new_cache(t.len())).collect();
    prefill(model, &encoded, &mut caches)
}

/// Runs each of `encoded` into its cache as one batch; the logits after each.
fn prefill(
    model: &Model,
    encoded: &[Vec<u32>],
    caches: &mut [ContiguousKvCache],
) -> Result<Vec<f32>, ModelError> {
    let mut batch: Vec<SequenceBatch<'_, '_, ContiguousKvCache>> = encoded
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| SequenceBatch {
            tokens,
            cache,
            rows: tokens.len() - 1..tokens.len(),
            overlay: None,
        })
        .collect();
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    model.forward_batch(&mut batch)
}

/// The most likely token of a row of logits and its log-probability.
fn greedy(row: &[f32]) -> (u32, f32) {
    let (best, max) =
        row.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        );
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    (best as u32, -sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phrase_stops_at_punctuation_and_function_words() {
        assert_eq!(phrase(" Paris, the city of light"), "Paris");
        assert_eq!(phrase(" Paris and its suburbs"), "Paris");
        assert_eq!(phrase(" Buenos Aires."), "Buenos Aires");
        assert_eq!(phrase(" Bank of England is"), "Bank of England");
        assert_eq!(phrase(" the euro"), "the euro");
        assert_eq!(phrase(" in the north"), "");
        assert_eq!(phrase("\nParis"), "");
        assert_eq!(phrase(" \"ran\". The"), "ran");
        assert_eq!(phrase(" 'sad' and"), "sad");
        assert_eq!(phrase(" O'Brien, the"), "O'Brien");
        assert_eq!(
            phrase(" Johann Wolfgang von Goethe"),
            "Johann Wolfgang von Goethe"
        );
        assert!(complete(" Paris, the"));
        assert!(!complete(" Buenos Ai"));
    }

    #[test]
    fn an_answer_names_the_entity_only_as_whole_words() {
        assert!(names("Zorblax Quintavenu", "Zorblax Quintavenu"));
        assert!(names("the Zorblax currency", " zorblax"));
        assert!(!names("Japanese", "Japan"));
        assert!(!names("Paris", ""));
    }

    #[test]
    fn an_answer_gives_a_target_at_a_word_boundary() {
        assert!(gives("English and French", "English"));
        assert!(gives("paris", "Paris"));
        assert!(!gives("Englishman", "English"));
        assert!(!gives("Paris", ""));
        assert!(!gives("Pa", "Paris"));
        assert!(gives("the Netherlands", "Netherlands"));
        assert!(gives("Czech Republic", "the Czech Republic"));
    }
}
