//! The integer decode-path kernels for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: the scalar row
//! kernel (`gemv_rows` on these types) against an f64 dot product of the decoded weights and
//! decoded 8-bit activations, and every panel kernel this CPU runs (`PackedRows`, AVX2 and
//! AVX-512 VNNI) against its scalar reference bit for bit and against the row kernel to
//! rounding; extreme codes that could overflow narrow intermediate sums, and the end-to-end
//! error of 8-bit activations against unquantized ones.

mod common;

use half::f16;
use proptest::prelude::*;
use quarry_kernels::act::QuantizedActivations;
use quarry_kernels::dot::{gemv_packed_tokens, gemv_rows, packed, Isa, PackedRows};
use quarry_kernels::{dequantize, quantize, GgmlType, WeightView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
];

/// Byte offsets of a block's f16 fields: `d`, and `m` for the types with a minimum.
fn f16_fields(dtype: GgmlType) -> &'static [usize] {
    match dtype {
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        _ => &[0],
    }
}

/// `rows × cols` weights: random bytes (every code and fifth bit), with finite scales and
/// minimums of either sign between 1e-3 and 2 in magnitude.
fn random_weights(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..rows * cols / 32 * dtype.type_size())
        .map(|_| rng.gen())
        .collect();
    for block in bytes.chunks_exact_mut(dtype.type_size()) {
        for &at in f16_fields(dtype) {
            let v = rng.gen_range(1e-3f32..2.0) * if rng.gen() { 1.0 } else { -1.0 };
            block[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        }
    }
    bytes
}

/// The scalar row kernel (`gemv_rows`) on token 0 of `x`, for rows `rows` of `w`.
fn gemv(w: &WeightView<'_>, rows: std::ops::Range<usize>, x: &QuantizedActivations) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows.len()];
    gemv_rows(Isa::Scalar, w, rows, x, 0, &mut out);
    out
}

/// Each panel kernel this CPU runs, on token 0 of `x`, for rows `rows` of `w` (computed from
/// row 0, since a panel product starts at a panel).
fn panels(
    w: &WeightView<'_>,
    rows: std::ops::Range<usize>,
    x: &QuantizedActivations,
) -> Vec<(Isa, Vec<f32>)> {
    Isa::available()
        .into_iter()
        .filter_map(|isa| PackedRows::for_isa(w, isa))
        .map(|p| {
            let mut out = vec![f32::NAN; rows.end];
            gemv_packed_tokens(&p, 0..rows.end, x, 0, &mut [&mut out[..]]);
            (p.isa(), out[rows.clone()].to_vec())
        })
        .collect()
}

/// Row `row` of `w` decoded to f32.
fn decoded_row(w: &WeightView<'_>, row: usize) -> Vec<f32> {
    let rb = w.row_bytes();
    let mut vals = vec![0f32; w.cols()];
    dequantize(w.dtype(), &w.data()[row * rb..(row + 1) * rb], &mut vals).unwrap();
    vals
}

/// Row `row` of `w` · `x`, and Σ|w·x| (the scale errors are measured against), in f64.
fn f64_dot(w: &WeightView<'_>, row: usize, x: &[f32]) -> (f64, f64) {
    decoded_row(w, row)
        .iter()
        .zip(x)
        .fold((0.0, 0.0), |(s, m), (&a, &b)| {
            let p = a as f64 * b as f64;
            (s + p, m + p.abs())
        })
}

/// Token 0 of `x` as the kernels see it: each 8-bit code times its block scale.
fn decoded_activations(x: &QuantizedActivations) -> Vec<f32> {
    x.q8x32(0)
        .iter()
        .flat_map(|b| b.qs.map(|q| q as f32 * b.d))
        .collect()
}

