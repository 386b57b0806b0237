//! Spreading a patch over several layers (MEMIT, Meng et al. 2023).
//!
//! One layer holds a handful of jointly solved facts well, but the change a hundred facts ask
//! of a single down projection is large enough to disturb ordinary text. Dividing each fact's
//! change among `L` consecutive layers asks each layer for `1/L` of it; the layers are solved
//! from the lowest up, each under the deltas already solved below it (they move the keys and
//! the residual stream the layers above see), each taking its share of what is still missing
//! at the last layer. The value found at the last layer is turned into a change of the
//! residual stream there, the quantity the layers share; each layer's share is turned back
//! into a change of its own FFN output, through its post-FFN norm where the model has one.

use std::sync::Arc;

use quarry_model::{FfnOverlay, ForwardObserver, LowRank};

use crate::edit::{in_context, Edit, Editor};
use crate::patch::stack;

/// The deltas of `layers` (ascending, the last one the edits' value layer) for `edits`, on
/// top of the `earlier` overlay, keeping the `held` keys of the last layer where they are.
pub(crate) fn solve_spread(
    editor: &Editor,
    edits: &[&Edit],
    layers: &[usize],
    earlier: Option<&FfnOverlay>,
    held: &[&[f32]],
) -> Vec<(usize, LowRank)> {
    let model = editor.model();
    let cfg = model.config();
    let (d, ff, eps) = (cfg.d_model, cfg.ff_dim, cfg.norm_eps);
    let top = *layers.last().expect("at least one layer");
    let top_norm = model.ffn_weights(top).post_norm;
    // Each edit's prompt in every context: its tokens and the entity's position.
    let contexts: Vec<Vec<(Vec<u32>, usize)>> = edits
        .iter()
        .map(|e| {
            editor
                .hyper()
                .prefixes
                .iter()
                .filter_map(|p| editor.locate(&in_context(p, &e.prompt), &e.entity).ok())
                .collect()
        })
        .collect();
    // The residual stream after the last layer each edit wants, per context: the base
    // model's plus what the value (found on the base) adds there.
    let wanted: Vec<Vec<Option<Vec<f32>>>> = edits
        .iter()
        .zip(&contexts)
        .map(|(e, ctxs)| {
            ctxs.iter()
                .map(|(tokens, position)| {
                    let mut seen = Seen::new(top, top, *position, d, ff);
                    let mut cache = model.new_cache(tokens.len());
                    model
                        .forward_observed(tokens, &mut cache, 0..1, &mut seen)
                        .ok()?;
                    let shifted: Vec<f32> = seen
                        .top_y
                        .iter()
                        .zip(&e.value)
                        .map(|(a, b)| a + b)
                        .collect();
                    let before = through_norm(top_norm, &seen.top_y, eps);
                    let after = through_norm(top_norm, &shifted, eps);
                    Some(
                        (0..d)
                            .map(|k| seen.residual[k] + after[k] - before[k])
                            .collect(),
                    )
                })
                .collect()
        })
        .collect();
    let mut deltas: Vec<(usize, LowRank)> = Vec::new();
    for (i, &layer) in layers.iter().enumerate() {
        let solved = FfnOverlay::new(cfg.n_layers, deltas.iter().cloned());
        let run = match stack(cfg.n_layers, earlier.into_iter().chain([&solved])) {
            None => model.clone(),
            Some(overlay) => match model.with_overlay(Some(Arc::new(overlay))) {
                Ok(m) => m,
                Err(_) => return deltas,
            },
        };
        let norm = model.ffn_weights(layer).post_norm;
        let left = (layers.len() - i) as f32;
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        for (ctxs, wanted) in contexts.iter().zip(&wanted) {
            let (mut key, mut value) = (vec![0.0f32; ff], vec![0.0f32; d]);
            let mut seen_contexts = 0usize;
            for ((tokens, position), wanted) in ctxs.iter().zip(wanted) {
                let Some(wanted) = wanted else { continue };
                let mut seen = Seen::new(layer, top, *position, d, ff);
                let mut cache = run.new_cache(tokens.len());
                if run
                    .forward_observed(tokens, &mut cache, 0..1, &mut seen)
                    .is_err()
                {
                    continue;
                }
                let share: Vec<f32> = (0..d)
                    .map(|k| (wanted[k] - seen.residual[k]) / left)
                    .collect();
                let change = norm_input_change(norm, &seen.y, &share, eps);
                key.iter_mut().zip(&seen.key).for_each(|(a, b)| *a += b);
                value.iter_mut().zip(&change).for_each(|(a, b)| *a += b);
                seen_contexts += 1;
            }
            let n = seen_contexts.max(1) as f32;
            key.iter_mut().for_each(|v| *v /= n);
            value.iter_mut().for_each(|v| *v /= n);
            keys.push(key);
            values.push(value);
        }
        let keys: Vec<&[f32]> = keys.iter().map(Vec::as_slice).collect();
        let values: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        let held = if layer == top { held } else { &[] };
        let solved = editor.solve_layer(i, edits, &keys, &values, held);
        if let Some(delta) = solved {
            deltas.push((layer, delta));
        }
    }
    deltas
}

