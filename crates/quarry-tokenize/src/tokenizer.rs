//! [`Tokenizer`]: text ↔ token ids with llama.cpp's semantics.
//!
//! Encoding runs in three steps: special-token texts are cut out of the input ([`crate::special`]),
//! every remaining text fragment goes through the vocabulary's subword algorithm (SPM merging by
//! score, or pre-tokenization plus byte-level BPE), and BOS/EOS are added around the result when
//! the caller asks for special tokens and the metadata says the model wants them.
//!
//! Invariants of a built tokenizer: `add_bos` implies a BOS id and `add_eos` an EOS id; every id
//! it holds (BOS, EOS, end-of-generation set, byte fallbacks) lies inside the vocabulary.

use crate::bpe::{self, Merges};
use crate::decode::StreamDecoder;
use crate::pretokenize::PreTokenizer;
use crate::special::{Fragment, SpecialTokens};
use crate::spm;
use crate::vocab::{Token, TokenType, Vocab};
use crate::TokenizeError;

/// Token texts that end generation wherever they occur in a vocabulary (llama.cpp's list, minus
/// entries specific to one model family that collide with ordinary tokens elsewhere: "</s>" is an
/// HTML tag in Gemma 3's vocabulary).
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// SentencePiece's escaped space, "▁" (U+2581).
const ESCAPED_SPACE: char = '\u{2581}';

/// What the subword algorithm is run over: text, or a special token already recognized.
enum Piece<'s> {
    Text(&'s str),
    Token(u32),
}

/// Which subword algorithm a vocabulary uses, with what it needs beyond the tokens.
pub(crate) enum ModelSpec {
    /// `tokenizer.ggml.model = "llama"`.
    Spm { add_space_prefix: bool },
    /// `tokenizer.ggml.model = "gpt2"`.
    Bpe { pre: PreTokenizer, merges: Merges },
    /// `tokenizer.ggml.model = "huggingface"`: a Hugging Face model directory's
    /// `tokenizer.json` (`tokenizer.huggingface.json`), run by HF `tokenizers`.
    Hf(HfTokenizer),
}

/// A `tokenizer.json` loaded by HF `tokenizers`, which splits and merges text fragments (special
/// tokens are cut out first, as for the other models), and how its tokens decode: GPT-2's byte
/// alphabet (a `ByteLevel` decoder) or SentencePiece's escaped spaces and byte tokens.
pub(crate) struct HfTokenizer {
    pub(crate) tokenizer: Box<tokenizers::Tokenizer>,
    pub(crate) byte_level: bool,
}

/// Everything a tokenizer is built from, as plain data (read from GGUF metadata, or written by a
/// test).
pub(crate) struct TokenizerSpec {
    pub(crate) model: ModelSpec,
    pub(crate) tokens: Vec<Token>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    /// End of turn and end of message, when the metadata names them.
    pub(crate) eot: Option<u32>,
    pub(crate) eom: Option<u32>,
    pub(crate) unk: Option<u32>,
    pub(crate) add_bos: bool,
    pub(crate) add_eos: bool,
}

enum Algorithm {
    Spm {
        add_space_prefix: bool,
        /// Fallback token for each byte: its `<0xNN>` token, else the unknown token.
        byte_tokens: Box<[Option<u32>; 256]>,
    },
    Bpe {
        pre: PreTokenizer,
        merges: Merges,
    },
    Hf(HfTokenizer),
}

/// A tokenizer built from a GGUF file's vocabulary. Cheap to share: `Send + Sync`, and every
/// method takes `&self`.
pub struct Tokenizer {
    vocab: Vocab,
    algorithm: Algorithm,
    special: SpecialTokens,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    /// Sorted.
    end_of_generation: Vec<u32>,
}

