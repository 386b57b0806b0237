use quarry_kernels::*;
use std::time::Instant;
#[test]
#[ignore]
fn throughput() {
    let (rows, cols) = (2048usize, 640usize);
    let mut data = vec![0u8; GgmlType::Q5_0.bytes_for((rows * cols) as u64).unwrap() as usize];
    let mut s = 1u32;
    for (i, b) in data.iter_mut().enumerate() {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        *b = if i % 22 < 2 { [0x66, 0x26][i % 22] } else { (s >> 24) as u8 };
    }
    let w = WeightView::new(GgmlType::Q5_0, rows, cols, &data).unwrap();
    for n_tokens in [1usize, 512] {
        let x: Vec<f32> = (0..n_tokens * cols).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut y = vec![0f32; n_tokens * rows];
        matmul(&w, &x, n_tokens, &mut y);
        let iters = if n_tokens == 1 { 200 } else { 2 };
        let mut dt = f64::MAX;
        for _ in 0..15 {
            let t = Instant::now();
            for _ in 0..iters { matmul(&w, &x, n_tokens, &mut y); }
            dt = dt.min(t.elapsed().as_secs_f64() / iters as f64);
        }
        let macs = (rows * cols * n_tokens) as f64;
        println!("n_tokens={n_tokens}: {:.3} ms/call, {:.2} GFLOP/s, weights {:.2} GB/s", dt * 1e3, 2.0 * macs / dt / 1e9, data.len() as f64 / dt / 1e9);
    }
}
#[test]
#[ignore]
fn raw_sgemm() {
    for (m, k, n) in [(512usize, 640usize, 2048usize), (512, 640, 102), (512, 640, 256), (64, 640, 102)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        let iters = 10;
        let t = Instant::now();
        for _ in 0..iters {
            unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), 1, k as isize, 0.0, c.as_mut_ptr(), n as isize, 1) }
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        println!("sgemm {m}x{k}x{n} B-transposed: {:.2} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
        let t = Instant::now();
        for _ in 0..iters {
            unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, 0.0, c.as_mut_ptr(), n as isize, 1) }
        }
        let dt = t.elapsed().as_secs_f64() / iters as f64;
        println!("sgemm {m}x{k}x{n} B-rowmajor: {:.2} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
    }
}
#[test]
#[ignore]
fn raw_sgemm_swapped() {
    // yT tile (n x m) = W tile (n x k) . xT (k x m)
    for (m, k, n) in [(512usize, 640usize, 102usize), (512, 640, 256), (512, 2048, 64), (512, 2048, 128)] {
        let x = vec![0.5f32; m * k];
        let w = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * 2048];
        let iters = 20;
        let t = Instant::now();
        for _ in 0..iters {
            unsafe { matrixmultiply::sgemm(m, k, n, 1.0, x.as_ptr(), k as isize, 1, w.as_ptr(), 1, k as isize, 0.0, c.as_mut_ptr(), 2048, 1) }
        }
        let dt1 = t.elapsed().as_secs_f64() / iters as f64;
        let t = Instant::now();
        for _ in 0..iters {
            unsafe { matrixmultiply::sgemm(n, k, m, 1.0, w.as_ptr(), k as isize, 1, x.as_ptr(), 1, k as isize, 0.0, c.as_mut_ptr(), 1, 2048) }
        }
        let dt2 = t.elapsed().as_secs_f64() / iters as f64;
        let f = 2.0 * (m * k * n) as f64 / 1e9;
        println!("{m}x{k}x{n}: x.Wt {:.1} GFLOP/s, W.xT {:.1} GFLOP/s", f / dt1, f / dt2);
    }
}
#[test]
#[ignore]
fn decode_speed() {
    let n = 256 * 4096;
    for t in [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q8_K] {
        let data = vec![0x11u8; t.bytes_for(n as u64).unwrap() as usize];
        let mut out = vec![0f32; n];
        let mut best = f64::MAX;
        for _ in 0..10 {
            let s = Instant::now();
            dequantize(t, &data, &mut out).unwrap();
            best = best.min(s.elapsed().as_secs_f64());
        }
        println!("{t}: {:.2} ns/value", best * 1e9 / n as f64);
    }
}
