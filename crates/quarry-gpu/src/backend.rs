//! The GPU as a [`quarry_model::Backend`]: weights uploaded once as the file stores them,
//! every activation and the keys and values kept on the device, and only the rows asked for
//! read back.
//!
//! Operations are recorded into one command encoder and submitted in batches of
//! [`DISPATCHES_PER_SUBMIT`] (so the device starts while the host records the rest); only a
//! read waits. Errors wgpu reports late (validation, a lost device) surface at that read.
//! Threads may share a backend: the encoder is taken and submitted under one lock, so the
//! work each thread records runs in the order it recorded it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use quarry_kernels::WeightView;
use quarry_model::ops::RopeTable;
use quarry_model::{Activation, AttentionSpec, ModelError, RopeStyle, RowPlan, SequenceRows};

use crate::context::Gpu;
use crate::error::GpuError;
use crate::gemv::{params_and_storage_layout, params_entry, GpuMatrix, PARAMS_STRIDE};
use crate::ops::{Op, WORKGROUP};
use crate::recent::Recent;

/// Dispatches recorded before the encoder is submitted without waiting.
const DISPATCHES_PER_SUBMIT: usize = 128;

/// Ops whose parameters one encoder's buffer holds. Every op counts as a dispatch, and an
/// encoder is submitted at [`DISPATCHES_PER_SUBMIT`], so its ops never need more.
const PARAMS_SLOTS: usize = DISPATCHES_PER_SUBMIT;

/// Score values one attention dispatch may keep (query rows × heads × positions); longer
/// prompts are attended in several dispatches of fewer rows.
const MAX_SCORES: usize = 1 << 24;

/// A device buffer of `rows × cols` `f32`.
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    rows: usize,
    cols: usize,
    /// Where the buffer goes when the tensor is dropped (activations; `None` for weights).
    spare: Option<Arc<Mutex<Spare>>>,
}

impl Drop for GpuTensor {
    fn drop(&mut self) {
        if let Some(spare) = &self.spare {
            spare
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(self.buffer.clone());
        }
    }
}

/// How activation (and scratch) buffers are used: bound, copied from, cleared or written.
const ACTIVATIONS: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Bytes of activation buffers kept for later tensors at most.
const SPARE_BYTES: u64 = 128 << 20;

/// Activation buffers no tensor holds, for the next tensors of their size: a pass makes the
/// same tensors as the one before it, so a steady decode makes none. A buffer given back while
/// work is being recorded may still be read by that work: it is `pending` until the work is
/// submitted. Any spare may be cleared by recorded work (which runs after its earlier
/// holder's, in order), but only a `ready` one may be filled by a queued write, which the
/// device runs before the open encoder's work. Over [`SPARE_BYTES`], the oldest go (and the
/// bind groups that hold them).
struct Spare {
    /// Oldest first, in both.
    ready: Vec<wgpu::Buffer>,
    pending: Vec<wgpu::Buffer>,
    bytes: u64,
    bind_groups: BindGroupCache,
}

impl Spare {
    /// The newest spare of `size` bytes; only a ready one when `ready_only`.
    fn take(&mut self, size: u64, ready_only: bool) -> Option<wgpu::Buffer> {
        let pick = |list: &mut Vec<wgpu::Buffer>| {
            let i = list.iter().rposition(|b| b.size() == size)?;
            Some(list.remove(i))
        };
        let buffer = match ready_only {
            true => pick(&mut self.ready),
            false => pick(&mut self.ready).or_else(|| pick(&mut self.pending)),
        }?;
        self.bytes -= size;
        Some(buffer)
    }

    fn put(&mut self, buffer: wgpu::Buffer) {
        self.bytes += buffer.size();
        self.pending.push(buffer);
        let mut evicted = Vec::new();
        while self.bytes > SPARE_BYTES {
            let list = match self.ready.is_empty() {
                true => &mut self.pending,
                false => &mut self.ready,
            };
            let old = list.remove(0);
            self.bytes -= old.size();
            evicted.push(old);
        }
        forget(&self.bind_groups, &evicted);
    }

    /// The recorded work was submitted: every spare may be written by the queue.
    fn submitted(&mut self) {
        self.ready.append(&mut self.pending);
    }
}

