//! GEMV bandwidth on the best adapter (a discrete GPU if there is one): one line per weight
//! type, shape and token count with the time per call, the weight bytes read per second and
//! the largest error against the CPU reference (quarry-kernels' scalar dequantization).
//!
//! ```sh
//! cargo build --release -p quarry-gpu --example gemv_bandwidth
//! target/release/examples/gemv_bandwidth            # decode shapes, < 60 s on a real GPU
//! target/release/examples/gemv_bandwidth --quick    # small shapes, for lavapipe
//! target/release/examples/gemv_bandwidth --sweep    # also workgroup shapes, Q4_K/Q8_0/F16
//! target/release/examples/gemv_bandwidth --prompt   # also GEMV against GEMM at 16..256 tokens
//! ```
//!
//! Needs at run time only the Vulkan loader (`libvulkan.so.1`) and a driver's ICD (or Metal /
//! DX12). Time per call: many dispatches recorded into one pass over copies of the matrix
//! whose total exceeds any GPU's last-level cache (so weights come from memory, not L2),
//! submitted and waited for; the median of several such submissions, divided by the count.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use quarry_gpu::reference::{random_activations, random_weights};
use quarry_gpu::{DeviceKind, GemmUse, GemvConfig, GgmlType, Gpu, GpuMatrix, Reduction, SUPPORTED};

