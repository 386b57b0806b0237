//! The edit evaluation behind `scripts/edit-eval` (docs/editing.md):
//!
//! ```text
//! edit_eval MODEL.gguf SET.json [--sizes 1,10,100] [--sequential 10] [--layer L]
//!           [--spread N] [--null-space X] [--ridge X] [--steps N] [--lr X] [--clamp X] [--weight-decay X]
//!           [--stop-loss X] [--decoys N] [--decoy-weight X] [--preserve-weight X]
//!           [--method compose]
//!           [--ppl-ctx 512] [--json OUT]
//! ```
//! For each size N the first N cases are solved into one patch and scored; `--sequential K`
//! makes K one-edit patches one after another, each solved on top of the ones before it, and
//! scores their stack (and, as `apart K`, the stack of the same patches each solved alone). Prints one line per
//! run and writes every number with `--json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use quarry_edit::compose::Composer;
use quarry_edit::eval::{self, Case, Scores};
use quarry_edit::patch::stack;
use quarry_edit::{key_stats, Earlier, Edit, EditKind, EditRequest, Editor, Hyper};
use quarry_format::GgufFile;
use quarry_model::{FfnOverlay, Model};
use quarry_tokenize::Tokenizer;
use serde_json::json;
use sha2::{Digest, Sha256};

