//! What the edited layer must keep doing, and the solve that respects it.
//!
//! [`KeyStats`] is the covariance of the edited layer's FFN keys over ordinary text (the
//! inputs whose outputs an edit must not change) in eigen-form; [`NullSpace`] is the span of
//! its smallest eigenvectors. [`solve`] finds the one low-rank change of the down projection
//! that gives every edit of a patch its value, restricted to that null space (AlphaEdit):
//! `ΔW = R·(KᵀPK + αI)⁻¹·(PK)ᵀ`, `P = N·Nᵀ`. It is a function of the set of edits only, so the
//! order edits were made in does not matter, and dropping an edit is re-solving without it.

use std::io::{Read, Write};
use std::path::Path;

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use quarry_model::{ForwardObserver, LowRank, Model};

use crate::edit::Edit;
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
    /// layer `layer`'s FFN hidden activations.
    pub fn compute(
        model: &Model,
        layer: usize,
        tokens: &[u32],
        chunk: usize,
    ) -> Result<KeyStats, EditError> {
        let ff = model.config().ff_dim;
        let mut moment = Mat::<f64>::zeros(ff, ff);
        let mut seen = 0usize;
        for part in tokens.chunks(chunk.max(1)) {
            let mut grab = Grab { layer, keys: None };
            let mut cache = model.new_cache(part.len());
            model
                .forward_observed(part, &mut cache, 0..1, &mut grab)
                .map_err(|e| EditError::Model(e.to_string()))?;
            let keys = grab
                .keys
                .ok_or_else(|| EditError::Stats("the layer was never reached".into()))?;
            let n = keys.len() / ff;
            let h = Mat::<f64>::from_fn(n, ff, |i, j| keys[i * ff + j] as f64);
            moment += h.transpose() * &h;
            seen += n;
        }
        if seen == 0 {
            return Err(EditError::Stats("no tokens of text".into()));
        }
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
            basis: self.eigenvectors[..m * ff].to_vec(),
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

/// An orthonormal basis `N` (`ff × m`, column-major) of the directions ordinary keys do not use.
pub struct NullSpace {
    ff: usize,
    basis: Vec<f32>,
}

impl NullSpace {
    /// Dimensions of the null space.
    pub fn dim(&self) -> usize {
        self.basis.len() / self.ff.max(1)
    }

    /// `Nᵀ·k`.
    fn coordinates(&self, key: &[f32]) -> Vec<f64> {
        self.basis
            .chunks_exact(self.ff)
            .map(|n| n.iter().zip(key).map(|(a, b)| (a * b) as f64).sum())
            .collect()
    }

    /// `N·c`.
    fn expand(&self, coords: &[f64]) -> Vec<f32> {
        let mut out = vec![0.0f64; self.ff];
        for (n, &c) in self.basis.chunks_exact(self.ff).zip(coords) {
            out.iter_mut().zip(n).for_each(|(o, &x)| *o += c * x as f64);
        }
        out.into_iter().map(|v| v as f32).collect()
    }
}

/// The low-rank change of the down projection that gives each edit its value (all edits at
/// the same layer), restricted to `null`; `ridge` is relative to the mean of `diag(KᵀPK)`.
/// `None` without edits.
pub fn solve(edits: &[&Edit], null: &NullSpace, ridge: f32, d_model: usize) -> Option<LowRank> {
    let n = edits.len();
    if n == 0 || null.dim() == 0 {
        return None;
    }
    // Coordinates of every key in the null space: PK = N·C, KᵀPK = CᵀC.
    let coords: Vec<Vec<f64>> = edits.iter().map(|e| null.coordinates(&e.key)).collect();
    let gram = Mat::<f64>::from_fn(n, n, |i, j| {
        coords[i].iter().zip(&coords[j]).map(|(a, b)| a * b).sum()
    });
    let mean_diag = (0..n).map(|i| gram[(i, i)]).sum::<f64>() / n as f64;
    let alpha = (ridge as f64 * mean_diag).max(1e-12);
    let regularised =
        Mat::<f64>::from_fn(n, n, |i, j| gram[(i, j)] + if i == j { alpha } else { 0.0 });
    // B = R·(KᵀPK + αI)⁻¹, i.e. Bᵀ = (KᵀPK + αI)⁻¹·Rᵀ (the matrix is symmetric).
    let rt = Mat::<f64>::from_fn(n, d_model, |i, j| edits[i].value[j] as f64);
    let bt = regularised.partial_piv_lu().solve(&rt);
    let b: Vec<f32> = (0..d_model)
        .flat_map(|r| (0..n).map(move |c| (r, c)))
        .map(|(r, c)| bt[(c, r)] as f32)
        .collect();
    let a: Vec<f32> = coords.iter().flat_map(|c| null.expand(c)).collect();
    LowRank::new(d_model, null.ff, n, a, b)
}

/// Collects one layer's FFN hidden activations.
struct Grab {
    layer: usize,
    keys: Option<Vec<f32>>,
}

impl ForwardObserver for Grab {
    fn ffn_activations(&mut self, layer: usize, _input: &[f32], activations: &[f32]) {
        if layer == self.layer {
            self.keys = Some(activations.to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::EditKind;

    fn edit(key: Vec<f32>, value: Vec<f32>) -> Edit {
        Edit {
            entity: "e".into(),
            relation: "r".into(),
            target: "t".into(),
            prompt: "p".into(),
            kind: EditKind::Insert,
            layer: 0,
            key,
            value,
            loss: 0.0,
        }
    }

    #[test]
    fn the_solve_gives_each_key_its_value_and_leaves_the_preserved_space_alone() {
        // ff = 4: ordinary keys live in dims 0..2, the null space is dims 2..4.
        let null = NullSpace {
            ff: 4,
            basis: vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        };
        let e1 = edit(vec![0.3, 0.1, 1.0, 0.0], vec![1.0, -2.0, 0.5]);
        let e2 = edit(vec![0.2, 0.0, 0.5, 2.0], vec![0.0, 1.0, 1.0]);
        let delta = solve(&[&e1, &e2], &null, 1e-6, 3).unwrap();
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
        let swapped = solve(&[&e2, &e1], &null, 1e-6, 3).unwrap();
        let (x, y) = (delta.dense(), swapped.dense());
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
