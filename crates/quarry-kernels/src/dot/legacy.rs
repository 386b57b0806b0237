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
//! whose integer part is exact in `i32`.
//!
//! Here, in the file's own layout, is the scalar reference ([`gemv`]): it decodes a block's
//! 32 integer weights and sums their products. The SIMD kernels read the same blocks
//! repacked at load into 16-row panels ([`packed`]), which put a row in each vector lane and
//! serve several tokens per pass; every model product on an AVX2 or AVX-512 VNNI machine
//! reads that copy, so this layout needs no kernels of its own.
//!
//! Invariant the kernels rely on: activation codes lie in −127..=127 (what
//! `quantize_q8x32` produces), so negating one cannot overflow and no `i16` pair sum
//! saturates; and a SIMD kernel runs only after [`runnable`] confirmed its CPU features.

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
/// (`a.len() == w.cols() / 32`): the scalar reference.
///
/// Panics if `w.dtype()` is not [supported](supports), or on a shape mismatch between
/// `w`, `rows`, `a` and `out`.
pub fn gemv(w: &WeightView<'_>, rows: Range<usize>, a: &[BlockQ8x32], out: &mut [f32]) {
    check_shapes(w, &rows, a, out);
    let rb = w.row_bytes();
    let data = &w.data()[rows.start * rb..rows.end * rb];
    by_layout!(
        w.dtype(),
        L => for (i, o) in out.iter_mut().enumerate() {
            *o = scalar_row::<L>(&data[i * rb..(i + 1) * rb], a);
        },
        _ => unreachable!("checked by supports")
    )
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
pub(super) fn runnable(isa: Isa) -> bool {
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
    fn available_isas_are_runnable() {
        assert!(runnable(Isa::Scalar));
        for isa in Isa::available() {
            assert!(runnable(isa), "{isa:?}");
        }
    }
}
