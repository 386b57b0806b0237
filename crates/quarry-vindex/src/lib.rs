//! A model decompiled into a queryable *vindex*.
//!
//! `extract` reads a GGUF model and writes a directory of flat, memory-mappable arrays split
//! by function: the FFN gate (and up) vectors of every layer, which act as a KNN index of
//! what each feature responds to; the token embeddings; the FFN input norms; and, per
//! feature, the vocabulary tokens its output pushes up and down most (computed through the
//! real output head and final norm). Higher levels add the model file itself, for forward
//! passes, and the features' write vectors, for editing. [`Vindex`] opens one for queries.
//!
//! The layout is documented in `docs/vindex.md`; [`layout`] is its code.

pub mod check;
mod error;
mod extract;
pub mod layout;
pub mod relations;
mod vindex;

pub use error::VindexError;
pub use extract::{extract, ExtractOptions, Progress};
pub use layout::{Dtype, Index, Level};
pub use vindex::{Mismatch, Vindex};

/// One entry of a feature's vocabulary projection: a token and the logit one unit of the
/// feature's activation adds to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TokenLogit {
    pub token: u32,
    pub logit: f32,
}
