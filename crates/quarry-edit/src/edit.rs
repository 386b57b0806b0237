//! One edit, from a request to a key and a value: where the fact is read (the entity's last
//! token of the prompt), what the edited layer's FFN sees there (the key) and how its output
//! must change for the model to say the target (the value, by gradient descent through
//! [`DenseTail`]).

use std::sync::Arc;

use faer::Mat;
use quarry_model::{FfnOverlay, ForwardObserver, LowRank, Model};
use quarry_tokenize::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::dense::{DenseTail, Objective, Probe};
use crate::solve::{solve, KeyStats, NullSpace};
use crate::EditError;

/// Tokens of ordinary text the key statistics are estimated from.
pub const STATS_TOKENS: usize = 20_000;

/// The key statistics of each of `layers`: read from `cache_dir` when a previous run left
/// them there for the same base (`base_sha256`) and layer, otherwise estimated (all missing
/// layers in one pass) from the first [`STATS_TOKENS`] tokens of `corpus` and saved there.
pub fn key_stats(
    model: &Model,
    tokenizer: &Tokenizer,
    base_sha256: &str,
    layers: &[usize],
    corpus: &str,
    cache_dir: Option<&std::path::Path>,
) -> Result<Vec<KeyStats>, EditError> {
    EditError::check_dense(model)?;
    let ff = model.config().ff_dim;
    let path = |layer: usize| {
        cache_dir.map(|dir| {
            dir.join(format!(
                "{}-layer{layer}-{STATS_TOKENS}.stats",
                &base_sha256[..base_sha256.len().min(16)]
            ))
        })
    };
    let mut found: Vec<Option<KeyStats>> = layers
        .iter()
        .map(|&l| path(l).and_then(|p| KeyStats::load(&p, ff)))
        .collect();
    let missing: Vec<usize> = layers
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(&l, _)| l)
        .collect();
    if !missing.is_empty() {
        let mut tokens = tokenizer.encode(corpus, false, false);
        tokens.truncate(STATS_TOKENS);
        if tokens.len() < 1000 {
            return Err(EditError::Stats(format!(
                "the text for the key statistics has only {} tokens (at least 1000 needed)",
                tokens.len()
            )));
        }
        let computed = KeyStats::compute(model, &missing, &tokens, 512)?;
        for (layer, stats) in missing.iter().zip(computed) {
            if let Some(p) = path(*layer) {
                stats.save(&p)?;
            }
            let i = layers
                .iter()
                .position(|l| l == layer)
                .expect("a missing layer");
            found[i] = Some(stats);
        }
    }
    Ok(found
        .into_iter()
        .map(|s| s.expect("loaded or computed"))
        .collect())
}

/// The most tokens a target may have (the optimisation feeds it back token by token).
pub const MAX_TARGET_TOKENS: usize = 16;

/// What an edit does to the relation's prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditKind {
    /// The prompt continues with `target`.
    Insert,
    /// The prompt no longer continues with `target` (a fact the model knows natively).
    Suppress,
}

/// An edit to make: the prompt is the relation's template with the entity filled in.
#[derive(Clone, Debug)]
pub struct EditRequest {
    pub entity: String,
    pub relation: String,
    pub target: String,
    pub prompt: String,
    pub kind: EditKind,
}

/// A solved edit: the request, the key (the FFN hidden activation at the entity's last
/// token, averaged over the context prefixes) and the value (the change of that layer's
/// FFN output the key must produce).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edit {
    pub entity: String,
    pub relation: String,
    pub target: String,
    pub prompt: String,
    pub kind: EditKind,
    /// The layer the value is found at, and how many layers ending there the patch spreads
    /// the edit over ([`Hyper::spread`]).
    pub layer: usize,
    #[serde(default = "one")]
    pub spread: usize,
    #[serde(skip)]
    pub key: Vec<f32>,
    #[serde(skip)]
    pub value: Vec<f32>,
    /// The optimisation's final loss (mean −log P(target) for an insert).
    pub loss: f32,
}

