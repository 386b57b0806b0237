//! Q2_K, Q3_K, Q4_K, Q5_K and Q6_K weight rows · 256-value 8-bit activation super-blocks.
//!
//! Every kernel works one 256-value super-block at a time and never decodes to `f32`: it
//! forms the integer dot product of each sub-block's unsigned quants with the activations,
//! weights it by the sub-block's integer scale, and converts to `f32` once per super-block
//! (`· d · a.d`). The parts that do not depend on the individual quants come out of the
//! activations' 16-value group sums (`bsums`): the per-sub-block minimums of Q2_K, Q4_K and
//! Q5_K (`dmin · min · Σa`) and the constant offsets of Q3_K (−4) and Q6_K (−32). That keeps
//! the SIMD side u8 (weight) × i8 (activation), the operand order of `vpmaddubsw` and
//! `vpdpbusd`.
//!
//! Each type has a scalar reference and an AVX2 variant; Q4_K, Q5_K and Q6_K also have an
//! AVX-512 VNNI variant (Q2_K and Q3_K fall back to AVX2 there). The integer parts are exact
//! in every variant; only the order of the `f32` accumulation differs.
//!
//! Invariants: a kernel is called with one row of whole super-blocks and exactly one
//! activation super-block per weight super-block ([`gemv`] checks the shapes), and a SIMD
//! variant only after its CPU features were detected at run time ([`kernel`] checks them,
//! whatever [`Isa`] the caller passes, so a wrong `Isa` cannot reach an unsupported
//! instruction). Integer ranges: activations are i8 (−128..=127), so a `vpmaddubsw` pair is at
//! most 2·63·128 and a `vpdpbusd` lane at most 4·63·128 < 2¹⁵ (both fit i16 without
//! saturating), and a super-block's weighted sum stays far below 2³¹.

use std::ops::Range;

use super::Isa;
use crate::act::BlockQ8x256;
use crate::{GgmlType, WeightView, QK_K};

/// Bytes of one super-block of each type.
const Q2K_BYTES: usize = 84;
const Q3K_BYTES: usize = 110;
const Q4K_BYTES: usize = 144;
const Q5K_BYTES: usize = 176;
const Q6K_BYTES: usize = 210;

/// True for the K-quant weight types these kernels handle.
pub fn supports(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
    )
}

/// out[i] = Σ_c W[rows.start+i][c] · x[c], x given as 256-value super-blocks
/// (`a.len() == w.cols()/256`), using the best variant at or below `isa` that this CPU runs.
pub fn gemv(isa: Isa, w: &WeightView<'_>, rows: Range<usize>, a: &[BlockQ8x256], out: &mut [f32]) {
    assert!(
        supports(w.dtype()),
        "kquants::gemv: {} is not a K-quant",
        w.dtype()
    );
    assert_eq!(
        a.len() * QK_K,
        w.cols(),
        "kquants::gemv: {} activation super-blocks for {} columns",
        a.len(),
        w.cols()
    );
    assert!(
        rows.start <= rows.end && rows.end <= w.rows(),
        "kquants::gemv: rows {rows:?} out of range for {} rows",
        w.rows()
    );
    assert_eq!(
        out.len(),
        rows.len(),
        "kquants::gemv: output has {} values for rows {rows:?}",
        out.len()
    );
    let row_bytes = w.row_bytes();
    let data = &w.data()[rows.start * row_bytes..rows.end * row_bytes];
    let dot = kernel(w.dtype(), isa);
    if row_bytes == 0 {
        out.fill(0.0);
        return;
    }
    for (i, (o, row)) in out.iter_mut().zip(data.chunks_exact(row_bytes)).enumerate() {
        if let Some(next) = data.get((i + 1) * row_bytes..(i + 2) * row_bytes) {
            prefetch(next);
        }
        // SAFETY: `kernel` returned a variant whose CPU features are present, and `row` holds
        // exactly `a.len()` super-blocks (WeightView's invariant and the assert above).
        *o = unsafe { dot(row, a) };
    }
}

/// Starts loading `bytes` (the next row) into cache while the current row is computed: the
/// hardware prefetchers alone left decode at about half of the read bandwidth.
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: SSE is part of the x86-64 baseline, and a prefetch hint never faults nor
        // changes memory.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// One row's dot product: `row` holds `a.len()` super-blocks of the kernel's type.
type DotFn = unsafe fn(&[u8], &[BlockQ8x256]) -> f32;

/// The fastest variant for `dtype` at or below `isa` whose features this CPU has.
fn kernel(dtype: GgmlType, isa: Isa) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512Vnni && x86::has_avx512_vnni() {
            if let Some(f) = x86::avx512_kernel(dtype) {
                return f;
            }
        }
        if isa >= Isa::Avx2 && x86::has_avx2() {
            return x86::avx2_kernel(dtype);
        }
    }
    // Only x86-64 has SIMD variants; elsewhere every isa means scalar.
    let _ = isa;
    scalar_kernel(dtype)
}

