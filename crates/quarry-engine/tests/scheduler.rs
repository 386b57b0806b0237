//! The batching engine on SmolLM2-135M: concurrent requests give what a lone session gives,
//! prompts share cached blocks, hung-up clients free their blocks, and a full cache makes
//! requests wait or fail with a clear error instead of running out of memory; a sequence keeps
//! the FFN overlay it was admitted under, and the prefix cache never crosses overlays.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use quarry_engine::{
    Cancel, Engine, EngineConfig, EngineError, EngineHandle, EngineStats, Event, FinishReason,
    GenerateOptions, Request, SamplingParams, Session, Usage,
};
use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_model::{FfnOverlay, LowRank, Model, KV_BYTES_PER_VALUE};
use quarry_tokenize::Tokenizer;

fn smollm2() -> Model {
    Model::load(Arc::new(
        GgufFile::open(model_path(TestModel::SmolLm2)).unwrap(),
    ))
    .unwrap()
}

fn config() -> EngineConfig {
    EngineConfig {
        parallel: 3,
        context: 512,
        kv_bytes: 256 << 20,
        block_size: 64,
        step_tokens: 512,
        queue_timeout: Duration::from_secs(120),
    }
}

fn options(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        stop_at_eog: true,
    }
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        options: options(max_tokens),
        logprobs: None,
        deadline: None,
        cancel: None,
    }
}

/// What one request produced.
#[derive(Debug, Default)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    end: Option<Result<(FinishReason, Usage), String>>,
}

/// Runs an engine over SmolLM2 with `config` while `body` submits requests through the
/// handle; returns when the body is done and the engine has drained.
fn with_engine(config: EngineConfig, body: impl FnOnce(&EngineHandle, &Model, &Tokenizer)) {
    let model = smollm2();
    let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
    let (engine, handle) = Engine::new(model.clone(), &tokenizer, config).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || engine.run());
        body(&handle, &model, &tokenizer);
        drop(handle);
    });
}

/// Submits `requests` at once and collects every outcome (in submission order).
fn run_all(handle: &EngineHandle, requests: Vec<Request>) -> Vec<Outcome> {
    let (tx, rx) = mpsc::channel();
    let n = requests.len();
    for (i, r) in requests.into_iter().enumerate() {
        let tx = tx.clone();
        handle
            .submit(r, Box::new(move |event| tx.send((i, event)).is_ok()))
            .unwrap();
    }
    drop(tx);
    let mut outcomes: Vec<Outcome> = (0..n).map(|_| Outcome::default()).collect();
    for (i, event) in rx {
        let o = &mut outcomes[i];
        match event {
            Event::Token { id, text, .. } => {
                o.tokens.push(id);
                o.text.push_str(&text);
            }
            Event::Done {
                reason,
                text,
                usage,
            } => {
                o.text.push_str(&text);
                o.end = Some(Ok((reason, usage)));
            }
            Event::Failed(e) => o.end = Some(Err(e.to_string())),
        }
    }
    outcomes
}