/// Each op's bind group for the buffers it was given; see [`GpuBackend::dispatch`].
type BindGroupCache = Arc<Mutex<HashMap<(Op, Vec<wgpu::Buffer>), wgpu::BindGroup>>>;

/// Drops the cached bind groups that hold any of `buffers`, whose owner let them go (a bind
/// group would keep a buffer's memory).
fn forget(cache: &BindGroupCache, buffers: &[wgpu::Buffer]) {
    if buffers.is_empty() {
        return;
    }
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(_, bound), _| !bound.iter().any(|b| buffers.contains(b)));
}

/// A rotary table on the device: `[cos, sin]` per row and pair.
pub struct GpuRotation {
    table: GpuTensor,
    rows: usize,
    /// Pairs per head (rotated dims / 2).
    half: usize,
    /// 0 for adjacent pairs, 1 for halves (the kernel's `b.y`).
    style: u32,
}

/// Keys and values of `blocks` blocks of `block_size` positions: per layer one buffer of keys
/// and one of values, each position `kv_dim` values rounded to `f16` (as the CPU's caches
/// round them) and packed in pairs into `u32`.
pub struct GpuKvPool {
    keys: Vec<wgpu::Buffer>,
    values: Vec<wgpu::Buffer>,
    kv_dim: usize,
    block_size: usize,
    blocks: usize,
    bind_groups: BindGroupCache,
}

impl Drop for GpuKvPool {
    fn drop(&mut self) {
        let buffers: Vec<_> = self.keys.iter().chain(&self.values).cloned().collect();
        forget(&self.bind_groups, &buffers);
    }
}

/// A sequence's keys and values: its blocks of a pool, through a block table on the device
/// (position `p` is row `table[p / block_size] · block_size + p % block_size` of the pool).
pub struct GpuKv {
    keys: Vec<wgpu::Buffer>,
    values: Vec<wgpu::Buffer>,
    table: wgpu::Buffer,
    kv_dim: usize,
    block_size: usize,
    capacity: usize,
}

/// A GPU running a model's forward pass.
pub struct GpuBackend {
    gpu: Gpu,
    recording: Mutex<Recording>,
    pipelines: Mutex<HashMap<Op, Arc<OpPipeline>>>,
    spare: Arc<Mutex<Spare>>,
    /// Each op's bind group for the buffers it was given (its parameters are at a dynamic
    /// offset of the one parameter buffer): a steady pass binds the same buffers each time.
    /// Entries go when a buffer's owner lets it go (a KV pool dropped, a spare evicted).
    bind_groups: BindGroupCache,
    /// Block tables uploaded lately, newest last: a sequence's stays the same from one pass to
    /// the next until it takes another block.
    tables: Mutex<Recent<(Vec<u32>, wgpu::Buffer)>>,
}

/// Block tables [`GpuBackend::block_table`] keeps (a batch's, and some).
const RECENT_TABLES: usize = 512;

/// An op's pipeline and the layout of its bind group (parameters at a dynamic offset).
struct OpPipeline {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Work recorded and not yet submitted: the encoder, and the parameters of its ops. These go
/// to the device in one buffer (`params`, one slot per op of an encoder, written when the
/// encoder is submitted) instead of one buffer per op; the buffer stays the same from one
/// encoder to the next, so an op's bind group can too.
struct Recording {
    encoder: Option<wgpu::CommandEncoder>,
    dispatches: usize,
    params: Option<wgpu::Buffer>,
    /// The ops' parameters so far, `PARAMS_STRIDE` bytes each.
    staged: Vec<u8>,
}

impl Recording {
    /// The encoder, ready to submit, with its ops' parameters queued for the device (a
    /// queued write runs after the work submitted before it and before the encoder's); the
    /// recording is left empty.
    fn take(&mut self, queue: &wgpu::Queue) -> Option<wgpu::CommandEncoder> {
        if let (Some(params), false) = (&self.params, self.staged.is_empty()) {
            queue.write_buffer(params, 0, &self.staged);
        }
        self.staged.clear();
        self.dispatches = 0;
        self.encoder.take()
    }
}

/// Bind groups of ops [`GpuBackend::dispatch`] keeps (all are dropped when there are more):
/// two a layer for each sequence of a batch (KV store and attention bind its blocks), and the
/// rest, for batches of a few hundred sequences.
const BIND_GROUPS: usize = 1 << 15;

fn device_error(e: GpuError) -> ModelError {
    ModelError::Device(format!("gpu: {e}"))
}

impl GpuBackend {
    pub fn new(gpu: Gpu) -> Self {
        let bind_groups = BindGroupCache::default();
        Self {
            gpu,
            recording: Mutex::new(Recording {
                encoder: None,
                dispatches: 0,
                params: None,
                staged: Vec::new(),
            }),
            pipelines: Mutex::new(HashMap::new()),
            spare: Arc::new(Mutex::new(Spare {
                ready: Vec::new(),
                pending: Vec::new(),
                bytes: 0,
                bind_groups: bind_groups.clone(),
            })),
            bind_groups,
            tables: Mutex::new(Recent::new(RECENT_TABLES)),
        }
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Bind groups of ops kept for later passes (a diagnostic: they hold their buffers).
    pub fn bind_groups_held(&self) -> usize {
        self.bind_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn new_encoder(&self, label: &'static str) -> wgpu::CommandEncoder {
        self.gpu
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) })
    }

