//! The two in-place kernels of a decode step's attention, single-threaded, on one KV head's
//! key block as the cache holds it (`f16` rows of `head_dim` values, `kv_dim` apart): the
//! scores of a query group against 64 keys (`dot_rows_streamed`) and the weighted sum of 64
//! value rows (`add_weighted_rows`). Shapes: SmolLM2 (3 query heads per KV head, head_dim 64,
//! kv_dim 192) and Gemma 3 270M (4 per KV head, head_dim 256, one KV head). Throughput is
//! multiply-adds per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quarry_kernels::vec::{add_weighted_rows, dot_rows_streamed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (name, query rows, head_dim, kv_dim).
const SHAPES: [(&str, usize, usize, usize); 2] = [("smollm2", 3, 64, 192), ("gemma3", 4, 256, 256)];

const KEYS: usize = 64;

fn attention_rows(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(5);
    for (name, rows, hd, kv_dim) in SHAPES {
        let cache: Vec<f16> = (0..KEYS * kv_dim)
            .map(|_| f16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect();
        let q: Vec<f32> = (0..rows * hd).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let p: Vec<f32> = (0..rows * KEYS).map(|_| rng.gen_range(0.0..1.0)).collect();
        let mut scores = vec![0f32; rows * KEYS];
        let mut out = vec![0f32; rows * hd];
        let mut group = c.benchmark_group(format!("attention_{name}"));
        group.throughput(Throughput::Elements((rows * hd * KEYS) as u64));
        group.bench_function(BenchmarkId::from_parameter("scores"), |b| {
            b.iter(|| dot_rows_streamed(&q, &cache, hd, kv_dim, &mut scores))
        });
        group.bench_function(BenchmarkId::from_parameter("weighted_values"), |b| {
            b.iter(|| add_weighted_rows(&mut out, &p, &cache, hd, kv_dim))
        });
        group.finish();
    }
}

criterion_group!(benches, attention_rows);
criterion_main!(benches);
