//! quantize → dequantize round trips on random data of awkward lengths: the error must stay
//! within a bound relative to the data's RMS, for each format's expected precision.

mod common;

use proptest::prelude::*;
use quarry_kernels::{dequantize, quantize, GgmlType, KernelError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Relative RMS error each quantizer must stay under.
const BOUNDS: [(GgmlType, f64); 7] = [
    (GgmlType::F32, 0.0),
    (GgmlType::F16, 1e-3),
    (GgmlType::BF16, 4e-3),
    (GgmlType::Q8_0, 0.01),
    (GgmlType::Q8_K, 0.01),
    (GgmlType::Q6_K, 0.03),
    (GgmlType::Q4_K, 0.1),
];

/// Quantizes and decodes `x`, returning RMS(error) / RMS(x).
fn relative_rms_error(dtype: GgmlType, x: &[f32]) -> f64 {
    let mut bytes = vec![0u8; dtype.bytes_for(x.len() as u64).unwrap() as usize];
    quantize(dtype, x, &mut bytes).unwrap();
    let mut y = vec![0f32; x.len()];
    dequantize(dtype, &bytes, &mut y).unwrap();
    let err: f64 = x
        .iter()
        .zip(&y)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let sig: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    if sig == 0.0 {
        assert_eq!(err, 0.0);
        return 0.0;
    }
    (err / sig).sqrt()
}

/// Random data: Gaussian or uniform, with each 256 values at its own magnitude (real
/// weights vary by row and channel) and the whole vector at a random overall scale.
fn sample(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let scale = 10f32.powf(rng.gen_range(-3.0..3.0));
    let gaussian = rng.gen_bool(0.5);
    let mut x = if gaussian {
        common::gaussian(&mut rng, n, scale)
    } else {
        (0..n).map(|_| scale * rng.gen_range(-1.0..1.0)).collect()
    };
    for piece in x.chunks_mut(256) {
        let m = rng.gen_range(0.25..4.0);
        piece.iter_mut().for_each(|v| *v *= m);
    }
    x
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn round_trip_error_is_bounded(seed in any::<u64>(), blocks in 1usize..=24) {
        for (dtype, bound) in BOUNDS {
            // 32-value formats take every multiple of 32 up to 768; the K formats 256..=6144.
            let n = blocks * if dtype.block_size() == 1 { 32 } else { dtype.block_size() };
            let err = relative_rms_error(dtype, &sample(seed, n));
            prop_assert!(err <= bound, "{dtype} n={n}: relative RMS error {err} > {bound}");
        }
    }
}

#[test]
fn fixed_lengths_round_trip() {
    for n in [32, 64, 256, 512, 768, 1280] {
        for (dtype, bound) in BOUNDS {
            if n % dtype.block_size() != 0 {
                continue;
            }
            let err = relative_rms_error(dtype, &sample(n as u64, n));
            assert!(err <= bound, "{dtype} n={n}: {err} > {bound}");
        }
    }
}

#[test]
fn k_quant_lengths_must_be_whole_super_blocks() {
    let x = vec![0.5f32; 288];
    let mut b = vec![0u8; 1024];
    for dtype in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_K] {
        assert_eq!(
            quantize(dtype, &x, &mut b),
            Err(KernelError::NotBlockMultiple { dtype, n: 288 })
        );
    }
}

#[test]
fn gaussian_errors_are_near_each_formats_precision() {
    // Tighter than BOUNDS for well-behaved data, so a quantizer that silently degrades
    // (a lost refinement step, a wasted level) shows up here first.
    let x = common::gaussian(&mut StdRng::seed_from_u64(1), 256 * 16, 1.0);
    for (dtype, bound) in [
        (GgmlType::Q8_0, 0.006),
        (GgmlType::Q8_K, 0.008),
        (GgmlType::Q6_K, 0.018),
        (GgmlType::Q4_K, 0.075),
    ] {
        let err = relative_rms_error(dtype, &x);
        assert!(err <= bound, "{dtype}: {err} > {bound}");
    }
}
