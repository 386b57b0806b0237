//! Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 weights · 32-value 8-bit activation blocks.
//!
//! Every weight value of these types is `(code − OFFSET) · d + m`, where `code` is an
//! unsigned integer stored per value (a nibble, a nibble plus a fifth bit from `qh`, or for
//! Q8_0 the stored byte with its sign bit flipped), `d` and `m` are f16 per block and `m` is
//! zero for the types without one. Against an activation block `x ≈ d_a · q` (with
//! `s = d_a · Σq`) one block contributes
//!
//! `d · d_a · Σ (code − OFFSET) · q  +  m · s`,
//!
//! whose integer part is exact in `i32`. All variants compute that same integer per block
//! and differ only in how they sum the `f32` terms, so their results agree to rounding.
//!
//! - Scalar: the reference; decodes a block's 32 integer weights and sums their products.
//! - AVX2: `vpmaddubsw` multiplies unsigned codes by signed activations into `i16` pairs. For
//!   nibble codes the offset is removed by subtracting `maddubs(OFFSET, q)`, computed once
//!   per block for all rows; Q8_0 codes (up to 255) could saturate the `i16` pairs, so Q8_0
//!   uses the signed weights directly, moving their signs onto the activations.
//! - AVX-512 VNNI: `vpdpbusd` sums four `u8 × i8` products into `i32` without saturation, so
//!   every type uses its unsigned codes; the offset enters as the accumulator's start value
//!   `−OFFSET · Σq` (per four activations), computed once per block for all rows. Q5 fifth
//!   bits go straight from `qh` into a mask register. Vectors stay 256 bits wide: one block
//!   is 32 bytes, and 512-bit ops would need a cross-lane insert per pair of blocks while
//!   running on fewer ports, for no gain.
//!
//! The SIMD variants process [`GROUP`] rows per pass, so each activation block is loaded,
//! and its offset term computed, once per group. Nibble types put two rows in one vector:
//! the low 128 bits hold one row's 16 code bytes, the high 128 bits the next row's, and the
//! low and high nibbles meet activations 0..16 and 16..32 (each repeated in both halves).
//! Q8_0 takes one row per vector. The rows' f16 `d` (and `m`) are converted four at a time;
//! lane sums are scaled per block by `d · d_a` with an FMA, and the `m · s` terms of a group
//! add up in one vector.
//!
//! Models on AVX2 and AVX-512 VNNI machines use [`packed`] instead for decode products: the
//! same blocks repacked at load into 16-row panels, which several tokens share far better, so
//! the row kernels here serve matrices read in the file's own layout (tools, tests, and
//! every product at `QUARRY_ISA=scalar`).
//!
//! Invariants the kernels rely on: activation codes lie in −127..=127 (what
//! `quantize_q8x32` produces), so negating one cannot overflow and no `i16` pair sum
//! saturates; and a SIMD variant runs only after [`runnable`] confirmed its CPU features,
//! whatever `Isa` the caller passed.

use std::ops::Range;

use half::f16;

/// `$call` with the type name `$L` standing for the layout of `$dtype` (one of the five
/// types this module multiplies), or `$other` for any other type.
macro_rules! by_layout {
    ($dtype:expr, $L:ident => $call:expr, _ => $other:expr) => {
        match $dtype {
            GgmlType::Q4_0 => {
                type $L = Q4_0;
                $call
            }
            GgmlType::Q4_1 => {
                type $L = Q4_1;
                $call
            }
            GgmlType::Q5_0 => {
                type $L = Q5_0;
                $call
            }
            GgmlType::Q5_1 => {
                type $L = Q5_1;
                $call
            }
            GgmlType::Q8_0 => {
                type $L = Q8_0;
                $call
            }
            _ => $other,
        }
    };
}

pub mod packed;

use super::Isa;
use crate::act::BlockQ8x32;
use crate::{GgmlType, WeightView};

/// True for the five 32-value block types this module multiplies.
pub fn supports(dtype: GgmlType) -> bool {
    matches!(
        dtype,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0
    )
}

