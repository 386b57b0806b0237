//! Low-rank deltas added to the FFN down projections: how edits enter the forward pass.
//!
//! An edit never rewrites a quantized weight. Layer `l`'s down projection `W_l` (`d_model ×
//! ff_dim`) is read as `W_l + B_l·A_l`, with `A_l` (`rank × ff_dim`) and `B_l` (`d_model × rank`)
//! in `f32`: after the quantized product `y = W_l·h`, the overlay adds `B_l·(A_l·h)` computed from
//! the same `f32` activations `h`. The layout is exactly a llama.cpp LoRA adapter's
//! (`lora_a` is `[ff_dim, rank]` in ggml order, `lora_b` is `[rank, d_model]`), so an overlay
//! is written out as an adapter without any conversion and an adapter is read back as one.
//!
//! Every overlay carries a `version`, unique in the process, so caches keyed by the weights a
//! state was computed under (the prefix cache) never mix states of different overlays.

use std::sync::atomic::{AtomicU64, Ordering};

use quarry_kernels::pool;
use quarry_kernels::vec::{dot_rows, gelu_tanh_mul, silu_mul};

use crate::Activation;

/// One layer's `ΔW = B·A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    /// Rows of the delta: the down projection's output size (`d_model`).
    pub rows: usize,
    /// Columns of the delta: the down projection's input size (`ff_dim`).
    pub cols: usize,
    pub rank: usize,
    /// `rank × cols`, row-major (ggml `[cols, rank]`).
    pub a: Vec<f32>,
    /// `rows × rank`, row-major (ggml `[rank, rows]`).
    pub b: Vec<f32>,
}

impl LowRank {
    /// A delta from its factors; `None` when the lengths do not match the shape.
    pub fn new(rows: usize, cols: usize, rank: usize, a: Vec<f32>, b: Vec<f32>) -> Option<LowRank> {
        (rank > 0 && a.len() == rank * cols && b.len() == rows * rank).then_some(LowRank {
            rows,
            cols,
            rank,
            a,
            b,
        })
    }

    /// Adds `B·(A·h)` to `out` for every row of `h` (`n` rows of `cols` values; `out`: `n`
    /// rows of `rows` values): two small products per block of rows (`A` times the rows,
    /// then `B` times those `rank` values per row), blocks spread over the kernel thread pool.
    /// Both products are [`dot_rows`], whose every dot product is summed in the same order
    /// whatever else shares its call, so a row's result does not depend on the rows beside
    /// it: a sequence gets the same logits alone or in any batch.
    ///
    /// Panics if `h` and `out` do not hold the same number of whole rows.
    pub fn apply(&self, h: &[f32], out: &mut [f32]) {
        let n = h.len() / self.cols.max(1);
        assert!(
            h.len() == n * self.cols && out.len() == n * self.rows,
            "LowRank::apply: {} activations and {} outputs are not rows of {} and {}",
            h.len(),
            out.len(),
            self.cols,
            self.rows
        );
        // Enough rows per task to amortize the dispatch over reading A and B.
        const BLOCK: usize = 16;
        let block = |i: usize, out: &mut [f32]| {
            let m = out.len() / self.rows;
            let h = &h[i * BLOCK * self.cols..(i * BLOCK + m) * self.cols];
            // a_h[k · m + j] = A_k · h_j, then per row j its `rank` values side by side.
            let mut a_h = vec![0.0f32; self.rank * m];
            dot_rows(&self.a, h, self.cols, self.cols, &mut a_h);
            let mut t = vec![0.0f32; m * self.rank];
            for (k, column) in a_h.chunks_exact(m).enumerate() {
                for (j, &v) in column.iter().enumerate() {
                    t[j * self.rank + k] = v;
                }
            }
            // delta[r · m + j] = B_r · t_j.
            let mut delta = vec![0.0f32; self.rows * m];
            dot_rows(&self.b, &t, self.rank, self.rank, &mut delta);
            for (j, row) in out.chunks_exact_mut(self.rows).enumerate() {
                for (r, o) in row.iter_mut().enumerate() {
                    *o += delta[r * m + j];
                }
            }
        };
        if n <= BLOCK {
            block(0, out);
        } else {
            pool::global().for_each_chunk_mut(out, BLOCK * self.rows, &block);
        }
    }

    /// The dense `rows × cols` delta (for compiling it into a weight).
    pub fn dense(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (row, b) in out
            .chunks_exact_mut(self.cols)
            .zip(self.b.chunks_exact(self.rank))
        {
            for (&coef, a) in b.iter().zip(self.a.chunks_exact(self.cols)) {
                row.iter_mut().zip(a).for_each(|(o, x)| *o += coef * x);
            }
        }
        out
    }
}

/// Neurons of one layer's FFN whose gate and up rows are replaced: neuron `index[i]` reads
/// row `i` of `gate` and of `up` (`d_model` values each) instead of the model's. Quarry's own
/// edits never do this; it is how LARQL's COMPOSE writes a fact (one neuron per fact, its
/// down column changed through the layer's [`LowRank`]), ported for comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronRows {
    pub index: Vec<usize>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
}

