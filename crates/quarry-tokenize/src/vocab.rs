//! The vocabulary as GGUF stores it: per token its text, score and type, plus a text → id index.
//!
//! Invariants: ids are indices into the token list and fit a `u32`; no two tokens share a
//! non-empty text (so text → id is a function). Empty texts are kept, for their id, but are not
//! indexed.

use std::hash::BuildHasher;

use hashbrown::hash_table::{Entry, HashTable};

use crate::TokenizeError;

/// `tokenizer.ggml.token_type`, as llama.cpp numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    /// 0 or a number this crate does not know; such tokens decode to nothing.
    Undefined,
}

impl TokenType {
    pub(crate) fn from_gguf(value: i64) -> TokenType {
        match value {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub(crate) text: Box<str>,
    pub(crate) score: f32,
    pub(crate) kind: TokenType,
}

impl Token {
    pub(crate) fn new(text: &str, score: f32, kind: TokenType) -> Token {
        Token {
            text: text.into(),
            score,
            kind,
        }
    }
}

/// The text → id index holds only ids and hashes texts through the token list, so building it
/// for a 262k-token vocabulary allocates nothing per token.
pub(crate) struct Vocab {
    tokens: Vec<Token>,
    ids: HashTable<u32>,
    hasher: foldhash::fast::FixedState,
}

impl Vocab {
    pub(crate) fn new(tokens: Vec<Token>) -> Result<Vocab, TokenizeError> {
        if u32::try_from(tokens.len()).is_err() {
            return Err(TokenizeError::VocabTooLarge(tokens.len()));
        }
        let hasher = foldhash::fast::FixedState::default();
        let mut ids = HashTable::with_capacity(tokens.len());
        let text_of = |id: u32| &*tokens[id as usize].text;
        for (id, token) in (0u32..).zip(&tokens) {
            if token.text.is_empty() {
                continue;
            }
            let hash = hasher.hash_one(&*token.text);
            match ids.entry(
                hash,
                |&other| text_of(other) == &*token.text,
                |&other| hasher.hash_one(text_of(other)),
            ) {
                Entry::Occupied(first) => {
                    return Err(TokenizeError::DuplicateToken {
                        text: token.text.to_string(),
                        first: *first.get(),
                        second: id,
                    })
                }
                Entry::Vacant(slot) => {
                    slot.insert(id);
                }
            }
        }
        Ok(Vocab {
            tokens,
            ids,
            hasher,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Token> {
        self.tokens.get(id as usize)
    }

    pub(crate) fn tokens(&self) -> impl Iterator<Item = (u32, &Token)> {
        (0u32..).zip(&self.tokens)
    }

    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        self.ids
            .find(self.hasher.hash_one(text), |&id| {
                &*self.tokens[id as usize].text == text
            })
            .copied()
    }

    /// The score of a token known to exist.
    pub(crate) fn score(&self, id: u32) -> f32 {
        self.tokens[id as usize].score
    }

    pub(crate) fn set_kind(&mut self, id: u32, kind: TokenType) {
        self.tokens[id as usize].kind = kind;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_texts_are_rejected() {
        let tokens = vec![
            Token::new("a", 0.0, TokenType::Normal),
            Token::new("", 0.0, TokenType::Normal),
            Token::new("", 0.0, TokenType::Normal),
            Token::new("a", 0.0, TokenType::Normal),
        ];
        let err = Vocab::new(tokens).err().unwrap();
        assert_eq!(
            err.to_string(),
            "tokenizer.ggml.tokens: \"a\" appears twice, as ids 0 and 3"
        );
    }
}
