//! Perplexity on the golden text at ctx 512 must be within 1% of llama.cpp's figure
//! (`models.<m>.perplexity_ctx512["gcc12-noAMX"].ppl` in `fixtures/goldens/llamacpp.json`:
//! llama-perplexity -c 512 -t 2, same text, same chunking).

use std::sync::Arc;

use quarry_engine::perplexity::perplexity;
use quarry_fixtures::{model_goldens, model_path, perplexity_text, TestModel};
use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_tokenize::Tokenizer;

fn check(model: TestModel) {
    let m = Model::load(Arc::new(GgufFile::open(model_path(model)).unwrap())).unwrap();
    let tok = Tokenizer::from_gguf(m.file()).unwrap();
    let tokens = tok.encode(&perplexity_text(), true, true);
    let bos = tok.bos_id().filter(|_| tok.add_bos());
    let golden = &model_goldens(model)["perplexity_ctx512"]["gcc12-noAMX"];
    let expected = golden["ppl"].as_f64().unwrap();
    let chunks = golden["n_chunks"].as_u64().unwrap() as usize;
    let report = perplexity(&m, &tokens, 512, bos, |_, _, _| {}).unwrap();
    let rel = (report.ppl - expected).abs() / expected;
    eprintln!(
        "{model:?}: PPL {:.4} vs llama.cpp {expected} ({:+.3}%), {} chunks, {} scored",
        report.ppl,
        100.0 * (report.ppl - expected) / expected,
        report.chunks,
        report.scored_tokens
    );
    assert_eq!(report.chunks, chunks, "same chunking as llama-perplexity");
    assert_eq!(report.scored_tokens, chunks * 255);
    assert!(
        rel < 0.01,
        "{model:?}: PPL {} is more than 1% from llama.cpp's {expected}",
        report.ppl
    );
}

#[test]
fn gemma3_perplexity_matches_llamacpp() {
    check(TestModel::Gemma3);
}

#[test]
fn smollm2_perplexity_matches_llamacpp() {
    check(TestModel::SmolLm2);
}
