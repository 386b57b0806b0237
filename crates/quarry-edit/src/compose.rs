//! LARQL's `INSERT … MODE COMPOSE`, ported for comparison only (what its code does:
//! `docs/research/larql-compose.md`; Quarry's own edits are [`crate::Editor`]'s).
//!
//! One FFN neuron per fact at one layer (default `n_layers − 2`, LARQL's choice for a model
//! without a knowledge band): the neuron's gate and up rows point along the fact's key (the
//! normed FFN input at the last token of "The {relation} of {entity} is"), its gate scaled
//! ×30 over the layer's typical gate-row norm, and its down column along the target's first
//! token embedding at 0.1 of the typical down-column norm. Every neuron's key is then
//! orthogonalised against the other facts' keys and twenty decoy keys (ten generic prompts,
//! ten of the same template with vocabulary words), the down column is scaled ×1.6 / ×0.7
//! until the target's probability on the prompt lies in [0.30, 0.95], and shrunk ×0.7 while
//! an earlier fact's probability falls below 0.20. The neuron LARQL overwrites is the one with
//! the lowest confidence in its vindex metadata; without that metadata here, the port takes
//! the unclaimed neuron with the smallest down column (the one whose output matters least).

use std::sync::Arc;

use quarry_model::{FfnOverlay, ForwardObserver, LowRank, Model, NeuronRows};
use quarry_tokenize::Tokenizer;

use crate::EditError;

/// LARQL's constants (`executor/tuning.rs` there).
const GATE_SCALE: f32 = 30.0;
const ALPHA: f32 = 0.1;
const BALANCE_LOW: f32 = 0.30;
const BALANCE_HIGH: f32 = 0.95;
const BALANCE_UP: f32 = 1.6;
const BALANCE_DOWN: f32 = 0.7;
const BALANCE_STEPS: usize = 16;
const REGRESSION_FLOOR: f32 = 0.20;
const REGRESSION_FACTS: usize = 16;
const REGRESSION_PASSES: usize = 8;
const TOP_K: usize = 200;
const GENERIC_DECOYS: [&str; 10] = [
    "Once upon a time",
    "The quick brown fox",
    "To be or not to be",
    "Water is a",
    "A long time ago",
    "In the beginning",
    "The weather today is",
    "She opened the door and",
    "He looked at the sky",
    "The children played in the",
];

/// One composed fact: its neuron, raw key, down column and prompt.
struct Fact {
    slot: usize,
    key: Vec<f32>,
    down: Vec<f32>,
    prompt: String,
    target: String,
}

/// COMPOSE facts inserted one after another into one layer of a model.
pub struct Composer {
    model: Model,
    tokenizer: Tokenizer,
    layer: usize,
    gate_ref: f32,
    up_ref: f32,
    down_ref: f32,
    /// The base down projection (`d_model × ff`, row-major): its columns are the neurons'.
    down: Vec<f32>,
    /// The norm of each of its columns.
    down_norms: Vec<f32>,
    decoys: Option<Vec<Vec<f32>>>,
    facts: Vec<Fact>,
    overlay: Option<Arc<FfnOverlay>>,
}

