//! Q4_K repacked into panels of 16 rows, for a kernel that multiplies a panel by several
//! tokens per pass: the K-quant counterpart of the 32-value types' panels
//! ([`super::packed`]), used on AVX-512 VNNI.
//!
//! Why: prompts of Q4_K models (Q4_K_M files are mostly Q4_K) otherwise take the `f32` GEMM,
//! and the row-by-row K-quant kernels re-unpack every weight for every token; in a panel, lane
//! r of every vector belongs to row r, one `vpdpbusd` against four activation bytes broadcast
//! to all lanes advances 16 rows by four values, and each unpacked vector serves every token
//! of the pass (Llama-3.2-1B-shaped Q4_K_M, pp512 on 2 Zen 4 cores: see the commit that added
//! this module for the numbers).
//!
//! Layout of panel p (rows 16p..16p + 16; a last partial panel is padded with zero rows), its
//! super-blocks one after another, each [`SUPER_BYTES`] bytes:
//! - codes, 32 vectors of 64 bytes: vector 8k + v holds, in byte 4r + i, byte 32k + 4v + i of
//!   row r's `qs` (so value 4v + i of sub-block 2k in its low nibble and of sub-block 2k + 1
//!   in its high nibble, as the file has them);
//! - the sub-blocks' 6-bit scales, 8 × 16 bytes: byte 16j + r is sub-block j's scale of row r;
//! - the 6-bit minimums, 4 × 32 bytes: byte 32k + 2r + e is sub-block 2k + e's of row r (so
//!   widened to 16 bits each lane holds a row's pair, the operand order of `vpdpwssd`);
//! - the rows' f16 `d`, then their f16 `dmin`.
//!
//! That is 2368 bytes per 16 rows' super-block, 148 per row against the file's 144.
//!
//! Arithmetic, per row, token and super-block, the same in the kernel and the scalar
//! [`reference`]: the exact integers `isum = Σ_j scale_j · Σ code · q` and
//! `m = Σ_j min_j · (sum of sub-block j's activations)`, then
//! `acc = fma(d · d_a, isum, acc)` and `acc = fma(−(dmin · d_a), m, acc)`, from `acc = 0`.
//! Results are bit-identical to the reference and independent of which tokens share a pass.

use std::ops::Range;

use crate::act::BlockQ8x256;
use crate::{pool, GgmlType, WeightView, QK_K};

/// Rows per panel: one 32-bit lane each in a 512-bit vector.
pub const PANEL: usize = 16;

/// Tokens per pass: their sub-block sums, integer sums and accumulators, with the unpacked
/// codes, fit the 32 vector registers.
pub const TOKENS: usize = 4;

/// Bytes of one super-block of Q4_K in the file.
const FILE_BYTES: usize = 144;
const CODES: usize = 32 * 64;
const SCALES_AT: usize = CODES;
const MINS_AT: usize = SCALES_AT + 8 * PANEL;
const D_AT: usize = MINS_AT + 4 * 2 * PANEL;
const DMIN_AT: usize = D_AT + 2 * PANEL;
/// Bytes of one panel super-block.
pub const SUPER_BYTES: usize = DMIN_AT + 2 * PANEL;

/// Sub-block j's 6-bit scale and minimum from a super-block's 12 scale bytes.
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | (s[j - 4] >> 6) << 4,
            (s[j + 4] >> 4) | (s[j] >> 6) << 4,
        )
    }
}

/// The inverse of [`scale_min`] over all eight sub-blocks: the 12 scale bytes.
fn scale_bytes(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | (sc[j + 4] >> 4) << 6;
        s[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
        s[j + 8] = (sc[j + 4] & 0x0F) | (mn[j + 4] & 0x0F) << 4;
    }
    s
}