    fn recording(&self) -> MutexGuard<'_, Recording> {
        self.recording.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `record` on the open encoder; submits it (without waiting) once it holds enough.
    fn record(&self, dispatches: usize, record: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut r = self.recording();
        self.record_locked(&mut r, dispatches, record);
    }

    /// [`GpuBackend::record`] under the recording lock, held by the caller.
    fn record_locked(
        &self,
        r: &mut Recording,
        dispatches: usize,
        record: impl FnOnce(&mut wgpu::CommandEncoder),
    ) {
        let encoder = r.encoder.get_or_insert_with(|| self.new_encoder("forward"));
        record(encoder);
        r.dispatches += dispatches;
        if r.dispatches >= DISPATCHES_PER_SUBMIT {
            let encoder = r.take(self.gpu.queue()).expect("just used");
            self.gpu.queue().submit([encoder.finish()]);
            self.submitted();
        }
    }

    fn pipeline(&self, op: Op) -> Result<Arc<OpPipeline>, ModelError> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&op) {
            return Ok(p.clone());
        }
        let compiled = self
            .gpu
            .scoped("compiling a forward-pass kernel", 0, |d| {
                let layout = params_and_storage_layout(d, "forward op", op.storage());
                let pipeline_layout = d.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("forward op"),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
                let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("forward op"),
                    source: wgpu::ShaderSource::Wgsl(op.source().into()),
                });
                let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("forward op"),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                });
                OpPipeline { pipeline, layout }
            })
            .map_err(device_error)?;
        let compiled = Arc::new(compiled);
        cache.insert(op, compiled.clone());
        Ok(compiled)
    }

    /// Records one dispatch of `op` over `groups` workgroups with the parameters `params`
    /// (three `vec4<u32>`) and `buffers` bound from 1 on.
    fn dispatch(
        &self,
        op: Op,
        params: [u32; 12],
        buffers: &[&wgpu::Buffer],
        groups: (u32, u32),
    ) -> Result<(), ModelError> {
        let pipeline = self.pipeline(op)?;
        let mut r = self.recording();
        debug_assert!(r.staged.len() < PARAMS_SLOTS * PARAMS_STRIDE);
        if r.params.is_none() {
            let params = self
                .gpu
                .create_buffer(
                    "op parameters",
                    (PARAMS_SLOTS * PARAMS_STRIDE) as u64,
                    wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                )
                .map_err(device_error)?;
            r.params = Some(params);
        }
        let params_buffer = r.params.as_ref().expect("just made");
        let key = (op, buffers.iter().map(|&b| b.clone()).collect::<Vec<_>>());
        let bind_group =
            {
                let mut groups = self.bind_groups.lock().unwrap_or_else(|p| p.into_inner());
                match groups.get(&key) {
                    Some(group) => group.clone(),
                    None => {
                        let mut entries = vec![params_entry(params_buffer)];
                        entries.extend(buffers.iter().enumerate().map(|(i, b)| {
                            wgpu::BindGroupEntry {
                                binding: i as u32 + 1,
                                resource: b.as_entire_binding(),
                            }
                        }));
                        let group = self
                            .gpu
                            .bind_group("binding a forward op", &pipeline.layout, &entries)
                            .map_err(device_error)?;
                        if groups.len() >= BIND_GROUPS {
                            groups.clear();
                        }
                        groups.insert(key, group.clone());
                        group
                    }
                }
            };
        let offset = r.staged.len();
        r.staged.extend_from_slice(bytemuck::bytes_of(&params));
        r.staged.resize(offset + PARAMS_STRIDE, 0);
        self.record_locked(&mut r, 1, |encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("forward op"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, Some(&bind_group), &[offset as u32]);
            pass.dispatch_workgroups(groups.0, groups.1, 1);
        });
        Ok(())
    }

    /// A 2-D grid of `n` workgroups, and its width (for kernels that flatten it).
    fn grid(&self, n: usize) -> Result<(u32, u32), ModelError> {
        self.gpu.grid(n).map_err(device_error)
    }

    /// An element-wise `op` over every value of `x` (`extra`: its `a.z` parameter), with
    /// `other` bound after `x`.
    fn elementwise(
        &self,
        op: Op,
        x: &GpuTensor,
        other: Option<&wgpu::Buffer>,
        extra: u32,
    ) -> Result<(), ModelError> {
        let n = x.rows * x.cols;
        let (gx, gy) = self.grid(n.div_ceil(WORKGROUP as usize))?;
        let params = [n as u32, gx, extra, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut buffers = vec![&x.buffer];
        buffers.extend(other);
        self.dispatch(op, params, &buffers, (gx, gy))
    }

    fn same_shape(what: &str, a: &GpuTensor, b: &GpuTensor) -> Result<(), ModelError> {
        if (a.rows, a.cols) != (b.rows, b.cols) {
            return Err(ModelError::Device(format!(
                "gpu: {what}: {}×{} and {}×{} differ",
                a.rows, a.cols, b.rows, b.cols
            )));
        }
        Ok(())
    }
}

