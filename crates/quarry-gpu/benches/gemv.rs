//! GB/s of weight bytes read per GEMV kernel, per type, at decode shapes (4096×4096 and
//! 2048×8192; 1024×1024 and 512×2048 on a software adapter), one token and eight.
//! Each sample records its iterations as dispatches in one pass, so submission costs little.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quarry_gpu::reference::{random_activations, random_weights};
use quarry_gpu::{DeviceKind, GemvConfig, Gpu, GpuMatrix, SUPPORTED};

fn gemv(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU benchmarks: {e}");
            return;
        }
    };
    eprintln!("adapter: {}", gpu.adapter());
    let software = gpu.adapter().kind == DeviceKind::Cpu;
    let shapes: &[(usize, usize)] = if software {
        &[(1024, 1024), (512, 2048)]
    } else {
        &[(4096, 4096), (2048, 8192)]
    };
    let mut group = c.benchmark_group("gpu_gemv");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(if software { 2 } else { 1 }));
    for &dtype in &SUPPORTED {
        for &(rows, cols) in shapes {
            let bytes = random_weights(dtype, rows, cols, 1).unwrap();
            let m = GpuMatrix::upload(&gpu, dtype, rows, cols, &bytes).unwrap();
            for tokens in [1usize, 8] {
                let x = gpu
                    .upload_f32("x", &random_activations(tokens * cols, 2))
                    .unwrap();
                let y = gpu.output_f32("y", tokens * rows).unwrap();
                let prepared = m.prepare(&x, &y, tokens, &GemvConfig::default()).unwrap();
                group.throughput(Throughput::Bytes(m.weight_bytes() as u64));
                let id = BenchmarkId::new(format!("{dtype:?}/T{tokens}"), format!("{rows}x{cols}"));
                group.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut enc = gpu.device().create_command_encoder(&Default::default());
                        {
                            let mut pass = enc.begin_compute_pass(&Default::default());
                            for _ in 0..iters {
                                prepared.record(&mut pass);
                            }
                        }
                        let cmd = enc.finish();
                        let start = Instant::now();
                        gpu.submit_and_wait(cmd).unwrap();
                        start.elapsed()
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, gemv);
criterion_main!(benches);
