//! Reference decoders from ggml's block formats to `f32`.
//!
//! Every decoder turns a run of whole blocks into `block_size()` values per block, following
//! ggml's bit layouts exactly (the layout tests at the bottom pin each one with hand-built
//! blocks). Decoders are plain scalar code; fused SIMD kernels must agree with them.
//!
//! Invariant: a [`DecodeFn`] is only called with `src.len() == dst.len() / block_size *
//! type_size`; [`dequantize`] and `WeightView` establish that before calling.

use half::f16;
use half::slice::HalfFloatSliceExt;
use quarry_format::{GgmlType, QK_K};

use crate::dot::Isa;
use crate::KernelError;

/// Decodes whole blocks: `src` holds exactly the blocks for `dst.len()` values.
pub(crate) type DecodeFn = fn(&[u8], &mut [f32]);

/// Expands `$m!(args, TYPE => block_fn, ...)` over every block type.
macro_rules! with_block_types {
    ($m:ident!($($args:tt)*)) => {
        $m!($($args)*, Q4_0 => q4_0, Q4_1 => q4_1, Q5_0 => q5_0, Q5_1 => q5_1, Q8_0 => q8_0,
            Q8_1 => q8_1, Q2_K => q2_k, Q3_K => q3_k, Q4_K => q4_k, Q5_K => q5_k, Q6_K => q6_k,
            Q8_K => q8_k)
    };
}

/// The decoder of block type `$dtype`: a loop over its blocks calling the block function
/// directly (so it is inlined and compiled with the loop's attribute `$attr`, which names the
/// target features of a SIMD build).
macro_rules! block_decoder {
    ($dtype:expr, #[$attr:meta], $($ty:ident => $block:ident),*) => {
        match $dtype {
            $(GgmlType::$ty => {
                #[$attr]
                unsafe fn run(src: &[u8], dst: &mut [f32]) {
                    for (b, y) in blocks(src, dst) {
                        $block(b, y);
                    }
                }
                // SAFETY: `run` is unsafe only for its target features, which the caller
                // checked before choosing this build.
                Some((|s, d| unsafe { run(s, d) }) as DecodeFn)
            })*
            _ => None,
        }
    };
}

/// The decoder for `dtype`, or `None` for types that are not float or quantized weights.
///
/// Block types get a build of the same scalar code compiled for AVX2 where [`Isa::best`]
/// allows it: the compiler vectorizes the unpacking several times wider than the baseline
/// SSE2 build, and the values are bit-identical (no fused multiply-adds are introduced).
pub(crate) fn decoder(dtype: GgmlType) -> Option<DecodeFn> {
    let float: Option<DecodeFn> = match dtype {
        GgmlType::F32 => Some(decode_f32),
        GgmlType::F16 => Some(decode_f16),
        GgmlType::BF16 => Some(decode_bf16),
        _ => None,
    };
    float.or_else(|| block_decoder_for(Isa::best(), dtype))
}

