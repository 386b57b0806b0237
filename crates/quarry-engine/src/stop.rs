//! Stop strings over streamed text.
//!
//! Decoded text arrives in pieces, and a stop string may straddle two pieces, so text that
//! could still turn out to be the start of a stop string is held back until it is decided.
//!
//! Invariants:
//! - Emitted text is never retracted: everything emitted lies before any stop string that can
//!   still complete, because the held-back tail is the longest suffix that is a proper prefix of
//!   some stop string.
//! - A stop string counts as hit as soon as it is complete. If several complete at the same
//!   point, the one that starts earliest wins. The result is independent of how the text was
//!   split: the concatenation of everything emitted (plus [`StopStrings::finish`]) is the whole
//!   text cut right before the first stop string to complete, or the whole text if none does.
//! - After a hit nothing more is ever emitted.
//! - Text is only ever split at `char` boundaries.

/// Watches generated text for stop strings; holds back text that might be the beginning of a
/// stop string.
#[derive(Clone, Debug)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet emitted: at most a possible stop-string prefix between calls.
    held: String,
    stopped: bool,
}

impl StopStrings {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Feed newly decoded text; returns (text safe to emit now, whether a stop string was hit).
    /// On a hit, the emitted text ends right before the stop string and nothing after it is
    /// ever emitted: later calls return `("", true)`.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        // Every stop string's first occurrence is its earliest-ending one, so the hit is the
        // first occurrence with the smallest end, ties going to the earliest start.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at + s.len(), at)))
            .min();
        if let Some((_, at)) = hit {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.undecided_tail();
        let tail = self.held.split_off(self.held.len() - keep);
        (std::mem::replace(&mut self.held, tail), false)
    }

