//! The one error type of the crate.

use std::fmt;

/// Why a script does not parse, and where.
///
/// `line` and `column` are 1-based and count characters (not bytes); they point at the first
/// character of the offending token, or just past the end of the script when input ran out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}{}", HintSuffix(.hint.as_deref()))]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// A likely fix or a correct example, when one is known.
    pub hint: Option<String>,
}

/// Formats the optional hint as its own indented line.
struct HintSuffix<'a>(Option<&'a str>);

impl fmt::Display for HintSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(hint) => write!(f, "\n  hint: {hint}"),
            None => Ok(()),
        }
    }
}