impl Tokenizer {
    pub(crate) fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer, TokenizeError> {
        let mut vocab = Vocab::new(spec.tokens)?;
        let n_vocab = vocab.len();
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", spec.bos),
            ("tokenizer.ggml.eos_token_id", spec.eos),
            ("tokenizer.ggml.eot_token_id", spec.eot),
            ("tokenizer.ggml.eom_token_id", spec.eom),
            ("tokenizer.ggml.unknown_token_id", spec.unk),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n_vocab) {
                return Err(TokenizeError::TokenIdOutOfRange {
                    key,
                    id: id.into(),
                    n_vocab,
                });
            }
        }
        for (add, id, flag_key, id_key) in [
            (
                spec.add_bos,
                spec.bos,
                "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.bos_token_id",
            ),
            (
                spec.add_eos,
                spec.eos,
                "tokenizer.ggml.add_eos_token",
                "tokenizer.ggml.eos_token_id",
            ),
        ] {
            if add && id.is_none() {
                return Err(TokenizeError::MissingSpecialToken { flag_key, id_key });
            }
        }

        let mut end_of_generation: Vec<u32> = [spec.eos, spec.eot, spec.eom]
            .into_iter()
            .flatten()
            .collect();
        for text in END_OF_GENERATION_TEXTS {
            if let Some(id) = vocab.id(text) {
                end_of_generation.push(id);
                // As llama.cpp does: such a token is a control token whatever its stored type, so
                // it is neither matched in plain text nor printed.
                vocab.set_kind(id, TokenType::Control);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        let special = SpecialTokens::new(
            vocab
                .tokens()
                .filter(|(_, t)| !t.text.is_empty())
                .filter_map(|(id, t)| match t.kind {
                    TokenType::Control | TokenType::Unknown => Some((id, t.text.clone(), true)),
                    TokenType::UserDefined => Some((id, t.text.clone(), false)),
                    _ => None,
                })
                .collect(),
        );

        let algorithm = match spec.model {
            ModelSpec::Spm { add_space_prefix } => {
                let mut byte_tokens = Box::new([None; 256]);
                for (b, slot) in byte_tokens.iter_mut().enumerate() {
                    *slot = vocab.id(&format!("<0x{b:02X}>")).or(spec.unk);
                }
                Algorithm::Spm {
                    add_space_prefix,
                    byte_tokens,
                }
            }
            ModelSpec::Bpe { pre, merges } => Algorithm::Bpe { pre, merges },
            ModelSpec::Hf(hf) => Algorithm::Hf(hf),
        };

        Ok(Tokenizer {
            vocab,
            algorithm,
            special,
            bos: spec.bos,
            eos: spec.eos,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            end_of_generation,
        })
    }

    /// Token ids of `text`, as llama.cpp's `llama_tokenize` gives them.
    ///
    /// `add_special` adds BOS in front when the model's metadata asks for it
    /// (`tokenizer.ggml.add_bos_token`), and EOS at the end likewise. `parse_special` turns the
    /// texts of control tokens in `text` (such as `<start_of_turn>`) into their ids; without it
    /// they are tokenized as plain text. User-defined tokens (such as Gemma's runs of spaces) are
    /// always recognized, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let fragments = self.special.partition(text, parse_special);
        self.encode_pieces(
            fragments.into_iter().map(|fragment| match fragment {
                Fragment::Token(id) => Piece::Token(id),
                Fragment::Text(range) => Piece::Text(&text[range]),
            }),
            &mut out,
        );
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Token ids of a text in which `mark` was inserted into (or around) every place where data,
    /// not markup, spelled a special token: control and unknown tokens are parsed, except in a
    /// text fragment containing `mark`, which is tokenized as plain text once the marks are
    /// removed (user-defined tokens are still recognized there, as in [`Tokenizer::encode`]
    /// without `parse_special`). No BOS or EOS is added. `mark` must not occur in any
    /// special-token text (see [`Tokenizer::special_texts`]).
    pub(crate) fn encode_marked(&self, text: &str, mark: char) -> Vec<u32> {
        let fragments = self.special.partition(text, true);
        // Marked fragments, without their marks; the pieces below borrow from these.
        let cleaned: Vec<String> = fragments
            .iter()
            .filter_map(|fragment| match fragment {
                Fragment::Text(range) if text[range.clone()].contains(mark) => {
                    Some(text[range.clone()].replace(mark, ""))
                }
                _ => None,
            })
            .collect();
        let mut cleaned_iter = cleaned.iter();
        let mut pieces = Vec::with_capacity(fragments.len());
        for fragment in fragments {
            match fragment {
                Fragment::Token(id) => pieces.push(Piece::Token(id)),
                Fragment::Text(range) if text[range.clone()].contains(mark) => {
                    let plain = cleaned_iter
                        .next()
                        .expect("one cleaned string per marked fragment");
                    for inner in self.special.partition(plain, false) {
                        pieces.push(match inner {
                            Fragment::Token(id) => Piece::Token(id),
                            Fragment::Text(r) => Piece::Text(&plain[r]),
                        });
                    }
                }
                Fragment::Text(range) => pieces.push(Piece::Text(&text[range])),
            }
        }
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        self.encode_pieces(pieces, &mut out);
        out
    }

    /// Every special-token text the tokenizer cuts out of its input, with whether it is cut
    /// only when parsing special tokens (control and unknown tokens) or always (user-defined).
    pub(crate) fn special_texts(&self) -> impl Iterator<Item = (&str, bool)> {
        self.special.texts()
    }

    /// Runs the subword algorithm over text pieces, passing recognized tokens through.
    fn encode_pieces<'s>(&self, pieces: impl IntoIterator<Item = Piece<'s>>, out: &mut Vec<u32>) {
        match &self.algorithm {
            Algorithm::Spm {
                add_space_prefix,
                byte_tokens,
            } => {
                // The space prefix goes at the start of the text and after each special token.
                let mut after_special = true;
                for piece in pieces {
                    match piece {
                        Piece::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Piece::Text(text) => {
                            let mut escaped = String::with_capacity(text.len() + 3);
                            if *add_space_prefix && after_special {
                                escaped.push(ESCAPED_SPACE);
                            }
                            escaped.extend(text.chars().map(|c| {
                                if c == ' ' {
                                    ESCAPED_SPACE
                                } else {
                                    c
                                }
                            }));
                            spm::encode(&self.vocab, byte_tokens, &escaped, out);
                            after_special = false;
                        }
                    }
                }
            }
            Algorithm::Bpe { pre, merges } => {
                for piece in pieces {
                    match piece {
                        Piece::Token(id) => out.push(id),
                        Piece::Text(fragment) => {
                            for word in pre.split(fragment) {
                                bpe::encode_word(&self.vocab, merges, &fragment[word], out);
                            }
                        }
                    }
                }
            }
            Algorithm::Hf(hf) => {
                for piece in pieces {
                    match piece {
                        Piece::Token(id) => out.push(id),
                        // The tokenizer loaded, and special tokens in the text are encoded as
                        // text (see `read_spec`); a fragment it still refuses adds nothing.
                        Piece::Text(fragment) => {
                            if let Ok(encoding) = hf.tokenizer.encode_fast(fragment, false) {
                                out.extend_from_slice(encoding.get_ids());
                            }
                        }
                    }
                }
            }
        }
    }

    /// The text of `ids`: normal, byte and user-defined tokens; control tokens contribute nothing.
    /// Invalid UTF-8 (an incomplete sequence of byte tokens) becomes U+FFFD. For SentencePiece
    /// vocabularies that add a space prefix when encoding, the first token's leading space is
    /// dropped, so that decoding inverts encoding.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut decoder = StreamDecoder::new(self);
        let mut text = String::new();
        for &id in ids {
            text.push_str(&decoder.push(id));
        }
        text.push_str(&decoder.finish());
        text
    }

    /// The raw bytes token `id` contributes to decoded text: one byte for a byte token, "▁" as a
    /// space in SentencePiece pieces, GPT-2's byte alphabet undone for byte-level BPE, the text
    /// itself for user-defined tokens, and nothing for control, unknown and unused tokens or ids
    /// outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        self.append_token_bytes(id, &mut bytes);
        bytes
    }

    pub(crate) fn append_token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(token) = self.vocab.get(id) else {
            return;
        };
        let text = &*token.text;
        match token.kind {
            TokenType::Control | TokenType::Unknown | TokenType::Unused | TokenType::Undefined => {}
            TokenType::UserDefined => out.extend_from_slice(text.as_bytes()),
            TokenType::Byte => match parse_byte_token(text) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(text.as_bytes()),
            },
            TokenType::Normal => match &self.algorithm {
                Algorithm::Spm { .. }
                | Algorithm::Hf(HfTokenizer {
                    byte_level: false, ..
                }) => {
                    for c in text.chars() {
                        let c = if c == ESCAPED_SPACE { ' ' } else { c };
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                }
                Algorithm::Bpe { .. }
                | Algorithm::Hf(HfTokenizer {
                    byte_level: true, ..
                }) => bpe::decode_text(text, out),
            },
        }
    }

    /// Whether decoding drops the first token's leading space (SentencePiece with a space prefix).
    pub(crate) fn strips_leading_space(&self) -> bool {
        matches!(
            self.algorithm,
            Algorithm::Spm {
                add_space_prefix: true,
                ..
            }
        )
    }

    /// The token's text as the vocabulary stores it (escaped spaces, byte-level characters, or
    /// `<0xNN>`); empty for ids outside the vocabulary.
    pub fn token_text(&self, id: u32) -> &str {
        self.vocab.get(id).map_or("", |t| &t.text)
    }

    /// The id of the token whose stored text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    /// The number of tokens in the vocabulary (ids are `0..vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The beginning-of-sequence token, when the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, when the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true, ..)` puts BOS in front.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether generation should stop at `id`: EOS, the end-of-turn and end-of-message tokens the
    /// metadata names, and tokens such as `<end_of_turn>`, `<|im_end|>`, `<|endoftext|>` or
    /// `<|eot_id|>` wherever the vocabulary has them (as llama.cpp decides).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// Whether `id` stands for text: a normal or byte token, or a user-defined one that is not
    /// a marker in angle brackets (Gemma's `<start_of_image>` is user-defined, as is the "\n"
    /// of some vocabularies); false outside the vocabulary.
    pub fn is_text(&self, id: u32) -> bool {
        self.vocab.get(id).is_some_and(|t| match t.kind {
            TokenType::Normal | TokenType::Byte => true,
            TokenType::UserDefined => !(t.text.starts_with('<') && t.text.ends_with('>')),
            _ => false,
        })
    }

    /// Whether `id` is a control token (BOS, EOS, turn markers, ...); false outside the vocabulary.
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab
            .get(id)
            .is_some_and(|t| t.kind == TokenType::Control)
    }
}

