//! [`StreamDecoder`]: detokenizing one id at a time, for streaming output.
//!
//! A token may end in the middle of a UTF-8 character (byte-fallback tokens, byte-level BPE
//! pieces), so the decoder keeps the bytes of an incomplete character until the tokens that
//! complete it arrive. Invalid bytes become U+FFFD exactly as `String::from_utf8_lossy` would
//! replace them, so streaming a sequence yields the same text as [`Tokenizer::decode`].

use crate::Tokenizer;

/// Incremental detokenizer: feed ids, get back only complete UTF-8 text.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes not yet returned: at most the start of one incomplete character.
    pending: Vec<u8>,
    /// Whether the next byte-producing token is the first, whose leading space is dropped.
    strip_leading_space: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder at the start of a stream.
    pub fn new(tokenizer: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tokenizer,
            pending: Vec::new(),
            strip_leading_space: tokenizer.strips_leading_space(),
        }
    }

    /// Adds one token and returns the text that became complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let start = self.pending.len();
        self.tokenizer.append_token_bytes(id, &mut self.pending);
        if self.strip_leading_space && self.pending.len() > start {
            if self.pending[start] == b' ' {
                self.pending.remove(start);
            }
            self.strip_leading_space = false;
        }
        self.take_complete()
    }

    /// Returns what is left: an incomplete character at the end of the stream becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let mut text = self.take_complete();
        if !self.pending.is_empty() {
            text.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        text
    }

    /// Moves every complete character (and every invalid sequence, as U+FFFD) out of `pending`,
    /// leaving only a trailing sequence that more bytes could still complete.
    fn take_complete(&mut self) -> String {
        let mut text = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("checked valid"));
                    match e.error_len() {
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::spm_tokenizer;

    #[test]
    fn holds_incomplete_characters() {
        let t = spm_tokenizer(false);
        // "日" is E6 97 A5, sent as three byte tokens.
        let ids = t.encode("日!", false, false);
        assert_eq!(ids.len(), 4);
        let mut d = StreamDecoder::new(&t);
        assert_eq!(d.push(ids[0]), "");
        assert_eq!(d.push(ids[1]), "");
        assert_eq!(d.push(ids[2]), "日");
        assert_eq!(d.push(ids[3]), "!");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_bytes_match_lossy_decoding() {
        let t = spm_tokenizer(false);
        let byte = |b: u8| t.token_id(&format!("<0x{b:02X}>")).unwrap();
        // A stray continuation byte, a lead byte cut short by ASCII, and a truncated tail.
        let bytes = [0x80, b'a', 0xE6, 0x97, b'b', 0xE6, 0x97];
        let ids: Vec<u32> = bytes.iter().map(|&b| byte(b)).collect();
        let expected = String::from_utf8_lossy(&bytes).into_owned();
        let mut d = StreamDecoder::new(&t);
        let mut streamed: String = ids.iter().map(|&id| d.push(id)).collect();
        streamed.push_str(&d.finish());
        assert_eq!(streamed, expected);
        assert_eq!(t.decode(&ids), expected);
    }

    #[test]
    fn strips_only_the_first_leading_space() {
        let t = spm_tokenizer(true);
        let ids = t.encode("hi hi", true, false);
        let mut d = StreamDecoder::new(&t);
        let text: String = ids.iter().map(|&id| d.push(id)).collect();
        assert_eq!(text, "hi hi");
    }
}
