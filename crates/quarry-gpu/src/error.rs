//! Every way a GPU operation can fail, as values: no adapter, a refused device, memory the
//! device does not have, a lost device, bad shapes. Nothing in this crate panics on them.

use quarry_format::GgmlType;

/// A GPU operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No Vulkan, Metal or DX12 adapter (software ones included) was found.
    #[error("no GPU adapter found (Vulkan, Metal or DX12; on Linux without a GPU, install Mesa's lavapipe: scripts/install-vulkan){0}")]
    NoAdapter(String),
    /// The adapter refused to create a device.
    #[error("GPU adapter {adapter:?} refused a device: {message}")]
    RequestDevice { adapter: String, message: String },
    /// A buffer the device has no memory for.
    #[error("GPU out of memory allocating {bytes} bytes for {what}")]
    OutOfMemory { what: &'static str, bytes: u64 },
    /// A buffer larger than the adapter allows in one binding.
    #[error("{what} needs {bytes} bytes in one GPU buffer; this adapter allows at most {limit}")]
    TooLarge {
        what: &'static str,
        bytes: u64,
        limit: u64,
    },
    /// The device was lost (driver reset, GPU removed, destroyed).
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// The GPU did not finish in the time allowed.
    #[error("GPU did not finish within {0} s")]
    Timeout(u64),
    /// wgpu rejected an operation (a bug in this crate if it happens).
    #[error("GPU validation error in {what}: {message}")]
    Validation { what: &'static str, message: String },
    /// A weight type this crate has no kernel for.
    #[error("no GPU kernel for {0:?} weights")]
    UnsupportedType(GgmlType),
    /// Shapes or lengths that do not fit together.
    #[error("{0}")]
    Shape(String),
    /// A kernel option the adapter does not support.
    #[error("{0}")]
    Unsupported(String),
    /// Reading results back from the device failed.
    #[error("GPU readback failed: {0}")]
    Readback(String),
}

/// Results of this crate.
pub type Result<T, E = GpuError> = std::result::Result<T, E>;