/// `out[i] = Σ_c W[rows.start + i][c] · x[c]`, with `x` given as 32-value blocks
/// (`a.len() == w.cols() / 32`).
///
/// Panics if `w.dtype()` is not [supported](supports), or on a shape mismatch between
/// `w`, `rows`, `a` and `out`. An `isa` this CPU cannot run (only possible for one not taken
/// from [`Isa::available`]) falls back to the scalar reference.
pub fn gemv(isa: Isa, w: &WeightView<'_>, rows: Range<usize>, a: &[BlockQ8x32], out: &mut [f32]) {
    check_shapes(w, &rows, a, out);
    let rb = w.row_bytes();
    let data = &w.data()[rows.start * rb..rows.end * rb];
    let isa = if runnable(isa) { isa } else { Isa::Scalar };
    by_layout!(w.dtype(), L => run::<L>(isa, data, rb, a, out), _ => unreachable!("checked by supports"))
}

/// Panics unless `w` has a kernel here and `rows`, `a` and `out` fit it.
fn check_shapes(w: &WeightView<'_>, rows: &Range<usize>, a: &[BlockQ8x32], out: &[f32]) {
    assert!(
        supports(w.dtype()),
        "legacy gemv: {} has no 32-value integer kernel",
        w.dtype()
    );
    assert!(
        rows.start <= rows.end && rows.end <= w.rows(),
        "legacy gemv: rows {rows:?} out of range for {} rows",
        w.rows()
    );
    assert_eq!(
        a.len() * 32,
        w.cols(),
        "legacy gemv: {} activation blocks for {} columns",
        a.len(),
        w.cols()
    );
    assert_eq!(
        out.len(),
        rows.len(),
        "legacy gemv: {} outputs for {} rows",
        out.len(),
        rows.len()
    );
}

/// Whether this CPU has every feature the `isa` kernels are compiled with. Detection
/// results are cached by std, so this costs a few loads per call.
fn runnable(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512Vnni => false,
    }
}

/// Rows per pass of the SIMD kernels: enough to amortize loading each activation block and
/// its offset term, few enough that the row accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 4;

/// Byte offset of the f16 minimum `m` in the types that have one.
const MIN_AT: usize = 2;

/// Byte layout of one 32-value block, and the offset its codes carry.
trait Layout {
    /// Bytes per block (the type's `type_size`).
    const BYTES: usize;
    /// Whether an f16 minimum `m` follows the f16 scale `d` (at byte [`MIN_AT`]); the SIMD
    /// kernels read both with one 4-byte load.
    const HAS_MIN: bool;
    /// Byte offset of the little-endian `u32` whose bit i is the fifth bit of code i.
    const QH: Option<usize>;
    /// Byte offset of the codes: 16 bytes of nibble pairs (low nibbles are values 0..16,
    /// high nibbles 16..32), or for Q8_0 32 signed bytes.
    const QS: usize;
    /// Subtracted from every unsigned code (for Q8_0, `byte ^ 0x80` is the code).
    const OFFSET: u8;
}

/// Q4_0: f16 d, nibbles; value = (q − 8) · d.
struct Q4_0;
/// Q4_1: f16 d, f16 m, nibbles; value = q · d + m.
struct Q4_1;
/// Q5_0: f16 d, qh, nibbles; value = (q5 − 16) · d.
struct Q5_0;
/// Q5_1: f16 d, f16 m, qh, nibbles; value = q5 · d + m.
struct Q5_1;
/// Q8_0: f16 d, 32 i8; value = q · d.
struct Q8_0;

impl Layout for Q4_0 {
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;
    const QH: Option<usize> = None;
    const QS: usize = 2;
    const OFFSET: u8 = 8;
}

impl Layout for Q4_1 {
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    const QH: Option<usize> = None;
    const QS: usize = 4;
    const OFFSET: u8 = 0;
}

impl Layout for Q5_0 {
    const BYTES: usize = 22;
    const HAS_MIN: bool = false;
    const QH: Option<usize> = Some(2);
    const QS: usize = 6;
    const OFFSET: u8 = 16;
}

