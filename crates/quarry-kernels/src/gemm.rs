//! A bounds-checked `f32` matrix product over strided views, for the model's attention tiles
//! (scores `Q·Kᵀ` and value sums `P·V` read keys and values in place inside the KV cache).
//!
//! `matrixmultiply::sgemm` does the arithmetic (it picks its AVX/FMA/AVX-512 kernel at run
//! time and packs both operands, so any strides are fine); this module checks that every
//! element the strides reach lies inside the borrowed slices, which is what makes the call
//! sound.

/// A read-only `rows × cols` matrix inside `data`: element `(i, j)` is
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `data`. Panics if an element lies outside `data` (the caller computed the
    /// strides, so that is a bug in the caller).
    pub fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> MatRef<'a> {
        assert!(
            fits(data.len(), rows, cols, row_stride, col_stride),
            "MatRef: {rows} × {cols} with strides ({row_stride}, {col_stride}) exceeds {} values",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A row-major `rows × cols` matrix whose rows start `row_stride` values apart.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> MatRef<'a> {
        MatRef::new(data, rows, cols, row_stride, 1)
    }

    /// The transpose, without moving data.
    pub fn t(self) -> MatRef<'a> {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// True when the largest index a `rows × cols` view with these strides reaches is `< len`.
fn fits(len: usize, rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1)
        .checked_mul(row_stride)
        .zip((cols - 1).checked_mul(col_stride))
        .and_then(|(a, b)| a.checked_add(b));
    matches!(last, Some(last) if last < len)
}

/// `C ← alpha·A·B + beta·C`, where `C` is row-major `a.rows × b.cols` inside `c` with rows
/// `c_row_stride` apart. With `beta == 0` the old contents of `C` are ignored (may be NaN).
///
/// Panics if the inner dimensions differ or `C` does not fit in `c`.
pub fn gemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: &mut [f32],
    c_row_stride: usize,
) {
    assert_eq!(
        a.cols, b.rows,
        "gemm: A is {} × {} but B is {} × {}",
        a.rows, a.cols, b.rows, b.cols
    );
    assert!(
        fits(c.len(), a.rows, b.cols, c_row_stride, 1),
        "gemm: C of {} × {} with row stride {c_row_stride} exceeds {} values",
        a.rows,
        b.cols,
        c.len()
    );
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.cols == 0 {
        // sgemm with an empty inner dimension is alpha·0 + beta·C; do it here.
        for row in c.chunks_mut(c_row_stride).take(a.rows) {
            row[..b.cols].iter_mut().for_each(|v| *v *= beta);
        }
        return;
    }
    // SAFETY: `MatRef::new` checked that every element A and B address lies inside their
    // slices, and the assert above does the same for C, which is borrowed exclusively.
    // Strides fit in isize because they address elements of existing slices.
    unsafe {
        matrixmultiply::sgemm(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr(),
            c_row_stride as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(a: &MatRef<'_>, b: &MatRef<'_>, alpha: f32, beta: f32, c: &mut [f32], ldc: usize) {
        for i in 0..a.rows {
            for j in 0..b.cols {
                let dot: f32 = (0..a.cols)
                    .map(|k| {
                        a.data[i * a.row_stride + k * a.col_stride]
                            * b.data[k * b.row_stride + j * b.col_stride]
                    })
                    .sum();
                let old = if beta == 0.0 {
                    0.0
                } else {
                    beta * c[i * ldc + j]
                };
                c[i * ldc + j] = alpha * dot + old;
            }
        }
    }

    proptest! {
        #[test]
        fn gemm_matches_the_triple_loop(
            m in 0usize..9, k in 0usize..70, n in 0usize..19,
            pad in 0usize..5, b_transposed in any::<bool>(), beta in prop_oneof![Just(0.0f32), Just(1.0), -2.0f32..2.0],
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = move || {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            };
            let a_data: Vec<f32> = (0..m * (k + pad)).map(|_| next()).collect();
            let b_data: Vec<f32> = (0..k.max(1) * (n + pad).max(1) + n * (k + pad)).map(|_| next()).collect();
            let a = MatRef::row_major(&a_data, m, k, k + pad);
            // B either row-major, or a column-major view (the transpose of K rows, as Q·Kᵀ reads it).
            let b = if b_transposed {
                MatRef::row_major(&b_data, n, k, k + pad).t()
            } else {
                MatRef::row_major(&b_data, k, n, n + pad)
            };
            let ldc = n + pad;
            let c0: Vec<f32> = (0..m * ldc).map(|_| next()).collect();
            let (mut c, mut expected) = (c0.clone(), c0);
            gemm(0.5, a, b, beta, &mut c, ldc);
            reference(&a, &b, 0.5, beta, &mut expected, ldc);
            for (i, (u, v)) in c.iter().zip(&expected).enumerate() {
                prop_assert!((u - v).abs() <= 1e-4 * (1.0 + v.abs()), "element {i}: {u} vs {v}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn views_outside_the_slice_are_refused() {
        MatRef::row_major(&[0.0; 10], 3, 4, 4);
    }
}