/// Bytes of a buffer for `n` f32 (at least 16, a multiple of 16, as bindings want).
fn bytes_of(n: usize) -> u64 {
    (n as u64 * 4).max(16).next_multiple_of(16)
}

impl quarry_model::DeviceBackend for GpuBackend {
    type KvPool = GpuKvPool;

    fn matrix(&self, name: &str, view: WeightView<'_>) -> Result<GpuMatrix, ModelError> {
        GpuMatrix::upload(
            &self.gpu,
            view.dtype(),
            view.rows(),
            view.cols(),
            view.data(),
        )
        .map_err(|e| ModelError::Device(format!("gpu: tensor '{name}': {e}")))
    }

    fn vector(&self, name: &str, values: &[f32]) -> Result<GpuTensor, ModelError> {
        self.buffer_tensor(1, values.len(), values, false)
            .map_err(|e| ModelError::Device(format!("{e} (vector '{name}')")))
    }

    fn kv_pool(
        &self,
        layers: usize,
        kv_dim: usize,
        block_size: usize,
        blocks: usize,
    ) -> Result<GpuKvPool, ModelError> {
        if !kv_dim.is_multiple_of(2) {
            return Err(ModelError::Device(format!(
                "gpu: keys of {kv_dim} values (the device packs them in pairs)"
            )));
        }
        let bytes = (blocks as u64)
            .saturating_mul(block_size as u64)
            .saturating_mul(kv_dim as u64 * 2);
        // The kernels index a pool in u32 words.
        let limit = self
            .gpu
            .limits()
            .max_storage_buffer_binding_size
            .min(u32::MAX as u64);
        if bytes > limit {
            return Err(ModelError::Device(format!(
                "gpu: {blocks} KV blocks of {block_size} positions need {} MiB per layer, \
                 more than the {} MiB one binding of {} may hold; lower the KV memory or the \
                 context",
                bytes >> 20,
                limit >> 20,
                self.gpu.adapter().name
            )));
        }
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let buffer = || self.gpu.create_buffer("KV cache", bytes.max(16), usage);
        let keys = (0..layers).map(|_| buffer()).collect::<Result<Vec<_>, _>>();
        let values = (0..layers).map(|_| buffer()).collect::<Result<Vec<_>, _>>();
        Ok(GpuKvPool {
            keys: keys.map_err(device_error)?,
            values: values.map_err(device_error)?,
            kv_dim,
            block_size,
            blocks,
            bind_groups: self.bind_groups.clone(),
        })
    }

