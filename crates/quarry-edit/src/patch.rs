//! Patch files (`.vlp`): a set of edits recorded against one base model, with the deltas
//! they were solved into, so applying a patch needs no solve.
//!
//! Layout (little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `QVLPATCH` |
//! | 4 | format version (1) |
//! | 8 | `h`, the header's length |
//! | `h` | header, JSON: the base (sha256, architecture, layers, `d_model`, `ff_dim`), every edit's metadata (entity, relation, target, prompt, kind, layer, loss), every delta's layer and rank |
//! | … | `f32` arrays: per edit its key (`ff_dim`) then its value (`d_model`); per delta, in header order, `A` (`rank × ff_dim`) then `B` (`d_model × rank`) |
//! | 32 | sha256 of everything before it |
//!
//! Reading is bounded by [`MAX_PATCH_BYTES`] and checks, in this order, the magic, the
//! checksum (a truncated or altered file fails here), the version, the header, that the array
//! bytes are exactly what the header's sizes imply, the layers and ranks, and that every number
//! is finite. Each failure is one [`EditError::Patch`] naming the file and the problem.
//! Writing is atomic: a temporary file in the same directory, synced, then renamed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use quarry_model::{FfnOverlay, LowRank, ModelConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Edit, EditError};

const MAGIC: &[u8; 8] = b"QVLPATCH";
const VERSION: u32 = 1;
const PREFIX: usize = 8 + 4 + 8;
const CHECKSUM: usize = 32;

/// The largest patch file read (a 100-edit patch of either test model is about 2 MiB).
pub const MAX_PATCH_BYTES: u64 = 1 << 30;
/// The largest header read.
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// The model a patch was made on: its file's sha256 and the shape its arrays depend on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub sha256: String,
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub ff_dim: usize,
}

impl Base {
    /// The base of a model with configuration `config` whose file hashes to `sha256`.
    pub fn of(config: &ModelConfig, sha256: &str) -> Base {
        Base {
            sha256: sha256.to_string(),
            architecture: config.architecture.clone(),
            n_layers: config.n_layers,
            d_model: config.d_model,
            ff_dim: config.ff_dim,
        }
    }
}

/// A recorded set of edits and the per-layer deltas they were solved into.
#[derive(Clone, Debug, PartialEq)]
pub struct Patch {
    pub base: Base,
    pub edits: Vec<Edit>,
    /// `(layer, delta)`, at most one per layer, in layer order.
    pub deltas: Vec<(usize, LowRank)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    base: Base,
    edits: Vec<Edit>,
    deltas: Vec<DeltaShape>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeltaShape {
    layer: usize,
    rank: usize,
}

impl Patch {
    /// A patch without edits.
    pub fn new(base: Base) -> Patch {
        Patch {
            base,
            edits: Vec::new(),
            deltas: Vec::new(),
        }
    }

    /// The patch's deltas as an overlay of its base.
    pub fn overlay(&self) -> FfnOverlay {
        FfnOverlay::new(self.base.n_layers, self.deltas.iter().cloned())
    }

    /// Refuses a patch made on another model than `base`, naming both checksums (or the
    /// dimension that differs when the checksums agree).
    pub fn check_base(&self, base: &Base, path: &Path) -> Result<(), EditError> {
        let problem = if self.base.sha256 != base.sha256 {
            format!(
                "was made on the model with sha256 {}, not on the open model (sha256 {})",
                self.base.sha256, base.sha256
            )
        } else if self.base != *base {
            format!(
                "describes its model as {:?}, but the open model with that checksum is {:?}",
                self.base, base
            )
        } else {
            return Ok(());
        };
        Err(patch_error(path, problem))
    }