/// Checks every panel kernel on rows `range` of `w` against the scalar row kernel (to
/// `simd_tol` of Σ|w·x|) and the scalar kernel against the f64 reference (to 1e-4).
fn check_all_levels(
    w: &WeightView<'_>,
    range: std::ops::Range<usize>,
    x: &QuantizedActivations,
    simd_tol: f64,
) -> Result<(), TestCaseError> {
    let xq = decoded_activations(x);
    let scalar = gemv(w, range.clone(), x);
    let panels = panels(w, range.clone(), x);
    for (i, &s) in scalar.iter().enumerate() {
        let (want, mag) = f64_dot(w, range.start + i, &xq);
        prop_assert!(
            (s as f64 - want).abs() <= 1e-4 * mag,
            "{:?} row {}: scalar {s} vs f64 {want} (Σ|w·x| {mag})",
            w,
            range.start + i
        );
        for (isa, got) in &panels {
            let got = got[i];
            prop_assert!(
                (got as f64 - s as f64).abs() <= simd_tol * mag,
                "{:?} row {} {isa:?}: {got} vs scalar {s} (Σ|w·x| {mag})",
                w,
                range.start + i
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_level_matches_scalar_and_scalar_matches_f64(
        dtype in proptest::sample::select(TYPES.to_vec()),
        cols in proptest::sample::select(vec![32usize, 64, 96, 608, 640, 1536 + 32, 2048, 2048 + 96]),
        n_rows in proptest::sample::select(vec![1usize, 2, 3, 5, 17]),
        skip in 0usize..4,
        sigma in proptest::sample::select(vec![1e-3f32, 1.0, 50.0]),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let total = skip + n_rows + 1;
        let bytes = random_weights(&mut rng, dtype, total, cols);
        let w = WeightView::new(dtype, total, cols, &bytes).unwrap();
        let mut x = common::gaussian(&mut rng, cols, sigma);
        // A silent block: zero scale and zero sum.
        x[..32].fill(0.0);
        let x = QuantizedActivations::new(&x, 1, cols);
        check_all_levels(&w, skip..skip + n_rows, &x, 1e-5)?;
    }
}

/// The panel kernel on `p` for rows `rows` and every token of `x`, and the scalar reference
/// on `w` (the same matrix unpacked) for the same.
fn packed_and_reference(
    p: &PackedRows,
    w: &WeightView<'_>,
    rows: std::ops::Range<usize>,
    x: &QuantizedActivations,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let run = |f: &dyn Fn(&mut [&mut [f32]])| {
        let mut outs = vec![vec![f32::NAN; rows.len()]; x.n_tokens()];
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        f(&mut slices);
        outs
    };
    let acts: Vec<_> = (0..x.n_tokens()).map(|t| x.q8x32(t)).collect();
    (
        run(&|o| gemv_packed_tokens(p, rows.clone(), x, 0, o)),
        run(&|o| packed::reference(w, rows.clone(), &acts, o)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Weights repacked into 16-row panels, for each panel kernel this CPU runs (AVX2,
    /// AVX-512 VNNI): the kernel equals its scalar reference bit for bit, for row counts
    /// that end mid-panel, ranges that start at later panels and token counts on both sides
    /// of a pass; the reference agrees with the scalar row kernel to rounding.
    #[test]
    fn packed_panels_equal_the_reference_bit_for_bit(
        dtype in proptest::sample::select(TYPES.to_vec()),
        cols in proptest::sample::select(vec![32usize, 96, 608, 2048 + 96]),
        n_rows in 1usize..40,
        skip_panels in 0usize..3,
        n_tokens in 1usize..13,
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let skip = skip_panels * packed::PANEL;
        let total = skip + n_rows;
        let bytes = random_weights(&mut rng, dtype, total, cols);
        let w = WeightView::new(dtype, total, cols, &bytes).unwrap();
        let mut x = common::gaussian(&mut rng, n_tokens * cols, 1.0);
        x[..32].fill(0.0);
        let x = QuantizedActivations::new(&x, n_tokens, cols).with_integer_tokens(n_tokens);
        for p in Isa::available().into_iter().filter_map(|isa| PackedRows::for_isa(&w, isa)) {
            prop_assert_eq!((p.dtype(), p.rows(), p.cols()), (dtype, total, cols));
            // Unpacking gives back the file's bytes, for any run of rows.
            let rb = w.row_bytes();
            let mut back = vec![0u8; n_rows * rb];
            p.unpack_rows(skip, n_rows, &mut back);
            prop_assert_eq!(&back[..], &bytes[skip * rb..]);
            let (got, want) = packed_and_reference(&p, &w, skip..total, &x);
            for t in 0..n_tokens {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&got[t]), bits(&want[t]), "{} {:?} token {}", dtype, p.isa(), t);
            }
        }
        let acts: Vec<_> = (0..n_tokens).map(|t| x.q8x32(t)).collect();
        let mut want = vec![vec![f32::NAN; n_rows]; n_tokens];
        let mut slices: Vec<&mut [f32]> = want.iter_mut().map(|o| o.as_mut_slice()).collect();
        packed::reference(&w, skip..total, &acts, &mut slices);
        for (t, want) in want.iter().enumerate() {
            let mut alone = vec![f32::NAN; n_rows];
            gemv_rows(Isa::Scalar, &w, skip..total, &x, t, &mut alone);
            let xq: Vec<f32> = x.q8x32(t).iter().flat_map(|b| b.qs.map(|q| q as f32 * b.d)).collect();
            for (i, (&a, &r)) in alone.iter().zip(want).enumerate() {
                let (_, mag) = f64_dot(&w, skip + i, &xq);
                prop_assert!((a as f64 - r as f64).abs() <= 1e-5 * mag, "{} row {}: {} vs {}", dtype, i, r, a);
            }
        }
    }
}

/// Constant codes at their extremes (all bits set, all clear, the sign bit alone, …) against
/// activations at ±127: the largest sums any narrow intermediate of a kernel can meet.
#[test]
fn extreme_codes_do_not_overflow() {
    let cols = 640;
    let rows = 6;
    let patterns: [Vec<f32>; 3] = [
        vec![1.0; cols],
        vec![-1.0; cols],
        (0..cols)
            .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect(),
    ];
    for dtype in TYPES {
        for code in [0x00u8, 0xFF, 0x80, 0x7F, 0x88, 0x0F, 0xF0] {
            let mut bytes = vec![code; rows * cols / 32 * dtype.type_size()];
            for block in bytes.chunks_exact_mut(dtype.type_size()) {
                for &at in f16_fields(dtype) {
                    block[at..at + 2].copy_from_slice(&f16::from_f32(0.75).to_le_bytes());
                }
            }
            let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
            for x in &patterns {
                let x = QuantizedActivations::new(x, 1, cols);
                assert!(x
                    .q8x32(0)
                    .iter()
                    .all(|b| b.qs.iter().all(|q| q.abs() == 127)));
                check_all_levels(&w, 1..rows, &x, 1e-5)
                    .unwrap_or_else(|e| panic!("{dtype} code {code:#04x}: {e}"));
                for isa in Isa::available() {
                    let Some(p) = PackedRows::for_isa(&w, isa) else {
                        continue;
                    };
                    let (got, want) = packed_and_reference(&p, &w, 0..rows, &x);
                    assert_eq!(got, want, "{dtype} code {code:#04x}: packed for {isa:?}");
                }
            }
        }
    }
}

#[test]
fn empty_ranges_and_zero_columns() {
    let bytes = random_weights(&mut StdRng::seed_from_u64(1), GgmlType::Q8_0, 3, 64);
    let w = WeightView::new(GgmlType::Q8_0, 3, 64, &bytes).unwrap();
    let x = QuantizedActivations::new(&[0.5; 64], 1, 64);
    let no_cols = QuantizedActivations::new(&[], 1, 0);
    assert!(gemv(&w, 3..3, &x).is_empty());
    for dtype in TYPES {
        let w = WeightView::new(dtype, 3, 0, &[]).unwrap();
        assert_eq!(gemv(&w, 0..3, &no_cols), [0.0; 3], "{dtype}");
        for (isa, got) in panels(&w, 0..3, &no_cols) {
            assert_eq!(got, [0.0; 3], "{dtype} {isa:?}");
        }
    }
}

/// Codes and fifth bits of one block packed as the 4-bit and 5-bit types store them.
fn pack_codes(codes: &[u8; 32]) -> (u32, [u8; 16]) {
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        qs[j] = (codes[j] & 0x0F) | (codes[j + 16] & 0x0F) << 4;
    }
    for (i, &c) in codes.iter().enumerate() {
        qh |= ((c >> 4) as u32 & 1) << i;
    }
    (qh, qs)
}

/// A plain round-to-nearest encoder for the types `quantize` does not write: symmetric
/// (Q4_0, Q5_0) or min/max (Q4_1, Q5_1) scaling per block.
fn encode(dtype: GgmlType, x: &[f32]) -> Vec<u8> {
    if dtype == GgmlType::Q8_0 {
        let mut out = vec![0u8; x.len() / 32 * dtype.type_size()];
        quantize(dtype, x, &mut out).unwrap();
        return out;
    }
    let levels = if matches!(dtype, GgmlType::Q4_0 | GgmlType::Q4_1) {
        16
    } else {
        32
    };
    let mut out = Vec::new();
    for v in x.chunks_exact(32) {
        let (d, m, zero) = if matches!(dtype, GgmlType::Q4_0 | GgmlType::Q5_0) {
            let amax = v.iter().fold(0f32, |a, &b| a.max(b.abs()));
            let half = (levels / 2) as f32;
            (amax / (half - 1.0), 0.0, half)
        } else {
            let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ((hi - lo) / (levels - 1) as f32, lo, 0.0)
        };
        let (d, m) = (f16::from_f32(d), f16::from_f32(m));
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let mut codes = [0u8; 32];
        for (c, &val) in codes.iter_mut().zip(v) {
            *c = ((val - m.to_f32()) * inv + zero)
                .round()
                .clamp(0.0, (levels - 1) as f32) as u8;
        }
        let (qh, qs) = pack_codes(&codes);
        out.extend(d.to_le_bytes());
        if matches!(dtype, GgmlType::Q4_1 | GgmlType::Q5_1) {
            out.extend(m.to_le_bytes());
        }
        if levels == 32 {
            out.extend(qh.to_le_bytes());
        }
        out.extend(qs);
    }
    out
}

/// With Gaussian weights and inputs, quantizing the input to 8 bits moves the result by
/// well under 1% of Σ|w·x| (weights taken as their decoded values, so only the activation
/// rounding is measured).
#[test]
fn eight_bit_activations_stay_close_to_f32() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (24, 1536);
    for dtype in TYPES {
        let bytes = encode(dtype, &common::gaussian(&mut rng, rows * cols, 0.02));
        let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
        assert!(w
            .data()
            .chunks_exact(dtype.type_size())
            .any(|b| b[0] != 0 || b[1] != 0));
        let x = common::gaussian(&mut rng, cols, 1.0);
        let xq = QuantizedActivations::new(&x, 1, cols);
        let scalar = (Isa::Scalar, gemv(&w, 0..rows, &xq));
        for (isa, got) in std::iter::once(scalar).chain(panels(&w, 0..rows, &xq)) {
            for (r, &g) in got.iter().enumerate() {
                let (want, mag) = f64_dot(&w, r, &x);
                let err = (g as f64 - want).abs() / mag;
                assert!(
                    err < 0.01,
                    "{dtype} {isa:?} row {r}: {g} vs {want}, error {err:.2e} of Σ|w·x|"
                );
            }
        }
    }
}

#[test]
fn the_encoder_round_trips_its_codes() {
    // 5-bit codes 0..32 of Q5_1 with d = 1 and m = 0 decode to themselves.
    let x: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let bytes = encode(GgmlType::Q5_1, &x);
    let mut back = [0f32; 32];
    dequantize(GgmlType::Q5_1, &bytes, &mut back).unwrap();
    assert_eq!(back.to_vec(), x);
}

/// A matrix larger than one slab ([`packed::SLAB_BYTES`]) is packed slab by slab: the hook
/// sees every byte of the file's rows exactly once, in order, in more than one piece, each
/// after its panels are written, and unpacking gives the file's bytes back (Q8_0 and Q4_K:
/// the 32-value and the K-quant packers).
#[test]
fn packing_hands_over_the_file_a_slab_at_a_time() {
    let mut rng = StdRng::seed_from_u64(7);
    for (dtype, rows, cols) in [(GgmlType::Q8_0, 8200, 2048), (GgmlType::Q4_K, 12000, 2560)] {
        let rb = cols / dtype.block_size() * dtype.type_size();
        let bytes: Vec<u8> = (0..rows * rb).map(|_| rng.gen()).collect();
        assert!(bytes.len() > packed::SLAB_BYTES);
        let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
        for isa in Isa::available() {
            let seen = std::sync::Mutex::new(Vec::new());
            let hook = |part: &[u8]| {
                let start = part.as_ptr() as usize - bytes.as_ptr() as usize;
                seen.lock().unwrap().push(start..start + part.len());
            };
            let Some(p) = PackedRows::for_isa_releasing(&w, isa, &hook) else {
                continue;
            };
            let seen = seen.into_inner().unwrap();
            assert!(seen.len() > 1, "{dtype} {isa:?}: one piece");
            assert_eq!(seen.first().unwrap().start, 0);
            assert_eq!(seen.last().unwrap().end, bytes.len());
            assert!(seen.windows(2).all(|p| p[0].end == p[1].start), "{seen:?}");
            let mut back = vec![0u8; bytes.len()];
            p.unpack_rows(0, rows, &mut back);
            assert!(back == bytes, "{dtype} {isa:?}: unpacked bytes differ");
        }
    }
}
