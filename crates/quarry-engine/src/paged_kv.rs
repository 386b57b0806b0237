//! A paged KV cache: fixed-size blocks from a bounded pool, a block table per sequence, and
//! a prefix cache that lets sequences with the same beginning share blocks.
//!
//! A block holds `block_size` positions of every layer's keys and values. A sequence
//! ([`PagedSequence`]) is a list of reference-counted blocks; it writes only into its last,
//! partly filled block, which nobody else holds — blocks are shared only once full, and full
//! blocks are never written again. When a block fills up, the engine registers it in the
//! [`BlockPool`]'s prefix cache under a hash of every token up to its end and of the weights
//! it was computed with (the version of the FFN overlay, 0 for none: a chain's first block
//! has it as its parent); a later prompt that starts with the same tokens, under the same
//! weights, takes those blocks instead of recomputing them. Where the
//! prompt goes on to agree with only the beginning of a cached block (a shared system prompt
//! or chat header is rarely a whole number of blocks), the agreeing positions are copied into
//! the sequence's own first fresh block, so reuse is token-granular, as llama.cpp's prompt
//! cache is, while shared blocks stay immutable.
//!
//! Memory is bounded by the pool's block count. A block is *used* while a sequence holds it,
//! *cached* while only the prefix cache does (it can be evicted at any time, least recently
//! used first), and *free* otherwise. Admission reserves every block a sequence may ever
//! need ([`BlockPool::admit`]), so [`BlockPool::grow`] never runs out.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::Range;
use std::sync::Arc;

use half::f16;
use quarry_kernels::half_rows::narrow;
use quarry_model::{DeviceKv, DeviceKvPool, KvCache};

/// The shape of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShape {
    pub n_layers: usize,
    pub kv_dim: usize,
    /// Positions per block.
    pub block_size: usize,
}

impl BlockShape {
    /// Values in one block: keys and values of every layer.
    fn values(&self) -> usize {
        self.n_layers * 2 * self.block_size * self.kv_dim
    }

    /// Bytes of one block.
    pub fn bytes(&self) -> usize {
        self.values() * quarry_model::KV_BYTES_PER_VALUE
    }

    /// Blocks needed for `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Where the keys (`values = false`) or values of `layer` start within a block.
    fn offset(&self, layer: usize, values: bool) -> usize {
        (layer * 2 + usize::from(values)) * self.block_size * self.kv_dim
    }
}

/// `block_size` positions of keys and values for every layer: in `data`, or for a model on a
/// device, in block `index` of the device's pool (`data` then stays empty).
#[derive(Debug)]
pub struct KvBlock {
    data: Vec<f16>,
    index: usize,
}

/// One sequence's KV cache: its block table and length. Implements [`KvCache`] for the
/// forward pass; blocks come from a [`BlockPool`] and go back to it with
/// [`BlockPool::release`].
#[derive(Debug)]
pub struct PagedSequence {
    shape: BlockShape,
    blocks: Vec<Arc<KvBlock>>,
    len: usize,
    capacity: usize,
    /// Blocks this sequence may hold at most (reserved at admission).
    reserved: usize,
    /// Prefix-cache hashes of its full blocks, in order.
    hashes: Vec<u64>,
    /// The parent of its first block: the version of the weights it is computed with.
    root: u64,
    /// The device pool its blocks index, for a model on a device.
    device: Option<DeviceKvPool>,
}

impl PagedSequence {
    /// Blocks still to be allocated for this sequence, at most.
    fn outstanding(&self) -> usize {
        self.reserved.saturating_sub(self.blocks.len())
    }

    fn block_for_write(&mut self, index: usize) -> &mut KvBlock {
        Arc::get_mut(&mut self.blocks[index])
            .expect("a sequence writes only into its own last block, which it does not share")
    }
}

impl KvCache for PagedSequence {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn contiguous_run(&self) -> usize {
        self.shape.block_size
    }

    fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (bs, kv_dim) = (self.shape.block_size, self.shape.kv_dim);
        let n = k.len() / kv_dim;
        assert!(
            (self.len + n).div_ceil(bs) <= self.blocks.len(),
            "KV blocks are allocated before the forward pass writes them"
        );
        let (key_at, value_at) = (
            self.shape.offset(layer, false),
            self.shape.offset(layer, true),
        );
        let mut done = 0;
        while done < n {
            let pos = self.len + done;
            let (block, slot) = (pos / bs, pos % bs);
            let run = (bs - slot).min(n - done);
            let new = done * kv_dim..(done + run) * kv_dim;
            let data = &mut self.block_for_write(block).data;
            let at = slot * kv_dim;
            narrow(
                &k[new.clone()],
                &mut data[key_at + at..key_at + at + run * kv_dim],
            );
            narrow(
                &v[new],
                &mut data[value_at + at..value_at + at + run * kv_dim],
            );
            done += run;
        }
    }

    fn keys(&self, layer: usize, positions: Range<usize>) -> &[f16] {
        self.slice(self.shape.offset(layer, false), positions)
    }

    fn values(&self, layer: usize, positions: Range<usize>) -> &[f16] {
        self.slice(self.shape.offset(layer, true), positions)
    }

    fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The device pool's blocks this sequence holds.
    fn device_kv(&mut self) -> Option<DeviceKv<'_>> {
        let pool = self.device.as_ref()?;
        Some(DeviceKv::Pages {
            pool,
            blocks: self.blocks.iter().map(|b| b.index).collect(),
        })
    }
}

impl PagedSequence {
    fn slice(&self, base: usize, positions: Range<usize>) -> &[f16] {
        let (bs, kv_dim) = (self.shape.block_size, self.shape.kv_dim);
        let (block, slot) = (positions.start / bs, positions.start % bs);
        assert!(
            positions.is_empty() || slot + positions.len() <= bs,
            "positions {positions:?} cross a block edge"
        );
        let at = base + slot * kv_dim;
        &self.blocks[block].data[at..at + positions.len() * kv_dim]
    }
}

/// A full block in the prefix cache.
#[derive(Debug)]
struct CachedBlock {
    /// Hash of everything before this block (for the first block, the weights' version).
    parent: u64,
    tokens: Vec<u32>,
    block: Arc<KvBlock>,
    /// Position of the block in its chain: of blocks used equally recently, the later ones
    /// of a chain are evicted first, since a chain is only reachable from its start.
    depth: usize,
    last_used: u64,
}

/// Block counts, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    pub total: usize,
    /// Held by at least one sequence.
    pub used: usize,
    /// Held only by the prefix cache (evictable).
    pub cached: usize,
    pub free: usize,
}

/// The bounded pool of blocks and the prefix cache; see the module docs.
#[derive(Debug)]
pub struct BlockPool {
    shape: BlockShape,
    total: usize,
    /// Blocks ever created (each lives in a sequence, the prefix cache or `recycled`).
    created: usize,
    recycled: Vec<KvBlock>,
    prefix: HashMap<u64, CachedBlock>,
    /// Where the blocks' keys and values live for a model on a device.
    device: Option<DeviceKvPool>,
    /// Sum of [`PagedSequence::outstanding`] over admitted sequences.
    outstanding: usize,
    clock: u64,
}

impl BlockPool {
    /// A pool of at most `total` blocks of `shape` (allocated as needed).
    pub fn new(shape: BlockShape, total: usize) -> BlockPool {
        BlockPool {
            shape,
            total,
            created: 0,
            recycled: Vec::new(),
            prefix: HashMap::new(),
            device: None,
            outstanding: 0,
            clock: 0,
        }
    }

    /// A pool whose blocks are those of `device` (one per block of `device`, of its size):
    /// the blocks here only count positions and are shared and cached as on the CPU.
    pub fn on_device(shape: BlockShape, device: DeviceKvPool) -> BlockPool {
        debug_assert_eq!(device.block_size(), shape.block_size);
        BlockPool {
            device: Some(device.clone()),
            ..BlockPool::new(shape, device.blocks())
        }
    }

    pub fn shape(&self) -> BlockShape {
        self.shape
    }

    pub fn counts(&self) -> BlockCounts {
        let cached = self
            .prefix
            .values()
            .filter(|c| Arc::strong_count(&c.block) == 1)
            .count();
        let used = self.created - self.recycled.len() - cached;
        BlockCounts {
            total: self.total,
            used,
            cached,
            free: self.total - used - cached,
        }
    }

