//! The device context: one adapter, its device and queue, the error bookkeeping that turns
//! wgpu's callbacks into `GpuError`s, and the cache of compiled GEMV pipelines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{GpuError, Result};
use crate::gemv::{PipelineKey, Pipelines};

/// What kind of device an adapter is, most preferred first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeviceKind {
    Discrete,
    Integrated,
    Virtual,
    Other,
    /// A software rasterizer (lavapipe, WARP, SwiftShader).
    Cpu,
}

impl DeviceKind {
    fn of(t: wgpu::DeviceType) -> Self {
        match t {
            wgpu::DeviceType::DiscreteGpu => Self::Discrete,
            wgpu::DeviceType::IntegratedGpu => Self::Integrated,
            wgpu::DeviceType::VirtualGpu => Self::Virtual,
            wgpu::DeviceType::Cpu => Self::Cpu,
            wgpu::DeviceType::Other => Self::Other,
        }
    }
}

/// What a caller may want to know about the adapter in use.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub kind: DeviceKind,
    pub driver: String,
    /// Whether subgroup operations (wgpu's `SUBGROUP` feature) are enabled on the device.
    pub subgroups: bool,
    /// The range of subgroup sizes the adapter reports.
    pub subgroup_sizes: (u32, u32),
    /// The largest buffer one storage binding may cover.
    pub max_binding_bytes: u64,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {:?}, driver {:?}, subgroups {})",
            self.name,
            self.backend,
            self.kind,
            self.driver,
            if self.subgroups {
                format!("{}..={}", self.subgroup_sizes.0, self.subgroup_sizes.1)
            } else {
                "no".to_string()
            }
        )
    }
}

/// How a `Gpu` is chosen and set up.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Only adapters whose name contains this (case-insensitive); `None` = any.
    /// `Gpu::new` reads it from `QUARRY_GPU_ADAPTER`.
    pub adapter_name: Option<String>,
    /// Do not enable subgroup operations even where the adapter has them.
    pub disable_subgroups: bool,
    /// How long one wait for the device may take before it is reported as `Timeout`.
    pub wait_timeout: Duration,
    /// Bind at most this many bytes of weights at once, below the adapter's limit, so that
    /// matrices split into more row parts (what tests of the split set).
    pub max_binding_bytes: Option<u64>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        Self {
            adapter_name: std::env::var("QUARRY_GPU_ADAPTER")
                .ok()
                .filter(|s| !s.is_empty()),
            disable_subgroups: false,
            wait_timeout: Duration::from_secs(120),
            max_binding_bytes: None,
        }
    }
}

/// Errors reported by wgpu's callbacks, kept until the next check.
#[derive(Default)]
struct Faults {
    lost: Option<String>,
    uncaptured: Option<String>,
}

pub(crate) struct Inner {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) summary: AdapterSummary,
    pub(crate) limits: wgpu::Limits,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) pipeline_layout: wgpu::PipelineLayout,
    pub(crate) pipelines: Mutex<Pipelines>,
    faults: Arc<Mutex<Faults>>,
    wait_timeout: Duration,
    /// Buffers and bind groups made so far (what a pass costs the host; see `objects_made`).
    made: AtomicU64,
    /// Readback staging buffers done with, for the next reads of their size.
    staging: Mutex<Vec<wgpu::Buffer>>,
}

/// Readback staging buffers [`Inner::staging`] keeps (a pass reads hidden states and logits).
const SPARE_STAGING: usize = 4;

/// A copy back to the host, submitted and not yet waited for.
pub(crate) struct Readback {
    staging: Option<wgpu::Buffer>,
    index: wgpu::SubmissionIndex,
    bytes: u64,
}

/// A GPU device and queue. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Gpu {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("adapter", &self.inner.summary)
            .finish()
    }
}

/// Names of every adapter wgpu finds, best first, for listing devices.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = instance();
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    adapters.sort_by_key(|a| DeviceKind::of(a.get_info().device_type));
    adapters
        .iter()
        .map(|a| summarize(a, a.features().contains(wgpu::Features::SUBGROUP)))
        .collect()
}

fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    // No validation layers or debug labels in the driver: they may be absent and cost time.
    desc.flags = wgpu::InstanceFlags::empty();
    wgpu::Instance::new(desc)
}

fn summarize(adapter: &wgpu::Adapter, subgroups: bool) -> AdapterSummary {
    let info = adapter.get_info();
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        kind: DeviceKind::of(info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        subgroups,
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        max_binding_bytes: adapter.limits().max_storage_buffer_binding_size,
    }
}

impl Gpu {
    /// The best adapter: a discrete GPU, else an integrated one, else anything (lavapipe).
    pub fn new() -> Result<Self> {
        Self::with_options(GpuOptions::default())
    }

    pub fn with_options(options: GpuOptions) -> Result<Self> {
        let instance = instance();
        let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let found: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        if let Some(want) = &options.adapter_name {
            let want = want.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want));
        }
        adapters.sort_by_key(|a| DeviceKind::of(a.get_info().device_type));
        let Some(adapter) = adapters.into_iter().next() else {
            return Err(GpuError::NoAdapter(match &options.adapter_name {
                Some(want) => format!("; none named like {want:?} among {found:?}"),
                None => String::new(),
            }));
        };
        let info = adapter.get_info();
        let subgroups =
            !options.disable_subgroups && adapter.features().contains(wgpu::Features::SUBGROUP);
        let mut features = wgpu::Features::empty();
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        // The adapter's own limits: weights need the largest storage bindings it allows.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("quarry-gpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;

        let faults = Arc::new(Mutex::new(Faults::default()));
        {
            let faults = faults.clone();
            device.set_device_lost_callback(move |reason, message| {
                if let Ok(mut f) = faults.lock() {
                    f.lost = Some(format!("{reason:?}: {message}"));
                }
            });
        }
        {
            // wgpu's default handler panics; keep the error for the next check instead.
            let faults = faults.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut f) = faults.lock() {
                    f.uncaptured.get_or_insert_with(|| e.to_string());
                }
            }));
        }

        let layout = crate::gemv::bind_group_layout(&device);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("quarry-gpu gemv"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let mut summary = summarize(&adapter, subgroups);
        let mut limits = limits;
        if let Some(bytes) = options.max_binding_bytes {
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(bytes);
            summary.max_binding_bytes = limits.max_storage_buffer_binding_size;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                device,
                queue,
                summary,
                limits,
                layout,
                pipeline_layout,
                pipelines: Mutex::new(HashMap::new()),
                faults,
                wait_timeout: options.wait_timeout,
                made: AtomicU64::new(0),
                staging: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.inner.summary
    }

    pub fn subgroups(&self) -> bool {
        self.inner.summary.subgroups
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.inner.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.inner.queue
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.inner.limits
    }

    /// A lost device or an error wgpu reported outside any scope, as an error.
    pub fn check(&self) -> Result<()> {
        let mut f = self.inner.faults.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lost) = &f.lost {
            return Err(GpuError::DeviceLost(lost.clone()));
        }
        if let Some(message) = f.uncaptured.take() {
            return Err(GpuError::Validation {
                what: "an earlier operation",
                message,
            });
        }
        Ok(())
    }

    /// `e`, unless the device is lost, which is then the error to report: every operation on
    /// a lost device fails (as a validation error, say), and wgpu tells of the loss only when
    /// the device is polled.
    fn or_lost(&self, e: GpuError) -> GpuError {
        let _ = self.inner.device.poll(wgpu::PollType::Poll);
        let f = self.inner.faults.lock().unwrap_or_else(|p| p.into_inner());
        match &f.lost {
            Some(lost) => GpuError::DeviceLost(lost.clone()),
            None => e,
        }
    }

    /// Runs `f` inside error scopes, so an out-of-memory or validation error it causes comes
    /// back as a `GpuError` (wgpu reports both asynchronously otherwise).
    pub(crate) fn scoped<T>(
        &self,
        what: &'static str,
        bytes: u64,
        f: impl FnOnce(&wgpu::Device) -> T,
    ) -> Result<T> {
        self.check()?;
        let device = &self.inner.device;
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let out = f(device);
        let oom = pollster::block_on(oom.pop());
        let validation = pollster::block_on(validation.pop());
        if oom.is_some() {
            return Err(self.or_lost(GpuError::OutOfMemory { what, bytes }));
        }
        if let Some(e) = validation {
            return Err(self.or_lost(GpuError::Validation {
                what,
                message: e.to_string(),
            }));
        }
        self.check()?;
        Ok(out)
    }

    /// A 2-D grid of `n` workgroups, `x` within the adapter's limit per dimension (kernels
    /// flatten it as `x + y · groups_x`).
    pub(crate) fn grid(&self, n: usize) -> Result<(u32, u32)> {
        let max = self.inner.limits.max_compute_workgroups_per_dimension as usize;
        let x = n.clamp(1, max);
        let y = n.div_ceil(x).max(1);
        if y > max {
            return Err(GpuError::Shape(format!(
                "{n} workgroups exceed what one dispatch may hold"
            )));
        }
        Ok((x as u32, y as u32))
    }

    /// Buffers and bind groups made through this handle so far: each costs the host time
    /// (and a buffer device memory), so a steady decode step should make few.
    pub fn objects_made(&self) -> u64 {
        self.inner.made.load(Ordering::Relaxed)
    }

    /// A bind group (counted in [`Gpu::objects_made`]); a binding the device refuses is an
    /// error here, not at the next check.
    pub(crate) fn bind_group(
        &self,
        label: &'static str,
        layout: &wgpu::BindGroupLayout,
        entries: &[wgpu::BindGroupEntry<'_>],
    ) -> Result<wgpu::BindGroup> {
        self.inner.made.fetch_add(1, Ordering::Relaxed);
        self.scoped(label, 0, |d| {
            d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout,
                entries,
            })
        })
    }

    /// A buffer of `size` bytes (checked against the adapter's limits and for memory).
    pub fn create_buffer(
        &self,
        what: &'static str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        self.check_size(what, size)?;
        self.inner.made.fetch_add(1, Ordering::Relaxed);
        self.scoped(what, size, |d| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: false,
            })
        })
    }

    /// A buffer of `size` bytes (a multiple of 4) mapped for writing until it is unmapped.
    pub fn create_buffer_mapped(
        &self,
        what: &'static str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        self.check_size(what, size)?;
        self.inner.made.fetch_add(1, Ordering::Relaxed);
        self.scoped(what, size, |d| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(what),
                size,
                usage,
                mapped_at_creation: true,
            })
        })
    }

    /// A buffer holding `bytes`, zero-padded to a multiple of `align` (a power of two ≥ 4).
    pub fn create_buffer_with(
        &self,
        what: &'static str,
        bytes: &[u8],
        align: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let size = (bytes.len() as u64).max(1).next_multiple_of(align.max(4));
        let buffer = self.create_buffer_mapped(what, size, usage)?;
        {
            let mut view = buffer.slice(..).get_mapped_range_mut().map_err(|e| {
                self.or_lost(GpuError::Validation {
                    what,
                    message: e.to_string(),
                })
            })?;
            let mut dst = view.slice(..);
            dst.slice(..bytes.len()).copy_from_slice(bytes);
            if (bytes.len() as u64) < size {
                let pad = vec![0u8; size as usize - bytes.len()];
                dst.slice(bytes.len()..).copy_from_slice(&pad);
            }
        }
        buffer.unmap();
        Ok(buffer)
    }

    /// A storage buffer holding `values` (for activations).
    pub fn upload_f32(&self, what: &'static str, values: &[f32]) -> Result<wgpu::Buffer> {
        self.create_buffer_with(
            what,
            bytemuck::cast_slice(values),
            16,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
        )
    }

    /// A storage buffer for `n` f32 results.
    pub fn output_f32(&self, what: &'static str, n: usize) -> Result<wgpu::Buffer> {
        let size = (n as u64 * 4).max(4).next_multiple_of(16);
        self.create_buffer(
            what,
            size,
            wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        )
    }

    fn check_size(&self, what: &'static str, bytes: u64) -> Result<()> {
        let limit = self.inner.limits.max_buffer_size;
        if bytes > limit {
            return Err(GpuError::TooLarge { what, bytes, limit });
        }
        Ok(())
    }

    /// Submits `commands` and waits for the device to finish them.
    pub fn submit_and_wait(&self, commands: wgpu::CommandBuffer) -> Result<()> {
        self.check()?;
        let index = self.inner.queue.submit([commands]);
        self.wait(Some(index))
    }

    /// Waits for the submission `index` (or everything submitted), up to the timeout.
    pub fn wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let timeout = self.inner.wait_timeout;
        match self.inner.device.poll(wgpu::PollType::Wait {
            submission_index: index,
            timeout: Some(timeout),
        }) {
            Ok(_) => self.check(),
            Err(wgpu::PollError::Timeout) => {
                self.check()?;
                Err(GpuError::Timeout(timeout.as_secs()))
            }
            Err(e) => {
                self.check()?;
                Err(GpuError::Readback(e.to_string()))
            }
        }
    }

    /// Copies the first `n` f32 of `buffer` back to the host.
    pub fn read_f32(&self, buffer: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let encoder = self
            .inner
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        let readback = self.submit_readback(encoder, buffer, 0, n)?;
        self.finish_readback(readback)
    }

    /// Submits `encoder` (work recorded but not yet submitted) with a copy of the `n` f32 of
    /// `buffer` from f32 index `first` appended; [`Gpu::finish_readback`] waits for them.
    /// Separate steps, so that a caller ordering submissions under a lock need not hold it
    /// while the device works.
    pub(crate) fn submit_readback(
        &self,
        mut encoder: wgpu::CommandEncoder,
        buffer: &wgpu::Buffer,
        first: usize,
        n: usize,
    ) -> Result<Readback> {
        let (offset, bytes) = (first as u64 * 4, n as u64 * 4);
        if offset + bytes > buffer.size() {
            return Err(GpuError::Shape(format!(
                "cannot read f32 {first}..{} from a buffer of {} bytes",
                first + n,
                buffer.size()
            )));
        }
        let staging = match n {
            0 => None,
            _ => {
                let spare = {
                    let mut spare = self.inner.staging.lock().unwrap_or_else(|p| p.into_inner());
                    let found = spare.iter().position(|b| b.size() == bytes);
                    found.map(|i| spare.swap_remove(i))
                };
                let staging = match spare {
                    Some(staging) => staging,
                    None => self.create_buffer(
                        "readback staging",
                        bytes,
                        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    )?,
                };
                encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, bytes);
                Some(staging)
            }
        };
        self.check()?;
        let index = self.inner.queue.submit([encoder.finish()]);
        Ok(Readback {
            staging,
            index,
            bytes,
        })
    }

    /// Waits for a readback's submission and returns its values.
    pub(crate) fn finish_readback(&self, r: Readback) -> Result<Vec<f32>> {
        self.wait(Some(r.index))?;
        let Some(staging) = r.staging else {
            return Ok(Vec::new());
        };
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait(None)?;
        // Another thread's poll may be the one that runs the callback, a moment later.
        match rx.recv_timeout(self.inner.wait_timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(self.or_lost(GpuError::Readback(e.to_string()))),
            Err(_) => {
                let e = GpuError::Readback("buffer was not mapped".into());
                return Err(self.or_lost(e));
            }
        }
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| self.or_lost(GpuError::Readback(e.to_string())))?;
            bytemuck::pod_collect_to_vec::<u8, f32>(&view[..r.bytes as usize])
        };
        staging.unmap();
        let mut spare = self.inner.staging.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() == SPARE_STAGING {
            spare.remove(0);
        }
        spare.push(staging);
        Ok(out)
    }

    pub(crate) fn pipeline(
        &self,
        key: PipelineKey,
        build: impl FnOnce() -> String,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut cache = self
            .inner
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let source = build();
        let layout = &self.inner.pipeline_layout;
        let pipeline = self.scoped("compiling a GEMV kernel", 0, |d| {
            let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("gemv"),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("gemv"),
                layout: Some(layout),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        })?;
        let pipeline = Arc::new(pipeline);
        cache.insert(key, pipeline.clone());
        Ok(pipeline)
    }
}
