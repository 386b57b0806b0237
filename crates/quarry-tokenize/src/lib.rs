//! Tokenizers built from GGUF metadata, and chat templates.
//!
//! [`Tokenizer`] reproduces llama.cpp's token ids for the two vocabulary kinds GGUF files commonly
//! carry: SentencePiece-style vocabularies merged by score (`tokenizer.ggml.model = "llama"`,
//! e.g. Gemma) and byte-level BPE with merge ranks and a named pre-tokenizer (`"gpt2"`, e.g.
//! SmolLM2). [`StreamDecoder`] turns generated ids back into text one token at a time without
//! splitting UTF-8 characters, and [`ChatTemplate`] renders a conversation with the file's Jinja
//! chat template (or a built-in fallback).
//!
//! Everything is hand-written over the vocabulary data rather than delegated to a tokenizer
//! library: llama.cpp's ids depend on details (the order special tokens are cut out of the text,
//! how pre-tokenizer stages compose, byte fallback) that must be reproduced exactly.

mod bpe;
mod chat;
mod decode;
mod error;
mod gguf;
mod pretokenize;
mod special;
mod spm;
mod symbols;
mod tokenizer;
mod vocab;

pub use chat::{ChatMessage, ChatTemplate, RenderedChat};
pub use decode::StreamDecoder;
pub use error::TokenizeError;
pub use tokenizer::Tokenizer;
