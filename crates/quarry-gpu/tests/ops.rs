//! Each forward-pass operation of `GpuBackend` against its CPU reference (`quarry_model::ops`,
//! or the textbook formula for attention) on awkward sizes: rows and widths that are not
//! multiples of the workgroup, per-head norms, partial rotary dimensions, grouped-query
//! attention with a sliding window and a soft-cap, queries placed after cached positions.

mod common;

use common::test_gpu;
use proptest::prelude::*;
use quarry_gpu::{GpuBackend, GpuTensor};
use quarry_model::ops::{gated_activation, rms_norm, softcap, Rope};
use quarry_model::{
    Activation, AttentionSpec, Backend, DeviceBackend, RopeStyle, RowPlan, SequenceRows,
};
use std::sync::OnceLock;

fn backend() -> Option<&'static GpuBackend> {
    static B: OnceLock<Option<GpuBackend>> = OnceLock::new();
    B.get_or_init(|| test_gpu().map(GpuBackend::new)).as_ref()
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    quarry_gpu::reference::random_activations(n, seed)
}

fn tensor(b: &GpuBackend, rows: usize, cols: usize, v: &[f32]) -> GpuTensor {
    b.tensor(&RowPlan::of_rows(rows), cols, v).unwrap()
}

fn close(gpu: &[f32], cpu: &[f32], tol: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}: value {i}: GPU {a}, CPU {b}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn norm_bias_add_softcap_and_activation_match_the_cpu(
        rows in 1usize..6, heads in 1usize..4, width in 1usize..70, seed in 0u64..1000,
        per_head in any::<bool>(), gelu in any::<bool>(),
    ) {
        let Some(b) = backend() else { return Ok(()) };
        let cols = heads * width;
        let x = values(rows * cols, seed);
        let y = values(rows * cols, seed + 1);
        let gain = values(if per_head { width } else { cols }, seed + 2);
        let bias = values(cols, seed + 3);

        let mut t = tensor(b, rows, cols, &x);
        b.rms_norm(&mut t, &tensor(b, 1, gain.len(), &gain), 1e-5).unwrap();
        let mut cpu = x.clone();
        rms_norm(&mut cpu, &gain, 1e-5);
        close(&b.read(&t, 0..rows).unwrap(), &cpu, 1e-5, "rms_norm");

        let mut t = tensor(b, rows, cols, &x);
        b.add_bias(&mut t, &tensor(b, 1, cols, &bias)).unwrap();
        b.add(&mut t, &tensor(b, rows, cols, &y)).unwrap();
        b.softcap(&mut t, 1.5).unwrap();
        let mut cpu: Vec<f32> = (0..rows * cols).map(|i| x[i] + bias[i % cols] + y[i]).collect();
        softcap(&mut cpu, 1.5);
        close(&b.read(&t, 0..rows).unwrap(), &cpu, 1e-5, "bias, add, softcap");

        let act = if gelu { Activation::GeluTanh } else { Activation::Silu };
        let mut t = tensor(b, rows, cols, &x);
        b.gated_activation(&mut t, &tensor(b, rows, cols, &y), act).unwrap();
        let mut cpu = x.clone();
        gated_activation(&mut cpu, &y, act);
        close(&b.read(&t, 0..rows).unwrap(), &cpu, 1e-5, "gated activation");
    }

    #[test]
    fn rope_matches_the_cpu(
        rows in 1usize..7, heads in 1usize..4, kv_heads in 1usize..3, half_head in 1usize..9,
        partial in any::<bool>(), halves in any::<bool>(), start in 0usize..3000,
        split in 0usize..7, later in 0usize..3000, seed in 0u64..1000,
    ) {
        let Some(b) = backend() else { return Ok(()) };
        let head_dim = 2 * half_head;
        // Partial rotary: only the first dims of each head turn.
        let dims = if partial && half_head > 1 { head_dim - 2 } else { head_dim };
        let style = if halves { RopeStyle::Halves } else { RopeStyle::Interleaved };
        let rope = Rope::new(style, dims, 10_000.0, 1.0);
        // Two sequences of a batch, the second `split` rows in (when there are rows left)
        // at a position of its own.
        let split = split.min(rows - 1).max(1).min(rows);
        let mut positions: Vec<usize> = (start..start + split).collect();
        let mut tables = vec![rope.table(start, split)];
        if split < rows {
            positions.extend(later..later + rows - split);
            tables.push(rope.table(later, rows - split));
        }
        let (q_cols, k_cols) = (heads * head_dim, kv_heads * head_dim);
        let (x, y) = (values(rows * q_cols, seed), values(rows * k_cols, seed + 1));
        let (mut q, mut k) = (tensor(b, rows, q_cols, &x), tensor(b, rows, k_cols, &y));
        let rotation = b.rotation(tables).unwrap();
        b.rope(&mut q, &mut k, &rotation, head_dim).unwrap();
        let rotated = |mut v: Vec<f32>, cols: usize| {
            for (row, &pos) in v.chunks_exact_mut(cols).zip(&positions) {
                rope.rotate_heads(pos, row, head_dim, false);
            }
            v
        };
        close(&b.read(&q, 0..rows).unwrap(), &rotated(x, q_cols), 1e-4, "rope of q");
        close(&b.read(&k, 0..rows).unwrap(), &rotated(y, k_cols), 1e-4, "rope of k");
    }

    #[test]
    fn attention_matches_the_softmax_formula(
        kv_heads in 1usize..3, group in 1usize..4, half_dim in 1usize..10, start in 0usize..70,
        rows in 1usize..6, window in proptest::option::of(1usize..40),
        cap in proptest::option::of(5.0f32..30.0), block_size in 1usize..9, seed in 0u64..1000,
        same_pool in any::<bool>(),
    ) {
        let Some(b) = backend() else { return Ok(()) };
        let head_dim = 2 * half_dim;
        let heads = kv_heads * group;
        let (q_dim, kv_dim, len) = (heads * head_dim, kv_heads * head_dim, start + rows);
        let spec = AttentionSpec {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: cap,
            window,
        };
        let (keys, vals) = (values(len * kv_dim, seed), values(len * kv_dim, seed + 1));
        // The device stores keys and values as f16, as the CPU's caches do.
        let f16 = |v: &[f32]| -> Vec<f32> {
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        let (keys16, vals16) = (f16(&keys), f16(&vals));
        let q = values(rows * q_dim, seed + 2);
        // Two sequences with the same keys, values and queries in one batch: the second's
        // rows follow the first's. The first's positions are in blocks of a shared pool, in
        // reverse order and not from block 0; the second's in other blocks of that pool, or
        // in a pool of one block of its own. Cached positions first, then the batch's (rows
        // of the same tensors further in), into layer 1.
        let n_blocks = (len + 3).div_ceil(block_size);
        let shared = b.kv_pool(2, kv_dim, block_size, 2 * n_blocks + 2).unwrap();
        let table: Vec<usize> = (2..n_blocks + 2).rev().collect();
        let own = b.kv_pool(2, kv_dim, len + 1, 1).unwrap();
        let mut kv = b.kv_view(&shared, &table).unwrap();
        let mut kv2 = if same_pool {
            let other: Vec<usize> = [0, 1].into_iter().chain(n_blocks + 2..2 * n_blocks + 2).collect();
            b.kv_view(&shared, &other[..(len + 1).div_ceil(block_size)]).unwrap()
        } else {
            b.kv_view(&own, &[0]).unwrap()
        };
        let (k, v) = (tensor(b, len, kv_dim, &keys), tensor(b, len, kv_dim, &vals));
        let span = |start, rows| SequenceRows { start, rows };
        if start > 0 {
            let cached = [span(0, 0..start), span(0, 0..start)];
            b.kv_write(&mut [&mut kv, &mut kv2], &cached, 1, &k, &v).unwrap();
        }
        let batch = [span(start, start..len), span(start, start..len)];
        b.kv_write(&mut [&mut kv, &mut kv2], &batch, 1, &k, &v).unwrap();
        let mut out = tensor(b, 2 * rows, q_dim, &[]);
        let q_t = tensor(b, 2 * rows, q_dim, &[q.clone(), q.clone()].concat());
        let spans = [span(start, 0..rows), span(start, rows..2 * rows)];
        b.attend(&spec, &[&mut kv, &mut kv2], &spans, 1, &q_t, &mut out).unwrap();

        let mut cpu = vec![0f32; rows * q_dim];
        for t in 0..rows {
            let pos = start + t;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for h in 0..heads {
                let qh = &q[(t * heads + h) * head_dim..][..head_dim];
                let kvh = h / group;
                let scores: Vec<f64> = (first..=pos)
                    .map(|j| {
                        let k = &keys16[j * kv_dim + kvh * head_dim..][..head_dim];
                        let s: f64 = qh.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let s = s * spec.scale as f64;
                        cap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..head_dim {
                    let acc: f64 = (first..=pos)
                        .zip(&e)
                        .map(|(j, p)| p * vals16[j * kv_dim + kvh * head_dim + d] as f64)
                        .sum();
                    cpu[(t * heads + h) * head_dim + d] = (acc / sum) as f32;
                }
            }
        }
        close(&b.read(&out, 0..rows).unwrap(), &cpu, 1e-4, "attention");
        close(&b.read(&out, rows..2 * rows).unwrap(), &cpu, 1e-4, "attention, second sequence");
    }
}

/// A block's first positions copied to another block (the prefix cache's partial reuse) give
/// the same attention there as in the original, and positions after them are not taken.
#[test]
fn a_block_copy_carries_its_positions() {
    let Some(b) = backend() else { return };
    let (kv_dim, bs) = (8, 4);
    let spec = AttentionSpec {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: kv_dim,
        scale: 0.3,
        softcap: None,
        window: None,
    };
    let pool = b.kv_pool(1, kv_dim, bs, 3).unwrap();
    let (k, v) = (
        tensor(b, bs, kv_dim, &values(bs * kv_dim, 1)),
        tensor(b, bs, kv_dim, &values(bs * kv_dim, 2)),
    );
    let q = tensor(b, 1, 2 * kv_dim, &values(2 * kv_dim, 3));
    let span = |start, rows| SequenceRows { start, rows };
    let mut source = b.kv_view(&pool, &[1]).unwrap();
    b.kv_write(&mut [&mut source], &[span(0, 0..bs)], 0, &k, &v)
        .unwrap();
    b.kv_copy(&pool, 1, 2, 3).unwrap();
    let mut copy = b.kv_view(&pool, &[2]).unwrap();
    let attend = |kv: &mut quarry_gpu::GpuKv, pos| {
        let mut out = tensor(b, 1, 2 * kv_dim, &[]);
        b.attend(&spec, &[kv], &[span(pos, 0..1)], 0, &q, &mut out)
            .unwrap();
        b.read(&out, 0..1).unwrap()
    };
    // Position 2 sees positions 0..=2, all copied.
    close(
        &attend(&mut copy, 2),
        &attend(&mut source, 2),
        0.0,
        "attention over a copy",
    );
    // Position 3 of the copy was not copied (zeros), so attention there differs.
    assert_ne!(attend(&mut copy, 3), attend(&mut source, 3));
    assert!(b.kv_copy(&pool, 1, 3, 2).is_err(), "block 3 of a pool of 3");
    assert!(
        b.kv_copy(&pool, 1, 2, bs + 1).is_err(),
        "more positions than a block"
    );
}

/// The bind groups kept for a KV pool's buffers go with the pool, so a dropped cache's memory
/// is not held by them.
#[test]
fn a_dropped_pool_takes_its_bind_groups_along() {
    let Some(gpu) = test_gpu() else { return };
    let b = GpuBackend::new(gpu);
    let (kv_dim, bs) = (4, 2);
    let held = b.bind_groups_held();
    let pool = b.kv_pool(2, kv_dim, bs, 2).unwrap();
    let mut kv = b.kv_view(&pool, &[1, 0]).unwrap();
    let k = tensor(&b, 3, kv_dim, &values(3 * kv_dim, 4));
    for layer in 0..2 {
        let span = SequenceRows {
            start: 0,
            rows: 0..3,
        };
        b.kv_write(&mut [&mut kv], &[span], layer, &k, &k).unwrap();
    }
    b.read(&k, 0..1).unwrap();
    assert_eq!(b.bind_groups_held(), held + 2, "one KV store a layer");
    drop(kv);
    drop(pool);
    assert_eq!(b.bind_groups_held(), held);
}

/// Pools and views the device cannot hold are refused by name: keys of an odd width (stored
/// in pairs), a block outside the pool.
#[test]
fn kv_pools_and_views_out_of_shape_are_refused() {
    let Some(b) = backend() else { return };
    let err = b.kv_pool(1, 3, 4, 2).err().unwrap().to_string();
    assert!(err.contains("keys of 3 values"), "{err}");
    let pool = b.kv_pool(1, 4, 4, 2).unwrap();
    let err = b.kv_view(&pool, &[1, 2]).err().unwrap().to_string();
    assert!(err.contains("block 2 of a pool of 2"), "{err}");
}