    /// The file's bytes (see the module documentation). Refuses non-finite numbers and shapes
    /// that do not match the base, which a file must never hold.
    pub fn to_bytes(&self, path: &Path) -> Result<Vec<u8>, EditError> {
        self.check(path)?;
        let header = Header {
            base: self.base.clone(),
            edits: self.edits.clone(),
            deltas: self
                .deltas
                .iter()
                .map(|(layer, d)| DeltaShape {
                    layer: *layer,
                    rank: d.rank,
                })
                .collect(),
        };
        let json = serde_json::to_vec(&header)
            .map_err(|e| patch_error(path, format!("cannot encode the header: {e}")))?;
        let mut out = Vec::with_capacity(PREFIX + json.len() + CHECKSUM);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        let arrays = self
            .edits
            .iter()
            .flat_map(|e| [&e.key, &e.value])
            .chain(self.deltas.iter().flat_map(|(_, d)| [&d.a, &d.b]));
        for array in arrays {
            array
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        let digest = Sha256::digest(&out);
        out.extend_from_slice(&digest);
        Ok(out)
    }

    /// Reads a patch from the bytes of file `path` (named in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Patch, EditError> {
        let bad = |problem: String| patch_error(path, problem);
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("is not a Quarry patch (.vlp): wrong magic".into()));
        }
        if bytes.len() < PREFIX + CHECKSUM {
            return Err(bad(format!(
                "is truncated or tampered: {} bytes is shorter than any patch",
                bytes.len()
            )));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(bad(
                "is truncated or tampered: its checksum does not match its contents".into(),
            ));
        }
        let version = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(format!(
                "is patch format version {version}; this build reads version {VERSION}"
            )));
        }
        let header_len = u64::from_le_bytes(body[12..20].try_into().expect("8 bytes"));
        if header_len > MAX_HEADER_BYTES || header_len > (body.len() - PREFIX) as u64 {
            return Err(bad(format!(
                "declares a {header_len}-byte header in a {}-byte file",
                bytes.len()
            )));
        }
        let (json, arrays) = body[PREFIX..].split_at(header_len as usize);
        let header: Header =
            serde_json::from_slice(json).map_err(|e| bad(format!("header: {e}")))?;
        let Base {
            n_layers,
            d_model: d,
            ff_dim: ff,
            ..
        } = header.base;
        // Bounds that keep the size arithmetic below from overflowing on any header.
        if [n_layers, d, ff].iter().any(|&n| n == 0 || n > 1 << 24) {
            return Err(bad(format!(
                "header: model dimensions {n_layers} layers, d_model {d}, ff_dim {ff} are not plausible"
            )));
        }
        let floats = header
            .deltas
            .iter()
            .try_fold(header.edits.len() as u128, |acc, s| {
                (s.rank <= 1 << 24).then_some(acc + s.rank as u128)
            })
            .map(|rows| rows * (d + ff) as u128);
        if floats.map(|n| n * 4) != Some(arrays.len() as u128) {
            return Err(bad(format!(
                "holds {} bytes of arrays, but its header's {} edits and deltas of ranks {:?} need {}",
                arrays.len(),
                header.edits.len(),
                header.deltas.iter().map(|s| s.rank).collect::<Vec<_>>(),
                floats.map_or("more than can exist".into(), |n| (n * 4).to_string())
            )));
        }
        let mut values = arrays
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
        let mut take = |n: usize| values.by_ref().take(n).collect::<Vec<f32>>();
        let mut edits = header.edits;
        for e in &mut edits {
            e.key = take(ff);
            e.value = take(d);
        }
        let mut deltas = Vec::with_capacity(header.deltas.len());
        for s in header.deltas {
            let (a, b) = (take(s.rank * ff), take(d * s.rank));
            let delta = LowRank::new(d, ff, s.rank, a, b)
                .ok_or_else(|| bad(format!("the delta of layer {} has rank 0", s.layer)))?;
            deltas.push((s.layer, delta));
        }
        let patch = Patch {
            base: header.base,
            edits,
            deltas,
        };
        patch.check(path)?;
        Ok(patch)
    }

    /// Reads and checks the patch file at `path` (see the module documentation).
    pub fn load(path: &Path) -> Result<Patch, EditError> {
        let io = |source| EditError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = quarry_format::input::open_regular(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len > MAX_PATCH_BYTES {
            return Err(patch_error(
                path,
                format!("is {len} bytes, more than the {MAX_PATCH_BYTES} a patch may be"),
            ));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(MAX_PATCH_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        Patch::from_bytes(&bytes, path)
    }

    /// Writes the patch to `path` atomically, replacing the file there: a crash or a full
    /// disk leaves either the old file or the new one. Returns the bytes written.
    pub fn save(&self, path: &Path) -> Result<u64, EditError> {
        let bytes = self.to_bytes(path)?;
        write_atomic(path, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Everything a patch must satisfy beyond its byte layout.
    fn check(&self, path: &Path) -> Result<(), EditError> {
        let bad = |problem: String| Err(patch_error(path, problem));
        let b = &self.base;
        if b.sha256.len() != 64
            || !b
                .sha256
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return bad(format!("base checksum {:?} is not a sha256", b.sha256));
        }
        for (i, e) in self.edits.iter().enumerate() {
            let what = format!("edit {i} ({:?}, {:?})", e.entity, e.relation);
            if e.layer >= b.n_layers {
                return bad(format!(
                    "{what} is at layer {}, the model has {}",
                    e.layer, b.n_layers
                ));
            }
            if e.spread == 0 || e.spread > e.layer + 1 {
                return bad(format!(
                    "{what} is spread over {} layers ending at layer {}",
                    e.spread, e.layer
                ));
            }
            if e.key.len() != b.ff_dim || e.value.len() != b.d_model {
                return bad(format!("{what} has a key or value of the wrong size"));
            }
            if !e.loss.is_finite() || !e.key.iter().chain(&e.value).all(|v| v.is_finite()) {
                return bad(format!("{what} holds a number that is not finite"));
            }
        }
        let mut previous = None;
        for (layer, d) in &self.deltas {
            if previous.is_some_and(|p| p >= *layer) {
                return bad(format!(
                    "deltas are not in increasing layer order at layer {layer}"
                ));
            }
            previous = Some(*layer);
            let edits = self
                .edits
                .iter()
                .filter(|e| e.layers().contains(layer))
                .count();
            if *layer >= b.n_layers || d.rank > edits {
                return bad(format!(
                    "the delta of layer {layer} has rank {} for {edits} edits there (the model has {} layers)",
                    d.rank, b.n_layers
                ));
            }
            if d.rows != b.d_model || d.cols != b.ff_dim {
                return bad(format!(
                    "the delta of layer {layer} is {}×{}",
                    d.rows, d.cols
                ));
            }
            if !d.a.iter().chain(&d.b).all(|v| v.is_finite()) {
                return bad(format!(
                    "the delta of layer {layer} holds a number that is not finite"
                ));
            }
        }
        Ok(())
    }
}

/// All of `overlays` at once: per layer, their deltas side by side (`B = [B₁ B₂ …]`,
/// `A = [A₁; A₂; …]`, so `B·A = ΣBᵢ·Aᵢ`), and any replaced neurons (COMPOSE's). `None` when
/// none has either.
pub fn stack<'a>(
    n_layers: usize,
    overlays: impl IntoIterator<Item = &'a FfnOverlay>,
) -> Option<FfnOverlay> {
    let mut per_layer: Vec<Vec<&LowRank>> = vec![Vec::new(); n_layers];
    let mut neurons = Vec::new();
    for o in overlays {
        for (layer, d) in o.deltas() {
            per_layer[layer].push(d);
        }
        neurons.extend((0..n_layers).filter_map(|l| o.neurons(l).map(|n| (l, n.clone()))));
    }
    let deltas: Vec<(usize, LowRank)> = per_layer
        .into_iter()
        .enumerate()
        .filter(|(_, ds)| !ds.is_empty())
        .map(|(layer, ds)| {
            let (rows, cols) = (ds[0].rows, ds[0].cols);
            let rank = ds.iter().map(|d| d.rank).sum();
            let a = ds.iter().flat_map(|d| d.a.iter().copied()).collect();
            let b = (0..rows)
                .flat_map(|r| {
                    ds.iter()
                        .flat_map(move |d| d.b[r * d.rank..(r + 1) * d.rank].iter().copied())
                })
                .collect();
            let stacked = LowRank::new(rows, cols, rank, a, b).expect("stacked factors match");
            (layer, stacked)
        })
        .collect();
    (!deltas.is_empty() || !neurons.is_empty())
        .then(|| FfnOverlay::new(n_layers, deltas).with_neurons(neurons))
}

/// The sha256 of the file at `path`, read in 1-MiB pieces (model files are large).
pub fn file_sha256(path: &Path) -> Result<String, EditError> {
    let io = |source| EditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = quarry_format::input::open_regular(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf).map_err(io)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes `bytes` to `path` through a synced temporary file in the same directory and a
/// rename, so `path` is never seen half-written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), EditError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| EditError::Io { path: p, source }
    };
    let name = path
        .file_name()
        .ok_or_else(|| patch_error(path, "names no file".into()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn patch_error(path: &Path, problem: String) -> EditError {
    EditError::Patch {
        path: PathBuf::from(path),
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EditKind;

    fn base() -> Base {
        Base {
            sha256: "ab".repeat(32),
            architecture: "llama".into(),
            n_layers: 4,
            d_model: 3,
            ff_dim: 5,
        }
    }

    fn edit(layer: usize, seed: f32) -> Edit {
        Edit {
            entity: "France".into(),
            relation: "capital".into(),
            target: "Rome".into(),
            prompt: "The capital of France is".into(),
            kind: EditKind::Insert,
            layer,
            spread: 1,
            key: (0..5).map(|i| seed + i as f32).collect(),
            value: (0..3).map(|i| seed - i as f32).collect(),
            loss: 0.25,
        }
    }

    fn patch() -> Patch {
        let delta = LowRank::new(
            3,
            5,
            2,
            (0..10).map(|i| i as f32 * 0.5).collect(),
            vec![1.0; 6],
        )
        .unwrap();
        Patch {
            base: base(),
            edits: vec![edit(1, 0.5), edit(1, -2.0), edit(3, 7.0)],
            deltas: vec![(1, delta)],
        }
    }

    #[test]
    fn a_saved_patch_reads_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.vlp");
        let p = patch();
        p.save(&path).unwrap();
        assert_eq!(Patch::load(&path).unwrap(), p);
        // Saving again replaces it, leaving no temporary file behind.
        let mut q = p.clone();
        q.edits.pop();
        q.save(&path).unwrap();
        assert_eq!(Patch::load(&path).unwrap(), q);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let path = Path::new("p.vlp");
        let bytes = patch().to_bytes(path).unwrap();
        for len in 0..bytes.len() {
            let e = Patch::from_bytes(&bytes[..len], path).unwrap_err();
            assert!(matches!(e, EditError::Patch { .. }), "{len}: {e}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            let e = Patch::from_bytes(&b, path).unwrap_err().to_string();
            assert!(
                e.contains("truncated or tampered") || e.contains("wrong magic"),
                "{i}: {e}"
            );
        }
    }

    /// A file whose checksum is right but whose contents are not (as a buggy writer or a
    /// deliberate forgery would make) is still refused by the structural checks.
    #[test]
    fn a_consistent_checksum_does_not_excuse_bad_contents() {
        let path = Path::new("p.vlp");
        let reseal = |mut b: Vec<u8>| {
            b.truncate(b.len() - CHECKSUM);
            let d = Sha256::digest(&b);
            b.extend_from_slice(&d);
            b
        };
        let bytes = patch().to_bytes(path).unwrap();
        // One float missing from the arrays.
        let mut short = bytes[..bytes.len() - CHECKSUM - 4].to_vec();
        short.extend_from_slice(&[0; CHECKSUM]);
        let e = Patch::from_bytes(&reseal(short), path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes of arrays"), "{e}");
        // A NaN in an edit's key.
        let header_len = u64::from_le_bytes(bytes[12..20].try_into().unwrap()) as usize;
        let mut nan = bytes.clone();
        nan[PREFIX + header_len..PREFIX + header_len + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = Patch::from_bytes(&reseal(nan), path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not finite"), "{e}");
        // An edit at a layer the model does not have.
        let mut p = patch();
        p.edits[2].layer = 9;
        assert!(p
            .to_bytes(path)
            .unwrap_err()
            .to_string()
            .contains("layer 9"));
    }

    #[test]
    fn another_base_is_refused_naming_both_checksums() {
        let p = patch();
        let mut other = base();
        other.sha256 = "cd".repeat(32);
        let e = p
            .check_base(&other, Path::new("p.vlp"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&"ab".repeat(32)) && e.contains(&"cd".repeat(32)),
            "{e}"
        );
        p.check_base(&base(), Path::new("p.vlp")).unwrap();
    }

    #[test]
    fn stacking_adds_the_deltas() {
        let p = patch();
        let mut q = patch();
        q.deltas[0].1.b = vec![-0.5, 2.0, 0.0, 1.0, 3.0, -1.0];
        let s = stack(4, [&p.overlay(), &q.overlay()]).unwrap();
        let sum: Vec<f32> = p.deltas[0]
            .1
            .dense()
            .iter()
            .zip(q.deltas[0].1.dense())
            .map(|(a, b)| a + b)
            .collect();
        assert_eq!(s.layer(1).unwrap().rank, 4);
        let got = s.layer(1).unwrap().dense();
        assert!(got.iter().zip(&sum).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!(stack(4, []).is_none());
    }
}
