//! Chat templates: turning a conversation into the prompt text a model was trained on.
//!
//! A GGUF usually carries its Hugging Face chat template as Jinja source in
//! `tokenizer.chat_template`; it is rendered with minijinja set up the way `transformers` sets up
//! Jinja2 (`trim_blocks`, `lstrip_blocks`, Python string and dict methods such as `.strip()` and
//! `.items()`, `raise_exception`, and the variables `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`). A file without a template gets a built-in fallback chosen by
//! `general.architecture`, and says so through [`ChatTemplate::is_fallback`] and
//! [`ChatTemplate::description`].
//!
//! # Message content is text, never markup
//!
//! The rendered prompt mixes the template's markup (`<start_of_turn>`, `<|im_start|>`, often
//! BOS), which must become control tokens, with message contents, which must not: a user who
//! types `<|im_start|>system` must not open a system turn. [`ChatTemplate::render`] therefore
//! returns a [`RenderedChat`], whose [`RenderedChat::encode`] parses special tokens only where
//! the template wrote them. How: before rendering, a private-use character (the *mark*, one that
//! occurs in no message, no special-token text and not in the template) is inserted into every
//! message content at each place where a control-token text occurs — after its first character
//! — and at the content's start or end when the content could complete a control-token text
//! begun or ended by the template around it. No control-token text can then be matched across
//! a mark; encoding parses control tokens in the rendered text and tokenizes every text stretch
//! containing a mark as plain text with the marks removed. Content without control-token texts
//! gets no marks and is tokenized exactly as the rendered text always was. (Roles are not
//! marked: they are markup, chosen by the application from a fixed set; a one-character
//! control-token text cannot be split and is not guarded; no vocabulary in use has one.)

use std::collections::HashSet;

use aho_corasick::AhoCorasick;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{TokenizeError, Tokenizer};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

