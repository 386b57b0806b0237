//! Integer dot products of quantized weight rows with 8-bit activations (the decode path).
//!
//! One dispatch point: the instruction set is detected once at start-up ([`Isa::best`]) and
//! every kernel family offers a scalar reference plus the SIMD variants this CPU supports.
//! Tests run every available variant against the scalar reference.

use std::ops::Range;
use std::sync::OnceLock;

use crate::act::QuantizedActivations;
use crate::{GgmlType, WeightView};

pub mod kquant_panels;
mod kquants;
mod legacy;

pub use legacy::packed::{self, PackedRows};

/// Blocks ahead of the one a decode kernel multiplies whose bytes it asks the cache for: the
/// weights stream from memory once per step, and the hardware prefetcher alone leaves the
/// kernels stalled on their loads (measured: 18% of a SmolLM2 decode step).
pub(crate) const PREFETCH_BLOCKS: usize = 8;

/// Asks the cache for the `bytes` bytes at `p`, a cache line at a time. A prefetch is a hint
/// that reads nothing and never faults, so `p` may lie past the end of the data.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, bytes: usize) {
    use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for line in (0..bytes).step_by(64) {
        // SAFETY: see above; the address is only computed, never dereferenced.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast()) }
    }
}

/// An instruction-set level a kernel can be compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust; the reference every other variant is tested against.
    Scalar,
    /// AVX2 + FMA (`vpmaddubsw`/`vpmaddwd`).
    Avx2,
    /// AVX-512 F/BW/VL with VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Isa {
    /// Every level this CPU can run, lowest first.
    pub fn available() -> Vec<Isa> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Isa::Avx512Vnni);
            }
        }
        v
    }

    /// The level kernels use: the best available, or the one `QUARRY_ISA` (scalar, avx2,
    /// avx512) names if this CPU supports it.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Isa::available();
            let wanted = std::env::var("QUARRY_ISA")
                .ok()
                .and_then(|s| match s.as_str() {
                    "scalar" => Some(Isa::Scalar),
                    "avx2" => Some(Isa::Avx2),
                    "avx512" => Some(Isa::Avx512Vnni),
                    _ => None,
                });
            match wanted {
                Some(isa) if available.contains(&isa) => isa,
                _ => *available.last().expect("scalar is always available"),
            }
        })
    }
}

/// True when `dtype` has an integer kernel on the decode path.
pub fn has_integer_kernel(dtype: GgmlType) -> bool {
    legacy::supports(dtype) || kquants::supports(dtype)
}

/// Computes the 8-bit form of `x` that [`gemv_rows`] reads for `dtype`, so that threads
/// calling it on a shared `x` find it ready.
pub fn quantize_for(dtype: GgmlType, x: &QuantizedActivations<'_>) {
    if legacy::supports(dtype) {
        x.all_q8x32();
    } else {
        x.all_q8x256();
    }
}

/// `out[i] = w.row(rows.start + i) · x.row(token)` for the rows in `rows`, in the file's
/// layout: the K-quants with the `isa` kernel, the 32-value types with their scalar
/// reference (their SIMD kernels read [`PackedRows`]). `w.dtype()` must satisfy
/// [`has_integer_kernel`].
pub fn gemv_rows(
    isa: Isa,
    w: &WeightView<'_>,
    rows: Range<usize>,
    x: &QuantizedActivations<'_>,
    token: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(out.len(), rows.len());
    if legacy::supports(w.dtype()) {
        legacy::gemv(w, rows, x.q8x32(token), out);
    } else {
        kquants::gemv(isa, w, rows, x.q8x256(token), out);
    }
}

/// Several tokens' [`gemv_rows`] on a matrix repacked into panels: `outs[t][i] = row
/// rows.start + i · x.row(first_token + t)`, with `rows.start` a multiple of [`packed::PANEL`]. Each
/// token's result is bit-identical whichever tokens share the call.
pub fn gemv_packed_tokens(
    p: &PackedRows,
    rows: Range<usize>,
    x: &QuantizedActivations<'_>,
    first_token: usize,
    outs: &mut [&mut [f32]],
) {
    if kquant_panels::supports(p.dtype()) {
        let acts: Vec<&[_]> = (0..outs.len()).map(|t| x.q8x256(first_token + t)).collect();
        kquant_panels::gemv_tokens(
            p.isa(),
            p.dtype(),
            p.bytes(),
            p.rows(),
            p.cols(),
            rows,
            &acts,
            outs,
        );
        return;
    }
    let acts: Vec<&[_]> = (0..outs.len()).map(|t| x.q8x32(first_token + t)).collect();
    packed::gemv_tokens(p, rows, &acts, outs);
}
