//! Every kernel against quarry-kernels' scalar dequantization on awkward shapes.

mod common;

use common::{max_rel_error, reference, test_gpu};
use quarry_gpu::reference::{random_activations, random_weights};
use quarry_gpu::{GemvConfig, GgmlType, Gpu, GpuMatrix, Reduction, SUPPORTED};

const TOL: f64 = 1e-4;

fn check(
    gpu: &Gpu,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    tokens: usize,
    config: &GemvConfig,
    seed: u64,
) {
    let bytes = random_weights(dtype, rows, cols, seed).unwrap();
    let x = random_activations(tokens * cols, seed);
    let m = GpuMatrix::upload(gpu, dtype, rows, cols, &bytes).unwrap();
    let y = m
        .gemv_with(&x, tokens, config)
        .unwrap_or_else(|e| panic!("{dtype:?} {rows}x{cols} T={tokens} {config:?}: {e}"));
    let (cpu, mag) = reference(dtype, rows, cols, &bytes, &x, tokens);
    let err = max_rel_error(&y, &cpu, &mag);
    assert!(
        err <= TOL,
        "{dtype:?} {rows}x{cols} T={tokens} {config:?}: max relative error {err:e}"
    );
}

fn shapes(dtype: GgmlType) -> Vec<(usize, usize)> {
    let bs = dtype.block_size();
    let mut cols: Vec<usize> = if bs == 1 {
        vec![1, 3, 8, 44, 260]
    } else {
        vec![bs, 2 * bs, 3 * bs]
    };
    cols.push(4096);
    let mut out = Vec::new();
    for &c in &cols {
        for &r in &[1usize, 7, 33, 257] {
            if c == 4096 && r > 33 {
                continue;
            }
            out.push((r, c));
        }
    }
    out
}

fn all_shapes(config: GemvConfig) {
    let Some(gpu) = test_gpu() else { return };
    for (i, &dtype) in SUPPORTED.iter().enumerate() {
        for (j, &(rows, cols)) in shapes(dtype).iter().enumerate() {
            for &tokens in &[1usize, 3, 8] {
                check(
                    &gpu,
                    dtype,
                    rows,
                    cols,
                    tokens,
                    &config,
                    (i * 1000 + j * 10 + tokens) as u64,
                );
            }
        }
    }
}

#[test]
fn plain_kernel_every_type_and_shape() {
    all_shapes(GemvConfig::default());
}

#[test]
fn shared_memory_reduction_every_type_and_shape() {
    all_shapes(GemvConfig {
        reduction: Reduction::Shared,
        ..GemvConfig::default()
    });
}

#[test]
fn tiled_kernel_every_type_and_shape() {
    all_shapes(GemvConfig::tiled());
    all_shapes(GemvConfig {
        reduction: Reduction::Shared,
        ..GemvConfig::tiled()
    });
}

#[test]
fn subgroup_reduction_when_the_adapter_has_it() {
    let Some(gpu) = test_gpu() else { return };
    let config = GemvConfig {
        reduction: Reduction::Subgroup,
        ..GemvConfig::default()
    };
    if !gpu.subgroups() {
        let m = GpuMatrix::upload(&gpu, GgmlType::F32, 1, 4, &[0; 16]).unwrap();
        assert!(m.gemv_with(&[0.0; 4], 1, &config).is_err());
        eprintln!(
            "{} has no subgroups; the Auto path is the shared one",
            gpu.adapter().name
        );
        return;
    }
    for &dtype in &SUPPORTED {
        check(&gpu, dtype, 33, 512, 3, &config, 7);
    }
}

#[test]
fn kernel_shapes_workgroups_and_rows_per_group() {
    let Some(gpu) = test_gpu() else { return };
    // (32, 8) and (64, 16) at 8 tokens: more accumulators per workgroup than invocations.
    for &(wg, rpw) in &[(32u32, 1u32), (32, 8), (128, 4), (256, 1), (64, 16)] {
        for &reduction in &[Reduction::Auto, Reduction::Shared] {
            for &tiled in &[false, true] {
                let config = GemvConfig {
                    workgroup_size: wg,
                    rows_per_workgroup: rpw,
                    tiled,
                    reduction,
                };
                for &dtype in &[GgmlType::F32, GgmlType::Q4_K, GgmlType::Q8_0] {
                    let many = wg < rpw * 8; // 8 tokens: more accumulators than invocations
                    for tokens in [2u32, 8].into_iter().filter(|&t| t == 2 || many) {
                        let shared = rpw * tokens * wg * 4 + if tiled { tokens * 1024 } else { 0 };
                        if shared > gpu.limits().max_compute_workgroup_storage_size {
                            continue; // refused with a clear error; not this test's subject
                        }
                        check(
                            &gpu,
                            dtype,
                            37,
                            768,
                            tokens as usize,
                            &config,
                            wg as u64 + rpw as u64,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn more_than_eight_tokens_split_into_passes() {
    let Some(gpu) = test_gpu() else { return };
    check(&gpu, GgmlType::Q6_K, 19, 512, 19, &GemvConfig::default(), 3);
    check(&gpu, GgmlType::F32, 5, 13, 17, &GemvConfig::tiled(), 4);
}

#[test]
fn weights_from_the_cpu_quantizer() {
    // The quantizer's own output (not crafted blocks), for the types it writes.
    let Some(gpu) = test_gpu() else { return };
    for &dtype in &[
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::F16,
    ] {
        let (rows, cols, tokens) = (21, 1024, 2);
        let w = random_activations(rows * cols, 11);
        let mut bytes = vec![0u8; rows * quarry_gpu::row_bytes(dtype, cols).unwrap()];
        quarry_kernels::quantize(dtype, &w, &mut bytes).unwrap();
        let x = random_activations(tokens * cols, 12);
        let m = GpuMatrix::upload(&gpu, dtype, rows, cols, &bytes).unwrap();
        let y = m.gemv(&x, tokens).unwrap();
        let (cpu, mag) = reference(dtype, rows, cols, &bytes, &x, tokens);
        let err = max_rel_error(&y, &cpu, &mag);
        assert!(err <= TOL, "{dtype:?}: {err:e}");
    }
}
