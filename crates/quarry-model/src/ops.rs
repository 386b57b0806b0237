//! The small per-vector operations of a transformer block. Each works on a batch of rows and
//! splits large batches across the kernel thread pool; the transcendental ones use
//! `quarry-kernels`' vector exponentials.

use std::sync::{Mutex, PoisonError};

use quarry_kernels::pool;
use quarry_kernels::vec::{gelu_tanh_mul, silu_mul};

use crate::config::{Activation, RopeStyle};

/// Values per parallel chunk of an elementwise pass at least, so that a dispatch costs little
/// next to the work: for cheap passes (a multiply-add per value) and for the gated
/// activation (an exponential and a division per value, ~1 ns each).
const MIN_CHUNK: usize = 16 * 1024;
const MIN_CHUNK_GATED: usize = 2 * 1024;

/// Rows per chunk when `rows` rows of `row_len` values are split across the pool in chunks of
/// at least `min_chunk` values (a few chunks per thread when there is enough work).
fn rows_per_chunk(rows: usize, row_len: usize, min_chunk: usize) -> usize {
    let threads = pool::global().n_threads();
    rows.div_ceil(4 * threads)
        .max(min_chunk.div_ceil(row_len.max(1)))
        .max(1)
}

/// Runs `f(first_row, rows)` over `row_len`-wide rows of `x` in parallel chunks of at least
/// `min_chunk` values (a single row runs inline).
fn par_rows(
    x: &mut [f32],
    row_len: usize,
    min_chunk: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let per_chunk = rows_per_chunk(x.len() / row_len.max(1), row_len, min_chunk);
    pool::global().for_each_chunk_mut(x, per_chunk * row_len, &|i, chunk| f(i * per_chunk, chunk));
}

/// RMS normalisation of each `weight.len()`-wide row of `x`, in place.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    par_rows(x, n, MIN_CHUNK, &|_, rows| {
        for row in rows.chunks_exact_mut(n) {
            let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for (v, w) in row.iter_mut().zip(weight) {
                *v = *v * inv * w;
            }
        }
    });
}

/// `cap · tanh(x / cap)`: bounds logits smoothly (Gemma 2's soft-capping).
/// The probabilities of a row of logits (softmax, computed in `f64` so that the small
/// probabilities tools compare stay exact).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// `gate ← act(gate) · up`, the gated FFN's elementwise step.
pub fn gated_activation(gate: &mut [f32], up: &[f32], act: Activation) {
    assert_eq!(
        gate.len(),
        up.len(),
        "gated_activation: gate and up differ in length"
    );
    let kernel = match act {
        Activation::Silu => silu_mul,
        Activation::GeluTanh => gelu_tanh_mul,
    };
    // Elementwise, so any split works; rows of 1 value let `par_rows` pick the chunk size.
    par_rows(gate, 1, MIN_CHUNK_GATED, &|first, g| {
        kernel(g, &up[first..first + g.len()])
    });
}

/// Rotary position embedding for one base: rotates pairs of dimensions by `pos · θᵢ` with
/// `θᵢ = base^(-2i/dims)`, divided by a per-pair factor where the model has them (Llama 3's
/// frequency-dependent scaling, GGUF `rope_freqs.weight`; Phi-3's LongRoPE factors), the
/// rotation's cosines and sines times an amplitude (LongRoPE's attention factor; 1 otherwise).
#[derive(Clone, Debug)]
pub struct Rope {
    style: RopeStyle,
    dims: usize,
    inv_freq: Vec<f64>,
    position_scale: f64,
    amplitude: f64,
}

impl Rope {
    pub fn new(style: RopeStyle, dims: usize, base: f32, position_scale: f32) -> Rope {
        Rope::with_factors(style, dims, base, position_scale, None)
    }

    /// [`Rope::new`] with each pair's frequency divided by `factors[i]` (`dims / 2` of them).
    pub fn with_factors(
        style: RopeStyle,
        dims: usize,
        base: f32,
        position_scale: f32,
        factors: Option<&[f32]>,
    ) -> Rope {
        let inv_freq = (0..dims / 2)
            .map(|i| {
                let factor = factors.map_or(1.0, |f| f64::from(f[i]));
                (base as f64).powf(-2.0 * i as f64 / dims as f64) / factor
            })
            .collect();
        Rope {
            style,
            dims,
            inv_freq,
            position_scale: 1.0 / position_scale as f64,
            amplitude: 1.0,
        }
    }

