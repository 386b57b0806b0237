//! Relations: what DESCRIBE reads out of a model and what INSERT edits.
//!
//! The [`catalogue`] names each relation once, with a human label, the kind of answer it
//! takes and its prompt templates (cloze and question forms); DESCRIBE asks the model every
//! relation's question and the editor makes and tests an edit on the same prompts. The
//! [`readout`] runs those prompts through the model as one batch and keeps the words it
//! answers with, and [`accuracy`] measures how often those answers are right on each
//! relation's known pairs. This crate sits under the editor, the vindex and the query engine so all of
//! them share one definition.

pub mod accuracy;
pub mod catalogue;
pub mod readout;

/// A relation or template the catalogue cannot use, naming it.
#[derive(Debug, thiserror::Error)]
pub enum RelationError {
    #[error("relation \"{relation}\" is not in the catalogue ({known}); give a TEMPLATE with {{entity}} in it")]
    UnknownRelation { relation: String, known: String },
    #[error("template \"{template}\" must contain {{entity}} exactly once")]
    BadTemplate { template: String },
}
