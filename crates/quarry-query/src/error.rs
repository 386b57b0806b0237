//! Errors of running a statement. Each message names the statement (as canonical LQL) it
//! came from, and says how to fix the problem where that is known.

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
    /// A statement that parses but that this engine cannot run yet (the editing statements
    /// of issue 15: INSERT, UPDATE, DELETE, patches, SHOW PATCHES and COMPILE).
    #[error("{statement}: this statement is not available yet (editing, patches and COMPILE are not wired into the engine)")]
    Unsupported { statement: String },
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