impl Composer {
    /// A composer for `layer` of `model`'s base weights (`None`: `n_layers − 2`).
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        layer: Option<usize>,
    ) -> Result<Composer, EditError> {
        EditError::check_dense(&model)?;
        let model = model
            .with_overlay(None)
            .map_err(|e| EditError::Model(e.to_string()))?;
        let cfg = model.config();
        let layer = layer.unwrap_or(cfg.n_layers.saturating_sub(2));
        if layer >= cfg.n_layers {
            return Err(EditError::BadLayer {
                layer,
                n_layers: cfg.n_layers,
            });
        }
        let (d, ff) = (cfg.d_model, cfg.ff_dim);
        let w = model.ffn_weights(layer);
        let dense = |view: quarry_kernels::WeightView<'_>| -> Result<Vec<f32>, EditError> {
            let mut out = vec![0.0f32; view.rows() * view.cols()];
            quarry_kernels::dequantize(view.dtype(), view.data(), &mut out)
                .map_err(|e| EditError::Model(e.to_string()))?;
            Ok(out)
        };
        let (gate, up, down) = (dense(w.gate)?, dense(w.up)?, dense(w.down)?);
        // The upper median of the first 100 neurons' gate rows, up rows and down columns.
        let sample = ff.min(100);
        let median = |norms: Vec<f32>| {
            let mut n = norms;
            n.sort_by(f32::total_cmp);
            n.get(n.len() / 2).copied().unwrap_or(1.0)
        };
        let row_norm = |m: &[f32], j: usize| norm(&m[j * d..(j + 1) * d]);
        let down_norms: Vec<f32> = (0..ff)
            .map(|j| (0..d).map(|r| down[r * ff + j].powi(2)).sum::<f32>().sqrt())
            .collect();
        let gate_ref = median((0..sample).map(|j| row_norm(&gate, j)).collect());
        let up_ref = median((0..sample).map(|j| row_norm(&up, j)).collect());
        let down_ref = median(down_norms[..sample].to_vec());
        Ok(Composer {
            model,
            tokenizer,
            layer,
            gate_ref,
            up_ref,
            down_ref,
            down,
            down_norms,
            decoys: None,
            facts: Vec::new(),
            overlay: None,
        })
    }

    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The overlay of every fact composed so far.
    pub fn overlay(&self) -> Option<Arc<FfnOverlay>> {
        self.overlay.clone()
    }

    /// The model with every fact composed so far.
    pub fn model(&self) -> Result<Model, EditError> {
        self.model
            .with_overlay(self.overlay.clone())
            .map_err(|e| EditError::Model(e.to_string()))
    }

    /// Every fact's target probability on its own prompt ("The {relation} of {entity} is"),
    /// read the way LARQL's balance reads it.
    pub fn probabilities(&self) -> Result<Vec<f32>, EditError> {
        (0..self.facts.len()).map(|i| self.probability(i)).collect()
    }

    /// Composes `(entity, relation, target)` as LARQL does; the target's probability on the
    /// fact's prompt afterwards.
    pub fn insert(&mut self, entity: &str, relation: &str, target: &str) -> Result<f32, EditError> {
        let target = target.trim();
        let first = self
            .tokenizer
            .encode(&format!(" {target}"), false, false)
            .first()
            .copied()
            .ok_or_else(|| EditError::EmptyTarget {
                target: target.to_string(),
            })?;
        let template = format!("The {} of {{entity}} is", relation.replace(['-', '_'], " "));
        let prompt = template.replace("{entity}", entity);
        let key = self.key(&prompt)?;
        if self.decoys.is_none() {
            // LARQL captures them once per layer, with the template of the first insert.
            let mut decoys = Vec::new();
            for p in GENERIC_DECOYS {
                decoys.push(self.key(p)?);
            }
            for word in self.decoy_words(entity) {
                decoys.push(self.key(&template.replace("{entity}", &word))?);
            }
            self.decoys = Some(decoys);
        }
        let embedding = self.embedding(first);
        let scale = self.down_ref * ALPHA / norm(&embedding).max(1e-12);
        let slot = self.free_slot();
        self.facts.push(Fact {
            slot,
            key,
            down: embedding.iter().map(|v| v * scale).collect(),
            prompt,
            target: target.to_string(),
        });
        let this = self.facts.len() - 1;
        self.rebuild();
        // Balance this fact's own probability into [0.30, 0.95].
        let (mut best_p, mut best_down, mut stalls) = (-1.0f32, self.facts[this].down.clone(), 0);
        for _ in 0..BALANCE_STEPS {
            let p = self.probability(this)?;
            if (BALANCE_LOW..=BALANCE_HIGH).contains(&p) {
                break;
            }
            let factor = if p < BALANCE_LOW {
                if p > best_p {
                    (best_p, best_down, stalls) = (p, self.facts[this].down.clone(), 0);
                } else {
                    stalls += 1;
                    if stalls >= 2 {
                        self.facts[this].down = best_down.clone();
                        self.rebuild();
                        break;
                    }
                }
                BALANCE_UP
            } else {
                BALANCE_DOWN
            };
            self.facts[this].down.iter_mut().for_each(|v| *v *= factor);
            self.rebuild();
        }
        // Shrink it while an earlier fact has fallen below 0.20.
        for _ in 0..REGRESSION_PASSES {
            let earlier = this.saturating_sub(REGRESSION_FACTS)..this;
            let mut regressed = false;
            for i in earlier {
                if self.probability(i)? < REGRESSION_FLOOR {
                    regressed = true;
                    break;
                }
            }
            if !regressed {
                break;
            }
            self.facts[this]
                .down
                .iter_mut()
                .for_each(|v| *v *= BALANCE_DOWN);
            self.rebuild();
        }
        self.probability(this)
    }

    /// The overlay of every fact: gate and up rows from the refined keys, down columns as a
    /// low-rank change of the down projection (`new column − base column` per neuron).
    fn rebuild(&mut self) {
        let cfg = self.model.config();
        let (d, ff, n) = (cfg.d_model, cfg.ff_dim, cfg.n_layers);
        let decoys = self.decoys.as_deref().unwrap_or(&[]);
        let mut gate = Vec::with_capacity(self.facts.len() * d);
        let mut up = Vec::with_capacity(self.facts.len() * d);
        for (i, fact) in self.facts.iter().enumerate() {
            let others: Vec<&[f32]> = self
                .facts
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, f)| f.key.as_slice())
                .chain(decoys.iter().map(Vec::as_slice))
                .collect();
            let dir = unit(&reject(&fact.key, &others));
            gate.extend(dir.iter().map(|v| v * self.gate_ref * GATE_SCALE));
            up.extend(dir.iter().map(|v| v * self.up_ref));
        }
        let rank = self.facts.len();
        let mut a = vec![0.0f32; rank * ff];
        let mut b = vec![0.0f32; d * rank];
        for (i, fact) in self.facts.iter().enumerate() {
            a[i * ff + fact.slot] = 1.0;
            for r in 0..d {
                b[r * rank + i] = fact.down[r] - self.down[r * ff + fact.slot];
            }
        }
        let rows = NeuronRows {
            index: self.facts.iter().map(|f| f.slot).collect(),
            gate,
            up,
        };
        self.overlay = LowRank::new(d, ff, rank, a, b).map(|delta| {
            Arc::new(FfnOverlay::new(n, [(self.layer, delta)]).with_neurons([(self.layer, rows)]))
        });
    }

    /// P(fact's target) on its prompt under the current overlay: the probability of the most
    /// likely of the top 200 tokens that reads as the target (contains it, or starts with its
    /// first three characters), 0 when none does.
    fn probability(&self, fact: usize) -> Result<f32, EditError> {
        let f = &self.facts[fact];
        let model = self.model()?;
        let tokens = self.tokenizer.encode(&f.prompt, true, false);
        let mut cache = model.new_cache(tokens.len());
        let logits = model
            .forward(&tokens, &mut cache, tokens.len() - 1..tokens.len())
            .map_err(|e| EditError::Model(e.to_string()))?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let kth = TOP_K.min(order.len() - 1);
        order.select_nth_unstable_by(kth, |&x, &y| logits[y].total_cmp(&logits[x]));
        order.truncate(TOP_K);
        order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        let prefix: String = f.target.chars().take(3).collect();
        Ok(order
            .into_iter()
            .find(|&id| {
                let text = self.tokenizer.decode(&[id as u32]);
                let text = text.trim();
                !text.is_empty() && (text.contains(f.target.as_str()) || text.starts_with(&prefix))
            })
            .map_or(0.0, |id| (logits[id] - max).exp() / sum))
    }

    /// The normed FFN input at the last token of `prompt` on the base model.
    fn key(&self, prompt: &str) -> Result<Vec<f32>, EditError> {
        let tokens = self.tokenizer.encode(prompt, true, false);
        let mut grab = LastInput {
            layer: self.layer,
            d: self.model.config().d_model,
            input: None,
        };
        let mut cache = self.model.new_cache(tokens.len());
        self.model
            .forward_observed(&tokens, &mut cache, 0..1, &mut grab)
            .map_err(|e| EditError::Model(e.to_string()))?;
        grab.input
            .ok_or_else(|| EditError::Model("the edited layer was never reached".into()))
    }

    /// The first ten vocabulary words (ids below 5000, three or more letters) other than
    /// `entity`: LARQL's template decoys.
    fn decoy_words(&self, entity: &str) -> Vec<String> {
        (0..self.tokenizer.vocab_size().min(5000) as u32)
            .filter(|&id| !self.tokenizer.is_control(id))
            .map(|id| self.tokenizer.decode(&[id]).trim().to_string())
            .filter(|w| w.len() >= 3 && w.chars().all(|c| c.is_alphabetic()) && w != entity)
            .take(10)
            .collect()
    }

    /// The input embedding of `token`.
    fn embedding(&self, token: u32) -> Vec<f32> {
        let view = self.model.token_embeddings();
        let mut out = vec![0.0f32; view.cols()];
        view.dequantize_row(token as usize, &mut out);
        out
    }

    /// The unclaimed neuron with the smallest down column.
    fn free_slot(&self) -> usize {
        (0..self.down_norms.len())
            .filter(|j| self.facts.iter().all(|f| f.slot != *j))
            .min_by(|&x, &y| self.down_norms[x].total_cmp(&self.down_norms[y]))
            .unwrap_or(0)
    }
}

