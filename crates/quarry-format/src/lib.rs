//! Model files on disk as typed views: GGUF files and Hugging Face safetensors checkpoints.
//!
//! `quarry-format` knows file layouts, not mathematics: it parses GGUF headers, metadata and
//! tensor tables, maps tensor data zero-copy from the file, and writes GGUF files atomically.
//! Every length, count and offset read from a file is checked against the file's size before it
//! is used, so hostile input yields an [`FormatError`] naming the problem, never a panic or a
//! huge allocation.

mod ggml_type;
pub mod gguf;
pub mod input;
pub mod safetensors;

pub use ggml_type::{GgmlType, QK_K};
pub use gguf::{
    ArrayItems, FormatError, GgufFile, GgufWriter, TensorInfo, TensorView, Value, ValueType,
};
