//! Queries that run the model: INFER (the next-token distribution), EXPLAIN INFER (the
//! features that fire on the real residual) and TRACE (exact direct-logit attribution).
//!
//! # TRACE's attribution
//!
//! The final logit of token `t` is `head_t · (w ⊙ r) · s` with `r` the last residual, `w` the
//! final norm's gains and `s = 1/rms(r)`. The residual is a sum — the scaled embedding plus
//! what every layer's attention and FFN added — so freezing `s` at its value for the real `r`
//! makes the logit a sum of one term per piece, each `head_t · (w ⊙ piece) · s`. These terms
//! add up to the logit exactly (up to float rounding), which the tests check. DECOMPOSE splits
//! an FFN's term over its features the same way: the FFN's output is `down · a` (then, in
//! Gemma, an RMS norm whose scale is frozen likewise), so feature `f` contributes
//! `a_f · down_f` to it. The logit lens shows, after each layer, the token the partial
//! residual would predict through the final norm (at its own scale) and head.

use quarry_kernels::{matmul, WeightView};
use quarry_model::ops::rms_norm;
use quarry_model::{ForwardObserver, Model};
use quarry_tokenize::Tokenizer;

/// The last row of every piece of one forward pass.
#[derive(Default)]
pub(crate) struct LastRow {
    d: usize,
    pub embedding: Vec<f32>,
    pub attention: Vec<Vec<f32>>,
    pub ffn: Vec<Vec<f32>>,
    /// Per layer: the FFN's normalized input and its feature activations.
    pub ffn_input: Vec<Vec<f32>>,
    pub activations: Vec<Vec<f32>>,
    pub final_residual: Vec<f32>,
}

impl LastRow {
    fn last(&self, rows: &[f32]) -> Vec<f32> {
        rows[rows.len() - self.d..].to_vec()
    }
}

impl ForwardObserver for LastRow {
    fn embeddings(&mut self, x: &[f32]) {
        self.embedding = self.last(x);
    }
    fn attention_output(&mut self, _layer: usize, added: &[f32]) {
        self.attention.push(self.last(added));
    }
    fn ffn_activations(&mut self, _layer: usize, input: &[f32], activations: &[f32]) {
        self.ffn_input.push(self.last(input));
        let ff = activations.len() / (input.len() / self.d);
        self.activations
            .push(activations[activations.len() - ff..].to_vec());
    }
    fn ffn_output(&mut self, _layer: usize, added: &[f32]) {
        self.ffn.push(self.last(added));
    }
    fn final_residual(&mut self, x: &[f32]) {
        self.final_residual = self.last(x);
    }
}

/// A forward pass over `prompt` (tokenized as `quarry run` does) with its pieces recorded.
pub(crate) struct Run {
    pub tokens: Vec<u32>,
    pub pieces: LastRow,
    /// Logits of the last position (after any final soft-cap), as `quarry run` samples them.
    pub logits: Vec<f32>,
}

pub(crate) fn run(model: &Model, tokenizer: &Tokenizer, prompt: &str) -> Result<Run, String> {
    let tokens = tokenizer.encode(prompt, true, true);
    if tokens.is_empty() {
        return Err("the prompt is empty".into());
    }
    let n = tokens.len();
    let mut pieces = LastRow {
        d: model.config().d_model,
        ..LastRow::default()
    };
    let mut cache = model.new_cache(n);
    // A long prompt runs in chunks, so that an interrupt stops it between two; only the last
    // chunk is observed (the pieces are those of the last position).
    crate::interrupt::check()?;
    let last = n - (n - 1) % crate::interrupt::CHUNK_TOKENS - 1;
    for chunk in tokens[..last].chunks(crate::interrupt::CHUNK_TOKENS) {
        model
            .forward_hidden(chunk, &mut cache, chunk.len()..chunk.len())
            .map_err(|e| e.to_string())?;
        crate::interrupt::check()?;
    }
    let tail = &tokens[last..];
    let hidden = model
        .forward_observed(tail, &mut cache, tail.len() - 1..tail.len(), &mut pieces)
        .map_err(|e| e.to_string())?;
    let logits = model.logits(&hidden).map_err(|e| e.to_string())?;
    Ok(Run {
        tokens,
        pieces,
        logits,
    })
}

