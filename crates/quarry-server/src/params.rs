//! Reading OpenAI request bodies into engine requests.
//!
//! Bodies are read as JSON values and checked field by field, so that every error names its
//! field (`param`) and says what was expected, as OpenAI's API does. Unknown fields are ignored
//! (clients send many that do not apply here); known ones with a wrong type or range are
//! refused. Defaults are OpenAI's: temperature 1, top_p 1, no top-k or min-p, no penalties,
//! `max_tokens` up to the end of the context.

use std::time::{SystemTime, UNIX_EPOCH};

use quarry_engine::{GenerateOptions, SamplingParams};
use quarry_tokenize::{ChatMessage, ChatTemplate, Tokenizer};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: usize = 16;
/// Most stop strings.
const MAX_STOPS: usize = 16;
/// Most alternatives per token (`top_logprobs`), as OpenAI allows.
const MAX_TOP_LOGPROBS: usize = 20;

/// Which endpoint a body is for: they name the prompt and the log-probability options apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A checked generation request.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt: Vec<u32>,
    /// The prompt as text (for `echo`).
    pub prompt_text: String,
    /// `max_tokens` defaults to what is left of the context.
    pub options: GenerateOptions,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// `Some(k)`: report log-probabilities with `k` alternatives.
    pub logprobs: Option<usize>,
    pub echo: bool,
}

/// The body of a request as a JSON object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON: {e} (send a JSON object with Content-Type: application/json)"
        ))
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the fields of a body, with errors that name the field.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn number(&self, name: &str, default: f64, range: (f64, f64)) -> Result<f64, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        let x = v.as_f64().ok_or_else(|| {
            ApiError::invalid(name, format!("'{name}' must be a number, not {}", kind(v)))
        })?;
        if !(range.0..=range.1).contains(&x) {
            return Err(ApiError::invalid(
                name,
                format!(
                    "'{name}' is {x}; it must be between {} and {}",
                    range.0, range.1
                ),
            ));
        }
        Ok(x)
    }

    pub fn integer(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v.as_u64().ok_or_else(|| {
            ApiError::invalid(
                name,
                format!("'{name}' must be a non-negative integer, not {v}"),
            )
        })?;
        if !(min..=max).contains(&x) {
            return Err(ApiError::invalid(
                name,
                format!("'{name}' is {x}; it must be between {min} and {max}"),
            ));
        }
        Ok(Some(x))
    }

    pub fn boolean(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("'{name}' must be a boolean, not {}", kind(v)),
            )),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("'{name}' must be a string, not {}", kind(v)),
            )),
        }
    }

    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let stops = match self.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", "'stop' must be a string or a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stop",
                    "'stop' must be a string or a list of strings",
                ))
            }
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {MAX_STOPS} stop strings, not {}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        Ok(stops)
    }
}

