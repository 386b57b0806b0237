//! Cutting special-token texts out of the input before the subword algorithm runs.
//!
//! Follows llama.cpp: the candidates are the control, unknown and user-defined tokens, taken
//! longest text first (ties by id). Each candidate in turn splits every remaining text fragment
//! at its leftmost non-overlapping occurrences. User-defined tokens (Gemma's runs of spaces,
//! tabs and newlines, its HTML tags) are always cut out; control and unknown tokens only when
//! the caller asks to parse special tokens. Taking candidates longest-first rather than scanning
//! the text once matters when matches overlap, and reproduces llama.cpp's ids there too.
//!
//! Invariant: the fragments returned cover the input exactly, in order; text fragments are never
//! empty.

use std::ops::Range;

use aho_corasick::AhoCorasick;

/// A piece of the input: text still to be tokenized, or a special token already recognized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

/// The special tokens of a vocabulary, in the order they are tried.
pub(crate) struct SpecialTokens {
    /// Candidates, longest text first: (id, text, cut out only when parsing special tokens).
    candidates: Vec<(u32, Box<str>, bool)>,
    /// Finds which candidates occur in a text at all (pattern index = candidate index), so that
    /// encoding does not search the text once per candidate; Gemma has 6,400 of them.
    finder: Option<AhoCorasick>,
}

impl SpecialTokens {
    /// `candidates`: (id, text, only when parsing special) for every control, unknown and
    /// user-defined token with a non-empty text.
    pub(crate) fn new(mut candidates: Vec<(u32, Box<str>, bool)>) -> SpecialTokens {
        candidates.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let finder = (!candidates.is_empty()).then(|| {
            AhoCorasick::new(candidates.iter().map(|c| c.1.as_bytes()))
                .expect("an automaton over a few thousand short patterns fits the default limits")
        });
        SpecialTokens { candidates, finder }
    }

    /// Every candidate's text, with whether it is cut only when parsing special tokens.
    pub(crate) fn texts(&self) -> impl Iterator<Item = (&str, bool)> {
        self.candidates
            .iter()
            .map(|(_, text, only_if_parsing)| (&**text, *only_if_parsing))
    }

    /// Splits `text` into fragments; an empty text gives none.
    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];
        let Some(finder) = &self.finder else {
            return fragments;
        };
        let mut present = vec![false; self.candidates.len()];
        for m in finder.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
        }
        for (index, (id, needle, only_if_parsing)) in self.candidates.iter().enumerate() {
            if !present[index] || (*only_if_parsing && !parse_special) {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut start = range.start;
                for (offset, _) in text[range.clone()].match_indices(&**needle) {
                    let at = range.start + offset;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(*id));
                    start = at + needle.len();
                }
                if start < range.end {
                    next.push(Fragment::Text(start..range.end));
                }
            }
            fragments = next;
        }
        fragments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials() -> SpecialTokens {
        SpecialTokens::new(vec![
            (10, "<s>".into(), true),
            (11, "  ".into(), false),
            (12, "   ".into(), false),
            (13, "bcd".into(), false),
            (14, "ab".into(), false),
        ])
    }

    #[test]
    fn control_tokens_only_when_parsing() {
        let t = specials();
        let text = "<s>x  y";
        assert_eq!(
            t.partition(text, true),
            [
                Fragment::Token(10),
                Fragment::Text(3..4),
                Fragment::Token(11),
                Fragment::Text(6..7)
            ]
        );
        assert_eq!(
            t.partition(text, false),
            [
                Fragment::Text(0..4),
                Fragment::Token(11),
                Fragment::Text(6..7)
            ]
        );
    }

    #[test]
    fn longest_candidate_first() {
        let t = specials();
        // Five spaces: the three-space token is cut first, then the two-space one.
        assert_eq!(
            t.partition("     ", false),
            [Fragment::Token(12), Fragment::Token(11)]
        );
        // "bcd" (longer) wins over the overlapping "ab" even though "ab" starts earlier.
        assert_eq!(
            t.partition("abcd", false),
            [Fragment::Text(0..1), Fragment::Token(13)]
        );
        assert!(t.partition("", true).is_empty());
    }
}
