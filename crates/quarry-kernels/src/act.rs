//! Activations quantized to 8 bits, once, for every matmul that reads them.
//!
//! Integer dot products need the activation side in blocks that line up with the weight
//! blocks: 32-value blocks for the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and 256-value
//! super-blocks with 16-value group sums for the K-quants. [`QuantizedActivations`] computes
//! each form lazily, at most once, so Q/K/V (and gate/up) share one quantization of their
//! common input. These forms never leave memory, so they use `f32` scales rather than ggml's
//! `f16` (a little more precision at no cost in the weight-bandwidth-bound dot products).

use std::sync::OnceLock;

use crate::pool;

/// 32 activations: `x[i] ≈ d · qs[i]`; `s = d · Σ qs` lets the Q4_1/Q5_1 minimum be applied
/// once per block, and `sum = Σ qs` lets a kernel take a weight code offset out once per
/// block in integers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8x32 {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; 32],
}

/// 256 activations: `x[i] ≈ d · qs[i]`; `bsums[g]` is the sum of `qs[16g .. 16g+16]`, which
/// the K-quant kernels need for their per-group minimums and offsets.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct BlockQ8x256 {
    pub d: f32,
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
}

impl Default for BlockQ8x256 {
    fn default() -> Self {
        BlockQ8x256 {
            d: 0.0,
            qs: [0; 256],
            bsums: [0; 16],
        }
    }
}

impl BlockQ8x32 {
    /// The block of codes `qs` (summing to `sum`) at scale `d`.
    fn from_codes(d: f32, sum: i32, qs: [i8; 32]) -> BlockQ8x32 {
        BlockQ8x32 {
            d,
            s: d * sum as f32,
            sum,
            qs,
        }
    }
}

/// Adding then subtracting 1.5·2²³ rounds an `f32` of magnitude below 2²² to the nearest
/// integer (ties to even) in plain SSE2 arithmetic, which the compiler vectorizes; `round()`
/// is a libm call per value on baseline x86-64 (1% of a decode step).
const ROUNDER: f32 = 12_582_912.0;

/// `y` (|y| ≤ 127.5) rounded to the nearest integer, ties to even.
#[inline(always)]
fn round_to_i8(y: f32) -> i8 {
    ((y + ROUNDER) - ROUNDER) as i8
}

/// Quantizes 32 values (round to nearest, scale from the largest magnitude), with AVX2 where
/// the CPU has it: bit-identical to [`quantize_q8x32_scalar`] on every input without NaN
/// (tested), and several times faster than the compiler's SSE2 version of it, which matters
/// because decode steps quantize on one thread while the others wait.
pub fn quantize_q8x32(x: &[f32]) -> BlockQ8x32 {
    assert_eq!(x.len(), 32, "quantize_q8x32 takes 32 values");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 and `x` holds 32 values.
        return unsafe { avx2::quantize_q8x32(x) };
    }
    quantize_q8x32_scalar(x)
}

/// The scale `d` of a block whose largest magnitude is `amax`, and its inverse (0 for a
/// silent block).
#[inline(always)]
fn scale_and_inverse(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// The reference [`quantize_q8x32`].
pub fn quantize_q8x32_scalar(x: &[f32]) -> BlockQ8x32 {
    assert_eq!(x.len(), 32, "quantize_q8x32 takes 32 values");
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (d, inv) = scale_and_inverse(amax);
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = round_to_i8(v * inv);
        sum += *q as i32;
    }
    BlockQ8x32::from_codes(d, sum, qs)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{scale_and_inverse, BlockQ8x32, ROUNDER};

    /// [`super::quantize_q8x32_scalar`] in 256-bit vectors: the same maximum, the same
    /// multiply and rounding additions per value, an exact integer sum.
    ///
    /// # Safety
    /// The CPU has AVX2 and `x.len() == 32`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_q8x32(x: &[f32]) -> BlockQ8x32 {
        debug_assert_eq!(x.len(), 32);
        let p = x.as_ptr();
        let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let a = v.map(|v| _mm256_and_ps(v, magnitude));
        let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let (d, inv) = scale_and_inverse(amax);
        let (inv, rounder) = (_mm256_set1_ps(inv), _mm256_set1_ps(ROUNDER));
        let q = v.map(|v| {
            let y = _mm256_mul_ps(v, inv);
            _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(y, rounder), rounder))
        });
        // packs interleave 128-bit lanes; the permute puts the 32 codes back in order.
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut qs = [0i8; 32];
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
        let t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
        BlockQ8x32::from_codes(d, sum, qs)
    }
}

