//! Editing what a model knows.
//!
//! One algorithm, of the locate-then-edit family (ROME → MEMIT → AlphaEdit): a fact
//! `(entity, relation, target)` is read by the FFN of a middle layer at the entity's last token;
//! the *key* is that FFN's hidden activation there, and the *value* is the change `δ` of its
//! output that makes the model continue the relation's prompt with the target, found by
//! gradient descent through the layers above ([`dense`], reverse mode in `f32`). All edits of
//! a patch are then solved together as one low-rank change of the layer's down projection,
//! restricted to the null space of the keys of ordinary text and keeping the keys of other
//! subjects of the same prompts near zero change ([`solve`]), so that what the layer does for
//! other inputs is (nearly) untouched. The
//! change is a [`quarry_model::FfnOverlay`]: the base weights are never modified.

pub mod compose;
pub mod dense;
mod edit;
mod error;
pub mod eval;
pub mod patch;
pub mod solve;
mod spread;

pub use edit::{
    key_stats, Earlier, Edit, EditKind, EditRequest, Editor, Hyper, Prepared, MAX_TARGET_TOKENS,
    STATS_TOKENS,
};
pub use error::EditError;
pub use patch::{Base, Patch};
pub use quarry_relations::catalogue;