/// `y` through an RMS norm of weight `norm` (unchanged without one): what a layer's FFN adds
/// to the residual stream.
fn through_norm(norm: Option<&[f32]>, y: &[f32], eps: f32) -> Vec<f32> {
    let Some(w) = norm else {
        return y.to_vec();
    };
    let inv = 1.0 / (y.iter().map(|v| v * v).sum::<f32>() / y.len() as f32 + eps).sqrt();
    y.iter().zip(w).map(|(v, w)| v * inv * w).collect()
}

/// The smallest change of `y` that changes what `y` adds to the residual stream through the
/// RMS norm `norm` by `r` (`r` itself without a norm). Through a norm of weight `w` only
/// `w ⊙ v` with `rms(v) = 1` can be added, so the sum asked for, `t = norm(y) + r`, is reached
/// up to its length: every multiple of `u = t / w` gives `t / rms(u)` (the layers above
/// take what is missing). The multiple closest to `y` is taken. Coordinates the norm's
/// weight zeroes cannot be changed and keep `y`'s.
fn norm_input_change(norm: Option<&[f32]>, y: &[f32], r: &[f32], eps: f32) -> Vec<f32> {
    let Some(w) = norm else {
        return r.to_vec();
    };
    let now = through_norm(norm, y, eps);
    let inv = 1.0 / (y.iter().map(|v| v * v).sum::<f32>() / y.len() as f32 + eps).sqrt();
    let u: Vec<f32> = (0..y.len())
        .map(|k| {
            if w[k].abs() > 1e-6 {
                (now[k] + r[k]) / w[k]
            } else {
                y[k] * inv
            }
        })
        .collect();
    let uu = u.iter().map(|v| v * v).sum::<f32>();
    let uy = u.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
    let scale = if uu > 0.0 { uy / uu } else { 0.0 };
    u.iter().zip(y).map(|(u, y)| scale * u - y).collect()
}

/// What one forward pass shows at the entity: the key and FFN projection of the layer being
/// solved, the last layer's FFN projection, and the residual stream after the last layer.
struct Seen {
    layer: usize,
    top: usize,
    position: usize,
    d: usize,
    ff: usize,
    key: Vec<f32>,
    y: Vec<f32>,
    top_y: Vec<f32>,
    residual: Vec<f32>,
}

impl Seen {
    fn new(layer: usize, top: usize, position: usize, d: usize, ff: usize) -> Seen {
        Seen {
            layer,
            top,
            position,
            d,
            ff,
            key: Vec::new(),
            y: Vec::new(),
            top_y: Vec::new(),
            residual: vec![0.0; d],
        }
    }

    fn row<'a>(&self, x: &'a [f32], width: usize) -> &'a [f32] {
        &x[self.position * width..(self.position + 1) * width]
    }

    fn add(&mut self, x: &[f32]) {
        let row = &x[self.position * self.d..(self.position + 1) * self.d];
        self.residual.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
}

impl ForwardObserver for Seen {
    fn embeddings(&mut self, x: &[f32]) {
        self.residual = self.row(x, self.d).to_vec();
    }

    fn attention_output(&mut self, layer: usize, added: &[f32]) {
        if layer <= self.top {
            self.add(added);
        }
    }

    fn ffn_activations(&mut self, layer: usize, _input: &[f32], activations: &[f32]) {
        if layer == self.layer {
            self.key = self.row(activations, self.ff).to_vec();
        }
    }

    fn ffn_projection(&mut self, layer: usize, y: &[f32]) {
        if layer == self.layer {
            self.y = self.row(y, self.d).to_vec();
        }
        if layer == self.top {
            self.top_y = self.row(y, self.d).to_vec();
        }
    }

    fn ffn_output(&mut self, layer: usize, added: &[f32]) {
        if layer <= self.top {
            self.add(added);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_norm_input_change_gives_the_residual_change_asked_for() {
        let w = [1.5f32, 0.5, 2.0, 1.0, 0.8];
        let y = [0.3f32, -1.2, 0.7, 2.0, -0.4];
        let r = [0.2f32, 0.1, -0.3, 0.05, 0.4];
        let eps = 1e-6;
        let d = norm_input_change(Some(&w), &y, &r, eps);
        let shifted: Vec<f32> = y.iter().zip(&d).map(|(a, b)| a + b).collect();
        let got = through_norm(Some(&w), &shifted, eps);
        let want: Vec<f32> = through_norm(Some(&w), &y, eps)
            .iter()
            .zip(&r)
            .map(|(a, b)| a + b)
            .collect();
        // Reached up to its length: the norm's output over `w` has an RMS of 1.
        let rms = (want
            .iter()
            .zip(&w)
            .map(|(t, w)| (t / w).powi(2))
            .sum::<f32>()
            / 5.0)
            .sqrt();
        for (g, t) in got.iter().zip(&want) {
            assert!((g - t / rms).abs() < 1e-4, "{got:?} vs {want:?} / {rms}");
        }
        // And of the inputs that reach it, the change is the smallest.
        let norm2 = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        for scale in [0.9f32, 1.1] {
            let other: Vec<f32> = shifted.iter().zip(&y).map(|(s, y)| s * scale - y).collect();
            assert!(norm2(&d) <= norm2(&other));
        }
        assert_eq!(norm_input_change(None, &y, &r, eps), r.to_vec());
    }
}