/// The block decoder for `dtype` built for `isa` (scalar where this CPU lacks it).
pub(crate) fn block_decoder_for(isa: Isa, dtype: GgmlType) -> Option<DecodeFn> {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && is_x86_feature_detected!("avx2") {
        return with_block_types!(block_decoder!(dtype, #[target_feature(enable = "avx2")]));
    }
    let _ = isa;
    with_block_types!(block_decoder!(dtype, #[inline]))
}

/// Reference dequantization: `src` must be exactly `dtype.bytes_for(dst.len())` bytes.
pub fn dequantize(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    let decode = decoder(dtype).ok_or(KernelError::UnsupportedType {
        dtype,
        op: "dequantize",
    })?;
    let expected = encoded_len(dtype, dst.len())?;
    if src.len() != expected {
        return Err(KernelError::LengthMismatch {
            what: "dequantize source bytes",
            expected,
            actual: src.len(),
        });
    }
    decode(src, dst);
    Ok(())
}

/// Bytes that `n` values of `dtype` occupy, or why they cannot.
pub(crate) fn encoded_len(dtype: GgmlType, n: usize) -> Result<usize, KernelError> {
    if !n.is_multiple_of(dtype.block_size()) {
        return Err(KernelError::NotBlockMultiple { dtype, n });
    }
    (n / dtype.block_size())
        .checked_mul(dtype.type_size())
        .ok_or(KernelError::TooLarge {
            what: "encoded size",
            dtype,
            rows: 1,
            cols: n,
        })
}

/// `src` and `dst` as pairs of fixed-size blocks; the array types let the compiler drop
/// bounds checks inside the block functions.
#[inline(always)]
fn blocks<'a, const TS: usize, const BS: usize>(
    src: &'a [u8],
    dst: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8; TS], &'a mut [f32; BS])> {
    debug_assert_eq!(src.len() / TS * BS, dst.len());
    src.chunks_exact(TS)
        .zip(dst.chunks_exact_mut(BS))
        .map(|(b, y)| {
            (
                b.try_into().expect("chunk of TS bytes"),
                y.try_into().expect("chunk of BS values"),
            )
        })
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn decode_f32(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Converts through a stack buffer so `half` can use its F16C path on the whole run.
fn decode_f16(src: &[u8], dst: &mut [f32]) {
    let mut buf = [f16::ZERO; 256];
    for (s, y) in src.chunks(2 * buf.len()).zip(dst.chunks_mut(buf.len())) {
        let h = &mut buf[..y.len()];
        for (v, b) in h.iter_mut().zip(s.chunks_exact(2)) {
            *v = f16::from_le_bytes([b[0], b[1]]);
        }
        h.convert_to_f32_slice(y);
    }
}

/// BF16 is the top half of an f32, so widening is a shift (NaN payloads included).
fn decode_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *y = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
}

/// Q4_0: f16 `d`, then 16 bytes whose low nibbles are values 0..16 and high nibbles 16..32;
/// value = (nibble - 8) * d.
#[inline(always)]
fn q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 `d`, f16 `m`, nibbles as in Q4_0; value = nibble * d + m.
#[inline(always)]
fn q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 `d`, u32 `qh` whose bit i is the fifth bit of value i, nibbles as in Q4_0;
/// value = (5-bit q - 16) * d.
#[inline(always)]
fn q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, &q) in b[6..].iter().enumerate() {
        let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = (lo as i32 - 16) as f32 * d;
        y[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 `d`, f16 `m`, `qh` and nibbles as in Q5_0; value = 5-bit q * d + m.
#[inline(always)]
fn q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, &q) in b[8..].iter().enumerate() {
        let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
        let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        y[j] = lo as f32 * d + m;
        y[j + 16] = hi as f32 * d + m;
    }
}

/// Q8_0: f16 `d`, 32 i8; value = q * d.
#[inline(always)]
fn q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..]) {
        *v = q as i8 as f32 * d;
    }
}

/// Q8_1: f16 `d`, f16 `s` (d times the sum of q, only for dot products), 32 i8.
#[inline(always)]
fn q8_1(b: &[u8; 36], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[4..]) {
        *v = q as i8 as f32 * d;
    }
}

/// Q2_K: 16 scale bytes (low nibble scale, high nibble min, one per 16 values), 64 bytes of
/// 2-bit q, f16 `d`, f16 `dmin`. Each 128-value half uses 32 q bytes; shift 2j of byte l
/// holds value 32j + l of that half. Value = d * scale * q - dmin * min.
#[inline(always)]
fn q2_k(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let (scales, rest) = b.split_at(16);
    let (qs, ds) = rest.split_at(64);
    let d = f16_at(ds, 0);
    let dmin = f16_at(ds, 2);
    // Group s of 16 values: half s / 8, shift 2 * (s % 8 / 2), bytes 16 * (s % 2) onwards.
    for (s, out) in y.chunks_exact_mut(16).enumerate() {
        let q = &qs[32 * (s / 8) + 16 * (s % 2)..][..16];
        let shift = 2 * (s % 8 / 2);
        let dl = d * (scales[s] & 0x0F) as f32;
        let ml = dmin * (scales[s] >> 4) as f32;
        for (o, &q) in out.iter_mut().zip(q) {
            *o = dl * ((q >> shift) & 3) as f32 - ml;
        }
    }
}

