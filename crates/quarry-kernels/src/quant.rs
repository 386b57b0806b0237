//! Reference quantizers from `f32` to a few of ggml's block formats.
//!
//! Q8_0 and Q8_K follow ggml's rounding rules exactly, because activations quantized here
//! must match what llama.cpp's dot products expect. Q4_K and Q6_K use a fit of their own
//! (a few candidate grids, each refit by least squares) rather than ggml's search; their
//! output is a valid block that decodes with the layouts in `dequant`, but need not be
//! bit-identical to ggml's. The round-trip tests bound their error relative to the data's
//! RMS.

use half::{bf16, f16};
use quarry_format::{GgmlType, QK_K};

use crate::dequant::encoded_len;
use crate::KernelError;

/// Reference quantization for F32, F16, BF16, Q8_0, Q8_K, Q4_K and Q6_K: `dst` must be
/// exactly `dtype.bytes_for(src.len())` bytes.
pub fn quantize(dtype: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    let encode: fn(&[f32], &mut [u8]) = match dtype {
        GgmlType::F32 => |s, d| {
            each_block(s, d, |x: &[f32; 1], b: &mut [u8; 4]| {
                *b = x[0].to_le_bytes()
            })
        },
        GgmlType::F16 => |s, d| {
            each_block(s, d, |x: &[f32; 1], b: &mut [u8; 2]| {
                *b = f16::from_f32(x[0]).to_le_bytes()
            })
        },
        GgmlType::BF16 => |s, d| {
            each_block(s, d, |x: &[f32; 1], b: &mut [u8; 2]| {
                *b = bf16::from_f32(x[0]).to_le_bytes()
            })
        },
        GgmlType::Q8_0 => |s, d| each_block(s, d, q8_0),
        GgmlType::Q8_K => |s, d| each_block(s, d, q8_k),
        GgmlType::Q4_K => |s, d| each_block(s, d, q4_k),
        GgmlType::Q6_K => |s, d| each_block(s, d, q6_k),
        _ => {
            return Err(KernelError::UnsupportedType {
                dtype,
                op: "quantize",
            })
        }
    };
    let expected = encoded_len(dtype, src.len())?;
    if dst.len() != expected {
        return Err(KernelError::LengthMismatch {
            what: "quantize destination bytes",
            expected,
            actual: dst.len(),
        });
    }
    encode(src, dst);
    Ok(())
}

/// Runs a fixed-size block encoder over every block; the array types let the compiler
/// drop bounds checks inside `block`.
#[inline(always)]
fn each_block<const BS: usize, const TS: usize>(
    src: &[f32],
    dst: &mut [u8],
    block: impl Fn(&[f32; BS], &mut [u8; TS]),
) {
    for (x, b) in src.chunks_exact(BS).zip(dst.chunks_exact_mut(TS)) {
        block(
            x.try_into().expect("chunk of BS values"),
            b.try_into().expect("chunk of TS bytes"),
        );
    }
}

