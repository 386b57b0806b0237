//! Single-threaded decode-path matrix-vector products of the K-quants, per instruction-set
//! level, in the file's layout (the 32-value types' kernels read repacked panels: see the
//! `decode_batch` bench): Gemma 3 270M's Q4_K attention output (640 × 1024) and Q6_K down
//! projection (640 × 2048), the other K-quants at 2048 × 2048, and a Q4_K matrix larger than
//! the last-level cache, which shows how close the kernels get to memory bandwidth.
//! Throughput is weight bytes read per second.

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

/// Byte offsets of a block's f16 scale (and minimum) fields.
fn f16_fields(dtype: GgmlType) -> &'static [usize] {
    match dtype {
        GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        other => panic!("no scale offsets for {other}"),
    }
}

/// Random codes with small finite f16 scales (and minimums) in every block.
fn weights(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let size = dtype.type_size();
    let mut bytes = vec![0u8; rows * cols / dtype.block_size() * size];
    rng.fill(&mut bytes[..]);
    for block in bytes.chunks_exact_mut(size) {
        for &at in f16_fields(dtype) {
            let v = f16::from_f32(rng.gen_range(-0.01f32..0.01));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn gemv(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(42);
    for (dtype, rows, cols) in SHAPES {
        let bytes = weights(&mut rng, dtype, rows, cols);
        let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xq = QuantizedActivations::new(&x, 1, cols);
        let mut out = vec![0f32; rows];
        // The first call quantizes the activations (cached afterwards): keep it out of timing.
        gemv_rows(Isa::Scalar, &w, 0..rows, &xq, 0, &mut out);
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

criterion_group!(benches, gemv);
criterion_main!(benches);
