//! Queries answered from the vindex alone, without a forward pass: what an entity's
//! embedding activates in each layer's FFN, and where those features push the vocabulary.
//!
//! # The method (and the RAW one it is compared with)
//!
//! An FFN reads the residual through its pre-FFN norm, so a layer is asked with what it would
//! actually see: the entity's embedding (scaled by the model's `embed_scale`) through that
//! layer's RMS norm. Each feature's activation is the model's own `act(gate · x) · (up · x)`,
//! signed; its effect on token `t` is `activation × logit_t`, where `logit_t` is what one unit
//! of the feature adds to `t` through the post-FFN norm gains, final norm gains and output
//! head (stored at extraction). A negative activation pushes the feature's *lowest* tokens up,
//! so both ends of every projection are kept. Features are ranked by the effect on the token
//! they move most.
//!
//! In a mixture of experts a feature is one hidden unit of one expert, and an expert runs only
//! on the inputs its layer's router sends it: the stored router (the model's own routing
//! rule over the model's own rows) picks the experts for the normalized input, and only their
//! features (and the shared expert's) fire, each scaled by its expert's routing weight, as
//! the forward pass scales their output.
//!
//! RAW mode reproduces the common shortcut: the raw embedding dotted with the raw gate rows,
//! features ranked by `|gate · e|`, each contributing its top tokens weighted by that score.

use std::collections::HashMap;

use quarry_kernels::vec::{gelu_tanh_mul, silu_mul};
use quarry_model::ops::rms_norm;
use quarry_vindex::{TokenLogit, Vindex};

/// Features kept per layer when collecting edges.
pub(crate) const FEATURES_PER_LAYER: usize = 16;

/// An entity as browsing queries it.
pub(crate) struct Entity {
    /// Its tokens as it appears inside a sentence (after a space).
    pub ids: Vec<u32>,
    /// The sum of their stored embeddings (what RAW mode dots with the gate rows).
    pub raw_sum: Vec<f32>,
    /// The mean of their embeddings scaled like the model's input.
    pub input: Vec<f32>,
}

pub(crate) fn entity_input(v: &Vindex, entity: &str) -> Option<Entity> {
    let tok = v.tokenizer();
    let mut ids = tok.encode(&format!(" {entity}"), false, false);
    // A tokenizer that splits the space off on its own adds a token that is not the entity.
    if ids.len() > 1 && tok.decode(&ids[..1]).trim().is_empty() {
        ids.remove(0);
    }
    if ids.is_empty() {
        return None;
    }
    let mut raw_sum = vec![0.0f32; v.index().model.d_model];
    for &id in &ids {
        raw_sum
            .iter_mut()
            .zip(v.embedding(id))
            .for_each(|(a, b)| *a += b);
    }
    let scale = v.index().model.embed_scale / ids.len() as f32;
    let input = raw_sum.iter().map(|a| a * scale).collect();
    Some(Entity {
        ids,
        raw_sum,
        input,
    })
}

/// The band (`syntax`, `knowledge`, `output`) layer `layer` belongs to.
pub(crate) fn band(v: &Vindex, layer: usize) -> &'static str {
    let b = &v.index().bands;
    if layer <= b.syntax[1] {
        "syntax"
    } else if layer <= b.knowledge[1] {
        "knowledge"
    } else {
        "output"
    }
}

/// `x` through layer `layer`'s pre-FFN RMS norm (as it is, where the FFN reads the residual).
pub(crate) fn ffn_input(v: &Vindex, layer: usize, x: &[f32]) -> Vec<f32> {
    let mut xn = x.to_vec();
    if !v.index().model.ffn_reads_residual {
        rms_norm(&mut xn, v.norm(layer), v.index().model.norm_eps);
    }
    xn
}

/// One feature's response to an input.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Firing {
    pub layer: usize,
    pub feature: usize,
    pub gate: f32,
    pub up: f32,
    pub activation: f32,
    /// What the ranking weighs the feature's writes by: the activation's z-score against the
    /// feature's baseline when browsing, the activation itself on a real residual.
    pub weight: f32,
}

