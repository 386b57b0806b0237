//! Quantized blocks and the arithmetic over them.
//!
//! This crate knows what the bytes of ggml's element types mean: it decodes every float and
//! block-quantized weight format to `f32` ([`dequantize`]), encodes the few formats the engine
//! writes itself ([`quantize`]), and multiplies activations by weights that stay in their
//! stored format ([`WeightView`], [`matmul()`]).
//!
//! The scalar decoders are the reference: any faster kernel added later must agree with them
//! and be tested against them. Bad input (an unsupported type, a buffer of the wrong length)
//! is reported as a [`KernelError`]; shape mismatches between buffers the caller allocated
//! itself are bugs and panic with a message naming both sizes.

pub mod act;
mod dequant;
pub mod dot;
mod error;
pub mod gemm;
pub mod half_rows;
mod matmul;
pub mod pool;
mod quant;
pub mod vec;

pub use act::QuantizedActivations;
pub use dequant::dequantize;
pub use error::KernelError;
pub use matmul::{matmul, matmul_quantized, matmul_quantized_many, Matrix, WeightView};
pub use quant::quantize;
pub use quarry_format::{GgmlType, QK_K};
