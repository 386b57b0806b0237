//! How much of an edit survives when it is compiled into a quantized down projection: the
//! measurement behind `DEFAULT_PATCHED_TYPE` (src/export.rs).
//!
//! ```sh
//! cargo run --release -p quarry-model --example requant_edit -- MODEL.gguf [MODEL.gguf ...]
//! ```
//!
//! For every fourth layer of each model, the keys are real FFN activations (the input of the
//! down projection at the last token of short subject phrases). The first `RANK` phrases are
//! edited: `ΔW = R·(KᵀK)⁻¹·Kᵀ`, the least-norm delta with `ΔW·kᵢ = rᵢ`, each `rᵢ` a random
//! direction of length `c·‖W·kᵢ‖` (an edit moves a layer's output by about as much as the
//! layer's own output). The other phrases are unrelated keys. For each storage type `T`, with
//! `W` the base weight as stored and `Q_T` quantize-then-dequantize:
//!
//! - `kept vs Q_T(W)`: `‖(Q_T(W+ΔW) − Q_T(W))·k − ΔW·k‖ / ‖ΔW·k‖` over the edited keys, the
//!   edit's own loss;
//! - `kept vs W`: the same against the base as stored, `‖(Q_T(W+ΔW) − W)·k − ΔW·k‖ / ‖ΔW·k‖`,
//!   what a compiled file gives relative to the unedited one (adds re-rounding `W` itself);
//! - `unrelated noise`: `‖(Q_T(W+ΔW) − (W+ΔW))·u‖ / ‖W·u‖` over the unrelated keys, how far
//!   the compiled weight's output on other inputs is from the exact overlay's (what
//!   llama.cpp computes with the adapter). The header gives the exact overlay's own change
//!   `‖ΔW·u‖ / ‖W·u‖`, which is the edit algorithm's business, not the storage type's (this
//!   delta has no null-space constraint, so it is large).
//!
//! Printed: the median over layers of each mean.

use std::sync::Arc;

use quarry_format::{GgmlType, GgufFile};
use quarry_model::{ForwardObserver, Model};
use quarry_tokenize::Tokenizer;

const RANK: usize = 4;
const TYPES: [GgmlType; 4] = [
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::Q8_0,
    GgmlType::F16,
];
const SCALES: [f64; 3] = [0.5, 1.0, 2.0];
/// Subject phrases: the key of an edit is the activation at the subject's last token.
const PHRASES: [&str; 24] = [
    "The mother tongue of Danielle Darrieux",
    "The capital city of Norway",
    "Barack Obama",
    "The Eiffel Tower",
    "The currency of Japan",
    "Mount Kilimanjaro",
    "The official language of Brazil",
    "Albert Einstein",
    "The river Danube",
    "Toyota",
    "The headquarters of Microsoft",
    "Leonardo da Vinci",
    "The Great Wall of China",
    "Wolfgang Amadeus Mozart",
    "The continent where Kenya lies",
    "The city of Marseille",
    "The opposite of hot",
    "Nintendo",
    "The Pacific Ocean",
    "Marie Curie",
    "The Amazon rainforest",
    "The founder of Apple",
    "The country where Kyoto lies",
    "Pablo Picasso",
];

/// The last row of the down projection's input at each observed layer.
struct Keys {
    ff_dim: usize,
    layers: Vec<usize>,
    rows: Vec<Vec<f32>>,
}

impl ForwardObserver for Keys {
    fn ffn_activations(&mut self, layer: usize, _input: &[f32], activations: &[f32]) {
        if let Some(i) = self.layers.iter().position(|&l| l == layer) {
            self.rows[i] = activations[activations.len() - self.ff_dim..].to_vec();
        }
    }
}

