//! Bad input and missing capabilities come back as `GpuError`s, never panics.

mod common;

use common::{max_rel_error, reference, test_gpu};
use quarry_gpu::reference::{random_activations, random_weights};
use quarry_gpu::{GemvConfig, GgmlType, Gpu, GpuError, GpuMatrix, GpuOptions, Reduction};

#[test]
fn no_matching_adapter_is_an_error() {
    let options = GpuOptions {
        adapter_name: Some("no such adapter, surely".into()),
        ..GpuOptions::default()
    };
    match Gpu::with_options(options) {
        Err(GpuError::NoAdapter(m)) => assert!(m.contains("no such adapter"), "{m}"),
        other => panic!("expected NoAdapter, got {other:?}"),
    }
}

#[test]
fn shapes_and_types_are_checked() {
    let Some(gpu) = test_gpu() else { return };
    let shape = |r: Result<GpuMatrix, GpuError>| match r {
        Err(GpuError::Shape(m)) => m,
        other => panic!("expected a shape error, got {other:?}"),
    };
    // 34 bytes per Q8_0 block: 2 rows of 64 columns are 136 bytes.
    let m = shape(GpuMatrix::upload(&gpu, GgmlType::Q8_0, 2, 64, &[0; 135]));
    assert!(m.contains("136"), "{m}");
    let m = shape(GpuMatrix::upload(&gpu, GgmlType::Q4_K, 1, 300, &[0; 144]));
    assert!(m.contains("multiple of 256"), "{m}");
    shape(GpuMatrix::upload(&gpu, GgmlType::F32, 0, 4, &[]));
    assert!(matches!(
        GpuMatrix::upload(&gpu, GgmlType::Q2_K, 1, 256, &[0; 84]),
        Err(GpuError::UnsupportedType(GgmlType::Q2_K))
    ));

    let m = GpuMatrix::upload(&gpu, GgmlType::F32, 2, 4, &[0; 32]).unwrap();
    assert!(matches!(m.gemv(&[0.0; 7], 2), Err(GpuError::Shape(_))));
    assert_eq!(m.gemv(&[], 0).unwrap(), Vec::<f32>::new());
    let bad = GemvConfig {
        workgroup_size: 48,
        ..GemvConfig::default()
    };
    assert!(matches!(
        m.gemv_with(&[0.0; 4], 1, &bad),
        Err(GpuError::Unsupported(_))
    ));
    // 8 rows × 2 tokens need 64 bytes of y.
    let m8 = GpuMatrix::upload(&gpu, GgmlType::F32, 8, 4, &[0; 128]).unwrap();
    let too_small = gpu.output_f32("y", 4).unwrap();
    let x = gpu.upload_f32("x", &[0.0; 8]).unwrap();
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    assert!(matches!(
        m8.encode(&mut enc, &x, &too_small, 2, &GemvConfig::default()),
        Err(GpuError::Shape(_))
    ));
}

#[test]
fn buffers_over_the_adapters_limit_are_refused() {
    let Some(gpu) = test_gpu() else { return };
    let limit = gpu.limits().max_buffer_size;
    match gpu.create_buffer("huge", limit + 1, quarry_gpu::wgpu::BufferUsages::STORAGE) {
        Err(GpuError::TooLarge { bytes, .. }) => assert_eq!(bytes, limit + 1),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn a_device_without_subgroups_uses_the_shared_memory_reduction() {
    let options = GpuOptions {
        disable_subgroups: true,
        ..GpuOptions::default()
    };
    let gpu = match Gpu::with_options(options) {
        Ok(g) => g,
        Err(_) if test_gpu().is_none() => return,
        Err(e) => panic!("{e}"),
    };
    assert!(!gpu.subgroups());
    let (rows, cols, tokens) = (45, 512, 3);
    let bytes = random_weights(GgmlType::Q4_K, rows, cols, 5).unwrap();
    let x = random_activations(tokens * cols, 5);
    let m = GpuMatrix::upload(&gpu, GgmlType::Q4_K, rows, cols, &bytes).unwrap();
    let y = m.gemv(&x, tokens).unwrap();
    let (cpu, mag) = reference(GgmlType::Q4_K, rows, cols, &bytes, &x, tokens);
    assert!(max_rel_error(&y, &cpu, &mag) < 1e-4);
    let forced = GemvConfig {
        reduction: Reduction::Subgroup,
        ..GemvConfig::default()
    };
    assert!(matches!(
        m.gemv_with(&x, tokens, &forced),
        Err(GpuError::Unsupported(_))
    ));
}

#[test]
fn results_stay_on_the_device_between_products() {
    // y1 = A·x, y2 = B·y1 recorded into one encoder, read back once.
    let Some(gpu) = test_gpu() else { return };
    let (n, k, m) = (64, 96, 40);
    let a = random_weights(GgmlType::Q8_0, k, n, 1).unwrap();
    let b = random_weights(GgmlType::F16, m, k, 2).unwrap();
    let x = random_activations(n, 3);
    let ga = GpuMatrix::upload(&gpu, GgmlType::Q8_0, k, n, &a).unwrap();
    let gb = GpuMatrix::upload(&gpu, GgmlType::F16, m, k, &b).unwrap();
    let xb = gpu.upload_f32("x", &x).unwrap();
    let y1 = gpu.output_f32("y1", k).unwrap();
    let y2 = gpu.output_f32("y2", m).unwrap();
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    ga.encode(&mut enc, &xb, &y1, 1, &GemvConfig::default())
        .unwrap();
    gb.encode(&mut enc, &y1, &y2, 1, &GemvConfig::default())
        .unwrap();
    gpu.submit_and_wait(enc.finish()).unwrap();
    let got = gpu.read_f32(&y2, m).unwrap();

    let (h, _) = reference(GgmlType::Q8_0, k, n, &a, &x, 1);
    let h: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    let (want, mag) = reference(GgmlType::F16, m, k, &b, &h, 1);
    assert!(max_rel_error(&got, &want, &mag) < 1e-4);
}
