//! Reading a tokenizer's description from GGUF metadata (`tokenizer.ggml.*`).
//!
//! Defaults follow llama.cpp: for "llama" (SentencePiece) vocabularies BOS is 1, EOS 2 and the
//! unknown token 0 unless the file says otherwise (each only if inside the vocabulary), a space
//! prefix and BOS are added, EOS is not; "gpt2" (byte-level BPE) vocabularies add neither and have
//! no default special ids. A missing `tokenizer.ggml.pre` means "default".

use quarry_format::{GgufFile, Value};

use crate::bpe::Merges;
use crate::pretokenize::PreTokenizer;
use crate::tokenizer::{HfTokenizer, ModelSpec, TokenizerSpec};
use crate::vocab::{Token, TokenType};
use crate::{TokenizeError, Tokenizer};

const MODEL: &str = "tokenizer.ggml.model";
const PRE: &str = "tokenizer.ggml.pre";
const TOKENS: &str = "tokenizer.ggml.tokens";
const SCORES: &str = "tokenizer.ggml.scores";
const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const MERGES: &str = "tokenizer.ggml.merges";
const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

impl Tokenizer {
    /// The tokenizer a GGUF file describes. Errors name the metadata key (and element or token
    /// id) that is missing, of the wrong type or inconsistent.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizeError> {
        Tokenizer::from_spec(read_spec(file)?)
    }
}