/// Q8_0: d = max|x| / 127 stored as f16, q = round(x / d) away from zero, as ggml does.
fn q8_0(x: &[f32; 32], b: &mut [u8; 34]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (q, &v) in b[2..].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

/// The value of largest magnitude, keeping its sign (0 for an all-zero or all-NaN input).
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Q8_K: like ggml, the value of largest magnitude maps to -127, so `d` carries the sign of
/// that value; q = round-half-even(x / d) in -127..=127, and bsums hold the sum of each 16 q.
fn q8_k(x: &[f32; QK_K], b: &mut [u8; 292]) {
    let max = signed_absmax(x);
    if max == 0.0 {
        b.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let mut qs = [0i8; QK_K];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (iscale * v).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    b[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    for (o, &q) in b[4..4 + QK_K].iter_mut().zip(&qs) {
        *o = q as u8;
    }
    for (s, group) in b[4 + QK_K..].chunks_exact_mut(2).zip(qs.chunks_exact(16)) {
        let sum: i16 = group.iter().map(|&q| q as i16).sum();
        s.copy_from_slice(&sum.to_le_bytes());
    }
}

/// Rounds `x / step` to the nearest level in `lo..=hi`; a zero step encodes everything as 0.
fn level(x: f32, step: f32, lo: f32, hi: f32) -> f32 {
    if step == 0.0 {
        0.0
    } else {
        (x / step).round().clamp(lo, hi)
    }
}

/// Fits x ≈ scale * q - min with q in 0..=nmax, scale >= 0 and min >= 0, returning
/// (scale, min). The range (widened to include 0 so the min stays non-negative, as the
/// format requires) gives a first grid; slightly coarser and finer grids are tried too,
/// since clipping an outlier can fit the bulk better. Each grid's levels get a
/// least-squares (scale, min), and the best is polished while the squared error drops.
fn fit_affine(x: &[f32], nmax: f32) -> (f32, f32) {
    let lo = x.iter().fold(0f32, |m, &v| m.min(v));
    let hi = x.iter().fold(lo, |m, &v| m.max(v));
    if hi <= lo {
        return (0.0, -lo);
    }
    let err = |(s, m): (f32, f32)| -> f32 {
        x.iter()
            .map(|&v| {
                let e = s * level(v + m, s, 0.0, nmax) - m - v;
                e * e
            })
            .sum()
    };
    let refit = |(s, m): (f32, f32)| -> Option<(f32, f32)> {
        let n = x.len() as f32;
        let (mut sq, mut sx, mut sqq, mut sqx) = (0f32, 0f32, 0f32, 0f32);
        for &v in x {
            let q = level(v + m, s, 0.0, nmax);
            sq += q;
            sx += v;
            sqq += q * q;
            sqx += q * v;
        }
        let det = n * sqq - sq * sq;
        if det <= 0.0 {
            return None;
        }
        let s2 = (n * sqx - sq * sx) / det;
        let m2 = -(sx - s2 * sq) / n;
        // A negative min is not representable: refit the scale alone with min = 0.
        let fit = if m2 < 0.0 { (sqx / sqq, 0.0) } else { (s2, m2) };
        (fit.0 > 0.0).then_some(fit)
    };
    let mut best = ((hi - lo) / nmax, -lo);
    let mut best_err = err(best);
    for k in -4..=8 {
        let grid = ((hi - lo) / (nmax + 0.25 * k as f32), -lo);
        if let Some(fit) = refit(grid) {
            let e = err(fit);
            if e < best_err {
                (best, best_err) = (fit, e);
            }
        }
    }
    for _ in 0..4 {
        match refit(best).map(|f| (f, err(f))) {
            Some((fit, e)) if e < best_err => (best, best_err) = (fit, e),
            _ => break,
        }
    }
    best
}

/// Q4_K: each 32-value sub-block gets an affine fit, whose scale and min are then stored as
/// 6-bit multiples of the super-block's f16 `d` and `dmin`; the 4-bit q are re-rounded
/// against the scales actually stored.
fn q4_k(x: &[f32; QK_K], b: &mut [u8; 144]) {
    let mut fits = [(0f32, 0f32); 8];
    for (f, sub) in fits.iter_mut().zip(x.chunks_exact(32)) {
        *f = fit_affine(sub, 15.0);
    }
    let max_s = fits.iter().fold(0f32, |a, f| a.max(f.0));
    let max_m = fits.iter().fold(0f32, |a, f| a.max(f.1));
    let d = f16::from_f32(max_s / 63.0);
    let dmin = f16::from_f32(max_m / 63.0);
    let (df, dminf) = (d.to_f32(), dmin.to_f32());
    let sc = fits.map(|f| level(f.0, df, 0.0, 63.0) as u8);
    let mn = fits.map(|f| level(f.1, dminf, 0.0, 63.0) as u8);

    b[0..2].copy_from_slice(&d.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_le_bytes());
    // Inverse of `k4_scale_min`: sub-blocks 0..4 in the low six bits of bytes 0..8, 4..8 split
    // into a nibble of bytes 8..12 and the spare top two bits of bytes 0..8.
    for k in 0..4 {
        b[4 + k] = sc[k] | (sc[k + 4] >> 4) << 6;
        b[8 + k] = mn[k] | (mn[k + 4] >> 4) << 6;
        b[12 + k] = (sc[k + 4] & 0x0F) | (mn[k + 4] & 0x0F) << 4;
    }

    let mut q = [0u8; QK_K];
    for (j, (qj, xj)) in q.chunks_exact_mut(32).zip(x.chunks_exact(32)).enumerate() {
        let (s, m) = (df * sc[j] as f32, dminf * mn[j] as f32);
        for (qv, &v) in qj.iter_mut().zip(xj) {
            *qv = level(v + m, s, 0.0, 15.0) as u8;
        }
    }
    for c in 0..4 {
        for l in 0..32 {
            b[16 + 32 * c + l] = q[64 * c + l] | q[64 * c + 32 + l] << 4;
        }
    }
}

/// Fits x ≈ scale * q with q in -32..=31. The first grid maps the value of largest
/// magnitude to -32 (the wider side, so the scale carries its sign); slightly coarser and
/// finer grids are tried as in [`fit_affine`], each refit by least squares, and the best
/// is polished while the squared error drops.
fn fit_symmetric(x: &[f32]) -> f32 {
    let max = signed_absmax(x);
    if max == 0.0 {
        return 0.0;
    }
    let err = |s: f32| -> f32 {
        x.iter()
            .map(|&v| {
                let e = s * level(v, s, -32.0, 31.0) - v;
                e * e
            })
            .sum()
    };
    let refit = |s: f32| -> f32 {
        let (mut sqq, mut sqx) = (0f32, 0f32);
        for &v in x {
            let q = level(v, s, -32.0, 31.0);
            sqq += q * q;
            sqx += q * v;
        }
        sqx / sqq
    };
    let mut best = -max / 32.0;
    let mut best_err = err(best);
    for k in -4..=8 {
        let fit = refit(-max / (32.0 + 0.5 * k as f32));
        let e = err(fit);
        if e < best_err {
            (best, best_err) = (fit, e);
        }
    }
    for _ in 0..4 {
        let fit = refit(best);
        let e = err(fit);
        if e < best_err {
            (best, best_err) = (fit, e);
        } else {
            break;
        }
    }
    best
}

/// Q6_K: each 16-value sub-block gets a symmetric fit whose scale is stored as an i8
/// multiple of the super-block's f16 `d` (largest scale at -128, as ggml does); the 6-bit q
/// are re-rounded against the scales actually stored and kept with a +32 offset.
fn q6_k(x: &[f32; QK_K], b: &mut [u8; 210]) {
    let mut fits = [0f32; 16];
    for (f, sub) in fits.iter_mut().zip(x.chunks_exact(16)) {
        *f = fit_symmetric(sub);
    }
    let max = signed_absmax(&fits);
    let d = if max == 0.0 {
        f16::ZERO
    } else {
        f16::from_f32(max / -128.0)
    };
    let df = d.to_f32();
    let sc = fits.map(|f| level(f, df, -128.0, 127.0) as i8);

    let mut q = [0u8; QK_K];
    for (j, (qj, xj)) in q.chunks_exact_mut(16).zip(x.chunks_exact(16)).enumerate() {
        let s = df * sc[j] as f32;
        for (qv, &v) in qj.iter_mut().zip(xj) {
            *qv = (level(v, s, -32.0, 31.0) + 32.0) as u8;
        }
    }
    // Inverse of the Q6_K decoder: per 128-value half, values l and l + 64 share `ql[l]`,
    // l + 32 and l + 96 share `ql[l + 32]`, and all four put their top bits in `qh[l]`.
    let (ql, rest) = b.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    let (scales, ds) = rest.split_at_mut(16);
    for h in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * h + l + 32 * k];
            ql[64 * h + l] = (v(0) & 0x0F) | (v(2) & 0x0F) << 4;
            ql[64 * h + l + 32] = (v(1) & 0x0F) | (v(3) & 0x0F) << 4;
            qh[32 * h + l] = v(0) >> 4 | (v(1) >> 4) << 2 | (v(2) >> 4) << 4 | (v(3) >> 4) << 6;
        }
    }
    for (o, &s) in scales.iter_mut().zip(&sc) {
        *o = s as u8;
    }
    ds.copy_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequantize;

    #[test]
    fn q8_0_matches_ggml_rounding() {
        // max |x| = 15.875, so d = 0.125; halves round away from zero.
        let mut x = [0f32; 32];
        x[0] = 15.875;
        x[1] = -7.9375; // -63.5
        x[2] = 0.0625; // 0.5
        x[3] = -0.0625; // -0.5
        let mut b = [0u8; 34];
        quantize(GgmlType::Q8_0, &x, &mut b).unwrap();
        assert_eq!(b[..2], f16::from_f32(0.125).to_le_bytes());
        assert_eq!(b[2..6], [127, (-64i8) as u8, 1, (-1i8) as u8]);
    }

    #[test]
    fn q8_k_maps_the_signed_max_to_minus_127_and_sums_groups() {
        let mut x = [0f32; 256];
        x[0] = 127.0 / 64.0; // iscale = -64
        x[1] = -63.5 / 64.0; // 63.5 rounds to even: 64
        x[2] = 0.5 / 64.0; // -0.5 rounds to even: 0
        x[20] = -1.5 / 64.0; // 1.5 rounds to even: 2
        let mut b = [0u8; 292];
        quantize(GgmlType::Q8_K, &x, &mut b).unwrap();
        assert_eq!(f32::from_le_bytes([b[0], b[1], b[2], b[3]]), -1.0 / 64.0);
        assert_eq!(b[4..8], [(-127i8) as u8, 64, 0, 0]);
        assert_eq!(b[4 + 20], 2);
        assert_eq!(i16::from_le_bytes([b[260], b[261]]), -63);
        assert_eq!(i16::from_le_bytes([b[262], b[263]]), 2);
        assert!(b[264..].iter().all(|&v| v == 0));
    }

    #[test]
    fn all_zero_blocks_decode_to_zero() {
        for dtype in [
            GgmlType::Q8_0,
            GgmlType::Q8_K,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let x = [0f32; 256];
            let mut b = vec![0xFFu8; dtype.bytes_for(256).unwrap() as usize];
            quantize(dtype, &x, &mut b).unwrap();
            let mut y = [1f32; 256];
            dequantize(dtype, &b, &mut y).unwrap();
            assert_eq!(y, x, "{dtype}");
        }
    }

    #[test]
    fn constant_blocks_round_trip_exactly_enough() {
        // A constant negative sub-block is all min in Q4_K; a constant one in Q6_K is all -32.
        for (dtype, v) in [(GgmlType::Q4_K, -0.75f32), (GgmlType::Q6_K, 0.5)] {
            let x = [v; 256];
            let mut b = vec![0u8; dtype.bytes_for(256).unwrap() as usize];
            quantize(dtype, &x, &mut b).unwrap();
            let mut y = [0f32; 256];
            dequantize(dtype, &b, &mut y).unwrap();
            for got in y {
                assert!((got - v).abs() < 1e-3, "{dtype}: {got} vs {v}");
            }
        }
    }

    #[test]
    fn quantize_rejects_unsupported_types_and_bad_lengths() {
        let x = [0f32; 32];
        assert_eq!(
            quantize(GgmlType::Q4_0, &x, &mut [0u8; 18]),
            Err(KernelError::UnsupportedType {
                dtype: GgmlType::Q4_0,
                op: "quantize"
            })
        );
        assert_eq!(
            quantize(GgmlType::Q8_0, &x, &mut [0u8; 35]),
            Err(KernelError::LengthMismatch {
                what: "quantize destination bytes",
                expected: 34,
                actual: 35
            })
        );
        assert_eq!(
            quantize(GgmlType::Q6_K, &x, &mut []),
            Err(KernelError::NotBlockMultiple {
                dtype: GgmlType::Q6_K,
                n: 32
            })
        );
    }
}
