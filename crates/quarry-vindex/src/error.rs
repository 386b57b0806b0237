//! Errors of extracting, opening and verifying a vindex. Each names the path (and the file
//! inside the vindex) it is about.

use quarry_format::FormatError;
use quarry_model::ModelError;
use quarry_tokenize::TokenizeError;

use crate::layout::{FORMAT, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum VindexError {
    #[error("{path}: cannot {action}: {source}")]
    Io {
        path: String,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: not a valid vindex manifest: {source}")]
    Manifest {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: format is {found:?}, not \"{FORMAT}\" (not a Quarry vindex)")]
    Foreign { path: String, found: String },
    #[error("{path}: layout version {found}; this build reads version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path}: {file} is listed in the manifest but {problem}")]
    BadFile {
        path: String,
        file: String,
        problem: String,
    },
    /// A value inside a file that disagrees with the format or another file; `problem`
    /// starts with the field.
    #[error("{path}: {file}: {problem}")]
    Invalid {
        path: String,
        file: &'static str,
        problem: String,
    },
    #[error("{path}: the manifest lists no {file}, which a {level} vindex must have")]
    MissingFile {
        path: String,
        file: &'static str,
        level: &'static str,
    },
    #[error("{path}: {file} is needed for this but the vindex was extracted at level {level}; extract again with --level {needed}")]
    LevelTooLow {
        path: String,
        file: &'static str,
        level: &'static str,
        needed: &'static str,
    },
    #[error("{path} already exists; remove it or choose another output")]
    Exists { path: String },
    #[error("{path}: invalid extract option: {problem}")]
    Option { path: String, problem: String },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
}

/// A `map_err` helper for I/O on `path`.
pub(crate) fn io<'p>(
    path: &'p std::path::Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> VindexError + 'p {
    move |source| VindexError::Io {
        path: path.display().to_string(),
        action,
        source,
    }
}
