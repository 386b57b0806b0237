//! Weight matrices on the device and the GEMV `y[t][r] = Σ_c W[r][c] · x[t][c]` over them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use quarry_format::GgmlType;

use crate::context::Gpu;
use crate::error::{GpuError, Result};
use crate::recent::Recent;
use crate::shader::{self, Layout, ShaderKey};

pub(crate) type PipelineKey = ShaderKey;
pub(crate) type Pipelines = HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>;

/// Tokens one dispatch multiplies per weight read; more are split into several dispatches.
pub const MAX_TOKENS_PER_PASS: usize = 8;

/// Bytes of one dispatch's parameters in the uniform buffer (dynamic offsets must be
/// multiples of the adapter's alignment, 256 at most).
pub(crate) const PARAMS_STRIDE: usize = 256;

/// Bytes of one dispatch's parameters: three `vec4<u32>`.
pub(crate) const PARAMS_BYTES: usize = 48;

/// Which reduction the kernel ends with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Subgroup adds where the device has them, else the shared-memory tree.
    #[default]
    Auto,
    /// Subgroup adds (an error where the device has none).
    Subgroup,
    /// The shared-memory tree, whatever the device has.
    Shared,
}

/// The shape of a GEMV kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemvConfig {
    /// Invocations per workgroup (a power of two, 32..=256); 0 = chosen for the token count.
    pub workgroup_size: u32,
    /// Rows each workgroup computes (1..=16); 0 = chosen for the token count.
    pub rows_per_workgroup: u32,
    /// Stage x through workgroup memory, 256 columns at a time.
    pub tiled: bool,
    pub reduction: Reduction,
    pub gemm: GemmUse,
}

/// Whether a product runs as the prompt GEMM (32 rows × 32 tokens per workgroup, weights
/// decoded once per tile into workgroup memory) instead of the GEMV (8 tokens per weight
/// read). The GEMV's fields above do not apply to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GemmUse {
    /// From [`GEMM_MIN_TOKENS`] tokens on, where the matrix and adapter allow it.
    #[default]
    Auto,
    Never,
    /// Whatever the token count (an error where the matrix or adapter does not allow it).
    Always,
}

/// Tokens from which `GemmUse::Auto` takes the GEMM. On lavapipe, where decoding is the cost,
/// the GEMM overtakes the GEMV between 16 tokens (Q4_K, Q6_K) and 24 (Q4_1, Q8_0), and is
/// 1.4–2.6× faster at 256 (`examples/gemv_bandwidth --quick --prompt`); an H200 is yet to
/// be measured.
pub const GEMM_MIN_TOKENS: usize = 24;

impl Default for GemvConfig {
    fn default() -> Self {
        Self {
            workgroup_size: 0,
            rows_per_workgroup: 0,
            tiled: false,
            reduction: Reduction::Auto,
            gemm: GemmUse::Auto,
        }
    }
}

impl GemvConfig {
    pub fn tiled() -> Self {
        Self {
            tiled: true,
            ..Self::default()
        }
    }

    /// This configuration with its automatic fields filled for `tokens` per pass on `gpu`.
    /// On a GPU, 4 rows per workgroup (one unit of x loaded serves 4 rows), 128 invocations
    /// for one token and 64 for several: the best or within 5% of it for F16, Q8_0, Q4_K and
    /// Q6_K in a sweep of 32..256 × 1..8 on an H200 (Vulkan) at 14336×4096 (other GPUs may
    /// prefer others). On a software adapter (lavapipe), 64 over 2, which it runs fastest.
    pub fn resolved(&self, gpu: &Gpu, tokens: usize) -> Self {
        let (wg, rows) = if gpu.adapter().kind == crate::DeviceKind::Cpu {
            (64, 2)
        } else if tokens <= 1 {
            (128, 4)
        } else {
            (64, 4)
        };
        Self {
            workgroup_size: if self.workgroup_size == 0 {
                wg
            } else {
                self.workgroup_size
            },
            rows_per_workgroup: if self.rows_per_workgroup == 0 {
                rows
            } else {
                self.rows_per_workgroup
            },
            ..*self
        }
    }
}

/// A weight matrix on the device, `rows × cols` values of `dtype`, held as the file's bytes:
/// in one buffer, or in runs of rows when it is larger than one binding may be (Gemma 3's
/// 262 144-row output head is 178 MB; lavapipe binds at most 128 MiB).
pub struct GpuMatrix {
    gpu: Gpu,
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    layout: Layout,
    parts: Vec<Part>,
    /// Decode-sized products prepared lately ([`GpuMatrix::prepare_cached`]).
    recent: Mutex<Recent<Prepared>>,
}

