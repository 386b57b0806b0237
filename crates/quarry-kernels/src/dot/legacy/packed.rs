//! The 32-value types repacked once, at load, into panels of 16 rows for kernels that
//! multiply a panel by several tokens per pass: AVX-512 VNNI ([`TOKENS`] per pass) and AVX2
//! ([`TOKENS_AVX2`], each half-panel of 8 rows on its own).
//!
//! Why: in a row's own layout one `vpdpbusd` advances one row by 32 values, every block of
//! every row needs its own scale multiply, the row's lanes must be summed at the end, and
//! nibbles are unpacked again for each token. In a panel, lane r of every vector belongs to
//! row r: four consecutive codes of each of 16 rows fill one 512-bit vector, so one
//! `vpdpbusd` against four activation bytes broadcast to every lane advances 16 rows at once,
//! a block's 16 scales apply with one multiply, no lane is ever summed across, and each
//! unpacked vector serves every token of the pass. A batch of decode tokens then costs
//! little more than one token for everything but the multiply-adds themselves.
//!
//! Layout of panel p (rows 16p..16p + 16; a last partial panel is padded with zero rows),
//! its blocks one after another, each block:
//! - codes, unsigned (as in `legacy`'s docs): nibble types in 4 × 64 bytes, where byte
//!   4r + i of vector j holds code 4j + i of row r in its low nibble and code 16 + 4j + i in
//!   its high nibble; Q8_0 in 8 × 64 bytes, byte 4r + i of vector g being code 4g + i;
//! - Q5_0 and Q5_1: 8 little-endian `u64`, bit 4r + i of word g the fifth bit of code
//!   4g + i of row r (an AVX-512 byte mask as it is);
//! - the 16 rows' f16 scales `d`, then (Q4_1, Q5_1) their f16 minimums `m`.
//!
//! So a panel block has as many bytes as 16 of the type's blocks. Every product reads the
//! copy (prompts through [`PackedRows::unpack_rows`]), so a model can let the file's pages of
//! a packed matrix go and pay for the copy with them.
//!
//! Arithmetic, per row and token, the same at every batch size, in every pass and in the
//! scalar [`reference()`]: per block the exact integer Σ (code − OFFSET) · q (accumulated from
//! −OFFSET · Σq), then `acc = fma(isum, d · d_a, acc)`; the minimums in a sum of their own,
//! `mins = fma(m, s, mins)`; the result `acc + mins`. Results are therefore bit-identical
//! to the reference and independent of which tokens share a pass.

use std::ops::Range;

use super::{
    block_values, f16_at, nibbles, runnable, Layout, MIN_AT, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
};
use crate::act::BlockQ8x32;
use crate::dot::{kquant_panels, Isa};
use crate::{pool, GgmlType, WeightView};

/// Rows per panel: one 32-bit lane each in a 512-bit vector.
pub const PANEL: usize = 16;

/// Tokens per pass of the AVX-512 kernel: their integer sums and accumulators, with the
/// unpacked codes, fit the 32 vector registers.
pub const TOKENS: usize = 8;

/// Tokens per pass of the AVX2 kernel: their `i16` and `i32` sums and accumulators, with the
/// unpacked codes and constants, fit the 16 vector registers.
pub const TOKENS_AVX2: usize = 4;

/// A matrix of a 32-value type in 16-row panels (see the module docs).
pub struct PackedRows {
    /// The kernel level the products use: AVX2 or AVX-512 VNNI.
    isa: Isa,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

impl PackedRows {
    /// Repacks `w` for the panel kernel of the level in use ([`Isa::best`]); see
    /// [`PackedRows::for_isa`].
    pub fn new(w: &WeightView<'_>) -> Option<PackedRows> {
        PackedRows::for_isa(w, Isa::best())
    }

    /// Repacks `w` for the panel kernel of `isa` when this CPU runs it (AVX2 or AVX-512 VNNI)
    /// and `w`'s type is one of the 32-value types, or Q4_K or Q6_K (their panels are
    /// [`kquant_panels`]'s); `None` otherwise.
    pub fn for_isa(w: &WeightView<'_>, isa: Isa) -> Option<PackedRows> {
        PackedRows::for_isa_releasing(w, isa, &|_| {})
    }

