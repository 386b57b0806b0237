//! Times one edit's pieces on a real model and prints what the value does to the prompt:
//! `cargo run --release -p quarry-edit --example edit_probe -- MODEL.gguf [LAYER]`.

use std::sync::Arc;
use std::time::Instant;

use quarry_edit::dense::Objective;
use quarry_edit::solve::KeyStats;
use quarry_edit::{EditKind, EditRequest, Editor, Hyper};
use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_tokenize::Tokenizer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = Arc::new(GgufFile::open(&args[1]).unwrap());
    let tokenizer = Tokenizer::from_gguf(&file).unwrap();
    let model = Model::load(file).unwrap();
    let ff = model.config().ff_dim;
    // Statistics that leave every direction free: the gradients do not depend on them.
    let stats = KeyStats {
        eigenvalues: vec![0.0; ff],
        eigenvectors: (0..ff * ff).map(|i| f32::from(i % (ff + 1) == 0)).collect(),
        tokens: 0,
    };
    let mut hyper = Hyper::for_layers(model.config().n_layers);
    if let Some(l) = args.get(2) {
        hyper.layer = l.parse().unwrap();
    }
    let t = Instant::now();
    let ed = Editor::new(model, tokenizer, hyper, &stats).unwrap();
    println!("dense tail: {:?}", t.elapsed());
    let req = EditRequest {
        entity: "France".into(),
        relation: "capital".into(),
        target: "Rome".into(),
        prompt: "The capital of France is".into(),
        kind: EditKind::Insert,
    };
    let t = Instant::now();
    let prepared = ed.probe_data(&req).unwrap();
    println!("probe data: {:?}", t.elapsed());
    let probes = prepared.probes(Objective::Likelihood);
    let d = ed.model().config().d_model;
    let t = Instant::now();
    let (loss, _) = ed.tail().loss_and_grad(&probes, &vec![0.0; d]);
    println!("one loss_and_grad: {:?} (loss {loss})", t.elapsed());
    let t = Instant::now();
    let edit = ed.solve(&req).unwrap();
    let norm = edit.value.iter().map(|v| v * v).sum::<f32>().sqrt();
    println!(
        "solve: {:?} loss {} |delta| {norm} |y| {}",
        t.elapsed(),
        edit.loss,
        prepared.out_norm
    );
}