    /// A sequence for `tokens` (the prompt) that may grow to `limit` positions (`capacity`
    /// is the context), starting from the longest cached prefix of the prompt that leaves at
    /// least its last token to evaluate: the run of cached full blocks that matches, then the
    /// positions of the cached block after them that agree longest with the prompt (copied).
    /// `None` when the pool cannot promise the blocks it may need beside those of the
    /// sequences already admitted. Only blocks computed under the same weights (`weights`:
    /// the overlay's version, 0 for none) are reused.
    pub fn admit(
        &mut self,
        tokens: &[u32],
        limit: usize,
        capacity: usize,
        weights: u64,
    ) -> Option<PagedSequence> {
        let bs = self.shape.block_size;
        let reserved = self.shape.blocks_for(limit.min(capacity));
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = weights;
        // The last prompt token is always evaluated: its logits choose the first new token.
        let reusable = &tokens[..tokens.len().saturating_sub(1)];
        for chunk in reusable.chunks_exact(bs) {
            let hash = block_hash(parent, chunk);
            match self.prefix.get(&hash) {
                Some(c) if c.parent == parent && c.tokens == chunk => {
                    blocks.push(Arc::clone(&c.block));
                    hashes.push(hash);
                    parent = hash;
                }
                _ => break,
            }
        }
        let mut sequence = PagedSequence {
            shape: self.shape,
            len: blocks.len() * bs,
            blocks,
            capacity,
            reserved,
            hashes,
            root: weights,
            device: self.device.clone(),
        };
        let used = self.counts().used;
        if used + self.outstanding + sequence.outstanding() > self.total {
            return None;
        }
        // Only for a sequence that is admitted: the scan is over every cached block.
        let partial = self.longest_partial_match(parent, &reusable[sequence.len..]);
        self.clock += 1;
        let touched = sequence
            .hashes
            .iter()
            .chain(partial.as_ref().map(|(h, _)| h));
        for hash in touched {
            if let Some(c) = self.prefix.get_mut(hash) {
                c.last_used = self.clock;
            }
        }
        self.outstanding += sequence.outstanding();
        if let Some((hash, agreeing)) = partial {
            self.copy_partial(&mut sequence, hash, agreeing);
        }
        Some(sequence)
    }

    /// The cached block following the chain `parent` whose tokens agree longest with the
    /// beginning of `rest` (fewer than a block's worth: a whole block would have matched by
    /// hash), and how many agree; `None` when none agrees at all.
    fn longest_partial_match(&self, parent: u64, rest: &[u32]) -> Option<(u64, usize)> {
        self.prefix
            .iter()
            .filter(|(_, c)| c.parent == parent)
            .map(|(&hash, c)| {
                let agreeing = c.tokens.iter().zip(rest).take_while(|(a, b)| a == b);
                (hash, agreeing.count())
            })
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(hash, n)| (n, hash))
    }

    /// Gives `sequence` its next block holding the first `agreeing` positions of the cached
    /// block `hash` (every layer's keys and values).
    fn copy_partial(&mut self, sequence: &mut PagedSequence, hash: u64, agreeing: usize) {
        let source = Arc::clone(&self.prefix[&hash].block);
        // Held here, the source cannot be evicted to make room for its own copy.
        let (block, copied) = match self.take_block() {
            Some(mut block) => {
                let copied = self.copy_positions(&source, &mut block, agreeing);
                (block, copied)
            }
            None => {
                // The source is the only block that can be evicted: it becomes the copy, its
                // positions already in place (later ones are overwritten before being read).
                drop(source);
                let cached = self.prefix.remove(&hash).expect("the source is cached");
                let block =
                    Arc::into_inner(cached.block).expect("only the prefix cache held the source");
                (block, agreeing)
            }
        };
        sequence.blocks.push(Arc::new(block));
        sequence.len += copied;
        self.outstanding -= 1;
    }

    /// Copies the first `positions` positions of `source` into `block` (every layer's keys
    /// and values, wherever the pool keeps them); how many it copied. Where a device's copy
    /// fails (a lost device) that is none: the positions are computed again, and the forward
    /// pass reports the device's state.
    fn copy_positions(&self, source: &KvBlock, block: &mut KvBlock, positions: usize) -> usize {
        if let Some(device) = &self.device {
            return match device.copy_positions(source.index, block.index, positions) {
                Ok(()) => positions,
                Err(_) => 0,
            };
        }
        let len = positions * self.shape.kv_dim;
        for layer in 0..self.shape.n_layers {
            for values in [false, true] {
                let at = self.shape.offset(layer, values);
                block.data[at..at + len].copy_from_slice(&source.data[at..at + len]);
            }
        }
        positions
    }

    /// Gives `sequence` the blocks it needs to hold `positions` positions.
    pub fn grow(&mut self, sequence: &mut PagedSequence, positions: usize) {
        let needed = self.shape.blocks_for(positions);
        assert!(
            needed <= sequence.reserved,
            "a sequence grows beyond the blocks reserved for it"
        );
        while sequence.blocks.len() < needed {
            // Admission guarantees a cached-only block exists when the pool is exhausted.
            let block = self
                .take_block()
                .expect("admission reserved every block a sequence grows into");
            sequence.blocks.push(Arc::new(block));
            self.outstanding -= 1;
        }
    }

    /// A recycled block, a new one while the pool is not exhausted, or else the least
    /// recently used block that only the prefix cache holds; `None` when there is none.
    fn take_block(&mut self) -> Option<KvBlock> {
        if let Some(block) = self.recycled.pop() {
            return Some(block);
        }
        if self.created < self.total {
            self.created += 1;
            let values = match self.device {
                Some(_) => 0,
                None => self.shape.values(),
            };
            return Some(KvBlock {
                data: bytemuck::zeroed_vec(values),
                index: self.created - 1,
            });
        }
        let (&hash, _) = self
            .prefix
            .iter()
            .filter(|(_, c)| Arc::strong_count(&c.block) == 1)
            .min_by_key(|(_, c)| (c.last_used, std::cmp::Reverse(c.depth)))?;
        let evicted = self.prefix.remove(&hash).expect("the key was just found");
        Some(Arc::into_inner(evicted.block).expect("only the prefix cache held it"))
    }

    /// Registers the full blocks of `sequence` (whose tokens so far are `tokens`) in the
    /// prefix cache.
    pub fn register_full_blocks(&mut self, sequence: &mut PagedSequence, tokens: &[u32]) {
        let bs = self.shape.block_size;
        let full = sequence.len.min(tokens.len()) / bs;
        self.clock += 1;
        while sequence.hashes.len() < full {
            let i = sequence.hashes.len();
            let parent = sequence.hashes.last().copied().unwrap_or(sequence.root);
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let hash = block_hash(parent, chunk);
            let clock = self.clock;
            self.prefix.entry(hash).or_insert_with(|| CachedBlock {
                parent,
                tokens: chunk.to_vec(),
                block: Arc::clone(&sequence.blocks[i]),
                depth: i,
                last_used: clock,
            });
            sequence.hashes.push(hash);
        }
    }

    /// Returns `sequence`'s blocks: those nobody else holds become free, the others stay with
    /// the prefix cache or the sequences sharing them.
    pub fn release(&mut self, sequence: PagedSequence) {
        self.outstanding -= sequence.outstanding();
        for block in sequence.blocks {
            if let Some(block) = Arc::into_inner(block) {
                self.recycled.push(block);
            }
        }
    }
}

