//! The crate's error type. Every variant names what was wrong: the metadata key, the token id or
//! text, or the template and its message.

use thiserror::Error;

/// Why a tokenizer or chat template could not be built, or a template could not be rendered.
#[derive(Debug, Error)]
pub enum TokenizeError {
    /// A metadata entry the tokenizer needs is missing or has the wrong type (the message names
    /// the file and the key).
    #[error(transparent)]
    Format(#[from] quarry_format::FormatError),
    /// One element of a metadata array has the wrong type.
    #[error("GGUF metadata {key}[{index}]: expected {expected}")]
    BadElement {
        key: &'static str,
        index: usize,
        expected: &'static str,
    },
    /// A per-token array is shorter than the token list.
    #[error("GGUF metadata {key} has {len} entries but tokenizer.ggml.tokens has {n_vocab}")]
    LengthMismatch {
        key: &'static str,
        len: usize,
        n_vocab: usize,
    },
    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    #[error(
        "tokenizer.ggml.model = {0:?} is not supported (supported: \"llama\", \"gpt2\", \
         \"huggingface\")"
    )]
    UnsupportedModel(String),
    /// The Hugging Face `tokenizer.json` a model carries does not load.
    #[error("tokenizer.json does not parse: {0}")]
    HuggingFace(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error(
        "tokenizer.ggml.pre = {0:?} is not supported (supported: default, gpt2, gpt-2, smollm, \
         llama-bpe, qwen2 and the pre-tokenizers that share their rules)"
    )]
    UnknownPreTokenizer(String),
    /// A special-token id in the metadata lies outside the vocabulary.
    #[error("GGUF metadata {key} = {id} is outside the vocabulary of {n_vocab} tokens")]
    TokenIdOutOfRange {
        key: &'static str,
        id: u64,
        n_vocab: usize,
    },
    /// The metadata asks for a special token to be added but does not say which.
    #[error("{flag_key} is true but {id_key} is not set")]
    MissingSpecialToken {
        flag_key: &'static str,
        id_key: &'static str,
    },
    /// Two tokens have the same text, so text-to-id lookup would be ambiguous.
    #[error("tokenizer.ggml.tokens: {text:?} appears twice, as ids {first} and {second}")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
    /// The vocabulary has more tokens than a `u32` id can address.
    #[error("tokenizer.ggml.tokens has {0} tokens, more than a u32 id can address")]
    VocabTooLarge(usize),
    /// Every private-use character occurs in the conversation or the vocabulary, so none is
    /// left to keep message contents apart from the template's markup.
    #[error(
        "chat messages: the conversation uses every Unicode private-use character, so its \
         contents cannot be kept apart from the template's special tokens"
    )]
    NoContentMark,
    /// A chat template failed to parse or to render.
    #[error("chat template ({what}): {source}")]
    Template {
        what: &'static str,
        #[source]
        source: minijinja::Error,
    },
}