fn scalar_kernel(dtype: GgmlType) -> DotFn {
    match dtype {
        GgmlType::Q2_K => q2k_scalar,
        GgmlType::Q3_K => q3k_scalar,
        GgmlType::Q4_K => q4k_scalar,
        GgmlType::Q5_K => q5k_scalar,
        GgmlType::Q6_K => q6k_scalar,
        other => unreachable!("{other} is not a K-quant"),
    }
}

/// IEEE half to single precision without a runtime feature check (this runs once or twice per
/// super-block): shifting the exponent and mantissa into place and multiplying by 2¹¹² is
/// exact for zeros, subnormals and normals; infinities and NaNs keep their bits.
#[inline(always)]
fn f16_to_f32(lo: u8, hi: u8) -> f32 {
    let h = u16::from_le_bytes([lo, hi]) as u32;
    let sign = (h & 0x8000) << 16;
    let rest = (h & 0x7FFF) << 13;
    let magnitude = if h & 0x7C00 == 0x7C00 {
        f32::from_bits(rest | 0x7F80_0000)
    } else {
        f32::from_bits(rest) * f32::from_bits(0x7780_0000) // 2^112
    };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// Unpacks the 12 scale bytes shared by Q4_K and Q5_K into eight 6-bit scales and eight 6-bit
/// minimums, one byte each (sub-block j in byte j, little-endian). Scales and minimums 0..4
/// are the low six bits of bytes 0..4 and 4..8; 4..8 take a nibble of bytes 8..12 (low for
/// scales, high for minimums) under the top two bits of bytes 0..4 (scales) or 4..8 (minimums).
#[inline(always)]
pub(super) fn k4_scales_mins(s: &[u8]) -> (u64, u64) {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (w0, w1, w2) = (w(0), w(4), w(8));
    const LOW6: u32 = 0x3F3F_3F3F;
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let sc_lo = w0 & LOW6;
    let mn_lo = w1 & LOW6;
    let sc_hi = (w2 & LOW4) | ((w0 >> 6) & LOW2) << 4;
    let mn_hi = ((w2 >> 4) & LOW4) | ((w1 >> 6) & LOW2) << 4;
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// Unpacks Q3_K's sixteen 6-bit scales and removes their +32 offset: bytes 0..8 hold the low
/// nibbles (scales 0..8 in the low, 8..16 in the high nibble), and byte 8 + i % 4 holds the
/// top two bits of scale i at bit 2 · (i / 4).
#[inline(always)]
fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (w0, w1, w2) = (w(0), w(4), w(8));
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let words = [
        (w0 & LOW4) | (w2 & LOW2) << 4,
        (w1 & LOW4) | ((w2 >> 2) & LOW2) << 4,
        ((w0 >> 4) & LOW4) | ((w2 >> 4) & LOW2) << 4,
        ((w1 >> 4) & LOW4) | ((w2 >> 6) & LOW2) << 4,
    ];
    let mut out = [0i8; 16];
    for (o, b) in out
        .chunks_exact_mut(4)
        .zip(words.iter().map(|w| w.to_le_bytes()))
    {
        for (o, b) in o.iter_mut().zip(b) {
            *o = b.wrapping_sub(32) as i8;
        }
    }
    out
}

/// Σ q·a over matching values, exact in i32.
#[inline(always)]
fn idot(q: impl Iterator<Item = u8>, a: &[i8]) -> i32 {
    q.zip(a).map(|(q, &a)| q as i32 * a as i32).sum()
}

/// Q2_K reference: 16 groups of 16; group s uses bits 2·(s % 8 / 2) of bytes
/// 32·(s / 8) + 16·(s % 2) .. +16; value = d·scale·q − dmin·min.
fn q2k_scalar(row: &[u8], a: &[BlockQ8x256]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in row.chunks_exact(Q2K_BYTES).zip(a) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let (d, dmin) = (f16_to_f32(b[80], b[81]), f16_to_f32(b[82], b[83]));
        let (mut sumi, mut summ) = (0i32, 0i32);
        for s in 0..16 {
            let q = &qs[32 * (s / 8) + 16 * (s % 2)..][..16];
            let shift = 2 * (s % 8 / 2);
            let dot = idot(q.iter().map(|q| (q >> shift) & 3), &x.qs[16 * s..][..16]);
            sumi += (scales[s] & 0x0F) as i32 * dot;
            summ += (scales[s] >> 4) as i32 * x.bsums[s] as i32;
        }
        acc += x.d * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

/// Q3_K reference: 2-bit quants as in Q2_K plus a third bit (bit v / 32 of `hmask[v % 32]`);
/// value = d·scale·(q3 − 4), the −4 taken out through `bsums`.
fn q3k_scalar(row: &[u8], a: &[BlockQ8x256]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in row.chunks_exact(Q3K_BYTES).zip(a) {
        let (hmask, qs) = (&b[..32], &b[32..96]);
        let sc = q3k_scales(&b[96..108]);
        let d = f16_to_f32(b[108], b[109]);
        let mut sumi = 0i32;
        for s in 0..16 {
            let q = &qs[32 * (s / 8) + 16 * (s % 2)..][..16];
            let h = &hmask[16 * (s % 2)..][..16];
            let shift = 2 * (s % 8 / 2);
            let q3 = q
                .iter()
                .zip(h)
                .map(|(q, h)| (q >> shift) & 3 | ((h >> (s / 2)) & 1) << 2);
            let dot = idot(q3, &x.qs[16 * s..][..16]) - 4 * x.bsums[s] as i32;
            sumi += sc[s] as i32 * dot;
        }
        acc += x.d * d * sumi as f32;
    }
    acc
}

/// Q4_K reference: sub-block j (32 values) is the low (j even) or high nibble of bytes
/// 32·(j / 2) .. +32; value = d·scale·q − dmin·min.
fn q4k_scalar(row: &[u8], a: &[BlockQ8x256]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in row.chunks_exact(Q4K_BYTES).zip(a) {
        let (d, dmin) = (f16_to_f32(b[0], b[1]), f16_to_f32(b[2], b[3]));
        let (sc, mn) = k4_scales_mins(&b[4..16]);
        let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
        let qs = &b[16..];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let q = &qs[32 * (j / 2)..][..32];
            let shift = 4 * (j % 2);
            let dot = idot(q.iter().map(|q| (q >> shift) & 0x0F), &x.qs[32 * j..][..32]);
            sumi += sc[j] as i32 * dot;
            summ += mn[j] as i32 * (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32);
        }
        acc += x.d * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

/// Q5_K reference: Q4_K's nibbles plus a fifth bit, bit j of `qh[l]` for value l of
/// sub-block j.
fn q5k_scalar(row: &[u8], a: &[BlockQ8x256]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in row.chunks_exact(Q5K_BYTES).zip(a) {
        let (d, dmin) = (f16_to_f32(b[0], b[1]), f16_to_f32(b[2], b[3]));
        let (sc, mn) = k4_scales_mins(&b[4..16]);
        let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
        let (qh, qs) = (&b[16..48], &b[48..]);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..8 {
            let q = &qs[32 * (j / 2)..][..32];
            let shift = 4 * (j % 2);
            let q5 = q
                .iter()
                .zip(qh)
                .map(|(q, h)| (q >> shift) & 0x0F | ((h >> j) & 1) << 4);
            sumi += sc[j] as i32 * idot(q5, &x.qs[32 * j..][..32]);
            summ += mn[j] as i32 * (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32);
        }
        acc += x.d * (d * sumi as f32 - dmin * summ as f32);
    }
    acc
}

/// Q6_K reference: value v of half h (128 values) has its low nibble in `ql[64h + v % 64]`
/// (low nibble for v < 64) and its top two bits at bit 2·(v / 32) of `qh[32h + v % 32]`;
/// the scale of each 16 values is an i8; value = d·scale·(q6 − 32).
fn q6k_scalar(row: &[u8], a: &[BlockQ8x256]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in row.chunks_exact(Q6K_BYTES).zip(a) {
        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
        let d = f16_to_f32(b[208], b[209]);
        let mut sumi = 0i32;
        for (g, &scale) in scales.iter().enumerate() {
            // Group g covers values 16g..16g+16 of the block: half g / 8, value offset v0.
            let (h, v0) = (g / 8, 16 * (g % 8));
            let lo = &ql[64 * h + v0 % 64..][..16];
            let hi = &qh[32 * h + v0 % 32..][..16];
            let (lo_shift, hi_shift) = (4 * (v0 / 64), 2 * (v0 / 32));
            let q6 = lo
                .iter()
                .zip(hi)
                .map(|(l, h)| (l >> lo_shift) & 0x0F | ((h >> hi_shift) & 3) << 4);
            let dot = idot(q6, &x.qs[16 * g..][..16]) - 32 * x.bsums[g] as i32;
            sumi += scale as i8 as i32 * dot;
        }
        acc += x.d * d * sumi as f32;
    }
    acc
}

// AVX-512 intrinsics and target features are stable since Rust 1.89, above the workspace's
// declared `rust-version`.
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod x86 {
    //! AVX2 and AVX-512 VNNI kernels. Every function here is `unsafe`: it may be called only
    //! when the features it enables were detected (see [`super::kernel`]) and, like the scalar
    //! kernels, with a row of exactly `a.len()` super-blocks, which keeps every pointer
    //! offset below inside its super-block.

    use std::arch::x86_64::*;

    use super::*;

    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    pub(super) fn has_avx512_vnni() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
    }

    pub(super) fn avx2_kernel(dtype: GgmlType) -> DotFn {
        match dtype {
            GgmlType::Q2_K => q2k_avx2,
            GgmlType::Q3_K => q3k_avx2,
            GgmlType::Q4_K => q4k_avx2,
            GgmlType::Q5_K => q5k_avx2,
            GgmlType::Q6_K => q6k_avx2,
            other => unreachable!("{other} is not a K-quant"),
        }
    }

    /// `None` where the type has no AVX-512 variant (Q2_K, Q3_K: small, rarely used types).
    pub(super) fn avx512_kernel(dtype: GgmlType) -> Option<DotFn> {
        Some(match dtype {
            GgmlType::Q4_K => q4k_avx512,
            GgmlType::Q5_K => q5k_avx512,
            GgmlType::Q6_K => q6k_avx512,
            _ => return None,
        })
    }

    /// The f16 scale at `p` (and, with `PAIR`, the one after it, `dmin`) times the
    /// activation scale `xd`, in lanes 0 and 1. `vcvtph2ps` replaces a dozen scalar
    /// instructions per super-block.
    #[inline]
    #[target_feature(enable = "avx,f16c")]
    unsafe fn block_scales<const PAIR: bool>(p: *const u8, xd: f32) -> __m128 {
        let bits = if PAIR {
            p.cast::<i32>().read_unaligned()
        } else {
            p.cast::<u16>().read_unaligned() as i32
        };
        _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)), _mm_set1_ps(xd))
    }

    /// Lane 1 of `v` in every lane (`dmin · a.d` after [`block_scales`]).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn splat_lane1(v: __m128) -> __m256 {
        _mm256_broadcastss_ps(_mm_movehdup_ps(v))
    }

    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn load256(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.cast())
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load512(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p.cast())
    }

    /// Sum of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `vpshufb` control that fills the low 128-bit lane with i16 word `lo` and the high lane
    /// with word `hi` of its source lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn word_splat(lo: i16, hi: i16) -> __m256i {
        let pick = |w: i16| _mm_set1_epi16((2 * w) | ((2 * w + 1) << 8));
        _mm256_setr_m128i(pick(lo), pick(hi))
    }

    /// Sixteen scale bytes as i16 (sign- or zero-extended by the caller) and a selector that
    /// splats, for 32 values of two 16-value groups `2p` and `2p + 1` of one 8-group half,
    /// scale `2p` over the low lane and `2p + 1` over the high lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group_pair_scales(half: __m128i, p: i16) -> __m256i {
        _mm256_shuffle_epi8(
            _mm256_broadcastsi128_si256(half),
            word_splat(2 * p, 2 * p + 1),
        )
    }

    /// Σ over pairs of `vpmaddubsw(q, a)` (32 values) weighted by the i16 `scales`, as i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn scaled_dot32(q: __m256i, a: *const i8, scales: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(q, load256(a.cast())), scales)
    }

    /// AVX2 Q2_K: four 2-bit planes of each 32-byte half, one pair of groups per plane.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q2k_avx2(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let three = _mm256_set1_epi8(3);
        let low4 = _mm_set1_epi8(0x0F);
        let (mut acc, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (b, x) in row.chunks_exact(Q2K_BYTES).zip(a) {
            let p = b.as_ptr();
            let dm = block_scales::<true>(p.add(80), x.d);
            let raw = _mm_loadu_si128(p.cast());
            let sc = _mm_and_si128(raw, low4);
            let mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(raw), low4));
            let halves = [
                _mm_cvtepu8_epi16(sc),
                _mm_cvtepu8_epi16(_mm_srli_si128::<8>(sc)),
            ];
            let mut sumi = _mm256_setzero_si256();
            for (h, &scales) in halves.iter().enumerate() {
                let mut q = load256(p.add(16 + 32 * h));
                for j in 0..4 {
                    let v = _mm256_and_si256(q, three);
                    let s = group_pair_scales(scales, j as i16);
                    let prod = scaled_dot32(v, x.qs.as_ptr().add(128 * h + 32 * j), s);
                    sumi = _mm256_add_epi32(sumi, prod);
                    q = _mm256_srli_epi16::<2>(q);
                }
            }
            let msum = _mm256_madd_epi16(load256(x.bsums.as_ptr().cast()), mn);
            acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), _mm256_cvtepi32_ps(sumi), acc);
            accm = _mm256_fmadd_ps(splat_lane1(dm), _mm256_cvtepi32_ps(msum), accm);
        }
        hsum256(acc) - hsum256(accm)
    }

    /// AVX2 Q3_K: Q2_K's planes plus the `hmask` bit shifted into bit 2; the −4 offset is
    /// `4 · Σ scale · bsum`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q3k_avx2(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let three = _mm256_set1_epi8(3);
        let one = _mm256_set1_epi8(1);
        let mut acc = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(Q3K_BYTES).zip(a) {
            let p = b.as_ptr();
            let dd = _mm256_broadcastss_ps(block_scales::<false>(p.add(108), x.d));
            let sc = q3k_scales(&b[96..108]);
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr().cast()));
            let halves = [
                _mm256_castsi256_si128(sc16),
                _mm256_extracti128_si256::<1>(sc16),
            ];
            let mut hm = load256(p);
            let mut sumi = _mm256_setzero_si256();
            for (h, &scales) in halves.iter().enumerate() {
                let mut q = load256(p.add(32 + 32 * h));
                for j in 0..4 {
                    let high = _mm256_slli_epi16::<2>(_mm256_and_si256(hm, one));
                    let v = _mm256_or_si256(_mm256_and_si256(q, three), high);
                    let s = group_pair_scales(scales, j as i16);
                    let prod = scaled_dot32(v, x.qs.as_ptr().add(128 * h + 32 * j), s);
                    sumi = _mm256_add_epi32(sumi, prod);
                    q = _mm256_srli_epi16::<2>(q);
                    hm = _mm256_srli_epi16::<1>(hm);
                }
            }
            let msum = _mm256_madd_epi16(load256(x.bsums.as_ptr().cast()), sc16);
            // Σ scale · (q3 − 4) · a = sumi − 4 · msum.
            let sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32::<2>(msum));
            acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum256(acc)
    }

    /// Eight 6-bit minimums as i16, each twice, to pair with the sixteen `bsums`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mins_per_group(mins: u64) -> __m256i {
        let m = _mm_cvtsi64_si128(mins as i64);
        _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m))
    }

    /// The shared body of the AVX2 Q4_K/Q5_K kernels; `high(c)` gives chunk c's fifth bits
    /// for the low-nibble and high-nibble sub-blocks (zero for Q4_K).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn k4_avx2(
        row: &[u8],
        a: &[BlockQ8x256],
        block_bytes: usize,
        nibbles_at: usize,
        mut high: impl FnMut(*const u8, usize) -> (__m256i, __m256i),
    ) -> f32 {
        let low4 = _mm256_set1_epi8(0x0F);
        let (mut acc, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (b, x) in row.chunks_exact(block_bytes).zip(a) {
            let p = b.as_ptr();
            let dm = block_scales::<true>(p, x.d);
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let q = load256(p.add(nibbles_at + 32 * c));
                let (h_lo, h_hi) = high(p, c);
                let lo = _mm256_or_si256(_mm256_and_si256(q, low4), h_lo);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), low4), h_hi);
                let j = 2 * c as i16;
                let s_lo = _mm256_shuffle_epi8(sc16, word_splat(j, j));
                let s_hi = _mm256_shuffle_epi8(sc16, word_splat(j + 1, j + 1));
                let ap = x.qs.as_ptr().add(64 * c);
                sumi = _mm256_add_epi32(sumi, scaled_dot32(lo, ap, s_lo));
                sumi = _mm256_add_epi32(sumi, scaled_dot32(hi, ap.add(32), s_hi));
            }
            let msum = _mm256_madd_epi16(load256(x.bsums.as_ptr().cast()), mins_per_group(mn));
            acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), _mm256_cvtepi32_ps(sumi), acc);
            accm = _mm256_fmadd_ps(splat_lane1(dm), _mm256_cvtepi32_ps(msum), accm);
        }
        hsum256(acc) - hsum256(accm)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_avx2(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let zero = _mm256_setzero_si256();
        k4_avx2(row, a, Q4K_BYTES, 16, |_, _| (zero, zero))
    }

    /// AVX2 Q5_K: bits 2c and 2c + 1 of `qh` become bit 4 of chunk c's two sub-blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5k_avx2(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let one = _mm256_set1_epi8(1);
        let two = _mm256_set1_epi8(2);
        k4_avx2(row, a, Q5K_BYTES, 48, |p, c| {
            // Shifting right by 2c within 16-bit lanes is safe per byte: the masks below keep
            // only bits that came from the same byte.
            let qh = _mm256_srl_epi16(load256(p.add(16)), _mm_cvtsi32_si128(2 * c as i32));
            (
                _mm256_slli_epi16::<4>(_mm256_and_si256(qh, one)),
                _mm256_slli_epi16::<3>(_mm256_and_si256(qh, two)),
            )
        })
    }

    /// AVX2 Q6_K: per 128-value half, two 32-byte `ql` loads give four 32-value vectors, each
    /// combined with its two bits of `qh`; the −32 offset is `32 · Σ scale · bsum`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_avx2(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let low4 = _mm256_set1_epi8(0x0F);
        let top2 = _mm256_set1_epi8(0x30);
        let mut acc = _mm256_setzero_ps();
        for (b, x) in row.chunks_exact(Q6K_BYTES).zip(a) {
            let p = b.as_ptr();
            let dd = _mm256_broadcastss_ps(block_scales::<false>(p.add(208), x.d));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
            let halves = [
                _mm256_castsi256_si128(sc16),
                _mm256_extracti128_si256::<1>(sc16),
            ];
            let mut sumi = _mm256_setzero_si256();
            for (h, &scales) in halves.iter().enumerate() {
                let ql0 = load256(p.add(64 * h));
                let ql1 = load256(p.add(64 * h + 32));
                let qh = load256(p.add(128 + 32 * h));
                // Each 16-bit shift moves the wanted pair of bits to bits 4-5 of its own byte.
                let v = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, low4),
                        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), top2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, low4),
                        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), top2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4),
                        _mm256_and_si256(qh, top2),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), top2),
                    ),
                ];
                for (k, &v) in v.iter().enumerate() {
                    let s = group_pair_scales(scales, k as i16);
                    let prod = scaled_dot32(v, x.qs.as_ptr().add(128 * h + 32 * k), s);
                    sumi = _mm256_add_epi32(sumi, prod);
                }
            }
            let msum = _mm256_madd_epi16(load256(x.bsums.as_ptr().cast()), sc16);
            // Σ scale · (q6 − 32) · a = sumi − 32 · msum.
            let sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32::<5>(msum));
            acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum256(acc)
    }

    // AVX-512 VNNI. A `vpdpbusd` of 64 weights leaves sixteen i32 lanes, each the sum of four
    // products of one group. Two such results are packed to i16 (`vpackssdw`, exact by the
    // ranges in the module docs) and `vpdpwssd` multiplies each pair of words by its group's
    // scale, so the per-group weighting costs two instructions per 128 values. `vpackssdw`
    // interleaves per 128-bit lane: lane i holds words from lanes 4i..4i+4 of the first
    // source, then of the second; the scale index vectors below follow that order.

    /// Q4_K/Q5_K: word positions of `packs(chunk 2k, chunk 2k + 1)` → sub-block, for k = 0.
    /// Lane i < 2 of a chunk's result covers its low-nibble sub-block, i ≥ 2 its high one.
    const K4_SCALE_IDX: [i16; 32] = {
        let mut idx = [0i16; 32];
        let mut p = 0;
        while p < 32 {
            let (lane, word) = (p / 8, p % 8);
            idx[p] = (if word < 4 { 0 } else { 2 }) + (if lane < 2 { 0 } else { 1 });
            p += 1;
        }
        idx
    };

    /// Q6_K: word positions of `packs(values 0..64, values 64..128)` of a half → group
    /// within the half (lane i covers group i of the first source, 4 + i of the second).
    const Q6_SCALE_IDX: [i16; 32] = {
        let mut idx = [0i16; 32];
        let mut p = 0;
        while p < 32 {
            let (lane, word) = (p / 8, p % 8);
            idx[p] = (if word < 4 { 0 } else { 4 }) + lane as i16;
            p += 1;
        }
        idx
    };

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn index_vector(idx: &[i16; 32]) -> __m512i {
        _mm512_loadu_si512(idx.as_ptr().cast())
    }

    /// The shared body of the AVX-512 Q4_K/Q5_K kernels. Each 32-byte chunk of nibbles is
    /// broadcast to both halves of a register, the upper half shifted down by four, so one
    /// `vpdpbusd` covers both of its sub-blocks against 64 contiguous activations.
    /// `high(qh, c, q)` adds chunk c's fifth bits (the identity for Q4_K).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn k4_avx512(
        row: &[u8],
        a: &[BlockQ8x256],
        block_bytes: usize,
        nibbles_at: usize,
        mut high: impl FnMut(*const u8, usize, __m512i) -> __m512i,
    ) -> f32 {
        let low4 = _mm512_set1_epi8(0x0F);
        let nibble_shift = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        let idx01 = index_vector(&K4_SCALE_IDX);
        let idx23 = _mm512_add_epi16(idx01, _mm512_set1_epi16(4));
        let zero = _mm512_setzero_si512();
        let (mut acc, mut accm) = (_mm512_setzero_ps(), _mm256_setzero_ps());
        for (b, x) in row.chunks_exact(block_bytes).zip(a) {
            let p = b.as_ptr();
            let dm = block_scales::<true>(p, x.d);
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let mut dots = [zero; 4];
            for (c, dot) in dots.iter_mut().enumerate() {
                let q = _mm512_broadcast_i64x4(load256(p.add(nibbles_at + 32 * c)));
                let q = _mm512_and_si512(_mm512_srlv_epi16(q, nibble_shift), low4);
                let q = high(p, c, q);
                *dot = _mm512_dpbusd_epi32(zero, q, load512(x.qs.as_ptr().add(64 * c).cast()));
            }
            let s01 = _mm512_permutexvar_epi16(idx01, sc16);
            let s23 = _mm512_permutexvar_epi16(idx23, sc16);
            let sumi = _mm512_dpwssd_epi32(zero, _mm512_packs_epi32(dots[0], dots[1]), s01);
            let sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(dots[2], dots[3]), s23);
            let msum = _mm256_madd_epi16(load256(x.bsums.as_ptr().cast()), mins_per_group(mn));
            acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), _mm512_cvtepi32_ps(sumi), acc);
            accm = _mm256_fmadd_ps(splat_lane1(dm), _mm256_cvtepi32_ps(msum), accm);
        }
        _mm512_reduce_add_ps(acc) - hsum256(accm)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn q4k_avx512(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        k4_avx512(row, a, Q4K_BYTES, 16, |_, _, q| q)
    }

    /// AVX-512 Q5_K: a byte test against bit 2c (lower half) / 2c + 1 (upper half) of the
    /// broadcast `qh` selects the values that get their fifth bit (+16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn q5k_avx512(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let sixteen = _mm512_set1_epi8(16);
        let bit = |n: i8| _mm256_set1_epi8(1 << n);
        let select = [0, 1, 2, 3].map(|c: i8| {
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(bit(2 * c)), bit(2 * c + 1))
        });
        k4_avx512(row, a, Q5K_BYTES, 48, |p, c, q| {
            let qh = _mm512_broadcast_i64x4(load256(p.add(16)));
            let set = _mm512_test_epi8_mask(qh, select[c]);
            _mm512_mask_add_epi8(q, set, q, sixteen)
        })
    }

    /// AVX-512 Q6_K: per 128-value half, the 64 `ql` bytes' low nibbles are values 0..64 and
    /// their high nibbles values 64..128; the broadcast `qh` supplies the top bits of both
    /// halves of each register with a per-half shift.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn q6k_avx512(row: &[u8], a: &[BlockQ8x256]) -> f32 {
        let low4 = _mm512_set1_epi8(0x0F);
        let top2 = _mm512_set1_epi8(0x30);
        let halves = |lo: i16, hi: i16| {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
                _mm256_set1_epi16(hi),
            )
        };
        // Bits 0-1 (values 0..32) and 2-3 (32..64) up to 4-5; bits 4-5 (64..96) stay and
        // 6-7 (96..128) come down.
        let shift_first = halves(4, 2);
        let shift_second = halves(0, 2);
        let idx0 = index_vector(&Q6_SCALE_IDX);
        let idx1 = _mm512_add_epi16(idx0, _mm512_set1_epi16(8));
        let zero = _mm512_setzero_si512();
        let mut acc = _mm512_setzero_ps();
        for (b, x) in row.chunks_exact(Q6K_BYTES).zip(a) {
            let p = b.as_ptr();
            let dd = _mm512_broadcastss_ps(block_scales::<false>(p.add(208), x.d));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192).cast()));
            let sc512 = _mm512_castsi256_si512(sc16);
            let mut sumi = zero;
            for (h, idx) in [idx0, idx1].into_iter().enumerate() {
                let ql = load512(p.add(64 * h));
                let qh = _mm512_broadcast_i64x4(load256(p.add(128 + 32 * h)));
                let first = _mm512_or_si512(
                    _mm512_and_si512(ql, low4),
                    _mm512_and_si512(_mm512_sllv_epi16(qh, shift_first), top2),
                );
                let second = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4),
                    _mm512_and_si512(_mm512_srlv_epi16(qh, shift_second), top2),
                );
                let ap = x.qs.as_ptr().add(128 * h);
                let d0 = _mm512_dpbusd_epi32(zero, first, load512(ap.cast()));
                let d1 = _mm512_dpbusd_epi32(zero, second, load512(ap.add(64).cast()));
                let scales = _mm512_permutexvar_epi16(idx, sc512);
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_packs_epi32(d0, d1), scales);
            }
            // The −32 offset: Σ scale · bsum, eight lanes, subtracted from the low eight.
            let msum = _mm256_madd_epi16(load256(x.bsums.as_ptr().cast()), sc16);
            let offset = _mm512_zextsi256_si512(_mm256_slli_epi32::<5>(msum));
            let sumi = _mm512_sub_epi32(sumi, offset);
            acc = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(sumi), acc);
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-by-byte unpacking the dequantizer documents, for comparison.
    fn k4_scale_min_naive(s: &[u8], j: usize) -> (u8, u8) {
        if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 0x0F) | (s[j - 4] >> 6) << 4,
                (s[j + 4] >> 4) | (s[j] >> 6) << 4,
            )
        }
    }

    fn q3k_scale_naive(s: &[u8], i: usize) -> i8 {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        ((low | high << 4) as i32 - 32) as i8
    }

    /// Deterministic bytes covering every bit pattern position.
    fn pseudo_random_bytes(n: usize, seed: u32) -> Vec<u8> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn scale_unpacking_matches_the_byte_layout() {
        for seed in 0..200 {
            let s = pseudo_random_bytes(12, seed);
            let (sc, mn) = k4_scales_mins(&s);
            let (sc, mn) = (sc.to_le_bytes(), mn.to_le_bytes());
            for j in 0..8 {
                assert_eq!(
                    (sc[j], mn[j]),
                    k4_scale_min_naive(&s, j),
                    "seed {seed} j {j}"
                );
            }
            let q3 = q3k_scales(&s);
            for (i, &v) in q3.iter().enumerate() {
                assert_eq!(v, q3k_scale_naive(&s, i), "seed {seed} scale {i}");
            }
        }
    }

    #[test]
    fn f16_conversion_matches_half_for_every_bit_pattern() {
        for h in 0..=u16::MAX {
            let [lo, hi] = h.to_le_bytes();
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(lo, hi);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }

    /// Every quant at its maximum against activations of −128 (beyond what `quantize_q8x256`
    /// produces) and +127: the SIMD variants' i16 intermediates must not saturate.
    #[test]
    fn extreme_quants_and_activations_agree_across_isas() {
        let types = [
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ];
        for dtype in types {
            for act in [-128i8, 127] {
                let blocks = 3;
                let mut data = vec![0xFFu8; blocks * dtype.type_size()];
                // d = dmin = 1.0 wherever the type keeps them; Q6_K's scales (i8 −1) and the
                // other packed scales stay at their all-ones extremes.
                let d_at: &[usize] = match dtype {
                    GgmlType::Q2_K => &[80, 82],
                    GgmlType::Q3_K => &[108],
                    GgmlType::Q6_K => &[208],
                    _ => &[0, 2],
                };
                for b in data.chunks_exact_mut(dtype.type_size()) {
                    for &at in d_at {
                        b[at..at + 2].copy_from_slice(&[0x00, 0x3C]);
                    }
                    if dtype == GgmlType::Q6_K {
                        // Scale −128 maximises the weighted sum's magnitude.
                        b[192..208].fill(0x80);
                    }
                }
                let cols = blocks * QK_K;
                let w = WeightView::new(dtype, 1, cols, &data).unwrap();
                let blk = BlockQ8x256 {
                    d: 1.0,
                    qs: [act; 256],
                    bsums: [16 * act as i16; 16],
                };
                let a = vec![blk; blocks];
                let mut want = [0f32];
                gemv(Isa::Scalar, &w, 0..1, &a, &mut want);
                let mut dense = vec![0f32; cols];
                crate::dequantize(dtype, &data, &mut dense).unwrap();
                let exact: f64 = dense.iter().map(|&v| v as f64 * act as f64).sum();
                assert!(
                    (want[0] as f64 - exact).abs() <= 1e-6 * exact.abs(),
                    "{dtype} scalar {} vs {exact}",
                    want[0]
                );
                for isa in Isa::available() {
                    let mut got = [0f32];
                    gemv(isa, &w, 0..1, &a, &mut got);
                    assert!(
                        (got[0] - want[0]).abs() <= 1e-6 * want[0].abs(),
                        "{dtype} {isa:?}: {} vs scalar {}",
                        got[0],
                        want[0]
                    );
                }
            }
        }
    }

    #[test]
    fn block_sizes_match_the_format() {
        for (dtype, bytes) in [
            (GgmlType::Q2_K, Q2K_BYTES),
            (GgmlType::Q3_K, Q3K_BYTES),
            (GgmlType::Q4_K, Q4K_BYTES),
            (GgmlType::Q5_K, Q5K_BYTES),
            (GgmlType::Q6_K, Q6K_BYTES),
        ] {
            assert!(supports(dtype));
            assert_eq!(dtype.type_size(), bytes, "{dtype}");
        }
        assert!(!supports(GgmlType::Q8_K));
        assert!(!supports(GgmlType::Q4_0));
    }
}
