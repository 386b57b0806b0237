//! `f32` vector primitives for the model's own loops: attention scores and value sums, the
//! softmax exponentials and the gated FFN activations.
//!
//! Attention reads its keys and values in place from the KV cache, which stores them as `f16`:
//! [`dot_rows`] and [`add_weighted_rows`] take those rows as any [`Element`] and widen each
//! vector as it is loaded, so an `f16` row gives exactly what the same row widened to `f32`
//! gives (tested bit for bit), at half the memory traffic.
//!
//! The workspace compiles for baseline x86-64 (SSE2), so these get an AVX2+FMA variant chosen
//! at run time through [`Isa::best`] (and [`dot_rows`] and [`add_weighted_rows`], where
//! prompts and attention spend their time, an AVX-512 one: twice the multiply-adds per
//! instruction); the scalar versions (on `std`'s `exp`) are the reference
//! they are tested against. The vector `exp` is a range reduction to `2ⁿ·e^r`, `|r| ≤ ln2/2`,
//! with a degree-6 polynomial for `e^r`: within a few ulp of `std` over the whole `f32` range,
//! including `0` below `e^-87.3` and `∞` above `e^88.7`.

use half::f16;

use crate::dot::Isa;

/// A type the rows read by [`dot_rows`] and [`add_weighted_rows`] may have: `f32`, or `f16`
/// (widened exactly on load).
pub trait Element: Copy + Sync + sealed::Sealed + 'static {
    /// Whether the type is `f16` (the vector levels pick their loads by it).
    const HALF: bool;
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const HALF: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for f16 {
    const HALF: bool = true;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// Σ a[i]·b[i] over equal-length slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(Isa::best(), a, b)
}

/// `y[i] += alpha · x[i]` over equal-length slices.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    axpy_with(Isa::best(), y, alpha, x)
}

/// `out[r · n + t] = Σₖ w[r · cols + k] · x[t · x_stride + k]`: every row of `w` (row-major,
/// `cols` columns) dotted with each of the `n = out.len() / rows` rows of `x`, which start
/// `x_stride ≥ cols` values apart. A small-batch matrix product whose weights were just
/// decoded into `w` (`x_stride == cols`), or attention scores of a few query rows against
/// keys read in place from a cache row holding every KV head. With `cols == 0` every product
/// is 0.
pub fn dot_rows<E: Element>(w: &[f32], x: &[E], cols: usize, x_stride: usize, out: &mut [f32]) {
    dot_rows_with(Isa::best(), w, x, cols, x_stride, out)
}

/// [`dot_rows`] for an `x` read once from memory (attention keys in place in a KV cache):
/// the AVX-512 level asks the cache for the rows of `x` a few blocks ahead of the ones it
/// multiplies. Results are those of [`dot_rows`].
pub fn dot_rows_streamed<E: Element>(
    w: &[f32],
    x: &[E],
    cols: usize,
    x_stride: usize,
    out: &mut [f32],
) {
    dot_rows_at(Isa::best(), w, x, cols, x_stride, out, true)
}

/// `out[r · cols + c] += Σⱼ p[r · n + j] · v[j · v_stride + c]`: each of the `m = out.len() /
/// cols` output rows gains its row of weights `p` (`n = p.len() / m` per row) times the `n`
/// rows of `v`, which start `v_stride ≥ cols` values apart (attention's weighted sum of
/// values, read in place from the cache).
pub fn add_weighted_rows<E: Element>(
    out: &mut [f32],
    p: &[f32],
    v: &[E],
    cols: usize,
    v_stride: usize,
) {
    add_weighted_rows_with(Isa::best(), out, p, v, cols, v_stride)
}

/// `x[i] ← e^(x[i] − shift)`, returning the sum of the new values (softmax's numerator and
/// denominator in one pass).
pub fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
    exp_sub_sum_with(Isa::best(), x, shift)
}

/// `gate[i] ← silu(gate[i]) · up[i]` with `silu(x) = x·σ(x)` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    gated_with(Isa::best(), Gate::Silu, gate, up)
}

/// `gate[i] ← gelu(gate[i]) · up[i]` with GELU's tanh approximation, computed in its
/// equivalent form `x·σ(2·√(2/π)·(x + 0.044715·x³))` (GeGLU).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    gated_with(Isa::best(), Gate::GeluTanh, gate, up)
}

/// The gate functions of [`silu_mul`] and [`gelu_tanh_mul`]: both are `x·σ(z(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Silu,
    GeluTanh,
}

