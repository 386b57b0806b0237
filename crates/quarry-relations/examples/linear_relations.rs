//! Method (2) of issue 16, measured: a linear map per relation from the entity's hidden state
//! to the answer's (after Hernandez et al.'s linear relational embeddings, ICLR 2024).
//!
//! linear_relations MODEL.gguf FACTS.json [--lambda 0.1] [--layers 4,8,12]
//!
//! For an entity `s` and a relation `r`, the model's answer is read at the last token of
//! `r`'s DESCRIBE prompt: `o(s, r)`, the residual after the last layer. The method claims
//! that `o(s, r) ≈ W_r · h_l(s) + b_r`, with `h_l(s)` the residual after layer `l` at the last
//! token of the entity alone (one forward pass per entity, shared by all relations). Without
//! gradients the map is fitted by ridge regression on known facts (kernel form: the fit needs
//! one `n × n` solve for `n` training facts), not from the Jacobian as in the paper. The fact
//! set is split in two by entity; each half is answered by maps fitted on the other. For each
//! entity, every relation's map gives `W_r · h + b_r`, read through the final norm and the
//! output head; its top token is that relation's edge, scored by its probability. Printed per
//! layer `l`: recall@20 of those edges (the fact's target's first token among the entity's
//! 20 best edges, any relation), with its relation, and top-1 accuracy with the relation
//! given, on the same facts DESCRIBE is measured on (scripts/knowledge-recall).
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use quarry_format::GgufFile;
use quarry_model::ops::rms_norm;
use quarry_model::{ForwardObserver, Model};
use quarry_relations::catalogue::{self, fill};
use quarry_tokenize::Tokenizer;
use serde_json::Value;

/// The residual stream after every layer at the last row of one forward pass.
struct Residuals {
    d: usize,
    current: Vec<f32>,
    after: Vec<Vec<f32>>,
}

impl Residuals {
    fn last_row<'a>(&self, rows: &'a [f32]) -> &'a [f32] {
        &rows[rows.len() - self.d..]
    }
}

impl ForwardObserver for Residuals {
    fn embeddings(&mut self, x: &[f32]) {
        self.current = self.last_row(x).to_vec();
    }
    fn attention_output(&mut self, _layer: usize, added: &[f32]) {
        let row = self.last_row(added).to_vec();
        self.current.iter_mut().zip(row).for_each(|(c, a)| *c += a);
    }
    fn ffn_output(&mut self, _layer: usize, added: &[f32]) {
        let row = self.last_row(added).to_vec();
        self.current.iter_mut().zip(row).for_each(|(c, a)| *c += a);
        self.after.push(self.current.clone());
    }
}

fn residuals(
    model: &Model,
    tok: &Tokenizer,
    text: &str,
) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let tokens = tok.encode(text, true, false);
    let mut cache = model.new_cache(tokens.len());
    let d = model.config().d_model;
    let mut observer = Residuals {
        d,
        current: vec![0.0; d],
        after: Vec::new(),
    };
    let n = tokens.len();
    model.forward_observed(&tokens, &mut cache, n - 1..n, &mut observer)?;
    Ok(observer.after)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Solves `a x = b` for a symmetric positive definite `a` (`n × n`, row-major) by Cholesky.
fn solve_spd(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            l[i * n + j] = if i == j {
                (a[i * n + i] - s).max(1e-12).sqrt()
            } else {
                (a[i * n + j] - s) / l[j * n + j]
            };
        }
    }
    let mut y = vec![0.0f64; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i * n + k] * y[k]).sum::<f64>()) / l[i * n + i];
    }
    let mut x = vec![0.0f64; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k * n + i] * x[k]).sum::<f64>()) / l[i * n + i];
    }
    x
}

/// A ridge map from entity states to answer states, kept in kernel form.
struct Map {
    s_mean: Vec<f32>,
    o_mean: Vec<f32>,
    /// Centred training inputs and outputs.
    s: Vec<Vec<f32>>,
    o: Vec<Vec<f32>>,
    /// `(K + λ·mean(diag K)·I)⁻¹` applied lazily: the Gram matrix, regularised.
    gram: Vec<f64>,
}

impl Map {
    fn fit(inputs: &[&[f32]], outputs: &[&[f32]], lambda: f64) -> Map {
        let d = inputs[0].len();
        let n = inputs.len();
        let mean = |rows: &[&[f32]]| {
            let mut m = vec![0.0f32; d];
            for r in rows {
                m.iter_mut()
                    .zip(r.iter())
                    .for_each(|(a, b)| *a += b / n as f32);
            }
            m
        };
        let (s_mean, o_mean) = (mean(inputs), mean(outputs));
        let centre = |rows: &[&[f32]], m: &[f32]| -> Vec<Vec<f32>> {
            rows.iter()
                .map(|r| r.iter().zip(m).map(|(a, b)| a - b).collect())
                .collect()
        };
        let (s, o) = (centre(inputs, &s_mean), centre(outputs, &o_mean));
        let mut gram = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                gram[i * n + j] = dot(&s[i], &s[j]);
            }
        }
        let scale = (0..n).map(|i| gram[i * n + i]).sum::<f64>() / n as f64;
        for i in 0..n {
            gram[i * n + i] += lambda * scale;
        }
        Map {
            s_mean,
            o_mean,
            s,
            o,
            gram,
        }
    }

    fn apply(&self, h: &[f32]) -> Vec<f32> {
        let n = self.s.len();
        let c: Vec<f32> = h.iter().zip(&self.s_mean).map(|(a, b)| a - b).collect();
        let k: Vec<f64> = self.s.iter().map(|s| dot(s, &c)).collect();
        let beta = solve_spd(&self.gram, &k, n);
        let mut out = self.o_mean.clone();
        for (b, o) in beta.iter().zip(&self.o) {
            out.iter_mut()
                .zip(o)
                .for_each(|(x, y)| *x += (*b * *y as f64) as f32);
        }
        out
    }
}

