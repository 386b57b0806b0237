//! Relation labels without external data (`relations.json`).
//!
//! A knowledge-band FFN feature reads one kind of input and writes one kind of output, so it
//! can be read as an edge from the word that opens its gate most to the word it writes most.
//! Edges that express the same relation (country → capital, country → language) move by
//! similar offsets in embedding space (the classic analogy geometry), so the features are
//! clustered by the direction of `embedding(output) − embedding(input)` and each cluster is
//! named after its members.
//!
//! Per knowledge layer: the input word of a feature is the candidate word (a vocabulary token
//! that is a whole word: leading space, letters only, at least three of them; the first
//! [`CANDIDATES`] such ids) whose browsing input (scaled embedding through the layer's pre-FFN
//! norm) gives the largest gate score; its output word is the first whole word among its
//! top writes. Features whose input and output are the same word are left out. The unit
//! offsets are clustered by spherical k-means (deterministic farthest-point start,
//! [`ITERATIONS`] rounds); a relation's label is its most central member, `input → output`.

use quarry_relations::accuracy::RelationAccuracy;
use serde::{Deserialize, Serialize};

use quarry_kernels::gemm::{gemm, MatRef};
use quarry_kernels::vec::dot;
use quarry_model::ops::rms_norm;
use quarry_tokenize::Tokenizer;

/// Candidate input words scored per layer.
pub const CANDIDATES: usize = 16_384;
/// Candidates scored per GEMM (bounds the score buffer to `ff × CHUNK` values).
const CHUNK: usize = 2048;
/// Rounds of k-means.
const ITERATIONS: usize = 12;
/// Examples stored per relation.
const EXAMPLES: usize = 8;

/// The contents of `relations.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Relations {
    /// Layers whose features were read (the knowledge band).
    pub layers: [usize; 2],
    pub relations: Vec<Relation>,
    /// Every feature read as an edge, grouped by `relation`.
    pub edges: Vec<FeatureEdge>,
    /// How well the model answers each catalogue relation, measured at extraction
    /// (quarry_relations::accuracy); empty in vindexes extracted before it was.
    #[serde(default)]
    pub catalogue: Vec<RelationAccuracy>,
}

/// One cluster of feature edges.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Relation {
    pub id: usize,
    /// `input → output` of its most central member.
    pub label: String,
    pub features: usize,
    /// The members closest to the cluster's centre, most central first.
    pub examples: Vec<String>,
}

/// A feature read as an edge between two words.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct FeatureEdge {
    pub layer: usize,
    pub feature: usize,
    pub relation: usize,
    pub input: u32,
    pub output: u32,
}

/// Whether `text` is a whole word: a leading space, then at least three letters only.
pub fn is_word(text: &str) -> bool {
    text.strip_prefix(' ')
        .is_some_and(|w| w.chars().count() >= 3 && w.chars().all(char::is_alphabetic))
}

/// The candidate input words: the first [`CANDIDATES`] whole-word token ids.
pub fn candidate_words(tokenizer: &Tokenizer, vocab: usize) -> Vec<u32> {
    (0..vocab as u32)
        .filter(|&id| is_word(&tokenizer.decode(&[id])))
        .take(CANDIDATES)
        .collect()
}

/// Collects the feature edges of one layer, then clusters them.
pub struct RelationBuilder<'a> {
    tokenizer: &'a Tokenizer,
    candidates: Vec<u32>,
    /// Scaled embeddings of the candidates (rows of `d`).
    inputs: Vec<f32>,
    d: usize,
    norm_eps: f32,
    edges: Vec<FeatureEdge>,
}

impl<'a> RelationBuilder<'a> {
    /// `embedding(id, row)` writes token `id`'s embedding, already multiplied by the model's
    /// embedding scale.
    pub fn new(
        tokenizer: &'a Tokenizer,
        vocab: usize,
        d: usize,
        norm_eps: f32,
        mut embedding: impl FnMut(u32, &mut [f32]),
    ) -> Self {
        let candidates = candidate_words(tokenizer, vocab);
        let mut inputs = vec![0.0f32; candidates.len() * d];
        for (&id, row) in candidates.iter().zip(inputs.chunks_exact_mut(d)) {
            embedding(id, row);
        }
        RelationBuilder {
            tokenizer,
            candidates,
            inputs,
            d,
            norm_eps,
            edges: Vec::new(),
        }
    }

