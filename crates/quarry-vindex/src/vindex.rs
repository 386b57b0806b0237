//! Opening a vindex: the manifest is read (capped, regular files only) and checked as a whole
//! (see [`crate::check`]): format, version, dimensions, bands, that every file the level needs
//! is listed with the size its shape implies. Each data file is then memory-mapped and its
//! length compared with the manifest before any of it is read, and the contents queries index
//! with (relation and token ids, the embedded model's configuration) are checked against the
//! manifest. Hashes are checked only by [`Vindex::verify`], which reads everything.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use quarry_format::input::{open_regular, read_capped};
use quarry_format::GgufFile;
use quarry_kernels::pool;
use quarry_kernels::vec::dot;
use quarry_model::{FeatureOwner, ModelConfig, Router};
use quarry_tokenize::Tokenizer;

use crate::check::{self, MAX_INDEX_BYTES};
use crate::error::{io, VindexError};
use crate::extract::hash_file;
use crate::layout::{
    Dtype, Element, FileEntry, Index, Level, DOWN, EMBEDDINGS, FEATURE_STATS, GATE, INDEX, MODEL,
    NORMS, RELATIONS, ROUTER, TOKENIZER, UP, WRITES,
};
use crate::relations::Relations;
use crate::TokenLogit;

/// An open vindex.
pub struct Vindex {
    dir: PathBuf,
    index: Index,
    maps: HashMap<&'static str, Mmap>,
    tokenizer: Tokenizer,
    relations: Relations,
    /// The model file of an `inference` or `all` vindex, validated and checked against the
    /// manifest.
    model: Option<Arc<GgufFile>>,
}

/// A file that did not match its manifest entry, from [`Vindex::verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub file: String,
    pub problem: String,
}

