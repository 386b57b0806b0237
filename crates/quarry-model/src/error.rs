use quarry_format::{FormatError, GgmlType};
use quarry_kernels::KernelError;

/// Everything that can go wrong building or running a model. Messages name the file, tensor or
/// key concerned.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{file}: unsupported architecture '{arch}' (supported: {supported})")]
    UnsupportedArchitecture {
        file: String,
        arch: String,
        supported: String,
    },
    #[error("{file}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    WrongShape {
        file: String,
        tensor: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
    #[error("{file}: tensor '{tensor}' has type {dtype}, which cannot be used as {role}")]
    WrongType {
        file: String,
        tensor: String,
        dtype: GgmlType,
        role: &'static str,
    },
    #[error("{file}: invalid hyper-parameter {key} = {value}: {reason}")]
    BadHyperParameter {
        file: String,
        key: String,
        value: String,
        reason: &'static str,
    },
    #[error("{file}: tensor '{tensor}': {source}")]
    Kernel {
        file: String,
        tensor: String,
        source: KernelError,
    },
    /// A file (an adapter, an edit's output) or a value bound for one that breaks a rule
    /// beyond the GGUF format's own: `item` names the tensor, metadata key or layer at fault.
    #[error("{file}: {item}: {problem}")]
    Invalid {
        file: String,
        item: String,
        problem: String,
    },
    #[error("{needed} tokens do not fit in the context of {capacity} tokens")]
    ContextOverflow { needed: usize, capacity: usize },
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("overlay delta for layer {layer} does not fit the model: {reason}")]
    BadOverlay { layer: usize, reason: String },
    /// A device backend's failure, or something it does not run (the message names both).
    #[error("{0}")]
    Device(String),
}
