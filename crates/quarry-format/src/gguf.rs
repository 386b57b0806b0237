//! GGUF files: reading (memory-mapped, zero-copy tensor data) and writing (version 3).
//!
//! # Layout
//!
//! All integers are little-endian. A file is:
//!
//! 1. a header: the magic `GGUF`, a `u32` version, a `u64` tensor count and a `u64` metadata
//!    count (version 1 used `u32` counts and is rejected);
//! 2. the metadata: per entry a string key, a `u32` [`ValueType`] id and the value. Strings are a
//!    `u64` byte length followed by UTF-8 bytes; arrays are a `u32` element type, a `u64` count
//!    and the elements without per-element tags (a nested array element carries its own element
//!    type and count);
//! 3. the tensor table: per tensor a string name, a `u32` dimension count, that many `u64`
//!    dimensions (ggml order: `dims[0]` is the contiguous row), a `u32` [`GgmlType`] id and a
//!    `u64` offset relative to the data section;
//! 4. zero padding up to a multiple of the alignment (`general.alignment`, a `u32`, default 32),
//!    then the data section, each tensor at an aligned offset.
//!
//! # Invariants of an opened [`GgufFile`]
//!
//! Metadata keys and tensor names are unique and valid UTF-8; arrays are homogeneous and nest at
//! most [`MAX_ARRAY_NESTING`] deep; the alignment is a power of two. Every tensor has 1 to
//! [`MAX_DIMS`] dimensions, none of them zero (an empty tensor has no use in inference and would
//! make offset and overlap rules ambiguous, so it is rejected), a row length that is a whole
//! number of blocks, and a byte size that does not overflow; it lies at an aligned offset,
//! entirely inside the data section, and overlaps no other tensor. [`GgufWriter`] enforces the
//! same rules, so whatever it writes reads back.
//!
//! # Hostile input
//!
//! Every count is checked against the bytes left before anything is allocated for it (each entry
//! takes a known minimum number of bytes), so decoded metadata costs at most a small constant
//! factor (`size_of::<Value>()`) of the file's size.

mod error;
mod reader;
mod value;
mod writer;

pub use error::FormatError;
pub use reader::{ArrayItems, GgufFile, TensorInfo, TensorView};
pub use value::{Value, ValueType};
pub use writer::GgufWriter;

use crate::GgmlType;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// The alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most dimensions a tensor may have (ggml's limit).
pub const MAX_DIMS: usize = 4;

/// The deepest nesting of arrays accepted, which bounds the reader's recursion.
pub const MAX_ARRAY_NESTING: usize = 16;

/// The metadata key holding the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// The source named in errors raised while building a file with [`GgufWriter`].
pub const WRITER_SOURCE: &str = "GgufWriter";

/// Checks a tensor's shape against `dtype` and returns its size in bytes.
fn tensor_size(
    file: &str,
    tensor: &str,
    dims: &[u64],
    dtype: GgmlType,
) -> Result<u64, FormatError> {
    let row_len = match dims {
        [row, ..] if dims.len() <= MAX_DIMS => *row,
        _ => {
            return Err(FormatError::BadDimCount {
                file: file.to_owned(),
                tensor: tensor.to_owned(),
                n_dims: dims.len() as u64,
            })
        }
    };
    if dims.contains(&0) {
        return Err(FormatError::ZeroDim {
            file: file.to_owned(),
            tensor: tensor.to_owned(),
            dims: dims.to_vec(),
        });
    }
    // Blocks never straddle rows, so the row, not just the total, must be whole blocks.
    if row_len % dtype.block_size() as u64 != 0 {
        return Err(FormatError::RowNotBlockMultiple {
            file: file.to_owned(),
            tensor: tensor.to_owned(),
            dtype,
            row_len,
            block_size: dtype.block_size(),
        });
    }
    dims.iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .and_then(|n| dtype.bytes_for(n))
        .ok_or_else(|| FormatError::SizeOverflow {
            file: file.to_owned(),
            tensor: tensor.to_owned(),
            dims: dims.to_vec(),
            dtype,
        })
}

/// `x` rounded up to a multiple of `alignment` (a power of two), or `None` on overflow.
fn align_up(x: u64, alignment: u64) -> Option<u64> {
    x.checked_next_multiple_of(alignment)
}