/// Quantizes 256 values and their 16-value group sums.
pub fn quantize_q8x256(x: &[f32]) -> BlockQ8x256 {
    assert_eq!(x.len(), 256, "quantize_q8x256 takes 256 values");
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 256];
    let mut bsums = [0i16; 16];
    for (i, (q, v)) in qs.iter_mut().zip(x).enumerate() {
        *q = round_to_i8(v * inv);
        bsums[i / 16] += *q as i16;
    }
    BlockQ8x256 { d, qs, bsums }
}

/// `x` (rows of `cols` values) as blocks of `size` values, quantized by the pool: a prompt
/// has hundreds of rows, and a task takes a run of them (at least 64 Ki values).
fn quantized_on_pool<B: Default + Clone + Send>(
    x: &[f32],
    cols: usize,
    size: usize,
    quantize: fn(&[f32]) -> B,
) -> Vec<B> {
    let mut blocks = vec![B::default(); x.len() / size];
    let per_task = (64 * 1024 / size).max(cols / size).max(1);
    pool::global().for_each_chunk_mut(&mut blocks, per_task, &|c, out| {
        let x = &x[c * per_task * size..][..out.len() * size];
        for (b, v) in out.iter_mut().zip(x.chunks_exact(size)) {
            *b = quantize(v);
        }
    });
    blocks
}

/// `n_tokens` rows of `cols` activations, with their 8-bit forms computed on first use.
///
/// The first [`QuantizedActivations::integer_tokens`] rows are decode tokens, which every
/// matrix with an integer kernel multiplies from the 8-bit form; the others are multiplied in
/// 8 bits by a repacked matrix and in `f32` by any other (see `matmul_quantized`), in
/// [segments](QuantizedActivations::with_segments) one at a time (one per sequence of a
/// batch: each gets the products it would get alone).
pub struct QuantizedActivations<'x> {
    x: &'x [f32],
    n_tokens: usize,
    cols: usize,
    integer_tokens: usize,
    /// Lengths of the runs of `f32` rows after the integer ones; empty means one run.
    segments: Vec<usize>,
    q8x32: OnceLock<Vec<BlockQ8x32>>,
    q8x256: OnceLock<Vec<BlockQ8x256>>,
}

impl<'x> QuantizedActivations<'x> {
    /// Wraps `x` (`n_tokens × cols`, row-major). Nothing is quantized until a matmul asks.
    pub fn new(x: &'x [f32], n_tokens: usize, cols: usize) -> Self {
        assert_eq!(
            Some(x.len()),
            n_tokens.checked_mul(cols),
            "activations: {} values are not {n_tokens} × {cols}",
            x.len()
        );
        QuantizedActivations {
            x,
            n_tokens,
            cols,
            integer_tokens: usize::from(n_tokens == 1),
            segments: Vec::new(),
            q8x32: OnceLock::new(),
            q8x256: OnceLock::new(),
        }
    }

    /// Marks the first `n` rows as decode tokens (by default: the row of a single token,
    /// none of a batch). Panics if `n > n_tokens`.
    pub fn with_integer_tokens(mut self, n: usize) -> Self {
        assert!(
            n <= self.n_tokens,
            "{n} integer tokens of {}",
            self.n_tokens
        );
        self.integer_tokens = n;
        self
    }

    /// Splits the rows after the integer ones into runs of these lengths, multiplied one run
    /// at a time. Panics unless they add up to those rows.
    pub fn with_segments(mut self, lengths: Vec<usize>) -> Self {
        assert_eq!(
            lengths.iter().sum::<usize>(),
            self.n_tokens - self.integer_tokens,
            "segments {lengths:?} do not cover the {} f32 rows",
            self.n_tokens - self.integer_tokens
        );
        self.segments = lengths;
        self
    }

    /// Lengths of the runs of rows a product multiplies separately in `f32`, starting at row
    /// `first`: the segments after the integer rows (`first == integer_tokens`), or, for a
    /// type without an integer kernel (`first == 0`), each decode row alone and then those;
    /// none when every row is multiplied in 8 bits (`first == n_tokens`, a repacked matrix).
    pub fn segments_from(&self, first: usize) -> Vec<usize> {
        if first == self.n_tokens {
            return Vec::new();
        }
        let tail = if self.segments.is_empty() {
            vec![self.n_tokens - self.integer_tokens]
        } else {
            self.segments.clone()
        };
        if first == self.integer_tokens {
            tail
        } else {
            assert_eq!(first, 0, "f32 rows start at 0 or after the integer rows");
            [vec![1; self.integer_tokens], tail].concat()
        }
    }

    /// Leading rows that matrix products compute from 8-bit activations.
    pub fn integer_tokens(&self) -> usize {
        self.integer_tokens
    }

    pub fn f32(&self) -> &'x [f32] {
        self.x
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `token` as 32-value blocks (`cols` must be a multiple of 32).
    pub fn q8x32(&self, token: usize) -> &[BlockQ8x32] {
        let per_row = self.cols / 32;
        &self.all_q8x32()[token * per_row..(token + 1) * per_row]
    }

