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
    #[error("{statement}: {source}")]
    Vindex {
        statement: String,
        source: VindexError,
    },
    #[error("{statement}: {source}")]
    Model {
        statement: String,
        source: ModelError,
    },
}
