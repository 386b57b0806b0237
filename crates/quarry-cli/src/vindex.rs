//! `quarry extract` and `quarry verify`: building and checking vindexes.

use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quarry_vindex::{Dtype, ExtractOptions, Level, Progress, Vindex};
use serde_json::json;

use crate::commands::init_threads;
use crate::limits;
use crate::models;
use crate::{ExtractArgs, VerifyArgs};

pub fn extract(a: ExtractArgs) -> Result<()> {
    // The vocabulary bound is checked once the model is open (quarry_vindex::extract).
    limits::count(
        "--top-k",
        a.top_k,
        limits::MAX_EXTRACT_TOP_K,
        "tokens kept per feature at each end of its projection",
    )?;
    init_threads(a.threads)?;
    let source = models::resolve(&a.model)?;
    let options = ExtractOptions {
        level: match a.level.as_str() {
            "inference" => Level::Inference,
            "all" => Level::All,
            _ => Level::Browse,
        },
        dtype: if a.dtype == "f32" {
            Dtype::F32
        } else {
            Dtype::F16
        },
        top_k: a.top_k,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({eta})")
            .expect("valid template"),
    );
    let t0 = Instant::now();
    let index = quarry_vindex::extract(&source, &a.output, &options, &mut |p: Progress| {
        bar.set_message(p.step);
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    })?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let bytes: u64 = index.files.iter().map(|f| f.bytes).sum();
    if a.json {
        println!(
            "{}",
            json!({
                "vindex": a.output.display().to_string(), "level": options.level.name(),
                "seconds": seconds, "bytes": bytes,
                "files": index.files.iter().map(|f| json!({"name": f.name, "bytes": f.bytes})).collect::<Vec<_>>(),
            })
        );
    } else {
        println!(
            "{}: {} vindex of {} ({} layers × {} features) in {seconds:.1} s, {:.1} MB",
            a.output.display(),
            options.level.name(),
            index.model.name,
            index.model.n_layers,
            index.model.ff_dim,
            bytes as f64 / 1e6
        );
        for f in &index.files {
            println!("  {:<16} {:>12} bytes", f.name, f.bytes);
        }
    }
    Ok(())
}

pub fn verify(a: VerifyArgs) -> Result<()> {
    let mismatches = Vindex::verify(&a.vindex)?;
    if a.json {
        let list: Vec<_> = mismatches
            .iter()
            .map(|m| json!({"file": m.file, "problem": m.problem}))
            .collect();
        println!(
            "{}",
            json!({"vindex": a.vindex.display().to_string(), "ok": mismatches.is_empty(), "mismatches": list})
        );
    } else if mismatches.is_empty() {
        println!("{}: every file matches its manifest", a.vindex.display());
    }
    if !mismatches.is_empty() {
        for m in &mismatches {
            eprintln!("{}: {} {}", a.vindex.display(), m.file, m.problem);
        }
        bail!(
            "{}: {} file(s) do not match the manifest",
            a.vindex.display(),
            mismatches.len()
        );
    }
    Ok(())
}
