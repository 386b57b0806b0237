//! Continuous batching: many generation requests share one model, one paged KV cache and
//! one forward pass per step.
//!
//! An [`Engine`] runs on its own thread ([`Engine::run`]); any number of [`EngineHandle`]s
//! submit [`Request`]s to it and receive [`Event`]s through a sink callback. Every step the
//! engine
//! 1. drops requests that were cancelled ([`Cancel`]: the client hung up, waiting or running,
//!    even in the middle of a long prompt's prefill) or whose deadline passed, and fails
//!    waiting requests that waited longer than the queue timeout;
//! 2. admits waiting requests, oldest first, while a sequence slot is free and the cache has
//!    blocks for the prompt (prefix blocks already cached are shared, not recomputed);
//! 3. builds one batch: one token for every sequence that is decoding, then prompt chunks of
//!    sequences still prefilling until the step's token budget is spent — so a long prompt is
//!    evaluated over several steps and running streams keep flowing;
//! 4. runs one forward pass over the whole batch (every weight matrix read once) and samples
//!    the next token of every sequence whose prompt is complete.
//!
//! Edits: the engine holds a current [`FfnOverlay`] ([`EngineHandle::set_overlay`], swapped
//! atomically). A request runs under the overlay current when it is admitted, to its end, so
//! sequences in flight finish on the weights they started with while later ones see the new
//! deltas; one batch mixes both. The prefix cache keys blocks by the overlay too, so no KV state
//! computed under other weights is reused.
//!
//! A model on a device (GPU) keeps the keys and values in a pool of blocks on the device, one
//! for each block of the engine's pool; the blocks here then only count positions and name
//! the device's, so sharing and the prefix cache work as on the CPU.
//!
//! A cancelled request stops at the next step boundary: at most one step (`step_tokens`
//! prompt tokens plus one token per decoding sequence) runs after [`Cancel::cancel`], then its
//! blocks are back in the pool. A sink that refuses an event cancels its request too.
//!
//! Invariants: a sequence's KV blocks are reserved before the forward pass that writes them,
//! so the pass never runs out of memory; when the cache is full, requests wait in the queue
//! (and fail with [`EngineError::Overloaded`] after the queue timeout) instead.

use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use quarry_model::{FfnOverlay, KvCache, Model, SequenceBatch};
use quarry_tokenize::Tokenizer;

use crate::paged_kv::{BlockPool, BlockShape, PagedSequence};
use crate::session::{Continuation, FinishReason, GenerateOptions};
use crate::EngineError;

/// Limits of an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences decoding at once.
    pub parallel: usize,
    /// Most tokens (prompt and generated) of one sequence (cut to the model's context).
    pub context: usize,
    /// Memory bound of the KV cache, in bytes.
    pub kv_bytes: usize,
    /// Positions per KV block.
    pub block_size: usize,
    /// Most tokens evaluated per step (decode tokens first, then prompt chunks).
    pub step_tokens: usize,
    /// A request still waiting for admission after this long fails with
    /// [`EngineError::Overloaded`].
    pub queue_timeout: Duration,
}

/// One sequence to generate.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<u32>,
    /// Token limit (at least one), sampling, stop strings, end-of-generation handling.
    pub options: GenerateOptions,
    /// `Some(k)`: report each generated token's log-probability and the `k` most likely
    /// alternatives (log-softmax of the model's logits, before sampling).
    pub logprobs: Option<usize>,
    /// The request fails with [`EngineError::Timeout`] if it has not finished by then.
    pub deadline: Option<Instant>,
    /// Once cancelled, the request is dropped at the engine's next step, without further
    /// events: from the queue if it waits, from the batch (freeing its KV blocks) if it runs.
    pub cancel: Option<Cancel>,
}

/// A request's cancellation flag, shared by the engine and whoever waits for its events.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks the engine to drop the request (idempotent).
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The log-probability of a generated token and the most likely alternatives at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// `(token id, log-probability)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Token counts and timings of a finished request.
#[derive(Clone, Debug, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries came from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// Submission to the first generated token.
    pub time_to_first_token: Duration,
    /// Submission to the end.
    pub total_time: Duration,
}

/// What the engine reports about a request, in order: any number of `Token`s, then exactly
/// one of `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// A generated token and the text it completed (may be empty: text is held back while it
    /// could still be the start of a stop string or of a multi-byte character).
    Token {
        id: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Generation ended; `text` is the held-back tail, if any.
    Done {
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
    Failed(EngineError),
}

/// What the engine is doing, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests waiting for admission.
    pub waiting: usize,
    /// Sequences admitted (prefilling or decoding).
    pub running: usize,
    pub kv_blocks_total: usize,
    /// Blocks held by admitted sequences.
    pub kv_blocks_used: usize,
    /// Blocks kept only by the prefix cache (reused by prompts that start alike, evicted
    /// when memory is needed).
    pub kv_blocks_cached: usize,
    pub kv_blocks_free: usize,
    /// Steps run since start.
    pub steps: u64,
}

