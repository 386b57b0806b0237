//! The CPU reference: quarry-kernels' scalar dequantization, then f64 dot products. Shared by
//! the tests, the bench and the bandwidth example (through `#[path]`).
#![allow(dead_code)]

use quarry_gpu::{GgmlType, Gpu, GpuError};

/// `[tokens][rows]` products of the dequantized weights with `x`, and for each row and token
/// Σ|w|·|x| (the scale of the rounding error a correct kernel may show).
pub fn reference(
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
    x: &[f32],
    tokens: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut w = vec![0f32; rows * cols];
    quarry_kernels::dequantize(dtype, bytes, &mut w).expect("reference dequantization");
    let mut y = vec![0f64; tokens * rows];
    let mut mag = vec![0f64; tokens * rows];
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let (mut s, mut m) = (0f64, 0f64);
            for (&a, &b) in wr.iter().zip(xt) {
                s += a as f64 * b as f64;
                m += (a as f64 * b as f64).abs();
            }
            y[t * rows + r] = s;
            mag[t * rows + r] = m;
        }
    }
    (y, mag)
}

/// The largest |gpu - cpu| / Σ|w|·|x| over all outputs (NaN counts as infinitely wrong).
pub fn max_rel_error(gpu: &[f32], cpu: &[f64], mag: &[f64]) -> f64 {
    assert_eq!(gpu.len(), cpu.len());
    gpu.iter()
        .zip(cpu)
        .zip(mag)
        .map(|((&g, &c), &m)| {
            let e = (g as f64 - c).abs() / m.max(1e-30);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// The GPU for tests: an adapter must exist (lavapipe in CI) unless QUARRY_GPU_TESTS=skip.
pub fn test_gpu() -> Option<Gpu> {
    match Gpu::new() {
        Ok(gpu) => {
            eprintln!("adapter: {}", gpu.adapter());
            Some(gpu)
        }
        Err(GpuError::NoAdapter(m))
            if std::env::var("QUARRY_GPU_TESTS").as_deref() == Ok("skip") =>
        {
            eprintln!("QUARRY_GPU_TESTS=skip and no adapter ({m}): skipping");
            None
        }
        Err(e) => {
            panic!("{e} (set QUARRY_GPU_TESTS=skip to skip GPU tests on a machine without Vulkan)")
        }
    }
}