    /// Reads the features of `layer`: `gate` is its gate matrix (`ff × d`), `norm` its
    /// pre-FFN norm gains (none: the FFN reads the residual as it is), and `top_writes(f)` feature f's top written tokens, best first.
    pub fn add_layer(
        &mut self,
        layer: usize,
        gate: &[f32],
        norm: Option<&[f32]>,
        top_writes: impl Fn(usize) -> Vec<u32>,
    ) {
        let d = self.d;
        let ff = gate.len() / d;
        let mut best = vec![(f32::NEG_INFINITY, u32::MAX); ff];
        let mut x = Vec::with_capacity(CHUNK * d);
        let mut scores = vec![0.0f32; ff * CHUNK];
        for (ids, rows) in self
            .candidates
            .chunks(CHUNK)
            .zip(self.inputs.chunks(CHUNK * d))
        {
            let n = ids.len();
            x.clear();
            x.extend_from_slice(rows);
            if let Some(norm) = norm {
                rms_norm(&mut x, norm, self.norm_eps);
            }
            let g = MatRef::row_major(gate, ff, d, d);
            let xt = MatRef::row_major(&x, n, d, d).t();
            gemm(1.0, g, xt, 0.0, &mut scores[..ff * n], n);
            for (b, row) in best.iter_mut().zip(scores.chunks_exact(n)) {
                for (&id, &s) in ids.iter().zip(row) {
                    if s > b.0 {
                        *b = (s, id);
                    }
                }
            }
        }
        for (feature, &(_, input)) in best.iter().enumerate() {
            if input == u32::MAX {
                continue;
            }
            let word = |id: u32| self.tokenizer.decode(&[id]).trim().to_lowercase();
            let output = top_writes(feature)
                .into_iter()
                .find(|&t| is_word(&self.tokenizer.decode(&[t])));
            if let Some(output) = output.filter(|&o| word(o) != word(input)) {
                self.edges.push(FeatureEdge {
                    layer,
                    feature,
                    relation: 0,
                    input,
                    output,
                });
            }
        }
    }

    /// Clusters the collected edges into relations; `embedding` as in [`Self::new`] (any
    /// scale: offsets are taken between unit vectors).
    pub fn finish(
        mut self,
        layers: [usize; 2],
        mut embedding: impl FnMut(u32, &mut [f32]),
    ) -> Relations {
        let d = self.d;
        let n = self.edges.len();
        if n == 0 {
            return Relations {
                layers,
                ..Relations::default()
            };
        }
        let mut unit = |id: u32| {
            let mut row = vec![0.0f32; d];
            embedding(id, &mut row);
            normalize(&mut row);
            row
        };
        let mut offsets = vec![0.0f32; n * d];
        for (e, off) in self.edges.iter().zip(offsets.chunks_exact_mut(d)) {
            let (a, b) = (unit(e.input), unit(e.output));
            for ((o, x), y) in off.iter_mut().zip(&b).zip(&a) {
                *o = x - y;
            }
            normalize(off);
        }
        let k = (n / 40).clamp(1, 48);
        let (assignment, centroids) = spherical_kmeans(&offsets, d, k);
        // Each cluster's members, most central first; clusters largest first (then by index).
        let mut clusters: Vec<Vec<usize>> = (0..k)
            .map(|c| {
                let centre = &centroids[c * d..(c + 1) * d];
                let mut members: Vec<(f32, usize)> = (0..n)
                    .filter(|&i| assignment[i] == c)
                    .map(|i| (dot(&offsets[i * d..(i + 1) * d], centre), i))
                    .collect();
                members.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                members.into_iter().map(|(_, i)| i).collect()
            })
            .filter(|members: &Vec<usize>| !members.is_empty())
            .collect();
        clusters.sort_by_key(|members| std::cmp::Reverse(members.len()));
        let name = |e: &FeatureEdge| {
            format!(
                "{} → {}",
                self.tokenizer.decode(&[e.input]).trim(),
                self.tokenizer.decode(&[e.output]).trim()
            )
        };
        let mut relations = Vec::with_capacity(clusters.len());
        for (id, members) in clusters.iter().enumerate() {
            let mut examples: Vec<String> = Vec::new();
            for &i in members {
                let text = name(&self.edges[i]);
                if !examples.contains(&text) {
                    examples.push(text);
                }
                if examples.len() == EXAMPLES {
                    break;
                }
            }
            relations.push(Relation {
                id,
                label: examples[0].clone(),
                features: members.len(),
                examples,
            });
        }
        for (id, members) in clusters.iter().enumerate() {
            for &i in members {
                self.edges[i].relation = id;
            }
        }
        self.edges.sort_by_key(|e| (e.relation, e.layer, e.feature));
        Relations {
            layers,
            relations,
            edges: self.edges,
            catalogue: Vec::new(),
        }
    }
}

