//! What the edited layer must keep doing, and the solve that respects it.
//!
//! [`KeyStats`] is the covariance of the edited layer's FFN keys over ordinary text (the
//! inputs whose outputs an edit must not change) in eigen-form; [`NullSpace`] is the span of
//! its smallest eigenvectors. [`solve`] finds the one low-rank change of the down projection
//! that gives every edit of a patch its value, restricted to that null space (AlphaEdit),
//! while keeping decoy keys (other subjects in the edits' templates) near zero change. It is a
//! function of the set of edits only, so the order edits were made in does not matter, and
//! dropping an edit is re-solving without it.

use std::io::{Read, Write};
use std::path::Path;

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use quarry_model::{ForwardObserver, LowRank, Model};

use crate::EditError;

/// The eigen-decomposition of the keys' second moment `E[k·kᵀ]` at one layer.
pub struct KeyStats {
    /// Eigenvalues, ascending.
    pub eigenvalues: Vec<f32>,
    /// Eigenvectors as columns, `ff × ff` column-major (column `i` goes with eigenvalue `i`).
    pub eigenvectors: Vec<f32>,
    /// How many tokens the moment was estimated from.
    pub tokens: usize,
}

const STATS_MAGIC: &[u8; 8] = b"QKSTATS1";

impl KeyStats {
    /// Runs `tokens` through `model` in chunks of `chunk` and decomposes the second moment of
    /// the FFN hidden activations of each of `layers` (one pass for all of them).
    pub fn compute(
        model: &Model,
        layers: &[usize],
        tokens: &[u32],
        chunk: usize,
    ) -> Result<Vec<KeyStats>, EditError> {
        EditError::check_dense(model)?;
        let ff = model.config().ff_dim;
        let mut moments = vec![Mat::<f64>::zeros(ff, ff); layers.len()];
        let mut seen = 0usize;
        for part in tokens.chunks(chunk.max(1)) {
            let keys = layers_keys(model, layers, part)?;
            for (moment, keys) in moments.iter_mut().zip(&keys) {
                let n = keys.len() / ff;
                let h = Mat::<f64>::from_fn(n, ff, |i, j| keys[i * ff + j] as f64);
                faer::linalg::matmul::matmul(
                    moment.as_mut(),
                    faer::Accum::Add,
                    h.transpose(),
                    h.as_ref(),
                    1.0,
                    faer::Par::rayon(0),
                );
            }
            seen += part.len();
        }
        if seen == 0 {
            return Err(EditError::Stats("no tokens of text".into()));
        }
        moments
            .into_iter()
            .map(|mut moment| {
                moment *= faer::Scale(1.0 / seen as f64);
                let evd = moment
                    .self_adjoint_eigen(Side::Lower)
                    .map_err(|e| EditError::Stats(format!("eigen-decomposition failed: {e:?}")))?;
                let s = evd.S().column_vector();
                let u = evd.U();
                Ok(KeyStats {
                    eigenvalues: (0..ff).map(|i| s[i] as f32).collect(),
                    eigenvectors: (0..ff)
                        .flat_map(|c| (0..ff).map(move |r| u[(r, c)] as f32))
                        .collect(),
                    tokens: seen,
                })
            })
            .collect()
    }

    pub fn dim(&self) -> usize {
        self.eigenvalues.len()
    }

    /// The null space: eigenvectors whose eigenvalue is below `threshold · λ_max`.
    pub fn null_space(&self, threshold: f32) -> NullSpace {
        let ff = self.dim();
        let max = self.eigenvalues.last().copied().unwrap_or(0.0);
        let m = self
            .eigenvalues
            .iter()
            .take_while(|&&l| l < threshold * max)
            .count();
        NullSpace {
            ff,
            basis: Mat::from_fn(ff, m, |r, c| self.eigenvectors[c * ff + r] as f64),
            variance: self.eigenvalues[..m]
                .iter()
                .map(|&l| l.max(0.0) as f64)
                .collect(),
        }
    }

