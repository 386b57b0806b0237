//! `matmul` and `WeightView::dequantize_row` against a naive reference that decodes the
//! whole matrix with `dequantize` and multiplies in f64, for every decodable type and
//! awkward shapes (single rows, rows that split unevenly into chunks and tiles, up to 8
//! tokens through the row-by-row path and more through the tiled GEMM path), and the fused
//! dispatch of several products against the products one by one.

mod common;

use proptest::prelude::*;
use quarry_kernels::{
    dequantize, matmul, matmul_quantized, matmul_quantized_many, quantize, GgmlType, Matrix,
    QuantizedActivations, WeightView,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Every type `dequantize` and `WeightView` accept.
const DECODABLE: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Byte offsets of the float scale fields in one block, with their width (2 = f16,
/// 4 = f32); every other byte of a block may hold any value.
fn scale_fields(dtype: GgmlType) -> &'static [(usize, usize)] {
    match dtype {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[(0, 2)],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => &[(0, 2), (2, 2)],
        GgmlType::Q4_K | GgmlType::Q5_K => &[(0, 2), (2, 2)],
        GgmlType::Q2_K => &[(80, 2), (82, 2)],
        GgmlType::Q3_K => &[(108, 2)],
        GgmlType::Q6_K => &[(208, 2)],
        GgmlType::Q8_K => &[(0, 4)],
        other => panic!("{other} has no block scales"),
    }
}

/// `n` values' worth of encoded data: float types hold Gaussian values; block types hold
/// random bytes with finite, moderate scales, so every bit of every field is exercised.
fn random_encoded(rng: &mut StdRng, dtype: GgmlType, n: usize) -> Vec<u8> {
    let len = dtype.bytes_for(n as u64).expect("whole blocks") as usize;
    let mut out = vec![0u8; len];
    if !dtype.is_quantized() {
        quantize(dtype, &common::gaussian(rng, n, 1.0), &mut out).unwrap();
        return out;
    }
    rng.fill(&mut out[..]);
    for block in out.chunks_exact_mut(dtype.type_size()) {
        for &(at, width) in scale_fields(dtype) {
            let s: f32 = rng.gen_range(-0.1..0.1);
            if width == 2 {
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
            } else {
                block[at..at + 4].copy_from_slice(&s.to_le_bytes());
            }
        }
    }
    out
}

/// Checks `matmul` on one random case; the error bound is relative to Σ|w||x| per output,
/// which bounds f32 rounding whatever the cancellation.
fn check(dtype: GgmlType, rows: usize, cols: usize, n_tokens: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = random_encoded(&mut rng, dtype, rows * cols);
    let x = common::gaussian(&mut rng, n_tokens * cols, 1.0);
    let w = WeightView::new(dtype, rows, cols, &data).unwrap();

    let mut dense = vec![0f32; rows * cols];
    dequantize(dtype, &data, &mut dense).unwrap();
    let mut row = vec![0f32; cols];
    for r in [0, rows / 2, rows - 1] {
        w.dequantize_row(r, &mut row);
        assert_eq!(row, dense[r * cols..(r + 1) * cols], "{dtype} row {r}");
    }

    let mut y = vec![f32::NAN; n_tokens * rows];
    matmul(&w, &x, n_tokens, &mut y);
    for t in 0..n_tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &dense[r * cols..(r + 1) * cols];
            let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = y[t * rows + r] as f64;
            assert!(
                (got - exact).abs() <= 1e-5 * scale + 1e-30,
                "{dtype} {rows}x{cols}, {n_tokens} tokens: y[{t}][{r}] = {got}, want {exact}"
            );
        }
    }
}

