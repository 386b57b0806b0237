//! The K-quant integer dot products (`gemv_rows` on Q2_K … Q6_K) against references, through
//! the public API: every available instruction set agrees with the scalar kernel, the scalar
//! kernel agrees with an f64 product of the dequantized weights and dequantized 8-bit
//! activations, and the whole quantized path stays within 1% of the `f32` product.
//!
//! Error bounds are relative to Σ|w·x| for the output in question, which bounds rounding
//! error whatever the cancellation in the sum itself.

mod common;

use proptest::prelude::*;
use quarry_kernels::act::QuantizedActivations;
use quarry_kernels::dot::{
    gemv_packed_tokens, gemv_rows, has_integer_kernel, kquant_panels, Isa, PackedRows,
};
use quarry_kernels::{dequantize, quantize, GgmlType, WeightView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KQUANTS: [GgmlType; 5] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Byte offsets of each block's f16 scales (`d`, and `dmin` where the type has one).
fn f16_fields(dtype: GgmlType) -> &'static [usize] {
    match dtype {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        other => panic!("{other} is not a K-quant"),
    }
}

/// Random blocks: every quant and packed-scale bit random, f16 scales finite, of either sign
/// and of magnitudes from 1e-4 to 0.1 (so no NaN or infinity reaches the kernels).
fn random_blocks(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let mut data = vec![0u8; rows * dtype.bytes_for(cols as u64).unwrap() as usize];
    rng.fill(&mut data[..]);
    for block in data.chunks_exact_mut(dtype.type_size()) {
        for &at in f16_fields(dtype) {
            let magnitude = 10f32.powf(rng.gen_range(-4.0..-1.0));
            let s = if rng.gen() { magnitude } else { -magnitude };
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
        }
    }
    data
}

fn dequantized(w: &WeightView<'_>) -> Vec<f32> {
    let mut dense = vec![0f32; w.rows() * w.cols()];
    dequantize(w.dtype(), w.data(), &mut dense).unwrap();
    dense
}

/// Runs `gemv_rows` for `rows` of `w` against token 0 of `x`.
fn gemv(
    isa: Isa,
    w: &WeightView<'_>,
    rows: std::ops::Range<usize>,
    x: &QuantizedActivations<'_>,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows.len()];
    gemv_rows(isa, w, rows, x, 0, &mut out);
    out
}

