//! Q4_K and Q6_K repacked into panels of 16 rows, for kernels that multiply a panel by
//! several tokens per pass: the K-quant counterpart of the 32-value types' panels
//! ([`super::packed`]), with kernels for AVX-512 VNNI and for AVX2 (a half-panel of 8 rows
//! at a time, `vpmaddubsw` pairs summed in 16 bits where they cannot overflow).
//!
//! Why: prompts of Q4_K_M files (Q4_K, with Q6_K for some matrices) otherwise take the `f32`
//! GEMM, and the row-by-row K-quant kernels re-unpack every weight for every token; in a
//! panel, lane r of every vector belongs to row r, one `vpdpbusd` against four activation
//! bytes broadcast to all lanes advances 16 rows by four values, and each unpacked vector
//! serves every token of the pass.
//!
//! Layouts of panel p (rows 16p..16p + 16; a last partial panel is padded with zero rows), its
//! super-blocks one after another:
//!
//! Q4_K, [`Q4K_SUPER`] bytes (148 per row against the file's 144):
//! - codes, 32 vectors of 64 bytes: vector 8k + v holds, in byte 4r + i, byte 32k + 4v + i of
//!   row r's `qs` (so value 4v + i of sub-block 2k in its low nibble and of sub-block 2k + 1
//!   in its high nibble, as the file has them);
//! - the sub-blocks' 6-bit scales, 8 × 16 bytes: byte 16j + r is sub-block j's scale of row r;
//! - the 6-bit minimums, 4 × 32 bytes: byte 32k + 2r + e is sub-block 2k + e's of row r (so
//!   widened to 16 bits each lane holds a row's pair, the operand order of `vpdpwssd`);
//! - the rows' f16 `d`, then their f16 `dmin`.
//!
//! Q6_K, [`Q6K_SUPER`] bytes (210 per row, as in the file). Code vector c (0..64) holds, in
//! byte 4r + i, code 4c + i (0..64) of row r; it is stored split:
//! - low nibbles, 32 vectors of 64 bytes: nibble vector n holds code vector n's low four bits
//!   in its low nibbles and code vector n + 32's in its high ones;
//! - top bits, 16 vectors of 64 bytes: bits 2k..2k + 2 of top vector m are the top two bits
//!   of code vector m + 16k;
//! - the 16-value groups' signed scales, 16 × 16 bytes: byte 16j + r is group j's of row r;
//! - the rows' f16 `d`.
//!
//! Arithmetic, per row, token and super-block, the same in the kernels and the scalar
//! [`reference`], from `acc = 0`: exact integer sums first, then
//! - Q4_K: `isum = Σ_j scale_j · Σ code · q` and `m = Σ_j min_j · (sum of group j's
//!   activations)`; `acc = fma(d · d_a, isum, acc)`, then `acc = fma(−(dmin · d_a), m, acc)`;
//! - Q6_K: `isum = Σ_j scale_j · (Σ code · q − 32 · sum of group j's activations)`;
//!   `acc = fma(d · d_a, isum, acc)`.
//!
//! Results are bit-identical to the reference and independent of which tokens share a pass.

use std::ops::Range;

use crate::act::BlockQ8x256;
use crate::dot::kquants::k4_scales_mins;
use crate::dot::legacy::packed::pack_in_slabs;
use crate::dot::legacy::runnable;
use crate::dot::Isa;
use crate::{GgmlType, WeightView, QK_K};

/// Rows per panel: one 32-bit lane each in a 512-bit vector.
pub const PANEL: usize = 16;

/// Tokens per pass: their sub-block sums, integer sums and accumulators, with the unpacked
/// codes, fit the 32 vector registers.
pub const TOKENS: usize = 4;