/// Every feature of `layer` that runs on the normalized input `xn`: all of a dense FFN's; in
/// a mixture of experts those of the experts the router picks for `xn` (and of the shared
/// expert), their activations and z-scores times their expert's routing weight.
pub(crate) fn fire(v: &Vindex, layer: usize, xn: &[f32]) -> Vec<Firing> {
    let gate = v.gate_scores(layer, xn);
    let up = v.up_scores(layer, xn);
    let routing = v.feature_weights(layer, xn);
    let mut act = gate.clone();
    if v.index().model.activation == "silu" {
        silu_mul(&mut act, &up);
    } else {
        gelu_tanh_mul(&mut act, &up);
    }
    (0..gate.len())
        .filter(|&f| routing[f] != 0.0)
        .map(|f| {
            let (mean, std) = v.activation_stats(layer, f);
            Firing {
                layer,
                feature: f,
                gate: gate[f],
                up: up[f],
                activation: routing[f] * act[f],
                weight: routing[f] * (act[f] - mean) / std.max(1e-6),
            }
        })
        .collect()
}

/// The tokens a firing feature pushes up, with its weighted effect on each: the top of its
/// projection for a positive weight, the bottom for a negative one.
pub(crate) fn pushes(v: &Vindex, firing: &Firing) -> Vec<(u32, f32)> {
    let (top, bottom) = v.writes(firing.layer, firing.feature);
    let side: &[TokenLogit] = if firing.weight >= 0.0 { top } else { bottom };
    side.iter()
        .map(|r| (r.token, firing.weight * r.logit))
        .collect()
}

/// How strongly a firing feature moves the vocabulary: its effect on the token it moves most.
pub(crate) fn strength(v: &Vindex, firing: &Firing) -> f32 {
    pushes(v, firing).first().map_or(0.0, |&(_, e)| e)
}

/// The `n` strongest features of `layer` for the normalized input `xn`, strongest first.
pub(crate) fn strongest(v: &Vindex, layer: usize, xn: &[f32], n: usize) -> Vec<(Firing, f32)> {
    let mut ranked: Vec<(Firing, f32)> = fire(v, layer, xn)
        .into_iter()
        .map(|f| {
            let s = strength(v, &f);
            (f, s)
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(n);
    ranked
}

/// One token reached from an entity, with the summed effect of the features reaching it.
#[derive(Clone, Debug)]
pub(crate) struct Edge {
    pub token: u32,
    pub score: f32,
    /// The feature contributing most, as (layer, feature, its share).
    pub best: (usize, usize, f32),
    pub features: usize,
}

/// Edges from the entity input `x` over `layers`, by our method or the RAW one, best first.
pub(crate) fn edges(
    v: &Vindex,
    x: &[f32],
    raw_embedding: &[f32],
    layers: impl Iterator<Item = usize>,
    raw: bool,
) -> Vec<Edge> {
    let mut by_token: HashMap<u32, Edge> = HashMap::new();
    let mut add = |token: u32, share: f32, layer: usize, feature: usize| {
        let e = by_token.entry(token).or_insert(Edge {
            token,
            score: 0.0,
            best: (layer, feature, f32::NEG_INFINITY),
            features: 0,
        });
        e.score += share;
        e.features += 1;
        if share > e.best.2 {
            e.best = (layer, feature, share);
        }
    };
    for layer in layers {
        if raw {
            let scores = v.gate_scores(layer, raw_embedding);
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()));
            for &f in order.iter().take(FEATURES_PER_LAYER) {
                let (top, _) = v.writes(layer, f);
                for r in top {
                    add(r.token, scores[f].abs() * r.logit, layer, f);
                }
            }
        } else {
            let xn = ffn_input(v, layer, x);
            for (firing, _) in strongest(v, layer, &xn, FEATURES_PER_LAYER) {
                for (token, effect) in pushes(v, &firing) {
                    add(token, effect, layer, firing.feature);
                }
            }
        }
    }
    let mut edges: Vec<Edge> = by_token.into_values().collect();
    edges.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.token.cmp(&b.token)));
    edges
}
