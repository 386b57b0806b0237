//! `quarry bench`: prompt-processing and generation speed with llama-bench's semantics.
//!
//! - `pp N`: one forward pass over N synthetic token ids from an empty cache, logits for the last
//!   token only.
//! - `tg N`: N forward passes of one token each from an empty cache (the first token is BOS when
//!   the model adds one), logits every step.
//! - `tg N ×B` (`--batch`): the same N steps for B sequences at once, each step one batched
//!   forward pass of B single-token sequences with caches of their own (what a server's decode
//!   step does); tok/s counts all B·N tokens, like llama-batched-bench's generation speed.
//!
//! Token ids are pseudo-random (seeded), so tokenization and sampling are excluded. Each test
//! runs once to warm up, then `reps` times; the median and spread of tok/s are reported. A
//! STREAM-like read benchmark in the same run puts decode speed in terms of memory bandwidth.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;
use quarry_kernels::pool;
use quarry_model::{KvCache, Model, ModelConfig, SequenceBatch};
use serde_json::json;

use crate::limits;
use crate::BenchArgs;

/// Deterministic synthetic token ids in `[0, vocab)`.
fn synthetic_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab as u64) as u32
        })
        .collect()
}

/// Median, minimum and maximum of a non-empty sample.
fn summary(samples: &[f64]) -> (f64, f64, f64) {
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (median, s[0], s[s.len() - 1])
}

fn prompt_tok_s(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache(ids.len());
    let n = ids.len();
    let t = Instant::now();
    model.forward(ids, &mut cache, n - 1..n)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn generate_tok_s(model: &Model, ids: &[u32]) -> Result<f64> {
    let mut cache = model.new_cache(ids.len());
    let t = Instant::now();
    for &id in ids {
        model.forward(&[id], &mut cache, 0..1)?;
    }
    debug_assert_eq!(cache.len(), ids.len());
    Ok(ids.len() as f64 / t.elapsed().as_secs_f64())
}

/// Aggregate tok/s of `sequences` sequences stepping together through `ids` (sequence s
/// reads `ids` shifted by s, so their tokens differ).
fn batched_generate_tok_s(model: &Model, ids: &[u32], sequences: usize) -> Result<f64> {
    let mut caches: Vec<_> = (0..sequences).map(|_| model.new_cache(ids.len())).collect();
    let vocab = model.config().vocab_size as u32;
    let t = Instant::now();
    for &id in ids {
        let tokens: Vec<[u32; 1]> = (0..sequences).map(|s| [(id + s as u32) % vocab]).collect();
        let mut batch: Vec<_> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, token)| SequenceBatch {
                tokens: token,
                cache,
                rows: 0..1,
                overlay: None,
            })
            .collect();
        model.forward_batch(&mut batch)?;
    }
    Ok((ids.len() * sequences) as f64 / t.elapsed().as_secs_f64())
}

