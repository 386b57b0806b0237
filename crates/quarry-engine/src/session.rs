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
pub struct Session<'m, 'a> {
    model: &'m Model<'a>,
    tokenizer: &'m Tokenizer,
    cache: ContiguousKvCache,
    tokens: Vec<u32>,
}

impl<'m, 'a> Session<'m, 'a> {
    /// A session whose context holds up to `context` tokens.
    pub fn new(model: &'m Model<'a>, tokenizer: &'m Tokenizer, context: usize) -> Self {
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
        let mut sampler = Sampler::new(options.sampling.clone())?;

        // Reuse the cached prefix, but always evaluate at least the last prompt token: its
        // logits choose the first generated token.
        let shared = common_prefix(&self.tokens, prompt).min(prompt.len() - 1);
        self.cache.truncate(shared);
        self.tokens.truncate(shared);

        let t0 = Instant::now();
        let pending = &prompt[shared..];
        let mut logits = self.eval(pending)?;
        let prompt_eval_time = t0.elapsed();

        let mut stops = StopStrings::new(options.stop.clone());
        let mut decoder = StreamDecoder::new(self.tokenizer);
        let mut generated = Vec::new();
        let mut text = String::new();
        let mut emit = |piece: String, text: &mut String| {
            if !piece.is_empty() {
                on_text(&piece);
                text.push_str(&piece);
            }
        };
        let mut stopped_by_string = false;
        let t1 = Instant::now();
        let finish = loop {
            if generated.len() >= options.max_tokens {
                break FinishReason::Length;
            }
            let next = sampler.sample(&logits, &self.tokens);
            generated.push(next);
            if options.stop_at_eog && self.tokenizer.is_end_of_generation(next) {
                break FinishReason::Stop;
            }
            let (piece, hit) = stops.push(&decoder.push(next));
            emit(piece, &mut text);
            if hit {
                stopped_by_string = true;
                break FinishReason::Stop;
            }
            if self.tokens.len() + 1 >= self.context() {
                break FinishReason::ContextFull;
            }
            if generated.len() >= options.max_tokens {
                break FinishReason::Length;
            }
            logits = self.eval(&[next])?;
        };
        if !stopped_by_string {
            let tail = decoder.finish();
            let (piece, _) = stops.push(&tail);
            emit(piece, &mut text);
            emit(stops.finish(), &mut text);
        }
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

    /// Evaluates `tokens` after the cached ones; returns the logits of the last.
    fn eval(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let n = tokens.len();
        let logits = self.model.forward(tokens, &mut self.cache, n - 1..n)?;
        self.tokens.extend_from_slice(tokens);
        Ok(logits)
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
