//! Key/value storage for incremental decoding.
//!
//! The forward pass talks to the cache only through [`KvCache`], so a contiguous cache (here)
//! and a paged, block-table cache (quarry-engine's, for batched serving) are interchangeable.
//! Positions are appended in order; a layer's keys and values for position `p` are `kv_dim`
//! values each, and positions within one aligned run of [`KvCache::contiguous_run`] are
//! adjacent in memory. Caches store them as `f16` (rounded to nearest on write, as llama.cpp's
//! default cache does): attention reads every one of them at every step, and half the bytes
//! is nearly half the time (see `quarry_kernels::half_rows`).

use std::any::Any;
use std::ops::Range;

use half::f16;
use quarry_kernels::half_rows::narrow;

use crate::backend::DeviceKvPool;

/// Bytes a cache spends on one stored key or value (an `f16`).
pub const KV_BYTES_PER_VALUE: usize = std::mem::size_of::<f16>();

/// Storage of the attention keys and values of past positions, per layer.
pub trait KvCache {
    /// Positions stored (the next token goes at this position).
    fn len(&self) -> usize;
    /// True when no position is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most positions the cache can hold.
    fn capacity(&self) -> usize;
    /// Positions `r·run .. (r+1)·run` are stored contiguously; ranges passed to
    /// [`KvCache::keys`] and [`KvCache::values`] never cross a multiple of it.
    fn contiguous_run(&self) -> usize {
        usize::MAX
    }
    /// Writes keys and values of `n` new positions (starting at `len()`) for one layer, rounded
    /// to `f16`; `k` and `v` hold `n × kv_dim` floats. Visible to readers once
    /// [`KvCache::advance`] is called.
    fn write(&mut self, layer: usize, k: &[f32], v: &[f32]);
    /// Keys of `layer` at the positions in `positions` (within one contiguous run), `kv_dim`
    /// values each, consecutive; positions may include ones written but not yet advanced past.
    fn keys(&self, layer: usize, positions: Range<usize>) -> &[f16];
    /// Values of `layer` at the positions in `positions`, laid out like [`KvCache::keys`].
    fn values(&self, layer: usize, positions: Range<usize>) -> &[f16];
    /// Makes `n` written positions part of the sequence.
    fn advance(&mut self, n: usize);
    /// Drops every position at or after `len` (to rewind or reuse a prefix).
    fn truncate(&mut self, len: usize);
    /// Where a model on a device keeps this cache's keys and values (this cache then only
    /// counts positions); `None` for a cache that has no room for them.
    fn device_kv(&mut self) -> Option<DeviceKv<'_>> {
        None
    }
}

/// Where a device keeps one sequence's keys and values ([`KvCache::device_kv`]).
pub enum DeviceKv<'a> {
    /// Buffers of the cache's own, made in `slot` on first use, for `positions` positions.
    Own {
        slot: &'a mut DeviceSlot,
        positions: usize,
    },
    /// Blocks of a pool shared with other sequences: `blocks[i]` holds positions
    /// `i · block_size ..` of the sequence.
    Pages {
        pool: &'a DeviceKvPool,
        blocks: Vec<usize>,
    },
}

/// A device backend's keys and values for one sequence, held by the sequence's cache so they
/// live and die with it; the backend fills it on first use ([`crate::Backend::Kv`]).
#[derive(Default)]
pub struct DeviceSlot(pub(crate) Option<Box<dyn Any + Send + Sync>>);

impl std::fmt::Debug for DeviceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "DeviceSlot(filled)"
        } else {
            "DeviceSlot(empty)"
        })
    }
}

impl Clone for DeviceSlot {
    /// A clone starts empty: device buffers are not copied, and a device model refuses a
    /// cache that counts positions its slot does not hold.
    fn clone(&self) -> Self {
        DeviceSlot(None)
    }
}

/// One contiguous buffer per layer, sized for the whole context up front.
#[derive(Clone, Debug)]
pub struct ContiguousKvCache {
    kv_dim: usize,
    capacity: usize,
    len: usize,
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    device: DeviceSlot,
}

impl ContiguousKvCache {
    pub fn new(n_layers: usize, kv_dim: usize, capacity: usize) -> ContiguousKvCache {
        ContiguousKvCache {
            kv_dim,
            capacity,
            len: 0,
            // One zeroed allocation per buffer (not clones of one), so the OS maps pages on
            // first write and a cache sized for a long context costs memory only as it fills
            // (nothing at all for a model on a device, which keeps its own in `device`).
            keys: (0..n_layers)
                .map(|_| bytemuck::zeroed_vec(kv_dim * capacity))
                .collect(),
            values: (0..n_layers)
                .map(|_| bytemuck::zeroed_vec(kv_dim * capacity))
                .collect(),
            device: DeviceSlot::default(),
        }
    }
}

impl KvCache for ContiguousKvCache {
    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let start = self.len * self.kv_dim;
        assert!(
            start + k.len() <= self.capacity * self.kv_dim,
            "KV cache overflow (the caller checks capacity before the forward pass)"
        );
        narrow(k, &mut self.keys[layer][start..start + k.len()]);
        narrow(v, &mut self.values[layer][start..start + v.len()]);
    }

    fn keys(&self, layer: usize, positions: Range<usize>) -> &[f16] {
        &self.keys[layer][positions.start * self.kv_dim..positions.end * self.kv_dim]
    }

    fn values(&self, layer: usize, positions: Range<usize>) -> &[f16] {
        &self.values[layer][positions.start * self.kv_dim..positions.end * self.kv_dim]
    }

    fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.capacity);
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    fn device_kv(&mut self) -> Option<DeviceKv<'_>> {
        Some(DeviceKv::Own {
            slot: &mut self.device,
            positions: self.capacity,
        })
    }
}
