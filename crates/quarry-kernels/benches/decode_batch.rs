//! Decode products of a batch of sequences: `matmul_quantized` on 8-bit activations, every
//! token on the integer path, through the kernel thread pool and on a [`Matrix`] as a model
//! holds it (repacked into panels where this CPU's kernel reads them). SmolLM2's shapes:
//! the Q4_1 MLP (1536 × 576, 576 × 1536) and an 8192-row slice of the Q8_0 output head.
//! Throughput is multiply-adds per second (rows × cols × tokens), so batch sizes compare
//! directly: a kernel that reads each weight once for the whole batch gains with each token.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quarry_kernels::{matmul_quantized, GgmlType, Matrix, QuantizedActivations, WeightView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPES: [(GgmlType, usize, usize); 3] = [
    (GgmlType::Q4_1, 1536, 576),
    (GgmlType::Q4_1, 576, 1536),
    (GgmlType::Q8_0, 8192, 576),
];

/// Random codes with a small finite f16 scale (and minimum) in every block.
fn weights(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let size = dtype.type_size();
    let mut bytes = vec![0u8; rows * cols / 32 * size];
    rng.fill(&mut bytes[..]);
    let f16_fields: &[usize] = if dtype == GgmlType::Q4_1 {
        &[0, 2]
    } else {
        &[0]
    };
    for block in bytes.chunks_exact_mut(size) {
        for &at in f16_fields {
            let v = f16::from_f32(rng.gen_range(-0.01f32..0.01));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn decode_batch(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(11);
    for (dtype, rows, cols) in SHAPES {
        let bytes = weights(&mut rng, dtype, rows, cols);
        let m = Matrix::new(WeightView::new(dtype, rows, cols, &bytes).unwrap());
        let mut group = c.benchmark_group(format!("decode_{dtype}_{rows}x{cols}"));
        for n_tokens in [1, 4, 8, 16] {
            let x: Vec<f32> = (0..n_tokens * cols)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let mut y = vec![0f32; n_tokens * rows];
            group.throughput(Throughput::Elements((rows * cols * n_tokens) as u64));
            group.bench_function(BenchmarkId::from_parameter(n_tokens), |b| {
                b.iter(|| {
                    let x =
                        QuantizedActivations::new(&x, n_tokens, cols).with_integer_tokens(n_tokens);
                    matmul_quantized(&m, &x, &mut y)
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, decode_batch);
criterion_main!(benches);
