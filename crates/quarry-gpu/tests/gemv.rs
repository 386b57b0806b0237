//! Every kernel against quarry-kernels' scalar dequantization on awkward shapes.

mod common;

use common::{max_rel_error, reference, test_gpu};
use quarry_gpu::reference::{random_activations, random_weights};
use quarry_gpu::{GemmUse, GemvConfig, GgmlType, Gpu, GpuMatrix, GpuOptions, Reduction, SUPPORTED};

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

/// `f(gpu, dtype, rows, cols, tokens, seed)` for every type, shape and token count.
fn each_shape(tokens: &[usize], mut f: impl FnMut(&Gpu, GgmlType, usize, usize, usize, u64)) {
    let Some(gpu) = test_gpu() else { return };
    for (i, &dtype) in SUPPORTED.iter().enumerate() {
        for (j, &(rows, cols)) in shapes(dtype).iter().enumerate() {
            for &t in tokens {
                f(&gpu, dtype, rows, cols, t, (i * 1000 + j * 10 + t) as u64);
            }
        }
    }
}

fn all_shapes(config: GemvConfig) {
    each_shape(&[1, 3, 8], |gpu, dtype, rows, cols, tokens, seed| {
        check(gpu, dtype, rows, cols, tokens, &config, seed)
    });
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
                    gemm: GemmUse::Never,
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
    let gemv = GemvConfig {
        gemm: GemmUse::Never,
        ..GemvConfig::default()
    };
    check(&gpu, GgmlType::Q6_K, 19, 512, 19, &gemv, 3);
    check(&gpu, GgmlType::F32, 5, 13, 17, &GemvConfig::tiled(), 4);
}

const GEMM: GemvConfig = GemvConfig {
    workgroup_size: 0,
    rows_per_workgroup: 0,
    tiled: false,
    reduction: Reduction::Auto,
    gemm: GemmUse::Always,
};

/// Whether the GEMM takes `dtype` rows of `cols` on `gpu`: whole 32-column steps (64 for the
/// K types, 128 for Q6_K, whose 32 + 32 rows of a step are 32 KiB of workgroup memory).
fn gemm_runs(gpu: &Gpu, dtype: GgmlType, cols: usize) -> bool {
    let step = match dtype {
        GgmlType::Q6_K => 128,
        GgmlType::Q4_K | GgmlType::Q5_K => 64,
        _ => 32,
    };
    cols.is_multiple_of(step)
        && 256 * step as u32 <= gpu.limits().max_compute_workgroup_storage_size
}

#[test]
fn prompt_gemm_every_type_and_shape() {
    // Within one token tile, a partial one, several (the last partial).
    each_shape(&[1, 5, 32, 70], |gpu, dtype, rows, cols, tokens, seed| {
        if gemm_runs(gpu, dtype, cols) {
            check(gpu, dtype, rows, cols, tokens, &GEMM, seed);
        } else {
            let bytes = random_weights(dtype, rows, cols, 1).unwrap();
            let m = GpuMatrix::upload(gpu, dtype, rows, cols, &bytes).unwrap();
            let err = m
                .gemv_with(&vec![0.0; tokens * cols], tokens, &GEMM)
                .unwrap_err();
            assert!(
                err.to_string().contains("GEMM"),
                "{dtype:?} {rows}x{cols}: {err}"
            );
        }
    });
}

#[test]
fn matrices_split_into_row_parts() {
    // Bindings of 4 KiB: a 300 × 256 Q8_0 matrix (272 bytes a row) is 20 parts of 15 rows.
    let Ok(gpu) = Gpu::with_options(GpuOptions {
        max_binding_bytes: Some(4096),
        ..GpuOptions::default()
    }) else {
        assert!(test_gpu().is_none(), "an adapter exists but would not open");
        return;
    };
    let dtype = GgmlType::Q8_0;
    let m = GpuMatrix::upload(
        &gpu,
        dtype,
        300,
        256,
        &random_weights(dtype, 300, 256, 5).unwrap(),
    )
    .unwrap();
    assert_eq!(m.buffers(), 20);
    for config in [GemvConfig::default(), GEMM] {
        for tokens in [1, 9, 40] {
            check(&gpu, dtype, 300, 256, tokens, &config, 5);
        }
    }
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