    /// [`PackedRows::for_isa`], handing `packed` the bytes of `w` of each run of rows once its
    /// copy is written (about [`SLAB_BYTES`] at a time), so that a caller can let the file's
    /// pages of them go while the rest is packed.
    pub fn for_isa_releasing(
        w: &WeightView<'_>,
        isa: Isa,
        packed: &dyn Fn(&[u8]),
    ) -> Option<PackedRows> {
        if isa == Isa::Scalar || !runnable(isa) {
            return None;
        }
        let bytes = match w.dtype() {
            t if kquant_panels::supports(t) => kquant_panels::pack(w, packed),
            _ => by_layout!(w.dtype(), L => pack::<L>(w, packed), _ => return None),
        };
        Some(PackedRows {
            isa,
            dtype: w.dtype(),
            rows: w.rows(),
            cols: w.cols(),
            bytes,
        })
    }

    /// Writes rows `first..first + n` back in the type's own encoding into `out` (`n` rows
    /// of the type's row bytes): byte for byte what was packed, so the `f32` paths decode a
    /// packed matrix exactly as its file view. Panics if the rows or `out` do not fit.
    pub fn unpack_rows(&self, first: usize, n: usize, out: &mut [u8]) {
        assert!(
            first + n <= self.rows,
            "unpack_rows: rows {first}..{} of {}",
            first + n,
            self.rows
        );
        if kquant_panels::supports(self.dtype) {
            return kquant_panels::unpack(self.dtype, &self.bytes, self.cols, first, n, out);
        }
        by_layout!(
            self.dtype,
            L => self.unpack::<L>(first, n, out),
            _ => unreachable!("PackedRows holds only 32-value types and K-quants")
        )
    }

    /// The packed bytes (the layout of the type's panel module).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The inverse of [`pack`], row by row.
    fn unpack<L: Layout>(&self, first: usize, n: usize, out: &mut [u8]) {
        let blocks = self.cols / 32;
        let rb = blocks * L::BYTES;
        assert_eq!(
            out.len(),
            n * rb,
            "unpack_rows: output of {} bytes",
            out.len()
        );
        let panel_bytes = blocks * block_bytes::<L>();
        let flip: u32 = if nibbles::<L>() { 0 } else { 0x8080_8080 };
        for (i, row) in out.chunks_exact_mut(rb.max(1)).take(n).enumerate() {
            let (p, r) = ((first + i) / PANEL, (first + i) % PANEL);
            let panel = &self.bytes[p * panel_bytes..(p + 1) * panel_bytes];
            for (block, src) in row
                .chunks_exact_mut(L::BYTES)
                .zip(panel.chunks_exact(block_bytes::<L>()))
            {
                let scales = &src[scales_at::<L>()..];
                block[..2].copy_from_slice(&scales[2 * r..2 * r + 2]);
                if L::HAS_MIN {
                    block[MIN_AT..MIN_AT + 2].copy_from_slice(&scales[32 + 2 * r..32 + 2 * r + 2]);
                }
                if let Some(h) = L::QH {
                    let mut qh = 0u32;
                    for g in 0..8 {
                        let at = code_bytes::<L>() + 8 * g;
                        let word = u64::from_le_bytes(src[at..at + 8].try_into().expect("8 bytes"));
                        qh |= (((word >> (4 * r)) & 0xF) as u32) << (4 * g);
                    }
                    block[h..h + 4].copy_from_slice(&qh.to_le_bytes());
                }
                for g in 0..code_bytes::<L>() / 64 {
                    let at = 64 * g + 4 * r;
                    let quad = u32::from_le_bytes(src[at..at + 4].try_into().expect("4 bytes"));
                    block[L::QS + 4 * g..L::QS + 4 * g + 4]
                        .copy_from_slice(&(quad ^ flip).to_le_bytes());
                }
            }
        }
    }

