//! Generation engine: choosing tokens, deciding when to stop, running sessions, scoring text.
//!
//! - [`sampling`]: the sampler chain that turns logits into the next token.
//! - [`stop`]: stop strings watched over streamed text.
//! - [`session`]: a KV cache plus the decode loop; reuses cached prefixes across chat turns.
//! - [`perplexity`]: llama.cpp's perplexity method, so figures compare.
//! - [`paged_kv`]: a paged KV cache with a bounded block pool and a prefix cache.
//! - [`scheduler`]: continuous batching of many requests over one model, for serving.

mod error;
pub mod paged_kv;
pub mod perplexity;
pub mod sampling;
pub mod scheduler;
pub mod session;
pub mod stop;

pub use error::EngineError;
pub use sampling::{Sampler, SamplingError, SamplingParams};
pub use scheduler::{
    Cancel, Engine, EngineConfig, EngineHandle, EngineStats, Event, EventSink, Request,
    TokenLogprob, Usage,
};
pub use session::{FinishReason, GenerateOptions, Generation, Session};
pub use stop::StopStrings;