impl Layout for Q5_1 {
    const BYTES: usize = 24;
    const HAS_MIN: bool = true;
    const QH: Option<usize> = Some(4);
    const QS: usize = 8;
    const OFFSET: u8 = 0;
}

impl Layout for Q8_0 {
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;
    const QH: Option<usize> = None;
    const QS: usize = 2;
    const OFFSET: u8 = 128;
}

/// Whether the codes are nibbles (every type but Q8_0).
const fn nibbles<L: Layout>() -> bool {
    L::BYTES - L::QS == 16
}

/// Runs the `isa` variant of layout `L` over `data` (whole rows of `rb` bytes each);
/// `isa` must be [`runnable`].
fn run<L: Layout>(isa: Isa, data: &[u8], rb: usize, a: &[BlockQ8x32], out: &mut [f32]) {
    debug_assert_eq!(rb, a.len() * L::BYTES);
    debug_assert_eq!(data.len(), out.len() * rb);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_groups(data, rb, out, |rows, o| {
            // SAFETY: `runnable(Avx2)` confirmed avx2, fma and f16c; `by_groups` hands out
            // `o.len()` whole rows of `rb = a.len() * L::BYTES` bytes.
            unsafe { avx2::rows::<L>(rows, rb, a, o) }
        }),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => by_groups(data, rb, out, |rows, o| {
            // SAFETY: `runnable(Avx512Vnni)` confirmed every feature `rows` enables;
            // shapes as above.
            unsafe { avx512::rows::<L>(rows, rb, a, o) }
        }),
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = scalar_row::<L>(&data[i * rb..(i + 1) * rb], a);
            }
        }
    }
}

/// Calls `kernel(rows, out)` on groups of [`GROUP`] rows, then on each remaining row alone.
#[cfg(target_arch = "x86_64")]
fn by_groups(data: &[u8], rb: usize, out: &mut [f32], mut kernel: impl FnMut(&[u8], &mut [f32])) {
    let mut groups = out.chunks_exact_mut(GROUP);
    let mut first = 0;
    for o in &mut groups {
        kernel(&data[first * rb..(first + GROUP) * rb], o);
        first += GROUP;
    }
    for o in groups.into_remainder().chunks_mut(1) {
        kernel(&data[first * rb..(first + 1) * rb], o);
        first += 1;
    }
}

/// The f16 at `bytes[at..at + 2]`, as `f32`.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The 32 integer weights `code − OFFSET` of one block (all fit in `i8`).
fn block_values<L: Layout>(block: &[u8]) -> [i8; 32] {
    let mut v = [0i8; 32];
    if nibbles::<L>() {
        let qh = L::QH.map_or(0, |o| {
            u32::from_le_bytes([block[o], block[o + 1], block[o + 2], block[o + 3]])
        });
        for (j, &q) in block[L::QS..L::QS + 16].iter().enumerate() {
            let lo = (q & 0x0F) | (((qh >> j) & 1) as u8) << 4;
            let hi = (q >> 4) | (((qh >> (j + 16)) & 1) as u8) << 4;
            v[j] = (lo as i16 - L::OFFSET as i16) as i8;
            v[j + 16] = (hi as i16 - L::OFFSET as i16) as i8;
        }
    } else {
        for (x, &q) in v.iter_mut().zip(&block[L::QS..L::QS + 32]) {
            *x = q as i8;
        }
    }
    v
}

/// The scalar reference: one row (`a.len()` blocks) dotted with the activations.
fn scalar_row<L: Layout>(row: &[u8], a: &[BlockQ8x32]) -> f32 {
    let mut sum = 0f32;
    for (block, ab) in row.chunks_exact(L::BYTES).zip(a) {
        let w = block_values::<L>(block);
        let dot: i32 = w
            .iter()
            .zip(&ab.qs)
            .map(|(&x, &y)| x as i32 * y as i32)
            .sum();
        sum += dot as f32 * (f16_at(block, 0) * ab.d);
        if L::HAS_MIN {
            sum += f16_at(block, MIN_AT) * ab.s;
        }
    }
    sum
}