/// Unpacks Q3_K's sixteen 6-bit scales from 12 bytes and removes their +32 offset: bytes
/// 0..8 hold the low nibbles (scales 0..8 low, 8..16 high nibble), and byte 8 + i % 4 holds
/// the top two bits of scale i at bit 2 * (i / 4).
#[inline(always)]
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | high << 4) as i32 - 32;
    }
    out
}

/// Q3_K: 32 bytes `hmask`, 64 bytes of 2-bit q, 12 bytes of packed scales, f16 `d`.
/// The 2-bit q sit as in Q2_K; the third bit of value v is bit v / 32 of `hmask[v % 32]`,
/// and a clear bit subtracts 4. Value = d * (scale - 32) * q.
#[inline(always)]
fn q3_k(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let (hmask, rest) = b.split_at(32);
    let (qs, rest) = rest.split_at(64);
    let (scales, ds) = rest.split_at(12);
    let d = f16_at(ds, 0);
    let sc = q3_k_scales(scales);
    // Groups of 16 values as in Q2_K; group s's hmask bit is s / 2 (= value / 32).
    for (s, out) in y.chunks_exact_mut(16).enumerate() {
        let q = &qs[32 * (s / 8) + 16 * (s % 2)..][..16];
        let h = &hmask[16 * (s % 2)..][..16];
        let shift = 2 * (s % 8 / 2);
        let dl = d * sc[s] as f32;
        for ((o, &q), &h) in out.iter_mut().zip(q).zip(h) {
            let low = ((q >> shift) & 3) as i32;
            let high_set = (h >> (s / 2)) & 1 == 1;
            *o = dl * (if high_set { low } else { low - 4 }) as f32;
        }
    }
}

