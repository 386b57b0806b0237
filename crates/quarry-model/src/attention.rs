//! Causal self-attention of a batch of consecutive tokens over the KV cache, in tiles whose
//! memory does not grow with the context.
//!
//! The query rows that share one KV head (its group of query heads, for consecutive tokens)
//! are cut into tiles of at most [`TILE_ROWS`] rows. A tile walks the keys its rows may see in
//! blocks of [`KEY_BLOCK`] positions: one GEMM gives the block's scores (plain dot products
//! for tiles of fewer than [`GEMM_MIN_ROWS`] rows), a running maximum and
//! sum per row keep the softmax exact across blocks (online softmax, as in FlashAttention),
//! and a second GEMM adds the block's weighted values. Every key and value is read from the
//! cache once per tile: in place by the small tiles' kernels, which widen the cache's `f16` as
//! they load it, or widened a block at a time into the tile's scratch for the GEMMs (exactly, so
//! both see the same values). A tile's scratch is a few tens of KiB whatever the length.
//!
//! Tiles write into a KV-head-major buffer (`[kv head][token][query head in group][dim]`) so
//! that each owns a contiguous slice; [`attend`] then reorders it to the token-major layout
//! of the queries.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use quarry_kernels::gemm::{gemm, MatRef};
use quarry_kernels::half_rows::widen_rows;
use quarry_kernels::pool;
use quarry_kernels::vec::{add_weighted_rows, dot_rows_streamed, exp_sub_sum};

use crate::kv_cache::KvCache;
use crate::ops::softcap;

/// Most query rows per tile: enough for the GEMMs to run near full speed.
const TILE_ROWS: usize = 64;
/// Key positions per block.
const KEY_BLOCK: usize = 64;
/// Tiles with fewer query rows (decoding: one token's heads) use register-blocked dot
/// products and weighted row sums on the cache in place: the GEMM's packing costs more than
/// it saves on a handful of rows (measured: 10% of a SmolLM2 decode step went to packing).
const GEMM_MIN_ROWS: usize = 8;

/// The shape and options of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies every score (usually `1/√head_dim`).
    pub scale: f32,
    /// `cap·tanh(score/cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
    /// A token at position `p` sees keys at positions `> p − window` only (sliding window).
    pub window: Option<usize>,
}