/// Checks one random case: SIMD == scalar, scalar == f64 reference.
fn check(dtype: GgmlType, rows: usize, cols: usize, first: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let total_rows = first + rows;
    let data = random_blocks(&mut rng, dtype, total_rows, cols);
    let w = WeightView::new(dtype, total_rows, cols, &data).unwrap();
    let x_f32 = common::gaussian(&mut rng, cols, 1.0);
    let x = QuantizedActivations::new(&x_f32, 1, cols);
    // The activations exactly as the kernels see them.
    let x_q: Vec<f64> = x
        .q8x256(0)
        .iter()
        .flat_map(|b| b.qs.iter().map(move |&q| b.d as f64 * q as f64))
        .collect();
    let dense = dequantized(&w);

    let range = first..total_rows;
    let scalar = gemv(Isa::Scalar, &w, range.clone(), &x);
    for (i, &s) in scalar.iter().enumerate() {
        let wr = &dense[(first + i) * cols..][..cols];
        let exact: f64 = wr.iter().zip(&x_q).map(|(&w, &x)| w as f64 * x).sum();
        let scale: f64 = wr
            .iter()
            .zip(&x_q)
            .map(|(&w, &x)| (w as f64 * x).abs())
            .sum();
        assert!(
            (s as f64 - exact).abs() <= 1e-4 * scale + 1e-30,
            "{dtype} {rows}x{cols} row {i}: scalar {s} vs exact {exact} (Σ|w·x| {scale})"
        );
    }
    for isa in Isa::available() {
        let got = gemv(isa, &w, range.clone(), &x);
        for (i, (&g, &s)) in got.iter().zip(&scalar).enumerate() {
            let wr = &dense[(first + i) * cols..][..cols];
            let scale: f64 = wr
                .iter()
                .zip(&x_q)
                .map(|(&w, &x)| (w as f64 * x).abs())
                .sum();
            assert!(
                ((g - s) as f64).abs() <= 1e-5 * scale + 1e-30,
                "{dtype} {isa:?} {rows}x{cols} row {i}: {g} vs scalar {s} (Σ|w·x| {scale})"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_isa_matches_scalar_and_scalar_matches_dequantized(
        dtype in proptest::sample::select(KQUANTS.to_vec()),
        cols in proptest::sample::select(vec![256usize, 512, 768, 2048, 2304]),
        rows in proptest::sample::select(vec![1usize, 2, 3, 5, 17]),
        first in 0usize..4,
        seed in any::<u64>(),
    ) {
        check(dtype, rows, cols, first, seed);
    }
}

/// Every type and shape once, so a regression shows even if proptest's sampling misses it.
#[test]
fn all_types_and_shapes() {
    for (t, dtype) in KQUANTS.into_iter().enumerate() {
        for cols in [256, 512, 768, 2048, 2304] {
            for rows in [1, 2, 3, 5, 17] {
                check(
                    dtype,
                    rows,
                    cols,
                    1 + rows % 3,
                    (t * 10_000 + cols + rows) as u64,
                );
            }
        }
    }
}

/// Gaussian weights (quantized with `quantize` where the crate can, random blocks otherwise)
/// and Gaussian activations: the integer path is within 1% of dequantized W · unquantized x.
#[test]
fn quantized_path_tracks_the_f32_product() {
    let (rows, cols) = (33, 2304);
    for dtype in KQUANTS {
        let mut rng = StdRng::seed_from_u64(7 + dtype as u64);
        let data = if matches!(dtype, GgmlType::Q4_K | GgmlType::Q6_K) {
            let wf = common::gaussian(&mut rng, rows * cols, 0.02);
            let mut data = vec![0u8; rows * dtype.bytes_for(cols as u64).unwrap() as usize];
            quantize(dtype, &wf, &mut data).unwrap();
            data
        } else {
            random_blocks(&mut rng, dtype, rows, cols)
        };
        let w = WeightView::new(dtype, rows, cols, &data).unwrap();
        let dense = dequantized(&w);
        let x_f32 = common::gaussian(&mut rng, cols, 1.0);
        let x = QuantizedActivations::new(&x_f32, 1, cols);
        for isa in Isa::available() {
            let got = gemv(isa, &w, 0..rows, &x);
            for (r, &g) in got.iter().enumerate() {
                let wr = &dense[r * cols..][..cols];
                let exact: f64 = wr
                    .iter()
                    .zip(&x_f32)
                    .map(|(&w, &x)| w as f64 * x as f64)
                    .sum();
                let scale: f64 = wr
                    .iter()
                    .zip(&x_f32)
                    .map(|(&w, &x)| (w as f64 * x as f64).abs())
                    .sum();
                assert!(
                    (g as f64 - exact).abs() <= 0.01 * scale,
                    "{dtype} {isa:?} row {r}: {g} vs f32 product {exact} (Σ|w·x| {scale})"
                );
            }
        }
    }
}

#[test]
fn every_kquant_has_an_integer_kernel() {
    for dtype in KQUANTS {
        assert!(has_integer_kernel(dtype), "{dtype}");
    }
}

/// An empty row range writes nothing and does not touch the weights.
#[test]
fn empty_row_range() {
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in KQUANTS {
        let data = random_blocks(&mut rng, dtype, 3, 512);
        let w = WeightView::new(dtype, 3, 512, &data).unwrap();
        let x_f32 = common::gaussian(&mut rng, 512, 1.0);
        let x = QuantizedActivations::new(&x_f32, 1, 512);
        for isa in Isa::available() {
            assert!(gemv(isa, &w, 2..2, &x).is_empty());
        }
    }
}

/// The Q4_K and Q6_K panels on awkward shapes and extreme values (rows not a multiple of 16, one to nine tokens: passes
/// of the kernel's four and a short last one, any first panel) equal the scalar reference
/// bit for bit, and the reference stays within 1e-4 of Σ|w·x| of the dequantized product;
/// unpacking gives back the file's bytes.
#[test]
fn kquant_panels_equal_the_reference_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(41);
    for (dtype, rows, cols, tokens, first_panel) in [
        (GgmlType::Q4_K, 1, 256, 1, 0),
        (GgmlType::Q4_K, 17, 256, 3, 1),
        (GgmlType::Q4_K, 40, 512, 9, 0),
        (GgmlType::Q4_K, 33, 1280, 5, 2),
        (GgmlType::Q4_K, 16, 512, 4, 0),
        (GgmlType::Q6_K, 16, 768, 4, 0),
        (GgmlType::Q6_K, 1, 256, 2, 0),
        (GgmlType::Q6_K, 35, 512, 7, 1),
    ] {
        let mut data = random_blocks(&mut rng, dtype, rows, cols);
        let mut x = common::gaussian(&mut rng, tokens * cols, 1.0);
        // The 16-row shapes take the largest sums the kernels' narrow sums must hold: every
        // code at its maximum and every activation at 127.
        if rows == 16 {
            let (codes, len) = if dtype == GgmlType::Q4_K {
                (16, 128)
            } else {
                (0, 192)
            };
            for block in data.chunks_exact_mut(dtype.type_size()) {
                block[codes..codes + len].fill(0xFF);
            }
            x.fill(1.0);
        }
        let w = WeightView::new(dtype, rows, cols, &data).unwrap();
        let xq = QuantizedActivations::new(&x, tokens, cols).with_integer_tokens(tokens);
        let range = (16 * first_panel).min(rows)..rows;
        let acts: Vec<&[_]> = (0..tokens).map(|t| xq.q8x256(t)).collect();
        let mut want = vec![vec![f32::NAN; range.len()]; tokens];
        {
            let mut outs: Vec<&mut [f32]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
            kquant_panels::reference(&w, range.clone(), &acts, &mut outs);
        }
        let dense = dequantized(&w);
        for (t, row) in want.iter().enumerate() {
            let xs: Vec<f32> = xq
                .q8x256(t)
                .iter()
                .flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d))
                .collect();
            for (i, &got) in row.iter().enumerate() {
                let r = range.start + i;
                let wr = &dense[r * cols..(r + 1) * cols];
                let exact: f64 = wr.iter().zip(&xs).map(|(&a, &b)| a as f64 * b as f64).sum();
                let scale: f64 = wr
                    .iter()
                    .zip(&xs)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                assert!(
                    (got as f64 - exact).abs() <= 1e-4 * scale + 1e-6,
                    "{dtype} {rows}x{cols} token {t} row {r}: reference {got} against {exact}"
                );
            }
        }
        for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
            let p = PackedRows::for_isa(&w, isa).expect("AVX2 and AVX-512 pack the K-quants");
            let mut got = vec![vec![f32::NAN; range.len()]; tokens];
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
            gemv_packed_tokens(&p, range.clone(), &xq, 0, &mut outs);
            assert_eq!(
                got, want,
                "{isa:?} {dtype} {rows}x{cols}, {tokens} tokens from row {}",
                range.start
            );
            let mut back = vec![0u8; data.len()];
            p.unpack_rows(0, rows, &mut back);
            assert!(
                back == data,
                "{dtype} {rows}x{cols}: unpacked rows differ from the file's"
            );
        }
    }
}
