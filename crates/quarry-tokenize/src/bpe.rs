//! Byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`).
//!
//! Each pre-tokenized word is turned into GPT-2's printable alphabet (every byte maps to one
//! character: printable Latin-1 bytes to themselves, the rest to U+0100 onwards, so a space is
//! "Ġ" and a newline "Ċ"), split into characters, and merged pair by pair, always the adjacent
//! pair with the lowest merge rank (ties: leftmost), until no adjacent pair has a rank. Ranks come
//! from `tokenizer.ggml.merges`, one "left right" string per rank.
//!
//! Like the SPM merger, a priority queue with stale-entry detection keeps this O(n log n) per word.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

use crate::symbols::{char_symbols, Symbol};
use crate::vocab::Vocab;

/// GPT-2's byte → character table and its inverse.
struct ByteAlphabet {
    chars: [char; 256],
    bytes: HashMap<char, u8>,
}

fn alphabet() -> &'static ByteAlphabet {
    static TABLE: OnceLock<ByteAlphabet> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut chars = ['\0'; 256];
        let mut next_free = 256u32;
        for b in 0..=255u8 {
            chars[b as usize] = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next_free).expect("U+0100..U+0143 are characters");
                next_free += 1;
                c
            };
        }
        let bytes = (0..=255u8).map(|b| (chars[b as usize], b)).collect();
        ByteAlphabet { chars, bytes }
    })
}

/// Appends the raw bytes a byte-level token text stands for. A character outside the alphabet
/// (possible only in a malformed vocabulary) contributes its own UTF-8 bytes.
pub(crate) fn decode_text(text: &str, out: &mut Vec<u8>) {
    let table = alphabet();
    for c in text.chars() {
        match table.bytes.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
}

/// The merge ranks. Merge parts are interned as "piece" ids of their own (they need not be
/// tokens), so that a rank lookup is two string lookups and one pair lookup, with no allocation.
pub(crate) struct Merges {
    pieces: HashMap<Box<str>, u32>,
    ranks: HashMap<(u32, u32), u32>,
}

impl Merges {
    /// `merges[rank]` is "left right". Like llama.cpp, the separator is the first space after the
    /// first byte (so a part may itself start with a space); an entry without one, or a pair
    /// listed twice, keeps its first rank.
    pub(crate) fn new<S: AsRef<str>>(merges: impl IntoIterator<Item = S>) -> Merges {
        let mut pieces: HashMap<Box<str>, u32> = HashMap::new();
        let mut ranks = HashMap::new();
        let mut intern = |s: &str| {
            let n = pieces.len() as u32;
            *pieces.entry(s.into()).or_insert(n)
        };
        for (rank, merge) in (0u32..).zip(merges) {
            let merge = merge.as_ref();
            // Searched as bytes: the first character may be longer than one byte.
            let Some(split) = merge.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1) else {
                continue;
            };
            let pair = (intern(&merge[..split]), intern(&merge[split + 1..]));
            ranks.entry(pair).or_insert(rank);
        }
        Merges { pieces, ranks }
    }

    fn rank(&self, left: &str, right: &str) -> Option<u32> {
        let left = *self.pieces.get(left)?;
        let right = *self.pieces.get(right)?;
        self.ranks.get(&(left, right)).copied()
    }
}

/// Appends the ids of one pre-tokenized word (raw text, not yet byte-encoded) to `out`.
pub(crate) fn encode_word(vocab: &Vocab, merges: &Merges, word: &str, out: &mut Vec<u32>) {
    let table = alphabet();
    let encoded: String = word.bytes().map(|b| table.chars[b as usize]).collect();
    let text = encoded.as_str();
    let mut symbols = char_symbols(text);
    // Entries: Reverse((rank, left, right, combined length)), so the lowest rank, then the
    // leftmost pair, pops first.
    let mut queue = BinaryHeap::new();
    let push = |queue: &mut BinaryHeap<_>, symbols: &[Symbol], left: usize, right: usize| {
        let (l, r) = (symbols[left], symbols[right]);
        let left_text = &text[l.start..l.start + l.len];
        let right_text = &text[r.start..r.start + r.len];
        if let Some(rank) = merges.rank(left_text, right_text) {
            queue.push(Reverse((rank, left, right, l.len + r.len)));
        }
    };
    for i in 1..symbols.len() {
        push(&mut queue, &symbols, i - 1, i);
    }
    while let Some(Reverse((_, left, right, len))) = queue.pop() {
        let (l, r) = (symbols[left], symbols[right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != len {
            continue;
        }
        symbols[left].len = len;
        symbols[left].next = r.next;
        symbols[right].len = 0;
        if let Some(next) = r.next {
            symbols[next].prev = Some(left);
        }
        if let Some(prev) = l.prev {
            push(&mut queue, &symbols, prev, left);
        }
        if let Some(next) = r.next {
            push(&mut queue, &symbols, left, next);
        }
    }
    let mut at = (!symbols.is_empty()).then_some(0);
    while let Some(i) = at {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            // A merge result missing from the vocabulary (a malformed file): fall back to its
            // characters, each of which is a token in any byte-level vocabulary.
            None => out.extend(
                piece
                    .char_indices()
                    .filter_map(|(i, c)| vocab.id(&piece[i..i + c.len_utf8()])),
            ),
        }
        at = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{Token, TokenType};

    #[test]
    fn alphabet_round_trips_every_byte() {
        let table = alphabet();
        assert_eq!(table.chars[b' ' as usize], 'Ġ');
        assert_eq!(table.chars[b'\n' as usize], 'Ċ');
        assert_eq!(table.chars[b'A' as usize], 'A');
        let all: Vec<u8> = (0..=255).collect();
        let text: String = all.iter().map(|&b| table.chars[b as usize]).collect();
        let mut back = Vec::new();
        decode_text(&text, &mut back);
        assert_eq!(back, all);
    }

    #[test]
    fn merges_lowest_rank_first() {
        let texts = ["Ġ", "a", "b", "Ġa", "ab", "Ġab"];
        let tokens = texts
            .iter()
            .map(|t| Token::new(t, 0.0, TokenType::Normal))
            .collect();
        let vocab = Vocab::new(tokens).unwrap();
        let merges = Merges::new(["Ġ a", "a b", "Ġa b"]);
        let mut out = Vec::new();
        encode_word(&vocab, &merges, " ab", &mut out);
        assert_eq!(out, [5]);
        // With "a b" ranked first, "Ġ" stays alone: no "Ġ ab" merge exists.
        let merges = Merges::new(["a b", "Ġ a", "Ġa b"]);
        out.clear();
        encode_word(&vocab, &merges, " ab", &mut out);
        assert_eq!(out, [0, 4]);
    }

    #[test]
    fn merge_parts_split_after_the_first_byte() {
        let merges = Merges::new(["  x", "a b c", "nospace", "Ġ Ġ"]);
        assert_eq!(merges.rank(" ", "x"), Some(0));
        assert_eq!(merges.rank("a", "b c"), Some(1));
        assert_eq!(merges.rank("Ġ", "Ġ"), Some(3));
        assert_eq!(merges.ranks.len(), 3);
    }
}