struct Opts {
    quick: bool,
    sweep: bool,
    prompt: bool,
    types: Vec<GgmlType>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        sweep: false,
        prompt: false,
        types: SUPPORTED.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--sweep" => o.sweep = true,
            "--prompt" => o.prompt = true,
            "--types" => {
                let list = args.next().ok_or("--types needs a list, e.g. q4_k,q8_0")?;
                o.types = list
                    .split(',')
                    .map(|s| {
                        SUPPORTED
                            .iter()
                            .copied()
                            .find(|t| format!("{t:?}").eq_ignore_ascii_case(s))
                            .ok_or(format!("unknown type {s}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => {
                println!("gemv_bandwidth [--quick] [--sweep] [--prompt] [--types f32,q4_k,...]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    Ok(o)
}

struct Measured {
    ms: f64,
    gbs: f64,
    err: f64,
}

/// One weight matrix's bytes and its copies on the device.
/// With the CPU reference per token count: x, the products and their magnitudes.
type Uploaded = Option<(GgmlType, usize, usize, Vec<u8>, Vec<GpuMatrix>, References)>;
type References = std::collections::HashMap<usize, (Vec<f32>, Vec<f64>, Vec<f64>)>;

fn measure(
    gpu: &Gpu,
    (dtype, rows, cols, tokens): (GgmlType, usize, usize, usize),
    config: &GemvConfig,
    quick: bool,
    cache: &mut Uploaded,
) -> Result<Measured, quarry_gpu::GpuError> {
    // Weights and their copies are kept across token counts and configs of one shape.
    let fresh =
        !matches!(cache, Some((t, r, c, _, _, _)) if *t == dtype && *r == rows && *c == cols);
    if fresh {
        *cache = None; // free the previous copies first
        let bytes = random_weights(dtype, rows, cols, 42)?;
        let one = bytes.len();
        // Enough copies that one round reads ≥ 512 MiB (a GPU cache holds ≤ ~256 MiB).
        let copies = if quick {
            1
        } else {
            (512usize << 20).div_ceil(one).clamp(1, 64)
        };
        let mats = (0..copies)
            .map(|_| GpuMatrix::upload(gpu, dtype, rows, cols, &bytes))
            .collect::<Result<Vec<_>, _>>()?;
        *cache = Some((dtype, rows, cols, bytes, mats, Default::default()));
    }
    let (_, _, _, bytes, mats, refs) = cache.as_mut().expect("filled above");
    // The error is checked on the first 8 tokens (the tests check every one): the f64
    // reference of a long prompt at a decode shape would take minutes.
    let checked = tokens.min(8);
    let (x, cpu, mag) = refs.entry(tokens).or_insert_with(|| {
        let x = random_activations(tokens * cols, 7);
        let (cpu, mag) = common::reference(dtype, rows, cols, bytes, &x[..checked * cols], checked);
        (x, cpu, mag)
    });
    let y = mats[0].gemv_with(x, tokens, config)?;
    let err = common::max_rel_error(&y[..checked * rows], cpu, mag);

    let xb = gpu.upload_f32("x", x)?;
    let yb = gpu.output_f32("y", tokens * rows)?;
    let prepared = mats
        .iter()
        .map(|m| m.prepare(&xb, &yb, tokens, config))
        .collect::<Result<Vec<_>, _>>()?;
    let per_submit = if quick { 4 } else { (2 * mats.len()).max(64) };
    let run = |n: usize| -> Result<Duration, quarry_gpu::GpuError> {
        let mut enc = gpu
            .device()
            .create_command_encoder(&quarry_gpu::wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = enc.begin_compute_pass(&quarry_gpu::wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            for i in 0..n {
                prepared[i % prepared.len()].record(&mut pass);
            }
        }
        let cmd = enc.finish();
        let start = Instant::now();
        gpu.submit_and_wait(cmd)?;
        Ok(start.elapsed())
    };
    // Warm-up: pipelines, caches, and the GPU's clocks, which drop while the CPU computes the
    // reference and rise only after some 100 ms of steady work.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(if quick { 20 } else { 300 }) {
        run(per_submit)?;
    }
    let reps = if quick { 3 } else { 7 };
    let mut times = (0..reps)
        .map(|_| run(per_submit).map(|d| d.as_secs_f64() / per_submit as f64))
        .collect::<Result<Vec<_>, _>>()?;
    times.sort_by(f64::total_cmp);
    let per_call = times[times.len() / 2];
    Ok(Measured {
        ms: per_call * 1e3,
        gbs: mats[0].weight_bytes() as f64 / per_call / 1e9,
        err,
    })
}

fn main() {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let a = gpu.adapter();
    println!("adapter: {a}");
    if a.kind == DeviceKind::Cpu && !opts.quick {
        eprintln!("note: a software adapter; --quick keeps this short");
    }
    let shapes: &[(usize, usize)] = if opts.quick {
        &[(1024, 1024), (512, 2048)]
    } else {
        &[(4096, 4096), (2048, 8192), (14336, 4096)]
    };
    let started = Instant::now();
    let mut cache = None;
    let mut failed = false;
    let mut line = |dtype: GgmlType,
                    rows: usize,
                    cols: usize,
                    tokens: usize,
                    config: &GemvConfig,
                    cache: &mut Uploaded| {
        let config = &config.resolved(&gpu, tokens);
        let label = if config.gemm == GemmUse::Always {
            format!(
                "{:<5} {rows:>5}x{cols:<5} T={tokens} GEMM",
                format!("{dtype:?}")
            )
        } else {
            format!(
                "{:<5} {rows:>5}x{cols:<5} T={tokens} wg={} rows/wg={}{}{}",
                format!("{dtype:?}"),
                config.workgroup_size,
                config.rows_per_workgroup,
                if config.tiled { " tiled" } else { "" },
                if config.reduction == Reduction::Shared {
                    " shared-reduce"
                } else {
                    ""
                },
            )
        };
        match measure(&gpu, (dtype, rows, cols, tokens), config, opts.quick, cache) {
            Ok(m) => println!(
                "{} | {label:<48} | {:>9.4} ms | {:>8.1} GB/s | max rel err {:.1e}",
                a.name, m.ms, m.gbs, m.err
            ),
            Err(e) => {
                failed = true;
                println!("{} | {label:<48} | error: {e}", a.name)
            }
        }
    };
    for &dtype in &opts.types {
        for &(rows, cols) in shapes {
            for &tokens in &[1usize, 8] {
                line(
                    dtype,
                    rows,
                    cols,
                    tokens,
                    &GemvConfig::default(),
                    &mut cache,
                );
            }
        }
    }
    if opts.prompt {
        // Prompt token counts through each kernel (GB/s: weight bytes per call over its time,
        // so the GEMM's edge shows as more of them).
        for &dtype in &opts.types {
            let (rows, cols) = shapes[shapes.len() - 1];
            for &tokens in &[16usize, 32, 64, 256] {
                for gemm in [GemmUse::Never, GemmUse::Always] {
                    let c = GemvConfig {
                        gemm,
                        ..GemvConfig::default()
                    };
                    line(dtype, rows, cols, tokens, &c, &mut cache);
                }
            }
        }
    }
    if opts.sweep {
        // Workgroup shapes on the largest shape (least dominated by dispatch overhead).
        let (rows, cols) = shapes[shapes.len() - 1];
        for &dtype in &[
            GgmlType::Q4_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::F16,
        ] {
            for &tokens in &[1usize, 8] {
                for &wg in &[32, 64, 128, 256] {
                    for &rpw in &[1, 2, 4, 8] {
                        let c = GemvConfig {
                            workgroup_size: wg,
                            rows_per_workgroup: rpw,
                            ..GemvConfig::default()
                        };
                        line(dtype, rows, cols, tokens, &c, &mut cache);
                    }
                }
                line(dtype, rows, cols, tokens, &GemvConfig::tiled(), &mut cache);
                let shared = GemvConfig {
                    reduction: Reduction::Shared,
                    ..GemvConfig::default()
                };
                line(dtype, rows, cols, tokens, &shared, &mut cache);
            }
        }
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    if failed {
        std::process::exit(1);
    }
}
