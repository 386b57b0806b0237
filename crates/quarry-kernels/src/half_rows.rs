//! Rows of half-precision values: how the KV cache stores keys and values.
//!
//! Attention is bound by reading the cache (every key and value of a sequence once per step),
//! so the cache keeps them as IEEE `f16`, as llama.cpp does by default: half the bytes of `f32`.
//! [`narrow`] rounds new keys and values to `f16` (to nearest, ties to even); [`widen_rows`]
//! turns a block of cached rows back into `f32` for the attention kernels, exactly (every `f16`
//! is an `f32`). The vector levels (AVX-512 F, or F16C beside AVX2) convert 16 or 8 values per
//! instruction; the scalar ones, on `half`, are the reference, and the levels agree with it bit
//! for bit.

use half::f16;

use crate::dot::Isa;

/// `dst[i] = src[i]` rounded to the nearest `f16` (ties to even; beyond ±65504 to ±∞, NaN
/// to a NaN).
pub fn narrow(src: &[f32], dst: &mut [f16]) {
    narrow_with(Isa::best(), src, dst)
}

/// The `n = dst.len() / cols` rows of `cols` values that start `stride` apart in `src`, as
/// consecutive `f32` rows in `dst` (a head's slice of cached keys or values, `stride` being
/// the width of a cache row holding every KV head). The AVX-512 level also asks the memory for
/// the rows a few ahead, since a cache block is read once.
pub fn widen_rows(src: &[f16], cols: usize, stride: usize, dst: &mut [f32]) {
    widen_rows_with(Isa::best(), src, cols, stride, dst)
}

