//! Runs LQL (parsed by `quarry-lql`) against a vindex and, for statements that need a forward
//! pass, the model file inside it. Every statement returns a [`ResultSet`]: named, typed
//! columns and rows, rendered as an aligned table or as JSON.
//!
//! Browsing statements (DESCRIBE, WALK, SELECT, SHOW, STATS) read only the vindex; INFER,
//! EXPLAIN INFER and TRACE run the model (an `inference`-level vindex, or a GGUF file opened
//! with `USE` for INFER and TRACE). The editing statements (INSERT, UPDATE, DELETE, patches,
//! COMPILE) change what the model runs under, never its file (`edit`). What each statement
//! computes is documented in `docs/lql.md` and in the modules: [`browse`](crate::browse) for
//! how features are ranked, `trace` for the exact attribution.

mod answers;
mod browse;
mod edit;
mod error;
mod executor;
mod in_context;
mod interrupt;
mod relations;
mod result;
mod select;
mod trace;

pub use edit::{CORPUS_FILE, STATS_DIR_VAR};
pub use error::QueryError;
pub use executor::Executor;
pub use interrupt::{Interrupt, CHUNK_TOKENS, INTERRUPTED};
pub use result::{Cell, Column, ColumnType, ResultSet};