    /// Integer row `token` as 256-value super-blocks (`cols` must be a multiple of 256).
    pub fn q8x256(&self, token: usize) -> &[BlockQ8x256] {
        let per_row = self.cols / 256;
        &self.all_q8x256()[token * per_row..(token + 1) * per_row]
    }

    /// Every row as 32-value blocks, computed now if not yet: the panel kernels of the
    /// 32-value types multiply prompt rows in 8 bits too (see `matmul_quantized`). Call it
    /// before threads share `self`: threads that race to compute a form wait on its lock, and
    /// waking them costs a system call per matmul (5% of a SmolLM2 decode step).
    pub fn all_q8x32(&self) -> &[BlockQ8x32] {
        self.q8x32
            .get_or_init(|| quantized_on_pool(self.x, self.cols, 32, quantize_q8x32))
    }

    /// Every row as 256-value super-blocks, computed now if not yet (see
    /// [`Self::all_q8x32`]): the Q4_K panel kernel multiplies prompt rows in 8 bits too.
    pub fn all_q8x256(&self) -> &[BlockQ8x256] {
        self.q8x256
            .get_or_init(|| quantized_on_pool(self.x, self.cols, 256, quantize_q8x256))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8x32_reconstructs_within_half_a_step() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 13.3) * 0.37).collect();
        let b = quantize_q8x32(&x);
        for (q, v) in b.qs.iter().zip(&x) {
            assert!((*q as f32 * b.d - v).abs() <= b.d * 0.5 + 1e-6);
        }
        let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
        assert_eq!(b.s, b.d * sum as f32);
        assert_eq!(b.sum, sum);
        assert_eq!(b.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
    }

    #[test]
    fn q8x256_group_sums_match() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let b = quantize_q8x256(&x);
        for g in 0..16 {
            let s: i32 = b.qs[16 * g..16 * g + 16].iter().map(|&q| q as i32).sum();
            assert_eq!(b.bsums[g] as i32, s);
        }
    }

    #[test]
    fn rounding_is_to_nearest_with_ties_to_even() {
        for i in -1_280_000..=1_280_000 {
            let y = i as f32 / 10_000.0;
            assert_eq!(round_to_i8(y), y.round_ties_even() as i8, "{y}");
        }
        for y in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5, 0.499_999_97] {
            assert_eq!(round_to_i8(y), y.round_ties_even() as i8, "{y}");
        }
    }

    #[test]
    fn zero_rows_quantize_to_zero() {
        let b = quantize_q8x32(&[0.0; 32]);
        assert_eq!((b.d, b.s, b.qs), (0.0, 0.0, [0; 32]));
    }

    #[test]
    fn forms_are_computed_per_row() {
        let x: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let a = QuantizedActivations::new(&x, 2, 256).with_integer_tokens(2);
        assert_eq!(a.q8x32(1).len(), 8);
        assert_eq!(a.q8x256(1).len(), 1);
        assert_eq!(a.q8x256(1)[0], quantize_q8x256(&x[256..]));
    }

    #[test]
    fn simd_quantization_equals_the_scalar_reference() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let specials = [
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            127.5,
        ];
        for case in 0..2000 {
            let scale = [1e-6f32, 1.0, 1e4][case % 3];
            let x: Vec<f32> = (0..32)
                .map(|_| match next() % 16 {
                    0 => specials[(next() % specials.len() as u64) as usize],
                    1 => 0.0,
                    _ => ((next() % 20001) as f32 - 10000.0) / 10000.0 * scale,
                })
                .collect();
            let (got, want) = (quantize_q8x32(&x), quantize_q8x32_scalar(&x));
            assert_eq!(
                (got.d.to_bits(), got.s.to_bits(), got.sum, got.qs),
                (want.d.to_bits(), want.s.to_bits(), want.sum, want.qs),
                "{x:?}"
            );
        }
        assert_eq!(
            quantize_q8x32(&[0.0; 32]),
            quantize_q8x32_scalar(&[0.0; 32])
        );
    }

    #[test]
    fn every_row_has_both_8_bit_forms() {
        let x: Vec<f32> = (0..3 * 256).map(|i| (i % 97) as f32 - 40.0).collect();
        let a = QuantizedActivations::new(&x, 3, 256).with_integer_tokens(1);
        assert_eq!(a.all_q8x32().len(), 3 * 8);
        assert_eq!(
            a.q8x32(2)[1],
            quantize_q8x32(&x[2 * 256 + 32..2 * 256 + 64])
        );
        assert_eq!(a.all_q8x256().len(), 3);
        assert_eq!(a.q8x256(1)[0], quantize_q8x256(&x[256..512]));
    }
}