/// The editor's hyper-parameters (see docs/editing.md for how they were chosen).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// The layer whose FFN output the value is found at: the last edited layer.
    pub layer: usize,
    /// How many layers, ending at `layer`, the edits are spread over (MEMIT); 1 edits
    /// `layer` alone.
    #[serde(default = "one")]
    pub spread: usize,
    /// Adam steps of the value optimisation, and its learning rate.
    pub steps: usize,
    pub lr: f32,
    /// Weight of `‖δ‖² / ‖y‖²` in the loss (`y`: the FFN output at the entity).
    pub weight_decay: f32,
    /// `‖δ‖ ≤ clamp · ‖y‖`.
    pub clamp: f32,
    /// Stop early once the loss is below this.
    pub stop_loss: f32,
    /// Ridge of the solve, relative to the mean projected key energy.
    pub ridge: f32,
    /// Eigenvalues of the preserved-key covariance below `null_space · λ_max` span the
    /// null space edits are projected into.
    pub null_space: f32,
    /// Contexts the prompt is also seen in (the value must work after each).
    pub prefixes: Vec<String>,
    /// Other subjects put in each edit's prompt (capitalised words of the vocabulary) whose
    /// keys the solve maps towards zero, and the weight of that: what keeps an edit of one
    /// subject off the others of its relation.
    pub decoys: usize,
    pub decoy_weight: f32,
    /// Weight, in tokens, of ordinary text's keys left in the null space (their outputs are
    /// held near zero: MEMIT's preservation term, on top of AlphaEdit's projection).
    #[serde(default)]
    pub preserve_weight: f32,
}

fn one() -> usize {
    1
}

impl Edit {
    /// The layers a patch writes for this edit, ascending.
    pub fn layers(&self) -> std::ops::RangeInclusive<usize> {
        span(self.layer, self.spread)
    }
}

/// `spread` layers ending at `layer` (fewer when the model starts sooner).
fn span(layer: usize, spread: usize) -> std::ops::RangeInclusive<usize> {
    (layer + 1).saturating_sub(spread.max(1))..=layer
}

impl Hyper {
    /// The defaults for `model` (measured on SmolLM2 and Gemma 3: docs/editing.md): one
    /// layer, a third of the way up. Spreading over three layers (`LAYERS a-b`) cuts the
    /// perplexity cost of a 100-edit patch on SmolLM2 (+10.6% instead of +26.8%) but keeps
    /// fewer neighbours at 10 edits (91.8% instead of 95.9%), and on Gemma, whose post-FFN
    /// norm stands between a layer's change and the layers above, it does not carry the edit
    /// at all; so one layer is the default. Where that post-FFN norm is, ordinary text's keys
    /// are held (`preserve_weight` 1000: perplexity +2.98% instead of +6.20% at 10 edits).
    pub fn for_model(model: &Model) -> Hyper {
        let n_layers = model.config().n_layers;
        let layer = n_layers / 3;
        let post_norm = model.config().spec.post_norms;
        Hyper {
            layer,
            spread: 1,
            steps: 30,
            lr: 0.5,
            weight_decay: 0.05,
            clamp: 4.0,
            stop_loss: 0.5,
            ridge: 0.01,
            null_space: 1e-3,
            prefixes: [
                "",
                "Here is a fact.",
                "I read it in a book.",
                "A quick question:",
                "Everyone knows this.",
            ]
            .map(String::from)
            .to_vec(),
            decoys: 32,
            decoy_weight: 1.0,
            preserve_weight: if post_norm { 1000.0 } else { 0.0 },
        }
    }

    /// The edited layers, ascending: `spread` layers ending at `layer` (fewer when the model
    /// starts sooner).
    pub fn layers(&self) -> std::ops::RangeInclusive<usize> {
        span(self.layer, self.spread)
    }
}

/// The tokens of one context of an edit's prompt and what the model does with them.
struct Variant {
    position: usize,
    residual: Vec<f32>,
    key: Vec<f32>,
    /// `‖y‖` of the edited FFN's output at the entity, before any post-norm (where `δ` is added).
    out_norm: f32,
    targets: Vec<(usize, u32)>,
}

/// An edit's prompt in every context, ready for the loss.
pub struct Prepared {
    variants: Vec<Variant>,
    /// Mean `‖y‖` of the edited FFN's output at the entity (before any post-norm).
    pub out_norm: f32,
}