/// A product prepared for `x`, `y` and `tokens`, kept for the next call with the same: a
/// decode step multiplies the same buffers as the one before it.
struct Prepared {
    x: wgpu::Buffer,
    y: wgpu::Buffer,
    tokens: usize,
    prepared: Arc<PreparedGemv>,
}

/// Prepared products a matrix keeps (their buffers are decode-sized: at most
/// [`MAX_TOKENS_PER_PASS`] rows).
const RECENT_PRODUCTS: usize = 4;

/// Rows `first_row .. first_row + rows` of a matrix, in a buffer of their own.
struct Part {
    buffer: wgpu::Buffer,
    first_row: usize,
    rows: usize,
}

impl std::fmt::Debug for GpuMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuMatrix")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

/// Bytes one row of `cols` values of `dtype` occupies, after checking the type has a kernel
/// and `cols` is a whole number of blocks.
pub fn row_bytes(dtype: GgmlType, cols: usize) -> Result<usize> {
    if shader::layout(dtype, cols.max(1)).is_none() {
        return Err(GpuError::UnsupportedType(dtype));
    }
    let bs = dtype.block_size();
    if cols == 0 || !cols.is_multiple_of(bs) {
        return Err(GpuError::Shape(format!(
            "{dtype:?} rows must be a positive multiple of {bs} values, not {cols}"
        )));
    }
    (cols / bs)
        .checked_mul(dtype.type_size())
        .ok_or_else(|| GpuError::Shape(format!("{cols} columns of {dtype:?} overflow")))
}

