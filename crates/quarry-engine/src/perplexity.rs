//! Perplexity with llama.cpp's method, so that figures compare with `llama-perplexity`.
//!
//! The token stream is cut into `floor(n / ctx)` non-overlapping windows of `ctx` tokens. Each
//! window is evaluated from an empty cache; when the model adds a BOS token, the window's first
//! token is replaced by BOS. Only the second half of each window is scored: the logits at
//! positions `ctx/2 .. ctx-1` predict tokens `ctx/2 + 1 .. ctx`, so every scored token has at
//! least `ctx/2` tokens of context. PPL = exp(mean negative log-likelihood).

use quarry_model::{KvCache, Model};

use crate::EngineError;

/// Rows of logits projected at once; bounds memory for large vocabularies.
pub const LOGIT_ROWS_PER_PASS: usize = 32;

/// The smallest window: half of it is context, the other half scored.
pub const MIN_CTX: usize = 4;

/// The result of a perplexity run.
#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityReport {
    pub ctx: usize,
    pub chunks: usize,
    pub scored_tokens: usize,
    pub ppl: f64,
    /// Standard error of the PPL estimate (from the spread of per-token NLLs).
    pub ppl_stderr: f64,
    /// PPL over the chunks so far, after each chunk (as llama-perplexity prints).
    pub running_ppl: Vec<f64>,
}

/// Computes perplexity over `tokens` in windows of `ctx`; `bos` replaces each window's first
/// token when the model adds one. `on_chunk(done, total, running_ppl)` reports progress.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport, EngineError> {
    if ctx < MIN_CTX {
        return Err(EngineError::InvalidArgument {
            name: "ctx",
            reason: format!("must be at least {MIN_CTX}, got {ctx}"),
        });
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        return Err(EngineError::InvalidArgument {
            name: "ctx",
            reason: format!(
                "the text has {} tokens, fewer than one window of {ctx}",
                tokens.len()
            ),
        });
    }
    let vocab = model.config().vocab_size;
    let first = ctx / 2;
    let mut cache = model.new_cache(ctx);
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running_ppl = Vec::with_capacity(chunks);
    for c in 0..chunks {
        let mut window = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(bos) = bos {
            window[0] = bos;
        }
        cache.truncate(0);
        let hidden = model.forward_hidden(&window, &mut cache, first..ctx - 1)?;
        let d = model.config().d_model;
        for (block, rows) in hidden.chunks(LOGIT_ROWS_PER_PASS * d).enumerate() {
            let logits = model.logits(rows)?;
            for (r, row) in logits.chunks_exact(vocab).enumerate() {
                let pos = first + block * LOGIT_ROWS_PER_PASS + r;
                let target = tokens[c * ctx + pos + 1] as usize;
                let nll = -log_softmax_at(row, target);
                sum += nll;
                sum_sq += nll * nll;
                count += 1;
            }
        }
        running_ppl.push((sum / count as f64).exp());
        on_chunk(c + 1, chunks, (sum / count as f64).exp());
    }
    let mean = sum / count as f64;
    let var = (sum_sq / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    Ok(PerplexityReport {
        ctx,
        chunks,
        scored_tokens: count,
        ppl,
        ppl_stderr: ppl * (var / (count as f64 - 1.0).max(1.0)).sqrt(),
        running_ppl,
    })
}

/// `log softmax(row)[index]`, computed in f64.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_closed_form() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((log_softmax_at(&row, 2) - (3.0 - z.ln())).abs() < 1e-12);
    }
}