    /// At the end of generation: whatever was held back (nothing after a hit).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of `held` that is a proper prefix of a stop
    /// string. Called only when `held` contains no complete stop string.
    fn undecided_tail(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // A proper prefix is shorter than its stop string, so older bytes are already decided.
        let first = self.held.len().saturating_sub(longest.saturating_sub(1));
        (first..self.held.len())
            .filter(|&i| self.held.is_char_boundary(i))
            .find(|&i| {
                let tail = &self.held.as_bytes()[i..];
                self.stops.iter().any(|s| s.as_bytes().starts_with(tail))
            })
            .map_or(0, |i| self.held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn watcher(stops: &[&str]) -> StopStrings {
        StopStrings::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Feeds `pieces` in order; returns what was emitted per push and the `finish` text.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<(String, bool)>, String) {
        let mut w = watcher(stops);
        let out = pieces.iter().map(|p| w.push(p)).collect();
        (out, w.finish())
    }

    fn owned(v: &[(&str, bool)]) -> Vec<(String, bool)> {
        v.iter().map(|&(s, b)| (s.to_string(), b)).collect()
    }

    /// Reference: cut before the first stop string to complete (earliest start on ties);
    /// also says whether one was found.
    fn truncate_at_first_stop(text: &str, stops: &[String]) -> (String, bool) {
        for end in (0..=text.len()).filter(|&e| text.is_char_boundary(e)) {
            let start = stops
                .iter()
                .filter(|s| !s.is_empty() && text[..end].ends_with(s.as_str()))
                .map(|s| end - s.len())
                .min();
            if let Some(start) = start {
                return (text[..start].to_string(), true);
            }
        }
        (text.to_string(), false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let (out, rest) = run(&[], &["hello", " world"]);
        assert_eq!(out, owned(&[("hello", false), (" world", false)]));
        assert_eq!(rest, "");
        let (out, _) = run(&[""], &["abc"]);
        assert_eq!(out, owned(&[("abc", false)]));
    }

    #[test]
    fn stop_split_across_pushes_is_caught_and_nothing_after_is_emitted() {
        let (out, rest) = run(&["</s>"], &["Hello <", "/", "s> and more", " even more"]);
        assert_eq!(
            out,
            owned(&[("Hello ", false), ("", false), ("", true), ("", true)])
        );
        assert_eq!(rest, "");
    }

    #[test]
    fn stop_inside_one_push_cuts_right_before_it() {
        let (out, rest) = run(&["STOP"], &["abcSTOPdef"]);
        assert_eq!(out, owned(&[("abc", true)]));
        assert_eq!(rest, "");
    }

    #[test]
    fn held_prefix_is_released_when_it_is_not_a_stop() {
        let (out, rest) = run(&["</s>"], &["a </", "b", " c <"]);
        assert_eq!(out, owned(&[("a ", false), ("</b", false), (" c ", false)]));
        // The trailing "<" was held and comes back at the end.
        assert_eq!(rest, "<");
    }

    #[test]
    fn multiple_stop_strings() {
        let stops = ["\n\n", "User:", "###"];
        let (out, _) = run(&stops, &["one", " Us", "er: two"]);
        assert_eq!(out, owned(&[("one", false), (" ", false), ("", true)]));
        let (out, _) = run(&stops, &["x #", "## User:"]);
        assert_eq!(out, owned(&[("x ", false), ("", true)]));
        let (out, _) = run(&stops, &["a\n", "b\n\nc"]);
        assert_eq!(out, owned(&[("a", false), ("\nb", true)]));
    }

    #[test]
    fn overlapping_prefixes() {
        // "ab" completes first, so it is the hit even though "abc" could follow.
        let (out, _) = run(&["ab", "abc"], &["xa", "bc"]);
        assert_eq!(out, owned(&[("x", false), ("", true)]));
        // "abc" and "bc" complete together: the earlier start wins.
        let (out, _) = run(&["bc", "abc"], &["xa", "b", "cd"]);
        assert_eq!(out, owned(&[("x", false), ("", false), ("", true)]));
        // A stop that completes earlier wins over one that started earlier.
        let (out, _) = run(&["abcd", "c"], &["ab", "cd"]);
        assert_eq!(out, owned(&[("", false), ("ab", true)]));
        // Held "ab" of "abc" released when "abx" arrives; "ab" alone is not a stop here.
        let (out, rest) = run(&["abc"], &["ab", "x", "ab"]);
        assert_eq!(out, owned(&[("", false), ("abx", false), ("", false)]));
        assert_eq!(rest, "ab");
    }

    #[test]
    fn unicode_text_and_stops() {
        let (out, rest) = run(&["終わり"], &["こんにちは終", "わ", "り、さようなら"]);
        assert_eq!(
            out,
            owned(&[("こんにちは", false), ("", false), ("", true)])
        );
        assert_eq!(rest, "");
        // A stop sharing only its first byte with the text is not a prefix match.
        let (out, rest) = run(&["é!"], &["café", "s é"]);
        assert_eq!(out, owned(&[("caf", false), ("és ", false)]));
        assert_eq!(rest, "é");
        let (out, _) = run(&["🙂🙂"], &["ok 🙂", "🙂 bye"]);
        assert_eq!(out, owned(&[("ok ", false), ("", true)]));
    }

    #[test]
    fn finish_after_hit_is_empty() {
        let mut w = watcher(&["x"]);
        assert_eq!(w.push("abxcd"), ("ab".to_string(), true));
        assert_eq!(w.push("more"), (String::new(), true));
        assert_eq!(w.finish(), "");
    }

    fn text_and_stops() -> impl Strategy<Value = (Vec<char>, Vec<String>, Vec<usize>)> {
        // A small alphabet makes stop strings occur, overlap and nest often.
        let alphabet = prop::sample::select(vec!['a', 'b', 'é', '🙂']);
        let stop = prop::collection::vec(alphabet.clone(), 0..5)
            .prop_map(|cs| cs.into_iter().collect::<String>());
        (
            prop::collection::vec(alphabet, 0..40),
            prop::collection::vec(stop, 0..5),
            prop::collection::vec(0usize..40, 0..10),
        )
    }

    proptest! {
        // Cases are cheap, and nested stop strings need many of them to turn up.
        #![proptest_config(ProptestConfig::with_cases(4096))]
        #[test]
        fn emitted_text_is_text_cut_at_first_stop((chars, stops, cuts) in text_and_stops()) {
            let text: String = chars.iter().collect();
            // Random char positions split the text into pieces (some empty).
            let mut bounds: Vec<usize> = cuts.iter().map(|&c| c.min(chars.len())).collect();
            bounds.push(0);
            bounds.push(chars.len());
            bounds.sort_unstable();
            let byte_at = |n: usize| chars[..n].iter().map(|c| c.len_utf8()).sum::<usize>();

            let mut w = StopStrings::new(stops.clone());
            let mut emitted = String::new();
            let mut hit = false;
            for pair in bounds.windows(2) {
                let (piece, stopped) = w.push(&text[byte_at(pair[0])..byte_at(pair[1])]);
                prop_assert!(!hit || (piece.is_empty() && stopped), "emitted after a hit");
                hit = stopped;
                emitted.push_str(&piece);
            }
            emitted.push_str(&w.finish());
            let (expected, expected_hit) = truncate_at_first_stop(&text, &stops);
            prop_assert_eq!(emitted, expected);
            prop_assert_eq!(hit, expected_hit);
        }
    }
}