    fn kv_view(&self, pool: &GpuKvPool, blocks: &[usize]) -> Result<GpuKv, ModelError> {
        let table = blocks
            .iter()
            .map(|&b| match b < pool.blocks {
                true => Ok(b as u32),
                false => Err(ModelError::Device(format!(
                    "gpu: block {b} of a pool of {}",
                    pool.blocks
                ))),
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let table = self.block_table(table)?;
        Ok(GpuKv {
            keys: pool.keys.clone(),
            values: pool.values.clone(),
            table,
            kv_dim: pool.kv_dim,
            block_size: pool.block_size,
            capacity: blocks.len() * pool.block_size,
        })
    }

    fn kv_copy(
        &self,
        pool: &GpuKvPool,
        from: usize,
        to: usize,
        positions: usize,
    ) -> Result<(), ModelError> {
        if from.max(to) >= pool.blocks || positions > pool.block_size {
            return Err(ModelError::Device(format!(
                "gpu: {positions} positions from block {from} to {to} of a pool of {} × {}",
                pool.blocks, pool.block_size
            )));
        }
        // Words (f16 pairs) of a block and of the positions copied.
        let block_words = pool.block_size * pool.kv_dim / 2;
        let words = positions * pool.kv_dim / 2;
        if words == 0 || from == to {
            return Ok(());
        }
        let (gx, gy) = self.grid(words.div_ceil(WORKGROUP as usize))?;
        let params = [
            words as u32,
            gx,
            (from * block_words) as u32,
            (to * block_words) as u32,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        for (keys, values) in pool.keys.iter().zip(&pool.values) {
            self.dispatch(Op::KvCopy, params, &[keys, values], (gx, gy))?;
        }
        Ok(())
    }
}

/// Helpers of the trait's operations: a tensor from values, one product, one rotation, one
/// sequence's attention.
impl GpuBackend {
    /// A tensor of `rows × cols` holding `values` (zeros when `values` is empty); an
    /// activation's buffer (`spare`) goes back to the spares when it is dropped.
    fn buffer_tensor(
        &self,
        rows: usize,
        cols: usize,
        values: &[f32],
        spare: bool,
    ) -> Result<GpuTensor, ModelError> {
        if !values.is_empty() && values.len() != rows * cols {
            return Err(ModelError::Device(format!(
                "gpu: {} values for a {rows}×{cols} tensor",
                values.len()
            )));
        }
        let size = bytes_of(rows * cols);
        let reused = match spare {
            true => self.take_spare(size, !values.is_empty()),
            false => None,
        };
        let buffer = match (reused, values.is_empty()) {
            (Some(buffer), true) => {
                // Zeros, as a new buffer holds, after its earlier holder's work.
                self.record(0, |e| e.clear_buffer(&buffer, 0, None));
                buffer
            }
            (Some(buffer), false) => {
                self.gpu
                    .queue()
                    .write_buffer(&buffer, 0, bytemuck::cast_slice(values));
                buffer
            }
            (None, true) => self
                .gpu
                .create_buffer("activations", size, ACTIVATIONS)
                .map_err(device_error)?,
            (None, false) => self
                .gpu
                .create_buffer_with("activations", bytemuck::cast_slice(values), 16, ACTIVATIONS)
                .map_err(device_error)?,
        };
        Ok(GpuTensor {
            buffer,
            rows,
            cols,
            spare: spare.then(|| self.spare.clone()),
        })
    }

    /// `out ← x · wᵀ`.
    fn product(&self, w: &GpuMatrix, x: &GpuTensor, out: &mut GpuTensor) -> Result<(), ModelError> {
        if x.cols != w.cols() || out.cols != w.rows() || out.rows != x.rows {
            return Err(ModelError::Device(format!(
                "gpu: a {}×{} matrix times {}×{} into {}×{}",
                w.rows(),
                w.cols(),
                x.rows,
                x.cols,
                out.rows,
                out.cols
            )));
        }
        let prepared = w
            .prepare_cached(&x.buffer, &out.buffer, x.rows)
            .map_err(device_error)?;
        self.record(prepared.dispatches(), |encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("matmul"),
                timestamp_writes: None,
            });
            prepared.record(&mut pass);
        });
        Ok(())
    }