/// Scale and min of sub-block `j` from the 12-byte packing shared by Q4_K and Q5_K: for
/// j < 4 the low six bits of bytes j and j + 4; for j >= 4 a nibble of byte j + 4 with the
/// top two bits of bytes j - 4 (scale) and j (min).
#[inline(always)]
fn k4_scale_min(s: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | (s[j - 4] >> 6) << 4,
            (s[j + 4] >> 4) | (s[j] >> 6) << 4,
        )
    };
    (sc as f32, m as f32)
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 bytes of scales/mins, 128 bytes of nibbles. Each 64 values
/// use 32 bytes: low nibbles are the first 32 (sub-block 2c), high nibbles the next 32.
/// Value = d * scale * q - dmin * min.
#[inline(always)]
fn q4_k(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..];
    for (c, out) in y.chunks_exact_mut(64).enumerate() {
        let (s1, m1) = k4_scale_min(scales, 2 * c);
        let (s2, m2) = k4_scale_min(scales, 2 * c + 1);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: Q4_K plus 32 bytes `qh` before the nibbles; the fifth bit of sub-block s's value l
/// is bit s of `qh[l]`.
#[inline(always)]
fn q5_k(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..];
    for (c, out) in y.chunks_exact_mut(64).enumerate() {
        let (s1, m1) = k4_scale_min(scales, 2 * c);
        let (s2, m2) = k4_scale_min(scales, 2 * c + 1);
        let (d1, m1, d2, m2) = (d * s1, dmin * m1, d * s2, dmin * m2);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            out[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K: 128 bytes `ql` (low nibbles), 64 bytes `qh` (high 2 bits), 16 i8 scales (one per
/// 16 values), f16 `d`. Per 128-value half: `ql[l]` low/high nibble are values l and l + 64,
/// `ql[l + 32]` are values l + 32 and l + 96, and `qh[l]` bits 0-1, 2-3, 4-5, 6-7 top values
/// l, l + 32, l + 64, l + 96. Value = d * scale * (q - 32).
#[inline(always)]
fn q6_k(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let (ql, rest) = b.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (scales, ds) = rest.split_at(16);
    let d = f16_at(ds, 0);
    for (h, out) in y.chunks_exact_mut(128).enumerate() {
        let ql = &ql[64 * h..64 * h + 64];
        let qh = &qh[32 * h..32 * h + 32];
        let sc = &scales[8 * h..8 * h + 8];
        for l in 0..32 {
            let q1 = (ql[l] & 0x0F) | (qh[l] & 3) << 4;
            let q2 = (ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4;
            let q3 = (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4;
            let q4 = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4;
            let is = l / 16;
            for (k, q) in [q1, q2, q3, q4].into_iter().enumerate() {
                out[l + 32 * k] = d * sc[is + 2 * k] as i8 as f32 * (q as i32 - 32) as f32;
            }
        }
    }
}

/// Q8_K: f32 `d`, 256 i8, 16 i16 block sums (only for dot products); value = q * d.
#[inline(always)]
fn q8_k(b: &[u8; 292], y: &mut [f32; QK_K]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (v, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *v = q as i8 as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    //! Layout pins: every block is written byte by byte and every expected value worked out
    //! by hand from the format description, so a swapped nibble order, a misplaced high bit
    //! or a wrong scale packing changes at least one asserted value.

    use super::*;

    fn decode(dtype: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![f32::NAN; bytes.len() / dtype.type_size() * dtype.block_size()];
        dequantize(dtype, bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn every_build_of_every_block_decoder_gives_the_same_bits() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let block_types = GgmlType::ALL
            .into_iter()
            .filter(|t| t.block_size() > 1 && decoder(*t).is_some());
        for dtype in block_types {
            let n_blocks = 7;
            let src: Vec<u8> = (0..n_blocks * dtype.type_size())
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let n = n_blocks * dtype.block_size();
            let mut reference = vec![0.0f32; n];
            block_decoder_for(Isa::Scalar, dtype).unwrap()(&src, &mut reference);
            for isa in Isa::available() {
                let mut out = vec![0.0f32; n];
                block_decoder_for(isa, dtype).unwrap()(&src, &mut out);
                for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{dtype} {isa:?} value {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn f32_f16_bf16_are_little_endian() {
        assert_eq!(
            decode(GgmlType::F32, &[0, 0, 0xC0, 0x3F, 0, 0, 0x20, 0xC1]),
            [1.5, -10.0]
        );
        // 0x3C00 = 1.0, 0xC000 = -2.0, 0x0001 = the smallest subnormal, 2^-24.
        assert_eq!(
            decode(GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC0, 0x01, 0x00]),
            [1.0, -2.0, 2f32.powi(-24)]
        );
        // 0x3F80 = 1.0, 0xC040 = -3.0.
        assert_eq!(
            decode(GgmlType::BF16, &[0x80, 0x3F, 0x40, 0xC0]),
            [1.0, -3.0]
        );
    }

    #[test]
    fn f16_runs_longer_than_the_stack_buffer_decode_fully() {
        let bytes: Vec<u8> = (0..600).flat_map(|_| [0x00, 0x3C]).collect();
        assert_eq!(decode(GgmlType::F16, &bytes), vec![1.0; 600]);
    }

    #[test]
    fn q4_0_low_nibbles_are_the_first_sixteen_values() {
        // d = 0.5; byte j holds j in its low nibble and 15 - j in its high nibble.
        let mut b = vec![0x00, 0x38];
        b.extend([
            0xF0, 0xE1, 0xD2, 0xC3, 0xB4, 0xA5, 0x96, 0x87, 0x78, 0x69, 0x5A, 0x4B, 0x3C, 0x2D,
            0x1E, 0x0F,
        ]);
        let want = [
            -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0,
            3.5, //
            3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0,
        ];
        assert_eq!(decode(GgmlType::Q4_0, &b), want);
    }

    #[test]
    fn q4_1_adds_the_min() {
        // d = 1.0, m = -2.0; byte 0 = (low 1, high 2), byte 3 = (low 0, high 15).
        let mut b = vec![0x00, 0x3C, 0x00, 0xC0];
        b.extend([0u8; 16]);
        b[4] = 0x21;
        b[4 + 3] = 0xF0;
        let mut want = [-2.0f32; 32];
        want[0] = -1.0;
        want[16] = 0.0;
        want[19] = 13.0;
        assert_eq!(decode(GgmlType::Q4_1, &b), want);
    }

    #[test]
    fn q5_0_high_bits_come_from_qh_bit_per_value() {
        // d = 1.0; qh bits 0, 17 and 31 set; byte 0 = (3, 5), byte 15 = (15, 15).
        let mut b = vec![0x00, 0x3C, 0x01, 0x00, 0x02, 0x80];
        b.extend([0u8; 16]);
        b[6] = 0x53;
        b[6 + 15] = 0xFF;
        let mut want = [-16.0f32; 32];
        want[0] = 3.0; // 3 | 16 (bit 0) - 16
        want[16] = -11.0; // 5, bit 16 clear
        want[17] = 0.0; // 0 | 16 (bit 17)
        want[15] = -1.0; // 15, bit 15 clear
        want[31] = 15.0; // 15 | 16 (bit 31)
        assert_eq!(decode(GgmlType::Q5_0, &b), want);
    }

    #[test]
    fn q5_1_high_bits_and_min() {
        // d = 0.5, m = 1.0, qh bit 16 set, byte 0 = (1, 2).
        let mut b = vec![0x00, 0x38, 0x00, 0x3C, 0x00, 0x00, 0x01, 0x00];
        b.extend([0u8; 16]);
        b[8] = 0x21;
        let mut want = [1.0f32; 32];
        want[0] = 1.5;
        want[16] = 10.0; // (2 | 16) * 0.5 + 1
        assert_eq!(decode(GgmlType::Q5_1, &b), want);
    }

    #[test]
    fn q8_0_and_q8_1_are_signed_bytes() {
        // d = 0.25.
        let mut b = vec![0x00, 0x34];
        b.extend([0u8; 32]);
        b[2] = 0x80;
        b[3] = 0x7F;
        b[2 + 31] = 0x01;
        let mut want = [0.0f32; 32];
        want[0] = -32.0;
        want[1] = 31.75;
        want[31] = 0.25;
        assert_eq!(decode(GgmlType::Q8_0, &b), want);

        // d = 2.0, s = anything (ignored when decoding).
        let mut b = vec![0x00, 0x40, 0x34, 0x12];
        b.extend([0u8; 32]);
        b[4] = 0xFF;
        b[4 + 5] = 3;
        let mut want = [0.0f32; 32];
        want[0] = -2.0;
        want[5] = 6.0;
        assert_eq!(decode(GgmlType::Q8_1, &b), want);
    }

    #[test]
    fn q8_k_has_an_f32_scale_and_ignores_bsums() {
        let mut b = vec![0u8; 292];
        b[..4].copy_from_slice(&0.5f32.to_le_bytes());
        b[4] = (-3i8) as u8;
        b[4 + 255] = 100;
        b[260..].fill(0xAB);
        let mut want = [0.0f32; 256];
        want[0] = -1.5;
        want[255] = 50.0;
        assert_eq!(decode(GgmlType::Q8_K, &b), want);
    }

    #[test]
    fn q2_k_crumbs_step_through_the_byte_by_32_values() {
        let mut b = vec![0u8; 84];
        let (scales, qs) = (0, 16);
        b[scales] = 0x32; // values 0..16: scale 2, min 3
        b[scales + 1] = 0x01; // 16..32: scale 1
        b[scales + 2] = 0x05; // 32..48: scale 5
        b[scales + 4] = 0x13; // 64..80: scale 3, min 1
        b[scales + 14] = 0x27; // 224..240: scale 7, min 2
        b[qs] = 0b11_10_01_00; // values 0, 32, 64, 96 = 0, 1, 2, 3
        b[qs + 16] = 0x03; // value 16 = 3
        b[qs + 32] = 0x40; // second half, shift 6: value 128 + 96 = 1
        b[80..82].copy_from_slice(&[0x00, 0x3C]); // d = 1.0
        b[82..84].copy_from_slice(&[0x00, 0x38]); // dmin = 0.5
        let mut want = [0.0f32; 256];
        want[0..16].fill(-1.5);
        want[64..80].fill(-0.5);
        want[224..240].fill(-1.0);
        want[16] = 3.0;
        want[32] = 5.0;
        want[64] = 5.5; // 3 * 2 - 0.5
        want[224] = 6.0; // 7 * 1 - 1
        assert_eq!(decode(GgmlType::Q2_K, &b), want);
    }

    #[test]
    fn q3_k_scales_hmask_and_offsets() {
        let mut b = vec![0u8; 110];
        let (hmask, qs, scales) = (0, 32, 96);
        // Raw 6-bit scales are 32 (meaning 0) except #0 = 33, #5 = 40, #9 = 0, #14 = 63.
        b[scales..scales + 12].copy_from_slice(&[
            0x01, 0x00, 0x00, 0x00, 0x00, 0x08, 0xF0, 0x00, // low nibbles
            0xAA, 0x8A, 0xEA, 0xAA, // top two bits, byte 8 + i % 4, shift 2 * (i / 4)
        ]);
        b[108..110].copy_from_slice(&[0x00, 0x3C]); // d = 1.0
        b[qs] = 0x03; // value 0: q = 3
        b[hmask] = 0x01; // ... with its high bit set
        b[qs + 16] = 0x20; // value 80: q = 2 (shift 4)
        b[hmask + 16] = 0x04; // ... high bit set (bit 2)
        b[qs + 49] = 0x01; // value 145: q = 1
        b[hmask + 17] = 0x10; // ... high bit set (bit 4)
        b[qs + 47] = 0xC0; // value 239: q = 3, high bit clear -> -1
        let mut want = [0.0f32; 256];
        want[0..16].fill(-4.0); // scale 1, q = 0 - 4
        want[0] = 3.0;
        want[80..96].fill(-32.0); // scale 8
        want[80] = 16.0;
        want[144..160].fill(128.0); // scale -32
        want[145] = -32.0;
        want[224..240].fill(-124.0); // scale 31
        want[239] = -31.0;
        assert_eq!(decode(GgmlType::Q3_K, &b), want);
    }

    /// The 12 scale bytes for Q4_K: sub-block scales 1 (#0), 33 (#7); mins 2 (#0), 20 (#4).
    const Q4_K_SCALES: [u8; 12] = [
        0x01, 0x00, 0x00, 0x80, // scale #0; top bits of scale #7 (2) in byte 3
        0x42, 0x00, 0x00, 0x00, // min #0 = 2; top bits of min #4 (1)
        0x40, 0x00, 0x00, 0x01, // low nibbles: min #4 = 4, scale #7 = 1
    ];

    #[test]
    fn q4_k_six_bit_scales_and_nibble_halves() {
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&[0x00, 0x38]); // d = 0.5
        b[2..4].copy_from_slice(&[0x00, 0x34]); // dmin = 0.25
        b[4..16].copy_from_slice(&Q4_K_SCALES);
        b[16] = 0xF3; // value 0 = 3, value 32 = 15 (sub-block 1: scale 0, min 0)
        b[16 + 100] = 0x20; // chunk 3, l = 4, high nibble: value 228 = 2
        let mut want = [0.0f32; 256];
        want[0..32].fill(-0.5); // min 0.25 * 2
        want[0] = 1.0; // 0.5 * 3 - 0.5
        want[128..160].fill(-5.0); // min 0.25 * 20
        want[228] = 33.0; // 0.5 * 33 * 2
        assert_eq!(decode(GgmlType::Q4_K, &b), want);
    }

    #[test]
    fn q5_k_fifth_bit_is_sub_block_bit_of_qh() {
        let mut b = vec![0u8; 176];
        b[0..2].copy_from_slice(&[0x00, 0x3C]); // d = 1
        b[2..4].copy_from_slice(&[0x00, 0x3C]); // dmin = 1
                                                // Scale #0 = 1, scale #5 = 17 (low nibble in byte 9, top bits in byte 1), min #0 = 1.
        b[4..16].copy_from_slice(&[0x01, 0x40, 0, 0, 0x01, 0, 0, 0, 0, 0x01, 0, 0]);
        let (qh, qs) = (16, 48);
        b[qs] = 0x02;
        b[qh] = 0x01; // value 0: 2 | 16
        b[qs + 65] = 0x30; // value 161 (chunk 2, high nibble): 3
        b[qh + 1] = 0x20; // ... fifth bit from qh bit 5
        let mut want = [0.0f32; 256];
        want[0..32].fill(-1.0);
        want[0] = 17.0; // 18 - 1
        want[161] = 323.0; // 17 * 19
        assert_eq!(decode(GgmlType::Q5_K, &b), want);
    }

    #[test]
    fn q6_k_high_bits_and_quarter_placement() {
        let mut b = vec![0u8; 210];
        let (ql, qh, scales) = (0, 128, 192);
        b[scales] = 1;
        b[scales + 3] = 4;
        b[scales + 5] = (-2i8) as u8;
        b[scales + 14] = 3;
        b[208..210].copy_from_slice(&[0x00, 0x3C]); // d = 1
        b[ql] = 0x05;
        b[qh] = 0x02; // value 0: 5 | 2 << 4 = 37
        b[ql + 50] = 0x0A;
        b[qh + 18] = 0x0C; // value 50 (l = 18, second quarter): 10 | 3 << 4 = 58
        b[ql + 16] = 0x70;
        b[qh + 16] = 0x30; // value 80 (l = 16, third quarter): 7 | 3 << 4 = 55
        b[ql + 98] = 0x90;
        b[qh + 34] = 0x40; // value 226 (second half, l = 2, fourth quarter): 9 | 1 << 4 = 25
        let mut want = [0.0f32; 256];
        want[0..16].fill(-32.0);
        want[0] = 5.0;
        want[48..64].fill(-128.0);
        want[50] = 104.0; // 4 * 26
        want[80..96].fill(64.0);
        want[80] = -46.0; // -2 * 23
        want[224..240].fill(-96.0);
        want[226] = -21.0; // 3 * -7
        assert_eq!(decode(GgmlType::Q6_K, &b), want);
    }

    #[test]
    fn dequantize_rejects_bad_lengths_and_types() {
        let mut out = [0.0f32; 32];
        assert_eq!(
            dequantize(GgmlType::Q4_0, &[0u8; 17], &mut out),
            Err(KernelError::LengthMismatch {
                what: "dequantize source bytes",
                expected: 18,
                actual: 17
            })
        );
        assert_eq!(
            dequantize(GgmlType::Q4_K, &[0u8; 144], &mut out),
            Err(KernelError::NotBlockMultiple {
                dtype: GgmlType::Q4_K,
                n: 32
            })
        );
        assert_eq!(
            dequantize(GgmlType::I8, &[0u8; 32], &mut out),
            Err(KernelError::UnsupportedType {
                dtype: GgmlType::I8,
                op: "dequantize"
            })
        );
        let msg = dequantize(GgmlType::Q4_K, &[], &mut out)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "32 values is not a whole number of Q4_K blocks (256 values each)"
        );
    }
}