/// `2·√(2/π)` and `2·√(2/π)·0.044715`: the GELU sigmoid argument is `x·(A + B·x²)`.
const GELU_A: f32 = 1.595_769;
const GELU_B: f32 = 0.071_354_82;

/// Rows of `len` values starting `stride` apart: how many of them `values` holds in full.
fn strided_rows(values: usize, len: usize, stride: usize) -> usize {
    if values < len {
        0
    } else {
        (values - len) / stride + 1
    }
}

/// [`dot_rows`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn dot_rows_with<E: Element>(
    isa: Isa,
    w: &[f32],
    x: &[E],
    cols: usize,
    x_stride: usize,
    out: &mut [f32],
) {
    dot_rows_at(isa, w, x, cols, x_stride, out, false)
}

fn dot_rows_at<E: Element>(
    isa: Isa,
    w: &[f32],
    x: &[E],
    cols: usize,
    x_stride: usize,
    out: &mut [f32],
    streamed: bool,
) {
    if cols == 0 {
        // Empty rows: every dot product is the empty sum.
        out.fill(0.0);
        return;
    }
    assert!(
        w.len().is_multiple_of(cols) && x_stride >= cols,
        "dot_rows: w ({}) must be whole rows of {cols}, and rows of x ({x_stride} apart) no shorter",
        w.len(),
    );
    let rows = w.len() / cols;
    let n = out.len().checked_div(rows).unwrap_or(0);
    assert!(
        out.len() == rows * n && strided_rows(x.len(), cols, x_stride) >= n,
        "dot_rows: out has {} values for {rows} rows of w, and x ({} values) must hold that \
         many rows",
        out.len(),
        x.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni && avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL and F16C (checked above); shapes are checked above.
        return unsafe { x86_512::dot_rows(w, x, cols, x_stride, n, out, streamed) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); shapes are checked above.
        return unsafe { x86::dot_rows(w, x, cols, x_stride, n, out) };
    }
    let _ = isa;
    dot_rows_scalar(w, x, cols, x_stride, out)
}

/// [`add_weighted_rows`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn add_weighted_rows_with<E: Element>(
    isa: Isa,
    out: &mut [f32],
    p: &[f32],
    v: &[E],
    cols: usize,
    v_stride: usize,
) {
    if cols == 0 || out.is_empty() || p.is_empty() {
        return;
    }
    let m = out.len() / cols;
    let n = p.len() / m;
    assert!(
        out.len() == m * cols
            && p.len() == m * n
            && v_stride >= cols
            && strided_rows(v.len(), cols, v_stride) >= n,
        "add_weighted_rows: out ({}) must be whole rows of {cols}, p ({}) one row per out row, \
         and v ({} values, rows {v_stride} apart) a row per weight",
        out.len(),
        p.len(),
        v.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx512Vnni && avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL and F16C (checked above); shapes are checked above.
        return unsafe { x86_512::add_weighted_rows(out, p, v, cols, v_stride) };
    }
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_fma() {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); shapes are checked above.
        return unsafe { x86::add_weighted_rows(out, p, v, cols, v_stride) };
    }
    let _ = isa;
    add_weighted_rows_scalar(out, p, v, cols, v_stride)
}

/// [`exp_sub_sum`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn exp_sub_sum_with(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { x86::exp_sub_sum(x, shift) };
    }
    let _ = isa;
    exp_sub_sum_scalar(x, shift)
}

fn gated_with(isa: Isa, gate_fn: Gate, gate: &mut [f32], up: &[f32]) {
    assert_eq!(
        gate.len(),
        up.len(),
        "gated activation: lengths {} and {} differ",
        gate.len(),
        up.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are equal.
        return unsafe { x86::gated(gate_fn, gate, up) };
    }
    let _ = isa;
    gated_scalar(gate_fn, gate, up)
}

/// [`dot`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "dot: lengths {} and {} differ",
        a.len(),
        b.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are equal.
        return unsafe { x86::dot(a, b) };
    }
    let _ = isa;
    dot_scalar(a, b)
}

/// [`axpy`] at a chosen level; levels this CPU lacks fall back to scalar.
pub fn axpy_with(isa: Isa, y: &mut [f32], alpha: f32, x: &[f32]) {
    assert_eq!(
        y.len(),
        x.len(),
        "axpy: lengths {} and {} differ",
        y.len(),
        x.len()
    );
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above); lengths are equal.
        return unsafe { x86::axpy(y, alpha, x) };
    }
    let _ = isa;
    axpy_scalar(y, alpha, x)
}