/// Column counts for a type: one to three blocks, plus odd lengths for scalar types.
fn cols_for(dtype: GgmlType, pick: usize) -> usize {
    match dtype.block_size() {
        1 => [1, 5, 67, 300, 640][pick % 5],
        bs => bs * (1 + pick % 3),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn matmul_matches_the_naive_reference(
        dtype in proptest::sample::select(DECODABLE.to_vec()),
        rows in proptest::sample::select(vec![1usize, 3, 37, 130]),
        n_tokens in proptest::sample::select(vec![1usize, 2, 7, 33, 49]),
        pick in 0usize..15,
        seed in any::<u64>(),
    ) {
        check(dtype, rows, cols_for(dtype, pick), n_tokens, seed);
    }
}

#[test]
fn every_type_through_both_paths() {
    for (i, dtype) in DECODABLE.into_iter().enumerate() {
        for n_tokens in [1, 2, 33, 49] {
            check(dtype, 37, cols_for(dtype, i), n_tokens, i as u64);
        }
    }
}

#[test]
fn wide_rows_split_into_several_tiles() {
    // 4096 f32 columns leave room for 64 rows per tile, so 130 rows take at least three
    // tiles, the last one short; 2048 Q4_K columns make a row span several decode pieces.
    check(GgmlType::F32, 130, 4096, 49, 1);
    check(GgmlType::Q4_K, 130, 2048, 49, 2);
    check(GgmlType::Q4_K, 130, 2048, 3, 3);
    check(GgmlType::Q4_K, 130, 2048, 1, 4);
}

#[test]
fn fused_products_equal_products_one_at_a_time() {
    let mut rng = StdRng::seed_from_u64(11);
    let cols = 512;
    let shapes = [
        (GgmlType::Q8_0, 37),
        (GgmlType::Q4_K, 130),
        (GgmlType::F32, 9),
        (GgmlType::Q5_0, 1),
    ];
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(t, rows)| random_encoded(&mut rng, t, rows * cols))
        .collect();
    let views: Vec<WeightView<'_>> = shapes
        .iter()
        .zip(&data)
        .map(|(&(t, rows), d)| WeightView::new(t, rows, cols, d).unwrap())
        .collect();
    let matrices: Vec<Matrix<'_>> = views.iter().map(|&w| Matrix::new(w)).collect();
    for n_tokens in [1, 3] {
        let x = common::gaussian(&mut rng, n_tokens * cols, 1.0);
        let xq = QuantizedActivations::new(&x, n_tokens, cols);
        let mut fused: Vec<Vec<f32>> = views
            .iter()
            .map(|w| vec![f32::NAN; n_tokens * w.rows()])
            .collect();
        let mut products: Vec<(&Matrix<'_>, &mut [f32])> = matrices
            .iter()
            .zip(fused.iter_mut())
            .map(|(w, y)| (w, y.as_mut_slice()))
            .collect();
        matmul_quantized_many(&mut products, &xq);
        for (w, y) in matrices.iter().zip(&fused) {
            let mut single = vec![f32::NAN; n_tokens * w.view().rows()];
            matmul_quantized(w, &xq, &mut single);
            assert_eq!(&single, y, "{} with {n_tokens} tokens", w.view().dtype());
        }
    }
}

#[test]
fn decode_tokens_of_a_batch_equal_each_token_alone() {
    let mut rng = StdRng::seed_from_u64(12);
    let cols = 512;
    for (dtype, rows) in [
        (GgmlType::Q4_K, 130),
        (GgmlType::Q6_K, 45),
        (GgmlType::Q4_1, 67),
        (GgmlType::Q8_0, 35),
        (GgmlType::F32, 9),
    ] {
        let data = random_encoded(&mut rng, dtype, rows * cols);
        let view = WeightView::new(dtype, rows, cols, &data).unwrap();
        let w = Matrix::new(view);
        // More decode tokens than a pass of the panel kernel takes.
        let (n, decode) = (12, 10);
        let x = common::gaussian(&mut rng, n * cols, 1.0);
        let xq = QuantizedActivations::new(&x, n, cols).with_integer_tokens(decode);
        let mut batch = vec![f32::NAN; n * rows];
        matmul_quantized(&w, &xq, &mut batch);
        for t in 0..decode {
            let alone = QuantizedActivations::new(&x[t * cols..(t + 1) * cols], 1, cols);
            let mut y = vec![f32::NAN; rows];
            matmul_quantized(&w, &alone, &mut y);
            assert_eq!(
                &batch[t * rows..(t + 1) * rows],
                &y[..],
                "{dtype} token {t}"
            );
        }
        // The other rows: on a panel kernel in 8 bits, each as if it were a prompt row
        // alone; otherwise in f32, as `matmul` computes them.
        let mut rest = vec![f32::NAN; (n - decode) * rows];
        if w.is_packed() {
            for (t, y) in rest.chunks_mut(rows).enumerate() {
                let row = &x[(decode + t) * cols..(decode + t + 1) * cols];
                let alone = QuantizedActivations::new(row, 1, cols).with_integer_tokens(0);
                matmul_quantized(&w, &alone, y);
            }
        } else {
            matmul(&view, &x[decode * cols..], n - decode, &mut rest);
        }
        assert_eq!(&batch[decode * rows..], &rest[..], "{dtype} prompt rows");
    }
}

/// Segments of a batch (one per sequence) get exactly the products each gets alone, whether
/// short ones are merged into one row-wise product or a long one takes the tiled path.
#[test]
fn each_segment_of_a_batch_equals_that_segment_alone() {
    let mut rng = StdRng::seed_from_u64(14);
    let cols = 512;
    for dtype in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let rows = 77;
        let data = random_encoded(&mut rng, dtype, rows * cols);
        let w = Matrix::new(WeightView::new(dtype, rows, cols, &data).unwrap());
        let (decode, segments) = (2, vec![30, 1, 40, 60, 20]);
        let n = decode + segments.iter().sum::<usize>();
        let x = common::gaussian(&mut rng, n * cols, 1.0);
        let xq = QuantizedActivations::new(&x, n, cols)
            .with_integer_tokens(decode)
            .with_segments(segments.clone());
        let mut batch = vec![f32::NAN; n * rows];
        matmul_quantized(&w, &xq, &mut batch);
        let mut first = decode;
        for len in segments {
            let alone_x = &x[first * cols..(first + len) * cols];
            let alone = QuantizedActivations::new(alone_x, len, cols).with_integer_tokens(0);
            let mut y = vec![f32::NAN; len * rows];
            matmul_quantized(&w, &alone, &mut y);
            assert_eq!(
                &batch[first * rows..(first + len) * rows],
                &y[..],
                "{dtype} segment at {first}"
            );
            // A packed matrix multiplies every row in 8 bits, each as a prompt row alone;
            // another takes the f32 paths on its file view.
            let mut expected = vec![f32::NAN; len * rows];
            if w.is_packed() {
                for (t, e) in expected.chunks_mut(rows).enumerate() {
                    let row = &alone_x[t * cols..(t + 1) * cols];
                    let one = QuantizedActivations::new(row, 1, cols).with_integer_tokens(0);
                    matmul_quantized(&w, &one, e);
                }
            } else {
                matmul(&w.view(), alone_x, len, &mut expected);
            }
            assert_eq!(y, expected, "{dtype} segment at {first}");
            first += len;
        }
    }
}

/// A matrix's rows read back from its repacked copy equal the file's, for every type the
/// panels take (a tied embedding is looked up that way).
#[test]
fn rows_read_from_the_repacked_copy_equal_the_files() {
    let mut rng = StdRng::seed_from_u64(15);
    let cols = 512;
    for dtype in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let rows = 37;
        let data = random_encoded(&mut rng, dtype, rows * cols);
        let view = WeightView::new(dtype, rows, cols, &data).unwrap();
        let w = Matrix::new(view);
        let (mut ours, mut file) = (vec![f32::NAN; cols], vec![f32::NAN; cols]);
        for r in [0, 1, 15, 16, 36] {
            w.dequantize_row(r, &mut ours);
            view.dequantize_row(r, &mut file);
            assert_eq!(ours, file, "{dtype} row {r} (packed: {})", w.is_packed());
        }
    }
}