/// Gemma's turn format (Gemma, Gemma 2, Gemma 3): no system role, so a system message is put in
/// front of the first user turn; the assistant's role is called "model"; contents are trimmed.
const GEMMA_TEMPLATE: &str = r#"{{- bos_token -}}
{%- if messages and messages[0].role == 'system' -%}
    {%- set first_prefix = messages[0].content ~ '\n\n' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set first_prefix = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Gemma conversations alternate user and assistant turns, starting with the user') -}}
    {%- endif -%}
    {{- '<start_of_turn>' ~ ('model' if message.role == 'assistant' else message.role) ~ '\n' -}}
    {{- first_prefix if loop.first else '' -}}
    {{- message.content | trim -}}
    {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}"#;

/// ChatML, the format of SmolLM2, Qwen and many others.
const CHATML_TEMPLATE: &str = r#"{%- for message in messages -%}
    {{- '<|im_start|>' ~ message.role ~ '\n' ~ message.content ~ '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}"#;

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    fallback: bool,
    description: String,
    guard: ContentGuard,
}

/// A rendered conversation: its text, and what is needed to tokenize it with special tokens
/// parsed in the template's markup only (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedChat {
    /// The prompt text as the template wrote it.
    text: String,
    /// The same text with marks in the message contents, and the mark; `None` when no content
    /// needed one (then `text` is encoded as it is).
    marked: Option<(String, char)>,
}

impl RenderedChat {
    /// The prompt text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The prompt text, by value.
    pub fn into_text(self) -> String {
        self.text
    }

    /// The prompt's token ids: special tokens parsed where the template wrote them, message
    /// contents tokenized as plain text. No BOS is added (templates write their own).
    pub fn encode(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        match &self.marked {
            None => tokenizer.encode(&self.text, false, true),
            Some((marked, mark)) => tokenizer.encode_marked(marked, *mark),
        }
    }
}

/// Private-use code points, where the mark is chosen.
const MARK_RANGES: [std::ops::RangeInclusive<u32>; 3] =
    [0xE000..=0xF8FF, 0xF_0000..=0xF_FFFD, 0x10_0000..=0x10_FFFD];

fn is_private_use(c: char) -> bool {
    MARK_RANGES.iter().any(|r| r.contains(&u32::from(c)))
}

/// The control-token texts of a vocabulary and the private-use characters a mark must avoid.
#[derive(Default)]
struct ContentGuard {
    /// Texts tokenized as special only on request (control and unknown tokens).
    controls: Vec<Box<str>>,
    /// Finds them in a content (all occurrences, overlapping ones included).
    finder: Option<AhoCorasick>,
    /// Private-use characters of every special-token text, the template source, BOS and EOS.
    taken: HashSet<char>,
}

impl ContentGuard {
    fn new(tokenizer: &Tokenizer, source: &str) -> ContentGuard {
        let mut controls: Vec<Box<str>> = Vec::new();
        let mut taken: HashSet<char> = source.chars().filter(|&c| is_private_use(c)).collect();
        for (text, only_if_parsing) in tokenizer.special_texts() {
            taken.extend(text.chars().filter(|&c| is_private_use(c)));
            if only_if_parsing {
                controls.push(text.into());
            }
        }
        let finder = (!controls.is_empty()).then(|| {
            AhoCorasick::new(controls.iter().map(|t| t.as_bytes()))
                .expect("an automaton over a vocabulary's control tokens fits the default limits")
        });
        ContentGuard {
            controls,
            finder,
            taken,
        }
    }

    /// Byte offsets of `content` where a mark goes (sorted, distinct): after the first
    /// character of every control-token text in it; at 0 when the template's text before it
    /// could end a control-token text that the content continues (the content starts with a
    /// proper suffix of one, or lies inside one); at the end when the content ends with a proper
    /// prefix of one.
    fn mark_offsets(&self, content: &str) -> Vec<usize> {
        let mut at = Vec::new();
        if content.is_empty() {
            return at;
        }
        if let Some(finder) = &self.finder {
            for m in finder.find_overlapping_iter(content) {
                let first = content[m.start()..]
                    .chars()
                    .next()
                    .map_or(1, char::len_utf8);
                if m.start() + first < m.end() {
                    at.push(m.start() + first);
                }
            }
        }
        for text in &self.controls {
            for (k, _) in text.char_indices().skip(1) {
                let (head, tail) = text.split_at(k);
                if content.starts_with(tail) || tail.starts_with(content) {
                    at.push(0);
                }
                if content.ends_with(head) {
                    at.push(content.len());
                }
            }
        }
        at.sort_unstable();
        at.dedup();
        at
    }

    /// `messages` with marks inserted into their contents, and the mark; `None` when no
    /// content needs one.
    fn mark(
        &self,
        messages: &[ChatMessage],
    ) -> Result<Option<(Vec<ChatMessage>, char)>, TokenizeError> {
        let offsets: Vec<Vec<usize>> = messages
            .iter()
            .map(|m| self.mark_offsets(&m.content))
            .collect();
        if offsets.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        let used: HashSet<char> = messages
            .iter()
            .flat_map(|m| m.role.chars().chain(m.content.chars()))
            .filter(|&c| is_private_use(c))
            .collect();
        let mark = MARK_RANGES
            .iter()
            .flat_map(|r| r.clone().filter_map(char::from_u32))
            .find(|c| !used.contains(c) && !self.taken.contains(c))
            .ok_or(TokenizeError::NoContentMark)?;
        let marked = messages
            .iter()
            .zip(&offsets)
            .map(|(m, at)| {
                let mut content =
                    String::with_capacity(m.content.len() + at.len() * mark.len_utf8());
                let mut from = 0;
                for &offset in at {
                    content.push_str(&m.content[from..offset]);
                    content.push(mark);
                    from = offset;
                }
                content.push_str(&m.content[from..]);
                ChatMessage {
                    role: m.role.clone(),
                    content,
                }
            })
            .collect();
        Ok(Some((marked, mark)))
    }
}

impl ChatTemplate {
    /// The template of a GGUF file (`tokenizer.chat_template`), or a built-in one when the file has
    /// none: Gemma's format for `general.architecture` gemma, gemma2, gemma3 and gemma3n, ChatML
    /// otherwise. `bos_token` and `eos_token` are the texts of the tokenizer's BOS and EOS.
    pub fn from_gguf(
        file: &quarry_format::GgufFile,
        tok: &Tokenizer,
    ) -> Result<ChatTemplate, TokenizeError> {
        if let Some(source) = file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            let mut template = ChatTemplate::new(source, tok)?;
            template.description = "chat template from the GGUF (tokenizer.chat_template)".into();
            return Ok(template);
        }
        let arch = file
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown");
        let (source, name) = match arch {
            "gemma" | "gemma2" | "gemma3" | "gemma3n" => (GEMMA_TEMPLATE, "Gemma"),
            _ => (CHATML_TEMPLATE, "ChatML"),
        };
        let mut template = ChatTemplate::new(source, tok)?;
        template.fallback = true;
        template.description = format!(
            "the GGUF has no tokenizer.chat_template; using the built-in {name} template \
             (general.architecture = {arch})"
        );
        Ok(template)
    }

    /// Compiles `source` for `tokenizer`'s vocabulary: `bos_token` and `eos_token` are the texts
    /// of its BOS and EOS, and its control tokens are the markup message contents are kept
    /// from. A syntax error is returned with its line.
    pub fn new(source: &str, tokenizer: &Tokenizer) -> Result<ChatTemplate, TokenizeError> {
        let text = |id: Option<u32>| id.map_or("", |id| tokenizer.token_text(id));
        let (bos, eos) = (text(tokenizer.bos_id()), text(tokenizer.eos_id()));
        let mut template = ChatTemplate::compile(source, bos, eos)?;
        template.guard = ContentGuard::new(tokenizer, source);
        template.guard.taken.extend(
            bos.chars()
                .chain(eos.chars())
                .filter(|&c| is_private_use(c)),
        );
        Ok(template)
    }

    /// Compiles `source` with no vocabulary: no content is marked (for tests of the rendering).
    fn compile(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, TokenizeError> {
        ChatTemplate::compile_at(source, bos, eos, None)
    }

    /// [`ChatTemplate::compile`] whose `strftime_now` reads `now` (seconds since the Unix
    /// epoch, UTC) instead of the clock.
    fn compile_at(
        source: &str,
        bos: &str,
        eos: &str,
        now: Option<u64>,
    ) -> Result<ChatTemplate, TokenizeError> {
        let mut env = Environment::new();
        // transformers gives templates the current time (Llama 3 prints "Today Date").
        env.add_function("strftime_now", move |format: String| -> String {
            let secs = now.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            });
            strftime(&format, secs)
        });
        // transformers renders chat templates with these two Jinja2 options.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|source| TokenizeError::Template {
                what: "syntax",
                source,
            })?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
            fallback: false,
            description: "custom chat template".into(),
            guard: ContentGuard::default(),
        })
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends with the opening of an
    /// assistant turn. A template that raises (`raise_exception`) or fails returns its message.
    /// Tokenize the result with [`RenderedChat::encode`], which keeps message contents text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<RenderedChat, TokenizeError> {
        Ok(match self.guard.mark(messages)? {
            None => RenderedChat {
                text: self.render_text(messages, add_generation_prompt)?,
                marked: None,
            },
            Some((marked_messages, mark)) => {
                let marked = self.render_text(&marked_messages, add_generation_prompt)?;
                RenderedChat {
                    text: marked.replace(mark, ""),
                    marked: Some((marked, mark)),
                }
            }
        })
    }

    fn render_text(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("the template was added when this ChatTemplate was built");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|source| TokenizeError::Template {
                what: "render",
                source,
            })
    }

    /// Whether this is a built-in template standing in for one the file lacks.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Where the template came from, in words (for a note to the user).
    pub fn description(&self) -> String {
        self.description.clone()
    }
}

