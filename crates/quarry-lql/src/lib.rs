//! LQL, the query language for treating a model as a database.
//!
//! This crate is syntax only: [`parse`] turns a script into [`Statement`]s, and every syntax-tree
//! type implements [`Display`](std::fmt::Display) by printing canonical LQL (uppercase keywords,
//! double-quoted strings, minimal parentheses). What the statements mean is up to the engine that
//! runs them. The full grammar, with examples, is in `docs/lql.md`.
//!
//! # Invariants
//!
//! - **Round trip.** For every statement `s` that [`parse`] returns,
//!   `parse(&s.to_string()) == Ok(vec![s])`. Syntax trees built by hand print the same way, but
//!   only round-trip if the parser could have produced them: field names must be identifiers that
//!   are not [reserved](#reserved-words), numbers finite, layer ranges ordered, `IN` lists and
//!   field lists non-empty, `LAYERS` on `INFER` only with `explain`, expressions no deeper
//!   than [`MAX_EXPR_DEPTH`], `INSERT` rows between one and [`MAX_INSERT_ROWS`], and every
//!   `TEMPLATE` containing `{entity}` exactly once.
//! - **No panics.** Any input, however malformed, yields statements or a [`ParseError`] naming
//!   the line and column of the offending token. Nesting is bounded ([`MAX_EXPR_DEPTH`]), so
//!   neither parsing nor printing nor dropping a tree can exhaust the stack.
//! - **Errors in source order.** The first problem in the script is the one reported, whether it
//!   is lexical (an unterminated string) or grammatical.
//!
//! # Reserved words
//!
//! Keywords are case-insensitive and, in general, only mean something where the grammar expects
//! them, so `layer` or `top` are fine field names. The words that structure a `SELECT` —
//! `SELECT FROM NEAREST WHERE ORDER BY ASC DESC LIMIT AND OR NOT BETWEEN IN LIKE` — are
//! reserved: they cannot name a field, which keeps the grammar LL(1), keeps error messages about
//! a missing field list or operator precise, and lets the printer write field names unquoted.

mod ast;
mod display;
mod error;
mod lexer;
mod parser;

pub use ast::{
    CmpOp, CompileTarget, DescribeMethod, DescribeScope, Detail, EdgeValue, EditMode, Expr,
    LayerRange, Literal, ModelFormat, Nearest, OrderKey, PatchStatement, Projection, Select,
    ShowTarget, Source, Statement,
};
pub use error::ParseError;
pub use parser::{MAX_EXPR_DEPTH, MAX_INSERT_ROWS};

/// Parses a script: zero or more statements separated by `;` (a trailing `;` and empty
/// statements are allowed).
///
/// # Errors
///
/// The first lexical or grammatical error in the script, with its position and, where a likely
/// fix is known, a hint.
pub fn parse(src: &str) -> Result<Vec<Statement>, ParseError> {
    parser::parse_script(src)
}