/// Bytes of `w` (Q4_K, `w.rows()` rows) in panels; panels are filled in parallel.
pub fn pack(w: &WeightView<'_>) -> Vec<u8> {
    assert_eq!(
        w.dtype(),
        GgmlType::Q4_K,
        "q4k_panels::pack of {}",
        w.dtype()
    );
    let supers = w.cols() / QK_K;
    let panel_bytes = supers * SUPER_BYTES;
    let mut out = vec![0u8; w.rows().div_ceil(PANEL) * panel_bytes];
    if panel_bytes == 0 {
        return out;
    }
    let rb = w.row_bytes();
    pool::global().for_each_chunk_mut(&mut out, panel_bytes, &|p, panel| {
        for r in 0..PANEL.min(w.rows() - p * PANEL) {
            let row = &w.data()[(p * PANEL + r) * rb..][..rb];
            for (b, dst) in row
                .chunks_exact(FILE_BYTES)
                .zip(panel.chunks_exact_mut(SUPER_BYTES))
            {
                let qs = &b[16..];
                for g in 0..32 {
                    dst[64 * g + 4 * r..][..4].copy_from_slice(&qs[4 * g..4 * g + 4]);
                }
                for j in 0..8 {
                    let (sc, mn) = scale_min(&b[4..16], j);
                    dst[SCALES_AT + PANEL * j + r] = sc;
                    dst[MINS_AT + 2 * PANEL * (j / 2) + 2 * r + j % 2] = mn;
                }
                dst[D_AT + 2 * r..][..2].copy_from_slice(&b[0..2]);
                dst[DMIN_AT + 2 * r..][..2].copy_from_slice(&b[2..4]);
            }
        }
    });
    out
}

/// Writes rows `first..first + n` of the `rows × cols` matrix packed in `bytes` back in Q4_K's
/// own encoding into `out`: byte for byte the file's rows.
pub fn unpack(bytes: &[u8], cols: usize, first: usize, n: usize, out: &mut [u8]) {
    let supers = cols / QK_K;
    let rb = supers * FILE_BYTES;
    assert_eq!(
        out.len(),
        n * rb,
        "unpack_rows: output of {} bytes",
        out.len()
    );
    let panel_bytes = supers * SUPER_BYTES;
    for (i, row) in out.chunks_exact_mut(rb.max(1)).take(n).enumerate() {
        let (p, r) = ((first + i) / PANEL, (first + i) % PANEL);
        let panel = &bytes[p * panel_bytes..(p + 1) * panel_bytes];
        for (b, src) in row
            .chunks_exact_mut(FILE_BYTES)
            .zip(panel.chunks_exact(SUPER_BYTES))
        {
            b[0..2].copy_from_slice(&src[D_AT + 2 * r..][..2]);
            b[2..4].copy_from_slice(&src[DMIN_AT + 2 * r..][..2]);
            let sc: [u8; 8] = std::array::from_fn(|j| src[SCALES_AT + PANEL * j + r]);
            let mn: [u8; 8] =
                std::array::from_fn(|j| src[MINS_AT + 2 * PANEL * (j / 2) + 2 * r + j % 2]);
            b[4..16].copy_from_slice(&scale_bytes(&sc, &mn));
            for g in 0..32 {
                b[16 + 4 * g..][..4].copy_from_slice(&src[64 * g + 4 * r..][..4]);
            }
        }
    }
}