/// Receives a request's events; returning false means nobody listens any more, and the
/// request is cancelled (its blocks are freed before the next step).
pub type EventSink = Box<dyn FnMut(Event) -> bool + Send>;

/// Submits requests to a running [`Engine`]; cheap to clone and shareable across threads.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Submission>,
    shared: Arc<Shared>,
}

/// What handles and the engine share.
struct Shared {
    config: EngineConfig,
    stats: Mutex<EngineStats>,
    accepting: AtomicBool,
    /// The model without overlay (overlays are checked against it).
    model: Model,
    /// The overlay requests are admitted under from now on.
    overlay: RwLock<Option<Arc<FfnOverlay>>>,
}

struct Submission {
    request: Request,
    sink: EventSink,
    submitted: Instant,
}

impl EngineHandle {
    /// Queues `request`; its events go to `sink`. Fails at once (without calling `sink`) on a
    /// request that can never run: an empty prompt, `max_tokens` of 0, bad sampling
    /// parameters, a prompt that does not fit the context, or an engine shutting down.
    pub fn submit(&self, request: Request, sink: EventSink) -> Result<(), EngineError> {
        let context = self.shared.config.context;
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if request.prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                tokens: request.prompt.len(),
                context,
            });
        }
        if request.options.max_tokens == 0 {
            return Err(EngineError::InvalidArgument {
                name: "max_tokens",
                reason: "must be at least 1".into(),
            });
        }
        request.options.sampling.validate()?;
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        self.commands
            .send(Submission {
                request,
                sink,
                submitted: Instant::now(),
            })
            .map_err(|_| EngineError::ShuttingDown)
    }

    /// A snapshot of the queue and the cache (as of the last step).
    pub fn stats(&self) -> EngineStats {
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops accepting requests; those already submitted run to the end, then
    /// [`Engine::run`] returns once every handle is dropped.
    pub fn shutdown(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Makes `overlay` (`None`: the base weights) the one requests admitted from now on run
    /// under, and returns the one it replaces. Sequences already running keep theirs to the
    /// end; requests still waiting get the new one. Fails, changing nothing, when the overlay
    /// does not fit the model.
    pub fn set_overlay(
        &self,
        overlay: Option<Arc<FfnOverlay>>,
    ) -> Result<Option<Arc<FfnOverlay>>, EngineError> {
        if let Some(o) = &overlay {
            self.shared.model.check_overlay(o)?;
        }
        let mut current = self
            .shared
            .overlay
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(std::mem::replace(&mut *current, overlay))
    }

    /// The overlay requests are admitted under now.
    pub fn overlay(&self) -> Option<Arc<FfnOverlay>> {
        self.shared.current_overlay()
    }
}

impl Shared {
    fn current_overlay(&self) -> Option<Arc<FfnOverlay>> {
        self.overlay
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// An admitted request.
struct Sequence<'t> {
    submission: Submission,
    cache: PagedSequence,
    /// Prompt and generated tokens; the ones at `cache.len()..` are still to be evaluated.
    tokens: Vec<u32>,
    prompt_len: usize,
    cached_tokens: usize,
    continuation: Continuation<'t>,
    first_token: Option<Instant>,
    /// The deltas the sequence runs under, fixed at admission.
    overlay: Option<Arc<FfnOverlay>>,
}

impl Sequence<'_> {
    fn pending(&self) -> &[u32] {
        &self.tokens[self.cache.len()..]
    }
}

/// The scheduler and the state of every sequence; see the module docs.
pub struct Engine<'m> {
    /// Without overlay: every sequence names its own.
    model: Model,
    tokenizer: &'m Tokenizer,
    shared: Arc<Shared>,
    commands: Receiver<Submission>,
    pool: BlockPool,
    waiting: VecDeque<Submission>,
    running: Vec<Sequence<'m>>,
    steps: u64,
}