/// Waits (up to 10 s) until the engine's published stats satisfy `condition`; stats are
/// published after each step, a moment after its events.
fn wait_for(handle: &EngineHandle, condition: impl Fn(&EngineStats) -> bool) {
    let t0 = Instant::now();
    while !condition(&handle.stats()) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "stats stay {:?}",
            handle.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn prompts(tokenizer: &Tokenizer) -> Vec<Vec<u32>> {
    [
        // Long enough that prompts admitted together exceed the kernels' small-batch path.
        "In 1492, Columbus sailed the ocean blue. In 1969, the first people walked on the Moon. In",
        "Here is a list of the planets of the solar system, in order from the sun: Mercury,",
        "The capital of France is",
        "Once upon a time, in a small village by the sea,",
        "def fibonacci(n):",
        "List three colours:",
        "Water boils at",
    ]
    .iter()
    .map(|p| tokenizer.encode(p, true, true))
    .collect()
}

#[test]
fn concurrent_greedy_requests_equal_lone_sessions() {
    with_engine(config(), |handle, model, tokenizer| {
        let prompts = prompts(tokenizer);
        let max_tokens = 24;
        let outcomes = run_all(
            handle,
            prompts
                .iter()
                .map(|p| request(p.clone(), max_tokens))
                .collect(),
        );
        for (prompt, outcome) in prompts.iter().zip(&outcomes) {
            let mut session = Session::new(model, tokenizer, 512);
            let expected = session
                .generate(prompt, &options(max_tokens), |_| {})
                .unwrap();
            assert_eq!(outcome.tokens, expected.tokens, "prompt {prompt:?}");
            assert_eq!(outcome.text, expected.text);
            let (reason, usage) = outcome.end.clone().unwrap().unwrap();
            assert_eq!(reason, expected.finish);
            assert_eq!(usage.prompt_tokens, prompt.len());
            assert_eq!(usage.completion_tokens, expected.tokens.len());
            assert!(usage.time_to_first_token <= usage.total_time);
        }
        wait_for(handle, |s| {
            (s.running, s.waiting, s.kv_blocks_used) == (0, 0, 0)
        });
    });
}

#[test]
fn chunked_prompts_and_logprobs() {
    // Prompts evaluated 5 tokens per step beside running decodes; the greedy token is the
    // most likely one, and its log-probability heads the list of alternatives.
    let config = EngineConfig {
        step_tokens: 5,
        ..config()
    };
    with_engine(config, |handle, model, tokenizer| {
        let prompts = prompts(tokenizer);
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                logprobs: Some(3),
                ..request(p.clone(), 6)
            })
            .collect();
        let (tx, rx) = mpsc::channel();
        for (i, r) in std::iter::zip(0.., requests) {
            let tx = tx.clone();
            let sink = move |e| tx.send((i, e)).is_ok();
            handle.submit(r, Box::new(sink)).unwrap();
        }
        drop(tx);
        let mut firsts = vec![None; prompts.len()];
        for (i, event) in rx {
            if let Event::Token { id, logprob, .. } = event {
                let lp = logprob.unwrap();
                assert_eq!(lp.top.len(), 3);
                assert_eq!(lp.top[0], (id, lp.logprob), "greedy picks the top token");
                assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
                assert!(lp.logprob <= 0.0);
                firsts[i].get_or_insert(id);
            }
        }
        for (prompt, first) in prompts.iter().zip(firsts) {
            let mut session = Session::new(model, tokenizer, 512);
            let expected = session.generate(prompt, &options(1), |_| {}).unwrap();
            assert_eq!(first, Some(expected.tokens[0]), "prompt {prompt:?}");
        }
    });
}

#[test]
fn a_long_prompt_shares_its_cached_blocks() {
    with_engine(config(), |handle, _, tokenizer| {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let prompt = tokenizer.encode(&text, true, true);
        assert!(prompt.len() > 129, "{} tokens", prompt.len());
        let first = run_all(handle, vec![request(prompt.clone(), 4)]);
        let (_, usage) = first[0].end.clone().unwrap().unwrap();
        assert_eq!(usage.cached_tokens, 0);
        wait_for(handle, |s| s.kv_blocks_cached >= 2);
        let second = run_all(handle, vec![request(prompt.clone(), 4)]);
        let (_, usage) = second[0].end.clone().unwrap().unwrap();
        // Every full block before the last prompt token is reused.
        assert_eq!(usage.cached_tokens, (prompt.len() - 1) / 64 * 64);
    });
}