    /// The recorded work was submitted (a queued write now runs after it): every spare is
    /// ready. Called under the recording lock, after the submission.
    fn submitted(&self) {
        self.spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .submitted();
    }

    fn take_spare(&self, size: u64, ready_only: bool) -> Option<wgpu::Buffer> {
        self.spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(size, ready_only)
    }

    /// Room for `n` `f32` of scratch (whatever it holds), back with the spares once dropped;
    /// sizes go up in powers of two, so one spare serves a sequence as it grows.
    fn scratch(&self, n: usize) -> Result<GpuTensor, ModelError> {
        let size = bytes_of(n).next_power_of_two();
        let buffer = match self.take_spare(size, false) {
            Some(buffer) => buffer,
            None => self
                .gpu
                .create_buffer("scratch", size, ACTIVATIONS)
                .map_err(device_error)?,
        };
        Ok(GpuTensor {
            buffer,
            rows: n,
            cols: 1,
            spare: Some(self.spare.clone()),
        })
    }

    /// A storage buffer holding `values` (one uploaded lately, when it held the same).
    fn block_table(&self, values: Vec<u32>) -> Result<wgpu::Buffer, ModelError> {
        let mut recent = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let (_, buffer) = recent.get_or_make(
            |(held, _)| *held == values,
            || {
                let buffer = self
                    .gpu
                    .create_buffer_with(
                        "KV block table",
                        bytemuck::cast_slice(&values),
                        16,
                        wgpu::BufferUsages::STORAGE,
                    )
                    .map_err(device_error)?;
                Ok::<_, ModelError>((values.clone(), buffer))
            },
        )?;
        Ok(buffer.clone())
    }

    /// Rotates every `head_dim`-wide head of row `t` of `x` by the table's row `t`.
    fn rotate(
        &self,
        x: &mut GpuTensor,
        rotation: &GpuRotation,
        head_dim: usize,
    ) -> Result<(), ModelError> {
        let half = rotation.half;
        if half == 0 {
            return Ok(());
        }
        if rotation.rows != x.rows || !x.cols.is_multiple_of(head_dim) {
            return Err(ModelError::Device(format!(
                "gpu: a rotation table of {} rows for {} rows of {} in heads of {head_dim}",
                rotation.rows, x.rows, x.cols
            )));
        }
        let heads = x.cols / head_dim;
        let n = x.rows * heads * half;
        let (gx, gy) = self.grid(n.div_ceil(WORKGROUP as usize))?;
        let params = [
            n as u32,
            gx,
            heads as u32,
            half as u32,
            head_dim as u32,
            rotation.style,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        self.dispatch(
            Op::Rope,
            params,
            &[&x.buffer, &rotation.table.buffer],
            (gx, gy),
        )
    }

    /// Attention of one sequence's rows `span.rows` of `q` over its keys and values.
    fn attend_one(
        &self,
        spec: &AttentionSpec,
        kv: &GpuKv,
        span: &SequenceRows,
        layer: usize,
        q: &GpuTensor,
        out: &GpuTensor,
    ) -> Result<(), ModelError> {
        let (heads, hd) = (spec.n_heads, spec.head_dim);
        let (start, rows) = (span.start, span.rows.len());
        if q.cols != heads * hd
            || spec.n_kv_heads == 0
            || !heads.is_multiple_of(spec.n_kv_heads)
            || spec.n_kv_heads * hd != kv.kv_dim
            || span.rows.end > q.rows
            || start + rows > kv.capacity
            || layer >= kv.keys.len()
            || !hd.is_multiple_of(2)
        {
            return Err(ModelError::Device(format!(
                "gpu: attention of {} heads of {hd} ({} KV heads), rows {:?} of {} × {} at \
                 {start}, in a cache of {} × {}",
                heads, spec.n_kv_heads, span.rows, q.rows, q.cols, kv.capacity, kv.kv_dim
            )));
        }
        // Rows per dispatch so that one dispatch's scores fit MAX_SCORES.
        let stride = start + rows;
        let per = (MAX_SCORES / (heads * stride)).clamp(1, rows.max(1));
        let max_y = self.gpu.limits().max_compute_workgroups_per_dimension as usize;
        let per = per.min(max_y);
        let scores = self.scratch(per * heads * stride)?;
        for first in (0..rows).step_by(per) {
            let params = [
                kv.block_size as u32,
                heads as u32,
                hd as u32,
                (heads / spec.n_kv_heads) as u32,
                kv.kv_dim as u32,
                start as u32,
                spec.window.unwrap_or(0) as u32,
                stride as u32,
                spec.scale.to_bits(),
                spec.softcap.unwrap_or(0.0).to_bits(),
                first as u32,
                span.rows.start as u32,
            ];
            self.dispatch(
                Op::Attention,
                params,
                &[
                    &q.buffer,
                    &kv.keys[layer],
                    &kv.values[layer],
                    &out.buffer,
                    &scores.buffer,
                    &kv.table,
                ],
                (heads as u32, per.min(rows - first) as u32),
            )?;
        }
        Ok(())
    }
}

impl quarry_model::Backend for GpuBackend {
    type Tensor = GpuTensor;
    type Matrix = GpuMatrix;
    type Vector = GpuTensor;
    type Kv = GpuKv;
    type Rotation<'r> = GpuRotation;

