//! Errors of running a statement. Each message names the statement (as canonical LQL) it
//! came from, and says how to fix the problem where that is known.

use quarry_edit::EditError;
use quarry_lql::ParseError;
use quarry_model::ModelError;
use quarry_vindex::VindexError;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Parse(#[from] ParseError),
    #[error("{statement}: no vindex is open; start with USE \"path/to/model.vindex\"")]
    NoVindex { statement: String },
    #[error("{statement}: {message}")]
    Invalid { statement: String, message: String },
    /// An edit, patch or COMPILE the editor refused (bad relation, entity, target or patch
    /// file, among others).
    #[error("{statement}: {source}")]
    Edit {
        statement: String,
        source: Box<EditError>,
    },
    // The sources are boxed: they are large, and every statement returns this error type.
    #[error("{statement}: {source}")]
    Vindex {
        statement: String,
        source: Box<VindexError>,
    },
    #[error("{statement}: {source}")]
    Model {
        statement: String,
        source: Box<ModelError>,
    },
}
