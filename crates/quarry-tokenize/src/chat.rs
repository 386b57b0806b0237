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
//! The rendered text contains special-token texts (`<start_of_turn>`, `<|im_start|>`, often BOS):
//! encode it with `parse_special = true`, and without adding a second BOS when it already starts
//! with one.

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
}

impl ChatTemplate {
    /// The template of a GGUF file (`tokenizer.chat_template`), or a built-in one when the file has
    /// none: Gemma's format for `general.architecture` gemma, gemma2, gemma3 and gemma3n, ChatML
    /// otherwise. `bos_token` and `eos_token` are the texts of the tokenizer's BOS and EOS.
    pub fn from_gguf(
        file: &quarry_format::GgufFile,
        tok: &Tokenizer,
    ) -> Result<ChatTemplate, TokenizeError> {
        let text = |id: Option<u32>| id.map_or("", |id| tok.token_text(id));
        let (bos, eos) = (text(tok.bos_id()), text(tok.eos_id()));
        if let Some(source) = file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            let mut template = ChatTemplate::new(source, bos, eos)?;
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
        let mut template = ChatTemplate::new(source, bos, eos)?;
        template.fallback = true;
        template.description = format!(
            "the GGUF has no tokenizer.chat_template; using the built-in {name} template \
             (general.architecture = {arch})"
        );
        Ok(template)
    }

    /// Compiles `source`; a syntax error is returned with its line.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate, TokenizeError> {
        let mut env = Environment::new();
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
        })
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends with the opening of an
    /// assistant turn. A template that raises (`raise_exception`) or fails returns its message.
    pub fn render(
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
            assert_eq!(t.render(&convo, false).unwrap(), expected);
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
        assert_eq!(t.render(&convo, true).unwrap(), "<eos>1");
    }

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn gemma_fallback_format() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE, "<bos>", "<eos>").unwrap();
        assert_eq!(
            t.render(&[msg("user", "hi")], true).unwrap(),
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
            .unwrap(),
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
    fn chatml_fallback_format() {
        let t = ChatTemplate::new(CHATML_TEMPLATE, "", "<|im_end|>").unwrap();
        assert_eq!(
            t.render(&[msg("system", "S"), msg("user", "hi")], true).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_block_trimming() {
        let source = "{% for m in messages %}\n  {{ m.content.strip().upper() }}{% if m.role.startswith('u') %}!{% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(source, "", "").unwrap();
        // lstrip_blocks leaves the indent before `{{`; trim_blocks eats the newline after `endif`.
        assert_eq!(t.render(&[msg("user", "  hi ")], false).unwrap(), "  HI!");
    }

    #[test]
    fn malformed_templates_are_errors() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "")
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("chat template (syntax):"), "{err}");
        let t = ChatTemplate::new("{{ raise_exception('no tools here') }}", "", "").unwrap();
        let err = t.render(&[], true).unwrap_err().to_string();
        assert!(
            err.starts_with("chat template (render):") && err.contains("no tools here"),
            "{err}"
        );
        let unknown_filter = ChatTemplate::new("{{ messages[0].content | nosuchfilter }}", "", "")
            .and_then(|t| t.render(&[msg("user", "x")], true));
        assert!(unknown_filter.is_err());
    }
}