struct Fact {
    entity: String,
    relation: String,
    target: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err(
            "usage: linear_relations MODEL.gguf FACTS.json [--lambda 0.1] [--layers 4,8,12]".into(),
        );
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let lambda: f64 = flag("--lambda").map_or(Ok(0.1), |v| v.parse())?;
    let file = Arc::new(GgufFile::open(&args[1])?);
    let tok = Tokenizer::from_gguf(&file)?;
    let model = Model::load(file)?;
    let set: Value = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let facts: Vec<Fact> = set["facts"]
        .as_array()
        .ok_or("facts")?
        .iter()
        .map(|f| Fact {
            entity: f["entity"].as_str().unwrap_or_default().to_string(),
            relation: f["relation"].as_str().unwrap_or_default().to_string(),
            target: f["target"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    let cfg = model.config().clone();
    let start = std::time::Instant::now();
    // One pass per entity: its residual after every layer.
    let mut entity_states: BTreeMap<&str, Vec<Vec<f32>>> = BTreeMap::new();
    for f in &facts {
        if !entity_states.contains_key(f.entity.as_str()) {
            entity_states.insert(&f.entity, residuals(&model, &tok, &f.entity)?);
        }
    }
    // One pass per fact: the answer state at the relation's DESCRIBE prompt.
    let mut answer_states: Vec<Vec<f32>> = Vec::new();
    for f in &facts {
        let r = catalogue::find(&f.relation).ok_or("relation")?;
        let prompt = fill(&r.templates[r.describe], &f.entity);
        answer_states.push(residuals(&model, &tok, &prompt)?.pop().ok_or("no layers")?);
    }
    eprintln!(
        "{} entities, {} facts, states in {:.1} s",
        entity_states.len(),
        facts.len(),
        start.elapsed().as_secs_f64()
    );
    let fold = |entity: &str| {
        entity
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
            % 2
    };
    let first_token = |text: &str| {
        tok.encode(&format!(" {text}"), false, false)
            .first()
            .copied()
    };
    let relations: Vec<&str> = {
        let mut r: Vec<&str> = facts.iter().map(|f| f.relation.as_str()).collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    println!("layer  recall@20  with relation  top-1 (relation given)");
    let layers: Vec<usize> = match flag("--layers") {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => (0..cfg.n_layers).collect(),
    };
    for layer in layers {
        // Maps per (fold left out, relation), fitted on the other fold's facts.
        let mut maps: HashMap<(u32, &str), Map> = HashMap::new();
        for held in 0..2 {
            for &r in &relations {
                let train: Vec<usize> = (0..facts.len())
                    .filter(|&i| facts[i].relation == r && fold(&facts[i].entity) != held)
                    .collect();
                if train.len() < 2 {
                    continue;
                }
                let inputs: Vec<&[f32]> = train
                    .iter()
                    .map(|&i| entity_states[facts[i].entity.as_str()][layer].as_slice())
                    .collect();
                let outputs: Vec<&[f32]> =
                    train.iter().map(|&i| answer_states[i].as_slice()).collect();
                maps.insert((held, r), Map::fit(&inputs, &outputs, lambda));
            }
        }
        // Every entity's edges: per relation, the top token of the mapped state.
        let mut edges: BTreeMap<&str, Vec<(f32, &str, u32)>> = BTreeMap::new();
        for (&entity, states) in &entity_states {
            let held = fold(entity);
            let mut list = Vec::new();
            for &r in &relations {
                let Some(map) = maps.get(&(held, r)) else {
                    continue;
                };
                let mut o = map.apply(&states[layer]);
                rms_norm(&mut o, model.output_norm(), cfg.norm_eps);
                let logits = model.logits(&o)?;
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
                let (best, _) =
                    logits
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                        );
                list.push((1.0 / sum, r, best as u32));
            }
            list.sort_by(|a, b| b.0.total_cmp(&a.0));
            edges.insert(entity, list);
        }
        let (mut any, mut with, mut top1) = (0, 0, 0);
        for f in &facts {
            let Some(target) = first_token(&f.target) else {
                continue;
            };
            let list = &edges[f.entity.as_str()];
            let top = &list[..list.len().min(20)];
            any += usize::from(top.iter().any(|e| e.2 == target));
            with += usize::from(top.iter().any(|e| e.2 == target && e.1 == f.relation));
            top1 += usize::from(list.iter().any(|e| e.1 == f.relation && e.2 == target));
        }
        let pct = |n: usize| 100.0 * n as f64 / facts.len() as f64;
        println!(
            "{layer:>5}  {:>8.1}%  {:>12.1}%  {:>8.1}%",
            pct(any),
            pct(with),
            pct(top1)
        );
    }
    Ok(())
}