/// The prefix-cache key of a block: its tokens and the key of the block before it (for the
/// first block, the version of the weights).
fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: BlockShape = BlockShape {
        n_layers: 2,
        kv_dim: 3,
        block_size: 4,
    };

    /// Writes `n` positions of recognisable keys and values (`±(layer·1000 + pos·10 + i)`).
    fn fill(seq: &mut PagedSequence, pool: &mut BlockPool, n: usize) {
        let start = seq.len();
        pool.grow(seq, start + n);
        for layer in 0..SHAPE.n_layers {
            let k: Vec<f32> = (start..start + n)
                .flat_map(|p| (0..3).map(move |i| (layer * 1000 + p * 10 + i) as f32))
                .collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            seq.write(layer, &k, &v);
        }
        seq.advance(n);
    }

    /// Runs a sequence of `tokens` (admitted empty) through the cache: its full blocks stay
    /// cached after its release.
    fn cache_sequence(pool: &mut BlockPool, tokens: &[u32]) {
        let mut seq = pool.admit(tokens, tokens.len(), 16, 0).unwrap();
        assert_eq!(seq.len(), 0);
        fill(&mut seq, pool, tokens.len());
        pool.register_full_blocks(&mut seq, tokens);
        pool.release(seq);
    }

    /// The key [`fill`] writes (an integer below 2048: exact in `f16`).
    fn key(layer: usize, pos: usize, i: usize) -> f16 {
        f16::from_f32((layer * 1000 + pos * 10 + i) as f32)
    }

    #[test]
    fn writes_across_block_edges_read_back_per_block() {
        let mut pool = BlockPool::new(SHAPE, 8);
        let mut seq = pool.admit(&[1; 3], 11, 16, 0).unwrap();
        fill(&mut seq, &mut pool, 3);
        fill(&mut seq, &mut pool, 6);
        fill(&mut seq, &mut pool, 1);
        assert_eq!(seq.len(), 10);
        for layer in 0..2 {
            for block_start in (0..10).step_by(4) {
                let end = (block_start + 4).min(10);
                let keys = seq.keys(layer, block_start..end);
                let values = seq.values(layer, block_start..end);
                for (j, pos) in (block_start..end).enumerate() {
                    for i in 0..3 {
                        assert_eq!(keys[j * 3 + i], key(layer, pos, i));
                        assert_eq!(values[j * 3 + i], -key(layer, pos, i));
                    }
                }
            }
        }
        assert_eq!(pool.counts().used, 3);
        pool.release(seq);
        assert_eq!(
            pool.counts(),
            BlockCounts {
                total: 8,
                used: 0,
                cached: 0,
                free: 8
            }
        );
    }

    #[test]
    fn admission_reserves_what_a_sequence_may_need() {
        let mut pool = BlockPool::new(SHAPE, 5);
        // 2 + 2 blocks promised; a third sequence needing 2 more does not fit.
        let a = pool.admit(&[1, 2], 8, 64, 0).unwrap();
        let b = pool.admit(&[3, 4], 7, 64, 0).unwrap();
        assert!(pool.admit(&[5, 6], 5, 64, 0).is_none());
        // One block fits; a limit beyond the context is cut to the context.
        let c = pool.admit(&[5, 6], 100, 4, 0).unwrap();
        pool.release(a);
        let d = pool.admit(&[5, 6], 5, 64, 0).unwrap();
        for s in [b, c, d] {
            pool.release(s);
        }
        assert_eq!(pool.counts().free, 5);
    }

    #[test]
    fn a_prompt_reuses_cached_full_blocks_and_evaluates_its_last_token() {
        let mut pool = BlockPool::new(SHAPE, 6);
        let tokens: Vec<u32> = (0..10).collect();
        cache_sequence(&mut pool, &tokens);
        // Two full blocks stay cached, the partial one is free again.
        assert_eq!(pool.counts().cached, 2);
        assert_eq!(pool.counts().used, 0);

        // Same first 8 tokens: both blocks are shared, evaluation resumes at 8.
        let mut second = pool
            .admit(&[0, 1, 2, 3, 4, 5, 6, 7, 99], 12, 16, 0)
            .unwrap();
        assert_eq!(second.len(), 8);
        assert_eq!(second.keys(1, 4..8)[0], key(1, 4, 0));
        assert_eq!(pool.counts().used, 2);
        fill(&mut second, &mut pool, 1);
        // A prompt of exactly the cached 8 tokens shares only the first block and copies 3
        // positions of the second: its last token must be evaluated again.
        let third = pool.admit(&tokens[..8], 8, 16, 0).unwrap();
        assert_eq!(third.len(), 7);
        // A different second block is not shared.
        let fourth = pool.admit(&[0, 1, 2, 3, 9, 9, 9, 9, 9], 9, 16, 0).unwrap();
        assert_eq!(fourth.len(), 4);
        for s in [second, third, fourth] {
            pool.release(s);
        }
        assert_eq!(pool.counts().used, 0);
    }

    #[test]
    fn blocks_are_reused_only_under_the_weights_they_were_computed_with() {
        let mut pool = BlockPool::new(SHAPE, 8);
        let tokens: Vec<u32> = (0..9).collect();
        // Cached under overlay version 7.
        let mut seq = pool.admit(&tokens, 9, 16, 7).unwrap();
        fill(&mut seq, &mut pool, 9);
        pool.register_full_blocks(&mut seq, &tokens);
        pool.release(seq);
        assert_eq!(pool.counts().cached, 2);
        // Neither whole blocks nor a partial copy go to the base weights or another overlay.
        for weights in [0, 8] {
            let other = pool.admit(&tokens, 9, 16, weights).unwrap();
            assert_eq!(other.len(), 0, "weights {weights}");
            pool.release(other);
        }
        let same = pool.admit(&tokens, 9, 16, 7).unwrap();
        assert_eq!(same.len(), 8);
        assert_eq!(same.keys(1, 4..8)[0], key(1, 4, 0));
        pool.release(same);
        // A sequence admitted under 8 registers its blocks under 8, beside those of 7.
        let mut eight = pool.admit(&tokens, 9, 16, 8).unwrap();
        fill(&mut eight, &mut pool, 9);
        pool.register_full_blocks(&mut eight, &tokens);
        pool.release(eight);
        assert_eq!(pool.counts().cached, 4);
        assert_eq!(pool.admit(&tokens, 9, 16, 8).unwrap().len(), 8);
    }

    #[test]
    fn a_prompt_agreeing_with_part_of_a_cached_block_copies_those_positions() {
        let mut pool = BlockPool::new(SHAPE, 6);
        let tokens: Vec<u32> = (0..10).collect();
        cache_sequence(&mut pool, &tokens);

        // Block 0 is shared, the 2 agreeing positions of block 1 are copied.
        let mut second = pool.admit(&[0, 1, 2, 3, 4, 5, 99, 98], 12, 16, 0).unwrap();
        assert_eq!(second.len(), 6);
        for layer in 0..2 {
            for (j, pos) in (4..6).enumerate() {
                for i in 0..3 {
                    assert_eq!(second.keys(layer, 4..6)[j * 3 + i], key(layer, pos, i));
                    assert_eq!(second.values(layer, 4..6)[j * 3 + i], -key(layer, pos, i));
                }
            }
        }
        assert_eq!(pool.counts().used, 2);
        assert_eq!(pool.counts().cached, 1);
        // Writing after the copy leaves the cached block as it was.
        pool.grow(&mut second, 8);
        second.write(0, &[-1.0; 6], &[-2.0; 6]);
        assert_eq!(second.keys(0, 6..8), &[f16::from_f32(-1.0); 6]);
        let third = pool.admit(&tokens[..9], 9, 16, 0).unwrap();
        assert_eq!(third.len(), 8);
        assert_eq!(third.keys(0, 4..8), second_block_keys(0).as_slice());
        // Nothing agrees beyond the chain: no copy.
        let fourth = pool.admit(&[0, 1, 2, 3, 50, 51], 6, 16, 0).unwrap();
        assert_eq!(fourth.len(), 4);
        for s in [second, third, fourth] {
            pool.release(s);
        }
        assert_eq!(pool.counts().used, 0);
    }

    /// The keys of positions 4..8 as [`fill`] writes them.
    fn second_block_keys(layer: usize) -> Vec<f16> {
        (4..8)
            .flat_map(|p| (0..3).map(move |i| key(layer, p, i)))
            .collect()
    }

    #[test]
    fn in_an_exhausted_pool_the_only_evictable_source_becomes_the_copy() {
        let mut pool = BlockPool::new(SHAPE, 2);
        let tokens: Vec<u32> = (0..8).collect();
        cache_sequence(&mut pool, &tokens);
        assert_eq!((pool.counts().cached, pool.counts().free), (2, 0));

        let second = pool.admit(&[0, 1, 2, 3, 4, 5, 77], 8, 16, 0).unwrap();
        assert_eq!(second.len(), 6);
        assert_eq!(second.keys(1, 4..6), &second_block_keys(1)[..6]);
        assert_eq!((pool.counts().used, pool.counts().cached), (2, 0));
        // The block left the prefix cache with its data: only block 0 is shared now.
        let third = pool.admit(&[0, 1, 2, 3, 9], 5, 16, 0);
        assert!(third.is_none(), "no block is left to promise");
        pool.release(second);
        let third = pool.admit(&tokens, 8, 16, 0).unwrap();
        assert_eq!(third.len(), 4);
        pool.release(third);
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_used_when_memory_is_needed() {
        let mut pool = BlockPool::new(SHAPE, 5);
        for base in [0u32, 100] {
            cache_sequence(&mut pool, &(base..base + 8).collect::<Vec<_>>());
        }
        assert_eq!(pool.counts().cached, 4);
        // Touch the first prompt's first block, then grow a sequence into three blocks: one
        // never used, then the two least recently used cached ones (the first prompt's second
        // block, then the second prompt's second block).
        let first = pool.admit(&[0, 1, 2, 3, 42], 5, 16, 0).unwrap();
        let mut fresh = pool.admit(&[7; 9], 12, 16, 0).unwrap();
        fill(&mut fresh, &mut pool, 12);
        assert_eq!(pool.counts().used, 4);
        assert_eq!(pool.counts().cached, 1);
        // The touched block survived.
        pool.release(fresh);
        pool.release(first);
        let again = pool.admit(&[0, 1, 2, 3, 42], 5, 16, 0).unwrap();
        assert_eq!(again.len(), 4);
        pool.release(again);
        // The second prompt lost its later block first.
        let second = pool
            .admit(&(100..109).collect::<Vec<_>>(), 9, 16, 0)
            .unwrap();
        assert_eq!(second.len(), 4);
        pool.release(second);
    }
}