/// Pieces shared by the two x86 variants (all need avx2, fma and f16c).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use core::ptr::read_unaligned;

    use super::Layout;

    /// Block `b`'s f16 scale `d` in the `R` rows starting at `p` (stride `rb`), converted to
    /// `f32` in lanes 0..R (the Q8_0 kernels, which need no minimum).
    ///
    /// # Safety
    /// `R <= 4` and the first two bytes of each of those blocks are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_lanes<L: Layout, const R: usize>(
        p: *const u8,
        rb: usize,
        b: usize,
    ) -> __m128 {
        let mut bits = 0u64;
        for r in 0..R {
            let h = read_unaligned(p.add(r * rb + b * L::BYTES) as *const u16);
            bits |= (u16::from_le(h) as u64) << (16 * r);
        }
        _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64))
    }

    /// Block `b`'s f16 scale `d` and minimum `m` in the `R` rows (1 or 4) starting at `p`
    /// (stride `rb`), converted to `f32`: lane 2r holds row r's `d`, lane 2r + 1 its `m` (0
    /// for types without one).
    ///
    /// # Safety
    /// `R <= 4` and the first four bytes of each of those blocks are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_min_lanes<L: Layout, const R: usize>(
        p: *const u8,
        rb: usize,
        b: usize,
    ) -> __m256 {
        let mut words = [0u64; 2];
        for r in 0..R {
            let at = p.add(r * rb + b * L::BYTES);
            let field = if L::HAS_MIN {
                u32_at(at)
            } else {
                u16::from_le(read_unaligned(at as *const u16)) as u32
            };
            words[r / 2] |= (field as u64) << (32 * (r % 2));
        }
        _mm256_cvtph_ps(_mm_set_epi64x(words[1] as i64, words[0] as i64))
    }

    /// The little-endian `u32` at `p`.
    ///
    /// # Safety
    /// `p..p + 4` is readable.
    #[inline]
    pub unsafe fn u32_at(p: *const u8) -> u32 {
        u32::from_le(read_unaligned(p as *const u32))
    }

    /// The nibble codes of two rows' blocks, whose 16 code bytes start at `q0` and `q1`:
    /// `(low, high)` where `low` holds values 0..16 of row 0 then of row 1, and `high` values
    /// 16..32 likewise.
    ///
    /// # Safety
    /// `q0..q0 + 16` and `q1..q1 + 16` are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn nibble_pair(q0: *const u8, q1: *const u8) -> (__m256i, __m256i) {
        let both = _mm256_loadu2_m128i(q1 as *const __m128i, q0 as *const __m128i);
        let mask = _mm256_set1_epi8(0x0F);
        let low = _mm256_and_si256(both, mask);
        let high = _mm256_and_si256(_mm256_srli_epi16(both, 4), mask);
        (low, high)
    }

    /// Two rows' fifth bits (`qh0`, `qh1`) regrouped to match [`nibble_pair`]: bit i of the
    /// first result belongs to byte i of `low`, of the second to byte i of `high`.
    #[inline]
    pub fn fifth_bit_pair(qh0: u32, qh1: u32) -> (u32, u32) {
        (
            (qh0 & 0xFFFF) | (qh1 << 16),
            (qh0 >> 16) | (qh1 & 0xFFFF_0000),
        )
    }

    /// Lane `lane` of a group's per-row scales in all eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn splat(lanes: __m128, lane: usize) -> __m256 {
        _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(lanes),
            _mm256_set1_epi32(lane as i32),
        )
    }

    /// Rows `r0`'s and `r1`'s scales (lanes 2·r0 and 2·r1 of a [`scale_min_lanes`] layout) in
    /// lanes 0..4 and 4..8.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn pair_splat(lanes: __m256, r0: usize, r1: usize) -> __m256 {
        let (l0, l1) = (2 * r0 as i32, 2 * r1 as i32);
        let idx = _mm256_setr_epi32(l0, l0, l0, l0, l1, l1, l1, l1);
        _mm256_permutevar8x32_ps(lanes, idx)
    }

    /// The sum of four lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn hsum128(q: __m128) -> f32 {
        let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
    }

    /// The sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn hsum(v: __m256) -> f32 {
        hsum128(_mm_add_ps(
            _mm256_castps256_ps128(v),
            _mm256_extractf128_ps(v, 1),
        ))
    }

    /// Writes the results of a nibble kernel: pair k's accumulator holds row 2k in lanes
    /// 0..4 and row 2k + 1 in lanes 4..8 (a group of one row fills both halves alike);
    /// `mins` lane 2r + 1 is row r's Σ m · s (the [`scale_min_lanes`] layout).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn finish_pairs(acc: &[__m256; 2], mins: __m256, out: &mut [f32]) {
        let mut m = [0f32; 8];
        _mm256_storeu_ps(m.as_mut_ptr(), mins);
        for (r, o) in out.iter_mut().enumerate() {
            let half = if r % 2 == 0 {
                _mm256_castps256_ps128(acc[r / 2])
            } else {
                _mm256_extractf128_ps(acc[r / 2], 1)
            };
            *o = hsum128(half) + m[2 * r + 1];
        }
    }

    /// Writes the results of a Q8_0 kernel: one accumulator per row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn finish_rows(acc: &[__m256; 4], out: &mut [f32]) {
        for (r, o) in out.iter_mut().enumerate() {
            *o = hsum(acc[r]);
        }
    }

    /// The 32 activation codes of a block as (values 0..16 twice, values 16..32 twice), the
    /// operands matching [`nibble_pair`].
    ///
    /// # Safety
    /// `q..q + 32` is readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn activation_halves(q: *const i8) -> (__m256i, __m256i) {
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i)),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(16) as *const __m128i)),
        )
    }

    /// Row pairs of a group of `R` rows (1 or 4): (0, 1) and (2, 3), or (0, 0) for a lone
    /// row, whose result is then read from the first half only.
    pub const fn pairs<const R: usize>() -> &'static [(usize, usize)] {
        if R == 1 {
            &[(0, 0)]
        } else {
            &[(0, 1), (2, 3)]
        }
    }
}

