//! DESCRIBE with the model (an `inference`-level vindex): what the FFNs write at the entity's
//! own position in a real forward pass, beyond what they write for similar words.
//!
//! The entity is run through the model after BOS, as is each of its [`NEIGHBOURS`] nearest
//! whole words in embedding space (cosine over the first whole-word tokens of the
//! vocabulary). Per layer of the scope, each feature's activation at the entity's last token
//! minus its mean over the neighbours is what this entity turns on and its kind of word does
//! not: "France" and its neighbours ("Germany", "Spain", …) all fire country features, which
//! cancel, while what is particular to France remains. Those activation changes times what
//! each feature writes (its down column, through the post-FFN and final norms' gains: the
//! norms' scales are positive numbers common to all features, so they do not reorder
//! anything) are summed over the scope and read through the output head; the edges are the
//! whole words raised most, spellings that differ only by case counted once (under the
//! commonest spelling: the lowest id). Each edge names the layer that raised it most and,
//! in that layer, the feature that did, and counts the features of that layer that raised it.

use std::collections::HashMap;

use quarry_model::Model;
use quarry_vindex::relations::{candidate_words, is_word};
use quarry_vindex::Vindex;

use crate::browse::{Edge, Entity};
use crate::trace::run;

/// Neighbouring words the entity is contrasted with.
pub(crate) const NEIGHBOURS: usize = 64;

/// Per layer, the feature activations at the last token of `text` in a forward pass.
fn activations(v: &Vindex, model: &Model, text: &str) -> Result<Vec<Vec<f32>>, String> {
    Ok(run(model, v.tokenizer(), text)?.pieces.activations)
}

