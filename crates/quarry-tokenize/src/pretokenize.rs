//! Pre-tokenizers of byte-level BPE vocabularies: they cut text into words before merging, so no
//! token ever spans two words.
//!
//! A pre-tokenizer is a pipeline of stages, as in llama.cpp: each stage re-splits every piece the
//! previous stage produced, and the text between two matches of a stage stays a piece of its own,
//! so the pieces always cover the input exactly, in order. A stage never looks beyond the piece it
//! is splitting (a lookahead at a piece's end sees "end of text").
//!
//! Character classes follow the Unicode general categories (`\p{L}` letters, `\p{N}` numbers,
//! `\p{P}` punctuation) and the `White_Space` property (`\s`).

use std::ops::Range;
use std::sync::OnceLock;

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

/// The regular expression of GPT-2, which most byte-level BPE pre-tokenizers build on:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// The GPT-2 expression alone (`tokenizer.ggml.pre` "gpt2", "gpt-2", "mpt", "olmo", ...).
    Gpt2,
    /// Every number character on its own, then GPT-2 ("smollm", "starcoder", "refact", ...).
    DigitsThenGpt2,
    /// llama.cpp's fallback for an unnamed BPE pre-tokenizer ("default"): runs of punctuation,
    /// then GPT-2, then runs of numbers, then groups of three ASCII digits.
    Default,
    /// Llama 3's expression ("llama-bpe", "llama3", "dbrx", "smaug-bpe", ...): case-insensitive
    /// contractions, a letter run with one leading non-letter, numbers in groups of up to three,
    /// punctuation runs with the line breaks after them, line-break runs.
    Llama3,
    /// Qwen 2's ("qwen2", "deepseek-r1-qwen"): Llama 3's with each number character alone.
    Qwen2,
}

/// Llama 3's pre-tokenizer expression (`tokenizer.json` `Split` pattern, as llama.cpp runs it).
const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's: Llama 3's with `\p{N}` alone.
const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// An expression with a lookahead, compiled once (by the `fancy-regex` engine HF `tokenizers`
/// runs the same patterns with).
fn compiled(
    cell: &'static OnceLock<fancy_regex::Regex>,
    pattern: &str,
) -> &'static fancy_regex::Regex {
    cell.get_or_init(|| fancy_regex::Regex::new(pattern).expect("the built-in pattern compiles"))
}

impl PreTokenizer {
    /// The pre-tokenizer a GGUF's `tokenizer.ggml.pre` names; `None` when it is not implemented.
    pub(crate) fn from_name(name: &str) -> Option<PreTokenizer> {
        Some(match name {
            "default" => PreTokenizer::Default,
            "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" | "exaone4" => {
                PreTokenizer::Gpt2
            }
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => PreTokenizer::DigitsThenGpt2,
            "llama-bpe" | "llama3" | "dbrx" | "smaug-bpe" | "falcon3" | "pixtral" => {
                PreTokenizer::Llama3
            }
            "qwen2" | "deepseek-r1-qwen" | "megrez" => PreTokenizer::Qwen2,
            _ => return None,
        })
    }

    /// Splits `text` into words: byte ranges that cover it exactly, in order, none empty.
    pub(crate) fn split(self, text: &str) -> Vec<Range<usize>> {
        static LLAMA3: OnceLock<fancy_regex::Regex> = OnceLock::new();
        static QWEN2: OnceLock<fancy_regex::Regex> = OnceLock::new();
        match self {
            PreTokenizer::Llama3 => return split_by(compiled(&LLAMA3, LLAMA3_PATTERN), text),
            PreTokenizer::Qwen2 => return split_by(compiled(&QWEN2, QWEN2_PATTERN), text),
            _ => {}
        }
        let stages: &[Stage] = match self {
            PreTokenizer::Gpt2 => &[Stage::Gpt2],
            PreTokenizer::DigitsThenGpt2 => &[Stage::EachNumber, Stage::Gpt2],
            PreTokenizer::Default => &[
                Stage::PunctuationRuns,
                Stage::Gpt2,
                Stage::NumberRuns,
                Stage::AsciiDigitTriples,
            ],
            PreTokenizer::Llama3 | PreTokenizer::Qwen2 => unreachable!("split by expression above"),
        };
        // An empty text splits into no pieces: every stage drops empty ones.
        let mut pieces: Vec<Range<usize>> = std::iter::once(0..text.len()).collect();
        for stage in stages {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                stage.split(text, piece, &mut next);
            }
            pieces = next;
        }
        pieces
    }
}

