//! Quarry's GPU kernels, through `wgpu`: one WGSL source that runs on Vulkan (Linux, Windows,
//! Android; Mesa's software lavapipe in CI), Metal (macOS) and DX12 (Windows).
//!
//! Why wgpu: it is pure Rust (no CUDA or Vulkan SDK at build time; at run time only the
//! system's loader, `libvulkan.so.1`, and a driver), and one kernel source serves every
//! vendor's GPU and a CPU-only CI machine alike.
//!
//! A model runs here through [`GpuBackend`], this crate's side of `quarry_model::Backend`:
//! the forward pass's operations (RMS norm, RoPE, storing keys and values into a pool of
//! blocks and attention over them through a block table, gated activation, soft-cap, bias and
//! residual adds: `ops.rs`) around the products below. `quarry_model::Model::on_device`
//! uploads a model's weights and runs it there.
//!
//! The products are over weights uploaded *exactly as the GGUF file stores them* (no f32
//! copy; the kernel decodes each block), for F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K and
//! Q6_K: GEMV with up to 8 tokens per weight read ("batched"), a tiled variant that stages x
//! in workgroup memory, subgroup reductions where the adapter has them (a shared-memory tree
//! otherwise), and for prompts a tiled GEMM that decodes each weight once per 32 tokens. The kernels are checked against quarry-kernels'
//! scalar dequantization (tests/). Errors (no adapter, out of memory, a lost device) are
//! `GpuError` values, never panics.

mod backend;
mod context;
mod error;
mod gemv;
mod ops;
mod recent;
pub mod reference;
mod shader;

pub use backend::{GpuBackend, GpuKv, GpuKvPool, GpuRotation, GpuTensor};
pub use context::{list_adapters, AdapterSummary, DeviceKind, Gpu, GpuOptions};
pub use error::{GpuError, Result};
pub use gemv::{
    row_bytes, GemmUse, GemvConfig, GpuMatrix, PreparedGemv, Reduction, GEMM_MIN_TOKENS,
    MAX_TOKENS_PER_PASS,
};
pub use quarry_format::GgmlType;
pub use shader::SUPPORTED;
/// The wgpu this crate is built on, for callers recording their own passes.
pub use wgpu;