#[cfg(target_arch = "x86_64")]
fn avx2_fma() -> bool {
    // F16C (on every AVX2 CPU) widens f16 rows.
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    avx2_fma()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

fn dot_scalar<E: Element>(a: &[f32], b: &[E]) -> f32 {
    // Eight partial sums let the compiler keep vector lanes busy.
    let mut acc = [0.0f32; 8];
    let split = a.len() - a.len() % 8;
    for (ca, cb) in a[..split].chunks_exact(8).zip(b[..split].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l].to_f32();
        }
    }
    let tail: f32 = a[split..]
        .iter()
        .zip(&b[split..])
        .map(|(x, y)| x * y.to_f32())
        .sum();
    acc.iter().sum::<f32>() + tail
}

fn axpy_scalar<E: Element>(y: &mut [f32], alpha: f32, x: &[E]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv.to_f32();
    }
}

fn dot_rows_scalar<E: Element>(w: &[f32], x: &[E], cols: usize, x_stride: usize, out: &mut [f32]) {
    if out.is_empty() {
        return;
    }
    for (wr, out_row) in w
        .chunks_exact(cols)
        .zip(out.chunks_mut(out.len() / (w.len() / cols)))
    {
        for (t, o) in out_row.iter_mut().enumerate() {
            *o = dot_scalar(wr, &x[t * x_stride..t * x_stride + cols]);
        }
    }
}

fn add_weighted_rows_scalar<E: Element>(
    out: &mut [f32],
    p: &[f32],
    v: &[E],
    cols: usize,
    v_stride: usize,
) {
    if p.is_empty() {
        return;
    }
    let n = p.len() / (out.len() / cols);
    for (out_row, weights) in out.chunks_exact_mut(cols).zip(p.chunks_exact(n)) {
        for (j, &w) in weights.iter().enumerate() {
            axpy_scalar(out_row, w, &v[j * v_stride..j * v_stride + cols]);
        }
    }
}

