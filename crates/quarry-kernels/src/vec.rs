//! `f32` vector primitives for the model's own loops (attention scores and value sums).
//!
//! The workspace compiles for baseline x86-64 (SSE2), so these get an AVX2+FMA variant chosen
//! at run time through [`Isa::best`]; the scalar versions are the reference they are tested
//! against.

use crate::dot::Isa;

/// Σ a[i]·b[i] over equal-length slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(Isa::best(), a, b)
}

/// `y[i] += alpha · x[i]` over equal-length slices.
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    axpy_with(Isa::best(), y, alpha, x)
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
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler keep vector lanes busy.
    let mut acc = [0.0f32; 8];
    let split = a.len() - a.len() % 8;
    for (ca, cb) in a[..split].chunks_exact(8).zip(b[..split].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn axpy_scalar(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

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
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let mut total = _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)));
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
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

    #[test]
    fn dot_handles_every_tail_length() {
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let exact: f32 = a.iter().map(|v| v * v).sum();
            assert_eq!(dot(&a, &a), exact, "n = {n}");
        }
    }
}