/// Reads a chat or completion body: prompt (rendered through `template` for chat), sampling,
/// limits and options. `context` is the per-sequence context.
///
/// Text that cannot fit the context whatever its tokens (more bytes than `context` tokens of
/// `max_token_bytes` each hold) is refused before it is tokenized, which takes about a second
/// per MiB.
pub fn generation(
    endpoint: Endpoint,
    body: &Map<String, Value>,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    context: usize,
    max_token_bytes: usize,
) -> Result<Generation, ApiError> {
    let f = Fields(body);
    let field = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let bytes = body.get(field).map_or(0, text_bytes);
    let most = context.saturating_mul(max_token_bytes.max(1));
    if bytes > most {
        return Err(ApiError::invalid(
            field,
            format!(
                "the prompt's text is {bytes} bytes: more than {context} tokens (the context) of at most {max_token_bytes} bytes each; shorten it or start the server with a larger --ctx"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let (prompt, prompt_text) = match endpoint {
        Endpoint::Chat => chat_prompt(body, tokenizer, template)?,
        Endpoint::Completions => completion_prompt(body, tokenizer)?,
    };
    let max_tokens = match f.integer("max_completion_tokens", 1, u32::MAX as u64)? {
        Some(m) => Some(m),
        None => f.integer("max_tokens", 1, u32::MAX as u64)?,
    }
    .map(|m| m as usize);
    let n = f.integer("n", 1, MAX_CHOICES as u64)?.unwrap_or(1) as usize;
    let logprobs = match endpoint {
        Endpoint::Chat => {
            let top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
            if f.boolean("logprobs")? {
                Some(top.unwrap_or(0) as usize)
            } else if top.is_some_and(|k| k > 0) {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs': true",
                ));
            } else {
                None
            }
        }
        Endpoint::Completions => f
            .integer("logprobs", 0, MAX_TOP_LOGPROBS as u64)?
            .map(|k| k as usize),
    };
    let echo = endpoint == Endpoint::Completions && f.boolean("echo")?;
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "'echo' with 'logprobs' (log-probabilities of the prompt) is not supported",
        ));
    }
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => Fields(o).boolean("include_usage")?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("'stream_options' must be an object, not {}", kind(v)),
            ))
        }
    };
    let seed = match body.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| ApiError::invalid("seed", "'seed' must be an integer"))?,
    };
    let sampling = SamplingParams {
        temperature: f.number("temperature", 1.0, (0.0, 2.0))? as f32,
        top_p: f.number("top_p", 1.0, (0.0, 1.0))? as f32,
        top_k: f.integer("top_k", 0, u32::MAX as u64)?.unwrap_or(0) as usize,
        min_p: f.number("min_p", 0.0, (0.0, 1.0))? as f32,
        presence_penalty: f.number("presence_penalty", 0.0, (-2.0, 2.0))? as f32,
        frequency_penalty: f.number("frequency_penalty", 0.0, (-2.0, 2.0))? as f32,
        repeat_penalty: f.number("repeat_penalty", 1.0, (0.0, 10.0))? as f32,
        penalty_last_n: 64,
        seed,
    };
    if sampling.top_p == 0.0 {
        return Err(ApiError::invalid("top_p", "'top_p' must be above 0"));
    }
    if prompt.len() >= context {
        return Err(ApiError::invalid(
            if endpoint == Endpoint::Chat { "messages" } else { "prompt" },
            format!(
                "the prompt has {} tokens but the context holds {context}; shorten it or start the server with a larger --ctx",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let limit = max_tokens.unwrap_or(context - prompt.len());
    Ok(Generation {
        options: GenerateOptions {
            max_tokens: limit,
            sampling,
            stop: f.stop()?,
            stop_at_eog: true,
        },
        n,
        stream: f.boolean("stream")?,
        include_usage,
        logprobs,
        echo,
        prompt,
        prompt_text,
    })
}

/// Refuses text of `len` bytes beyond `max`, naming `param`: "`what` is N bytes; the limit
/// is M".
pub fn within_bytes(param: &str, what: &str, len: usize, max: usize) -> Result<(), ApiError> {
    if len > max {
        return Err(ApiError::invalid(
            param,
            format!("{what} is {len} bytes; the limit is {max}"),
        ));
    }
    Ok(())
}

/// Bytes of all the strings in `v`.
fn text_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(text_bytes).sum(),
        Value::Object(map) => map.values().map(text_bytes).sum(),
        _ => 0,
    }
}

/// A seed for a request that gave none: different each time, as OpenAI's sampling is.
fn fresh_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn chat_prompt(
    body: &Map<String, Value>,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
) -> Result<(Vec<u32>, String), ApiError> {
    let Some(Value::Array(items)) = body.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must be a non-empty list of {role, content} objects",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' is empty"));
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Some(m) = item.as_object() else {
            return Err(ApiError::invalid(
                &param,
                format!("{param} must be an object"),
            ));
        };
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "developer" | "user" | "assistant")) => {
                if r == "developer" { "system" } else { r }.to_string()
            }
            _ => {
                return Err(ApiError::invalid(
                    &format!("{param}.role"),
                    format!("{param}.role must be one of system, developer, user, assistant"),
                ))
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text parts, joined (no images here).
            Some(Value::Array(parts)) => parts
                .iter()
                .map(
                    |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => Err(ApiError::invalid(
                            &format!("{param}.content"),
                            format!("{param}.content: only text parts are supported"),
                        )),
                    },
                )
                .collect::<Result<Vec<_>, _>>()?
                .join(""),
            _ => {
                return Err(ApiError::invalid(
                    &format!("{param}.content"),
                    format!("{param}.content must be a string or a list of text parts"),
                ))
            }
        };
        messages.push(ChatMessage { role, content });
    }
    let rendered = template.render(&messages, true).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("the chat template refused the conversation: {e}"),
        )
    })?;
    // The template writes any BOS itself; message contents are text, never control tokens.
    Ok((rendered.encode(tokenizer), rendered.into_text()))
}