impl<'m> Engine<'m> {
    /// An engine over `model` and a handle to feed it; the model's overlay, if any, is the
    /// current one to begin with ([`EngineHandle::set_overlay`]). Fails when `config` is
    /// inconsistent (a zero limit, or a memory bound that does not hold one full context).
    pub fn new(
        model: Model,
        tokenizer: &'m Tokenizer,
        mut config: EngineConfig,
    ) -> Result<(Engine<'m>, EngineHandle), EngineError> {
        let invalid = |name, reason: String| Err(EngineError::InvalidArgument { name, reason });
        for (name, value) in [
            ("parallel", config.parallel),
            ("context", config.context),
            ("block_size", config.block_size),
            ("step_tokens", config.step_tokens),
        ] {
            if value == 0 {
                return invalid(name, "must be at least 1".into());
            }
        }
        let cfg = model.config();
        let shape = BlockShape {
            n_layers: cfg.n_layers,
            kv_dim: cfg.kv_dim(),
            block_size: config.block_size,
        };
        // Beyond the model's own context, positions have no meaning; the limit is cut once here.
        config.context = config.context.min(cfg.context_length);
        let context = config.context;
        let blocks = config.kv_bytes / shape.bytes();
        if blocks < shape.blocks_for(context) {
            return invalid(
                "kv_bytes",
                format!(
                    "{} MiB hold {blocks} blocks of {} positions, but one sequence of the \
                     {context}-token context needs {} ({} MiB); raise the KV memory or lower \
                     the context",
                    config.kv_bytes >> 20,
                    config.block_size,
                    shape.blocks_for(context),
                    (shape.blocks_for(context) * shape.bytes()).div_ceil(1 << 20),
                ),
            );
        }
        let (commands, receiver) = mpsc::channel();
        let overlay = model.overlay().cloned();
        let model = model
            .with_overlay(None)
            .expect("the base weights need no check");
        let shared = Arc::new(Shared {
            config,
            stats: Mutex::new(EngineStats::default()),
            accepting: AtomicBool::new(true),
            model: model.clone(),
            overlay: RwLock::new(overlay),
        });
        let pool = match model.device_kv_pool(shape.block_size, blocks) {
            Ok(Some(device)) => BlockPool::on_device(shape, device),
            Ok(None) => BlockPool::new(shape, blocks),
            Err(e) => return invalid("kv_bytes", e.to_string()),
        };
        let engine = Engine {
            model,
            tokenizer,
            shared: Arc::clone(&shared),
            commands: receiver,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            steps: 0,
        };
        engine.publish_stats();
        Ok((engine, EngineHandle { commands, shared }))
    }

    /// Runs steps until every handle is dropped (or [`EngineHandle::shutdown`] was called)
    /// and no request is left.
    pub fn run(mut self) {
        loop {
            let idle = self.waiting.is_empty() && self.running.is_empty();
            if !self.receive(idle) {
                break;
            }
            self.expire();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish_stats();
        }
    }

    /// Takes new submissions; blocks while idle. False when no handle is left and nothing
    /// remains to do.
    fn receive(&mut self, idle: bool) -> bool {
        if idle {
            match self.commands.recv() {
                Ok(submission) => self.waiting.push_back(submission),
                Err(_) => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(submission) => self.waiting.push_back(submission),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => {
                    return !(self.waiting.is_empty() && self.running.is_empty())
                }
            }
        }
    }