#[test]
fn a_prompt_agreeing_with_part_of_a_cached_block_reuses_those_tokens() {
    with_engine(config(), |handle, model, tokenizer| {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        let prompt = tokenizer.encode(&text, true, true);
        run_all(handle, vec![request(prompt.clone(), 4)]);
        wait_for(handle, |s| s.kv_blocks_cached >= 2);
        // The same first 100 tokens (one whole block and 36 positions of the next), then
        // another ending.
        let mut other = prompt[..100].to_vec();
        other.extend(tokenizer.encode(" Then the cat sat on the mat, and", false, true));
        let outcome = run_all(handle, vec![request(other.clone(), 24)]);
        let (_, usage) = outcome[0].end.clone().unwrap().unwrap();
        assert_eq!(usage.cached_tokens, 100);
        let mut session = Session::new(model, tokenizer, 512);
        let expected = session.generate(&other, &options(24), |_| {}).unwrap();
        assert_eq!(outcome[0].tokens, expected.tokens);
        // Its generated tokens filled its second block, which is now cached too: the same
        // prompt again reuses all but its last token.
        wait_for(handle, |s| s.kv_blocks_cached >= 3);
        let again = run_all(handle, vec![request(other.clone(), 24)]);
        let (_, usage) = again[0].end.clone().unwrap().unwrap();
        assert_eq!(usage.cached_tokens, other.len() - 1);
        assert_eq!(again[0].tokens, expected.tokens);
    });
}

#[test]
fn a_client_that_hangs_up_frees_its_blocks() {
    with_engine(config(), |handle, _, tokenizer| {
        let prompt = tokenizer.encode("Once upon a time, there was a dragon", true, true);
        let mut long = request(prompt, 400);
        long.options.stop_at_eog = false;
        let (tx, rx) = mpsc::channel();
        let mut seen = 0;
        let sink = move |event| {
            seen += 1;
            tx.send(event).is_ok() && seen < 3
        };
        handle.submit(long, Box::new(sink)).unwrap();
        let events: Vec<Event> = rx.iter().collect();
        // The third token was the last: nothing more was sent once the sink refused.
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events.iter().all(|e| matches!(e, Event::Token { .. })));
        wait_for(handle, |s| s.running == 0 && s.kv_blocks_used == 0);
    });
}

#[test]
fn a_cancelled_request_stops_mid_prefill_and_leaves_the_queue() {
    // Steps of 32 tokens: a 400-token prompt takes 13 steps to prefill; one slot, so a
    // second request waits in the queue behind it.
    let slow = EngineConfig {
        parallel: 1,
        step_tokens: 32,
        ..config()
    };
    with_engine(slow, |handle, _, tokenizer| {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(40);
        let prompt = tokenizer.encode(&text, true, true);
        assert!(prompt.len() > 350, "{}", prompt.len());
        let (tx, rx) = mpsc::channel();
        let (first, queued) = (Cancel::new(), Cancel::new());
        for (i, cancel) in [(0, &first), (1, &queued)] {
            let tx = tx.clone();
            let mut r = request(prompt.clone(), 50);
            r.cancel = Some(cancel.clone());
            handle
                .submit(r, Box::new(move |event| tx.send((i, event)).is_ok()))
                .unwrap();
        }
        drop(tx);
        wait_for(handle, |s| s.running == 1 && s.waiting == 1 && s.steps >= 2);
        let steps = handle.stats().steps;
        first.cancel();
        queued.cancel();
        wait_for(handle, |s| {
            s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0
        });
        // Dropped within a step or two of the cancel, long before the prompt was evaluated.
        assert!(handle.stats().steps <= steps + 2, "{:?}", handle.stats());
        // Neither request produced any event: both were dropped, not answered.
        let events: Vec<(usize, Event)> = rx.iter().collect();
        assert!(events.is_empty(), "{events:?}");
    });
}