/// Normal deviates (Box–Muller over a 64-bit LCG), reproducible.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn matvec(w: &[f32], cols: usize, x: &[f32]) -> Vec<f64> {
    w.chunks_exact(cols)
        .map(|row| row.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum())
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn diff_norm(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

fn round_trip(dtype: GgmlType, w: &[f32]) -> Vec<f32> {
    let mut bytes = vec![0u8; dtype.bytes_for(w.len() as u64).unwrap() as usize];
    quarry_kernels::quantize(dtype, w, &mut bytes).unwrap();
    let mut out = vec![0.0f32; w.len()];
    quarry_kernels::dequantize(dtype, &bytes, &mut out).unwrap();
    out
}

/// Solves the small symmetric positive-definite system `g·x = b` (Gaussian elimination).
fn solve(mut g: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for i in 0..n {
        for j in i + 1..n {
            let f = g[j][i] / g[i][i];
            let (upper, lower) = g.split_at_mut(j);
            for (x, y) in lower[0][i..].iter_mut().zip(&upper[i][i..]) {
                *x -= f * y;
            }
            b[j] -= f * b[i];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| g[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / g[i][i];
    }
    x
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: requant_edit MODEL.gguf [MODEL.gguf ...]");
        std::process::exit(2);
    }
    for path in paths {
        let file = Arc::new(GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")));
        let model = Model::load(file.clone()).unwrap_or_else(|e| panic!("{e}"));
        let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
        let cfg = model.config().clone();
        let (rows, cols) = (cfg.d_model, cfg.ff_dim);
        let layers: Vec<usize> = (0..cfg.n_layers).step_by(4).collect();

        // keys[phrase][layer index]
        let mut keys: Vec<Vec<Vec<f32>>> = Vec::new();
        for phrase in PHRASES {
            let ids = tok.encode(phrase, tok.add_bos(), false);
            let mut obs = Keys {
                ff_dim: cols,
                layers: layers.clone(),
                rows: vec![Vec::new(); layers.len()],
            };
            let mut cache = model.new_cache(ids.len());
            model
                .forward_observed(&ids, &mut cache, ids.len() - 1..ids.len(), &mut obs)
                .unwrap();
            keys.push(obs.rows);
        }

        let dtypes: Vec<String> = layers
            .iter()
            .map(|l| {
                let t = file.tensor(&format!("blk.{l}.ffn_down.weight")).unwrap();
                t.info.dtype.to_string()
            })
            .collect();
        println!(
            "{path}\n  d_model {rows}, ff_dim {cols}, layers {layers:?}, ffn_down types {dtypes:?}, rank {RANK}"
        );

        // results[scale][type] = per-layer (kept vs Q_T(W), kept vs W, unrelated), and the
        // exact overlay's unrelated change per scale.
        let mut results = vec![vec![Vec::new(); TYPES.len()]; SCALES.len()];
        let mut exact = vec![Vec::new(); SCALES.len()];
        let mut rng = Rng(2024);
        for (li, &layer) in layers.iter().enumerate() {
            let view = file
                .tensor(&format!("blk.{layer}.ffn_down.weight"))
                .unwrap();
            let mut w = vec![0.0f32; rows * cols];
            quarry_kernels::dequantize(view.info.dtype, view.data, &mut w).unwrap();
            let edit: Vec<&[f32]> = (0..RANK).map(|i| &keys[i][li][..]).collect();
            let unrelated: Vec<&[f32]> = (RANK..PHRASES.len()).map(|i| &keys[i][li][..]).collect();
            let base_on = |k: &[f32]| matvec(&w, cols, k);
            let quantized_base: Vec<Vec<f32>> = TYPES.iter().map(|&t| round_trip(t, &w)).collect();

            // Gram matrix of the edit keys, for the least-norm delta.
            let gram: Vec<Vec<f64>> = edit
                .iter()
                .map(|a| {
                    edit.iter()
                        .map(|b| a.iter().zip(*b).map(|(x, y)| *x as f64 * *y as f64).sum())
                        .collect()
                })
                .collect();
            for (si, &scale) in SCALES.iter().enumerate() {
                // R: RANK columns of rows values, each c·‖W·k‖ long in a random direction.
                let r: Vec<Vec<f64>> = edit
                    .iter()
                    .map(|k| {
                        let dir: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
                        let s = scale * norm(&base_on(k)) / norm(&dir);
                        dir.iter().map(|x| x * s).collect()
                    })
                    .collect();
                // ΔW = R·G⁻¹·Kᵀ: row i of ΔW is Σ_j c_ij kⱼ with c_i = G⁻¹·(R's row i).
                let mut delta = vec![0.0f32; rows * cols];
                for (i, drow) in delta.chunks_exact_mut(cols).enumerate() {
                    let ri: Vec<f64> = r.iter().map(|col| col[i]).collect();
                    let c = solve(gram.clone(), ri);
                    for (cj, k) in c.iter().zip(&edit) {
                        drow.iter_mut()
                            .zip(*k)
                            .for_each(|(d, x)| *d += (cj * *x as f64) as f32);
                    }
                }
                let summed: Vec<f32> = w.iter().zip(&delta).map(|(a, b)| a + b).collect();
                let d_on = |k: &[f32]| matvec(&delta, cols, k);
                exact[si].push(
                    unrelated
                        .iter()
                        .map(|u| norm(&d_on(u)) / norm(&base_on(u)))
                        .sum::<f64>()
                        / unrelated.len() as f64,
                );
                for (ti, &dtype) in TYPES.iter().enumerate() {
                    let q = round_trip(dtype, &summed);
                    let (mut vs_q, mut vs_w) = (0.0, 0.0);
                    for k in &edit {
                        let want = d_on(k);
                        let got = matvec(&q, cols, k);
                        let qw = matvec(&quantized_base[ti], cols, k);
                        let w0 = base_on(k);
                        let moved_q: Vec<f64> = got.iter().zip(&qw).map(|(a, b)| a - b).collect();
                        let moved_w: Vec<f64> = got.iter().zip(&w0).map(|(a, b)| a - b).collect();
                        vs_q += diff_norm(&moved_q, &want) / norm(&want);
                        vs_w += diff_norm(&moved_w, &want) / norm(&want);
                    }
                    let mut unrel = 0.0;
                    for u in &unrelated {
                        let exact: Vec<f64> =
                            base_on(u).iter().zip(d_on(u)).map(|(a, b)| a + b).collect();
                        unrel += diff_norm(&matvec(&q, cols, u), &exact) / norm(&base_on(u));
                    }
                    results[si][ti].push((
                        vs_q / RANK as f64,
                        vs_w / RANK as f64,
                        unrel / unrelated.len() as f64,
                    ));
                }
            }
        }
        for (si, scale) in SCALES.iter().enumerate() {
            println!(
                "  ‖r‖ = {scale}·‖W·k‖ (exact overlay: unrelated keys move {:.2}%)",
                100.0 * median(exact[si].clone())
            );
            println!("    type   lost vs Q_T(W)   lost vs W   unrelated noise");
            for (ti, dtype) in TYPES.iter().enumerate() {
                let col = |f: fn(&(f64, f64, f64)) -> f64| {
                    100.0 * median(results[si][ti].iter().map(f).collect())
                };
                println!(
                    "    {:<6} {:>13.2}% {:>10.2}% {:>16.2}%",
                    dtype.to_string(),
                    col(|x| x.0),
                    col(|x| x.1),
                    col(|x| x.2)
                );
            }
        }
    }
}
