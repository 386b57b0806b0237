//! A router over a real engine on SmolLM2, for the server's tests.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use quarry_engine::{Engine, EngineConfig};
use quarry_fixtures::{model_path, TestModel};
use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_server::{router, ServedVindex, ServerConfig};
use quarry_tokenize::{ChatTemplate, Tokenizer};

/// The application over a fresh engine with `config` (the tokenizer and template are leaked,
/// as `quarry serve` does; the engine thread, which owns the model, ends when the router is
/// dropped).
#[allow(dead_code)] // not every test binary uses both
pub fn smollm2_app(
    config: EngineConfig,
    api_key: Option<&str>,
    vindex: Option<ServedVindex>,
) -> Router {
    smollm2_app_with(config, api_key, vindex, Duration::from_secs(60))
}

/// [`smollm2_app`] whose requests (and knowledge statements) time out after `timeout`.
pub fn smollm2_app_with(
    config: EngineConfig,
    api_key: Option<&str>,
    vindex: Option<ServedVindex>,
    timeout: Duration,
) -> Router {
    let queue_timeout = config.queue_timeout;
    let model = Model::load(Arc::new(
        GgufFile::open(model_path(TestModel::SmolLm2)).unwrap(),
    ))
    .unwrap();
    let tokenizer: &'static Tokenizer =
        Box::leak(Box::new(Tokenizer::from_gguf(model.file()).unwrap()));
    let template: &'static ChatTemplate = Box::leak(Box::new(
        ChatTemplate::from_gguf(model.file(), tokenizer).unwrap(),
    ));
    let (engine, handle) = Engine::new(model, tokenizer, config).unwrap();
    std::thread::spawn(move || engine.run());
    router(
        handle,
        tokenizer,
        template,
        ServerConfig {
            model_id: "smollm2".into(),
            api_key: api_key.map(str::to_string),
            request_timeout: timeout,
            queue_timeout,
            body_read_timeout: Duration::from_secs(2),
            vindex,
        },
    )
}
