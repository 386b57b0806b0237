//! How well a model answers each catalogue relation on its LRE pairs, per template.
//!
//! relation_accuracy MODEL.gguf CATALOGUE.json LRE_DIR [--per-relation 40] [--json OUT]
//!
//! For every relation with an `lre` file, the first N distinct subjects; every template is
//! filled with each subject and answered greedily (readout::answers); a pair counts when the
//! answer gives the object (readout::gives). Prints one line per relation and template.
use std::collections::BTreeMap;
use std::sync::Arc;

use quarry_format::GgufFile;
use quarry_model::Model;
use quarry_relations::readout::{answers, gives};
use quarry_tokenize::Tokenizer;
use serde_json::{json, Value};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let per: usize = flag("--per-relation").map(|v| v.parse()).transpose()?.unwrap_or(40);
    let file = Arc::new(GgufFile::open(&args[1])?);
    let tok = Tokenizer::from_gguf(&file)?;
    let model = Model::load(file)?;
    let catalogue: BTreeMap<String, Value> = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let mut report = serde_json::Map::new();
    for (name, entry) in &catalogue {
        let Some(lre) = entry["lre"].as_str() else { continue };
        let data: Value = serde_json::from_str(&std::fs::read_to_string(format!("{}/{lre}.json", args[3]))?)?;
        let mut seen = std::collections::HashSet::new();
        let pairs: Vec<(String, String)> = data["samples"]
            .as_array()
            .ok_or("samples")?
            .iter()
            .map(|s| (s["subject"].as_str().unwrap_or("").to_string(), unescape(s["object"].as_str().unwrap_or(""))))
            .filter(|(s, _)| seen.insert(s.clone()))
            .take(per)
            .collect();
        let mut per_template = Vec::new();
        for t in entry["templates"].as_array().ok_or("templates")? {
            let t = t.as_str().ok_or("template")?;
            let prompts: Vec<String> = pairs.iter().map(|(s, _)| t.replace("{entity}", s)).collect();
            let start = std::time::Instant::now();
            let mut got = Vec::new();
            for chunk in prompts.chunks(32) {
                got.extend(answers(&model, &tok, chunk, 6)?);
            }
            let secs = start.elapsed().as_secs_f64();
            let right: Vec<bool> = got.iter().zip(&pairs).map(|(a, (_, o))| gives(&a.text, o)).collect();
            let acc = right.iter().filter(|&&r| r).count() as f64 / pairs.len().max(1) as f64;
            println!("{name:>18} {:5.1}% ({:4.2}s) {t:?}  e.g. {:?}→{:?}", acc * 100.0, secs, pairs[0].0, got[0].text);
            per_template.push(json!({"template": t, "accuracy": acc,
                "answers": got.iter().zip(&pairs).map(|(a, (s, o))| json!([s, o, a.text, a.probability])).collect::<Vec<_>>()}));
        }
        report.insert(name.clone(), json!({"pairs": pairs.len(), "templates": per_template}));
    }
    if let Some(out) = flag("--json") {
        std::fs::write(out, serde_json::to_string_pretty(&Value::Object(report))?)?;
    }
    Ok(())
}

/// LRE writes a few objects with their escapes doubled ("Bras\\u00edlia").
fn unescape(s: &str) -> String {
    if !s.contains("\\u") {
        return s.to_string();
    }
    serde_json::from_str(&format!("\"{s}\"")).unwrap_or_else(|_| s.to_string())
}