/// Bytes of one super-block of Q4_K in the file.
const Q4K_FILE: usize = 144;
const SCALES_AT: usize = 32 * 64;
const MINS_AT: usize = SCALES_AT + 8 * PANEL;
const D_AT: usize = MINS_AT + 4 * 2 * PANEL;
const DMIN_AT: usize = D_AT + 2 * PANEL;
/// Bytes of one Q4_K panel super-block.
pub const Q4K_SUPER: usize = DMIN_AT + 2 * PANEL;
/// Bytes of one super-block of Q6_K in the file, and where its parts start.
const Q6K_FILE: usize = 210;
const Q6K_QH: usize = 128;
const Q6K_SCALES: usize = 192;
const Q6K_D: usize = 208;
const Q6_TOPS_AT: usize = 32 * 64;
const Q6_SCALES_AT: usize = Q6_TOPS_AT + 16 * 64;
const Q6_D_AT: usize = Q6_SCALES_AT + 16 * PANEL;
/// Bytes of one Q6_K panel super-block.
pub const Q6K_SUPER: usize = Q6_D_AT + 2 * PANEL;

/// True for the types this module packs.
pub fn supports(dtype: GgmlType) -> bool {
    matches!(dtype, GgmlType::Q4_K | GgmlType::Q6_K)
}

/// Bytes of one panel super-block of `dtype` (one of [`supports`]).
fn super_bytes(dtype: GgmlType) -> usize {
    if dtype == GgmlType::Q4_K {
        Q4K_SUPER
    } else {
        Q6K_SUPER
    }
}

/// A Q6_K super-block's 256 codes, 0..64 each (the stored value plus 32). The file holds them
/// a 32-value run at a time: run (n, m), values 128n + 32m .. + 32, has its low nibbles in
/// byte l + 32(m % 2) of `ql`'s half n (low or high nibble by m / 2) and its top bits at bit
/// 2m of `qh`'s half n.
fn q6k_codes(b: &[u8]) -> [u8; QK_K] {
    let mut codes = [0u8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (
            &b[64 * n..64 * n + 64],
            &b[Q6K_QH + 32 * n..Q6K_QH + 32 * n + 32],
        );
        for m in 0..4 {
            let run = &mut codes[128 * n + 32 * m..][..32];
            for (l, q) in run.iter_mut().enumerate() {
                let byte = ql[l + 32 * (m % 2)];
                let low = if m < 2 { byte & 0x0F } else { byte >> 4 };
                *q = low | ((qh[l] >> (2 * m)) & 3) << 4;
            }
        }
    }
    codes
}

/// The inverse of [`q6k_codes`]: a super-block's `ql` and `qh` from its 256 codes.
fn q6k_bits(codes: &[u8], b: &mut [u8]) {
    b[..Q6K_SCALES].fill(0);
    for (v, &q) in codes.iter().enumerate() {
        let (n, m, l) = (v / 128, v % 128 / 32, v % 32);
        let at = 64 * n + l + 32 * (m % 2);
        b[at] |= if m < 2 { q & 0x0F } else { (q & 0x0F) << 4 };
        b[Q6K_QH + 32 * n + l] |= (q >> 4) << (2 * m);
    }
}

/// The eight sub-blocks' 6-bit scales and minimums from a super-block's 12 scale bytes.
fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (sc, mn) = k4_scales_mins(s);
    (sc.to_le_bytes(), mn.to_le_bytes())
}

/// The inverse of [`scales_mins`]: the 12 scale bytes.
fn scale_bytes(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        s[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        s[j + 8] = (sc[j + 4] & 0x0F) | (mn[j + 4] & 0x0F) << 4;
    }
    s
}

/// Bytes of `w` (one of [`supports`]) in panels; panels are filled in parallel.
pub fn pack(w: &WeightView<'_>, packed: &dyn Fn(&[u8])) -> Vec<u8> {
    assert!(supports(w.dtype()), "kquant_panels::pack of {}", w.dtype());
    let supers = w.cols() / QK_K;
    let sb = super_bytes(w.dtype());
    let panel_bytes = supers * sb;
    let rb = w.row_bytes();
    let q4k = w.dtype() == GgmlType::Q4_K;
    pack_in_slabs(w, panel_bytes, packed, &|p, panel| {
        for r in 0..PANEL.min(w.rows() - p * PANEL) {
            let row = &w.data()[(p * PANEL + r) * rb..][..rb];
            for (b, dst) in row
                .chunks_exact(rb / supers)
                .zip(panel.chunks_exact_mut(sb))
            {
                if q4k {
                    pack_q4k(b, dst, r);
                } else {
                    pack_q6k(b, dst, r);
                }
            }
        }
    })
}

