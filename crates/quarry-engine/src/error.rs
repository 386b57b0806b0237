use quarry_model::ModelError;

use crate::sampling::SamplingError;

/// Errors of generation and evaluation; messages name the parameter or limit concerned.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the prompt is empty: nothing to continue")]
    EmptyPrompt,
    #[error("the prompt has {tokens} tokens but the context holds {context}; use a shorter prompt or a larger --ctx")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("invalid {name}: {reason}")]
    InvalidArgument { name: &'static str, reason: String },
    #[error("the server is busy: the request waited {waited:?} for a free slot and KV memory; retry later")]
    Overloaded { waited: std::time::Duration },
    #[error("the request did not finish before its deadline")]
    Timeout,
    #[error("the engine is shutting down and accepts no new requests")]
    ShuttingDown,
    #[error("the forward pass of a batch failed: {0}")]
    Batch(String),
}