    /// Writes the statistics to `path` atomically (a cache: temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), EditError> {
        let io = |source| EditError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        out.write_all(STATS_MAGIC).map_err(io)?;
        out.write_all(&(self.dim() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&(self.tokens as u64).to_le_bytes())
            .map_err(io)?;
        for v in self.eigenvalues.iter().chain(&self.eigenvectors) {
            out.write_all(&v.to_le_bytes()).map_err(io)?;
        }
        out.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_all()
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads statistics written by [`KeyStats::save`] for a layer of `ff` features; `None`
    /// when the file is missing or not such a file (it is then recomputed).
    pub fn load(path: &Path, ff: usize) -> Option<KeyStats> {
        let expected = 24 + 4 * (ff + ff * ff);
        let file = quarry_format::input::open_regular(path).ok()?;
        if file.metadata().ok()?.len() != expected as u64 {
            return None;
        }
        let mut bytes = Vec::with_capacity(expected);
        file.take(expected as u64).read_to_end(&mut bytes).ok()?;
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        if &bytes[..8] != STATS_MAGIC || word(8) != ff as u64 {
            return None;
        }
        let floats: Vec<f32> = bytes[24..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        floats.iter().all(|v| v.is_finite()).then(|| KeyStats {
            eigenvalues: floats[..ff].to_vec(),
            eigenvectors: floats[ff..].to_vec(),
            tokens: word(16) as usize,
        })
    }
}

/// An orthonormal basis `N` (`ff × m`) of the directions ordinary keys do not use.
pub struct NullSpace {
    ff: usize,
    basis: Mat<f64>,
    /// `E[(nᵢ·k)²]` over ordinary text for each basis vector `nᵢ` (its eigenvalue): what is
    /// left of ordinary keys in the null space.
    variance: Vec<f64>,
}

impl NullSpace {
    /// Dimensions of the null space.
    pub fn dim(&self) -> usize {
        self.basis.ncols()
    }

    /// `Nᵀ·K` for keys as the columns of `K` (`m × keys`).
    fn coordinates(&self, keys: &[&[f32]]) -> Mat<f64> {
        let k = Mat::<f64>::from_fn(self.ff, keys.len(), |r, c| keys[c][r] as f64);
        self.basis.transpose() * &k
    }
}

/// The low-rank change of the down projection that gives each key its value (`keys[i]` →
/// `values[i]`: the edits at one layer) and maps the keys of `held` towards zero (their weighted
/// second moment `D = Σ w·d·dᵀ`, `ff × ff`: decoys, other subjects in the edits' prompts, and
/// the keys of edits made earlier, whose outputs stay as they are), restricted to `null`,
/// and keeps what is left of ordinary keys in the null space (their covariance `Λ`, MEMIT's
/// preservation term) near zero with weight `preserve_weight` (in tokens of ordinary text):
/// `ΔW = R·(M⁻¹·C)ᵀ·Nᵀ`, `M = C·Cᵀ + Nᵀ·D·N + p·Λ + αI`, with `C = Nᵀ·K` the keys'
/// null-space coordinates. `ridge` is relative to the mean of `diag(CᵀC)`. The result has
/// rank = edits (`B = R`). `None` without edits.
pub fn solve(
    keys: &[&[f32]],
    values: &[&[f32]],
    held: Option<&Mat<f32>>,
    null: &NullSpace,
    preserve_weight: f32,
    ridge: f32,
    d_model: usize,
) -> Option<LowRank> {
    let n = keys.len();
    let m = null.dim();
    if n == 0 || m == 0 || values.len() != n {
        return None;
    }
    let c = null.coordinates(keys);
    let mean_diag = (0..n)
        .map(|i| (0..m).map(|r| c[(r, i)] * c[(r, i)]).sum::<f64>())
        .sum::<f64>()
        / n as f64;
    let alpha = (ridge as f64 * mean_diag).max(1e-12);
    let mut system = &c * c.transpose();
    if let Some(held) = held {
        let basis = Mat::<f32>::from_fn(null.ff, m, |r, c| null.basis[(r, c)] as f32);
        let projected = basis.transpose() * (held * &basis);
        system += Mat::<f64>::from_fn(m, m, |r, c| projected[(r, c)] as f64);
    }
    for i in 0..m {
        system[(i, i)] += alpha + preserve_weight as f64 * null.variance[i];
    }
    // X = M⁻¹·C. M is symmetric positive definite in exact arithmetic (α > 0); LU rather than
    // Cholesky because the decoy term is summed in f32 and may round a hair below zero.
    let x = system.partial_piv_lu().solve(&c);
    let a_rows = &null.basis * &x;
    let a: Vec<f32> = (0..n)
        .flat_map(|i| (0..null.ff).map(move |r| (r, i)))
        .map(|(r, i)| a_rows[(r, i)] as f32)
        .collect();
    let b: Vec<f32> = (0..d_model)
        .flat_map(|r| (0..n).map(move |i| values[i][r]))
        .collect();
    LowRank::new(d_model, null.ff, n, a, b)
}

/// Layer `layer`'s FFN hidden activations at every position of `tokens` (`tokens × ff`).
pub(crate) fn layer_keys(
    model: &Model,
    layer: usize,
    tokens: &[u32],
) -> Result<Vec<f32>, EditError> {
    Ok(layers_keys(model, &[layer], tokens)?.remove(0))
}

/// The FFN hidden activations of each of `layers` at every position of `tokens`.
fn layers_keys(
    model: &Model,
    layers: &[usize],
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>, EditError> {
    let mut grab = Grab {
        layers,
        keys: vec![None; layers.len()],
    };
    let mut cache = model.new_cache(tokens.len());
    model
        .forward_observed(tokens, &mut cache, 0..1, &mut grab)
        .map_err(|e| EditError::Model(e.to_string()))?;
    grab.keys
        .into_iter()
        .map(|k| k.ok_or_else(|| EditError::Stats("the layer was never reached".into())))
        .collect()
}

/// Collects some layers' FFN hidden activations.
struct Grab<'a> {
    layers: &'a [usize],
    keys: Vec<Option<Vec<f32>>>,
}

impl ForwardObserver for Grab<'_> {
    fn ffn_activations(&mut self, layer: usize, _input: &[f32], activations: &[f32]) {
        if let Some(i) = self.layers.iter().position(|&l| l == layer) {
            self.keys[i] = Some(activations.to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        key: Vec<f32>,
        value: Vec<f32>,
    }

    fn edit(key: Vec<f32>, value: Vec<f32>) -> Pair {
        Pair { key, value }
    }

    fn solve_pairs(
        pairs: &[&Pair],
        decoys: Option<&Mat<f32>>,
        decoy_weight: f32,
        null: &NullSpace,
        d: usize,
    ) -> Option<LowRank> {
        let keys: Vec<&[f32]> = pairs.iter().map(|p| p.key.as_slice()).collect();
        let values: Vec<&[f32]> = pairs.iter().map(|p| p.value.as_slice()).collect();
        let held = decoys.map(|g| g * faer::Scale(decoy_weight));
        solve(&keys, &values, held.as_ref(), null, 0.0, 1e-6, d)
    }

    #[test]
    fn the_solve_gives_each_key_its_value_and_leaves_the_preserved_space_alone() {
        // ff = 4: ordinary keys live in dims 0..2, the null space is dims 2..4.
        let null = NullSpace {
            ff: 4,
            basis: Mat::from_fn(4, 2, |r, c| f64::from(r == c + 2)),
            variance: vec![0.0; 2],
        };
        let e1 = edit(vec![0.3, 0.1, 1.0, 0.0], vec![1.0, -2.0, 0.5]);
        let e2 = edit(vec![0.2, 0.0, 0.5, 2.0], vec![0.0, 1.0, 1.0]);
        let delta = solve_pairs(&[&e1, &e2], None, 0.0, &null, 3).unwrap();
        for e in [&e1, &e2] {
            let mut out = vec![0.0f32; 3];
            delta.apply(&e.key, &mut out);
            for (o, v) in out.iter().zip(&e.value) {
                assert!((o - v).abs() < 1e-3, "{out:?} vs {:?}", e.value);
            }
        }
        let mut out = vec![0.0f32; 3];
        delta.apply(&[5.0, -3.0, 0.0, 0.0], &mut out);
        assert!(
            out.iter().all(|v| v.abs() < 1e-6),
            "preserved key moved: {out:?}"
        );
        // Order does not matter.
        let swapped = solve_pairs(&[&e2, &e1], None, 0.0, &null, 3).unwrap();
        let (x, y) = (delta.dense(), swapped.dense());
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn decoys_keep_their_outputs_while_edits_get_their_values() {
        // ff = 3, all free. The edit's key shares direction 0 with a decoy (another subject in
        // the same prompt); a heavy decoy leaves the decoy's output near zero and the edit its
        // value, through the direction only the edit has.
        let null = NullSpace {
            ff: 3,
            basis: Mat::from_fn(3, 3, |r, c| f64::from(r == c)),
            variance: vec![0.0; 3],
        };
        let e = edit(vec![1.0, 0.5, 0.0], vec![2.0, -1.0]);
        let decoy = vec![1.0, 0.0, 0.5];
        let out = |delta: &LowRank, k: &[f32]| {
            let mut out = vec![0.0f32; 2];
            delta.apply(k, &mut out);
            out
        };
        let plain = solve_pairs(&[&e], None, 0.0, &null, 2).unwrap();
        let gram = Mat::<f32>::from_fn(3, 3, |r, c| decoy[r] * decoy[c]);
        let guarded = solve_pairs(&[&e], Some(&gram), 1e4, &null, 2).unwrap();
        let norm = |v: Vec<f32>| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            norm(out(&plain, &decoy)) > 0.5,
            "the plain solve moves the decoy"
        );
        assert!(
            norm(out(&guarded, &decoy)) < 1e-2,
            "{:?}",
            out(&guarded, &decoy)
        );
        for (o, v) in out(&guarded, &e.key).iter().zip(&e.value) {
            assert!((o - v).abs() < 1e-2, "edit value {o} vs {v}");
        }
    }
}