    /// Fails requests that waited too long or passed their deadline, and drops requests that
    /// were cancelled (waiting or running).
    fn expire(&mut self) {
        let now = Instant::now();
        let timeout = self.shared.config.queue_timeout;
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for mut s in self.waiting.drain(..) {
            if s.request.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
                // Nobody listens: no event.
            } else if s.request.deadline.is_some_and(|d| now >= d) {
                (s.sink)(Event::Failed(EngineError::Timeout));
            } else if now.duration_since(s.submitted) >= timeout {
                (s.sink)(Event::Failed(EngineError::Overloaded {
                    waited: now.duration_since(s.submitted),
                }));
            } else {
                kept.push_back(s);
            }
        }
        self.waiting = kept;
        let mut i = 0;
        while i < self.running.len() {
            let seq = &mut self.running[i];
            if seq
                .submission
                .request
                .cancel
                .as_ref()
                .is_some_and(Cancel::is_cancelled)
            {
                self.finish(i);
            } else if seq.submission.request.deadline.is_some_and(|d| now >= d) {
                (seq.submission.sink)(Event::Failed(EngineError::Timeout));
                self.finish(i);
            } else {
                i += 1;
            }
        }
    }

    /// Admits waiting requests in order while slots and KV blocks allow.
    fn admit(&mut self) {
        let context = self.shared.config.context;
        while self.running.len() < self.shared.config.parallel {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let request = &front.request;
            let limit = request.prompt.len() + request.options.max_tokens;
            // Read once: the sequence keeps this overlay however often it is swapped.
            let overlay = self.shared.current_overlay();
            let weights = overlay.as_deref().map_or(0, FfnOverlay::version);
            let Some(cache) = self.pool.admit(&request.prompt, limit, context, weights) else {
                break;
            };
            let submission = self.waiting.pop_front().expect("front exists");
            let continuation = match Continuation::new(self.tokenizer, &submission.request.options)
            {
                Ok(c) => c,
                Err(e) => {
                    let mut submission = submission;
                    (submission.sink)(Event::Failed(e));
                    self.pool.release(cache);
                    continue;
                }
            };
            self.running.push(Sequence {
                cached_tokens: cache.len(),
                cache,
                tokens: submission.request.prompt.clone(),
                prompt_len: submission.request.prompt.len(),
                continuation,
                first_token: None,
                submission,
                overlay,
            });
        }
    }

    /// One forward pass over every running sequence (see the module docs), then sampling.
    fn step(&mut self) {
        self.steps += 1;
        // Decode tokens first, then prompt chunks in admission order, within the budget.
        let mut budget = self.shared.config.step_tokens;
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].pending().len() > 1);
        let mut take = vec![0usize; self.running.len()];
        for &i in &order {
            let n = self.running[i].pending().len().min(budget);
            take[i] = n;
            budget -= n;
        }
        // Single-token sequences lead the batch: the model computes them as decode steps.
        order.retain(|&i| take[i] > 0);
        order.sort_by_key(|&i| take[i] > 1);
        let mut sampled = Vec::new();
        let mut batch = Vec::with_capacity(order.len());
        let mut slots: Vec<Option<&mut Sequence<'m>>> = self.running.iter_mut().map(Some).collect();
        for &i in &order {
            let seq = slots[i].take().expect("each sequence appears once");
            let (start, n) = (seq.cache.len(), take[i]);
            self.pool.grow(&mut seq.cache, start + n);
            // Only a chunk that completes the pending tokens yields the next token's logits.
            let completes = start + n == seq.tokens.len();
            if completes {
                sampled.push(i);
            }
            batch.push(SequenceBatch {
                tokens: &seq.tokens[start..start + n],
                cache: &mut seq.cache,
                rows: if completes { n - 1..n } else { n..n },
                overlay: seq.overlay.as_deref(),
            });
        }
        let result = self.model.forward_batch(&mut batch);
        drop(batch);
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => {
                // A model error is not the fault of one request: fail them all.
                let message = e.to_string();
                for seq in &mut self.running {
                    (seq.submission.sink)(Event::Failed(EngineError::Batch(message.clone())));
                }
                while !self.running.is_empty() {
                    self.finish(0);
                }
                return;
            }
        };
        for &i in &order {
            let seq = &mut self.running[i];
            self.pool.register_full_blocks(&mut seq.cache, &seq.tokens);
        }
        let vocab = self.model.config().vocab_size;
        let mut ended = Vec::new();
        for (&i, row) in sampled.iter().zip(logits.chunks_exact(vocab)) {
            if !self.sample(i, row) {
                ended.push(i);
            }
        }
        ended.sort_unstable();
        for &i in ended.iter().rev() {
            self.finish(i);
        }
    }

    /// Samples sequence `i`'s next token from `logits` and reports it; false when the
    /// sequence has ended (finished, or its client is gone).
    fn sample(&mut self, i: usize, logits: &[f32]) -> bool {
        let context = self.shared.config.context;
        let seq = &mut self.running[i];
        let step = seq.continuation.next(logits, &seq.tokens, context);
        seq.tokens.push(step.token);
        let now = Instant::now();
        seq.first_token.get_or_insert(now);
        let logprob = seq
            .submission
            .request
            .logprobs
            .map(|k| token_logprob(logits, step.token, k));
        let listening = (seq.submission.sink)(Event::Token {
            id: step.token,
            text: step.text,
            logprob,
        });
        let Some(reason) = step.finish else {
            return listening;
        };
        let text = seq.continuation.finish();
        let submitted = seq.submission.submitted;
        let usage = Usage {
            prompt_tokens: seq.prompt_len,
            cached_tokens: seq.cached_tokens,
            completion_tokens: seq.continuation.tokens().len(),
            time_to_first_token: seq.first_token.unwrap_or(now) - submitted,
            total_time: now - submitted,
        };
        (seq.submission.sink)(Event::Done {
            reason,
            text,
            usage,
        });
        false
    }

    /// Removes running sequence `i` and returns its blocks.
    fn finish(&mut self, i: usize) {
        let seq = self.running.remove(i);
        self.pool.release(seq.cache);
    }

    fn publish_stats(&self) {
        let counts = self.pool.counts();
        let stats = EngineStats {
            waiting: self.waiting.len(),
            running: self.running.len(),
            kv_blocks_total: counts.total,
            kv_blocks_used: counts.used,
            kv_blocks_cached: counts.cached,
            kv_blocks_free: counts.free,
            steps: self.steps,
        };
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stats;
    }
}

/// Log-probability of `token` and the `k` most likely tokens under the softmax of `logits`
/// (ties to the lower id).
fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let k = k.min(ids.len());
    if k > 0 && k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_logit);
    }
    ids.truncate(k);
    ids.sort_by(by_logit);
    TokenLogprob {
        logprob: logits[token as usize] - log_z,
        top: ids
            .into_iter()
            .map(|id| (id, logits[id as usize] - log_z))
            .collect(),
    }
}