/// Records the normed FFN input of the last row at one layer.
struct LastInput {
    layer: usize,
    d: usize,
    input: Option<Vec<f32>>,
}

impl ForwardObserver for LastInput {
    fn ffn_activations(&mut self, layer: usize, input: &[f32], _activations: &[f32]) {
        if layer == self.layer {
            self.input = Some(input[input.len() - self.d..].to_vec());
        }
    }
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = norm(v).max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// `v` minus its projection on the span of `others` (modified Gram–Schmidt; vectors left with
/// a norm below 1e-6 of their own are dropped).
fn reject(v: &[f32], others: &[&[f32]]) -> Vec<f32> {
    let mut basis: Vec<Vec<f32>> = Vec::new();
    for o in others {
        let mut w = o.to_vec();
        for b in &basis {
            let c: f32 = w.iter().zip(b).map(|(x, y)| x * y).sum();
            w.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
        }
        let n = norm(&w);
        if n > 1e-6 * norm(o).max(1e-30) {
            basis.push(w.iter().map(|x| x / n).collect());
        }
    }
    let mut out = v.to_vec();
    for b in &basis {
        let c: f32 = out.iter().zip(b).map(|(x, y)| x * y).sum();
        out.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::reject;

    #[test]
    fn reject_leaves_what_the_others_do_not_span() {
        let v = [1.0, 2.0, 3.0];
        let out = reject(&v, &[&[1.0, 0.0, 0.0], &[1.0, 1.0, 0.0], &[2.0, 2.0, 0.0]]);
        assert!(out[0].abs() < 1e-6 && out[1].abs() < 1e-6 && (out[2] - 3.0).abs() < 1e-6);
    }
}
