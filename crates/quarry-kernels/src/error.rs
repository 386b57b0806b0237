//! The one error type of this crate.
//!
//! Kernels reject bad input (a type they cannot handle, a buffer of the wrong length) with a
//! [`KernelError`] that names what was wrong and the numbers involved. Shape mismatches between
//! buffers the caller sized itself are bugs, not input errors, and panic instead.

use quarry_format::GgmlType;
use thiserror::Error;

/// Why a kernel refused its input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KernelError {
    /// The operation has no implementation for this element type.
    #[error("{op} is not supported for {dtype}")]
    UnsupportedType { dtype: GgmlType, op: &'static str },

    /// A buffer's length disagrees with the shape it is meant to hold.
    #[error("{what}: expected {expected}, got {actual}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },

    /// A value count that does not split into whole blocks of the type.
    #[error("{n} values is not a whole number of {dtype} blocks ({} values each)", dtype.block_size())]
    NotBlockMultiple { dtype: GgmlType, n: usize },

    /// A shape whose byte size does not fit in memory addresses.
    #[error("{what} overflows: {rows} rows of {cols} {dtype} values")]
    TooLarge {
        what: &'static str,
        dtype: GgmlType,
        rows: usize,
        cols: usize,
    },
}