/// Row r's Q4_K super-block `b` into the panel super-block `dst`.
fn pack_q4k(b: &[u8], dst: &mut [u8], r: usize) {
    let qs = &b[16..];
    for g in 0..32 {
        dst[64 * g + 4 * r..][..4].copy_from_slice(&qs[4 * g..4 * g + 4]);
    }
    let (sc, mn) = scales_mins(&b[4..16]);
    for j in 0..8 {
        dst[SCALES_AT + PANEL * j + r] = sc[j];
        dst[MINS_AT + 2 * PANEL * (j / 2) + 2 * r + j % 2] = mn[j];
    }
    dst[D_AT + 2 * r..][..2].copy_from_slice(&b[0..2]);
    dst[DMIN_AT + 2 * r..][..2].copy_from_slice(&b[2..4]);
}

/// Row r's Q6_K super-block `b` into the panel super-block `dst`.
fn pack_q6k(b: &[u8], dst: &mut [u8], r: usize) {
    let codes = q6k_codes(b);
    for (c, quad) in codes.chunks_exact(4).enumerate() {
        let nibbles = &mut dst[64 * (c % 32) + 4 * r..][..4];
        for (d, &q) in nibbles.iter_mut().zip(quad) {
            *d |= (q & 0x0F) << (4 * (c / 32));
        }
        let tops = &mut dst[Q6_TOPS_AT + 64 * (c % 16) + 4 * r..][..4];
        for (d, &q) in tops.iter_mut().zip(quad) {
            *d |= (q >> 4) << (2 * (c / 16));
        }
    }
    for j in 0..16 {
        dst[Q6_SCALES_AT + PANEL * j + r] = b[Q6K_SCALES + j];
    }
    dst[Q6_D_AT + 2 * r..][..2].copy_from_slice(&b[Q6K_D..Q6K_D + 2]);
}

/// Writes rows `first..first + n` of the `dtype` matrix of `cols` columns packed in `bytes`
/// back in the type's own encoding into `out`: byte for byte the file's rows.
pub fn unpack(dtype: GgmlType, bytes: &[u8], cols: usize, first: usize, n: usize, out: &mut [u8]) {
    let supers = cols / QK_K;
    let file_bytes = if dtype == GgmlType::Q4_K {
        Q4K_FILE
    } else {
        Q6K_FILE
    };
    let rb = supers * file_bytes;
    assert_eq!(
        out.len(),
        n * rb,
        "unpack_rows: output of {} bytes",
        out.len()
    );
    let sb = super_bytes(dtype);
    let panel_bytes = supers * sb;
    for (i, row) in out.chunks_exact_mut(rb.max(1)).take(n).enumerate() {
        let (p, r) = ((first + i) / PANEL, (first + i) % PANEL);
        let panel = &bytes[p * panel_bytes..(p + 1) * panel_bytes];
        for (b, src) in row.chunks_exact_mut(file_bytes).zip(panel.chunks_exact(sb)) {
            if dtype == GgmlType::Q4_K {
                b[0..2].copy_from_slice(&src[D_AT + 2 * r..][..2]);
                b[2..4].copy_from_slice(&src[DMIN_AT + 2 * r..][..2]);
                let sc: [u8; 8] = std::array::from_fn(|j| src[SCALES_AT + PANEL * j + r]);
                let mn: [u8; 8] =
                    std::array::from_fn(|j| src[MINS_AT + 2 * PANEL * (j / 2) + 2 * r + j % 2]);
                b[4..16].copy_from_slice(&scale_bytes(&sc, &mn));
                for g in 0..32 {
                    b[16 + 4 * g..][..4].copy_from_slice(&src[64 * g + 4 * r..][..4]);
                }
            } else {
                let codes: Vec<u8> = (0..QK_K)
                    .map(|v| {
                        let (c, at) = (v / 4, 4 * r + v % 4);
                        let low = (src[64 * (c % 32) + at] >> (4 * (c / 32))) & 0x0F;
                        let top = (src[Q6_TOPS_AT + 64 * (c % 16) + at] >> (2 * (c / 16))) & 3;
                        low | top << 4
                    })
                    .collect();
                q6k_bits(&codes, b);
                for j in 0..16 {
                    b[Q6K_SCALES + j] = src[Q6_SCALES_AT + PANEL * j + r];
                }
                b[Q6K_D..Q6K_D + 2].copy_from_slice(&src[Q6_D_AT + 2 * r..][..2]);
            }
        }
    }
}