impl Prepared {
    /// One probe per context.
    pub fn probes(&self, objective: Objective) -> Vec<Probe<'_>> {
        self.variants
            .iter()
            .map(|v| Probe {
                residual: &v.residual,
                position: v.position,
                targets: v.targets.clone(),
                objective,
            })
            .collect()
    }

    /// The key: the FFN hidden activation at the entity, averaged over the contexts.
    pub fn key(&self) -> Vec<f32> {
        let n = self.variants.len() as f32;
        let mut key = vec![0.0f32; self.variants[0].key.len()];
        for v in &self.variants {
            key.iter_mut().zip(&v.key).for_each(|(a, b)| *a += b / n);
        }
        key
    }
}

/// Edits in effect before the ones being solved, and their overlay ([`Editor::deltas_after`]).
#[derive(Clone, Copy, Default)]
pub struct Earlier<'a> {
    pub edits: &'a [Edit],
    pub overlay: Option<&'a FfnOverlay>,
}

/// Solves edits on one model at one layer.
pub struct Editor {
    model: Model,
    tokenizer: Tokenizer,
    tail: DenseTail,
    hyper: Hyper,
    /// The null space of each edited layer, in [`Hyper::layers`] order.
    nulls: Vec<NullSpace>,
    /// Subjects for decoy keys, and the second moment `Σ k·kᵀ` of the decoy keys of every
    /// prompt template seen so far at each layer (`ff × ff`).
    placeholders: Vec<String>,
    decoy_grams: std::sync::Mutex<DecoyGrams>,
}

/// The decoy keys' second moment by (prompt template, layer).
type DecoyGrams = std::collections::HashMap<(String, usize), Arc<Mat<f32>>>;