impl AttentionSpec {
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The first key position a token at `pos` sees.
    fn first_visible(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// One sequence's part of a batched attention call: its cache, the position of its first
/// token in the batch, and which rows (tokens) of the batch's queries are its own.
pub struct SequenceAttention<'c, C> {
    pub cache: &'c C,
    pub start: usize,
    pub rows: Range<usize>,
}

/// Attention of every sequence of a batch: sequence `s` has tokens at positions
/// `start..start + rows.len()` whose keys and values are already in its cache for `layer`.
/// `q` holds the queries of all tokens of the batch (token major, `n_heads × head_dim` each,
/// heads of one KV head adjacent) and `out` receives the outputs in the same layout. Tiles of
/// all sequences share one dispatch to the pool.
pub fn attend<C: KvCache + Sync>(
    spec: &AttentionSpec,
    layer: usize,
    sequences: &[SequenceAttention<'_, C>],
    q: &[f32],
    out: &mut [f32],
) {
    let hd = spec.head_dim;
    let q_dim = spec.n_heads * hd;
    assert_eq!(out.len(), q.len(), "attend: out and q differ in length");
    let group = spec.group();
    let pool = pool::global();
    // Per sequence, a KV-head-major copy of its rows: `[kv head][token][query head][dim]`.
    let mut by_kv_head = vec![0.0f32; q.len()];
    let mut tiles: Vec<Tile<'_, '_, C>> = Vec::new();
    let mut rest = by_kv_head.as_mut_slice();
    // Decode steps of many sequences fill the threads with whole query groups: each key is
    // then read once for its group's heads instead of once per head. A row's result does not
    // depend on its tile below GEMM_MIN_ROWS rows (the in-place kernels treat rows apart),
    // so this keeps a sequence's numbers the same in any batch.
    let decode_tiles = sequences.iter().filter(|s| s.rows.len() == 1).count() * spec.n_kv_heads;
    let whole_groups = decode_tiles >= 2 * pool.n_threads();
    for seq in sequences {
        let n = seq.rows.len();
        let (mine, tail) = rest.split_at_mut(n * q_dim);
        rest = tail;
        let rows_per_kv_head = n * group;
        if rows_per_kv_head == 0 {
            continue;
        }
        // At least two tiles per thread when there are enough rows, so threads stay busy.
        let tile_rows = if n == 1 && whole_groups {
            group.min(GEMM_MIN_ROWS - 1)
        } else {
            rows_per_kv_head
                .div_ceil(2 * pool.n_threads())
                .clamp(1, TILE_ROWS)
        };
        let q_seq = &q[seq.rows.start * q_dim..seq.rows.end * q_dim];
        for (g, head_out) in mine.chunks_mut(rows_per_kv_head * hd).enumerate() {
            for (i, tile) in head_out.chunks_mut(tile_rows * hd).enumerate() {
                tiles.push(Tile {
                    cache: seq.cache,
                    q: q_seq,
                    start: seq.start,
                    kv_head: g,
                    first_row: i * tile_rows,
                    out: Mutex::new(tile),
                });
            }
        }
    }
    // Each task locks only its own tile, so the locks are never contended.
    pool.run(tiles.len(), &|i| {
        // Later tiles see more keys; starting with them balances the threads' loads.
        let t = &tiles[tiles.len() - 1 - i];
        let mut tile = t.out.lock().unwrap_or_else(PoisonError::into_inner);
        attend_tile(
            spec,
            layer,
            t.cache,
            t.q,
            t.start,
            t.kv_head,
            t.first_row,
            &mut tile,
        );
    });
    drop(tiles);
    // Back to token-major: row (g, t, hh) of a sequence goes to its token t, head g·group + hh.
    let token_seq: Vec<(usize, usize)> = sequences
        .iter()
        .flat_map(|s| s.rows.clone().map(move |_| (s.rows.start, s.rows.len())))
        .collect();
    pool.for_each_chunk_mut(out, q_dim, &|t, token_out| {
        let (first, n) = token_seq[t];
        let region = &by_kv_head[first * q_dim..];
        for (g, dst) in token_out.chunks_exact_mut(group * hd).enumerate() {
            let src = (g * n * group + (t - first) * group) * hd;
            dst.copy_from_slice(&region[src..src + group * hd]);
        }
    });
}

/// A run of query rows of one KV head of one sequence, and where its outputs go.
struct Tile<'c, 'o, C> {
    cache: &'c C,
    q: &'c [f32],
    start: usize,
    kv_head: usize,
    first_row: usize,
    out: Mutex<&'o mut [f32]>,
}

/// One tile: rows `first_row..` of KV head `g` (row r is token `r / group`, query head
/// `g·group + r % group`), written to `out` (`rows × head_dim`).
#[allow(clippy::too_many_arguments)]
fn attend_tile<C: KvCache>(
    spec: &AttentionSpec,
    layer: usize,
    cache: &C,
    q: &[f32],
    start: usize,
    g: usize,
    first_row: usize,
    out: &mut [f32],
) {
    let hd = spec.head_dim;
    let group = spec.group();
    let (q_dim, kv_dim) = (spec.n_heads * hd, spec.n_kv_heads * hd);
    let m = out.len() / hd;
    let pos_of = |r: usize| start + (first_row + r) / group;
    let mut q_tile = vec![0.0f32; m * hd];
    for (r, row) in q_tile.chunks_exact_mut(hd).enumerate() {
        let (t, hh) = ((first_row + r) / group, (first_row + r) % group);
        let off = t * q_dim + (g * group + hh) * hd;
        for (dst, &src) in row.iter_mut().zip(&q[off..off + hd]) {
            *dst = src * spec.scale;
        }
    }
    let qt = MatRef::row_major(&q_tile, m, hd, hd);
    let mut scores = vec![0.0f32; m * KEY_BLOCK];
    // This head's keys and values of one block, widened for the GEMMs.
    let gemm_scratch = if m >= GEMM_MIN_ROWS {
        KEY_BLOCK * hd
    } else {
        0
    };
    let mut block_keys = vec![0.0f32; gemm_scratch];
    let mut block_values = vec![0.0f32; gemm_scratch];
    let mut max = vec![f32::NEG_INFINITY; m];
    let mut sum = vec![0.0f32; m];
    out.fill(0.0);
    let keys_from = spec.first_visible(pos_of(0));
    let keys_to = pos_of(m - 1) + 1;
    let run = cache.contiguous_run();
    let mut j0 = keys_from;
    while j0 < keys_to {
        // A block never crosses a boundary of the cache's contiguous runs.
        let j1 = (j0 + KEY_BLOCK)
            .min(keys_to)
            .min((j0 - j0 % run).saturating_add(run));
        let b = j1 - j0;
        let keys = &cache.keys(layer, j0..j1)[g * hd..];
        let values = &cache.values(layer, j0..j1)[g * hd..];
        if m >= GEMM_MIN_ROWS {
            let k = &mut block_keys[..b * hd];
            widen_rows(keys, hd, kv_dim, k);
            gemm(
                1.0,
                qt,
                MatRef::row_major(k, b, hd, hd).t(),
                0.0,
                &mut scores,
                b,
            );
        } else {
            dot_rows_streamed(&q_tile, keys, hd, kv_dim, &mut scores[..m * b]);
        }
        for (r, row) in scores[..m * b].chunks_exact_mut(b).enumerate() {
            if let Some(cap) = spec.softcap {
                softcap(row, cap);
            }
            let pos = pos_of(r);
            let visible = spec.first_visible(pos).max(j0)..(pos + 1).min(j1);
            if visible.is_empty() {
                row.fill(0.0);
                continue;
            }
            row[..visible.start - j0].fill(f32::NEG_INFINITY);
            row[visible.end - j0..].fill(f32::NEG_INFINITY);
            let block_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[r].max(block_max);
            if new_max > max[r] && sum[r] > 0.0 {
                let rescale = (max[r] - new_max).exp();
                sum[r] *= rescale;
                out[r * hd..(r + 1) * hd]
                    .iter_mut()
                    .for_each(|o| *o *= rescale);
            }
            max[r] = new_max;
            sum[r] += exp_sub_sum(row, new_max);
        }
        if m >= GEMM_MIN_ROWS {
            let v = &mut block_values[..b * hd];
            widen_rows(values, hd, kv_dim, v);
            let v = MatRef::row_major(v, b, hd, hd);
            gemm(1.0, MatRef::row_major(&scores, m, b, b), v, 1.0, out, hd);
        } else {
            add_weighted_rows(out, &scores[..m * b], values, hd, kv_dim);
        }
        j0 = j1;
    }
    for (row, s) in out.chunks_exact_mut(hd).zip(&sum) {
        let inv = 1.0 / s;
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::ContiguousKvCache;
    use half::f16;
    use proptest::prelude::*;

    /// Softmax over each query's visible keys, one query and key at a time.
    fn naive(
        spec: &AttentionSpec,
        keys: &[f32],
        values: &[f32],
        q: &[f32],
        start: usize,
    ) -> Vec<f32> {
        let (hd, group) = (spec.head_dim, spec.group());
        let (q_dim, kv_dim) = (spec.n_heads * hd, spec.n_kv_heads * hd);
        let mut out = vec![0.0f32; q.len()];
        for t in 0..q.len() / q_dim {
            let pos = start + t;
            for h in 0..spec.n_heads {
                let qh = &q[t * q_dim + h * hd..][..hd];
                let kv = (h / group) * hd;
                let visible = spec.first_visible(pos)..pos + 1;
                let mut scores: Vec<f64> = visible
                    .clone()
                    .map(|j| {
                        let k = &keys[j * kv_dim + kv..][..hd];
                        let s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * spec.scale;
                        spec.softcap.map_or(s, |c| c * (s / c).tanh()) as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                scores.iter_mut().for_each(|s| *s = (*s - max).exp());
                let total: f64 = scores.iter().sum();
                let o = &mut out[t * q_dim + h * hd..][..hd];
                for (j, p) in visible.zip(&scores) {
                    for (o, v) in o.iter_mut().zip(&values[j * kv_dim + kv..][..hd]) {
                        *o += (p / total) as f32 * v;
                    }
                }
            }
        }
        out
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 4001) as f32 / 1000.0 - 2.0
            })
            .collect()
    }

    /// A contiguous cache that claims shorter contiguous runs, so blocks get cut at them.
    struct ShortRuns(ContiguousKvCache, usize);

    impl KvCache for ShortRuns {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn capacity(&self) -> usize {
            self.0.capacity()
        }
        fn contiguous_run(&self) -> usize {
            self.1
        }
        fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
            self.0.write(layer, k, v)
        }
        fn keys(&self, layer: usize, positions: Range<usize>) -> &[f16] {
            assert!(
                positions.start / self.1 == (positions.end - 1) / self.1,
                "{positions:?} crosses a run"
            );
            self.0.keys(layer, positions)
        }
        fn values(&self, layer: usize, positions: Range<usize>) -> &[f16] {
            self.0.values(layer, positions)
        }
        fn advance(&mut self, n: usize) {
            self.0.advance(n)
        }
        fn truncate(&mut self, len: usize) {
            self.0.truncate(len)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn tiled_attention_equals_the_naive_softmax(
            n_kv_heads in 1usize..3, group in 1usize..5, head_dim in 1usize..20,
            shapes in prop::collection::vec((0usize..150, 1usize..140), 1..4),
            run in prop::option::of(1usize..80), window in prop::option::of(1usize..100),
            softcap in prop::option::of(1.0f32..10.0), seed in any::<u64>(),
        ) {
            let spec = AttentionSpec {
                n_heads: n_kv_heads * group, n_kv_heads, head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(), softcap, window,
            };
            let (kv_dim, q_dim) = (n_kv_heads * head_dim, spec.n_heads * head_dim);
            let mut caches = Vec::new();
            let (mut q, mut expected, mut rows) = (Vec::new(), Vec::new(), Vec::new());
            for (s, &(past, n)) in shapes.iter().enumerate() {
                let seed = seed ^ (s as u64 * 0x9E37);
                let total = past + n;
                let (keys, values) = (random(total * kv_dim, seed), random(total * kv_dim, seed ^ 7));
                let q_seq = random(n * q_dim, seed ^ 11);
                let mut cache = ShortRuns(ContiguousKvCache::new(2, kv_dim, total + 3), run.unwrap_or(usize::MAX));
                cache.write(1, &keys[..past * kv_dim], &values[..past * kv_dim]);
                cache.advance(past);
                cache.write(1, &keys[past * kv_dim..], &values[past * kv_dim..]);
                // The cache holds keys and values rounded to f16.
                let rounded = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| f16::from_f32(v).to_f32()).collect() };
                expected.extend(naive(&spec, &rounded(&keys), &rounded(&values), &q_seq, past));
                rows.push((past, q.len() / q_dim..q.len() / q_dim + n));
                q.extend(q_seq);
                caches.push(cache);
            }
            let sequences: Vec<_> = caches.iter().zip(&rows)
                .map(|(cache, (start, rows))| SequenceAttention { cache, start: *start, rows: rows.clone() })
                .collect();
            let mut out = vec![f32::NAN; q.len()];
            attend(&spec, 1, &sequences, &q, &mut out);
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                prop_assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "value {i}: {a} vs {b}");
            }
        }
    }
}
