//! Which facts of the LRE pairs a model knows, and how well each catalogue template asks.
//!
//! relation_facts MODEL.gguf [--per-relation 60] [--json OUT]
//!
//! For every catalogue relation with pairs (from LRE), its first N pairs; every template is
//! filled with each subject and answered greedily (accuracy::ask). A pair is a fact the model
//! knows when some template's answer gives the object (readout::gives). Prints
//! each template's accuracy; the JSON has them and the known facts (scripts/build-fact-set).
use std::sync::Arc;

use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_relations::accuracy::ask;
use quarry_relations::catalogue;
use quarry_tokenize::Tokenizer;
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        return Err("usage: relation_facts MODEL.gguf [--per-relation N] [--json OUT]".into());
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let per: usize = flag("--per-relation")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(60);
    let file = Arc::new(GgufFile::open(&args[1])?);
    let tok = Tokenizer::from_gguf(&file)?;
    let model = Model::load(file)?;
    let mut report = serde_json::Map::new();
    for relation in catalogue::all().filter(|r| !r.pairs.is_empty()) {
        let pairs = &relation.pairs[..relation.pairs.len().min(per)];
        let mut accuracy = Vec::new();
        let mut known: Vec<Vec<usize>> = vec![Vec::new(); pairs.len()];
        let mut said: Vec<Vec<String>> = vec![Vec::new(); pairs.len()];
        for (t, template) in relation.templates.iter().enumerate() {
            let got = ask(&model, &tok, template, pairs)?;
            let mut right = 0;
            for (i, (a, gives)) in got.into_iter().enumerate() {
                said[i].push(a.text);
                if gives {
                    right += 1;
                    known[i].push(t);
                }
            }
            let acc = right as f64 / pairs.len().max(1) as f64;
            println!("{:>18} {:5.1}% {template:?}", relation.name, acc * 100.0);
            accuracy.push(json!({"template": template, "accuracy": acc}));
        }
        let facts: Vec<Value> = pairs
            .iter()
            .zip(&known)
            .zip(&said)
            .filter(|((_, k), _)| !k.is_empty())
            .map(|(((s, o), k), a)| json!({"entity": s, "target": o, "templates": k, "answers": a}))
            .collect();
        println!(
            "{:>18} {} of {} pairs known",
            relation.name,
            facts.len(),
            pairs.len()
        );
        report.insert(
            relation.name.to_string(),
            json!({"pairs": pairs.len(), "templates": accuracy, "facts": facts}),
        );
    }
    if let Some(out) = flag("--json") {
        std::fs::write(out, serde_json::to_string_pretty(&Value::Object(report))?)?;
    }
    Ok(())
}
