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
}