#[test]
fn a_full_cache_makes_requests_wait_then_fail_after_the_queue_timeout() {
    // Room for one 128-token context: the second request waits for the first's blocks.
    let tight = EngineConfig {
        context: 128,
        kv_bytes: 2 * 30 * 2 * 64 * 192 * KV_BYTES_PER_VALUE,
        queue_timeout: Duration::from_millis(300),
        ..config()
    };
    with_engine(tight, |handle, _, tokenizer| {
        let prompt = tokenizer.encode("Once upon a time", true, true);
        let long = request(prompt.clone(), 120);
        let short = request(prompt.clone(), 2);
        let outcomes = run_all(handle, vec![long, short]);
        assert!(outcomes[0].end.clone().unwrap().is_ok());
        let error = outcomes[1].end.clone().unwrap().unwrap_err();
        assert!(error.contains("busy"), "{error}");
        wait_for(handle, |s| s.kv_blocks_used == 0);
    });
    // With a longer queue timeout the second simply runs after the first.
    let patient = EngineConfig {
        context: 128,
        kv_bytes: 2 * 30 * 2 * 64 * 192 * KV_BYTES_PER_VALUE,
        ..config()
    };
    with_engine(patient, |handle, _, tokenizer| {
        let prompt = tokenizer.encode("Once upon a time", true, true);
        let outcomes = run_all(
            handle,
            vec![request(prompt.clone(), 60), request(prompt.clone(), 60)],
        );
        for o in outcomes {
            assert!(o.end.unwrap().is_ok());
        }
    });
}

#[test]
fn bad_requests_and_configurations_are_refused_by_name() {
    let model = smollm2();
    let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
    let small = EngineConfig {
        kv_bytes: 1 << 20,
        ..config()
    };
    let Err(error) = Engine::new(model.clone(), &tokenizer, small) else {
        panic!("1 MiB of KV memory cannot hold a 512-token context");
    };
    assert!(error.to_string().contains("kv_bytes"), "{error}");

    let (_engine, handle) = Engine::new(model.clone(), &tokenizer, config()).unwrap();
    let refuse = |r: Request| handle.submit(r, Box::new(|_| true)).unwrap_err();
    assert!(matches!(
        refuse(request(vec![], 4)),
        EngineError::EmptyPrompt
    ));
    assert!(matches!(
        refuse(request(vec![1; 600], 4)),
        EngineError::PromptTooLong { tokens: 600, .. }
    ));
    assert!(refuse(request(vec![1], 0))
        .to_string()
        .contains("max_tokens"));
    let mut hot = request(vec![1], 4);
    hot.options.sampling.temperature = -1.0;
    assert!(refuse(hot).to_string().contains("temperature"));
    handle.shutdown();
    assert!(matches!(
        refuse(request(vec![1], 4)),
        EngineError::ShuttingDown
    ));
}

#[test]
fn a_request_past_its_deadline_fails_with_a_timeout() {
    with_engine(config(), |handle, _, tokenizer| {
        let prompt = tokenizer.encode("Count to one thousand:", true, true);
        let mut r = request(prompt, 400);
        r.deadline = Some(Instant::now() + Duration::from_millis(200));
        let outcome = run_all(handle, vec![r]).pop().unwrap();
        let error = outcome.end.unwrap().unwrap_err();
        assert!(error.contains("deadline"), "{error}");
        assert!(outcome.tokens.len() < 400);
    });
}

/// Rank-4 deltas on the down projections of layers 6..24, pseudo-random in ±`scale` (another
/// draw per `seed`). At scale 0.2, seeds 2 and 3 change the greedy continuation of the prompt
/// below while every step's top-1 logit stays ≥ 0.48 above the runner-up, so the rounding
/// differences between batched, cached and lone evaluation cannot flip a token.
fn overlay(model: &Model, seed: u64, scale: f32) -> Arc<FfnOverlay> {
    let c = model.config();
    let (d, ff, rank) = (c.d_model, c.ff_dim, 4);
    let mut state = seed;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
            })
            .collect()
    };
    let deltas: Vec<_> = (6..24)
        .map(|layer| {
            let a = values(rank * ff);
            let b = values(d * rank);
            (layer, LowRank::new(d, ff, rank, a, b).unwrap())
        })
        .collect();
    Arc::new(FfnOverlay::new(c.n_layers, deltas))
}