    /// The kernel level products of this copy use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

const fn code_bytes<L: Layout>() -> usize {
    if nibbles::<L>() {
        256
    } else {
        512
    }
}

const fn mask_bytes<L: Layout>() -> usize {
    if L::QH.is_some() {
        64
    } else {
        0
    }
}

/// Offset of the 16 scales within a panel block.
const fn scales_at<L: Layout>() -> usize {
    code_bytes::<L>() + mask_bytes::<L>()
}

/// Bytes of one panel block: those of 16 blocks of the type.
const fn block_bytes<L: Layout>() -> usize {
    PANEL * L::BYTES
}

/// `w` in panels; panels are filled in parallel. Every move is of four bytes: a nibble
/// type's code byte m already holds codes m and m + 16, which is what the panel wants, and a
/// Q8_0 byte becomes its code by flipping the sign bit.
fn pack<L: Layout>(w: &WeightView<'_>, packed: &dyn Fn(&[u8])) -> Vec<u8> {
    let blocks = w.cols() / 32;
    let panel_bytes = blocks * block_bytes::<L>();
    let rb = w.row_bytes();
    let flip: u32 = if nibbles::<L>() { 0 } else { 0x8080_8080 };
    pack_in_slabs(w, panel_bytes, packed, &|p, panel| {
        for r in 0..PANEL.min(w.rows() - p * PANEL) {
            let row = &w.data()[(p * PANEL + r) * rb..][..rb];
            for (block, dst) in row
                .chunks_exact(L::BYTES)
                .zip(panel.chunks_exact_mut(block_bytes::<L>()))
            {
                let qs = &block[L::QS..];
                for g in 0..code_bytes::<L>() / 64 {
                    let quad = u32::from_le_bytes([
                        qs[4 * g],
                        qs[4 * g + 1],
                        qs[4 * g + 2],
                        qs[4 * g + 3],
                    ]);
                    dst[64 * g + 4 * r..64 * g + 4 * r + 4]
                        .copy_from_slice(&(quad ^ flip).to_le_bytes());
                }
                if let Some(h) = L::QH {
                    let qh =
                        u32::from_le_bytes([block[h], block[h + 1], block[h + 2], block[h + 3]]);
                    for g in 0..8 {
                        let at = code_bytes::<L>() + 8 * g;
                        let mut word =
                            u64::from_le_bytes(dst[at..at + 8].try_into().expect("8 bytes"));
                        word |= u64::from((qh >> (4 * g)) & 0xF) << (4 * r);
                        dst[at..at + 8].copy_from_slice(&word.to_le_bytes());
                    }
                }
                let scales = &mut dst[scales_at::<L>()..];
                scales[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
                if L::HAS_MIN {
                    scales[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&block[MIN_AT..MIN_AT + 2]);
                }
            }
        }
    })
}

/// Bytes of a matrix's file rows packed between two calls of the `packed` hook of
/// [`pack_in_slabs`]: small beside a model, large beside a page.
pub const SLAB_BYTES: usize = 16 << 20;

/// Panels of `panel_bytes` for every 16 rows of `w`, each filled by `pack_panel(p, panel)`
/// (in parallel), one slab of about [`SLAB_BYTES`] of `w`'s rows after another; `packed`
/// gets each slab's rows of `w` once their panels are written. The copy is allocated zeroed
/// (untouched pages cost nothing) and fills as the slabs go, so a caller that releases what
/// `packed` hands it holds one slab twice at most, never the whole matrix.
pub(crate) fn pack_in_slabs(
    w: &WeightView<'_>,
    panel_bytes: usize,
    packed: &dyn Fn(&[u8]),
    pack_panel: &(dyn Fn(usize, &mut [u8]) + Sync),
) -> Vec<u8> {
    let panels = w.rows().div_ceil(PANEL);
    let mut out = vec![0u8; panels * panel_bytes];
    if panel_bytes == 0 {
        return out;
    }
    let panel_source = PANEL * w.row_bytes();
    let per_slab = (SLAB_BYTES / panel_source.max(1)).max(1);
    for (s, slab) in out.chunks_mut(per_slab * panel_bytes).enumerate() {
        let first = s * per_slab;
        pool::global()
            .for_each_chunk_mut(slab, panel_bytes, &|p, panel| pack_panel(first + p, panel));
        let rows = first * PANEL..((first + per_slab) * PANEL).min(w.rows());
        packed(&w.data()[rows.start * w.row_bytes()..rows.end * w.row_bytes()]);
    }
    out
}

/// `outs[t][i] = row rows.start + i of p · acts[t]`. `rows.start` must be a multiple of
/// [`PANEL`].
///
/// Panics on a shape mismatch between `p`, `rows`, `acts` and `outs`.
pub fn gemv_tokens(
    p: &PackedRows,
    rows: Range<usize>,
    acts: &[&[BlockQ8x32]],
    outs: &mut [&mut [f32]],
) {
    assert!(
        rows.start.is_multiple_of(PANEL) && rows.start <= rows.end && rows.end <= p.rows,
        "packed gemv: rows {rows:?} do not start a panel of a {}-row matrix",
        p.rows
    );
    assert_eq!(
        acts.len(),
        outs.len(),
        "packed gemv: {} activation rows for {} outputs",
        acts.len(),
        outs.len()
    );
    for (a, out) in acts.iter().zip(outs.iter()) {
        assert_eq!(
            a.len() * 32,
            p.cols,
            "packed gemv: {} activation blocks for {} columns",
            a.len(),
            p.cols
        );
        assert_eq!(
            out.len(),
            rows.len(),
            "packed gemv: {} outputs for {} rows",
            out.len(),
            rows.len()
        );
    }
    // `PackedRows::for_isa` packs only for a level this CPU runs.
    assert!(runnable(p.isa));
    by_layout!(
        p.dtype,
        L => by_panels::<L>(p, rows, acts, outs),
        _ => unreachable!("PackedRows holds only 32-value types")
    )
}

/// Each panel of `rows` against every token, a pass of up to [`TOKENS`] (AVX-512) or
/// [`TOKENS_AVX2`] at a time, while the panel is in cache.
fn by_panels<L: Layout>(
    p: &PackedRows,
    rows: Range<usize>,
    acts: &[&[BlockQ8x32]],
    outs: &mut [&mut [f32]],
) {
    let blocks = p.cols / 32;
    let panel_bytes = blocks * block_bytes::<L>();
    let per_pass = if p.isa == Isa::Avx512Vnni {
        TOKENS
    } else {
        TOKENS_AVX2
    };
    for first in rows.clone().step_by(PANEL) {
        let n = PANEL.min(rows.end - first);
        let panel = &p.bytes[first / PANEL * panel_bytes..][..panel_bytes];
        let at = first - rows.start;
        for t0 in (0..acts.len()).step_by(per_pass) {
            let tokens = per_pass.min(acts.len() - t0);
            let (a, o) = (&acts[t0..t0 + tokens], &mut outs[t0..t0 + tokens]);
            macro_rules! pass {
                ($kernel:ident: $($t:literal)*) => {
                    match tokens {
                        // SAFETY: the CPU runs `p.isa` (checked by `gemv_tokens`); the panel
                        // holds `blocks` panel blocks of `L`; each activation row has `blocks`
                        // blocks and each output `at + n` or more values (checked by
                        // `gemv_tokens`), with `n <= PANEL`.
                        $($t => unsafe {
                            $kernel::panel::<L, $t>(
                                panel.as_ptr(),
                                blocks,
                                std::array::from_fn(|t| a[t].as_ptr()),
                                std::array::from_fn(|t| o[t][at..].as_mut_ptr()),
                                n,
                            )
                        },)*
                        _ => unreachable!("at most the level's tokens per pass"),
                    }
                };
            }
            #[cfg(target_arch = "x86_64")]
            if p.isa == Isa::Avx512Vnni {
                pass!(avx512: 1 2 3 4 5 6 7 8);
            } else {
                pass!(avx2: 1 2 3 4);
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("PackedRows::for_isa packs only on x86-64");
        }
    }
}

/// The scalar reference of the panel kernel, read from the unpacked `w` with the same
/// arithmetic (see the module docs): `outs[t][i] = row rows.start + i of w · acts[t]`.
/// Panics unless `w` is a 32-value type and the shapes fit.
pub fn reference(
    w: &WeightView<'_>,
    rows: Range<usize>,
    acts: &[&[BlockQ8x32]],
    outs: &mut [&mut [f32]],
) {
    let dtype = w.dtype();
    by_layout!(
        dtype,
        L => reference_as::<L>(w, rows, acts, outs),
        _ => panic!("packed reference: {dtype} is not a 32-value type")
    )
}

fn reference_as<L: Layout>(
    w: &WeightView<'_>,
    rows: Range<usize>,
    acts: &[&[BlockQ8x32]],
    outs: &mut [&mut [f32]],
) {
    let rb = w.row_bytes();
    for (a, out) in acts.iter().zip(outs.iter_mut()) {
        assert_eq!(
            a.len() * 32,
            w.cols(),
            "packed reference: activation length"
        );
        for (o, r) in out.iter_mut().zip(rows.clone()) {
            let (mut acc, mut mins) = (0f32, 0f32);
            for (block, ab) in w.data()[r * rb..(r + 1) * rb]
                .chunks_exact(L::BYTES)
                .zip(*a)
            {
                let isum: i32 = block_values::<L>(block)
                    .iter()
                    .zip(&ab.qs)
                    .map(|(&x, &y)| x as i32 * y as i32)
                    .sum();
                acc = (isum as f32).mul_add(f16_at(block, 0) * ab.d, acc);
                if L::HAS_MIN {
                    mins = f16_at(block, MIN_AT).mul_add(ab.s, mins);
                }
            }
            *o = if L::HAS_MIN { acc + mins } else { acc };
        }
    }
}

/// Activation bytes `k..k + 4` of the block at `a`, as one little-endian word: what a panel
/// kernel broadcasts to every row's lane.
///
/// # Safety
/// `a` points to a readable block and `k <= 28`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn activation_quad(a: *const BlockQ8x32, k: usize) -> i32 {
    core::ptr::read_unaligned((*a).qs.as_ptr().add(k) as *const i32)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;
    use core::ptr::read_unaligned;

    use super::{activation_quad, block_bytes, code_bytes, nibbles, scales_at, Layout, PANEL};
    use crate::act::BlockQ8x32;
    use crate::dot::{prefetch, PREFETCH_BLOCKS};

    /// Four activation bytes of `a`'s block, from value `k`, in every lane.
    ///
    /// # Safety
    /// `a` points to a readable block and `k <= 28`.
    #[inline(always)]
    unsafe fn quad(a: *const BlockQ8x32, k: usize) -> __m512i {
        _mm512_set1_epi32(activation_quad(a, k))
    }

    /// `outs[t][0..n]` = the panel at `p` (`blocks` panel blocks of `L`) · token t.
    ///
    /// # Safety
    /// The CPU has avx512f, avx512bw and avx512vnni; `p` points to `blocks` panel blocks;
    /// each `acts[t]` to `blocks` readable blocks; each `outs[t]` to `n <= PANEL` writable
    /// values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn panel<L: Layout, const T: usize>(
        p: *const u8,
        blocks: usize,
        acts: [*const BlockQ8x32; T],
        outs: [*mut f32; T],
        n: usize,
    ) {
        let low = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(16);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..blocks {
            let blk = p.add(b * block_bytes::<L>());
            prefetch(
                blk.wrapping_add(PREFETCH_BLOCKS * block_bytes::<L>()),
                block_bytes::<L>(),
            );
            let a: [*const BlockQ8x32; T] = core::array::from_fn(|t| acts[t].add(b));
            let mut isum = [_mm512_setzero_si512(); T];
            if L::OFFSET != 0 {
                for t in 0..T {
                    isum[t] = _mm512_set1_epi32(-(L::OFFSET as i32) * (*a[t]).sum);
                }
            }
            if nibbles::<L>() {
                let masks = blk.add(code_bytes::<L>()) as *const u64;
                for j in 0..4 {
                    let c = _mm512_loadu_si512(blk.add(64 * j) as *const _);
                    let mut lo = _mm512_and_si512(c, low);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
                    if L::QH.is_some() {
                        lo = _mm512_mask_add_epi8(lo, read_unaligned(masks.add(j)), lo, sixteen);
                        hi =
                            _mm512_mask_add_epi8(hi, read_unaligned(masks.add(j + 4)), hi, sixteen);
                    }
                    for t in 0..T {
                        isum[t] = _mm512_dpbusd_epi32(isum[t], lo, quad(a[t], 4 * j));
                        isum[t] = _mm512_dpbusd_epi32(isum[t], hi, quad(a[t], 16 + 4 * j));
                    }
                }
            } else {
                for g in 0..8 {
                    let c = _mm512_loadu_si512(blk.add(64 * g) as *const _);
                    for t in 0..T {
                        isum[t] = _mm512_dpbusd_epi32(isum[t], c, quad(a[t], 4 * g));
                    }
                }
            }
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(
                blk.add(scales_at::<L>()) as *const __m256i
            ));
            for t in 0..T {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps((*a[t]).d));
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), scale, acc[t]);
            }
        }
        if L::HAS_MIN {
            let mut mins = [_mm512_setzero_ps(); T];
            for b in 0..blocks {
                let at = p.add(b * block_bytes::<L>() + scales_at::<L>() + 2 * PANEL);
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i));
                for t in 0..T {
                    let s = _mm512_set1_ps((*acts[t].add(b)).s);
                    mins[t] = _mm512_fmadd_ps(m, s, mins[t]);
                }
            }
            for t in 0..T {
                acc[t] = _mm512_add_ps(acc[t], mins[t]);
            }
        }
        let keep = (((1u32 << n) - 1) & 0xFFFF) as __mmask16;
        for t in 0..T {
            _mm512_mask_storeu_ps(outs[t], keep, acc[t]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;
    use core::ptr::read_unaligned;

    use super::{activation_quad, block_bytes, code_bytes, nibbles, scales_at, Layout, PANEL};
    use crate::act::BlockQ8x32;
    use crate::dot::{prefetch, PREFETCH_BLOCKS};

    /// Rows per vector: one 32-bit lane each in a 256-bit vector, half a panel.
    const HALF: usize = PANEL / 2;

    /// Four activation bytes of `a`'s block, from value `k`, in every lane.
    ///
    /// # Safety
    /// `a` points to a readable block and `k <= 28`.
    #[inline(always)]
    unsafe fn quad(a: *const BlockQ8x32, k: usize) -> __m256i {
        _mm256_set1_epi32(activation_quad(a, k))
    }

    /// `outs[t][0..n]` = the panel at `p` (`blocks` panel blocks of `L`) · token t, one
    /// half-panel after the other (the panel stays in cache for the second).
    ///
    /// # Safety
    /// The CPU has avx2, fma and f16c; `p` points to `blocks` panel blocks; each `acts[t]` to
    /// `blocks` readable blocks; each `outs[t]` to `n <= PANEL` writable values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel<L: Layout, const T: usize>(
        p: *const u8,
        blocks: usize,
        acts: [*const BlockQ8x32; T],
        outs: [*mut f32; T],
        n: usize,
    ) {
        for h in 0..n.div_ceil(HALF) {
            let rows = (n - h * HALF).min(HALF);
            let outs = core::array::from_fn(|t| outs[t].add(h * HALF));
            half::<L, T>(p, blocks, acts, outs, h, rows);
        }
    }

    /// Rows `8h..8h + rows` of the panel at `p` · every token, into `outs[t][0..rows]`.
    ///
    /// # Safety
    /// As [`panel`], with `h < 2` and `rows <= 8` the half's rows that exist.
    #[inline(always)]
    unsafe fn half<L: Layout, const T: usize>(
        p: *const u8,
        blocks: usize,
        acts: [*const BlockQ8x32; T],
        outs: [*mut f32; T],
        h: usize,
        rows: usize,
    ) {
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(0x80u8 as i8);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..blocks {
            let blk = p.add(b * block_bytes::<L>());
            if h == 0 {
                prefetch(
                    blk.wrapping_add(PREFETCH_BLOCKS * block_bytes::<L>()),
                    block_bytes::<L>(),
                );
            }
            let a: [*const BlockQ8x32; T] = core::array::from_fn(|t| acts[t].add(b));
            let mut isum = [_mm256_setzero_si256(); T];
            if nibbles::<L>() {
                // The half-block's eight code vectors, unpacked once for every token: code
                // vector v holds codes 4v..4v + 4 of each row (low nibbles of stored vector
                // v, then high nibbles of v − 4), so it meets the activations from 4v.
                let masks = blk.add(code_bytes::<L>()) as *const u64;
                let mut codes = [_mm256_setzero_si256(); 8];
                for j in 0..4 {
                    let c = _mm256_loadu_si256(blk.add(64 * j + 32 * h) as *const __m256i);
                    codes[j] = _mm256_and_si256(c, low);
                    codes[j + 4] = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
                    if L::QH.is_some() {
                        let half_word =
                            |w: usize| (read_unaligned(masks.add(w)) >> (32 * h)) as u32;
                        let (lo16, hi16) = sixteens(half_word(j), half_word(j + 4));
                        codes[j] = _mm256_or_si256(codes[j], lo16);
                        codes[j + 4] = _mm256_or_si256(codes[j + 4], hi16);
                    }
                }
                // Code vectors whose pair sums are added in `i16` before widening (see the
                // module docs): all eight for 4-bit codes, four for 5-bit codes.
                let per_widening = if L::QH.is_some() { 4 } else { 8 };
                for t in 0..T {
                    if L::OFFSET != 0 {
                        isum[t] = _mm256_set1_epi32(-(L::OFFSET as i32) * (*a[t]).sum);
                    }
                    for first in (0..8).step_by(per_widening) {
                        let mut pairs = _mm256_setzero_si256();
                        for (v, &code) in codes.iter().enumerate().skip(first).take(per_widening) {
                            let product = _mm256_maddubs_epi16(code, quad(a[t], 4 * v));
                            pairs = _mm256_add_epi16(pairs, product);
                        }
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(pairs, ones));
                    }
                }
            } else {
                for g in 0..8 {
                    let c = _mm256_loadu_si256(blk.add(64 * g + 32 * h) as *const __m256i);
                    let w = _mm256_xor_si256(c, flip);
                    let magnitude = _mm256_abs_epi8(w);
                    for t in 0..T {
                        let q = _mm256_sign_epi8(quad(a[t], 4 * g), w);
                        let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, q), ones);
                        isum[t] = _mm256_add_epi32(isum[t], prod);
                    }
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(
                blk.add(scales_at::<L>() + 2 * HALF * h) as *const __m128i
            ));
            for t in 0..T {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps((*a[t]).d));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), scale, acc[t]);
            }
        }
        if L::HAS_MIN {
            let mut mins = [_mm256_setzero_ps(); T];
            for b in 0..blocks {
                let at =
                    p.add(b * block_bytes::<L>() + scales_at::<L>() + 2 * PANEL + 2 * HALF * h);
                let m = _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i));
                for t in 0..T {
                    let s = _mm256_set1_ps((*acts[t].add(b)).s);
                    mins[t] = _mm256_fmadd_ps(m, s, mins[t]);
                }
            }
            for t in 0..T {
                acc[t] = _mm256_add_ps(acc[t], mins[t]);
            }
        }
        let keep = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(rows as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        for t in 0..T {
            _mm256_maskstore_ps(outs[t], keep, acc[t]);
        }
    }

    /// 16 in byte i of the first vector where bit i of `lo` is set, else 0; likewise the
    /// second vector from `hi`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sixteens(lo: u32, hi: u32) -> (__m256i, __m256i) {
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
}