    /// YaRN (as llama.cpp and transformers compute it): pair `i`'s frequency is the original
    /// one where a wavelength fits the original context many times (pairs below the
    /// correction range of `beta_fast = 32` rotations), divided by `factor` where it fits
    /// less than once (`beta_slow = 1`), mixed linearly between; the cosines and sines are
    /// multiplied by `1 + 0.1 ln(factor)`.
    pub fn yarn(
        style: RopeStyle,
        dims: usize,
        base: f32,
        factor: f32,
        original_context: usize,
    ) -> Rope {
        let (base, factor) = (base as f64, factor as f64);
        // The pair index at which a wavelength makes `rotations` turns over the context.
        let pair_of = |rotations: f64| {
            dims as f64 * (original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let low = pair_of(32.0).floor().max(0.0);
        let high = pair_of(1.0).ceil().min(dims as f64 - 1.0);
        let inv_freq = (0..dims / 2)
            .map(|i| {
                let extrapolated = base.powf(-2.0 * i as f64 / dims as f64);
                let ramp = ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                let kept = 1.0 - ramp;
                extrapolated / factor * (1.0 - kept) + extrapolated * kept
            })
            .collect();
        let amplitude = if factor > 1.0 {
            1.0 + 0.1 * factor.ln()
        } else {
            1.0
        };
        Rope {
            style,
            dims,
            inv_freq,
            position_scale: 1.0,
            amplitude,
        }
    }

    /// This rotation with its cosines and sines multiplied by `amplitude` (LongRoPE's
    /// `sqrt(1 + ln(s) / ln(original context))`, which scales every attention score by its
    /// square).
    pub fn with_amplitude(mut self, amplitude: f32) -> Rope {
        self.amplitude *= amplitude as f64;
        self
    }

    /// The cosines and sines for positions `start..start + n`, computed once per batch and
    /// shared by every layer and head that uses this base.
    pub fn table(&self, start: usize, n: usize) -> RopeTable<'_> {
        let half = self.inv_freq.len();
        let mut cos_sin = vec![[0.0f64; 2]; n * half];
        pool::global().for_each_chunk_mut(&mut cos_sin, half.max(1) * 64, &|c, chunk| {
            for (i, cs) in chunk.iter_mut().enumerate() {
                let k = c * half.max(1) * 64 + i;
                let pos = (start + k / half) as f64 * self.position_scale;
                let (sin, cos) = (pos * self.inv_freq[k % half]).sin_cos();
                *cs = [cos * self.amplitude, sin * self.amplitude];
            }
        });
        RopeTable {
            rope: self,
            cos_sin,
        }
    }
}

/// [`Rope`]'s rotations for a run of consecutive positions.
pub struct RopeTable<'a> {
    rope: &'a Rope,
    cos_sin: Vec<[f64; 2]>,
}

impl RopeTable<'_> {
    /// The rotation's `[cos, sin]` per pair as `f32`, `dims / 2` pairs per position, for a
    /// backend that rotates on its own device.
    pub fn cos_sin_f32(&self) -> Vec<[f32; 2]> {
        self.cos_sin
            .iter()
            .map(|&[c, s]| [c as f32, s as f32])
            .collect()
    }

    /// Which dimensions form a pair.
    pub fn style(&self) -> RopeStyle {
        self.rope.style
    }

    /// Dimensions rotated at the start of each head (the rest pass through).
    pub fn dims(&self) -> usize {
        self.rope.dims
    }

    /// Positions in the table.
    pub fn positions(&self) -> usize {
        self.cos_sin.len() / self.rope.inv_freq.len().max(1)
    }

    /// Rotates `rows` (of `row_len`), the first at the table's position `first`.
    fn rotate(&self, first: usize, rows: &mut [f32], row_len: usize, head_dim: usize) {
        let half = self.rope.inv_freq.len();
        for (t, row) in rows.chunks_exact_mut(row_len).enumerate() {
            let angles = &self.cos_sin[(first + t) * half..][..half];
            for head in row.chunks_exact_mut(head_dim) {
                self.rope.rotate_pairs(angles.iter().copied(), head);
            }
        }
    }
}

impl Rope {
    /// Rotates one head's pairs of dimensions by the given `[cos, sin]` per pair.
    fn rotate_pairs(&self, angles: impl Iterator<Item = [f64; 2]>, head: &mut [f32]) {
        for (i, [cos, sin]) in angles.enumerate() {
            let (a, b) = match self.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + self.dims / 2),
            };
            let (x0, x1) = (head[a] as f64, head[b] as f64);
            head[a] = (x0 * cos - x1 * sin) as f32;
            head[b] = (x0 * sin + x1 * cos) as f32;
        }
    }

    /// Rotates every `head_dim`-wide head of `row` for position `position`, or by the inverse
    /// rotation (the transpose, which is what a gradient goes through) when `inverse`.
    pub fn rotate_heads(&self, position: usize, row: &mut [f32], head_dim: usize, inverse: bool) {
        let pos = position as f64 * self.position_scale;
        let sign = if inverse { -1.0 } else { 1.0 };
        let angles: Vec<[f64; 2]> = self
            .inv_freq
            .iter()
            .map(|f| {
                let (sin, cos) = (pos * f).sin_cos();
                [cos, sign * sin]
            })
            .collect();
        for head in row.chunks_exact_mut(head_dim) {
            self.rotate_pairs(angles.iter().copied(), head);
        }
    }
}

