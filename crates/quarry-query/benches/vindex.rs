//! Latency of the knowledge queries: opening a vindex, one layer's gate KNN (every feature's
//! gate score for an entity, then the top 20), and DESCRIBE over the knowledge band, its RAW
//! variant and WALK. The vindex is `QUARRY_BENCH_VINDEX` if set (e.g. an extracted Gemma 3),
//! otherwise SmolLM2 extracted at browse level into a temporary directory first (~25 s).
//! Then DESCRIBE's default method, which asks the model, on Gemma 3 270M's model file (issue
//! 16's bound: at most 1 s with 2 threads), after one DESCRIBE has made the session's
//! baseline.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use quarry_fixtures::{model_path, TestModel};
use quarry_query::Executor;
use quarry_vindex::{extract, ExtractOptions, Vindex};

fn vindex_dir() -> (Option<tempfile::TempDir>, PathBuf) {
    if let Some(dir) = std::env::var_os("QUARRY_BENCH_VINDEX") {
        return (None, PathBuf::from(dir));
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2.vindex");
    extract(
        &model_path(TestModel::SmolLm2),
        &out,
        &ExtractOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    (Some(tmp), out)
}

fn knowledge(c: &mut Criterion) {
    let (_keep, dir) = vindex_dir();
    c.bench_function("vindex_open", |b| b.iter(|| Vindex::open(&dir).unwrap()));

    let v = Vindex::open(&dir).unwrap();
    let layer = v.index().bands.knowledge[0];
    let id = v.tokenizer().encode(" France", false, false)[0];
    let x = v.embedding(id);
    c.bench_function("gate_knn_one_layer_top20", |b| {
        b.iter(|| {
            let scores = v.gate_scores(layer, &x);
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.select_nth_unstable_by(19, |&a, &b| scores[b].total_cmp(&scores[a]));
            order.truncate(20);
            order
        })
    });

    let mut exec = Executor::with_vindex(&dir).unwrap();
    for (name, query) in [
        ("describe_knowledge_band", "DESCRIBE \"France\""),
        ("describe_raw", "DESCRIBE \"France\" RAW"),
        (
            "walk_all_layers_top5",
            "WALK \"The capital of France\" TOP 5",
        ),
    ] {
        let statements = quarry_lql::parse(query).unwrap();
        c.bench_function(name, |b| b.iter(|| exec.execute(&statements[0]).unwrap()));
    }

    let mut asks = Executor::new();
    let gemma = model_path(TestModel::Gemma3);
    asks.run_script(&format!(
        "USE {:?}; DESCRIBE \"Peru\"",
        gemma.to_str().unwrap()
    ))
    .unwrap();
    let statements = quarry_lql::parse("DESCRIBE \"France\"").unwrap();
    c.bench_function("describe_answers_gemma3", |b| {
        b.iter(|| asks.execute(&statements[0]).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = knowledge
}
criterion_main!(benches);