fn main() {
    if let Err(e) = run() {
        eprintln!("edit_eval: {e}");
        std::process::exit(1);
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: bad value {v}"))
        })
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model_path, set_path) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let sizes: Vec<usize> = flag::<String>(&args, "--sizes")
        .unwrap_or_else(|| "1,10,100".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let sequential: usize = flag(&args, "--sequential").unwrap_or(10);
    let ppl_ctx: usize = flag(&args, "--ppl-ctx").unwrap_or(512);

    let set: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&set_path)?)?;
    let cases: Vec<Case> = serde_json::from_value(set["edits"].clone())?;
    let file = Arc::new(GgufFile::open(&model_path)?);
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let editor_tokenizer = Tokenizer::from_gguf(&file)?;
    let base = Model::load(file)?;
    let mut hyper = Hyper::for_model(&base);
    if let Some(l) = flag(&args, "--layer") {
        hyper.layer = l;
    }
    if let Some(x) = flag(&args, "--spread") {
        hyper.spread = x;
    }
    if let Some(x) = flag(&args, "--null-space") {
        hyper.null_space = x;
    }
    if let Some(x) = flag(&args, "--ridge") {
        hyper.ridge = x;
    }
    if let Some(x) = flag(&args, "--steps") {
        hyper.steps = x;
    }
    if let Some(x) = flag(&args, "--lr") {
        hyper.lr = x;
    }
    if let Some(x) = flag(&args, "--clamp") {
        hyper.clamp = x;
    }
    if let Some(x) = flag(&args, "--stop-loss") {
        hyper.stop_loss = x;
    }
    if let Some(x) = flag(&args, "--weight-decay") {
        hyper.weight_decay = x;
    }
    if let Some(x) = flag(&args, "--decoys") {
        hyper.decoys = x;
    }
    if let Some(x) = flag(&args, "--decoy-weight") {
        hyper.decoy_weight = x;
    }
    if let Some(x) = flag(&args, "--preserve-weight") {
        hyper.preserve_weight = x;
    }
    let sha = sha256_of(&model_path)?;
    let models_dir = model_path.parent().unwrap_or(Path::new("."));
    let corpus = std::fs::read_to_string(models_dir.join("edit-corpus.txt"))?;
    let cache = dirs_cache().join("edit-stats");
    let t = Instant::now();
    let layers: Vec<usize> = hyper.layers().collect();
    let stats = key_stats(&base, &tokenizer, &sha, &layers, &corpus, Some(&cache))?;
    let stats_s = t.elapsed().as_secs_f64();
    let editor = Editor::new(base.clone(), editor_tokenizer, hyper.clone(), &stats)?;
    println!(
        "layers {:?} null spaces {:?} of {} dims (stats {:.1}s from {} tokens)",
        hyper.layers(),
        editor.null_space_dims(),
        stats[0].dim(),
        stats_s,
        stats[0].tokens
    );
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/goldens/gpl-3.txt"),
    )?;
    let base_ppl = eval::text_perplexity(&base, &tokenizer, &text, ppl_ctx)?;
    let max = sizes.iter().copied().max().unwrap_or(0).max(sequential);
    let cases = &cases[..max.min(cases.len())];
    let base_answers = eval::neighbour_answers(&base, &tokenizer, cases)?;
    let unedited = eval::score(&base, &tokenizer, cases, &base_answers)?;
    println!("unedited: {unedited:?} ppl {base_ppl:.4}");

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let mut runs = Vec::new();
    let mut report = |name: String,
                      n: usize,
                      model: &Model,
                      solve_s: f64,
                      edit_s: f64|
     -> Result<(), Box<dyn std::error::Error>> {
        let (c, answers) = (&cases[..n], &base_answers[..neighbours_of(&cases[..n])]);
        let s: Scores = eval::score(model, &tokenizer, c, answers)?;
        if std::env::var_os("EDIT_EVAL_CHANGED").is_some() {
            let now = eval::neighbour_answers(model, &tokenizer, c)?;
            let prompts = c
                .iter()
                .flat_map(|c| c.neighbours.iter().map(move |n| (c, n)));
            for (((case, n), a), b) in prompts.zip(&now).zip(answers) {
                if a != b {
                    println!(
                        "  changed [{} -> {}] {:?}: {:?} -> {:?}",
                        case.entity,
                        case.new,
                        n.prompt,
                        tokenizer.decode(&[*b]),
                        tokenizer.decode(&[*a])
                    );
                }
            }
        }
        let ppl = eval::text_perplexity(model, &tokenizer, &text, ppl_ctx)?;
        println!(
            "{name}: efficacy {:.1}% paraphrase {:.1}% neighbourhood {:.1}% (of {}) greedy-new {:.1}% ppl {ppl:.4} ({:+.2}%) solve {solve_s:.2}s, {edit_s:.2}s per edit",
            100.0 * s.efficacy,
            100.0 * s.paraphrase,
            100.0 * s.neighbourhood,
            s.neighbours,
            100.0 * s.greedy_new,
            100.0 * (ppl / base_ppl - 1.0)
        );
        runs.push(json!({"run": name, "edits": n, "scores": s, "ppl": ppl,
            "ppl_change": ppl / base_ppl - 1.0, "solve_seconds": solve_s,
            "edit_seconds_mean": edit_s}));
        Ok(())
    };

    if flag::<String>(&args, "--method").as_deref() == Some("compose") {
        // LARQL's COMPOSE: facts inserted one after another (each balanced against the
        // earlier ones), scored after the first N for every size.
        let layer = flag(&args, "--layer");
        let mut composer = Composer::new(base.clone(), Tokenizer::from_gguf(base.file())?, layer)?;
        println!("compose at layer {}", composer.layer());
        let mut seconds = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let t = Instant::now();
            composer.insert(&case.entity, &case.relation, &case.new)?;
            seconds.push(t.elapsed().as_secs_f64());
            if sizes.contains(&(i + 1)) {
                let p = composer.probabilities()?;
                println!(
                    "compose {}: P(target) on COMPOSE's own prompts: mean {:.3}, {} of {} in [0.30, 0.95]",
                    i + 1,
                    p.iter().sum::<f32>() / p.len() as f32,
                    p.iter().filter(|&&x| (0.30..=0.95).contains(&x)).count(),
                    p.len()
                );
                let name = format!("compose {}", i + 1);
                report(name, i + 1, &composer.model()?, 0.0, mean(&seconds))?;
            }
        }
        return write_json(
            &args,
            json!({"model": model_path, "set": set_path,
            "method": "compose", "layer": composer.layer(),
            "unedited": unedited, "base_ppl": base_ppl, "runs": runs}),
        );
    }

    // Every case's edit, solved once (an edit does not depend on the others). Keys and
    // values depend on the model, the cases and the value search only, so they are kept in
    // target/edit-eval/ for runs that vary the solve (ridge, null space, decoys).
    let value_search = json!({"sha": sha, "set": set_path, "cases": cases.len(),
        "layer": hyper.layer, "steps": hyper.steps, "lr": hyper.lr, "clamp": hyper.clamp,
        "stop": hyper.stop_loss, "wd": hyper.weight_decay, "prefixes": hyper.prefixes});
    let cache_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../../target/edit-eval/edits-{:x}.json",
        Sha256::digest(value_search.to_string().as_bytes())
    ));
    let (edits, seconds): (Vec<Edit>, Vec<f64>) = match std::fs::read_to_string(&cache_path) {
        Ok(text) => {
            let cached: Vec<(Edit, Vec<f32>, Vec<f32>, f64)> = serde_json::from_str(&text)?;
            println!("edits read from {}", cache_path.display());
            cached
                .into_iter()
                .map(|(e, key, value, s)| {
                    let spread = hyper.spread;
                    (
                        Edit {
                            key,
                            value,
                            spread,
                            ..e
                        },
                        s,
                    )
                })
                .unzip()
        }
        Err(_) => {
            let mut solved = Vec::new();
            for case in cases {
                let t = Instant::now();
                let e = editor.solve(&EditRequest {
                    entity: case.entity.clone(),
                    relation: case.relation.clone(),
                    target: case.new.clone(),
                    prompt: case.rewrite.clone(),
                    kind: EditKind::Insert,
                })?;
                solved.push((e.clone(), e.key, e.value, t.elapsed().as_secs_f64()));
            }
            std::fs::create_dir_all(cache_path.parent().unwrap())?;
            std::fs::write(&cache_path, serde_json::to_string(&solved)?)?;
            solved
                .into_iter()
                .map(|(e, key, value, s)| (Edit { key, value, ..e }, s))
                .unzip()
        }
    };
    println!(
        "solved {} edits: {:.2} s per edit (mean), final loss {:.3} (mean)",
        edits.len(),
        mean(&seconds),
        edits.iter().map(|e| e.loss as f64).sum::<f64>() / edits.len() as f64
    );
    for &n in &sizes {
        let n = n.min(edits.len());
        let t = Instant::now();
        let deltas = editor.deltas(&edits[..n]);
        if deltas.is_empty() {
            return Err("no null space to edit in".into());
        }
        let solve_s = t.elapsed().as_secs_f64();
        report(
            format!("batch {n}"),
            n,
            &eval::patched(&base, deltas)?,
            solve_s,
            mean(&seconds[..n]),
        )?;
    }
    if sequential > 0 {
        // K one-edit patches: each solved on top of the ones before it (what a session
        // does when it makes a patch while others are applied), and, for comparison, each
        // solved alone and stacked (patches made apart and applied together).
        let n = sequential.min(edits.len());
        let layers = base.config().n_layers;
        let t = Instant::now();
        let mut overlays: Vec<FfnOverlay> = Vec::new();
        for (i, e) in edits[..n].iter().enumerate() {
            let before = stack(layers, &overlays);
            let earlier = Earlier {
                edits: &edits[..i],
                overlay: before.as_ref(),
            };
            let deltas = editor.deltas_after(std::slice::from_ref(e), &earlier);
            overlays.push(FfnOverlay::new(layers, deltas));
        }
        let solve_s = t.elapsed().as_secs_f64();
        let stacked = stack(layers, &overlays).ok_or("no deltas")?;
        report(
            format!("sequential {n}"),
            n,
            &stacked_model(&base, stacked)?,
            solve_s,
            mean(&seconds[..n]),
        )?;
        let t = Instant::now();
        let apart: Vec<FfnOverlay> = edits[..n]
            .iter()
            .map(|e| FfnOverlay::new(layers, editor.deltas(std::slice::from_ref(e))))
            .collect();
        let solve_s = t.elapsed().as_secs_f64();
        let stacked = stack(layers, &apart).ok_or("no deltas")?;
        report(
            format!("apart {n}"),
            n,
            &stacked_model(&base, stacked)?,
            solve_s,
            mean(&seconds[..n]),
        )?;
    }
    write_json(
        &args,
        json!({"model": model_path, "set": set_path, "hyper": hyper,
        "null_space_dims": editor.null_space_dims(), "stats_tokens": stats[0].tokens,
        "unedited": unedited, "base_ppl": base_ppl, "runs": runs}),
    )
}

fn stacked_model(base: &Model, overlay: FfnOverlay) -> Result<Model, Box<dyn std::error::Error>> {
    Ok(base.with_overlay(Some(Arc::new(overlay)))?)
}

fn write_json(args: &[String], doc: serde_json::Value) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(out) = flag::<String>(args, "--json") {
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

fn neighbours_of(cases: &[Case]) -> usize {
    cases.iter().map(|c| c.neighbours.len()).sum()
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache/quarry")
}