/// Rotates the rows of several tables (the sequences of a batch), one row per position of its
/// table, each row a run of `head_dim`-wide heads, all in one dispatch of the pool: a decode
/// batch has one row per sequence, far too little work to split each apart, and together they
/// fill the threads.
pub fn rotate_each(parts: &mut [(&RopeTable<'_>, &mut [f32])], head_dim: usize) {
    let mut tasks = Vec::new();
    for (table, x) in parts.iter_mut() {
        let n = table.positions();
        assert!(
            n > 0 && x.len().is_multiple_of(n),
            "rotate_each: {} values for {n} positions",
            x.len()
        );
        let row_len = x.len() / n;
        let per_chunk = rows_per_chunk(n, row_len, MIN_CHUNK);
        for (c, rows) in x.chunks_mut(per_chunk * row_len).enumerate() {
            tasks.push(Mutex::new((*table, c * per_chunk, row_len, rows)));
        }
    }
    let run = |i: usize| {
        // Each task locks only its own rows, so the locks are never contended.
        let mut task = tasks[i].lock().unwrap_or_else(PoisonError::into_inner);
        let (table, first, row_len, ref mut rows) = *task;
        table.rotate(first, rows, row_len, head_dim);
    };
    // A row or two (one sequence decoding) cost less than waking the pool.
    let pool = pool::global();
    if tasks.len() < 2 * pool.n_threads() {
        (0..tasks.len()).for_each(run);
    } else {
        pool.run(tasks.len(), &run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_matches_the_closed_form_and_survives_large_logits() {
        let p = softmax(&[0.0, (2.0f32).ln(), 1000.0 - 1000.0]);
        for (got, want) in p.iter().zip([0.25, 0.5, 0.25]) {
            assert!((got - want).abs() < 1e-7, "{p:?}");
        }
        let p = softmax(&[1000.0, 1000.0, f32::NEG_INFINITY]);
        assert_eq!(p, [0.5, 0.5, 0.0]);
    }

    #[test]
    fn rms_norm_normalises_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0, 2.0, 2.0];
        rms_norm(&mut x, &[1.0, 2.0], 1e-9);
        let r1 = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r1).abs() < 1e-6 && (x[1] - 8.0 / r1).abs() < 1e-6);
        assert_eq!(&x[2..4], &[0.0, 0.0]);
        assert!((x[4] - 1.0).abs() < 1e-6 && (x[5] - 2.0).abs() < 1e-6);
    }

    fn rotate(table: &RopeTable<'_>, x: &mut [f32], head_dim: usize) {
        rotate_each(&mut [(table, x)], head_dim);
    }

    #[test]
    fn rope_styles_rotate_the_right_pairs() {
        // Position 1 with a single frequency (dims 2) rotates by exactly 1 radian.
        let (s, c) = 1.0f32.sin_cos();
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        let table = Rope::new(RopeStyle::Interleaved, 2, 10_000.0, 1.0);
        rotate(&table.table(1, 1), &mut x, 4);
        assert!((x[0] - c).abs() < 1e-6 && (x[1] - s).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 0.0], "dims beyond rope_dims pass through");

        // With halves, dimension 0 pairs with dimension dims/2.
        let mut y = vec![1.0, 0.0, 0.0, 0.0];
        let table = Rope::new(RopeStyle::Halves, 4, 10_000.0, 1.0);
        rotate(&table.table(1, 1), &mut y, 4);
        assert!((y[0] - c).abs() < 1e-6 && (y[2] - s).abs() < 1e-6);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let rope = Rope::new(RopeStyle::Halves, 8, 10_000.0, 1.0);
        let orig: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut x = orig.clone();
        rotate(&rope.table(0, 1), &mut x, 8);
        assert_eq!(x, orig);
        rotate(&rope.table(77, 1), &mut x, 8);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn rotate_heads_matches_the_table_and_inverts() {
        for style in [RopeStyle::Interleaved, RopeStyle::Halves] {
            let rope = Rope::new(style, 6, 10_000.0, 2.0);
            let orig: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut by_table = orig.clone();
            rotate(&rope.table(5, 1), &mut by_table, 8);
            let mut by_row = orig.clone();
            rope.rotate_heads(5, &mut by_row, 8, false);
            assert_eq!(by_row, by_table);
            rope.rotate_heads(5, &mut by_row, 8, true);
            for (a, b) in by_row.iter().zip(&orig) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn activations_match_closed_forms() {
        let mut g = vec![0.0, 1.0, -2.0];
        gated_activation(&mut g, &[1.0, 2.0, 1.0], Activation::Silu);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 * 0.731_058_6).abs() < 1e-5);
        assert!((g[2] - (-2.0 * 0.119_202_92)).abs() < 1e-5);
        let mut h = vec![1.0];
        gated_activation(&mut h, &[1.0], Activation::GeluTanh);
        assert!((h[0] - 0.841_192).abs() < 1e-5);
    }

    #[test]
    fn softcap_bounds_values() {
        let mut x = vec![0.0, 1000.0, -1000.0];
        softcap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 30.0).abs() < 1e-4 && (x[2] + 30.0).abs() < 1e-4);
    }
}
