//! Single-threaded decode-path matrix-vector products over legacy 32-value block types, per
//! type and per instruction-set level, on the shapes that dominate decode: a 4096-row slice
//! of Gemma's 640-wide Q8_0 output head, a Q5_0 2048 × 640 projection and SmolLM2's Q4_1
//! 1536 × 576 MLP matrix. Throughput is weight bytes read per second.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use quarry_kernels::act::QuantizedActivations;
use quarry_kernels::dot::{gemv_rows, Isa};
use quarry_kernels::{GgmlType, WeightView};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (type, rows, cols) of each benchmarked matrix.
const SHAPES: [(GgmlType, usize, usize); 5] = [
    (GgmlType::Q8_0, 4096, 640),
    (GgmlType::Q5_0, 2048, 640),
    (GgmlType::Q4_1, 1536, 576),
    (GgmlType::Q4_0, 2048, 640),
    (GgmlType::Q5_1, 2048, 640),
];

/// Random codes with small finite scales (and minimums) in every block.
fn weights(rng: &mut StdRng, dtype: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let size = dtype.type_size();
    let mut bytes: Vec<u8> = (0..rows * cols / 32 * size).map(|_| rng.gen()).collect();
    let fields: &[usize] = match dtype {
        GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        _ => &[0],
    };
    for block in bytes.chunks_exact_mut(size) {
        for &at in fields {
            let v = f16::from_f32(rng.gen_range(-0.01f32..0.01));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn legacy_gemv(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(42);
    for (dtype, rows, cols) in SHAPES {
        let bytes = weights(&mut rng, dtype, rows, cols);
        let w = WeightView::new(dtype, rows, cols, &bytes).unwrap();
        let x: Vec<f32> = (0..cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xq = QuantizedActivations::new(&x, 1, cols);
        // Quantize outside the timed loop (the form is cached after first use).
        xq.q8x32(0);
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

criterion_group!(benches, legacy_gemv);
criterion_main!(benches);