fn read_spec(file: &GgufFile) -> Result<TokenizerSpec, TokenizeError> {
    // Texts are decoded one at a time into the tokens (never all as `Value`s at once).
    let n_vocab = file.array_items(TOKENS)?.len();
    let scores = per_token(file, SCORES, n_vocab, "a number", |v| v.as_f32())?;
    let types = per_token(file, TOKEN_TYPE, n_vocab, "an integer", |v| v.as_i64())?;
    let tokens = elements(file, TOKENS, "a string", |v, i| {
        let text = v.as_str()?;
        let score = scores.as_ref().map_or(0.0, |s| s[i]);
        let kind = types
            .as_ref()
            .map_or(TokenType::Normal, |t| TokenType::from_gguf(t[i]));
        Some(Token::new(text, score, kind))
    })?;

    let id = |key: &'static str| -> Result<Option<u32>, TokenizeError> {
        Ok(match file.get(key) {
            Some(_) => Some(file.get_u32(key)?),
            None => None,
        })
    };
    let flag = |key: &'static str| -> Result<Option<bool>, TokenizeError> {
        Ok(match file.get(key) {
            Some(_) => Some(file.get_bool(key)?),
            None => None,
        })
    };
    // A default special id only applies when the vocabulary has it.
    let default_id = |id: u32| ((id as usize) < n_vocab).then_some(id);

    let (model, default_bos, default_eos, default_unk, default_add_bos) =
        match file.get_str(MODEL)? {
            "llama" => {
                let add_space_prefix = flag(ADD_SPACE_PREFIX)?.unwrap_or(true);
                (
                    ModelSpec::Spm { add_space_prefix },
                    default_id(1),
                    default_id(2),
                    default_id(0),
                    true,
                )
            }
            "gpt2" => {
                let name = match file.get(PRE) {
                    Some(_) => file.get_str(PRE)?,
                    None => "default",
                };
                let pre = PreTokenizer::from_name(name)
                    .ok_or_else(|| TokenizeError::UnknownPreTokenizer(name.to_string()))?;
                // Checked first, then read again straight into the merge table: no list of
                // every merge is held beside it.
                elements(file, MERGES, "a string", |v, _| v.as_str().map(drop))?;
                let merges = file.array_items(MERGES)?.filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    _ => None,
                });
                (
                    ModelSpec::Bpe {
                        pre,
                        merges: Merges::new(merges),
                    },
                    None,
                    None,
                    None,
                    false,
                )
            }
            "huggingface" => (ModelSpec::Hf(hf_tokenizer(file)?), None, None, None, false),
            other => return Err(TokenizeError::UnsupportedModel(other.to_string())),
        };

    Ok(TokenizerSpec {
        model,
        tokens,
        bos: id("tokenizer.ggml.bos_token_id")?.or(default_bos),
        eos: id("tokenizer.ggml.eos_token_id")?.or(default_eos),
        eot: id("tokenizer.ggml.eot_token_id")?,
        eom: id("tokenizer.ggml.eom_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?.or(default_unk),
        add_bos: flag("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos),
        add_eos: flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    })
}

/// The `tokenizer.json` a converted Hugging Face model carries (`tokenizer.huggingface.json`).
/// Special tokens inside text fragments are encoded as text: the fragments reach it only after
/// [`Tokenizer::encode`] has cut out the special tokens it was asked to parse.
fn hf_tokenizer(file: &GgufFile) -> Result<HfTokenizer, TokenizeError> {
    let json = file.get_str("tokenizer.huggingface.json")?;
    let mut tokenizer: tokenizers::Tokenizer = json
        .parse()
        .map_err(|e: tokenizers::Error| TokenizeError::HuggingFace(e.to_string()))?;
    tokenizer.set_encode_special_tokens(true);
    let byte_level = matches!(
        tokenizer.get_decoder(),
        Some(tokenizers::DecoderWrapper::ByteLevel(_))
    );
    Ok(HfTokenizer {
        tokenizer: Box::new(tokenizer),
        byte_level,
    })
}

/// Converts every element of the array `key` (`convert` gets each with its index), naming the
/// first one that has the wrong type.
fn elements<T>(
    file: &GgufFile,
    key: &'static str,
    expected: &'static str,
    convert: impl Fn(Value, usize) -> Option<T>,
) -> Result<Vec<T>, TokenizeError> {
    file.array_items(key)?
        .enumerate()
        .map(|(index, v)| {
            convert(v, index).ok_or(TokenizeError::BadElement {
                key,
                index,
                expected,
            })
        })
        .collect()
}

/// An optional array with one entry per token (extra entries are ignored, as llama.cpp does).
fn per_token<T>(
    file: &GgufFile,
    key: &'static str,
    n_vocab: usize,
    expected: &'static str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>, TokenizeError> {
    if !file.contains(key) {
        return Ok(None);
    }
    let len = file.array_items(key)?.len();
    if len < n_vocab {
        return Err(TokenizeError::LengthMismatch { key, len, n_vocab });
    }
    let mut values = elements(file, key, expected, |v, i| match i < n_vocab {
        true => convert(&v).map(Some),
        false => Some(None),
    })?;
    values.truncate(n_vocab);
    Ok(Some(values.into_iter().flatten().collect()))
}

#[cfg(test)]
pub(crate) mod tests {
    use quarry_format::{GgufWriter, ValueType};

    use super::*;

    pub(crate) fn gguf(entries: Vec<(&str, Value)>) -> GgufFile {
        let mut writer = GgufWriter::new();
        for (key, value) in entries {
            writer.add_metadata(key, value).unwrap();
        }
        GgufFile::from_bytes(writer.to_bytes(), "test.gguf").unwrap()
    }

    pub(crate) fn strings(items: &[&str]) -> Value {
        Value::Array(
            ValueType::String,
            items.iter().map(|s| Value::String(s.to_string())).collect(),
        )
    }

    fn text(value: &str) -> Value {
        Value::String(value.to_string())
    }

    fn error(entries: Vec<(&str, Value)>) -> String {
        Tokenizer::from_gguf(&gguf(entries))
            .err()
            .expect("an error")
            .to_string()
    }

    #[test]
    fn bpe_defaults() {
        let file = gguf(vec![
            (MODEL, text("gpt2")),
            (TOKENS, strings(&["a", "b", "ab", "Ġ", "<|end|>"])),
            (MERGES, strings(&["a b"])),
        ]);
        let t = Tokenizer::from_gguf(&file).unwrap();
        // No pre-tokenizer named: llama.cpp's "default". No BOS, nothing added.
        assert_eq!(t.encode("ab ab", true, false), [2, 3, 2]);
        assert_eq!((t.bos_id(), t.eos_id(), t.add_bos()), (None, None, false));
        assert!(t.is_end_of_generation(4) && t.is_control(4));
    }

    #[test]
    fn spm_defaults() {
        let file = gguf(vec![
            (MODEL, text("llama")),
            (TOKENS, strings(&["<unk>", "<s>", "</s>", "▁a", "a"])),
            (
                SCORES,
                Value::Array(ValueType::F32, vec![Value::F32(0.0); 5]),
            ),
            (
                TOKEN_TYPE,
                Value::Array(ValueType::I32, [2, 3, 3, 1, 1].map(Value::I32).to_vec()),
            ),
        ]);
        let t = Tokenizer::from_gguf(&file).unwrap();
        // BOS 1, EOS 2, a space prefix and BOS added: llama.cpp's SentencePiece defaults.
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.add_bos()),
            (Some(1), Some(2), true)
        );
        assert_eq!(t.encode("a", true, false), [1, 3]);
        assert_eq!(t.decode(&[1, 3]), "a");
    }

    #[test]
    fn errors_name_the_key() {
        let err = error(vec![
            (MODEL, text("gpt2")),
            (PRE, text("tekken")),
            (TOKENS, strings(&["a"])),
        ]);
        assert!(
            err.starts_with("tokenizer.ggml.pre = \"tekken\" is not supported"),
            "{err}"
        );
        let err = error(vec![(MODEL, text("bert")), (TOKENS, strings(&["a"]))]);
        assert!(
            err.starts_with("tokenizer.ggml.model = \"bert\" is not supported"),
            "{err}"
        );
        let err = error(vec![(MODEL, text("llama"))]);
        assert!(err.contains(TOKENS), "{err}");
        let err = error(vec![(MODEL, text("gpt2")), (TOKENS, strings(&["a"]))]);
        assert!(err.contains(MERGES), "{err}");
        let err = error(vec![
            (MODEL, text("llama")),
            (TOKENS, strings(&["a", "b"])),
            (TOKEN_TYPE, strings(&["x", "y"])),
        ]);
        assert_eq!(
            err,
            "GGUF metadata tokenizer.ggml.token_type[0]: expected an integer"
        );
        let err = error(vec![
            (MODEL, text("llama")),
            (TOKENS, strings(&["a", "b"])),
            (SCORES, Value::Array(ValueType::F32, vec![Value::F32(0.0)])),
        ]);
        assert_eq!(
            err,
            "GGUF metadata tokenizer.ggml.scores has 1 entries but tokenizer.ggml.tokens has 2"
        );
        let err = error(vec![
            (MODEL, text("llama")),
            (TOKENS, strings(&["a", "b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(9)),
        ]);
        assert_eq!(
            err,
            "GGUF metadata tokenizer.ggml.eos_token_id = 9 is outside the vocabulary of 2 tokens"
        );
    }
}