/// Read bandwidth in GB/s: every thread sums its share of a buffer far larger than the caches.
fn read_bandwidth_gb_s(reps: usize) -> f64 {
    const BYTES: usize = 1 << 30;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let pool = pool::global();
    let part = buf.len().div_ceil(pool.n_threads());
    let mut best = 0.0f64;
    for _ in 0..reps.max(1) {
        let total = AtomicU64::new(0);
        let t = Instant::now();
        pool.run(pool.n_threads(), &|i| {
            let chunk = &buf[(i * part).min(buf.len())..((i + 1) * part).min(buf.len())];
            let sum = chunk.iter().fold(0u64, |a, &v| a.wrapping_add(v));
            total.fetch_add(sum, Ordering::Relaxed);
        });
        std::hint::black_box(total.load(Ordering::Relaxed));
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// What can be checked of the arguments before the model is loaded: `--reps` and the
/// `--batch` counts are at least 1, `--reps` at most [`limits::MAX_BENCH_REPS`].
pub fn check_args(a: &BenchArgs) -> Result<()> {
    limits::count(
        "--reps",
        a.reps,
        limits::MAX_BENCH_REPS,
        "the median of more does not move",
    )?;
    anyhow::ensure!(
        a.batch.iter().all(|&b| b > 0),
        "invalid --batch {:?}: every count must be at least 1",
        a.batch
    );
    Ok(())
}

/// `--pp` and `--tg` within the model's context, and memory for each test: the KV cache of its
/// positions (per sequence, for `--batch`) and its largest forward pass.
pub fn check_sizes(a: &BenchArgs, cfg: &ModelConfig) -> Result<()> {
    if a.pp > 0 {
        limits::context("--pp", a.pp, 1, cfg)?;
        limits::check_memory(
            &format!(
                "--pp {}: the KV cache and a forward pass over the prompt",
                a.pp
            ),
            limits::kv_bytes(cfg, a.pp) + limits::forward_bytes(cfg, a.pp, 1),
        )?;
    }
    if a.tg > 0 {
        limits::context("--tg", a.tg, 1, cfg)?;
        let batch = a.batch.iter().copied().max().unwrap_or(1);
        limits::check_memory(
            &format!(
                "--tg {} with --batch {batch}: {batch} KV caches of {} positions",
                a.tg, a.tg
            ),
            limits::kv_bytes(cfg, a.tg) * batch as u128 + limits::forward_bytes(cfg, batch, batch),
        )?;
    }
    Ok(())
}

pub fn run(model: &Model, source: &str, bos: Option<u32>, a: &BenchArgs) -> Result<()> {
    let vocab = model.config().vocab_size;
    // (test, tok/s samples, whether a step reads the weights for one token only)
    let mut rows = Vec::new();
    if a.pp > 0 {
        let mut ids = synthetic_ids(a.pp, vocab, 1);
        if let Some(b) = bos {
            ids[0] = b;
        }
        prompt_tok_s(model, &ids)?;
        let samples = (0..a.reps)
            .map(|_| prompt_tok_s(model, &ids))
            .collect::<Result<Vec<_>>>()?;
        rows.push((format!("pp{}", a.pp), samples, false));
    }
    if a.tg > 0 {
        let mut ids = synthetic_ids(a.tg, vocab, 2);
        if let Some(b) = bos {
            ids[0] = b;
        }
        generate_tok_s(model, &ids[..ids.len().min(8)])?;
        let samples = (0..a.reps)
            .map(|_| generate_tok_s(model, &ids))
            .collect::<Result<Vec<_>>>()?;
        rows.push((format!("tg{}", a.tg), samples, true));
        for &b in a.batch.iter().filter(|&&b| b > 1) {
            batched_generate_tok_s(model, &ids[..ids.len().min(8)], b)?;
            let samples = (0..a.reps)
                .map(|_| batched_generate_tok_s(model, &ids, b))
                .collect::<Result<Vec<_>>>()?;
            rows.push((format!("tg{} ×{b}", a.tg), samples, false));
        }
    }
    // The probe measures host memory: no yardstick for a model on a device.
    let bandwidth = if a.no_bandwidth || model.device().is_some() {
        None
    } else {
        Some(read_bandwidth_gb_s(3))
    };
    let bytes_per_token = model.weight_bytes_per_token();
    let threads = pool::global().n_threads();
    let device = model.device().unwrap_or_else(|| "cpu".to_string());

    let tests: Vec<serde_json::Value> = rows
        .iter()
        .map(|(name, samples, one_token_steps)| {
            let (median, min, max) = summary(samples);
            let mut v = json!({
                "test": name, "tok_s_median": median, "tok_s_min": min, "tok_s_max": max,
                "samples": samples,
            });
            if *one_token_steps {
                let gb_s = median * bytes_per_token as f64 / 1e9;
                v["weights_gb_s"] = json!(gb_s);
                if let Some(bw) = bandwidth {
                    v["fraction_of_read_bandwidth"] = json!(gb_s / bw);
                }
            }
            v
        })
        .collect();
    if a.json {
        let v = json!({
            "model": source, "device": device, "threads": threads, "reps": a.reps,
            "weight_bytes_per_token": bytes_per_token,
            "read_bandwidth_gb_s": bandwidth, "tests": tests,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "model {source} on {device}, {threads} threads, {} reps, weights read per token {:.1} MB",
        a.reps,
        bytes_per_token as f64 / 1e6
    );
    if let Some(bw) = bandwidth {
        println!("read bandwidth {bw:.1} GB/s");
    }
    println!("| test | tok/s (median) | min | max | weights GB/s | % of bandwidth |");
    println!("|---|---|---|---|---|---|");
    for t in &tests {
        let pct = t["fraction_of_read_bandwidth"]
            .as_f64()
            .map_or(String::new(), |f| format!("{:.0}%", 100.0 * f));
        let gbs = t["weights_gb_s"]
            .as_f64()
            .map_or(String::new(), |g| format!("{g:.1}"));
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {gbs} | {pct} |",
            t["test"].as_str().unwrap_or(""),
            t["tok_s_median"].as_f64().unwrap_or(0.0),
            t["tok_s_min"].as_f64().unwrap_or(0.0),
            t["tok_s_max"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_ids_are_deterministic_and_in_range() {
        let a = synthetic_ids(1000, 49152, 1);
        assert_eq!(a, synthetic_ids(1000, 49152, 1));
        assert_ne!(a, synthetic_ids(1000, 49152, 2));
        assert!(a.iter().all(|&t| t < 49152));
    }

    #[test]
    fn summary_takes_the_median() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