fn completion_prompt(
    body: &Map<String, Value>,
    tokenizer: &Tokenizer,
) -> Result<(Vec<u32>, String), ApiError> {
    let text_prompt = |text: &str| {
        (
            tokenizer.encode(text, tokenizer.add_bos(), true),
            text.to_string(),
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| (id as usize) < tokenizer.vocab_size())
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "prompt",
                            format!(
                                "token {v} is not an id of this model's vocabulary (0..{})",
                                tokenizer.vocab_size()
                            ),
                        )
                    })
            })
            .collect()
    };
    match body.get("prompt") {
        Some(Value::String(s)) => Ok(text_prompt(s)),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) && !items.is_empty() => {
            let prompt = ids(items)?;
            let text = tokenizer.decode(&prompt);
            Ok((prompt, text))
        }
        Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
            Value::String(s) => Ok(text_prompt(s)),
            Value::Array(inner) => {
                let prompt = ids(inner)?;
                let text = tokenizer.decode(&prompt);
                Ok((prompt, text))
            }
            _ => Err(ApiError::invalid("prompt", "'prompt' must be a string or a list of token ids")),
        },
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "one prompt per request: send a string, a list of token ids, or a list of exactly one of those",
        )),
        _ => Err(ApiError::invalid(
            "prompt",
            "'prompt' must be a string or a list of token ids",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn param(e: ApiError) -> Option<String> {
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        e.param
    }

    #[test]
    fn bodies_must_be_json_objects() {
        assert_eq!(object(b"{\"a\": 1}").unwrap()["a"], 1);
        let e = object(b"{\"a\": ").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = object(b"[1]").unwrap_err();
        assert!(e.message.contains("not an array"), "{}", e.message);
        assert_eq!(e.param, None);
    }

    #[test]
    fn fields_check_types_and_ranges_and_name_themselves() {
        let body = fields(json!({
            "t": 0.5, "s": "x", "b": true, "i": 3, "null": null,
            "neg": -1, "frac": 1.5, "big": 9, "str_num": "3",
        }));
        let f = Fields(&body);
        assert_eq!(f.number("t", 1.0, (0.0, 2.0)).unwrap(), 0.5);
        assert_eq!(f.number("absent", 1.0, (0.0, 2.0)).unwrap(), 1.0);
        assert_eq!(f.number("null", 1.0, (0.0, 2.0)).unwrap(), 1.0);
        assert_eq!(f.integer("i", 1, 5).unwrap(), Some(3));
        assert_eq!(f.integer("null", 1, 5).unwrap(), None);
        assert_eq!(f.string("s").unwrap(), Some("x"));
        assert!(f.boolean("b").unwrap());
        assert!(!f.boolean("absent").unwrap());
        for e in [
            f.number("s", 1.0, (0.0, 2.0)).unwrap_err(),
            f.number("big", 1.0, (0.0, 2.0)).unwrap_err(),
        ] {
            assert!(matches!(param(e).as_deref(), Some("s" | "big")));
        }
        assert_eq!(
            param(f.integer("neg", 1, 5).unwrap_err()).as_deref(),
            Some("neg")
        );
        assert_eq!(
            param(f.integer("frac", 1, 5).unwrap_err()).as_deref(),
            Some("frac")
        );
        assert_eq!(
            param(f.integer("big", 1, 5).unwrap_err()).as_deref(),
            Some("big")
        );
        assert_eq!(
            param(f.integer("str_num", 1, 5).unwrap_err()).as_deref(),
            Some("str_num")
        );
        assert_eq!(param(f.boolean("i").unwrap_err()).as_deref(), Some("i"));
        assert_eq!(param(f.string("b").unwrap_err()).as_deref(), Some("b"));
    }

    #[test]
    fn stop_is_a_string_or_a_list_of_strings() {
        let stop = |v: Value| Fields(&fields(json!({ "stop": v }))).stop();
        assert_eq!(stop(json!("\n")).unwrap(), ["\n"]);
        assert_eq!(stop(json!(["a", "b"])).unwrap(), ["a", "b"]);
        assert!(stop(Value::Null).unwrap().is_empty());
        let many: Vec<String> = (0..=MAX_STOPS).map(|i| i.to_string()).collect();
        for bad in [json!(3), json!(["a", 1]), json!(""), json!(many)] {
            assert_eq!(param(stop(bad).unwrap_err()).as_deref(), Some("stop"));
        }
    }
}
