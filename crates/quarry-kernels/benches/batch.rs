//! Batched products with `f32` activations (prompt processing), through the public
//! [`matmul`] on the kernel thread pool: the small-batch path (8 and 48 tokens: rows decoded
//! in groups and dotted with every token) and the tiled GEMM path (49 and 512 tokens), on
//! Gemma 3 270M's Q5_0 gate/up shape and Q6_K down projection and SmolLM2's Q4_1 MLP shape.
//! Throughput is multiply-adds per second (rows × cols × tokens), so paths compare directly.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quarry_kernels::{matmul, GgmlType, WeightView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPES: [(GgmlType, usize, usize); 3] = [
    (GgmlType::Q5_0, 2048, 640),
    (GgmlType::Q6_K, 640, 2048),
    (GgmlType::Q4_1, 1536, 576),
];

/// Random codes with a small finite f16 scale where each of these types keeps one.
fn weights(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let size = dtype.type_size();
    let mut bytes = vec![0u8; rows * cols / dtype.block_size() * size];
    rng.fill(&mut bytes[..]);
    let scale_at = if dtype == GgmlType::Q6_K { 208 } else { 0 };
    for block in bytes.chunks_exact_mut(size) {
        let v = f16::from_f32(rng.gen_range(-0.01f32..0.01));
        block[scale_at..scale_at + 2].copy_from_slice(&v.to_le_bytes());
    }
    bytes
}

fn batch(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    for (dtype, rows, cols) in SHAPES {
        let bytes = weights(&mut rng, dtype, rows, cols);
        let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
        let mut group = c.benchmark_group(format!("matmul_{dtype}_{rows}x{cols}"));
        for n_tokens in [8, 48, 49, 512] {
            let x: Vec<f32> = (0..n_tokens * cols)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let mut y = vec![0f32; n_tokens * rows];
            group.throughput(Throughput::Elements((rows * cols * n_tokens) as u64));
            group.bench_function(BenchmarkId::from_parameter(n_tokens), |b| {
                b.iter(|| matmul(&w, &x, n_tokens, &mut y))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, batch);
criterion_main!(benches);