/// The `n` whole words nearest to the entity's embedding (cosine), other than its own
/// spellings.
pub(crate) fn neighbours(v: &Vindex, entity: &Entity, n: usize) -> Vec<u32> {
    let tok = v.tokenizer();
    let own = tok.decode(&entity.ids).trim().to_lowercase();
    let norm = |x: &[f32]| x.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
    let target = norm(&entity.raw_sum);
    let mut scored: Vec<(f32, u32)> = candidate_words(tok, v.index().model.vocab_size)
        .into_iter()
        .filter(|&id| tok.decode(&[id]).trim().to_lowercase() != own)
        .map(|id| {
            let e = v.embedding(id);
            let dot: f32 = e.iter().zip(&entity.raw_sum).map(|(a, b)| a * b).sum();
            (dot / (norm(&e) * target), id)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(n).map(|(_, id)| id).collect()
}

/// The entity's edges over `layers`, best first (at most `limit`), and the neighbours used.
pub(crate) fn edges(
    v: &Vindex,
    model: &Model,
    entity: &Entity,
    text: &str,
    layers: &[usize],
    limit: usize,
) -> Result<(Vec<Edge>, Vec<u32>), String> {
    let cfg = model.config();
    let d = cfg.d_model;
    let near = neighbours(v, entity, NEIGHBOURS);
    let own = activations(v, model, text)?;
    let mut mean: Vec<Vec<f32>> = own.iter().map(|a| vec![0.0f32; a.len()]).collect();
    for &id in &near {
        let acts = activations(v, model, v.tokenizer().decode(&[id]).trim())?;
        for &l in layers {
            add_scaled(&mut mean[l], &acts[l], 1.0 / near.len() as f32);
        }
    }
    // Per layer of the scope: the activation changes, and what they write through the gains.
    let changes: Vec<Vec<f32>> = layers
        .iter()
        .map(|&l| own[l].iter().zip(&mean[l]).map(|(a, m)| a - m).collect())
        .collect();
    let deltas: Vec<Vec<f32>> = layers
        .iter()
        .zip(&changes)
        .map(|(&l, change)| {
            let w = model.ffn_features(l);
            let mut y = w.write(change);
            for (j, y) in y.iter_mut().enumerate() {
                *y *= model.output_norm()[j] * w.post_norm.map_or(1.0, |p| p[j]);
            }
            y
        })
        .collect();
    let mut total = vec![0.0f32; d];
    for delta in &deltas {
        add_scaled(&mut total, delta, 1.0);
    }
    let head = model.output_head();
    let mut logits = vec![0.0f32; head.rows()];
    quarry_kernels::matmul(&head, &total, 1, &mut logits);

    let tok = v.tokenizer();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let mut picked: Vec<(u32, f32)> = Vec::new();
    let mut by_spelling: HashMap<String, usize> = HashMap::new();
    for id in order {
        let text = tok.decode(&[id]);
        if !is_word(&text) {
            continue;
        }
        let key = text.trim().to_lowercase();
        if by_spelling.contains_key(&key) {
            continue;
        }
        by_spelling.insert(key.clone(), picked.len());
        picked.push((
            commonest_spelling(v, &key).unwrap_or(id).min(id),
            logits[id as usize],
        ));
        if picked.len() == limit {
            break;
        }
    }

    // Per edge, the layer of the scope that raised its token most, and what one unit of each
    // of that layer's features adds to the token (post-FFN and final gains; the norms'
    // scales are positive and common to all features).
    let mut head_row = vec![0.0f32; d];
    let mut best = Vec::with_capacity(picked.len());
    for &(id, _) in &picked {
        head.dequantize_row(id as usize, &mut head_row);
        let dot = |x: &[f32]| x.iter().zip(&head_row).map(|(a, b)| a * b).sum::<f32>();
        let (at, share) = deltas
            .iter()
            .enumerate()
            .map(|(i, delta)| (i, dot(delta)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("the scope has layers");
        let post = model.ffn_features(layers[at]).post_norm;
        let k: Vec<f64> = (0..d)
            .map(|j| (head_row[j] * model.output_norm()[j] * post.map_or(1.0, |p| p[j])) as f64)
            .collect();
        best.push((at, share, k));
    }
    // Each layer's down matrices are decoded once for all the edges it is best for.
    let mut per_unit: Vec<Vec<f64>> = vec![Vec::new(); picked.len()];
    for (at, &layer) in layers.iter().enumerate() {
        let edges: Vec<usize> = (0..best.len()).filter(|&e| best[e].0 == at).collect();
        if edges.is_empty() {
            continue;
        }
        let ks: Vec<&[f64]> = edges.iter().map(|&e| &best[e].2[..]).collect();
        let units = model.ffn_features(layer).read_back(&ks);
        for (&e, units) in edges.iter().zip(units) {
            per_unit[e] = units;
        }
    }
    let mut found = Vec::with_capacity(picked.len());
    for ((&(id, score), (at, best_share, _)), units) in picked.iter().zip(&best).zip(&per_unit) {
        let shares: Vec<f64> = units
            .iter()
            .zip(&changes[*at])
            .map(|(u, &c)| u * c as f64)
            .collect();
        let feature = (0..shares.len())
            .max_by(|&a, &b| shares[a].total_cmp(&shares[b]))
            .expect("layers have features");
        found.push(Edge {
            token: id,
            score,
            best: (layers[*at], feature, *best_share),
            features: shares.iter().filter(|&&s| s > 0.0).count(),
        });
    }
    Ok((found, near))
}

/// The lowest token id among the single-token spellings of `word` (lower case, capitalized,
/// upper case) after a space: the commonest in vocabularies ordered by frequency.
fn commonest_spelling(v: &Vindex, word: &str) -> Option<u32> {
    let mut capitalized: String = word.chars().take(1).flat_map(char::to_uppercase).collect();
    capitalized.extend(word.chars().skip(1));
    [word.to_string(), capitalized, word.to_uppercase()]
        .iter()
        .filter_map(
            |w| match v.tokenizer().encode(&format!(" {w}"), false, false)[..] {
                [id] => Some(id),
                _ => None,
            },
        )
        .min()
}

fn add_scaled(acc: &mut [f32], x: &[f32], k: f32) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a += k * b);
}
