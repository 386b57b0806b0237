//! Errors of reading and writing GGUF files.
//!
//! Every variant carries `file` (the path, the name given to `from_bytes`, or
//! [`WRITER_SOURCE`](super::WRITER_SOURCE) for errors raised while building a file) and the
//! field, key or tensor concerned, and displays as one line starting with the file.

use std::io;

use crate::GgmlType;

use super::ValueType;

/// Why a GGUF file could not be read, queried or written.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{file}: cannot {action}: {source}")]
    Io {
        file: String,
        /// What was being attempted ("open", "map", "write", ...).
        action: &'static str,
        source: io::Error,
    },
    #[error("{file}: not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { file: String, found: [u8; 4] },
    #[error("{file}: unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion { file: String, version: u32 },
    #[error(
        "{file}: truncated: {field} at offset {offset} needs {needed} bytes, only {available} remain"
    )]
    Truncated {
        file: String,
        field: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error(
        "{file}: {field} declares {count} entries of at least {min_size} bytes each, \
         but only {available} bytes remain"
    )]
    CountTooLarge {
        file: String,
        field: String,
        count: u64,
        min_size: u64,
        available: u64,
    },
    #[error("{file}: {field}: unknown metadata value type {id}")]
    UnknownValueType {
        file: String,
        field: String,
        id: u32,
    },
    #[error("{file}: {field}: arrays nested more than {max} levels deep")]
    NestingTooDeep {
        file: String,
        field: String,
        max: usize,
    },
    #[error("{file}: {field}: string at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        file: String,
        field: String,
        offset: u64,
    },
    #[error("{file}: {field}: byte {byte} at offset {offset} is not a bool (0 or 1)")]
    InvalidBool {
        file: String,
        field: String,
        offset: u64,
        byte: u8,
    },
    #[error("{file}: duplicate metadata key '{key}'")]
    DuplicateKey { file: String, key: String },
    #[error("{file}: metadata key '{key}' is missing")]
    MissingKey { file: String, key: String },
    #[error("{file}: metadata key '{key}' should be {expected}, found {found}")]
    WrongType {
        file: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{file}: general.alignment must be a power-of-two u32, found {found}")]
    BadAlignment { file: String, found: String },
    #[error("{file}: metadata key '{key}': array of {expected} holds a {found}")]
    ArrayTypeMismatch {
        file: String,
        key: String,
        expected: ValueType,
        found: ValueType,
    },
    #[error("{file}: tensor '{tensor}' has unknown ggml type id {id}")]
    UnknownGgmlType {
        file: String,
        tensor: String,
        id: u32,
    },
    #[error("{file}: tensor '{tensor}' has {n_dims} dimensions (1 to 4 allowed)")]
    BadDimCount {
        file: String,
        tensor: String,
        n_dims: u64,
    },
    #[error("{file}: tensor '{tensor}' has a zero dimension in {dims:?} (empty tensors are not allowed)")]
    ZeroDim {
        file: String,
        tensor: String,
        dims: Vec<u64>,
    },
    #[error("{file}: tensor '{tensor}': the size of a {dtype} tensor of shape {dims:?} overflows")]
    SizeOverflow {
        file: String,
        tensor: String,
        dims: Vec<u64>,
        dtype: GgmlType,
    },
    #[error(
        "{file}: tensor '{tensor}': row length {row_len} is not a multiple of the {dtype} \
         block size {block_size}"
    )]
    RowNotBlockMultiple {
        file: String,
        tensor: String,
        dtype: GgmlType,
        row_len: u64,
        block_size: usize,
    },
    #[error("{file}: duplicate tensor name '{tensor}'")]
    DuplicateTensor { file: String, tensor: String },
    #[error(
        "{file}: tensor '{tensor}' offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        file: String,
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error(
        "{file}: tensor '{tensor}' ({n_bytes} bytes at data offset {offset}) extends past the \
         end of the {data_len}-byte data section"
    )]
    TensorOutOfBounds {
        file: String,
        tensor: String,
        offset: u64,
        n_bytes: u64,
        data_len: u64,
    },
    #[error("{file}: tensors '{tensor}' and '{other}' overlap in the data section")]
    OverlappingTensors {
        file: String,
        tensor: String,
        other: String,
    },
    #[error("{file}: tensor '{tensor}' needs {expected} bytes of data, got {found}")]
    DataSizeMismatch {
        file: String,
        tensor: String,
        expected: u64,
        found: u64,
    },
    #[error("{file}: no tensor named '{tensor}'")]
    MissingTensor { file: String, tensor: String },
    /// A Hugging Face checkpoint (safetensors file, shard index) that breaks its format.
    #[error("{file}: {problem}")]
    Checkpoint { file: String, problem: String },
}

impl FormatError {
    /// The file (or source name) the error concerns.
    pub fn file(&self) -> &str {
        match self {
            FormatError::Io { file, .. }
            | FormatError::BadMagic { file, .. }
            | FormatError::UnsupportedVersion { file, .. }
            | FormatError::Truncated { file, .. }
            | FormatError::CountTooLarge { file, .. }
            | FormatError::UnknownValueType { file, .. }
            | FormatError::NestingTooDeep { file, .. }
            | FormatError::InvalidUtf8 { file, .. }
            | FormatError::InvalidBool { file, .. }
            | FormatError::DuplicateKey { file, .. }
            | FormatError::MissingKey { file, .. }
            | FormatError::WrongType { file, .. }
            | FormatError::BadAlignment { file, .. }
            | FormatError::ArrayTypeMismatch { file, .. }
            | FormatError::UnknownGgmlType { file, .. }
            | FormatError::BadDimCount { file, .. }
            | FormatError::ZeroDim { file, .. }
            | FormatError::SizeOverflow { file, .. }
            | FormatError::RowNotBlockMultiple { file, .. }
            | FormatError::DuplicateTensor { file, .. }
            | FormatError::MisalignedTensor { file, .. }
            | FormatError::TensorOutOfBounds { file, .. }
            | FormatError::OverlappingTensors { file, .. }
            | FormatError::DataSizeMismatch { file, .. }
            | FormatError::MissingTensor { file, .. }
            | FormatError::Checkpoint { file, .. } => file,
        }
    }
}