/// AVX2 + FMA + F16C: `vpmaddubsw` on unsigned codes with the offset removed per `i16` pair
/// (Q8_0: on |w| with w's signs moved onto the activations).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::x86::*;
    use super::{nibbles, Layout, GROUP, Q8_0};
    use crate::act::BlockQ8x32;

    /// `out[r]` = row r of `rows` (stride `rb`) · `a`, for `out.len()` rows.
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c; `out.len()` is 1 or [`GROUP`]; `rb == a.len() *
    /// L::BYTES` and `rows.len() == out.len() * rb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows<L: Layout>(rows: &[u8], rb: usize, a: &[BlockQ8x32], out: &mut [f32]) {
        debug_assert_eq!(rb, a.len() * L::BYTES);
        debug_assert_eq!(rows.len(), out.len() * rb);
        let p = rows.as_ptr();
        match (nibbles::<L>(), out.len() == GROUP) {
            (true, true) => nibble_group::<L, GROUP>(p, rb, a, out),
            (true, false) => nibble_group::<L, 1>(p, rb, a, out),
            (false, true) => q8_group::<GROUP>(p, rb, a, out),
            (false, false) => q8_group::<1>(p, rb, a, out),
        }
    }

    /// Prefetches block `b`'s share of the `group` bytes after `p`. A group's rows are
    /// contiguous and groups are walked in order, so this streams the next group in while the
    /// current one is computed; without it the decode path reached only half of the
    /// machine's read bandwidth (Gemma 3 270M's Q8_0 head: 45 → 71 tok/s). Prefetching past
    /// the end of the matrix is harmless: a prefetch never faults.
    #[inline(always)]
    unsafe fn prefetch_next_group(p: *const u8, group: usize, blocks: usize, b: usize) {
        let share = group.div_ceil(blocks).next_multiple_of(64);
        let next = p.wrapping_add(group + b * share);
        for line in (0..share).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line) as *const i8);
        }
    }

    /// `R` rows (1 or 4) of a nibble type, two rows per vector: a row pair's codes for
    /// values 0..16 meet the activations 0..16 repeated in both halves, likewise 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibble_group<L: Layout, const R: usize>(
        p: *const u8,
        rb: usize,
        a: &[BlockQ8x32],
        out: &mut [f32],
    ) {
        let ones = _mm256_set1_epi16(1);
        let offset = _mm256_set1_epi8(L::OFFSET as i8);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut mins = _mm256_setzero_ps();
        let blocks = a.len();
        for (b, ab) in a.iter().enumerate() {
            prefetch_next_group(p, R * rb, blocks, b);
            let fields = scale_min_lanes::<L, R>(p, rb, b);
            let scale = _mm256_mul_ps(fields, _mm256_set1_ps(ab.d));
            if L::HAS_MIN {
                mins = _mm256_fmadd_ps(fields, _mm256_set1_ps(ab.s), mins);
            }
            let q = activation_halves(ab.qs.as_ptr());
            // OFFSET · (sum of four activations), in the i16 lanes the pair sums land in.
            let corr = if L::OFFSET != 0 {
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(offset, q.0),
                    _mm256_maddubs_epi16(offset, q.1),
                )
            } else {
                _mm256_setzero_si256()
            };
            for (k, &(r0, r1)) in pairs::<R>().iter().enumerate() {
                let b0 = p.add(r0 * rb + b * L::BYTES);
                let b1 = p.add(r1 * rb + b * L::BYTES);
                let (mut lo, mut hi) = nibble_pair(b0.add(L::QS), b1.add(L::QS));
                if let Some(h) = L::QH {
                    let (mlo, mhi) = fifth_bit_pair(u32_at(b0.add(h)), u32_at(b1.add(h)));
                    let (flo, fhi) = sixteens(mlo, mhi);
                    lo = _mm256_or_si256(lo, flo);
                    hi = _mm256_or_si256(hi, fhi);
                }
                // Each i16 lane: four code × activation products, at most 4·31·127.
                let sums =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, q.0), _mm256_maddubs_epi16(hi, q.1));
                let sums = _mm256_sub_epi16(sums, corr);
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, ones));
                acc[k] = _mm256_fmadd_ps(dot, pair_splat(scale, r0, r1), acc[k]);
            }
        }
        finish_pairs(&acc, mins, out);
    }

    /// 16 in byte i of the first vector where bit i of `lo` is set, else 0; likewise the
    /// second vector from `hi`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sixteens(lo: u32, hi: u32) -> (__m256i, __m256i) {
        let both = _mm256_set1_epi64x((lo as u64 | (hi as u64) << 32) as i64);
        (spread(both, 0), spread(both, 4))
    }

    /// 16 in byte i where bit i % 8 of byte `first + i / 8` of `both` is set, else 0.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn spread(both: __m256i, first: i64) -> __m256i {
        let step = 0x0101_0101_0101_0101;
        let idx = _mm256_setr_epi64x(
            first * step,
            (first + 1) * step,
            (first + 2) * step,
            (first + 3) * step,
        );
        let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let bytes = _mm256_shuffle_epi8(both, idx);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, select), select);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }

    /// `R` rows (1 or 4) of Q8_0, one row per vector.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_group<const R: usize>(p: *const u8, rb: usize, a: &[BlockQ8x32], out: &mut [f32]) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let blocks = a.len();
        for (b, ab) in a.iter().enumerate() {
            prefetch_next_group(p, R * rb, blocks, b);
            let scale = _mm_mul_ps(scale_lanes::<Q8_0, R>(p, rb, b), _mm_set1_ps(ab.d));
            let q = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate().take(R) {
                let blk = p.add(r * rb + b * Q8_0::BYTES + Q8_0::QS);
                let w = _mm256_loadu_si256(blk as *const __m256i);
                let magnitude = _mm256_sign_epi8(w, w);
                // |w| · (q with w's sign): pair sums at most 2·128·127, no saturation.
                let sums = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(q, w));
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, ones));
                *acc = _mm256_fmadd_ps(dot, splat(scale, r), *acc);
            }
        }
        finish_rows(&acc, out);
    }
}

/// AVX-512 F/BW/VL + VNNI on 256-bit vectors: `vpdpbusd` on unsigned codes, started from
/// `−OFFSET · Σq`; fifth bits added under a mask taken straight from `qh`. Same row
/// grouping as [`avx2`].
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::x86::*;
    use super::{nibbles, Layout, GROUP, Q8_0};
    use crate::act::BlockQ8x32;

    /// `out[r]` = row r of `rows` (stride `rb`) · `a`, for `out.len()` rows.
    ///
    /// # Safety
    /// The CPU has avx2, fma, f16c, avx512f, avx512bw, avx512vl and avx512vnni;
    /// `out.len()` is 1 or [`GROUP`]; `rb == a.len() * L::BYTES` and
    /// `rows.len() == out.len() * rb`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows<L: Layout>(rows: &[u8], rb: usize, a: &[BlockQ8x32], out: &mut [f32]) {
        debug_assert_eq!(rb, a.len() * L::BYTES);
        debug_assert_eq!(rows.len(), out.len() * rb);
        let p = rows.as_ptr();
        match (nibbles::<L>(), out.len() == GROUP) {
            (true, true) => nibble_group::<L, GROUP>(p, rb, a, out),
            (true, false) => nibble_group::<L, 1>(p, rb, a, out),
            (false, true) => q8_group::<GROUP>(p, rb, a, out),
            (false, false) => q8_group::<1>(p, rb, a, out),
        }
    }

    /// `R` rows (1 or 4) of a nibble type, two rows per vector as in the AVX2 kernel.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn nibble_group<L: Layout, const R: usize>(
        p: *const u8,
        rb: usize,
        a: &[BlockQ8x32],
        out: &mut [f32],
    ) {
        let offset = _mm256_set1_epi8(L::OFFSET as i8);
        let sixteen = _mm256_set1_epi8(16);
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut mins = _mm256_setzero_ps();
        for (b, ab) in a.iter().enumerate() {
            let fields = scale_min_lanes::<L, R>(p, rb, b);
            let scale = _mm256_mul_ps(fields, _mm256_set1_ps(ab.d));
            if L::HAS_MIN {
                mins = _mm256_fmadd_ps(fields, _mm256_set1_ps(ab.s), mins);
            }
            let (qlo, qhi) = activation_halves(ab.qs.as_ptr());
            // −OFFSET · (sum of eight activations): where every row pair's i32 sums start.
            let start = if L::OFFSET == 0 {
                zero
            } else {
                let off = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, offset, qlo), offset, qhi);
                _mm256_sub_epi32(zero, off)
            };
            for (acc, &(r0, r1)) in acc.iter_mut().zip(pairs::<R>()) {
                let b0 = p.add(r0 * rb + b * L::BYTES);
                let b1 = p.add(r1 * rb + b * L::BYTES);
                let (mut lo, mut hi) = nibble_pair(b0.add(L::QS), b1.add(L::QS));
                if let Some(h) = L::QH {
                    let (mlo, mhi) = fifth_bit_pair(u32_at(b0.add(h)), u32_at(b1.add(h)));
                    lo = _mm256_mask_add_epi8(lo, mlo, lo, sixteen);
                    hi = _mm256_mask_add_epi8(hi, mhi, hi, sixteen);
                }
                let sums = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(start, lo, qlo), hi, qhi);
                let dot = _mm256_cvtepi32_ps(sums);
                *acc = _mm256_fmadd_ps(dot, pair_splat(scale, r0, r1), *acc);
            }
        }
        finish_pairs(&acc, mins, out);
    }

    /// `R` rows (1 or 4) of Q8_0, one row per vector: codes are the bytes with the sign bit
    /// flipped (w + 128), started from −128 · Σq.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q8_group<const R: usize>(p: *const u8, rb: usize, a: &[BlockQ8x32], out: &mut [f32]) {
        let flip = _mm256_set1_epi8(-128);
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, ab) in a.iter().enumerate() {
            let scale = _mm_mul_ps(scale_lanes::<Q8_0, R>(p, rb, b), _mm_set1_ps(ab.d));
            let q = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            let start = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, flip, q));
            for (r, acc) in acc.iter_mut().enumerate().take(R) {
                let blk = p.add(r * rb + b * Q8_0::BYTES + Q8_0::QS);
                let w = _mm256_loadu_si256(blk as *const __m256i);
                let sums = _mm256_dpbusd_epi32(start, _mm256_xor_si256(w, flip), q);
                let dot = _mm256_cvtepi32_ps(sums);
                *acc = _mm256_fmadd_ps(dot, splat(scale, r), *acc);
            }
        }
        finish_rows(&acc, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_layout<L: Layout>(dtype: GgmlType) {
        assert_eq!(L::BYTES, dtype.type_size(), "{dtype}");
        assert_eq!(dtype.block_size(), 32, "{dtype}");
    }

    #[test]
    fn layouts_match_the_type_sizes() {
        check_layout::<Q4_0>(GgmlType::Q4_0);
        check_layout::<Q4_1>(GgmlType::Q4_1);
        check_layout::<Q5_0>(GgmlType::Q5_0);
        check_layout::<Q5_1>(GgmlType::Q5_1);
        check_layout::<Q8_0>(GgmlType::Q8_0);
        assert!(!nibbles::<Q8_0>() && nibbles::<Q5_1>());
    }

    #[test]
    fn block_values_match_the_decoder() {
        // Every byte distinct, scale 1 and minimum 0, so decoded values are the integers.
        fn check<L: Layout>(dtype: GgmlType) {
            let mut block: Vec<u8> = (0..L::BYTES as u8).map(|i| i.wrapping_mul(97)).collect();
            block[..2].copy_from_slice(&f16::ONE.to_le_bytes());
            if L::HAS_MIN {
                block[MIN_AT..MIN_AT + 2].copy_from_slice(&f16::ZERO.to_le_bytes());
            }
            let mut want = [0f32; 32];
            crate::dequantize(dtype, &block, &mut want).unwrap();
            let got = block_values::<L>(&block).map(f32::from);
            assert_eq!(got, want, "{dtype}");
        }
        check::<Q4_0>(GgmlType::Q4_0);
        check::<Q4_1>(GgmlType::Q4_1);
        check::<Q5_0>(GgmlType::Q5_0);
        check::<Q5_1>(GgmlType::Q5_1);
        check::<Q8_0>(GgmlType::Q8_0);
    }

    #[test]
    fn a_level_this_cpu_lacks_runs_the_scalar_reference() {
        let bytes: Vec<u8> = (0..3 * 2 * 34)
            .map(|i| (i * 37 % 251) as u8 & 0x3F)
            .collect();
        let w = WeightView::new(GgmlType::Q8_0, 3, 64, &bytes).unwrap();
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 9.0).collect();
        let a: Vec<_> = x.chunks_exact(32).map(crate::act::quantize_q8x32).collect();
        let mut want = [0f32; 2];
        gemv(Isa::Scalar, &w, 1..3, &a, &mut want);
        for isa in [Isa::Avx2, Isa::Avx512Vnni] {
            if !runnable(isa) {
                let mut got = [f32::NAN; 2];
                gemv(isa, &w, 1..3, &a, &mut got);
                assert_eq!(got, want, "{isa:?}");
            }
        }
    }

    #[test]
    fn available_isas_are_runnable() {
        assert!(runnable(Isa::Scalar));
        for isa in Isa::available() {
            assert!(runnable(isa), "{isa:?}");
        }
    }
}