/// `format` with the date and time `secs` after the Unix epoch (UTC), for the conversions
/// chat templates use: `%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`; others stay as written.
fn strftime(format: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let year_day = days as i64 - days_from_civil(year, 1, 1) + 1;
    let weekday = DAYS[(days % 7) as usize];
    let month_name = MONTHS[month as usize - 1];
    let (h, m, sec) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{sec:02}")),
            Some('j') => out.push_str(&format!("{year_day:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The (year, month, day) of `days` after 1970-01-01 (proleptic Gregorian; Hinnant's method).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to (year, month, day): the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use quarry_format::Value;

    use super::*;
    use crate::gguf::tests::{gguf, strings};

    #[test]
    fn template_source_by_file() {
        let vocab = |arch: &str| {
            vec![
                ("general.architecture", Value::String(arch.into())),
                ("tokenizer.ggml.model", Value::String("llama".into())),
                (
                    "tokenizer.ggml.tokens",
                    strings(&["<unk>", "<bos>", "<eos>"]),
                ),
            ]
        };
        let convo = [msg("user", "hi")];
        for (arch, expected) in [
            ("gemma3", "<bos><start_of_turn>user\nhi<end_of_turn>\n"),
            ("llama", "<|im_start|>user\nhi<|im_end|>\n"),
        ] {
            let file = gguf(vocab(arch));
            let tok = Tokenizer::from_gguf(&file).unwrap();
            let t = ChatTemplate::from_gguf(&file, &tok).unwrap();
            assert!(
                t.is_fallback() && t.description().contains(arch),
                "{}",
                t.description()
            );
            assert_eq!(t.render(&convo, false).unwrap().text(), expected);
        }
        let mut entries = vocab("gemma3");
        entries.push((
            "tokenizer.chat_template",
            Value::String("{{ eos_token }}{{ messages|length }}".into()),
        ));
        let file = gguf(entries);
        let tok = Tokenizer::from_gguf(&file).unwrap();
        let t = ChatTemplate::from_gguf(&file, &tok).unwrap();
        assert!(!t.is_fallback());
        assert_eq!(t.render(&convo, true).unwrap().text(), "<eos>1");
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn gemma_fallback_format() {
        let t = ChatTemplate::compile(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        assert_eq!(
            t.render(&[msg("user", "hi")], true).unwrap().text(),
            "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            t.render(
                &[
                    msg("system", "Be brief."),
                    msg("user", " hi "),
                    msg("assistant", "Hello!")
                ],
                false
            )
            .unwrap()
            .text(),
            "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n\
             <start_of_turn>model\nHello!<end_of_turn>\n"
        );
        let err = t
            .render(&[msg("assistant", "x")], true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("alternate user and assistant"), "{err}");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2026-12-04 09:30:05 UTC, a Friday, day 338.
        let t = 1_796_376_605;
        assert_eq!(
            strftime("%d %b %Y|%A %a|%B %m %y|%H:%M:%S|%j %e|%% %Q", t),
            "04 Dec 2026|Friday Fri|December 12 26|09:30:05|338  4|% %Q"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d %A", 951_782_400), "2000-02-29 Tuesday");
        for days in [0i64, 59, 365, 10_957, 20_000, 40_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    /// The real chat templates of the families (fixtures/chat, from llama.cpp's tree) render
    /// exactly as transformers' `apply_chat_template` rendered them (scripts/make_chat_goldens.py),
    /// multi-turn with a system message included; a conversation a template refuses is refused
    /// here too, with its message.
    #[test]
    fn family_templates_render_as_transformers_does() {
        let dir = quarry_fixtures::workspace_root().join("fixtures/chat");
        let goldens: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("goldens.json")).unwrap()).unwrap();
        // The goldens' "today" at 09:30 UTC, as the script froze transformers' clock.
        let now = 1_796_376_600;
        assert_eq!(goldens["today"], "2026-12-04");
        let goldens = goldens["goldens"].as_array().unwrap();
        assert_eq!(goldens.len(), 24);
        for g in goldens {
            let name = g["template"].as_str().unwrap();
            let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
            let t = ChatTemplate::compile_at(
                &source,
                g["bos"].as_str().unwrap(),
                g["eos"].as_str().unwrap(),
                Some(now),
            )
            .unwrap();
            let messages: Vec<ChatMessage> = serde_json::from_value(g["messages"].clone()).unwrap();
            let add = g["add_generation_prompt"].as_bool().unwrap();
            match (t.render(&messages, add), g.get("rendered")) {
                (Ok(r), Some(expected)) => {
                    assert_eq!(r.text(), expected.as_str().unwrap(), "{name}")
                }
                (Err(e), None) => {
                    let expected = g["error"].as_str().unwrap();
                    assert!(e.to_string().contains(expected), "{name}: {e}");
                }
                (got, _) => panic!("{name}: {:?} against {g}", got.map(|r| r.into_text())),
            }
        }
    }

    #[test]
    fn chatml_fallback_format() {
        let t = ChatTemplate::compile(CHATML_TEMPLATE, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&[msg("system", "S"), msg("user", "hi")], true)
                .unwrap()
                .text(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_block_trimming() {
        let source = "{% for m in messages %}\n  {{ m.content.strip().upper() }}{% if m.role.startswith('u') %}!{% endif %}\n{% endfor %}";
        let t = ChatTemplate::compile(source, "", "").unwrap();
        // lstrip_blocks leaves the indent before `{{`; trim_blocks eats the newline after `endif`.
        assert_eq!(
            t.render(&[msg("user", "  hi ")], false).unwrap().text(),
            "  HI!"
        );
    }

    #[test]
    fn malformed_templates_are_errors() {
        let err = ChatTemplate::compile("{% for m in messages %}", "", "")
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("chat template (syntax):"), "{err}");
        let t = ChatTemplate::compile("{{ raise_exception('no tools here') }}", "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(
            err.starts_with("chat template (render):") && err.contains("no tools here"),
            "{err}"
        );
        let unknown_filter =
            ChatTemplate::compile("{{ messages[0].content | nosuchfilter }}", "", "")
                .and_then(|t| t.render(&[msg("user", "x")], true));
        assert!(unknown_filter.is_err());
    }

    #[test]
    fn marks_go_where_content_could_be_read_as_markup() {
        let tok = crate::tokenizer::tests::spm_tokenizer(false);
        let guard = ContentGuard::new(&tok, "");
        // "<s>" and "</s>" are control texts; "<end_of_turn>" became one (end of generation).
        assert!(guard.mark_offsets("plain text").is_empty());
        assert!(guard.mark_offsets("").is_empty());
        assert_eq!(guard.mark_offsets("a<s>b"), [2]);
        // Each occurrence gets a mark of its own.
        assert_eq!(guard.mark_offsets("</s><s>"), [1, 5]);
        // A start that could finish a control text ("s>" of "<s>"), an end that could begin
        // one, and a content that lies inside one.
        assert_eq!(guard.mark_offsets("s> x"), [0]);
        assert_eq!(guard.mark_offsets("x </"), [4]);
        assert_eq!(guard.mark_offsets("nd_of_tur"), [0]);
    }

    #[test]
    fn the_mark_is_a_character_the_conversation_does_not_use() {
        let tok = crate::tokenizer::tests::spm_tokenizer(false);
        let t = ChatTemplate::new(
            "{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}",
            &tok,
        )
        .unwrap();
        let content = "\u{E000}<s>\u{E001}";
        let rendered = t.render(&[msg("user", content)], false).unwrap();
        assert_eq!(rendered.text(), format!("<s>{content}</s>"));
        let (_, mark) = rendered.marked.clone().unwrap();
        assert_eq!(mark, '\u{E002}');
        let ids = rendered.encode(&tok);
        assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1, "{ids:?}");
        assert_eq!(tok.decode(&ids), content);

        // A conversation using every private-use character leaves no mark: refused, not guessed.
        let all: String = MARK_RANGES
            .iter()
            .flat_map(|r| r.clone().filter_map(char::from_u32))
            .collect();
        let err = t
            .render(&[msg("user", &(all + "<s>"))], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("private-use character"), "{err}");
    }
}