impl GpuMatrix {
    /// Uploads `bytes` (rows of `dtype` blocks, exactly as stored in a GGUF file) once.
    pub fn upload(
        gpu: &Gpu,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self> {
        let row_bytes = row_bytes(dtype, cols)?;
        let layout = shader::layout(dtype, cols).ok_or(GpuError::UnsupportedType(dtype))?;
        if rows == 0 {
            return Err(GpuError::Shape("a matrix needs at least one row".into()));
        }
        let expected = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| GpuError::Shape(format!("{rows} rows of {cols} {dtype:?} overflow")))?;
        if bytes.len() != expected {
            return Err(GpuError::Shape(format!(
                "{rows}×{cols} {dtype:?} is {expected} bytes ({row_bytes} per row), got {}",
                bytes.len()
            )));
        }
        // Offsets inside the kernel are u32 bytes, and each part is one binding.
        let limit = gpu
            .limits()
            .max_storage_buffer_binding_size
            .min(u32::MAX as u64)
            .min(gpu.limits().max_buffer_size);
        let rows_per_part = (limit.saturating_sub(16) / row_bytes as u64) as usize;
        if rows_per_part == 0 {
            return Err(GpuError::TooLarge {
                what: "a weight matrix row",
                bytes: row_bytes as u64,
                limit,
            });
        }
        let parts = (0..rows)
            .step_by(rows_per_part)
            .map(|first_row| {
                let n = rows_per_part.min(rows - first_row);
                let buffer = gpu.create_buffer_with(
                    "weights",
                    &bytes[first_row * row_bytes..(first_row + n) * row_bytes],
                    16,
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                )?;
                Ok(Part {
                    buffer,
                    first_row,
                    rows: n,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gpu: gpu.clone(),
            dtype,
            rows,
            cols,
            row_bytes,
            layout,
            parts,
            recent: Mutex::new(Recent::new(RECENT_PRODUCTS)),
        })
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of weights one GEMV reads.
    pub fn weight_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
    /// Buffers the matrix is held in (more than one when it exceeds a binding).
    pub fn buffers(&self) -> usize {
        self.parts.len()
    }

    /// `y = W·x` for `tokens` activation rows of `cols` values (`x` is `[tokens][cols]`,
    /// the result `[tokens][rows]`), with the default kernel.
    pub fn gemv(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        self.gemv_with(x, tokens, &GemvConfig::default())
    }

    /// As `gemv`, with a chosen kernel shape.
    pub fn gemv_with(&self, x: &[f32], tokens: usize, config: &GemvConfig) -> Result<Vec<f32>> {
        if x.len() != tokens * self.cols {
            return Err(GpuError::Shape(format!(
                "x has {} values; {tokens} tokens of {} columns need {}",
                x.len(),
                self.cols,
                tokens * self.cols
            )));
        }
        if tokens == 0 {
            return Ok(Vec::new());
        }
        let xb = self.gpu.upload_f32("gemv x", x)?;
        let yb = self.gpu.output_f32("gemv y", tokens * self.rows)?;
        let mut encoder =
            self.gpu
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("gemv"),
                });
        self.encode(&mut encoder, &xb, &yb, tokens, config)?;
        self.gpu.submit_and_wait(encoder.finish())?;
        self.gpu.read_f32(&yb, tokens * self.rows)
    }

    /// Records `y = W·x` into `encoder`, leaving x and y on the device: `x` holds
    /// `[tokens][cols]` f32 from offset 0, `y` receives `[tokens][rows]` f32 from offset 0.
    /// Both must be storage buffers (x a multiple of 16 bytes long, as `Gpu::upload_f32`
    /// makes them).
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tokens: usize,
        config: &GemvConfig,
    ) -> Result<()> {
        let prepared = self.prepare(x, y, tokens, config)?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("gemv"),
            timestamp_writes: None,
        });
        prepared.record(&mut pass);
        Ok(())
    }

    /// [`GpuMatrix::prepare`] with the default kernel, the same as last time for the same
    /// buffers and a decode-sized token count (no new parameters or bindings).
    pub fn prepare_cached(
        &self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tokens: usize,
    ) -> Result<Arc<PreparedGemv>> {
        if tokens > MAX_TOKENS_PER_PASS {
            return Ok(Arc::new(self.prepare(
                x,
                y,
                tokens,
                &GemvConfig::default(),
            )?));
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let entry = recent.get_or_make(
            |r| r.x == *x && r.y == *y && r.tokens == tokens,
            || {
                Ok::<_, GpuError>(Prepared {
                    x: x.clone(),
                    y: y.clone(),
                    tokens,
                    prepared: Arc::new(self.prepare(x, y, tokens, &GemvConfig::default())?),
                })
            },
        )?;
        Ok(entry.prepared.clone())
    }

    /// Pipelines, parameters and bindings for `y = W·x`, to be recorded into compute passes
    /// (once or many times, as a benchmark does).
    pub fn prepare(
        &self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tokens: usize,
        config: &GemvConfig,
    ) -> Result<PreparedGemv> {
        let gpu = &self.gpu;
        if tokens == 0 {
            return Ok(PreparedGemv { steps: Vec::new() });
        }
        let x_bytes = (tokens * self.cols * 4) as u64;
        let y_bytes = (tokens * self.rows * 4) as u64;
        if x.size() < x_bytes || y.size() < y_bytes {
            return Err(GpuError::Shape(format!(
                "{tokens} tokens need x ≥ {x_bytes} and y ≥ {y_bytes} bytes; got {} and {}",
                x.size(),
                y.size()
            )));
        }
        let in_u32 = |n: usize, what: &str| {
            u32::try_from(n).map_err(|_| GpuError::Shape(format!("{what} {n} exceeds u32")))
        };
        in_u32(tokens * self.cols, "x length")?;
        in_u32(tokens * self.rows, "y length")?;

        if self.use_gemm(tokens, config)? {
            return self.prepare_gemm(x, y, tokens);
        }
        let subgroups = match config.reduction {
            Reduction::Auto => gpu.subgroups(),
            Reduction::Shared => false,
            Reduction::Subgroup if gpu.subgroups() => true,
            Reduction::Subgroup => {
                return Err(GpuError::Unsupported(format!(
                    "subgroup reduction requested, but {} has no subgroups enabled",
                    gpu.adapter().name
                )))
            }
        };
        let config = config.resolved(gpu, tokens.min(MAX_TOKENS_PER_PASS));
        let wg = config.workgroup_size;
        if !wg.is_power_of_two()
            || !(32..=256).contains(&wg)
            || wg > gpu.limits().max_compute_invocations_per_workgroup
            || wg > gpu.limits().max_compute_workgroup_size_x
        {
            return Err(GpuError::Unsupported(format!(
                "workgroup size {wg}: must be a power of two in 32..=256 within the adapter's limits"
            )));
        }
        let rows_per_wg = config.rows_per_workgroup;
        if !(1..=16).contains(&rows_per_wg) {
            return Err(GpuError::Unsupported(format!(
                "rows per workgroup {rows_per_wg}: must be 1..=16"
            )));
        }
        let mut dispatches = Vec::new();
        for (pi, part) in self.parts.iter().enumerate() {
            let (gx, gy) = gpu.grid(part.rows.div_ceil(rows_per_wg as usize))?;
            for t0 in (0..tokens).step_by(MAX_TOKENS_PER_PASS) {
                let n = (tokens - t0).min(MAX_TOKENS_PER_PASS);
                let key = ShaderKey {
                    dtype: self.dtype,
                    vec: self.layout.vec,
                    tokens: n as u32,
                    workgroup_size: wg,
                    rows_per_workgroup: rows_per_wg,
                    tiled: config.tiled,
                    subgroups,
                    gemm: false,
                };
                let need = shader::workgroup_bytes(&key);
                let have = gpu.limits().max_compute_workgroup_storage_size;
                if need > have {
                    return Err(GpuError::Unsupported(format!(
                        "{config:?} with {n} tokens needs {need} bytes of workgroup memory; \
                         the adapter has {have}"
                    )));
                }
                dispatches.push(Dispatch {
                    part: pi,
                    key,
                    // Part rows land at their own rows of y, whose rows are the whole matrix's.
                    x_off: t0 * self.cols,
                    y_off: t0 * self.rows + part.first_row,
                    tokens: n,
                    groups: (gx, gy, 1),
                });
            }
        }
        self.bind(x, y, &dispatches)
    }

    /// Whether `config` multiplies `tokens` with the GEMM (an error where it asks for the GEMM
    /// and this matrix or adapter cannot run it).
    fn use_gemm(&self, tokens: usize, config: &GemvConfig) -> Result<bool> {
        let gpu = &self.gpu;
        let need = shader::gemm_workgroup_bytes(&self.layout);
        let have = gpu.limits().max_compute_workgroup_storage_size;
        let step = shader::gemm_step(&self.layout) as usize;
        let why_not = if !self.layout.vec || !self.cols.is_multiple_of(step) {
            Some(format!(
                "{:?} rows of {} columns are not whole steps of {step}",
                self.dtype, self.cols
            ))
        } else if need > have {
            Some(format!(
                "it needs {need} bytes of workgroup memory; the adapter has {have}"
            ))
        } else if shader::GEMM_WG > gpu.limits().max_compute_invocations_per_workgroup {
            Some(format!(
                "it needs {} invocations per workgroup",
                shader::GEMM_WG
            ))
        } else {
            None
        };
        match (config.gemm, why_not) {
            (GemmUse::Never, _) => Ok(false),
            (GemmUse::Auto, why_not) => Ok(tokens >= GEMM_MIN_TOKENS && why_not.is_none()),
            (GemmUse::Always, None) => Ok(true),
            (GemmUse::Always, Some(why)) => Err(GpuError::Unsupported(format!(
                "the prompt GEMM was requested for a {}×{} {:?} matrix, but {why}",
                self.rows, self.cols, self.dtype
            ))),
        }
    }

    /// One GEMM dispatch per part: 32-row tiles in x/y, 32-token tiles in z.
    fn prepare_gemm(
        &self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tokens: usize,
    ) -> Result<PreparedGemv> {
        let token_tiles = tokens.div_ceil(shader::GEMM_TOKENS as usize);
        let max_dim = self.gpu.limits().max_compute_workgroups_per_dimension as usize;
        if token_tiles > max_dim {
            return Err(GpuError::Shape(format!(
                "{tokens} tokens need {token_tiles} workgroups, more than this adapter dispatches"
            )));
        }
        let key = ShaderKey {
            dtype: self.dtype,
            vec: self.layout.vec,
            tokens: shader::GEMM_TOKENS,
            workgroup_size: shader::GEMM_WG,
            rows_per_workgroup: shader::GEMM_ROWS,
            tiled: true,
            subgroups: false,
            gemm: true,
        };
        let dispatches = self
            .parts
            .iter()
            .enumerate()
            .map(|(pi, part)| {
                let (gx, gy) = self
                    .gpu
                    .grid(part.rows.div_ceil(shader::GEMM_ROWS as usize))?;
                Ok(Dispatch {
                    part: pi,
                    key,
                    x_off: 0,
                    y_off: part.first_row,
                    tokens,
                    groups: (gx, gy, token_tiles as u32),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.bind(x, y, &dispatches)
    }

    /// Parameters, pipelines and one bind group per part for `dispatches`.
    fn bind(
        &self,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        dispatches: &[Dispatch],
    ) -> Result<PreparedGemv> {
        let gpu = &self.gpu;
        let units = (self.cols / self.layout.vals_per_block as usize)
            * self.layout.units_per_block as usize;
        let mut params = vec![0u8; dispatches.len() * PARAMS_STRIDE];
        for (i, d) in dispatches.iter().enumerate() {
            let p: [u32; 12] = [
                self.parts[d.part].rows as u32,
                self.cols as u32,
                self.row_bytes as u32,
                units as u32,
                0,
                d.x_off as u32,
                self.cols as u32,
                d.y_off as u32,
                self.rows as u32,
                d.groups.0,
                d.tokens as u32,
                0,
            ];
            params[i * PARAMS_STRIDE..i * PARAMS_STRIDE + PARAMS_BYTES]
                .copy_from_slice(bytemuck::bytes_of(&p));
        }
        let params =
            gpu.create_buffer_with("gemv params", &params, 16, wgpu::BufferUsages::UNIFORM)?;
        let mut bind_groups: Vec<Option<Arc<wgpu::BindGroup>>> = vec![None; self.parts.len()];
        let mut steps = Vec::with_capacity(dispatches.len());
        for (i, d) in dispatches.iter().enumerate() {
            let bind_group = match &bind_groups[d.part] {
                Some(b) => b.clone(),
                None => {
                    let part = &self.parts[d.part].buffer;
                    let b = Arc::new(gpu.bind_group(
                        "gemv",
                        &gpu.inner.layout,
                        &[
                            params_entry(&params),
                            wgpu::BindGroupEntry {
                                binding: 1,
                                resource: part.as_entire_binding(),
                            },
                            wgpu::BindGroupEntry {
                                binding: 2,
                                resource: part.as_entire_binding(),
                            },
                            wgpu::BindGroupEntry {
                                binding: 3,
                                resource: x.as_entire_binding(),
                            },
                            wgpu::BindGroupEntry {
                                binding: 4,
                                resource: y.as_entire_binding(),
                            },
                        ],
                    )?);
                    bind_groups[d.part] = Some(b.clone());
                    b
                }
            };
            let layout = self.layout;
            let key = d.key;
            let pipeline = gpu.pipeline(key, || {
                if key.gemm {
                    shader::gemm_source(&layout)
                } else {
                    shader::source(&key, &layout)
                }
            })?;
            steps.push(Step {
                pipeline,
                bind_group,
                offset: (i * PARAMS_STRIDE) as u32,
                groups: d.groups,
            });
        }
        Ok(PreparedGemv { steps })
    }
}

/// One dispatch of a product: which part, which kernel, where its x and y start and how many
/// tokens it multiplies.
struct Dispatch {
    part: usize,
    key: ShaderKey,
    x_off: usize,
    y_off: usize,
    tokens: usize,
    groups: (u32, u32, u32),
}

struct Step {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: Arc<wgpu::BindGroup>,
    offset: u32,
    groups: (u32, u32, u32),
}

/// A GEMV ready to record: its pipelines, bindings and parameters.
pub struct PreparedGemv {
    steps: Vec<Step>,
}

impl PreparedGemv {
    /// Records the dispatches into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        for s in &self.steps {
            pass.set_pipeline(&s.pipeline);
            pass.set_bind_group(0, Some(s.bind_group.as_ref()), &[s.offset]);
            pass.dispatch_workgroups(s.groups.0, s.groups.1, s.groups.2);
        }
    }

    /// Dispatches `record` makes (for an encoder's submission budget).
    pub fn dispatches(&self) -> usize {
        self.steps.len()
    }
}

pub(crate) fn bind_group_layout(device: &wgpu::Device) -> wgpu::BindGroupLayout {
    params_and_storage_layout(device, "gemv", &[true, true, true, false])
}

/// Binding 0 of [`params_and_storage_layout`]: one dispatch's parameters in `params`, at the
/// dynamic offset the dispatch sets.
pub(crate) fn params_entry(params: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding: 0,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: params,
            offset: 0,
            size: wgpu::BufferSize::new(PARAMS_BYTES as u64),
        }),
    }
}

/// The bind group layout every kernel of this crate uses: 48 bytes of parameters at a
/// dynamic offset (binding 0), then storage buffers from binding 1 on, each read only or not
/// as `read_only` says.
pub(crate) fn params_and_storage_layout(
    device: &wgpu::Device,
    label: &str,
    read_only: &[bool],
) -> wgpu::BindGroupLayout {
    let params = wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: wgpu::BufferSize::new(PARAMS_BYTES as u64),
        },
        count: None,
    };
    let storage = read_only
        .iter()
        .enumerate()
        .map(|(i, &read_only)| wgpu::BindGroupLayoutEntry {
            binding: i as u32 + 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    let entries: Vec<_> = std::iter::once(params).chain(storage).collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}