#[test]
fn a_sequence_keeps_the_overlay_it_was_admitted_under() {
    with_engine(config(), |handle, model, tokenizer| {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(8);
        let prompt = tokenizer.encode(&text, true, true);
        assert!(prompt.len() > 65, "{} tokens: one full block", prompt.len());
        let (x, y) = (overlay(model, 2, 0.2), overlay(model, 3, 0.2));
        let mut long = request(prompt.clone(), 12);
        long.options.stop_at_eog = false;
        let alone = |overlay: Option<&Arc<FfnOverlay>>| {
            let m = model.with_overlay(overlay.cloned()).unwrap();
            let mut session = Session::new(&m, tokenizer, 512);
            session
                .generate(&prompt, &long.options, |_| {})
                .unwrap()
                .tokens
        };
        let (base, under_x, under_y) = (alone(None), alone(Some(&x)), alone(Some(&y)));
        assert_ne!(under_x, base, "the overlay changes the greedy continuation");
        assert_ne!(under_x, under_y);

        // A starts under X; once it is generating, Y becomes current and B is submitted.
        assert!(handle.set_overlay(Some(Arc::clone(&x))).unwrap().is_none());
        let (tx, rx) = mpsc::channel();
        let mut tokens = [vec![], vec![]];
        for (i, r) in [(0, long.clone()), (1, long.clone())] {
            if i == 1 {
                // Wait for A's first token: it is in flight.
                let first = rx.recv().unwrap();
                let (0, Event::Token { id, .. }) = first else {
                    panic!("{first:?}");
                };
                tokens[0].push(id);
                let previous = handle.set_overlay(Some(Arc::clone(&y))).unwrap();
                assert_eq!(previous.unwrap().version(), x.version());
            }
            let tx = tx.clone();
            handle
                .submit(r, Box::new(move |e| tx.send((i, e)).is_ok()))
                .unwrap();
        }
        drop(tx);
        let mut cached = [None, None];
        for (i, event) in rx {
            match event {
                Event::Token { id, .. } => tokens[i].push(id),
                Event::Done { usage, .. } => cached[i] = Some(usage.cached_tokens),
                Event::Failed(e) => panic!("request {i}: {e}"),
            }
        }
        assert_eq!(
            tokens[0], under_x,
            "A finishes on the overlay it started with"
        );
        assert_eq!(
            tokens[1], under_y,
            "B runs on the overlay current at its admission"
        );
        // A's prompt blocks were cached under X before B came: B, under Y, reused none.
        assert_eq!(cached, [Some(0), Some(0)]);

        // The same prompt under Y again reuses the blocks B computed, and gets what B got.
        let again = run_all(handle, vec![long.clone()]).pop().unwrap();
        let (_, usage) = again.end.unwrap().unwrap();
        assert_eq!(usage.cached_tokens, (prompt.len() - 1) / 64 * 64);
        assert_eq!(again.tokens, under_y);
        // Back to the base weights: no reuse of either overlay's blocks.
        handle.set_overlay(None).unwrap();
        let base_run = run_all(handle, vec![long.clone()]).pop().unwrap();
        let (_, usage) = base_run.end.unwrap().unwrap();
        assert_eq!(usage.cached_tokens, 0);
        assert_eq!(base_run.tokens, base);
    });
}

#[test]
fn an_overlay_that_does_not_fit_is_refused_and_changes_nothing() {
    let model = smollm2();
    let tokenizer = Tokenizer::from_gguf(model.file()).unwrap();
    let (_engine, handle) = Engine::new(model.clone(), &tokenizer, config()).unwrap();
    let c = model.config();
    let wrong = LowRank::new(
        c.d_model + 1,
        c.ff_dim,
        1,
        vec![0.0; c.ff_dim],
        vec![0.0; c.d_model + 1],
    );
    let bad = Arc::new(FfnOverlay::new(c.n_layers, [(3, wrong.unwrap())]));
    let error = handle.set_overlay(Some(bad)).unwrap_err().to_string();
    assert!(error.contains("layer 3"), "{error}");
    assert!(handle.overlay().is_none());
    // A model with an overlay starts the engine under it.
    let x = overlay(&model, 2, 0.2);
    let edited = model.with_overlay(Some(Arc::clone(&x))).unwrap();
    let (_engine, handle) = Engine::new(edited, &tokenizer, config()).unwrap();
    assert_eq!(handle.overlay().unwrap().version(), x.version());
}