/// `outs[t][i] = row rows.start + i · acts[t]` over the `dtype` matrix of `total_rows × cols`
/// packed in `bytes`, with the kernel of `isa` (AVX2 or AVX-512 VNNI, which this CPU must
/// run); `rows.start` must be a multiple of [`PANEL`].
///
/// Panics on a shape mismatch between the matrix, `rows`, `acts` and `outs`, or on a level
/// this CPU does not run.
#[allow(clippy::too_many_arguments)]
pub fn gemv_tokens(
    isa: Isa,
    dtype: GgmlType,
    bytes: &[u8],
    total_rows: usize,
    cols: usize,
    rows: Range<usize>,
    acts: &[&[BlockQ8x256]],
    outs: &mut [&mut [f32]],
) {
    assert!(supports(dtype), "kquant panels of {dtype}");
    assert!(
        rows.start.is_multiple_of(PANEL) && rows.start <= rows.end && rows.end <= total_rows,
        "kquant panels: rows {rows:?} do not start a panel of a {total_rows}-row matrix"
    );
    assert_eq!(
        acts.len(),
        outs.len(),
        "kquant panels: activations and outputs"
    );
    let supers = cols / QK_K;
    let panel_bytes = supers * super_bytes(dtype);
    assert_eq!(bytes.len(), total_rows.div_ceil(PANEL) * panel_bytes);
    for (a, out) in acts.iter().zip(outs.iter()) {
        assert_eq!(a.len(), supers, "kquant panels: activation super-blocks");
        assert_eq!(
            out.len(),
            rows.len(),
            "kquant panels: outputs for rows {rows:?}"
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(
            isa != Isa::Scalar && runnable(isa),
            "kquant panels: this CPU does not run {isa:?}"
        );
        for first in rows.clone().step_by(PANEL) {
            let n = PANEL.min(rows.end - first);
            let panel = &bytes[first / PANEL * panel_bytes..][..panel_bytes];
            let at = first - rows.start;
            for t0 in (0..acts.len()).step_by(TOKENS) {
                let tokens = TOKENS.min(acts.len() - t0);
                let (a, o) = (&acts[t0..t0 + tokens], &mut outs[t0..t0 + tokens]);
                macro_rules! pass {
                    ($module:ident::$kernel:ident: $($t:literal)*) => {
                        match tokens {
                            // SAFETY: the level's features are present (asserted above); the panel
                            // holds `supers` super-blocks of `dtype`; every activation row has
                            // `supers` super-blocks and every output at least `at + n` values
                            // (asserted above), with `n <= PANEL`.
                            $($t => unsafe {
                                $module::$kernel::<$t>(
                                    panel.as_ptr(),
                                    supers,
                                    std::array::from_fn(|t| a[t].as_ptr()),
                                    std::array::from_fn(|t| o[t][at..].as_mut_ptr()),
                                    n,
                                )
                            },)*
                            _ => unreachable!("at most TOKENS per pass"),
                        }
                    };
                }
                match (isa, dtype) {
                    (Isa::Avx512Vnni, GgmlType::Q4_K) => pass!(avx512::q4k: 1 2 3 4),
                    (Isa::Avx512Vnni, _) => pass!(avx512::q6k: 1 2 3 4),
                    (_, GgmlType::Q4_K) => pass!(avx2::q4k: 1 2 3 4),
                    _ => pass!(avx2::q6k: 1 2 3 4),
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("K-quants are packed only on x86-64");
}

/// The scalar reference of the panel kernels, read from the file's rows of `w` (one of
/// [`supports`]) with the same arithmetic (see the module docs):
/// `outs[t][i] = row rows.start + i · acts[t]`.
pub fn reference(
    w: &WeightView<'_>,
    rows: Range<usize>,
    acts: &[&[BlockQ8x256]],
    outs: &mut [&mut [f32]],
) {
    assert!(
        supports(w.dtype()),
        "kquant panels reference of {}",
        w.dtype()
    );
    let rb = w.row_bytes();
    let supers = w.cols() / QK_K;
    let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    for (a, out) in acts.iter().zip(outs.iter_mut()) {
        for (o, r) in out.iter_mut().zip(rows.clone()) {
            let mut acc = 0f32;
            let row = &w.data()[r * rb..(r + 1) * rb];
            for (b, x) in row.chunks_exact(rb / supers.max(1)).zip(*a) {
                if w.dtype() == GgmlType::Q4_K {
                    let (mut isum, mut m) = (0i32, 0i32);
                    let (sc, mn) = scales_mins(&b[4..16]);
                    for j in 0..8 {
                        let dot: i32 = b[16 + 32 * (j / 2)..][..32]
                            .iter()
                            .zip(&x.qs[32 * j..32 * j + 32])
                            .map(|(&q, &a)| ((q >> (4 * (j % 2))) & 0x0F) as i32 * a as i32)
                            .sum();
                        isum += sc[j] as i32 * dot;
                        m += mn[j] as i32 * (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32);
                    }
                    acc = (f16(b, 0) * x.d).mul_add(isum as f32, acc);
                    acc = (-(f16(b, 2) * x.d)).mul_add(m as f32, acc);
                } else {
                    let mut isum = 0i32;
                    let codes = q6k_codes(b);
                    for j in 0..16 {
                        let dot: i32 = (16 * j..16 * j + 16)
                            .map(|v| codes[v] as i32 * x.qs[v] as i32)
                            .sum();
                        isum += (b[Q6K_SCALES + j] as i8) as i32 * (dot - 32 * x.bsums[j] as i32);
                    }
                    acc = (f16(b, Q6K_D) * x.d).mul_add(isum as f32, acc);
                }
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{
        DMIN_AT, D_AT, MINS_AT, Q4K_SUPER, Q6K_SUPER, Q6_D_AT, Q6_SCALES_AT, Q6_TOPS_AT, SCALES_AT,
    };
    use crate::act::BlockQ8x256;
    use crate::dot::prefetch;

    /// Four activation bytes of `a`, from value `k`, in every lane.
    ///
    /// # Safety
    /// `a` points to a readable super-block and `k <= 252`.
    #[inline(always)]
    unsafe fn quad(a: *const BlockQ8x256, k: usize) -> __m512i {
        _mm512_set1_epi32(core::ptr::read_unaligned(
            (*a).qs.as_ptr().add(k) as *const i32
        ))
    }

    /// Stores the first `n` lanes of each token's accumulator.
    ///
    /// # Safety
    /// Each `outs[t]` points to `n <= 16` writable values.
    #[inline(always)]
    unsafe fn store<const T: usize>(outs: [*mut f32; T], acc: [__m512; T], n: usize) {
        let keep = (((1u32 << n) - 1) & 0xFFFF) as __mmask16;
        for t in 0..T {
            _mm512_mask_storeu_ps(outs[t], keep, acc[t]);
        }
    }

    /// `outs[t][0..n]` = the Q4_K panel at `p` (`supers` panel super-blocks) · token t.
    ///
    /// # Safety
    /// The CPU has avx512f/bw/vl/vnni and f16c; `p` points to `supers` panel super-blocks;
    /// each `acts[t]` to `supers` readable super-blocks; each `outs[t]` to `n <= 16`
    /// writable values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn q4k<const T: usize>(
        p: *const u8,
        supers: usize,
        acts: [*const BlockQ8x256; T],
        outs: [*mut f32; T],
        n: usize,
    ) {
        let low = _mm512_set1_epi8(0x0F);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..supers {
            let blk = p.add(b * Q4K_SUPER);
            prefetch(blk.wrapping_add(2 * Q4K_SUPER), Q4K_SUPER);
            let a: [*const BlockQ8x256; T] = core::array::from_fn(|t| acts[t].add(b));
            let mut isum = [zero; T];
            for k in 0..4 {
                let (mut lo_sum, mut hi_sum) = ([zero; T], [zero; T]);
                for v in 0..8 {
                    let c = _mm512_loadu_si512(blk.add(64 * (8 * k + v)) as *const _);
                    let lo = _mm512_and_si512(c, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
                    for t in 0..T {
                        lo_sum[t] = _mm512_dpbusd_epi32(lo_sum[t], lo, quad(a[t], 64 * k + 4 * v));
                        hi_sum[t] =
                            _mm512_dpbusd_epi32(hi_sum[t], hi, quad(a[t], 64 * k + 32 + 4 * v));
                    }
                }
                let scale = |j: usize| {
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.add(SCALES_AT + 16 * j) as *const __m128i
                    ))
                };
                let (sc_lo, sc_hi) = (scale(2 * k), scale(2 * k + 1));
                for t in 0..T {
                    isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(lo_sum[t], sc_lo));
                    isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(hi_sum[t], sc_hi));
                }
            }
            let mut mins = [zero; T];
            for k in 0..4 {
                let pair = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                    blk.add(MINS_AT + 32 * k) as *const __m256i
                ));
                for t in 0..T {
                    let s = &(*a[t]).bsums;
                    let lo = s[4 * k] as i32 + s[4 * k + 1] as i32;
                    let hi = s[4 * k + 2] as i32 + s[4 * k + 3] as i32;
                    let sums = _mm512_set1_epi32((lo & 0xFFFF) | (hi << 16));
                    mins[t] = _mm512_dpwssd_epi32(mins[t], pair, sums);
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(D_AT) as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(DMIN_AT) as *const __m256i));
            for t in 0..T {
                let da = _mm512_set1_ps((*a[t]).d);
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, da), _mm512_cvtepi32_ps(isum[t]), acc[t]);
                acc[t] =
                    _mm512_fnmadd_ps(_mm512_mul_ps(dmin, da), _mm512_cvtepi32_ps(mins[t]), acc[t]);
            }
        }
        store(outs, acc, n);
    }

    /// `outs[t][0..n]` = the Q6_K panel at `p` (`supers` panel super-blocks) · token t. Each
    /// group's sums start at −32 × its activations' sum, which removes the codes' offset.
    ///
    /// # Safety
    /// As [`q4k`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn q6k<const T: usize>(
        p: *const u8,
        supers: usize,
        acts: [*const BlockQ8x256; T],
        outs: [*mut f32; T],
        n: usize,
    ) {
        let zero = _mm512_setzero_si512();
        let (low, top) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..supers {
            let blk = p.add(b * Q6K_SUPER);
            prefetch(blk.wrapping_add(Q6K_SUPER), Q6K_SUPER);
            let a: [*const BlockQ8x256; T] = core::array::from_fn(|t| acts[t].add(b));
            let mut isum = [zero; T];
            // Top vector m serves code vectors m, m + 16, m + 32 and m + 48, and nibble
            // vectors m and m + 16 serve the same four: so groups q, q + 4, q + 8 and q + 12
            // (code vectors 4q.. + 4 plus multiples of 16) are summed together, every shift a
            // constant.
            for q in 0..4 {
                let mut sum: [[__m512i; T]; 4] = core::array::from_fn(|g| {
                    core::array::from_fn(|t| {
                        _mm512_set1_epi32(-32 * (*a[t]).bsums[q + 4 * g] as i32)
                    })
                });
                for m in 4 * q..4 * q + 4 {
                    let tops = _mm512_loadu_si512(blk.add(Q6_TOPS_AT + 64 * m) as *const _);
                    let n0 = _mm512_loadu_si512(blk.add(64 * m) as *const _);
                    let n1 = _mm512_loadu_si512(blk.add(64 * (m + 16)) as *const _);
                    let codes = [
                        _mm512_or_si512(
                            _mm512_and_si512(n0, low),
                            _mm512_and_si512(_mm512_slli_epi16(tops, 4), top),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(n1, low),
                            _mm512_and_si512(_mm512_slli_epi16(tops, 2), top),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16(n0, 4), low),
                            _mm512_and_si512(tops, top),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16(n1, 4), low),
                            _mm512_and_si512(_mm512_srli_epi16(tops, 2), top),
                        ),
                    ];
                    for (g, code) in codes.into_iter().enumerate() {
                        for t in 0..T {
                            let x = quad(a[t], 4 * (m + 16 * g));
                            sum[g][t] = _mm512_dpbusd_epi32(sum[g][t], code, x);
                        }
                    }
                }
                for (g, sum) in sum.iter().enumerate() {
                    let scale = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(Q6_SCALES_AT + 16 * (q + 4 * g)) as *const __m128i,
                    ));
                    for t in 0..T {
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(sum[t], scale));
                    }
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(Q6_D_AT) as *const __m256i));
            for t in 0..T {
                let da = _mm512_set1_ps((*a[t]).d);
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, da), _mm512_cvtepi32_ps(isum[t]), acc[t]);
            }
        }
        store(outs, acc, n);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{
        DMIN_AT, D_AT, MINS_AT, Q4K_SUPER, Q6K_SUPER, Q6_D_AT, Q6_SCALES_AT, Q6_TOPS_AT, SCALES_AT,
    };
    use crate::act::BlockQ8x256;
    use crate::dot::prefetch;

    /// Rows per vector: one 32-bit lane each in a 256-bit vector, half a panel.
    const HALF: usize = 8;

    /// Four activation bytes of `a`, from value `k`, in every lane.
    ///
    /// # Safety
    /// `a` points to a readable super-block and `k <= 252`.
    #[inline(always)]
    unsafe fn quad(a: *const BlockQ8x256, k: usize) -> __m256i {
        _mm256_set1_epi32(core::ptr::read_unaligned(
            (*a).qs.as_ptr().add(k) as *const i32
        ))
    }

    /// Stores the first `rows` lanes of each token's accumulator.
    ///
    /// # Safety
    /// Each `outs[t]` points to `rows <= 8` writable values.
    #[inline(always)]
    unsafe fn store<const T: usize>(outs: [*mut f32; T], acc: [__m256; T], rows: usize) {
        let keep = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(rows as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        for t in 0..T {
            _mm256_maskstore_ps(outs[t], keep, acc[t]);
        }
    }

    /// `outs[t][0..n]` = the Q4_K panel at `p` (`supers` panel super-blocks) · token t, one
    /// half-panel after the other.
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c; `p` points to `supers` panel super-blocks; each
    /// `acts[t]` to `supers` readable super-blocks; each `outs[t]` to `n <= 16` writable
    /// values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4k<const T: usize>(
        p: *const u8,
        supers: usize,
        acts: [*const BlockQ8x256; T],
        outs: [*mut f32; T],
        n: usize,
    ) {
        for h in 0..n.div_ceil(HALF) {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let zero = _mm256_setzero_si256();
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..supers {
                let blk = p.add(b * Q4K_SUPER);
                if h == 0 {
                    prefetch(blk.wrapping_add(2 * Q4K_SUPER), Q4K_SUPER);
                }
                let a: [*const BlockQ8x256; T] = core::array::from_fn(|t| acts[t].add(b));
                let mut isum = [zero; T];
                for j in 0..8 {
                    // A sub-block's eight pair sums per lane stay within 8 · 2 · 15 · 128.
                    let mut pairs = [zero; T];
                    for v in 0..8 {
                        let c = _mm256_loadu_si256(
                            blk.add(64 * (8 * (j / 2) + v) + 32 * h) as *const __m256i
                        );
                        let q = if j % 2 == 0 {
                            _mm256_and_si256(c, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16(c, 4), low)
                        };
                        for t in 0..T {
                            let prod = _mm256_maddubs_epi16(q, quad(a[t], 32 * j + 4 * v));
                            pairs[t] = _mm256_add_epi16(pairs[t], prod);
                        }
                    }
                    let scale = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        blk.add(SCALES_AT + 16 * j + HALF * h) as *const __m128i,
                    ));
                    for t in 0..T {
                        let sum = _mm256_madd_epi16(pairs[t], ones);
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sum, scale));
                    }
                }
                let mut mins = [zero; T];
                for k in 0..4 {
                    let pair = _mm256_cvtepu8_epi16(_mm_loadu_si128(
                        blk.add(MINS_AT + 32 * k + 2 * HALF * h) as *const __m128i,
                    ));
                    for t in 0..T {
                        let s = &(*a[t]).bsums;
                        let lo = s[4 * k] as i32 + s[4 * k + 1] as i32;
                        let hi = s[4 * k + 2] as i32 + s[4 * k + 3] as i32;
                        let sums = _mm256_set1_epi32((lo & 0xFFFF) | (hi << 16));
                        mins[t] = _mm256_add_epi32(mins[t], _mm256_madd_epi16(pair, sums));
                    }
                }
                let half_f16 = |at: usize| {
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.add(at + 2 * HALF * h) as *const __m128i))
                };
                let (d, dmin) = (half_f16(D_AT), half_f16(DMIN_AT));
                for t in 0..T {
                    let da = _mm256_set1_ps((*a[t]).d);
                    acc[t] =
                        _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(isum[t]), acc[t]);
                    acc[t] = _mm256_fnmadd_ps(
                        _mm256_mul_ps(dmin, da),
                        _mm256_cvtepi32_ps(mins[t]),
                        acc[t],
                    );
                }
            }
            let outs = core::array::from_fn(|t| outs[t].add(HALF * h));
            store(outs, acc, (n - HALF * h).min(HALF));
        }
    }

    /// Half `h`'s code vector `c` of the Q6_K panel super-block whose half starts at `half`
    /// (the super-block plus 32h), from its nibble and top bits.
    ///
    /// # Safety
    /// The CPU has avx2; `half` points into a Q6_K panel super-block as above; `c < 64`.
    #[inline(always)]
    unsafe fn q6k_codes(half: *const u8, c: usize, low: __m256i, top: __m256i) -> __m256i {
        let shift = |x: __m256i, by: usize| _mm256_srl_epi16(x, _mm_cvtsi32_si128(by as i32));
        let n = _mm256_loadu_si256(half.add(64 * (c % 32)) as *const __m256i);
        let m = _mm256_loadu_si256(half.add(Q6_TOPS_AT + 64 * (c % 16)) as *const __m256i);
        let low4 = _mm256_and_si256(shift(n, 4 * (c / 32)), low);
        let top2 = _mm256_and_si256(shift(m, 2 * (c / 16)), top);
        _mm256_or_si256(low4, _mm256_slli_epi16(top2, 4))
    }

    /// `outs[t][0..n]` = the Q6_K panel at `p` (`supers` panel super-blocks) · token t, one
    /// half-panel after the other; as the AVX-512 kernel, each group's sum starts at −32 ×
    /// its activations' sum.
    ///
    /// # Safety
    /// As [`q4k`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6k<const T: usize>(
        p: *const u8,
        supers: usize,
        acts: [*const BlockQ8x256; T],
        outs: [*mut f32; T],
        n: usize,
    ) {
        for h in 0..n.div_ceil(HALF) {
            let ones = _mm256_set1_epi16(1);
            let zero = _mm256_setzero_si256();
            let (low, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..supers {
                let blk = p.add(b * Q6K_SUPER);
                if h == 0 {
                    prefetch(blk.wrapping_add(Q6K_SUPER), Q6K_SUPER);
                }
                let a: [*const BlockQ8x256; T] = core::array::from_fn(|t| acts[t].add(b));
                let mut isum = [zero; T];
                for j in 0..16 {
                    let mut sum: [__m256i; T] =
                        core::array::from_fn(|t| _mm256_set1_epi32(-32 * (*a[t]).bsums[j] as i32));
                    // Two vectors' pair sums per lane stay within 2 · 2 · 63 · 128 < 2¹⁵.
                    for v in [0, 2] {
                        let code = |v: usize| q6k_codes(blk.add(32 * h), 4 * j + v, low, top);
                        let (c0, c1) = (code(v), code(v + 1));
                        for t in 0..T {
                            let pairs = _mm256_add_epi16(
                                _mm256_maddubs_epi16(c0, quad(a[t], 16 * j + 4 * v)),
                                _mm256_maddubs_epi16(c1, quad(a[t], 16 * j + 4 * v + 4)),
                            );
                            sum[t] = _mm256_add_epi32(sum[t], _mm256_madd_epi16(pairs, ones));
                        }
                    }
                    let scale = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        blk.add(Q6_SCALES_AT + 16 * j + HALF * h) as *const __m128i,
                    ));
                    for t in 0..T {
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_mullo_epi32(sum[t], scale));
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(
                    blk.add(Q6_D_AT + 2 * HALF * h) as *const __m128i
                ));
                for t in 0..T {
                    let da = _mm256_set1_ps((*a[t]).d);
                    acc[t] =
                        _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(isum[t]), acc[t]);
                }
            }
            let outs = core::array::from_fn(|t| outs[t].add(HALF * h));
            store(outs, acc, (n - HALF * h).min(HALF));
        }
    }
}