/// [`narrow`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn narrow_with(isa: Isa, src: &[f32], dst: &mut [f16]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "narrow: {} values into {}",
        src.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni && avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); lengths are equal.
        return unsafe { x86::narrow_512(src, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && f16c() {
        // SAFETY: the CPU has AVX2 and F16C (checked above); lengths are equal.
        return unsafe { x86::narrow_256(src, dst) };
    }
    let _ = isa;
    narrow_scalar(src, dst)
}

/// [`widen_rows`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn widen_rows_with(isa: Isa, src: &[f16], cols: usize, stride: usize, dst: &mut [f32]) {
    if cols == 0 {
        return;
    }
    let n = dst.len() / cols;
    assert!(
        dst.len() == n * cols && stride >= cols && (n == 0 || src.len() >= (n - 1) * stride + cols),
        "widen_rows: dst ({}) must be whole rows of {cols}, and src ({} values, rows {stride} \
         apart) hold that many",
        dst.len(),
        src.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni && avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); shapes are checked above.
        return unsafe { x86::widen_rows_512(src, cols, stride, dst) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && f16c() {
        // SAFETY: the CPU has AVX2 and F16C (checked above); shapes are checked above.
        return unsafe { x86::widen_rows_256(src, cols, stride, dst) };
    }
    let _ = isa;
    widen_rows_scalar(src, cols, stride, dst)
}

#[cfg(target_arch = "x86_64")]
fn f16c() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

fn narrow_scalar(src: &[f32], dst: &mut [f16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(s);
    }
}

fn widen_rows_scalar(src: &[f16], cols: usize, stride: usize, dst: &mut [f32]) {
    for (r, row) in dst.chunks_exact_mut(cols).enumerate() {
        for (d, s) in row.iter_mut().zip(&src[r * stride..r * stride + cols]) {
            *d = s.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use half::f16;

    use super::narrow_scalar;
    use crate::dot::prefetch;

    /// Rounding of the vector conversions: to nearest, ties to even, like `half` (the
    /// conversion never raises exceptions anyway, so no suppression bit).
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    pub unsafe fn narrow_512(src: &[f32], dst: &mut [f16]) {
        let n = src.len();
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr().cast::<u16>());
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm512_cvtps_ph::<NEAREST>(_mm512_loadu_ps(ps.add(i)));
            _mm256_storeu_si256(pd.add(i).cast(), h);
            i += 16;
        }
        narrow_scalar(&src[i..], &mut dst[i..]);
    }

    /// # Safety
    /// The CPU has AVX2 and F16C; `src.len() == dst.len()`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn narrow_256(src: &[f32], dst: &mut [f16]) {
        let n = src.len();
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr().cast::<u16>());
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm256_cvtps_ph::<NEAREST>(_mm256_loadu_ps(ps.add(i)));
            _mm_storeu_si128(pd.add(i).cast(), h);
            i += 8;
        }
        narrow_scalar(&src[i..], &mut dst[i..]);
    }

    /// The last `cols % 16` values of a row go through masked loads and stores.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; shapes as checked by [`super::widen_rows_with`].
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl")]
    pub unsafe fn widen_rows_512(src: &[f16], cols: usize, stride: usize, dst: &mut [f32]) {
        let (ps, pd) = (src.as_ptr().cast::<u16>(), dst.as_mut_ptr());
        for r in 0..dst.len() / cols {
            prefetch(ps.wrapping_add((r + 8) * stride).cast(), 2 * cols);
            let (row, out) = (ps.add(r * stride), pd.add(r * cols));
            let mut c = 0;
            while c < cols {
                let keep: __mmask16 = if cols - c >= 16 {
                    0xFFFF
                } else {
                    (1u16 << (cols - c)) - 1
                };
                let h = _mm256_maskz_loadu_epi16(keep, row.add(c).cast());
                _mm512_mask_storeu_ps(out.add(c), keep, _mm512_cvtph_ps(h));
                c += 16;
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and F16C; shapes as checked by [`super::widen_rows_with`].
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_rows_256(src: &[f16], cols: usize, stride: usize, dst: &mut [f32]) {
        let (ps, pd) = (src.as_ptr().cast::<u16>(), dst.as_mut_ptr());
        let whole = cols - cols % 8;
        for r in 0..dst.len() / cols {
            let (row, out) = (ps.add(r * stride), pd.add(r * cols));
            let mut c = 0;
            while c < whole {
                let h = _mm_loadu_si128(row.add(c).cast());
                _mm256_storeu_ps(out.add(c), _mm256_cvtph_ps(h));
                c += 8;
            }
            for c in whole..cols {
                *out.add(c) = (*src.as_ptr().add(r * stride + c)).to_f32();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Values across f16's range and beyond it: normal, subnormal, overflowing, halfway
    /// cases, signed zeros, infinities.
    fn values() -> impl Strategy<Value = f32> {
        prop_oneof![
            -70_000.0f32..70_000.0,
            -1.0f32..1.0,
            -1e-4f32..1e-4,
            -1e-7f32..1e-7,
            // Exactly halfway between two f16s near 1: ties go to even.
            (0u32..1024).prop_map(|k| 1.0 + (2 * k + 1) as f32 / 2048.0),
            Just(0.0f32),
            Just(-0.0f32),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(65_520.0f32),
        ]
    }

    proptest! {
        #[test]
        fn narrow_matches_the_scalar_reference_bit_for_bit(
            src in proptest::collection::vec(values(), 0..100),
        ) {
            let mut reference = vec![f16::ZERO; src.len()];
            narrow_scalar(&src, &mut reference);
            for isa in Isa::available() {
                let mut dst = vec![f16::NAN; src.len()];
                narrow_with(isa, &src, &mut dst);
                let bits = |v: &[f16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&dst), bits(&reference), "{:?}", isa);
            }
        }

        #[test]
        fn widen_rows_is_exact_at_every_level(
            (n, cols, pad) in (0usize..11, 1usize..70, 0usize..40),
            seed in any::<u64>(),
        ) {
            let stride = cols + pad;
            let mut state = seed | 1;
            // Any bit pattern, NaNs and subnormals included; the last row ends at its values.
            let src: Vec<f16> = (0..(n * stride).saturating_sub(pad))
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    f16::from_bits(state as u16)
                })
                .collect();
            let mut reference = vec![0.0f32; n * cols];
            widen_rows_scalar(&src, cols, stride, &mut reference);
            for isa in Isa::available() {
                let mut dst = vec![f32::NAN; n * cols];
                widen_rows_with(isa, &src, cols, stride, &mut dst);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&dst), bits(&reference), "{:?}", isa);
            }
        }
    }

    #[test]
    fn nan_stays_nan() {
        for isa in Isa::available() {
            let mut dst = [f16::ZERO; 17];
            narrow_with(isa, &[f32::NAN; 17], &mut dst);
            assert!(dst.iter().all(|h| h.is_nan()), "{isa:?}");
        }
    }
}