impl Vindex {
    /// Opens the vindex in directory `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Vindex, VindexError> {
        let dir = dir.as_ref().to_path_buf();
        let index = read_index(&dir)?;
        let shown = dir.display().to_string();
        let mut maps = HashMap::new();
        for (name, element, shape) in expected_files(&index) {
            let entry = index.file(name).ok_or(VindexError::MissingFile {
                path: shown.clone(),
                file: name,
                level: index.level.name(),
            })?;
            let bad = |problem: String| VindexError::BadFile {
                path: shown.clone(),
                file: name.into(),
                problem,
            };
            if entry.element != element || (!shape.is_empty() && entry.shape != shape) {
                return Err(bad(format!(
                    "is described as {:?} {:?}; this model needs {:?} {:?}",
                    entry.element, entry.shape, element, shape
                )));
            }
            let implied = entry
                .shape
                .iter()
                .try_fold(element.size() as u64, |acc, &n| acc.checked_mul(n));
            if !entry.shape.is_empty() && implied != Some(entry.bytes) {
                return Err(bad(format!(
                    "has {} bytes in the manifest but its shape {:?} does not",
                    entry.bytes, entry.shape
                )));
            }
            let path = dir.join(name);
            let file = open_regular(&path).map_err(io(&path, "open"))?;
            let on_disk = file.metadata().map_err(io(&path, "stat"))?.len();
            if on_disk != entry.bytes {
                return Err(bad(format!(
                    "is {on_disk} bytes on disk, the manifest says {} (truncated or replaced?)",
                    entry.bytes
                )));
            }
            // The GGUF files are opened by their own reader below.
            if matches!(name, TOKENIZER | MODEL) {
                continue;
            }
            // SAFETY: the vindex is read-only to Quarry; like any memory-mapped reader we rely
            // on nobody truncating the file while it is open.
            let map = unsafe { Mmap::map(&file) }.map_err(io(&path, "memory-map"))?;
            maps.insert(name, map);
        }
        let tokenizer = Tokenizer::from_gguf(&quarry_format::GgufFile::open(dir.join(TOKENIZER))?)?;
        if tokenizer.vocab_size() != index.model.vocab_size {
            return Err(VindexError::BadFile {
                path: shown,
                file: TOKENIZER.into(),
                problem: format!(
                    "has {} tokens but the model has {}",
                    tokenizer.vocab_size(),
                    index.model.vocab_size
                ),
            });
        }
        let relations = check::parse_relations(&maps[RELATIONS], &index, &shown)?;
        check::check_writes(bytemuck::cast_slice(&maps[WRITES]), &index, &shown)?;
        let model = match index.level >= Level::Inference {
            true => {
                let file = GgufFile::open(dir.join(MODEL))?;
                check::check_model(&index, &ModelConfig::from_gguf(&file)?, &shown)?;
                Some(Arc::new(file))
            }
            false => None,
        };
        Ok(Vindex {
            dir,
            index,
            maps,
            tokenizer,
            relations,
            model,
        })
    }

    /// The relations found at extraction (see [`crate::relations`]).
    pub fn relations(&self) -> &Relations {
        &self.relations
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model file inside an `inference` or `all` vindex.
    pub fn model_path(&self) -> Result<PathBuf, VindexError> {
        self.require(MODEL, Level::Inference)?;
        Ok(self.dir.join(MODEL))
    }

    /// The model inside an `inference` or `all` vindex, opened and checked with the vindex
    /// (shared: a [`quarry_model::Model`] loaded over it keeps it mapped).
    pub fn model_file(&self) -> Result<Arc<GgufFile>, VindexError> {
        self.require(MODEL, Level::Inference)?;
        Ok(Arc::clone(
            self.model
                .as_ref()
                .expect("opened with the vindex at this level"),
        ))
    }

    /// Token `token`'s embedding row as stored (before the model's `embed_scale`).
    pub fn embedding(&self, token: u32) -> Vec<f32> {
        let d = self.index.model.d_model;
        self.floats(EMBEDDINGS, token as usize * d, d)
    }

    /// `gate_l · x` for every feature of layer `layer` (`x` has `d_model` values).
    pub fn gate_scores(&self, layer: usize, x: &[f32]) -> Vec<f32> {
        self.matvec(GATE, layer, x)
    }

    /// `up_l · x` for every feature of layer `layer`.
    pub fn up_scores(&self, layer: usize, x: &[f32]) -> Vec<f32> {
        self.matvec(UP, layer, x)
    }

    /// Feature `feature`'s gate vector at layer `layer`.
    pub fn gate_vector(&self, layer: usize, feature: usize) -> Vec<f32> {
        let (ff, d) = (self.index.model.ff_dim, self.index.model.d_model);
        self.floats(GATE, (layer * ff + feature) * d, d)
    }

    /// Feature `feature`'s down (write) vector at layer `layer` (an `all` vindex only).
    pub fn down_vector(&self, layer: usize, feature: usize) -> Result<Vec<f32>, VindexError> {
        self.require(DOWN, Level::All)?;
        let (ff, d) = (self.index.model.ff_dim, self.index.model.d_model);
        Ok(self.floats(DOWN, (layer * ff + feature) * d, d))
    }

    /// The gains of layer `layer`'s pre-FFN norm (`layer == n_layers`: the final norm).
    pub fn norm(&self, layer: usize) -> &[f32] {
        let d = self.index.model.d_model;
        let all: &[f32] = bytemuck::cast_slice(&self.maps[NORMS][..]);
        &all[layer * d..(layer + 1) * d]
    }

    /// Layer `layer`'s router, in a mixture-of-experts vindex (the model's own routing over
    /// the stored rows).
    pub fn router(&self, layer: usize) -> Option<Router<'_>> {
        let e = self.index.model.experts.as_ref()?;
        let d = self.index.model.d_model;
        let all: &[f32] = bytemuck::cast_slice(&self.maps[ROUTER][..]);
        let rows = &all[layer * e.router_rows() * d..(layer + 1) * e.router_rows() * d];
        let (experts, shared) = rows.split_at(e.count * d);
        Some(Router {
            weights: experts,
            experts: e.count,
            shared_gate: e.shared_gate.then_some(shared),
            used: e.used,
            normalize: e.normalize,
            scale: e.scale,
        })
    }

    /// What feature `feature` of a layer is: a neuron of the dense FFN, or of an expert.
    pub fn feature_owner(&self, feature: usize) -> Option<FeatureOwner> {
        let m = &self.index.model;
        match &m.experts {
            None => FeatureOwner::of(feature, &[m.ff_dim], 0),
            Some(e) => FeatureOwner::of(feature, &e.block_widths(), e.count),
        }
    }

    /// Per feature of layer `layer`, the weight its block gets for the FFN input `xn`: 1 in
    /// a dense model; in a mixture of experts the routing weight of its expert (0 where the
    /// router does not choose it) or the shared expert's gate.
    pub fn feature_weights(&self, layer: usize, xn: &[f32]) -> Vec<f32> {
        let m = &self.index.model;
        let (Some(e), Some(router)) = (&m.experts, self.router(layer)) else {
            return vec![1.0; m.ff_dim];
        };
        let widths = e.block_widths();
        let weights = router.block_weights(xn, widths.len());
        widths
            .iter()
            .zip(weights)
            .flat_map(|(&w, b)| std::iter::repeat_n(b, w))
            .collect()
    }

    /// Mean and standard deviation of feature `feature`'s activation at layer `layer` over the
    /// calibration tokens' browsing inputs (see `docs/vindex.md`).
    pub fn activation_stats(&self, layer: usize, feature: usize) -> (f32, f32) {
        let ff = self.index.model.ff_dim;
        let all: &[f32] = bytemuck::cast_slice(&self.maps[FEATURE_STATS][..]);
        let at = (layer * ff + feature) * 2;
        (all[at], all[at + 1])
    }

    /// The tokens feature `feature` of layer `layer` pushes up most (highest logit first) and
    /// down most (lowest first), per unit of activation.
    pub fn writes(&self, layer: usize, feature: usize) -> (&[TokenLogit], &[TokenLogit]) {
        let k = self.index.top_k;
        let ff = self.index.model.ff_dim;
        let all: &[TokenLogit] = bytemuck::cast_slice(&self.maps[WRITES][..]);
        let rec = &all[(layer * ff + feature) * 2 * k..][..2 * k];
        rec.split_at(k)
    }

    /// Checks the vindex as a whole: the manifest's structure (as [`Vindex::open`] does; a
    /// manifest that fails is an error), then every listed file's size and hash; when all of
    /// those match, the contents are checked by opening it. An empty list means all is well.
    pub fn verify(dir: impl AsRef<Path>) -> Result<Vec<Mismatch>, VindexError> {
        let dir = dir.as_ref();
        let index = read_index(dir)?;
        let mut mismatches = Vec::new();
        for (name, ..) in expected_files(&index) {
            if index.file(name).is_none() {
                mismatches.push(Mismatch {
                    file: name.into(),
                    problem: format!("is not listed, and a {} vindex has it", index.level.name()),
                });
            }
        }
        for FileEntry {
            name,
            bytes,
            sha256,
            ..
        } in &index.files
        {
            let path = dir.join(name);
            let (digest, len) = match hash_file(&path, *bytes) {
                Ok(hashed) => hashed,
                Err(VindexError::Io { source, .. }) => {
                    let problem = match source.kind() {
                        std::io::ErrorKind::NotFound => "is missing".to_string(),
                        _ => format!("cannot be read: {source}"),
                    };
                    mismatches.push(Mismatch {
                        file: name.clone(),
                        problem,
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            if len != *bytes {
                mismatches.push(Mismatch {
                    file: name.clone(),
                    problem: match len > *bytes {
                        true => format!("is longer than the {bytes} bytes the manifest says"),
                        false => format!("is {len} bytes, the manifest says {bytes}"),
                    },
                });
            } else if digest != *sha256 {
                mismatches.push(Mismatch {
                    file: name.clone(),
                    problem: format!("has sha256 {digest}, the manifest says {sha256}"),
                });
            }
        }
        if mismatches.is_empty() {
            Vindex::open(dir)?;
        }
        Ok(mismatches)
    }

    fn require(&self, file: &'static str, needed: Level) -> Result<(), VindexError> {
        let present = match file {
            MODEL => self.model.is_some(),
            _ => self.maps.contains_key(file),
        };
        if present {
            return Ok(());
        }
        Err(VindexError::LevelTooLow {
            path: self.dir.display().to_string(),
            file,
            level: self.index.level.name(),
            needed: needed.name(),
        })
    }

    /// `len` values of an f16/f32 array file starting at element `start`, as `f32`.
    fn floats(&self, file: &str, start: usize, len: usize) -> Vec<f32> {
        let bytes = &self.maps[file][..];
        match self.index.dtype {
            Dtype::F32 => bytemuck::cast_slice::<u8, f32>(bytes)[start..start + len].to_vec(),
            Dtype::F16 => bytemuck::cast_slice::<u8, f16>(bytes)[start..start + len]
                .iter()
                .map(|h| h.to_f32())
                .collect(),
        }
    }

    fn matvec(&self, file: &str, layer: usize, x: &[f32]) -> Vec<f32> {
        let (ff, d) = (self.index.model.ff_dim, self.index.model.d_model);
        assert_eq!(
            x.len(),
            d,
            "matvec: x has {} values, d_model is {d}",
            x.len()
        );
        let bytes = &self.maps[file][..];
        let range = layer * ff * d..(layer + 1) * ff * d;
        let mut out = vec![0.0f32; ff];
        // Rows per task: enough work to amortize a dispatch, small enough to balance.
        const ROWS: usize = 128;
        pool::global().for_each_chunk_mut(&mut out, ROWS, &|c, out| {
            let first = range.start + c * ROWS * d;
            let n = out.len() * d;
            match self.index.dtype {
                Dtype::F32 => {
                    let rows = &bytemuck::cast_slice::<u8, f32>(bytes)[first..first + n];
                    for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
                        *o = dot(row, x);
                    }
                }
                Dtype::F16 => {
                    // Widened a row at a time (F16C where the CPU has it), then dotted.
                    let rows = &bytemuck::cast_slice::<u8, f16>(bytes)[first..first + n];
                    let mut row32 = vec![0.0f32; d];
                    for (o, row) in out.iter_mut().zip(rows.chunks_exact(d)) {
                        row.convert_to_f32_slice(&mut row32);
                        *o = dot(&row32, x);
                    }
                }
            }
        });
        out
    }
}

fn read_index(dir: &Path) -> Result<Index, VindexError> {
    let path = dir.join(INDEX);
    let bytes = read_capped(&path, MAX_INDEX_BYTES, "a vindex manifest")
        .map_err(io(&path, "read the manifest"))?;
    check::parse_index(&bytes, &dir.display().to_string())
}

/// The files `index`'s level requires, with their element type and (for arrays) shape.
fn expected_files(index: &Index) -> Vec<(&'static str, Element, Vec<u64>)> {
    let m = &index.model;
    let (l, ff, d, v) = (
        m.n_layers as u64,
        m.ff_dim as u64,
        m.d_model as u64,
        m.vocab_size as u64,
    );
    let float = Element::from(index.dtype);
    let mut files = vec![
        (TOKENIZER, Element::Bytes, vec![]),
        (RELATIONS, Element::Bytes, vec![]),
        (EMBEDDINGS, float, vec![v, d]),
        (GATE, float, vec![l, ff, d]),
        (UP, float, vec![l, ff, d]),
        (NORMS, Element::F32, vec![l + 1, d]),
        (FEATURE_STATS, Element::F32, vec![l, ff, 2]),
        (
            WRITES,
            Element::TokenLogit,
            vec![l, ff, 2 * index.top_k as u64],
        ),
    ];
    if index.level >= Level::Inference {
        files.push((MODEL, Element::Bytes, vec![]));
    }
    if index.level >= Level::All {
        files.push((DOWN, float, vec![l, ff, d]));
    }
    if let Some(e) = &m.experts {
        files.push((ROUTER, Element::F32, vec![l, e.router_rows() as u64, d]));
    }
    files
}