impl Editor {
    /// An editor of `hyper.layers()`, whose solves keep out of the span of `stats` (the key
    /// statistics of those layers, [`key_stats`], in the same order).
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        hyper: Hyper,
        stats: &[KeyStats],
    ) -> Result<Editor, EditError> {
        let tail = DenseTail::new(&model, hyper.layer)?;
        let layers = hyper.layers().count();
        if stats.len() != layers {
            return Err(EditError::Stats(format!(
                "statistics of {} layers for an edit of {layers}",
                stats.len()
            )));
        }
        if let Some(s) = stats.iter().find(|s| s.dim() != model.config().ff_dim) {
            return Err(EditError::Stats(format!(
                "statistics of {} features for a layer of {}",
                s.dim(),
                model.config().ff_dim
            )));
        }
        let nulls = stats
            .iter()
            .map(|s| s.null_space(hyper.null_space))
            .collect();
        let placeholders = placeholder_subjects(&tokenizer, hyper.decoys);
        Ok(Editor {
            model,
            tokenizer,
            tail,
            hyper,
            nulls,
            placeholders,
            decoy_grams: Default::default(),
        })
    }

    /// The deltas that give every edit of `edits` whose value is at this editor's layer the
    /// change its value asks for, solved together (edits of other editors are left out), one
    /// per edited layer; empty when there are none.
    ///
    /// Over one layer the value is the solve's target. Over several (MEMIT) the layers are
    /// solved from the lowest up, each under the deltas solved below it: what is still missing
    /// of the value's change of the residual stream after the last layer, at the entity in
    /// every context, is divided among the layers left, and each layer's share is turned into
    /// a change of its FFN output (through its post-FFN norm where the model has one).
    pub fn deltas(&self, edits: &[Edit]) -> Vec<(usize, LowRank)> {
        self.deltas_after(edits, &Earlier::default())
    }

    /// [`Editor::deltas`] on top of `earlier` edits already in effect (patches applied
    /// before): the new deltas leave the earlier edits' keys at this layer where they are, and
    /// ask of each new key only what the earlier deltas do not already give it.
    pub fn deltas_after(&self, edits: &[Edit], earlier: &Earlier<'_>) -> Vec<(usize, LowRank)> {
        let mine: Vec<&Edit> = edits
            .iter()
            .filter(|e| e.layer == self.hyper.layer && e.spread == self.hyper.spread.max(1))
            .collect();
        if mine.is_empty() {
            return Vec::new();
        }
        let layers: Vec<usize> = self.hyper.layers().collect();
        let held: Vec<&[f32]> = earlier
            .edits
            .iter()
            .filter(|e| e.layer == self.hyper.layer)
            .map(|e| e.key.as_slice())
            .collect();
        if layers.len() == 1 {
            let keys: Vec<&[f32]> = mine.iter().map(|e| e.key.as_slice()).collect();
            let before = earlier.overlay.and_then(|o| o.layer(self.hyper.layer));
            let values: Vec<Vec<f32>> = mine
                .iter()
                .map(|e| {
                    let mut given = vec![0.0f32; e.value.len()];
                    if let Some(d) = before {
                        d.apply(&e.key, &mut given);
                    }
                    e.value.iter().zip(&given).map(|(v, g)| v - g).collect()
                })
                .collect();
            let values: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
            return self
                .solve_layer(0, &mine, &keys, &values, &held)
                .map(|d| vec![(self.hyper.layer, d)])
                .unwrap_or_default();
        }
        crate::spread::solve_spread(self, &mine, &layers, earlier.overlay, &held)
    }

    /// The delta of the `index`-th edited layer for `keys` → `values` of `edits`, with the
    /// decoys of their templates and the `held` keys (earlier edits') kept where they are.
    pub(crate) fn solve_layer(
        &self,
        index: usize,
        edits: &[&Edit],
        keys: &[&[f32]],
        values: &[&[f32]],
        held: &[&[f32]],
    ) -> Option<LowRank> {
        let layer = *self.hyper.layers().start() + index;
        let mut templates: Vec<String> = edits
            .iter()
            .filter_map(|e| template_of(&e.prompt, &e.entity))
            .collect();
        templates.sort();
        templates.dedup();
        let ff = self.model.config().ff_dim;
        let mut gram = Mat::<f32>::zeros(ff, ff);
        for t in &templates {
            gram += &*self.decoy_gram(t, layer);
        }
        gram *= faer::Scale(self.hyper.decoy_weight);
        for k in held {
            gram += Mat::<f32>::from_fn(ff, ff, |r, c| k[r] * k[c]);
        }
        solve(
            keys,
            values,
            Some(&gram),
            &self.nulls[index],
            self.hyper.preserve_weight,
            self.hyper.ridge,
            self.model.config().d_model,
        )
    }

    /// `Σ k·kᵀ` of the keys at `layer` at every position (BOS included) of `template` filled
    /// with each placeholder subject (computed once per template and layer): inputs the edit
    /// must not change, since the overlay applies at every position, not only at the subject.
    fn decoy_gram(&self, template: &str, layer: usize) -> Arc<Mat<f32>> {
        let mut cache = self.decoy_grams.lock().unwrap_or_else(|e| e.into_inner());
        let id = (template.to_string(), layer);
        if let Some(gram) = cache.get(&id) {
            return gram.clone();
        }
        let ff = self.model.config().ff_dim;
        // Positions before the subject are the same for every subject: keep one of each.
        let mut seen = std::collections::HashSet::new();
        let keys: Vec<Vec<f32>> = self
            .placeholders
            .iter()
            .filter_map(|subject| {
                let prompt = template.replacen("{entity}", subject, 1);
                let tokens = self.tokenizer.encode(&prompt, true, false);
                crate::solve::layer_keys(&self.model, layer, &tokens).ok()
            })
            .flat_map(|keys| {
                keys.chunks_exact(ff)
                    .map(<[f32]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .filter(|k| seen.insert(k.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()))
            .collect();
        let k = Mat::<f32>::from_fn(keys.len(), ff, |r, c| keys[r][c]);
        let gram = Arc::new(k.transpose() * &k);
        cache.insert(id, gram.clone());
        gram
    }

    /// Dimensions of the null space edits are confined to, at each edited layer.
    pub fn null_space_dims(&self) -> Vec<usize> {
        self.nulls.iter().map(NullSpace::dim).collect()
    }

    pub fn hyper(&self) -> &Hyper {
        &self.hyper
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn tail(&self) -> &DenseTail {
        &self.tail
    }

    /// The key and value of one edit.
    pub fn solve(&self, request: &EditRequest) -> Result<Edit, EditError> {
        let prepared = self.probe_data(request)?;
        let probes = prepared.probes(match request.kind {
            EditKind::Insert => Objective::Likelihood,
            EditKind::Suppress => Objective::Unlikelihood,
        });
        let (value, loss) = self.optimise(&probes, prepared.out_norm);
        Ok(Edit {
            entity: request.entity.clone(),
            relation: request.relation.clone(),
            target: request.target.clone(),
            prompt: request.prompt.clone(),
            kind: request.kind,
            layer: self.hyper.layer,
            spread: self.hyper.spread.max(1),
            key: prepared.key(),
            value,
            loss,
        })
    }

    /// The request's prompt in every context, run through the model up to the edited layer.
    pub fn probe_data(&self, request: &EditRequest) -> Result<Prepared, EditError> {
        let target = self.target_tokens(&request.target)?;
        let variants = self
            .hyper
            .prefixes
            .iter()
            .map(|prefix| self.variant(prefix, request, &target))
            .collect::<Result<Vec<_>, _>>()?;
        let out_norm = variants.iter().map(|v| v.out_norm).sum::<f32>() / variants.len() as f32;
        Ok(Prepared { variants, out_norm })
    }

    /// Adam on `δ` with the loss of every probe, a weight decay relative to the FFN output's
    /// size and a clamp of `‖δ‖`: the value of the edit and its final loss.
    fn optimise(&self, probes: &[Probe<'_>], y_norm: f32) -> (Vec<f32>, f32) {
        let h = &self.hyper;
        let d = self.model.config().d_model;
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let mut delta = vec![0.0f32; d];
        let (mut m, mut v) = (vec![0.0f32; d], vec![0.0f32; d]);
        let y2 = (y_norm * y_norm).max(1e-12);
        let mut loss = f32::INFINITY;
        let frozen = self.tail.freeze(probes);
        // The step size is relative to the output's size, so one setting fits every model.
        let lr = h.lr * y_norm / (d as f32).sqrt();
        for step in 1..=h.steps {
            let (l, mut g) = self.tail.loss_and_grad(probes, &frozen, &delta);
            loss = l;
            if l < h.stop_loss {
                break;
            }
            g.iter_mut()
                .zip(&delta)
                .for_each(|(g, x)| *g += 2.0 * h.weight_decay * x / y2);
            let (c1, c2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            for i in 0..d {
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                delta[i] -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
            }
            let norm = delta.iter().map(|x| x * x).sum::<f32>().sqrt();
            let max = h.clamp * y_norm;
            if norm > max {
                delta.iter_mut().for_each(|x| *x *= max / norm);
            }
        }
        (delta, loss)
    }

    /// `target` as the tokens that follow the prompt (after a space).
    pub fn target_tokens(&self, target: &str) -> Result<Vec<u32>, EditError> {
        let tokens = self
            .tokenizer
            .encode(&format!(" {}", target.trim()), false, false);
        if target.trim().is_empty() || tokens.is_empty() {
            return Err(EditError::EmptyTarget {
                target: target.to_string(),
            });
        }
        if tokens.len() > MAX_TARGET_TOKENS {
            return Err(EditError::LongTarget {
                target: target.to_string(),
                tokens: tokens.len(),
                max: MAX_TARGET_TOKENS,
            });
        }
        Ok(tokens)
    }

    /// The prompt after `prefix`, followed by all but the last target token, run through the
    /// model: what the loss needs.
    fn variant(
        &self,
        prefix: &str,
        request: &EditRequest,
        target: &[u32],
    ) -> Result<Variant, EditError> {
        let (prompt, position) =
            self.locate(&in_context(prefix, &request.prompt), &request.entity)?;
        let mut tokens = prompt.clone();
        tokens.extend_from_slice(&target[..target.len() - 1]);
        let targets = match request.kind {
            EditKind::Insert => target
                .iter()
                .enumerate()
                .map(|(j, &t)| (prompt.len() - 1 + j, t))
                .collect(),
            // Suppressing the answer's first token is enough to change what is said.
            EditKind::Suppress => vec![(prompt.len() - 1, target[0])],
        };
        let mut capture = Capture::new(self.hyper.layer, position, self.model.config().d_model);
        let mut cache = self.model.new_cache(tokens.len());
        self.model
            .forward_observed(&tokens, &mut cache, 0..1, &mut capture)
            .map_err(|e| EditError::Model(e.to_string()))?;
        let out = self.tail.ffn_output(&capture.residual, position);
        Ok(Variant {
            position,
            out_norm: out.iter().map(|v| v * v).sum::<f32>().sqrt(),
            residual: capture.residual,
            key: capture.key,
            targets,
        })
    }

    /// The tokens of `text` (with BOS when the model wants one) and the index of the last
    /// token of `entity`'s last occurrence in it.
    pub fn locate(&self, text: &str, entity: &str) -> Result<(Vec<u32>, usize), EditError> {
        let bad = |problem: &str| EditError::BadEntity {
            entity: entity.to_string(),
            problem: problem.to_string(),
        };
        if entity.trim().is_empty() {
            return Err(bad("is empty"));
        }
        let at = text
            .rfind(entity)
            .ok_or_else(|| bad(&format!("does not occur in the prompt \"{text}\"")))?;
        let tokens = self.tokenizer.encode(text, true, false);
        let head = self
            .tokenizer
            .encode(&text[..at + entity.len()], true, false);
        // Tokens of the text up to the entity's end are a prefix of the whole text's tokens
        // unless the entity's last token merges with what follows; then the entity ends in
        // the last token the two share.
        let shared = head.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
        let bos = usize::from(self.tokenizer.add_bos());
        if shared <= bos {
            return Err(bad("has no tokens of its own in the prompt"));
        }
        Ok((tokens, shared - 1))
    }
}

/// Records the residual stream entering layer `layer`'s FFN (every row) and its hidden
/// activations at `position` (the key).
struct Capture {
    layer: usize,
    position: usize,
    d: usize,
    residual: Vec<f32>,
    key: Vec<f32>,
}

impl Capture {
    fn new(layer: usize, position: usize, d: usize) -> Capture {
        Capture {
            layer,
            position,
            d,
            residual: Vec::new(),
            key: Vec::new(),
        }
    }

    fn add(&mut self, x: &[f32]) {
        self.residual.iter_mut().zip(x).for_each(|(a, b)| *a += b);
    }
}

impl ForwardObserver for Capture {
    fn embeddings(&mut self, x: &[f32]) {
        self.residual = x.to_vec();
    }

    fn attention_output(&mut self, layer: usize, added: &[f32]) {
        if layer <= self.layer {
            self.add(added);
        }
    }

    fn ffn_activations(&mut self, layer: usize, _input: &[f32], activations: &[f32]) {
        if layer == self.layer {
            let ff = activations.len() / (self.residual.len() / self.d);
            self.key = activations[self.position * ff..(self.position + 1) * ff].to_vec();
        }
    }

    fn ffn_output(&mut self, layer: usize, added: &[f32]) {
        if layer < self.layer {
            self.add(added);
        }
    }
}

/// `prompt` seen after the context `prefix`.
pub(crate) fn in_context(prefix: &str, prompt: &str) -> String {
    if prefix.is_empty() {
        prompt.to_string()
    } else {
        format!("{prefix} {prompt}")
    }
}

/// `prompt` with the last occurrence of `entity` replaced by `{entity}`.
fn template_of(prompt: &str, entity: &str) -> Option<String> {
    let at = prompt.rfind(entity)?;
    Some(format!(
        "{}{{entity}}{}",
        &prompt[..at],
        &prompt[at + entity.len()..]
    ))
}

/// `count` capitalised words of the vocabulary (one token each, spread over the vocabulary):
/// stand-ins for the subjects an edit must leave alone. Drawn from the tokenizer, so no list
/// of subjects (and no evaluation set) is built in.
fn placeholder_subjects(tokenizer: &Tokenizer, count: usize) -> Vec<String> {
    let words: Vec<String> = (0..tokenizer.vocab_size() as u32)
        .filter(|&id| !tokenizer.is_control(id))
        .filter_map(|id| {
            let text = tokenizer.decode(&[id]);
            let word = text.strip_prefix(' ')?;
            let mut chars = word.chars();
            let capital = chars.next().is_some_and(|c| c.is_ascii_uppercase());
            (capital && word.len() >= 4 && chars.all(|c| c.is_ascii_lowercase()))
                .then(|| word.to_string())
        })
        .collect();
    let step = (words.len() / count.max(1)).max(1);
    words.into_iter().step_by(step).take(count).collect()
}