fn exp_sub_sum_scalar(x: &mut [f32], shift: f32) -> f32 {
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

fn gated_scalar(gate_fn: Gate, gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let z = match gate_fn {
            Gate::Silu => x,
            Gate::GeluTanh => x * (GELU_A + GELU_B * x * x),
        };
        *g = x / (1.0 + (-z).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{gated_scalar, Element, Gate, GELU_A, GELU_B};

    /// Eight values of `E` from `p`, as `f32`.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; eight values are readable at `p`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<E: Element>(p: *const E) -> __m256 {
        if E::HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        } else {
            _mm256_loadu_ps(p.cast())
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // Four accumulators hide the FMA latency.
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * k));
                let y = _mm256_loadu_ps(pb.add(i + 8 * k));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(sum);
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    /// `e^x` lane by lane (see the module docs for the method and its range).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        // ln 2 split in two so that n·LN2_HI is exact for |n| ≤ 128.
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        const MIN: f32 = -87.336_55;
        const MAX: f32 = 88.722_83;
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(MIN)), _mm256_set1_ps(MAX));
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        // e^r ≈ 1 + r + r²·P(r), P a degree-4 fit of (e^r − 1 − r)/r² on |r| ≤ ln2/2.
        let mut p = _mm256_set1_ps(1.987_569_2e-4);
        for c in [
            1.398_2e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5e-1,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let er = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // Multiply by 2ⁿ through the exponent bits, in two halves so that each factor is a
        // normal float for every n ∈ [−126, 128] the clamp allows.
        let n = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(n);
        let n2 = _mm256_sub_epi32(n, n1);
        let y = _mm256_mul_ps(_mm256_mul_ps(er, pow2(n1)), pow2(n2));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(MIN));
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(MAX));
        let y = _mm256_andnot_ps(under, y);
        _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), over)
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `w` is whole rows of `cols`, `x` holds `n` rows of
    /// `cols` starting `xs` apart, and `out` one value per (row of `w`, row of `x`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows<E: Element>(
        w: &[f32],
        x: &[E],
        cols: usize,
        xs: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let rows = w.len() / cols;
        // Blocks of up to four weight rows by as many tokens as keep the accumulators, the
        // rows and one token vector within the sixteen registers: attention's query groups
        // of three and four heads then load and widen each key once, and each loaded vector
        // feeds several multiply-adds.
        let mut r = 0;
        while r < rows {
            let rb = (rows - r).min(4);
            let per_token = match rb {
                4 => 2,
                3 => 3,
                _ => 4,
            };
            let mut t = 0;
            while t < n {
                let tb = (n - t).min(per_token);
                macro_rules! blocks {
                    ($(($r:literal, $t:literal))*) => {
                        match (rb, tb) {
                            $(($r, $t) => block::<E, $r, $t>(w, x, cols, xs, r, t, n, out),)*
                            _ => unreachable!("blocks are 4 by 2, 3 by 3 or at most 2 by 4"),
                        }
                    };
                }
                blocks! {
                    (4, 2) (4, 1)
                    (3, 3) (3, 2) (3, 1)
                    (2, 4) (2, 3) (2, 2) (2, 1)
                    (1, 4) (1, 3) (1, 2) (1, 1)
                }
                t += tb;
            }
            r += rb;
        }
    }

    /// Rows `r..r + R` of `w` dotted with tokens `t..t + T` of `x`. The accumulators are
    /// summed four at a time by [`hsum4`], which adds each one's lanes in the same order
    /// whatever shares the call, so a product does not depend on its block.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the rows and tokens exist (see [`dot_rows`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<E: Element, const R: usize, const T: usize>(
        w: &[f32],
        x: &[E],
        cols: usize,
        xs: usize,
        r: usize,
        t: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let pw = w.as_ptr().add(r * cols);
        let px = x.as_ptr().add(t * xs);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut k = 0;
        while k + 8 <= cols {
            let mut wv = [_mm256_setzero_ps(); R];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(pw.add(i * cols + k));
            }
            for j in 0..T {
                let xv = load8(px.add(j * xs + k));
                for (acc_row, &wr) in acc.iter_mut().zip(&wv) {
                    acc_row[j] = _mm256_fmadd_ps(wr, xv, acc_row[j]);
                }
            }
            k += 8;
        }
        let flat: [[__m256; T]; R] = acc;
        let mut sums = [0f32; 16];
        for (q, four) in flat.as_flattened().chunks(4).enumerate() {
            let v = core::array::from_fn(|i| four.get(i).copied().unwrap_or(_mm256_setzero_ps()));
            _mm_storeu_ps(sums.as_mut_ptr().add(4 * q), hsum4(v));
        }
        for i in 0..R {
            for j in 0..T {
                let mut total = sums[i * T + j];
                for kk in k..cols {
                    total += *pw.add(i * cols + kk) * (*px.add(j * xs + kk)).to_f32();
                }
                out[(r + i) * n + t + j] = total;
            }
        }
    }

    /// The lane sums of four vectors, in that order: each vector's as
    /// `((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))`.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum4(v: [__m256; 4]) -> __m128 {
        let pairs = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        _mm_add_ps(
            _mm256_castps256_ps128(pairs),
            _mm256_extractf128_ps(pairs, 1),
        )
    }

    /// `2^k` for integer lanes `k ∈ [−126, 127]`.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn pow2(k: __m256i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            k,
            _mm256_set1_epi32(127),
        )))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sub_sum(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
            _mm256_storeu_ps(p.add(i), e);
            acc = _mm256_add_ps(acc, e);
            i += 8;
        }
        let mut total = hsum(acc);
        while i < n {
            let e = (*p.add(i) - shift).exp();
            *p.add(i) = e;
            total += e;
            i += 1;
        }
        total
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `gate.len() == up.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gated(gate_fn: Gate, gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
        let (a, b) = (_mm256_set1_ps(GELU_A), _mm256_set1_ps(GELU_B));
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_loadu_ps(pg.add(i));
            let z = match gate_fn {
                Gate::Silu => x,
                Gate::GeluTanh => _mm256_mul_ps(x, _mm256_fmadd_ps(b, _mm256_mul_ps(x, x), a)),
            };
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), z));
            let g = _mm256_div_ps(x, _mm256_add_ps(one, e));
            _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(g, _mm256_loadu_ps(pu.add(i))));
            i += 8;
        }
        gated_scalar(gate_fn, &mut gate[i..], &up[i..]);
    }

    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `y.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len();
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `out` is whole rows of `cols`, `p` holds `n` weights
    /// per out row and `v` `n` rows of `cols` starting `vs` apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn add_weighted_rows<E: Element>(
        out: &mut [f32],
        p: &[f32],
        v: &[E],
        cols: usize,
        vs: usize,
    ) {
        let m = out.len() / cols;
        let n = p.len() / m;
        let (po, pp, pv) = (out.as_mut_ptr(), p.as_ptr(), v.as_ptr());
        // A strip of up to four output rows and 24 columns (16 when there are four rows or more) stays in
        // registers across all n value rows: each value vector is loaded and widened once for
        // all the rows (attention's query group), each output value is loaded and stored
        // once, and eight or more independent accumulators hide the multiply-add latency.
        let widest = if m >= 4 { 2 } else { 3 };
        let mut c = 0;
        while c + 8 <= cols {
            let width = widest.min((cols - c) / 8);
            let mut r = 0;
            while r < m {
                let rb = (m - r).min(4);
                macro_rules! strips {
                    ($(($r:literal, $v:literal))*) => {
                        match (rb, width) {
                            $(($r, $v) => strip::<E, $r, $v>(po, pp, pv, cols, vs, n, r, c),)*
                            _ => unreachable!("at most four rows and three vectors per strip"),
                        }
                    };
                }
                strips! {
                    (4, 2) (4, 1)
                    (3, 3) (3, 2) (3, 1)
                    (2, 3) (2, 2) (2, 1)
                    (1, 3) (1, 2) (1, 1)
                }
                r += rb;
            }
            c += 8 * width;
        }
        for cc in c..cols {
            for r in 0..m {
                let mut total = *po.add(r * cols + cc);
                for j in 0..n {
                    total += *pp.add(r * n + j) * (*pv.add(j * vs + cc)).to_f32();
                }
                *po.add(r * cols + cc) = total;
            }
        }
    }

    /// Output rows `r..r + R`, columns `c..c + 8V`, of [`add_weighted_rows`]: every value
    /// gets its multiply-adds in the order of the value rows, as in every other strip.
    ///
    /// # Safety
    /// As [`add_weighted_rows`], with `c + 8V <= cols` and `r + R <= m`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn strip<E: Element, const R: usize, const V: usize>(
        po: *mut f32,
        pp: *const f32,
        pv: *const E,
        cols: usize,
        vs: usize,
        n: usize,
        r: usize,
        c: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for (i, row) in acc.iter_mut().enumerate() {
            for (k, a) in row.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(po.add((r + i) * cols + c + 8 * k));
            }
        }
        for j in 0..n {
            let values = pv.add(j * vs + c);
            let values: [__m256; V] = core::array::from_fn(|k| load8(values.add(8 * k)));
            for (i, row) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*pp.add((r + i) * n + j));
                for (a, &x) in row.iter_mut().zip(&values) {
                    *a = _mm256_fmadd_ps(w, x, *a);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (k, a) in row.iter().enumerate() {
                _mm256_storeu_ps(po.add((r + i) * cols + c + 8 * k), *a);
            }
        }
    }
}