/// Indices of the `n` largest values, largest first.
pub(crate) fn top_n(values: &[f32], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(n - 1, |&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(n);
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order
}

/// The direct-logit attribution of one target token.
pub(crate) struct Attribution {
    pub embedding: f64,
    pub attention: Vec<f64>,
    pub ffn: Vec<f64>,
    /// The target's pre-soft-cap logit, `head_t · (w ⊙ r) · s` in full precision: what the
    /// pieces add up to. (The logits `quarry run` samples from come from the same hidden state
    /// through the 8-bit decode kernels, a few hundredths away.)
    pub logit: f64,
    /// Per layer: the logit lens's top token and the target's logit under the lens.
    pub lens: Vec<(u32, f32)>,
}

/// The final norm's frozen map from a residual piece to the target's logit.
pub(crate) struct Readout {
    target: u32,
    weights: Vec<f64>,
}

impl Readout {
    pub fn new(model: &Model, final_residual: &[f32], target: u32) -> Readout {
        let cfg = model.config();
        let mean_sq = final_residual.iter().map(|a| (a * a) as f64).sum::<f64>()
            / final_residual.len() as f64;
        let s = 1.0 / (mean_sq + cfg.norm_eps as f64).sqrt();
        let mut head = vec![0.0f32; cfg.d_model];
        model
            .output_head()
            .dequantize_row(target as usize, &mut head);
        let weights = head
            .iter()
            .zip(model.output_norm())
            .map(|(h, w)| *h as f64 * *w as f64 * s)
            .collect();
        Readout { target, weights }
    }

    pub fn of(&self, piece: &[f32]) -> f64 {
        piece
            .iter()
            .zip(&self.weights)
            .map(|(a, w)| *a as f64 * w)
            .sum()
    }
}

/// Splits the logit `readout` reads (one target token) over the pieces of `run`.
pub(crate) fn attribute(model: &Model, run: &Run, readout: &Readout) -> Attribution {
    let p = &run.pieces;
    let n_layers = p.attention.len();
    // The logit lens: each partial residual through the final norm at its own scale.
    let d = model.config().d_model;
    let mut partial = p.embedding.clone();
    let mut lens_input = Vec::with_capacity(n_layers * d);
    for l in 0..n_layers {
        for (r, (a, f)) in partial.iter_mut().zip(p.attention[l].iter().zip(&p.ffn[l])) {
            *r += a + f;
        }
        lens_input.extend_from_slice(&partial);
    }
    rms_norm(
        &mut lens_input,
        model.output_norm(),
        model.config().norm_eps,
    );
    let head: WeightView<'_> = model.output_head();
    let vocab = head.rows();
    let mut lens_logits = vec![0.0f32; n_layers * vocab];
    matmul(&head, &lens_input, n_layers, &mut lens_logits);
    let lens = lens_logits
        .chunks_exact(vocab)
        .map(|row| (top_n(row, 1)[0] as u32, row[readout.target as usize]))
        .collect();
    let logit = readout.of(&p.final_residual);
    Attribution {
        embedding: readout.of(&p.embedding),
        attention: p.attention.iter().map(|a| readout.of(a)).collect(),
        ffn: p.ffn.iter().map(|f| readout.of(f)).collect(),
        logit,
        lens,
    }
}

/// Each feature's share of layer `layer`'s FFN term in the target's logit (they sum to it).
/// In a mixture of experts the features are every expert's (those of experts the last token
/// was not routed to have no share) and the activations include the routing weights.
pub(crate) fn ffn_feature_shares(
    model: &Model,
    run: &Run,
    readout: &Readout,
    layer: usize,
) -> Vec<f64> {
    let w = model.ffn_features(layer);
    let cfg = model.config();
    let a = &run.pieces.activations[layer];
    // With a post-FFN norm, the output is (down · a) scaled by 1/rms(down · a) and the
    // norm's gains: freeze that scale, as for the final norm.
    let gains: Vec<f64> = match w.post_norm {
        Some(g) => {
            let y = w.write(a);
            let mean_sq = y.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / y.len() as f64;
            let inv = 1.0 / (mean_sq + cfg.norm_eps as f64).sqrt();
            g.iter().map(|&g| g as f64 * inv).collect()
        }
        None => vec![1.0; cfg.d_model],
    };
    let k: Vec<f64> = readout
        .weights
        .iter()
        .zip(&gains)
        .map(|(r, g)| r * g)
        .collect();
    w.read_back(&[&k])[0]
        .iter()
        .zip(a)
        .map(|(&unit, &act)| unit * act as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quarry_format::GgufFile;
    use std::sync::Arc;

    /// The feature shares of every layer add up to that layer's FFN term, for dense FFNs
    /// with and without a post-FFN norm and for mixtures of experts with and without a
    /// shared expert (the reference models of `fixtures/families`).
    #[test]
    fn feature_shares_add_up_to_each_layers_ffn_term() {
        for family in ["llama", "olmo2", "gemma2", "mixtral", "qwen2_moe"] {
            let path = quarry_fixtures::family_dir(family).join("model-f32.gguf");
            let file = Arc::new(GgufFile::open(path).unwrap());
            let tok = Tokenizer::from_gguf(&file).unwrap();
            let model = Model::load(file).unwrap();
            let result = run(&model, &tok, "The capital of France is").unwrap();
            let target = top_n(&result.logits, 1)[0] as u32;
            let readout = Readout::new(&model, &result.pieces.final_residual, target);
            for layer in 0..model.config().n_layers {
                let shares = ffn_feature_shares(&model, &result, &readout, layer);
                assert_eq!(shares.len(), model.ffn_features(layer).width());
                let sum: f64 = shares.iter().sum();
                let term = readout.of(&result.pieces.ffn[layer]);
                assert!(
                    (sum - term).abs() <= 1e-4 * term.abs().max(1.0),
                    "{family} layer {layer}: shares {sum} vs term {term}"
                );
            }
        }
    }
}
