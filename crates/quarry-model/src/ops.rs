//! The small per-vector operations of a transformer block, written as plain loops over `f32`
//! (the compiler vectorizes them; the heavy lifting is in `quarry-kernels`' matmul).

use crate::config::{Activation, RopeStyle};

/// RMS normalisation of each `weight.len()`-wide row of `x`, in place.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let n = weight.len();
    for row in x.chunks_exact_mut(n) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `cap · tanh(x / cap)`: bounds logits smoothly (Gemma 2's soft-capping).
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// `gate ← act(gate) · up`, the gated FFN's elementwise step.
pub fn gated_activation(gate: &mut [f32], up: &[f32], act: Activation) {
    match act {
        Activation::Silu => {
            for (g, u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        }
        Activation::GeluTanh => {
            const SQRT_2_OVER_PI: f32 = 0.797_884_6;
            for (g, u) in gate.iter_mut().zip(up) {
                let x = *g;
                let inner = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
                *g = 0.5 * x * (1.0 + inner.tanh()) * u;
            }
        }
    }
}

/// Rotary position embedding tables for one base: `cos`/`sin` of `pos · base^(-2i/dims)`.
#[derive(Clone, Debug)]
pub struct Rope {
    style: RopeStyle,
    dims: usize,
    inv_freq: Vec<f64>,
    position_scale: f64,
}

impl Rope {
    pub fn new(style: RopeStyle, dims: usize, base: f32, position_scale: f32) -> Rope {
        let inv_freq = (0..dims / 2)
            .map(|i| (base as f64).powf(-2.0 * i as f64 / dims as f64))
            .collect();
        Rope {
            style,
            dims,
            inv_freq,
            position_scale: 1.0 / position_scale as f64,
        }
    }

    /// Rotates every `head_dim`-wide head in `x` (one token's heads, concatenated) to `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.dims / 2;
        let p = pos as f64 * self.position_scale;
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (p * f).sin_cos();
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (x0, x1) = (head[a] as f64, head[b] as f64);
                head[a] = (x0 * cos - x1 * sin) as f32;
                head[b] = (x0 * sin + x1 * cos) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalises_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0, 2.0, 2.0];
        rms_norm(&mut x, &[1.0, 2.0], 1e-9);
        let r1 = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r1).abs() < 1e-6 && (x[1] - 8.0 / r1).abs() < 1e-6);
        assert_eq!(&x[2..4], &[0.0, 0.0]);
        assert!((x[4] - 1.0).abs() < 1e-6 && (x[5] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let mut x = vec![1.0, 2.0, 3.0, -1000.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[2] > x[1] && x[1] > x[0] && x[3] == 0.0);
    }

    #[test]
    fn rope_styles_rotate_the_right_pairs() {
        // Position 1 with a single frequency (dims 2) rotates by exactly 1 radian.
        let (s, c) = 1.0f32.sin_cos();
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        Rope::new(RopeStyle::Interleaved, 2, 10_000.0, 1.0).apply(&mut x, 4, 1);
        assert!((x[0] - c).abs() < 1e-6 && (x[1] - s).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 0.0], "dims beyond rope_dims pass through");

        // With halves, dimension 0 pairs with dimension dims/2.
        let mut y = vec![1.0, 0.0, 0.0, 0.0];
        Rope::new(RopeStyle::Halves, 4, 10_000.0, 1.0).apply(&mut y, 4, 1);
        assert!((y[0] - c).abs() < 1e-6 && (y[2] - s).abs() < 1e-6);
        assert_eq!(y[1], 0.0);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let rope = Rope::new(RopeStyle::Halves, 8, 10_000.0, 1.0);
        let orig: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut x = orig.clone();
        rope.apply(&mut x, 8, 0);
        assert_eq!(x, orig);
        rope.apply(&mut x, 8, 77);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
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
