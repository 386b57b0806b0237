//! A conversation with one model: a KV cache plus the tokens it holds, and the decode loop.
//!
//! Each call to [`Session::generate`] takes the *whole* token sequence the model should see
//! (for chat, the re-rendered conversation). The session reuses the longest prefix already in
//! its cache and evaluates only the rest, so multi-turn chat costs only the new turn.

use std::time::{Duration, Instant};

use quarry_model::{ContiguousKvCache, KvCache, Model, ModelError};
use quarry_tokenize::{StreamDecoder, Tokenizer};

use crate::sampling::{Sampler, SamplingParams};
use crate::stop::StopStrings;
use crate::EngineError;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends before the first of these strings; the string is not emitted.
    pub stop: Vec<String>,
    /// When false, end-of-generation tokens (EOS, end-of-turn) are sampled like any other.
    pub stop_at_eog: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context is full.
    ContextFull,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextFull => "context_full",
        }
    }
}

/// The outcome of one [`Session::generate`] call.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated token ids (an end-of-generation token that ended the run is included).
    pub tokens: Vec<u32>,
    /// Generated text as emitted (stop strings removed).
    pub text: String,
    pub finish: FinishReason,
    /// Prompt tokens evaluated (those not already cached).
    pub prompt_eval_tokens: usize,
    pub prompt_eval_time: Duration,
    /// Tokens decoded one at a time after the prompt.
    pub decode_tokens: usize,
    pub decode_time: Duration,
}

/// A model, its tokenizer and a KV cache holding one sequence.
pub struct Session<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    cache: ContiguousKvCache,
    tokens: Vec<u32>,
}

impl<'m> Session<'m> {
    /// A session whose context holds up to `context` tokens.
    pub fn new(model: &'m Model, tokenizer: &'m Tokenizer, context: usize) -> Self {
        Session {
            model,
            tokenizer,
            cache: model.new_cache(context),
            tokens: Vec::new(),
        }
    }

    pub fn context(&self) -> usize {
        self.cache.capacity()
    }

    /// Tokens the session's cache holds (prompt and generated).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Continues `prompt` (the whole sequence, see the module docs), calling `on_text` with each
    /// piece of text as soon as it is complete.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= self.context() {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                context: self.context(),
            });
        }
        let mut continuation = Continuation::new(self.tokenizer, options)?;

        // Reuse the cached prefix, but always evaluate at least the last prompt token: its
        // logits choose the first generated token.
        let shared = common_prefix(&self.tokens, prompt).min(prompt.len() - 1);
        self.cache.truncate(shared);
        self.tokens.truncate(shared);

        let t0 = Instant::now();
        let pending = &prompt[shared..];
        let logits = self.eval(pending)?;
        let prompt_eval_time = t0.elapsed();

        let mut text = String::new();
        let t1 = Instant::now();
        // With no tokens to generate, only the prompt is evaluated (llama.cpp's `-n 0`).
        let finish = if options.max_tokens == 0 {
            FinishReason::Length
        } else {
            self.decode(&mut continuation, logits, &mut text, &mut on_text)?
        };
        let tail = continuation.finish();
        if !tail.is_empty() {
            on_text(&tail);
            text.push_str(&tail);
        }
        let generated = continuation.into_tokens();
        Ok(Generation {
            decode_tokens: generated.len().saturating_sub(1),
            tokens: generated,
            text,
            finish,
            prompt_eval_tokens: pending.len(),
            prompt_eval_time,
            decode_time: t1.elapsed(),
        })
    }

    /// Samples and evaluates tokens until `continuation` says generation ends.
    fn decode(
        &mut self,
        continuation: &mut Continuation<'_>,
        mut logits: Vec<f32>,
        text: &mut String,
        on_text: &mut impl FnMut(&str),
    ) -> Result<FinishReason, EngineError> {
        loop {
            let step = continuation.next(&logits, &self.tokens, self.context());
            if !step.text.is_empty() {
                on_text(&step.text);
                text.push_str(&step.text);
            }
            if let Some(finish) = step.finish {
                return Ok(finish);
            }
            logits = self.eval(&[step.token])?;
        }
    }

    /// Evaluates `tokens` after the cached ones; returns the logits of the last.
    fn eval(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        let logits = self.model.forward(tokens, &mut self.cache, n - 1..n)?;
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
    }
}

/// The token-by-token part of generation shared by [`Session`] and the batching engine:
/// sampling, end-of-generation and stop strings, streamed text, the token limit.
pub(crate) struct Continuation<'t> {
    tokenizer: &'t Tokenizer,
    sampler: Sampler,
    stops: StopStrings,
    decoder: StreamDecoder<'t>,
    max_tokens: usize,
    stop_at_eog: bool,
    generated: Vec<u32>,
    stopped_by_string: bool,
}

/// One sampled token, the text it completed, and whether generation ends with it.
pub(crate) struct Step {
    pub token: u32,
    pub text: String,
    pub finish: Option<FinishReason>,
}

impl<'t> Continuation<'t> {
    pub fn new(tokenizer: &'t Tokenizer, options: &GenerateOptions) -> Result<Self, EngineError> {
        Ok(Continuation {
            tokenizer,
            sampler: Sampler::new(options.sampling.clone())?,
            stops: StopStrings::new(options.stop.clone()),
            decoder: StreamDecoder::new(tokenizer),
            max_tokens: options.max_tokens,
            stop_at_eog: options.stop_at_eog,
            generated: Vec::new(),
            stopped_by_string: false,
        })
    }

    /// Samples the token after `history` (every token evaluated so far, the one these
    /// `logits` follow last) in a context of `context` positions.
    pub fn next(&mut self, logits: &[f32], history: &[u32], context: usize) -> Step {
        let token = self.sampler.sample(logits, history);
        self.generated.push(token);
        let mut step = Step {
            token,
            text: String::new(),
            finish: None,
        };
        if self.stop_at_eog && self.tokenizer.is_end_of_generation(token) {
            step.finish = Some(FinishReason::Stop);
            return step;
        }
        let (piece, hit) = self.stops.push(&self.decoder.push(token));
        step.text = piece;
        step.finish = if hit {
            self.stopped_by_string = true;
            Some(FinishReason::Stop)
        } else if history.len() + 1 >= context {
            Some(FinishReason::ContextFull)
        } else if self.generated.len() >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        step
    }

    /// Text held back until the end (a partial character or a possible stop string), once
    /// generation has ended.
    pub fn finish(&mut self) -> String {
        if self.stopped_by_string {
            return String::new();
        }
        let tail = self.decoder.finish();
        let (mut piece, _) = self.stops.push(&tail);
        piece.push_str(&self.stops.finish());
        piece
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.generated
    }

    pub fn into_tokens(self) -> Vec<u32> {
        self.generated
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