/// AVX-512 variants.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use core::arch::x86_64::*;

    use super::Element;
    use crate::dot::prefetch;

    /// The values of `E` at `p` that `keep` selects, as `f32` (zero elsewhere).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; the selected values are readable.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load16<E: Element>(keep: __mmask16, p: *const E) -> __m512 {
        if E::HALF {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, p.cast()))
        } else {
            _mm512_maskz_loadu_ps(keep, p.cast())
        }
    }

    /// [`super::x86::dot_rows`] in 512-bit vectors: blocks of up to four rows of `w` by four
    /// rows of `x`, sixteen accumulators each fed by a multiply-add per loaded vector pair.
    /// Every product sums its 16-lane partials the same way whatever block it is in.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; `w` is whole rows of `cols`, `x` holds `n` rows of
    /// `cols` starting `xs` apart, and `out` one value per (row of `w`, row of `x`).
    /// With `streamed`, each block first prefetches the rows of `x` two blocks ahead.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn dot_rows<E: Element>(
        w: &[f32],
        x: &[E],
        cols: usize,
        xs: usize,
        n: usize,
        out: &mut [f32],
        streamed: bool,
    ) {
        let rows = w.len() / cols;
        let mut r = 0;
        while r < rows {
            let rb = (rows - r).min(4);
            let mut t = 0;
            while t < n {
                let tb = (n - t).min(4);
                if streamed && r == 0 {
                    for j in t + 8..t + 8 + tb {
                        let bytes = cols * size_of::<E>();
                        prefetch(x.as_ptr().wrapping_add(j * xs).cast(), bytes);
                    }
                }
                macro_rules! blocks {
                    ($(($r:literal, $t:literal))*) => {
                        match (rb, tb) {
                            $(($r, $t) => block::<E, $r, $t>(w, x, cols, xs, r, t, n, out),)*
                            _ => unreachable!("blocks are at most 4 by 4"),
                        }
                    };
                }
                blocks! {
                    (4, 4) (4, 3) (4, 2) (4, 1)
                    (3, 4) (3, 3) (3, 2) (3, 1)
                    (2, 4) (2, 3) (2, 2) (2, 1)
                    (1, 4) (1, 3) (1, 2) (1, 1)
                }
                t += tb;
            }
            r += rb;
        }
    }

    /// Rows `r..r + R` of `w` dotted with tokens `t..t + T` of `x`; the last `cols % 16`
    /// columns enter through a masked load, so no scalar tail.
    ///
    /// # Safety
    /// As [`dot_rows`]; the rows and tokens exist.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<E: Element, const R: usize, const T: usize>(
        w: &[f32],
        x: &[E],
        cols: usize,
        xs: usize,
        r: usize,
        t: usize,
        n: usize,
        out: &mut [f32],
    ) {
        let pw = w.as_ptr().add(r * cols);
        let px = x.as_ptr().add(t * xs);
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut k = 0;
        while k < cols {
            let keep: __mmask16 = if cols - k >= 16 {
                0xFFFF
            } else {
                (1u16 << (cols - k)) - 1
            };
            let mut wv = [_mm512_setzero_ps(); R];
            for (i, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(keep, pw.add(i * cols + k));
            }
            for j in 0..T {
                let xv = load16(keep, px.add(j * xs + k));
                for (acc_row, &wr) in acc.iter_mut().zip(&wv) {
                    acc_row[j] = _mm512_fmadd_ps(wr, xv, acc_row[j]);
                }
            }
            k += 16;
        }
        for (i, acc_row) in acc.iter().enumerate() {
            for (j, &a) in acc_row.iter().enumerate() {
                out[(r + i) * n + t + j] = _mm512_reduce_add_ps(a);
            }
        }
    }

    /// [`super::x86::add_weighted_rows`] in 512-bit vectors: a 64-column strip of an output
    /// row stays in four registers across all value rows; the last `cols % 64` columns go
    /// by masked 16-lane vectors. Each output value gets the same fused multiply-adds in the
    /// same order as in the AVX2 version, so the two agree bit for bit (where `cols` is a
    /// multiple of 8: the AVX2 tail multiplies and adds apart).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; `out` is `m` rows of `cols`, `p` `m` rows of `n`
    /// weights, and `v` holds `n` rows of `cols` starting `vs` apart.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn add_weighted_rows<E: Element>(
        out: &mut [f32],
        p: &[f32],
        v: &[E],
        cols: usize,
        vs: usize,
    ) {
        let m = out.len() / cols;
        let n = p.len() / m;
        let (po, pp, pv) = (out.as_mut_ptr(), p.as_ptr(), v.as_ptr());
        let mut c = 0;
        while c + 64 <= cols {
            for r in 0..m {
                let o = po.add(r * cols + c);
                let mut acc = [0, 1, 2, 3].map(|i| _mm512_loadu_ps(o.add(16 * i)));
                for j in 0..n {
                    if r == 0 {
                        // Value rows stream from the cache once: fetch a few ahead.
                        prefetch(
                            pv.wrapping_add((j + 8) * vs + c).cast(),
                            64 * size_of::<E>(),
                        );
                    }
                    let w = _mm512_set1_ps(*pp.add(r * n + j));
                    let row = pv.add(j * vs + c);
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, load16(0xFFFF, row.add(16 * i)), *a);
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(o.add(16 * i), *a);
                }
            }
            c += 64;
        }
        while c < cols {
            let keep: __mmask16 = if cols - c >= 16 {
                0xFFFF
            } else {
                (1u16 << (cols - c)) - 1
            };
            for r in 0..m {
                let o = po.add(r * cols + c);
                let mut acc = _mm512_maskz_loadu_ps(keep, o);
                for j in 0..n {
                    let w = _mm512_set1_ps(*pp.add(r * n + j));
                    let row = load16(keep, pv.add(j * vs + c));
                    acc = _mm512_fmadd_ps(w, row, acc);
                }
                _mm512_mask_storeu_ps(o, keep, acc);
            }
            c += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vectors(max: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>, f32)> {
        (0..max).prop_flat_map(|n| {
            (
                proptest::collection::vec(-10.0f32..10.0, n),
                proptest::collection::vec(-10.0f32..10.0, n),
                -3.0f32..3.0,
            )
        })
    }

    proptest! {
        #[test]
        fn every_level_matches_the_scalar_reference((a, b, alpha) in vectors(300)) {
            let scale: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum::<f32>() + 1.0;
            let reference = dot_scalar(&a, &b);
            let mut y_ref = b.clone();
            axpy_scalar(&mut y_ref, alpha, &a);
            for isa in Isa::available() {
                let d = dot_with(isa, &a, &b);
                prop_assert!((d - reference).abs() <= 1e-5 * scale, "{isa:?}: {d} vs {reference}");
                let mut y = b.clone();
                axpy_with(isa, &mut y, alpha, &a);
                for (u, v) in y.iter().zip(&y_ref) {
                    prop_assert!((u - v).abs() <= 1e-5 * (1.0 + v.abs()), "{isa:?}: {u} vs {v}");
                }
            }
        }
    }

    fn close(a: f32, b: f32, rel: f32) -> bool {
        a == b || (a - b).abs() <= rel * b.abs().max(f32::MIN_POSITIVE)
    }

    proptest! {
        #[test]
        fn exp_sub_sum_matches_the_scalar_reference(
            x in proptest::collection::vec(-120.0f32..120.0, 0..300),
            shift in -30.0f32..30.0,
        ) {
            let mut reference = x.clone();
            let sum_ref = exp_sub_sum_scalar(&mut reference, shift);
            for isa in Isa::available() {
                let mut y = x.clone();
                let sum = exp_sub_sum_with(isa, &mut y, shift);
                for (i, (u, v)) in y.iter().zip(&reference).enumerate() {
                    // e^x of tiny results may be subnormal in std and flushed to 0 here.
                    prop_assert!(close(*u, *v, 4e-7) || (v.abs() < 1e-37 && u.abs() < 1e-37),
                        "{isa:?} at {i}: exp({}) = {u}, std gives {v}", x[i] - shift);
                }
                prop_assert!(close(sum, sum_ref, 1e-5), "{isa:?}: sum {sum} vs {sum_ref}");
            }
        }

        #[test]
        fn gated_activations_match_the_scalar_reference(
            (gate, up) in (0usize..300).prop_flat_map(|n| (
                proptest::collection::vec(-40.0f32..40.0, n),
                proptest::collection::vec(-5.0f32..5.0, n),
            )),
        ) {
            for gate_fn in [Gate::Silu, Gate::GeluTanh] {
                let mut reference = gate.clone();
                gated_scalar(gate_fn, &mut reference, &up);
                for isa in Isa::available() {
                    let mut g = gate.clone();
                    gated_with(isa, gate_fn, &mut g, &up);
                    for (i, (u, v)) in g.iter().zip(&reference).enumerate() {
                        prop_assert!((u - v).abs() <= 1e-6 * (1.0 + v.abs()),
                            "{isa:?} {gate_fn:?} at {i}: {u} vs {v}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn dot_rows_matches_the_scalar_reference(
            (rows, n, cols, pad, seed) in (0usize..7, 0usize..11, 1usize..70, 0usize..5, any::<u64>()),
        ) {
            let mut next = uniform(seed);
            let x_stride = cols + pad;
            let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let x = strided_data(&mut next, n, x_stride, pad);
            let mut reference = vec![0.0; rows * n];
            dot_rows_scalar(&w, &x, cols, x_stride, &mut reference);
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; rows * n];
                dot_rows_with(isa, &w, &x, cols, x_stride, &mut out);
                for (i, (u, v)) in out.iter().zip(&reference).enumerate() {
                    prop_assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()) + 1e-3, "{isa:?} at {i}: {u} vs {v}");
                }
                let mut streamed = vec![f32::NAN; rows * n];
                dot_rows_at(isa, &w, &x, cols, x_stride, &mut streamed, true);
                prop_assert_eq!(&streamed, &out, "{:?} streamed", isa);
                // Rows of f16 give what the same rows widened to f32 give, bit for bit.
                let (x16, widened) = halves(&x);
                let (mut from_half, mut from_widened) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
                dot_rows_at(isa, &w, &x16, cols, x_stride, &mut from_half, true);
                dot_rows_with(isa, &w, &widened, cols, x_stride, &mut from_widened);
                prop_assert_eq!(bits(&from_half), bits(&from_widened), "{:?} f16", isa);
                // A row's products do not depend on the rows beside it (attention tiles rely
                // on it).
                for r in 0..rows {
                    let mut alone = vec![f32::NAN; n];
                    dot_rows_with(isa, &w[r * cols..(r + 1) * cols], &x, cols, x_stride, &mut alone);
                    prop_assert_eq!(&alone[..], &out[r * n..(r + 1) * n], "{:?} row {}", isa, r);
                }
            }
        }

        #[test]
        fn add_weighted_rows_matches_the_scalar_reference(
            (m, n, cols, pad, seed) in (1usize..5, 0usize..11, 1usize..110, 0usize..5, any::<u64>()),
        ) {
            let mut next = uniform(seed);
            let v_stride = cols + pad;
            let start: Vec<f32> = (0..m * cols).map(|_| next()).collect();
            let p: Vec<f32> = (0..m * n).map(|_| next()).collect();
            let v = strided_data(&mut next, n, v_stride, pad);
            let mut reference = start.clone();
            add_weighted_rows_scalar(&mut reference, &p, &v, cols, v_stride);
            for isa in Isa::available() {
                let mut out = start.clone();
                add_weighted_rows_with(isa, &mut out, &p, &v, cols, v_stride);
                for (i, (u, w)) in out.iter().zip(&reference).enumerate() {
                    prop_assert!((u - w).abs() <= 1e-4 * (1.0 + w.abs()) + 1e-3, "{isa:?} at {i}: {u} vs {w}");
                }
                if isa > Isa::Scalar && cols % 8 == 0 {
                    // The vector levels do each value's multiply-adds in the same order (the
                    // AVX2 one multiplies and adds apart in its last cols % 8 columns).
                    let mut avx2 = start.clone();
                    add_weighted_rows_with(Isa::Avx2, &mut avx2, &p, &v, cols, v_stride);
                    prop_assert_eq!(&out, &avx2, "{:?} vs AVX2", isa);
                }
                // Rows of f16 give what the same rows widened to f32 give, bit for bit.
                let (v16, widened) = halves(&v);
                let (mut from_half, mut from_widened) = (start.clone(), start.clone());
                add_weighted_rows_with(isa, &mut from_half, &p, &v16, cols, v_stride);
                add_weighted_rows_with(isa, &mut from_widened, &p, &widened, cols, v_stride);
                prop_assert_eq!(bits(&from_half), bits(&from_widened), "{:?} f16", isa);
                // A row's result does not depend on the rows beside it (attention tiles rely
                // on it).
                for r in 0..m {
                    let mut alone = start[r * cols..(r + 1) * cols].to_vec();
                    add_weighted_rows_with(isa, &mut alone, &p[r * n..(r + 1) * n], &v, cols, v_stride);
                    prop_assert_eq!(&alone[..], &out[r * cols..(r + 1) * cols], "{:?} row {}", isa, r);
                }
            }
        }
    }

    /// `x` rounded to `f16`, and those values widened back to `f32`.
    fn halves(x: &[f32]) -> (Vec<f16>, Vec<f32>) {
        let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let widened = x16.iter().map(|h| h.to_f32()).collect();
        (x16, widened)
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// `n` rows `stride` apart whose last row ends right after its `stride − pad` values.
    fn strided_data(
        next: &mut impl FnMut() -> f32,
        n: usize,
        stride: usize,
        pad: usize,
    ) -> Vec<f32> {
        (0..(n * stride).saturating_sub(pad))
            .map(|_| next())
            .collect()
    }

    /// Uniform values in [-10, 10] from a xorshift seeded by `seed`.
    fn uniform(seed: u64) -> impl FnMut() -> f32 {
        let mut state = seed | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2001) as f32 / 100.0 - 10.0
        }
    }

    #[test]
    fn exp_limits_are_zero_one_and_infinity() {
        for isa in Isa::available() {
            let mut x = [
                f32::NEG_INFINITY,
                -200.0,
                0.0,
                200.0,
                f32::INFINITY,
                1.0,
                -1.0,
                10.0,
            ];
            let sum = exp_sub_sum_with(isa, &mut x, 0.0);
            assert_eq!(
                &x[..5],
                &[0.0, 0.0, 1.0, f32::INFINITY, f32::INFINITY],
                "{isa:?}"
            );
            assert!(
                close(x[5], std::f32::consts::E, 2e-7),
                "{isa:?}: e = {}",
                x[5]
            );
            assert_eq!(sum, f32::INFINITY);
        }
    }

    #[test]
    fn gelu_tanh_form_equals_the_textbook_formula() {
        for i in -800..800 {
            let x = i as f32 / 100.0;
            let textbook = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            let mut g = [x];
            gated_scalar(Gate::GeluTanh, &mut g, &[1.0]);
            assert!(
                (g[0] - textbook).abs() <= 1e-6 * (1.0 + x.abs()),
                "x = {x}: {} vs {textbook}",
                g[0]
            );
        }
    }

    #[test]
    fn dot_handles_every_tail_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let exact: f32 = a.iter().map(|v| v * v).sum();
            assert_eq!(dot(&a, &a), exact, "n = {n}");
        }
    }
}