/// The byte of a `<0xNN>` token.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small SentencePiece vocabulary: control tokens, a user-defined "\n", byte fallbacks and
    /// a few pieces.
    pub(crate) fn spm_tokenizer(add_space_prefix: bool) -> Tokenizer {
        let mut tokens = vec![
            Token::new("<unk>", 0.0, TokenType::Unknown),
            Token::new("<s>", 0.0, TokenType::Control),
            Token::new("</s>", 0.0, TokenType::Control),
            Token::new("<end_of_turn>", 0.0, TokenType::UserDefined),
            Token::new("\n", 0.0, TokenType::UserDefined),
        ];
        for b in 0..=255u8 {
            tokens.push(Token::new(&format!("<0x{b:02X}>"), 0.0, TokenType::Byte));
        }
        for (i, piece) in ["▁", "h", "i", "hi", "▁hi", "▁▁", "!"]
            .into_iter()
            .enumerate()
        {
            tokens.push(Token::new(piece, -(i as f32), TokenType::Normal));
        }
        Tokenizer::from_spec(TokenizerSpec {
            model: ModelSpec::Spm { add_space_prefix },
            tokens,
            bos: Some(1),
            eos: Some(2),
            eot: None,
            eom: None,
            unk: Some(0),
            add_bos: true,
            add_eos: false,
        })
        .unwrap()
    }

    fn id(t: &Tokenizer, text: &str) -> u32 {
        t.token_id(text).unwrap()
    }

    #[test]
    fn spm_space_prefix_and_specials() {
        let t = spm_tokenizer(true);
        let hi = id(&t, "▁hi");
        // The prefix goes in front of the text and again after each special token.
        assert_eq!(t.encode("hi", true, false), [1, hi]);
        assert_eq!(t.encode("hi</s>hi", false, true), [hi, 2, hi]);
        // Without parse_special the control token is plain text (byte fallback for '<', '/', ...).
        assert!(t.encode("hi</s>", false, false).len() > 3);
        // User-defined tokens are always cut out; a space prefix follows them too.
        assert_eq!(t.encode("hi\nhi", false, false), [hi, 4, hi]);
        assert_eq!(t.encode("", true, false), [1]);
        assert!(t.encode("", false, false).is_empty());
    }

    #[test]
    fn spm_without_prefix_and_byte_fallback() {
        let t = spm_tokenizer(false);
        assert_eq!(t.encode("hi", false, false), [id(&t, "hi")]);
        let ids = t.encode("é", false, false);
        assert_eq!(ids, [id(&t, "<0xC3>"), id(&t, "<0xA9>")]);
        assert_eq!(t.decode(&ids), "é");
    }

    #[test]
    fn text_tokens_are_normal_bytes_and_plain_user_defined_ones() {
        let t = spm_tokenizer(false);
        for text in ["hi", "<0xC3>", "\n"] {
            assert!(t.is_text(id(&t, text)), "{text:?}");
        }
        for text in ["<unk>", "<s>", "<end_of_turn>"] {
            assert!(!t.is_text(id(&t, text)), "{text:?}");
        }
        assert!(!t.is_text(t.vocab_size() as u32));
    }

    #[test]
    fn end_of_generation_texts_become_control() {
        let t = spm_tokenizer(false);
        let eot = id(&t, "<end_of_turn>");
        assert!(t.is_end_of_generation(eot) && t.is_end_of_generation(2));
        assert!(!t.is_end_of_generation(1));
        assert!(t.is_control(eot));
        // Now a control token, so only parsed on request and never printed.
        assert_eq!(t.encode("<end_of_turn>", false, true), [eot]);
        assert_eq!(t.decode(&[eot]), "");
    }

    #[test]
    fn decode_inverts_the_space_prefix() {
        let t = spm_tokenizer(true);
        for text in ["hi hi", " hi", "  hi!", "é!"] {
            assert_eq!(t.decode(&t.encode(text, true, false)), text, "{text:?}");
        }
        assert_eq!(t.token_bytes(id(&t, "▁hi")), b" hi");
        assert_eq!(t.token_bytes(id(&t, "<0x41>")), b"A");
        assert!(t.token_bytes(1).is_empty());
        assert!(t.token_bytes(u32::MAX).is_empty());
        assert_eq!(t.token_text(u32::MAX), "");
    }

    #[test]
    fn invalid_metadata_is_named() {
        let spec = |bos, add_bos| TokenizerSpec {
            model: ModelSpec::Spm {
                add_space_prefix: false,
            },
            tokens: vec![Token::new("a", 0.0, TokenType::Normal)],
            bos,
            eos: None,
            eot: None,
            eom: None,
            unk: None,
            add_bos,
            add_eos: false,
        };
        let err = Tokenizer::from_spec(spec(Some(7), false)).err().unwrap();
        assert_eq!(
            err.to_string(),
            "GGUF metadata tokenizer.ggml.bos_token_id = 7 is outside the vocabulary of 1 tokens"
        );
        let err = Tokenizer::from_spec(spec(None, true)).err().unwrap();
        assert_eq!(
            err.to_string(),
            "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not set"
        );
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        assert_eq!(parse_byte_token("<0x1>"), None);
        assert_eq!(parse_byte_token("0x41"), None);
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tokenizer_is_send_and_sync() {
        assert_send_sync::<Tokenizer>();
    }
}
