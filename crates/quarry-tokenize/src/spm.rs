//! SentencePiece-style merging by score (GGUF `tokenizer.ggml.model = "llama"`).
//!
//! GGUF stores no merge list for these vocabularies, only a score per token. The text (spaces
//! already escaped to U+2581) starts as one symbol per character; the adjacent pair whose
//! concatenation is a vocabulary token with the highest score is merged, ties going to the
//! leftmost pair, until no adjacent pair forms a token. A final symbol that is not a token (a
//! character missing from the vocabulary) becomes one byte-fallback token per UTF-8 byte.
//!
//! A priority queue keeps this O(n log n): a candidate pair stays in the queue after one of its
//! symbols changes and is recognized as stale when popped (its symbols' lengths no longer add up
//! to the length it was queued with).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::symbols::{char_symbols, Symbol};
use crate::vocab::Vocab;

struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Candidate {
    // Highest score first; among equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// Appends the ids of `text` to `out`. `byte_tokens[b]` is the fallback token of byte `b`.
pub(crate) fn encode(
    vocab: &Vocab,
    byte_tokens: &[Option<u32>; 256],
    text: &str,
    out: &mut Vec<u32>,
) {
    let mut symbols = char_symbols(text);
    let mut queue = BinaryHeap::new();
    let push =
        |queue: &mut BinaryHeap<Candidate>, symbols: &[Symbol], left: usize, right: usize| {
            let (l, r) = (symbols[left], symbols[right]);
            let len = l.len + r.len;
            if let Some(id) = vocab.id(&text[l.start..l.start + len]) {
                queue.push(Candidate {
                    score: vocab.score(id),
                    left,
                    right,
                    len,
                });
            }
        };
    for i in 1..symbols.len() {
        push(&mut queue, &symbols, i - 1, i);
    }
    while let Some(c) = queue.pop() {
        let (l, r) = (symbols[c.left], symbols[c.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != c.len {
            continue;
        }
        symbols[c.left].len = c.len;
        symbols[c.left].next = r.next;
        symbols[c.right].len = 0;
        if let Some(next) = r.next {
            symbols[next].prev = Some(c.left);
        }
        if let Some(prev) = l.prev {
            push(&mut queue, &symbols, prev, c.left);
        }
        if let Some(next) = r.next {
            push(&mut queue, &symbols, c.left, next);
        }
    }
    let mut at = (!symbols.is_empty()).then_some(0);
    while let Some(i) = at {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| byte_tokens[b as usize])),
        }
        at = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{Token, TokenType};

    fn vocab(entries: &[(&str, f32)]) -> Vocab {
        let tokens = entries
            .iter()
            .map(|&(text, score)| Token::new(text, score, TokenType::Normal))
            .collect();
        Vocab::new(tokens).unwrap()
    }

    fn run(v: &Vocab, bytes: &[Option<u32>; 256], text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        encode(v, bytes, text, &mut out);
        out
    }

    #[test]
    fn merges_highest_score_first() {
        // "abc": "ab" scores higher than "bc", so a|b merge first and "abc" is reached via "ab".
        let v = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -2.0),
            ("bc", -3.0),
            ("abc", -5.0),
        ]);
        assert_eq!(run(&v, &[None; 256], "abc"), [5]);
        // Without "abc", "bc" (higher score) merges first and "a" stays alone.
        let v = vocab(&[
            ("a", -1.0),
            ("b", -1.0),
            ("c", -1.0),
            ("ab", -2.0),
            ("bc", -1.5),
        ]);
        assert_eq!(run(&v, &[None; 256], "abc"), [0, 4]);
    }

    #[test]
    fn ties_go_to_the_leftmost_pair() {
        let v = vocab(&[("a", 0.0), ("aa", -1.0)]);
        assert_eq!(run(&v, &[None; 256], "aaa"), [1, 0]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let v = vocab(&[("a", 0.0)]);
        let mut bytes = [None; 256];
        for (b, slot) in bytes.iter_mut().enumerate() {
            *slot = Some(100 + b as u32);
        }
        // 'é' is C3 A9.
        assert_eq!(run(&v, &bytes, "aé"), [0, 100 + 0xC3, 100 + 0xA9]);
        assert!(run(&v, &bytes, "").is_empty());
    }
}