    fn describe(&self) -> String {
        let a = self.gpu.adapter();
        format!("gpu {} ({})", a.name, a.backend)
    }

    fn tensor(&self, plan: &RowPlan, cols: usize, values: &[f32]) -> Result<GpuTensor, ModelError> {
        self.buffer_tensor(plan.rows, cols, values, true)
    }

    fn copy(&self, x: &GpuTensor, out: &mut GpuTensor) -> Result<(), ModelError> {
        Self::same_shape("copy", x, out)?;
        let bytes = (x.rows * x.cols * 4) as u64;
        self.record(0, |e| {
            e.copy_buffer_to_buffer(&x.buffer, 0, &out.buffer, 0, bytes)
        });
        Ok(())
    }

    fn rms_norm(&self, x: &mut GpuTensor, gain: &GpuTensor, eps: f32) -> Result<(), ModelError> {
        let width = gain.cols;
        if width == 0 || !(x.rows * x.cols).is_multiple_of(width) {
            return Err(ModelError::Device(format!(
                "gpu: a norm of {width} values over rows of {}",
                x.cols
            )));
        }
        let runs = x.rows * x.cols / width;
        let (gx, gy) = self.grid(runs)?;
        let params = [
            width as u32,
            runs as u32,
            eps.to_bits(),
            gx,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        self.dispatch(Op::RmsNorm, params, &[&x.buffer, &gain.buffer], (gx, gy))
    }

    fn matmul_many(
        &self,
        products: &mut [(&GpuMatrix, &mut GpuTensor)],
        x: &GpuTensor,
    ) -> Result<(), ModelError> {
        products
            .iter_mut()
            .try_for_each(|(w, out)| self.product(w, x, out))
    }

    fn add_bias(&self, x: &mut GpuTensor, bias: &GpuTensor) -> Result<(), ModelError> {
        if bias.cols != x.cols {
            return Err(ModelError::Device(format!(
                "gpu: a bias of {} over rows of {}",
                bias.cols, x.cols
            )));
        }
        self.elementwise(Op::Bias, x, Some(&bias.buffer), x.cols as u32)
    }

    /// One table on the device: the sequences' tables one after another.
    fn rotation(&self, tables: Vec<RopeTable<'_>>) -> Result<GpuRotation, ModelError> {
        let cos_sin: Vec<[f32; 2]> = tables.iter().flat_map(|t| t.cos_sin_f32()).collect();
        let Some(first) = tables.first() else {
            return Err(ModelError::Device("gpu: a rotation of no sequence".into()));
        };
        let half = first.dims() / 2;
        let values: &[f32] = bytemuck::cast_slice(&cos_sin);
        let table = self.buffer_tensor(values.len(), 1, values, true)?;
        Ok(GpuRotation {
            table,
            rows: cos_sin.len().checked_div(half).unwrap_or(0),
            half,
            style: match first.style() {
                RopeStyle::Interleaved => 0,
                RopeStyle::Halves => 1,
            },
        })
    }

    fn rope(
        &self,
        q: &mut GpuTensor,
        k: &mut GpuTensor,
        rotation: &GpuRotation,
        head_dim: usize,
    ) -> Result<(), ModelError> {
        self.rotate(q, rotation, head_dim)?;
        self.rotate(k, rotation, head_dim)
    }

    fn kv_write(
        &self,
        kv: &mut [&mut GpuKv],
        spans: &[SequenceRows],
        layer: usize,
        k: &GpuTensor,
        v: &GpuTensor,
    ) -> Result<(), ModelError> {
        Self::same_shape("keys and values", k, v)?;
        for (seq, span) in kv.iter().zip(spans) {
            let (start, rows) = (span.start, &span.rows);
            if k.cols != seq.kv_dim
                || rows.start > rows.end
                || rows.end > k.rows
                || start + rows.len() > seq.capacity
                || layer >= seq.keys.len()
            {
                return Err(ModelError::Device(format!(
                    "gpu: rows {rows:?} of {} × {} at {start} in layer {layer} of a cache of \
                     {} × {}",
                    k.rows, k.cols, seq.capacity, seq.kv_dim
                )));
            }
            let pairs = k.cols / 2;
            let n = span.rows.len() * pairs;
            if n == 0 {
                continue;
            }
            let (gx, gy) = self.grid(n.div_ceil(WORKGROUP as usize))?;
            let params = [
                n as u32,
                gx,
                pairs as u32,
                seq.block_size as u32,
                span.rows.start as u32,
                span.start as u32,
                0,
                0,
                0,
                0,
                0,
                0,
            ];
            self.dispatch(
                Op::KvStore,
                params,
                &[
                    &k.buffer,
                    &v.buffer,
                    &seq.table,
                    &seq.keys[layer],
                    &seq.values[layer],
                ],
                (gx, gy),
            )?;
        }
        Ok(())
    }

    fn attend(
        &self,
        spec: &AttentionSpec,
        kv: &[&mut GpuKv],
        spans: &[SequenceRows],
        layer: usize,
        q: &GpuTensor,
        out: &mut GpuTensor,
    ) -> Result<(), ModelError> {
        Self::same_shape("queries and attention output", q, out)?;
        for (kv, span) in kv.iter().zip(spans) {
            self.attend_one(spec, kv, span, layer, q, out)?;
        }
        Ok(())
    }

    fn gated_activation(
        &self,
        gate: &mut GpuTensor,
        up: &GpuTensor,
        act: Activation,
    ) -> Result<(), ModelError> {
        Self::same_shape("gate and up", gate, up)?;
        let act = match act {
            Activation::Silu => 0,
            Activation::GeluTanh => 1,
        };
        self.elementwise(Op::Gated, gate, Some(&up.buffer), act)
    }

    fn softcap(&self, x: &mut GpuTensor, cap: f32) -> Result<(), ModelError> {
        self.elementwise(Op::Softcap, x, None, cap.to_bits())
    }

    fn add(&self, x: &mut GpuTensor, y: &GpuTensor) -> Result<(), ModelError> {
        Self::same_shape("add", x, y)?;
        self.elementwise(Op::Add, x, Some(&y.buffer), 0)
    }

    fn read(&self, x: &GpuTensor, rows: Range<usize>) -> Result<Vec<f32>, ModelError> {
        if rows.start > rows.end || rows.end > x.rows {
            return Err(ModelError::Device(format!(
                "gpu: rows {rows:?} of a tensor of {}",
                x.rows
            )));
        }
        // Submitted under the lock, so that work recorded by other threads into the encoder
        // after this one is never submitted before it.
        let readback = {
            let mut r = self.recording();
            let encoder = r
                .take(self.gpu.queue())
                .unwrap_or_else(|| self.new_encoder("readback"));
            let readback = self
                .gpu
                .submit_readback(encoder, &x.buffer, rows.start * x.cols, rows.len() * x.cols)
                .map_err(device_error)?;
            self.submitted();
            readback
        };
        self.gpu.finish_readback(readback).map_err(device_error)
    }
}
