//! Dispatch overhead of `quarry_kernels::pool::ThreadPool` against rayon, both with two threads.
//!
//! * `dispatch_empty`: tasks that do nothing, so the time is all overhead.
//! * `sum_16k`: eight tasks each summing 16 KiB of `f32`, a few microseconds of work apiece.
//! * `decode_step`: 200 back-to-back dispatches of those eight tasks, the shape of a decode
//!   step's matrix-vector products, against running the same tasks serially.
//!
//! * `after_idle`: one `sum_16k` dispatch after the pool sat idle for 50 µs (our workers still
//!   spinning) or 1 ms (parked), timing only the dispatch.
//!
//! rayon is measured twice: `rayon_caller` calls into its pool from an outside thread per
//! dispatch, as an engine's main thread would; `rayon_inside` runs the whole timing loop on a
//! rayon worker, its best case.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use quarry_kernels::pool::ThreadPool;
use rayon::prelude::*;

const THREADS: usize = 2;
const SUM_TASKS: usize = 8;
const SUM_LEN: usize = 16 * 1024 / size_of::<f32>();
const STEP_DISPATCHES: usize = 200;

fn rayon_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build()
        .expect("rayon pool")
}

fn sum_task(data: &[f32], i: usize) {
    black_box(data[i * SUM_LEN..][..SUM_LEN].iter().sum::<f32>());
}

fn dispatch_empty(c: &mut Criterion) {
    let ours = ThreadPool::new(THREADS);
    let rayon = rayon_pool();
    let mut group = c.benchmark_group("dispatch_empty");
    for n_tasks in [THREADS, 8] {
        group.bench_with_input(BenchmarkId::new("ours", n_tasks), &n_tasks, |b, &n| {
            b.iter(|| {
                ours.run(n, &|i| {
                    black_box(i);
                })
            })
        });
        group.bench_with_input(
            BenchmarkId::new("rayon_caller", n_tasks),
            &n_tasks,
            |b, &n| {
                b.iter(|| {
                    rayon.install(|| {
                        (0..n).into_par_iter().for_each(|i| {
                            black_box(i);
                        })
                    })
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("rayon_inside", n_tasks),
            &n_tasks,
            |b, &n| {
                b.iter_custom(|iters| {
                    rayon.install(|| {
                        let start = Instant::now();
                        for _ in 0..iters {
                            (0..n).into_par_iter().for_each(|i| {
                                black_box(i);
                            });
                        }
                        start.elapsed()
                    })
                })
            },
        );
    }
    group.finish();
}

fn sum_16k(c: &mut Criterion) {
    let ours = ThreadPool::new(THREADS);
    let rayon = rayon_pool();
    let data: Vec<f32> = (0..SUM_TASKS * SUM_LEN).map(|i| i as f32).collect();
    let data = &data[..];
    let mut group = c.benchmark_group("sum_16k");
    group.bench_function("serial", |b| {
        b.iter(|| (0..SUM_TASKS).for_each(|i| sum_task(data, i)))
    });
    group.bench_function("ours", |b| {
        b.iter(|| ours.run(SUM_TASKS, &|i| sum_task(data, i)))
    });
    group.bench_function("rayon_caller", |b| {
        b.iter(|| {
            rayon.install(|| {
                (0..SUM_TASKS)
                    .into_par_iter()
                    .for_each(|i| sum_task(data, i))
            })
        })
    });
    group.bench_function("rayon_inside", |b| {
        b.iter_custom(|iters| {
            rayon.install(|| {
                let start = Instant::now();
                for _ in 0..iters {
                    (0..SUM_TASKS)
                        .into_par_iter()
                        .for_each(|i| sum_task(data, i));
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn decode_step(c: &mut Criterion) {
    let ours = ThreadPool::new(THREADS);
    let rayon = rayon_pool();
    let data: Vec<f32> = (0..SUM_TASKS * SUM_LEN).map(|i| i as f32).collect();
    let data = &data[..];
    let mut group = c.benchmark_group("decode_step");
    group.bench_function("serial", |b| {
        b.iter(|| {
            for _ in 0..STEP_DISPATCHES {
                (0..SUM_TASKS).for_each(|i| sum_task(data, i));
            }
        })
    });
    group.bench_function("ours", |b| {
        b.iter(|| {
            for _ in 0..STEP_DISPATCHES {
                ours.run(SUM_TASKS, &|i| sum_task(data, i));
            }
        })
    });
    group.bench_function("rayon_caller", |b| {
        b.iter(|| {
            for _ in 0..STEP_DISPATCHES {
                rayon.install(|| {
                    (0..SUM_TASKS)
                        .into_par_iter()
                        .for_each(|i| sum_task(data, i))
                });
            }
        })
    });
    group.finish();
}

/// Times `iters` calls of `dispatch` alone, each after `idle` without dispatches. The caller
/// busy-waits, like serial work between two products would, and to time the gap exactly.
fn after(idle: Duration, iters: u64, dispatch: impl Fn()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let idle_start = Instant::now();
        while idle_start.elapsed() < idle {
            std::hint::spin_loop();
        }
        let start = Instant::now();
        dispatch();
        total += start.elapsed();
    }
    total
}

fn after_idle(c: &mut Criterion) {
    let ours = ThreadPool::new(THREADS);
    let rayon = rayon_pool();
    let data: Vec<f32> = (0..SUM_TASKS * SUM_LEN).map(|i| i as f32).collect();
    let data = &data[..];
    let mut group = c.benchmark_group("after_idle");
    for idle_us in [50, 1000] {
        let idle = Duration::from_micros(idle_us);
        group.bench_function(BenchmarkId::new("ours", idle_us), |b| {
            b.iter_custom(|iters| {
                after(idle, iters, || ours.run(SUM_TASKS, &|i| sum_task(data, i)))
            })
        });
        group.bench_function(BenchmarkId::new("rayon_caller", idle_us), |b| {
            b.iter_custom(|iters| {
                after(idle, iters, || {
                    rayon.install(|| {
                        (0..SUM_TASKS)
                            .into_par_iter()
                            .for_each(|i| sum_task(data, i))
                    })
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = dispatch_empty, sum_16k, decode_step, after_idle
}
criterion_main!(benches);