impl NeuronRows {
    /// Recomputes these neurons' hidden activations `act(gate·x)·(up·x)` in `h` (rows of
    /// `ff` values) from the FFN's normed input `x` (as many rows of `d` values).
    pub fn apply(&self, x: &[f32], h: &mut [f32], act: Activation) {
        let d = self.gate.len() / self.index.len().max(1);
        let ff = h.len() / (x.len() / d.max(1)).max(1);
        let kernel = match act {
            Activation::Silu => silu_mul,
            Activation::GeluTanh => gelu_tanh_mul,
        };
        for (xr, hr) in x.chunks_exact(d).zip(h.chunks_exact_mut(ff)) {
            for (i, &j) in self.index.iter().enumerate() {
                let dot = |w: &[f32]| {
                    w[i * d..(i + 1) * d]
                        .iter()
                        .zip(xr)
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                };
                let mut g = [dot(&self.gate)];
                kernel(&mut g, &[dot(&self.up)]);
                hr[j] = g[0];
            }
        }
    }
}

/// The deltas of every layer a patch set touches.
#[derive(Debug)]
pub struct FfnOverlay {
    version: u64,
    layers: Vec<Option<LowRank>>,
    neurons: Vec<Option<NeuronRows>>,
}

impl FfnOverlay {
    /// An overlay over a model of `n_layers` layers with `deltas` as `(layer, delta)` pairs;
    /// a layer named twice keeps the last. Gets a fresh version.
    pub fn new(n_layers: usize, deltas: impl IntoIterator<Item = (usize, LowRank)>) -> FfnOverlay {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut layers = vec![None; n_layers];
        for (layer, delta) in deltas {
            layers[layer] = Some(delta);
        }
        FfnOverlay {
            version: NEXT.fetch_add(1, Ordering::Relaxed),
            neurons: vec![None; n_layers],
            layers,
        }
    }

    /// This overlay with `rows` as `(layer, neurons)` pairs whose gate and up rows are
    /// replaced (see [`NeuronRows`]).
    pub fn with_neurons(
        mut self,
        rows: impl IntoIterator<Item = (usize, NeuronRows)>,
    ) -> FfnOverlay {
        for (layer, r) in rows {
            if let Some(slot) = self.neurons.get_mut(layer) {
                *slot = Some(r);
            }
        }
        self
    }

    /// The replaced neurons of `layer`, if any.
    pub fn neurons(&self, layer: usize) -> Option<&NeuronRows> {
        self.neurons.get(layer).and_then(Option::as_ref)
    }

    /// Whether any layer's gate and up rows are replaced (such an overlay is not a LoRA of
    /// the down projections and cannot be written as one).
    pub fn has_neurons(&self) -> bool {
        self.neurons.iter().any(Option::is_some)
    }

    /// Unique in the process for every overlay built; 0 is never used (no overlay).
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn layer(&self, layer: usize) -> Option<&LowRank> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// `(layer, delta)` for every layer with a delta, in layer order.
    pub fn deltas(&self) -> impl Iterator<Item = (usize, &LowRank)> {
        self.layers
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (i, d)))
    }

    pub fn is_empty(&self) -> bool {
        self.layers.iter().all(Option::is_none) && !self.has_neurons()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_matches_the_dense_delta() {
        let (rows, cols, rank) = (3, 5, 2);
        let a: Vec<f32> = (0..rank * cols).map(|i| i as f32 * 0.1 - 0.3).collect();
        let b: Vec<f32> = (0..rows * rank).map(|i| 1.0 - i as f32 * 0.25).collect();
        let delta = LowRank::new(rows, cols, rank, a, b).unwrap();
        let h = [0.5, -1.0, 2.0, 0.0, 1.5];
        let mut out = vec![1.0f32; rows];
        delta.apply(&h, &mut out);
        let dense = delta.dense();
        for (r, o) in out.iter().enumerate() {
            let expected: f32 = 1.0 + (0..cols).map(|c| dense[r * cols + c] * h[c]).sum::<f32>();
            assert!((o - expected).abs() < 1e-5, "row {r}: {o} vs {expected}");
        }
        assert!(LowRank::new(rows, cols, rank, vec![0.0; 3], vec![0.0; 6]).is_none());
    }

    #[test]
    fn many_rows_get_what_each_row_gets_alone() {
        // More rows than one block, so the pool splits them; sizes on and off the SIMD widths.
        let (rows, cols, rank, n) = (67, 300, 9, 41);
        let a: Vec<f32> = (0..rank * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..rows * rank).map(|i| (i as f32 * 0.11).cos()).collect();
        let delta = LowRank::new(rows, cols, rank, a, b).unwrap();
        let h: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.013).sin()).collect();
        let base: Vec<f32> = (0..n * rows).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut all = base.clone();
        delta.apply(&h, &mut all);
        let dense = delta.dense();
        for r in 0..n {
            let mut alone = base[r * rows..(r + 1) * rows].to_vec();
            delta.apply(&h[r * cols..(r + 1) * cols], &mut alone);
            assert_eq!(alone, &all[r * rows..(r + 1) * rows], "row {r}");
            for (i, o) in alone.iter().enumerate() {
                let expected = base[r * rows + i]
                    + (0..cols)
                        .map(|c| dense[i * cols + c] * h[r * cols + c])
                        .sum::<f32>();
                assert!(
                    (o - expected).abs() < 1e-4 * (1.0 + expected.abs()),
                    "row {r}, {i}: {o} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn versions_differ() {
        let a = FfnOverlay::new(2, []);
        let b = FfnOverlay::new(2, []);
        assert_ne!(a.version(), b.version());
        assert!(a.is_empty());
    }
}