/// The matches of `regex` in `text` and the text between them, in order, none empty.
fn split_by(regex: &fancy_regex::Regex, text: &str) -> Vec<Range<usize>> {
    let mut pieces = Vec::new();
    let mut last = 0;
    for m in regex.find_iter(text) {
        // The patterns end in `\s+`, which matches any character run left; an engine error
        // (backtracking limits) leaves the rest as one piece.
        let Ok(m) = m else { break };
        if m.start() > last {
            pieces.push(last..m.start());
        }
        if m.end() > m.start() {
            pieces.push(m.start()..m.end());
        }
        last = m.end();
    }
    if last < text.len() {
        pieces.push(last..text.len());
    }
    pieces
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    /// `\p{N}`: each number character alone.
    EachNumber,
    /// `\p{N}+`.
    NumberRuns,
    /// `[0-9][0-9][0-9]`.
    AsciiDigitTriples,
    /// `[\p{P}\$\+<=>\^~\|]+`.
    PunctuationRuns,
    /// The GPT-2 expression.
    Gpt2,
}

impl Stage {
    fn split(self, text: &str, piece: Range<usize>, out: &mut Vec<Range<usize>>) {
        let chars: Vec<(usize, char)> = text[piece.clone()]
            .char_indices()
            .map(|(i, c)| (piece.start + i, c))
            .collect();
        let mut cut = Cutter {
            chars: &chars,
            end: piece.end,
            last: 0,
            out,
        };
        match self {
            Stage::EachNumber => cut.runs(|c| class(c) == Class::Number, Some(1)),
            Stage::NumberRuns => cut.runs(|c| class(c) == Class::Number, None),
            Stage::AsciiDigitTriples => cut.runs(|c| c.is_ascii_digit(), Some(3)),
            Stage::PunctuationRuns => cut.runs(
                |c| matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|') || is_punctuation(c),
                None,
            ),
            Stage::Gpt2 => cut.gpt2(),
        }
        // Whatever follows the last match is a piece of its own.
        cut.cut(chars.len());
    }
}

/// Emits pieces of one input piece, by character index.
struct Cutter<'a> {
    chars: &'a [(usize, char)],
    /// Byte offset where the input piece ends.
    end: usize,
    /// Character index where the next piece starts.
    last: usize,
    out: &'a mut Vec<Range<usize>>,
}

impl Cutter<'_> {
    fn byte(&self, i: usize) -> usize {
        self.chars.get(i).map_or(self.end, |&(b, _)| b)
    }

    /// Ends the current piece at character index `at` (nothing when it would be empty).
    fn cut(&mut self, at: usize) {
        if at > self.last {
            let range = self.byte(self.last)..self.byte(at);
            self.out.push(range);
            self.last = at;
        }
    }

    /// Matches runs of characters for which `is_member` holds, each run cut into chunks of at most
    /// `max` characters when `max` is set; a final chunk shorter than `max` still matches only
    /// when `max` is `None` or the expression allows it (`[0-9]{3}` does not, `\p{N}` has max 1).
    fn runs(&mut self, is_member: impl Fn(char) -> bool, max: Option<usize>) {
        let n = self.chars.len();
        let mut i = 0;
        while i < n {
            if !is_member(self.chars[i].1) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < n && is_member(self.chars[j].1) && max.is_none_or(|m| j - i < m) {
                j += 1;
            }
            // `[0-9][0-9][0-9]` needs exactly three digits; a shorter run is left unmatched.
            if max.is_some_and(|m| j - i < m) {
                i = j;
                continue;
            }
            self.cut(i);
            self.cut(j);
            i = j;
        }
    }

    /// The GPT-2 expression, alternative by alternative, as a hand-written scanner.
    fn gpt2(&mut self) {
        let n = self.chars.len();
        let ch = |i: usize| self.chars.get(i).map(|&(_, c)| c);
        let cls = |i: usize| ch(i).map(class);
        let mut pos = 0;
        while pos < n {
            let c = self.chars[pos].1;
            // 's|'t|'re|'ve|'m|'ll|'d
            if c == '\'' {
                let next = (ch(pos + 1), ch(pos + 2));
                let len = match next {
                    (Some('s' | 't' | 'm' | 'd'), _) => 2,
                    (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
                    _ => 0,
                };
                if len > 0 {
                    pos += len;
                    self.cut(pos);
                    continue;
                }
            }
            // ` ?\p{L}+`, ` ?\p{N}+` and ` ?[^\s\p{L}\p{N}]+`: an optional leading space, then a
            // run of one class.
            let first = if c == ' ' { pos + 1 } else { pos };
            if let Some(run) = cls(first).filter(|&k| k != Class::Space) {
                pos = first;
                while cls(pos) == Some(run) {
                    pos += 1;
                }
                self.cut(pos);
                continue;
            }
            let mut spaces = 0;
            while cls(pos + spaces) == Some(Class::Space) {
                spaces += 1;
            }
            if spaces > 1 && pos + spaces < n {
                // `\s+(?!\S)`: leave the last space to lead the word that follows.
                pos += spaces - 1;
            } else if spaces > 0 {
                // `\s+`
                pos += spaces;
            } else {
                pos += 1;
            }
            self.cut(pos);
        }
    }
}

/// The four classes the GPT-2 expression distinguishes; they are disjoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            '\t' | '\n' | '\x0b' | '\x0c' | '\r' | ' ' => Class::Space,
            _ => Class::Other,
        };
    }
    if c.is_whitespace() {
        return Class::Space;
    }
    match c.general_category_group() {
        GeneralCategoryGroup::Letter => Class::Letter,
        GeneralCategoryGroup::Number => Class::Number,
        _ => Class::Other,
    }
}