fn normalize(x: &mut [f32]) {
    let norm = dot(x, x).sqrt();
    if norm > 0.0 {
        x.iter_mut().for_each(|v| *v /= norm);
    }
}

/// Spherical k-means of the unit rows of `x` (`d` columns) into `k` clusters: the cluster of
/// each row and the unit centroids. Starts from farthest-point picks (row 0, then repeatedly
/// the row least similar to every centroid so far), so the result is deterministic.
fn spherical_kmeans(x: &[f32], d: usize, k: usize) -> (Vec<usize>, Vec<f32>) {
    let n = x.len() / d;
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let mut centroids = row(0).to_vec();
    let mut closest: Vec<f32> = (0..n).map(|i| dot(row(i), row(0))).collect();
    for _ in 1..k {
        let far = (0..n)
            .min_by(|&a, &b| closest[a].total_cmp(&closest[b]))
            .expect("n > 0");
        centroids.extend_from_slice(row(far));
        for (i, c) in closest.iter_mut().enumerate() {
            *c = c.max(dot(row(i), row(far)));
        }
    }
    let mut assignment = vec![0usize; n];
    for _ in 0..ITERATIONS {
        for (i, a) in assignment.iter_mut().enumerate() {
            *a = (0..k)
                .max_by(|&p, &q| {
                    dot(row(i), &centroids[p * d..(p + 1) * d])
                        .total_cmp(&dot(row(i), &centroids[q * d..(q + 1) * d]))
                        .then(q.cmp(&p))
                })
                .expect("k > 0");
        }
        let mut sums = vec![0.0f32; k * d];
        for (i, &a) in assignment.iter().enumerate() {
            for (s, v) in sums[a * d..(a + 1) * d].iter_mut().zip(row(i)) {
                *s += v;
            }
        }
        for (c, sum) in sums.chunks_exact_mut(d).enumerate() {
            normalize(sum);
            if sum.iter().any(|&v| v != 0.0) {
                centroids[c * d..(c + 1) * d].copy_from_slice(sum);
            }
        }
    }
    (assignment, centroids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_spaced_letters_only() {
        assert!(is_word(" Paris"));
        assert!(is_word(" Österreich"));
        assert!(!is_word("Paris"), "no leading space: a word piece");
        assert!(!is_word(" of"), "fewer than three letters");
        assert!(!is_word(" R2D2"));
        assert!(!is_word(" "));
    }

    #[test]
    fn kmeans_separates_two_directions() {
        // Two tight groups of unit vectors around the x and y axes.
        let mut x = Vec::new();
        for i in 0..10 {
            let e = 0.01 * i as f32;
            let mut a = vec![1.0, e, 0.0];
            let mut b = vec![e, 1.0, 0.0];
            normalize(&mut a);
            normalize(&mut b);
            x.extend(a);
            x.extend(b);
        }
        let (assignment, _) = spherical_kmeans(&x, 3, 2);
        for pair in assignment.chunks_exact(2) {
            assert_ne!(pair[0], pair[1]);
        }
        assert!(assignment.iter().step_by(2).all(|&a| a == assignment[0]));
    }
}
