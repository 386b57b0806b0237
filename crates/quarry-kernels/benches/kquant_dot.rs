//! Single-threaded decode-path matrix-vector products over K-quant weights, per type and per
//! instruction-set level: Gemma 3 270M's Q4_K attention output (640 × 1024) and Q6_K
//! feed-forward down projection (640 × 2048), a Q5_K 2048 × 2048 matrix, Q2_K and Q3_K at
//! the same size, and a Q4_K matrix larger than the last-level cache, which shows how close
//! the kernel gets to memory bandwidth. Throughput is weight bytes read per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quarry_kernels::act::QuantizedActivations;
use quarry_kernels::dot::{gemv_rows, Isa};
use quarry_kernels::{GgmlType, WeightView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (type, rows, cols) of each benchmarked matrix.
const SHAPES: [(GgmlType, usize, usize); 6] = [
    (GgmlType::Q4_K, 640, 1024),
    (GgmlType::Q6_K, 640, 2048),
    (GgmlType::Q5_K, 2048, 2048),
    (GgmlType::Q3_K, 2048, 2048),
    (GgmlType::Q2_K, 2048, 2048),
    (GgmlType::Q4_K, 8192, 8192),
];

/// Random codes and packed scales with small finite f16 scales in every super-block.
fn weights(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let size = dtype.type_size();
    let mut bytes = vec![0u8; rows * cols / 256 * size];
    rng.fill(&mut bytes[..]);
    let fields: &[usize] = match dtype {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => &[0, 2],
    };
    for block in bytes.chunks_exact_mut(size) {
        for &at in fields {
            let v = f16::from_f32(rng.gen_range(-0.01f32..0.01));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn kquant_gemv(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(42);
    for (dtype, rows, cols) in SHAPES {
        let bytes = weights(&mut rng, dtype, rows, cols);
        let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xq = QuantizedActivations::new(&x, 1, cols);
        // Quantize outside the timed loop (the form is cached after first use).
        xq.q8x256(0);
        let mut out = vec![0f32; rows];
        let mut group = c.benchmark_group(format!("gemv_{dtype}_{rows}x{cols}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        for isa in Isa::available() {
            group.bench_function(BenchmarkId::from_parameter(format!("{isa:?}")), |b| {
                b.iter(|| gemv_rows(isa, &w, 0..rows, &xq, 0, &mut out))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, kquant_gemv);
criterion_main!(benches);