fn is_punctuation(c: char) -> bool {
    c.general_category_group() == GeneralCategoryGroup::Punctuation
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        pre.split(text).into_iter().map(|r| &text[r]).collect()
    }

    /// Expected words from HF `tokenizers` (Python, Oniguruma engine): `Split(Regex(pattern),
    /// "isolated")` with each family's pattern.
    #[test]
    fn llama3_and_qwen2_words_match_hf_tokenizers() {
        let cases: [(&str, &[&str], &[&str]); 5] = [
            (
                "Hello world!  \n\tDON'T 1234567 x",
                &[
                    "Hello", " world", "!", "  \n", "\tDON", "'T", " ", "123", "456", "7", " x",
                ],
                &[
                    "Hello", " world", "!", "  \n", "\tDON", "'T", " ", "1", "2", "3", "4", "5",
                    "6", "7", " x",
                ],
            ),
            (
                "a   b  \n\n  c",
                &["a", "  ", " b", "  \n\n", " ", " c"],
                &["a", "  ", " b", "  \n\n", " ", " c"],
            ),
            (
                "(x+y)*12;\r\n  foo.bar",
                &["(x", "+y", ")*", "12", ";\r\n", " ", " foo", ".bar"],
                &["(x", "+y", ")*", "1", "2", ";\r\n", " ", " foo", ".bar"],
            ),
            (
                "日本語 über\u{a0}x 3.14",
                &["日本語", " über", "\u{a0}x", " ", "3", ".", "14"],
                &["日本語", " über", "\u{a0}x", " ", "3", ".", "1", "4"],
            ),
            (
                " 's'S 'Ll",
                &[" '", "s", "'S", " '", "Ll"],
                &[" '", "s", "'S", " '", "Ll"],
            ),
        ];
        for (text, llama3, qwen2) in cases {
            assert_eq!(words(PreTokenizer::Llama3, text), llama3, "{text:?}");
            assert_eq!(words(PreTokenizer::Qwen2, text), qwen2, "{text:?}");
        }
        assert!(words(PreTokenizer::Llama3, "").is_empty());
        assert_eq!(
            PreTokenizer::from_name("llama-bpe"),
            Some(PreTokenizer::Llama3)
        );
        assert_eq!(PreTokenizer::from_name("qwen2"), Some(PreTokenizer::Qwen2));
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(
            words(PreTokenizer::Gpt2, "Hello world!  \n\tdon't 12345"),
            ["Hello", " world", "!", "  \n", "\t", "don", "'t", " 12345"]
        );
        assert_eq!(
            words(PreTokenizer::Gpt2, "a   b  "),
            ["a", "  ", " b", "  "]
        );
        assert_eq!(
            words(PreTokenizer::Gpt2, " ?!x 'll"),
            [" ?!", "x", " '", "ll"]
        );
        assert_eq!(
            words(PreTokenizer::Gpt2, "日本語 über\u{a0}x"),
            ["日本語", " über", "\u{a0}", "x"]
        );
        assert!(words(PreTokenizer::Gpt2, "").is_empty());
    }

    #[test]
    fn digits_split_before_gpt2() {
        assert_eq!(
            words(PreTokenizer::DigitsThenGpt2, "don't 123 ab4c"),
            ["don", "'t", " ", "1", "2", "3", " ab", "4", "c"]
        );
        // The lookahead of `\s+(?!\S)` stops at the digit's piece boundary.
        assert_eq!(
            words(PreTokenizer::DigitsThenGpt2, "a  1"),
            ["a", "  ", "1"]
        );
    }

    #[test]
    fn default_pipeline() {
        assert_eq!(
            words(PreTokenizer::Default, "x=1234567, (y)"),
            ["x", "=", "123", "456", "7", ",", " ", "(", "y", ")"]
        );
    }

    #[test]
    fn pieces_cover_the_text() {
        let text = "Mixed: ÀÉ 12½ \r\n\t  ok?! 👍🏽 'S 're";
        for pre in [
            PreTokenizer::Gpt2,
            PreTokenizer::DigitsThenGpt2,
            PreTokenizer::Default,
        ] {
            let pieces = pre.split(text);
            assert_eq!(
                pieces.iter().map(|r| &text[r.clone()]).collect::<String>(),
                text
            );
            assert!(pieces.iter().all(|r| !r.is_empty()));
        }
    }

    #[test]
    fn names() {
        assert_eq!(
            PreTokenizer::from_name("smollm"),
            Some(PreTokenizer::DigitsThenGpt2)
        );
        assert_eq!(PreTokenizer::from_name("gpt2"), Some(PreTokenizer::Gpt2));
        assert_eq!(
            PreTokenizer::from_name("default"),
            Some(PreTokenizer::Default)
        );
        assert_eq!(PreTokenizer::from_name("tekken"), None);
    }
}