/// `outs[t][i] = row rows.start + i · acts[t]` over the `rows × cols` matrix packed in
/// `bytes`; `rows.start` must be a multiple of [`PANEL`] and the CPU must run AVX-512 VNNI
/// (the only level that packs Q4_K).
///
/// Panics on a shape mismatch between the matrix, `rows`, `acts` and `outs`.
pub fn gemv_tokens(
    bytes: &[u8],
    total_rows: usize,
    cols: usize,
    rows: Range<usize>,
    acts: &[&[BlockQ8x256]],
    outs: &mut [&mut [f32]],
) {
    assert!(
        rows.start.is_multiple_of(PANEL) && rows.start <= rows.end && rows.end <= total_rows,
        "q4k panels: rows {rows:?} do not start a panel of a {total_rows}-row matrix"
    );
    assert_eq!(
        acts.len(),
        outs.len(),
        "q4k panels: activations and outputs"
    );
    let supers = cols / QK_K;
    assert_eq!(
        bytes.len(),
        total_rows.div_ceil(PANEL) * supers * SUPER_BYTES
    );
    for (a, out) in acts.iter().zip(outs.iter()) {
        assert_eq!(a.len(), supers, "q4k panels: activation super-blocks");
        assert_eq!(
            out.len(),
            rows.len(),
            "q4k panels: outputs for rows {rows:?}"
        );
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(avx512::runnable(), "q4k panels need AVX-512 VNNI");
        let panel_bytes = supers * SUPER_BYTES;
        for first in rows.clone().step_by(PANEL) {
            let n = PANEL.min(rows.end - first);
            let panel = &bytes[first / PANEL * panel_bytes..][..panel_bytes];
            let at = first - rows.start;
            for t0 in (0..acts.len()).step_by(TOKENS) {
                let tokens = TOKENS.min(acts.len() - t0);
                let (a, o) = (&acts[t0..t0 + tokens], &mut outs[t0..t0 + tokens]);
                macro_rules! pass {
                    ($($t:literal)*) => {
                        match tokens {
                            // SAFETY: AVX-512 VNNI is present (asserted above); the panel
                            // holds `supers` super-blocks; every activation row has `supers`
                            // super-blocks and every output at least `at + n` values
                            // (asserted above), with `n <= PANEL`.
                            $($t => unsafe {
                                avx512::panel::<$t>(
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
                pass!(1 2 3 4);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Q4_K is packed only on x86-64");
}

/// The scalar reference of the panel kernel, read from the file's rows of `w` (Q4_K) with the
/// same arithmetic (see the module docs): `outs[t][i] = row rows.start + i · acts[t]`.
pub fn reference(
    w: &WeightView<'_>,
    rows: Range<usize>,
    acts: &[&[BlockQ8x256]],
    outs: &mut [&mut [f32]],
) {
    assert_eq!(
        w.dtype(),
        GgmlType::Q4_K,
        "q4k panels reference of {}",
        w.dtype()
    );
    let rb = w.row_bytes();
    for (a, out) in acts.iter().zip(outs.iter_mut()) {
        for (o, r) in out.iter_mut().zip(rows.clone()) {
            let mut acc = 0f32;
            for (b, x) in w.data()[r * rb..(r + 1) * rb]
                .chunks_exact(FILE_BYTES)
                .zip(*a)
            {
                let (mut isum, mut m) = (0i32, 0i32);
                for j in 0..8 {
                    let (sc, mn) = scale_min(&b[4..16], j);
                    let dot: i32 = b[16 + 32 * (j / 2)..][..32]
                        .iter()
                        .zip(&x.qs[32 * j..32 * j + 32])
                        .map(|(&q, &a)| ((q >> (4 * (j % 2))) & 0x0F) as i32 * a as i32)
                        .sum();
                    isum += sc as i32 * dot;
                    m += mn as i32 * (x.bsums[2 * j] as i32 + x.bsums[2 * j + 1] as i32);
                }
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
                acc = (d * x.d).mul_add(isum as f32, acc);
                acc = (-(dmin * x.d)).mul_add(m as f32, acc);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use super::{DMIN_AT, D_AT, MINS_AT, SCALES_AT, SUPER_BYTES};
    use crate::act::BlockQ8x256;
    use crate::dot::{prefetch, PREFETCH_BLOCKS};

    pub fn runnable() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
    }

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

    /// `outs[t][0..n]` = the panel at `p` (`supers` panel super-blocks) · token t.
    ///
    /// # Safety
    /// The CPU has avx512f/bw/vl/vnni and f16c; `p` points to `supers` panel super-blocks;
    /// each `acts[t]` to `supers` readable super-blocks; each `outs[t]` to `n <= 16`
    /// writable values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn panel<const T: usize>(
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
            let blk = p.add(b * SUPER_BYTES);
            prefetch(
                blk.wrapping_add(PREFETCH_BLOCKS / 4 * SUPER_BYTES),
                SUPER_BYTES,
            );
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
        let keep = (((1u32 << n) - 1) & 0xFFFF) as __mmask16;
        for t in 0..T {
            _mm512_mask_storeu_ps(outs[t], keep, acc[t]);
        }
    }
}
