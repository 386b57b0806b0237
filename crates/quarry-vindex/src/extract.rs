//! `quarry extract`: a GGUF model → a vindex directory.
//!
//! The extractor streams: it decodes one layer's matrices at a time (never the whole model in
//! `f32`), writes each data file through a SHA-256 hasher, and builds everything in a
//! temporary sibling directory that is renamed into place only when the manifest is written,
//! so an interrupted extraction never leaves something that looks like a vindex.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use half::f16;
use half::slice::HalfFloatSliceExt;
use quarry_format::{GgufFile, GgufWriter};
use quarry_kernels::vec::{gelu_tanh_mul, silu_mul};
use quarry_kernels::{matmul, pool, WeightView};
use quarry_model::ops::rms_norm;
use quarry_model::{Activation, FeatureBlock, FfnFeatures, Model};
use quarry_tokenize::Tokenizer;
use sha2::{Digest, Sha256};

use crate::check;
use crate::error::{io, VindexError};
use crate::layout::{
    Bands, Dtype, Element, ExpertInfo, FileEntry, Index, Level, ModelInfo, Provenance, DOWN,
    EMBEDDINGS, FEATURE_STATS, FORMAT, GATE, INDEX, MODEL, NORMS, RELATIONS, ROUTER, TOKENIZER, UP,
    VERSION, WRITES,
};
use crate::relations::RelationBuilder;
use crate::TokenLogit;

/// What to extract.
#[derive(Clone, Copy, Debug)]
pub struct ExtractOptions {
    pub level: Level,
    pub dtype: Dtype,
    /// Tokens kept per feature at each end of its vocabulary projection.
    pub top_k: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            level: Level::Browse,
            dtype: Dtype::F16,
            top_k: 10,
        }
    }
}

/// Progress reports: a step name with `done` of `total` units.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub step: &'static str,
    pub done: usize,
    pub total: usize,
}

/// Vocabulary tokens (an even stride through the vocabulary) whose embeddings calibrate each
/// feature's typical activation on browsing inputs.
const CALIBRATION_TOKENS: usize = 4096;

/// Values of the output head computed at once when projecting feature write vectors
/// (bounds the temporary logits buffer to 128 MiB).
const PROJECTION_BUDGET: usize = 32 << 20;

/// Extracts `source` (a GGUF file) into the directory `out`, which must not exist.
pub fn extract(
    source: &Path,
    out: &Path,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Index, VindexError> {
    if options.top_k == 0 {
        return Err(VindexError::Option {
            path: out.display().to_string(),
            problem: "top_k must be at least 1".into(),
        });
    }
    if out.exists() {
        return Err(VindexError::Exists {
            path: out.display().to_string(),
        });
    }
    let file = Arc::new(GgufFile::open(source)?);
    let model = Model::load(Arc::clone(&file))?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let cfg = model.config();
    if options.top_k > cfg.vocab_size {
        return Err(VindexError::Option {
            path: out.display().to_string(),
            problem: format!(
                "top_k {} exceeds the vocabulary of {} tokens",
                options.top_k, cfg.vocab_size
            ),
        });
    }
    debug_assert_eq!(tokenizer.vocab_size(), cfg.vocab_size);
    // Every layer's features are stored in one array per file, so every layer must have the
    // same blocks (all dense, or all routed over the same experts).
    let first = layer_shape(&model.ffn_features(0));
    if let Some(layer) = (1..cfg.n_layers).find(|&l| layer_shape(&model.ffn_features(l)) != first) {
        return Err(VindexError::Invalid {
            path: source.display().to_string(),
            file: "model",
            problem: format!(
                "layer {layer}'s FFN is not shaped like layer 0's (dense layers beside \
                 mixture-of-experts ones); the vindex keeps the same features in every layer"
            ),
        });
    }

    let tmp = temp_dir_for(out);
    fs::create_dir_all(&tmp).map_err(io(&tmp, "create the temporary directory"))?;
    let result = write_all(&file, &model, &tokenizer, source, &tmp, options, progress);
    let index = match result {
        Ok(index) => index,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        io(out, "move the finished vindex into place")(e)
    })?;
    Ok(index)
}

/// A layer's feature blocks' widths and whether a router picks among them.
fn layer_shape(f: &FfnFeatures<'_, '_>) -> (Vec<usize>, bool) {
    (
        f.blocks.iter().map(FeatureBlock::width).collect(),
        f.router.is_some(),
    )
}

fn temp_dir_for(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "vindex".into());
    name.push(format!(".tmp-{}", std::process::id()));
    out.with_file_name(name)
}

fn write_all(
    file: &GgufFile,
    model: &Model,
    tokenizer: &Tokenizer,
    source: &Path,
    dir: &Path,
    options: &ExtractOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Index, VindexError> {
    let cfg = model.config();
    let (n_layers, d, vocab) = (cfg.n_layers, cfg.d_model, cfg.vocab_size);
    let first = model.ffn_features(0);
    let ff = first.width();
    let experts = expert_info(model, &first);
    let dtype = options.dtype;
    let mut files = Vec::new();

    progress(Progress {
        step: "hashing the source",
        done: 0,
        total: 1,
    });
    let (source_sha256, source_bytes) = hash_file(source, u64::MAX)?;

    files.push(write_tokenizer(file, dir)?);

    let mut out = DataFile::create(dir, EMBEDDINGS, dtype.into(), vec![vocab as u64, d as u64])?;
    let embd = model.token_embeddings();
    let mut row = vec![0.0f32; d];
    for token in 0..vocab {
        embd.dequantize_row(token, &mut row);
        out.floats(&row, dtype)?;
        if token % 4096 == 0 {
            progress(Progress {
                step: "embeddings",
                done: token,
                total: vocab,
            });
        }
    }
    files.push(out.finish()?);

    let shape = vec![n_layers as u64, ff as u64, d as u64];
    let mut gate = DataFile::create(dir, GATE, dtype.into(), shape.clone())?;
    let mut up = DataFile::create(dir, UP, dtype.into(), shape.clone())?;
    let mut down = match options.level {
        Level::All => Some(DataFile::create(dir, DOWN, dtype.into(), shape)?),
        _ => None,
    };
    let k = options.top_k;
    let mut writes = DataFile::create(
        dir,
        WRITES,
        Element::TokenLogit,
        vec![n_layers as u64, ff as u64, 2 * k as u64],
    )?;
    let mut norms = DataFile::create(
        dir,
        NORMS,
        Element::F32,
        vec![n_layers as u64 + 1, d as u64],
    )?;
    let mut stats = DataFile::create(
        dir,
        FEATURE_STATS,
        Element::F32,
        vec![n_layers as u64, ff as u64, 2],
    )?;
    let mut router = match &experts {
        Some(e) => Some(DataFile::create(
            dir,
            ROUTER,
            Element::F32,
            vec![n_layers as u64, e.router_rows() as u64, d as u64],
        )?),
        None => None,
    };
    let calibration = calibration_inputs(model);
    let bands = Bands::default_for(n_layers);
    let scaled_embedding = |id: u32, row: &mut [f32]| {
        embd.dequantize_row(id as usize, row);
        row.iter_mut().for_each(|v| *v *= cfg.embed_scale);
    };
    progress(Progress {
        step: "relation candidates",
        done: 0,
        total: 1,
    });
    let mut relations = RelationBuilder::new(tokenizer, vocab, d, cfg.norm_eps, scaled_embedding);
    let mut matrix = Vec::new();
    let mut gate_matrix = Vec::new();
    let ones = vec![1.0f32; d];
    for layer in 0..n_layers {
        progress(Progress {
            step: "layers",
            done: layer,
            total: n_layers,
        });
        let w = model.ffn_features(layer);
        decode_blocks(&w, |b| b.gate, &mut gate_matrix);
        gate.floats(&gate_matrix, dtype)?;
        decode_blocks(&w, |b| b.up, &mut matrix);
        up.floats(&matrix, dtype)?;
        norms.floats(w.norm.unwrap_or(&ones), Dtype::F32)?;
        stats.floats(&activation_stats(model, &w, &calibration), Dtype::F32)?;
        if let (Some(out), Some(r)) = (router.as_mut(), &w.router) {
            out.floats(r.weights, Dtype::F32)?;
            if let Some(g) = r.shared_gate {
                out.floats(g, Dtype::F32)?;
            }
        }
        // Feature f writes column f of its block's down matrix; what reaches the head is
        // that direction scaled per dimension by the post-FFN norm (if any) and the final
        // norm.
        let gains: Vec<f32> = (0..d)
            .map(|j| w.post_norm.map_or(1.0, |p| p[j]) * model.output_norm()[j])
            .collect();
        let mut columns = vec![0.0f32; ff * d];
        let mut raw_columns = vec![0.0f32; if down.is_some() { ff * d } else { 0 }];
        let mut first = 0;
        for block in &w.blocks {
            let width = block.width();
            decode_matrix(&block.down, &mut matrix);
            for j in 0..d {
                for f in 0..width {
                    let v = matrix[j * width + f];
                    columns[(first + f) * d + j] = v * gains[j];
                    if let Some(raw) = raw_columns.get_mut((first + f) * d + j) {
                        *raw = v;
                    }
                }
            }
            first += width;
        }
        if let Some(down) = down.as_mut() {
            down.floats(&raw_columns, dtype)?;
        }
        let records = project_to_vocabulary(&model.output_head(), &columns, d, k);
        writes.raw(bytemuck::cast_slice(&records))?;
        if (bands.knowledge[0]..=bands.knowledge[1]).contains(&layer) {
            relations.add_layer(layer, &gate_matrix, w.norm, |f| {
                records[f * 2 * k..f * 2 * k + k]
                    .iter()
                    .map(|r| r.token)
                    .collect()
            });
        }
    }
    progress(Progress {
        step: "clustering relations",
        done: 0,
        total: 1,
    });
    let mut relations = relations.finish(bands.knowledge, scaled_embedding);
    progress(Progress {
        step: "asking the catalogue relations",
        done: 0,
        total: 1,
    });
    relations.catalogue = quarry_relations::accuracy::measure(model, tokenizer)?;
    files.push(write_json(dir, RELATIONS, &relations)?);
    norms.floats(model.output_norm(), Dtype::F32)?;
    files.extend([
        gate.finish()?,
        up.finish()?,
        writes.finish()?,
        norms.finish()?,
        stats.finish()?,
    ]);
    if let Some(down) = down {
        files.push(down.finish()?);
    }
    if let Some(router) = router {
        files.push(router.finish()?);
    }
    if options.level >= Level::Inference {
        progress(Progress {
            step: "copying the model",
            done: 0,
            total: 1,
        });
        files.push(copy_model(source, dir)?);
    }
    progress(Progress {
        step: "layers",
        done: n_layers,
        total: n_layers,
    });

    let index = Index {
        format: FORMAT.into(),
        version: VERSION,
        level: options.level,
        dtype,
        model: ModelInfo {
            name: file
                .get("general.name")
                .and_then(|v| v.as_str())
                .unwrap_or(&cfg.architecture)
                .to_string(),
            architecture: cfg.architecture.clone(),
            n_layers,
            d_model: d,
            ff_dim: ff,
            vocab_size: vocab,
            activation: check::activation_name(cfg.activation).into(),
            norm_eps: cfg.norm_eps,
            embed_scale: cfg.embed_scale,
            ffn_reads_residual: first.norm.is_none(),
            experts,
        },
        provenance: Provenance {
            source: source.display().to_string(),
            source_sha256,
            source_bytes,
            tool: "quarry".into(),
            tool_version: env!("CARGO_PKG_VERSION").into(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |t| t.as_secs()),
        },
        bands,
        top_k: k,
        calibration_tokens: calibration.len() / d,
        files,
    };
    let json = serde_json::to_vec_pretty(&index).expect("the manifest serializes");
    let path = dir.join(INDEX);
    fs::write(&path, json).map_err(io(&path, "write"))?;
    Ok(index)
}

/// The scaled embeddings of an even stride of vocabulary tokens (rows of `d_model`).
fn calibration_inputs(model: &Model) -> Vec<f32> {
    let cfg = model.config();
    let n = CALIBRATION_TOKENS.min(cfg.vocab_size);
    let mut x = vec![0.0f32; n * cfg.d_model];
    for (i, row) in x.chunks_exact_mut(cfg.d_model).enumerate() {
        model
            .token_embeddings()
            .dequantize_row(i * cfg.vocab_size / n, row);
        row.iter_mut().for_each(|v| *v *= cfg.embed_scale);
    }
    x
}

/// The routing of a mixture-of-experts model as the manifest records it (`None`: dense).
fn expert_info(model: &Model, w: &FfnFeatures<'_, '_>) -> Option<ExpertInfo> {
    let r = w.router?;
    let spec = model.config().experts.as_ref()?;
    Some(ExpertInfo {
        count: r.count(),
        used: r.used,
        ff_dim: spec.ff_dim,
        shared_ff_dim: w.blocks.get(r.count()).map_or(0, FeatureBlock::width),
        shared_gate: r.shared_gate.is_some(),
        normalize: r.normalize,
        scale: r.scale,
    })
}

/// Per feature of the layer `w`, the mean and standard deviation of its activation
/// `act(gate · x) · (up · x)` over the calibration embeddings through the layer's pre-FFN norm
/// (the embeddings themselves where the FFN reads the residual): the baseline browsing
/// queries measure an entity's activations against. An expert's features are measured as if
/// every input were routed to it, unweighted: routing is applied when browsing.
fn activation_stats(model: &Model, w: &FfnFeatures<'_, '_>, calibration: &[f32]) -> Vec<f32> {
    let cfg = model.config();
    let d = cfg.d_model;
    let n = calibration.len() / d;
    let mut xn = calibration.to_vec();
    if let Some(norm) = w.norm {
        rms_norm(&mut xn, norm, cfg.norm_eps);
    }
    let mut out = Vec::with_capacity(2 * w.width());
    for block in &w.blocks {
        let ff = block.width();
        let (mut gate, mut up) = (vec![0.0f32; n * ff], vec![0.0f32; n * ff]);
        matmul(&block.gate, &xn, n, &mut gate);
        matmul(&block.up, &xn, n, &mut up);
        match cfg.activation {
            Activation::Silu => silu_mul(&mut gate, &up),
            Activation::GeluTanh => gelu_tanh_mul(&mut gate, &up),
        }
        let mut sum = vec![0.0f64; ff];
        let mut sum_sq = vec![0.0f64; ff];
        for row in gate.chunks_exact(ff) {
            for ((s, q), &a) in sum.iter_mut().zip(&mut sum_sq).zip(row) {
                *s += a as f64;
                *q += a as f64 * a as f64;
            }
        }
        out.extend(sum.iter().zip(&sum_sq).flat_map(|(&s, &q)| {
            let mean = s / n as f64;
            let var = (q / n as f64 - mean * mean).max(0.0);
            [mean as f32, var.sqrt() as f32]
        }));
    }
    out
}

/// One matrix of every block of `w` (`pick`), decoded one after another into `out`.
fn decode_blocks<'a>(
    w: &FfnFeatures<'_, 'a>,
    pick: impl Fn(&FeatureBlock<'a>) -> WeightView<'a>,
    out: &mut Vec<f32>,
) {
    out.clear();
    let mut part = Vec::new();
    for block in &w.blocks {
        decode_matrix(&pick(block), &mut part);
        out.extend_from_slice(&part);
    }
}

/// Decodes a whole matrix (one layer's, a few MiB) into `out`, row-major.
fn decode_matrix(w: &WeightView<'_>, out: &mut Vec<f32>) {
    out.resize(w.rows() * w.cols(), 0.0);
    for (r, row) in out.chunks_exact_mut(w.cols()).enumerate() {
        w.dequantize_row(r, row);
    }
}

/// For each of the `columns.len() / d` vectors, its `k` highest-scoring and `k` lowest-scoring
/// tokens under `head` (highest first, then lowest first).
fn project_to_vocabulary(
    head: &WeightView<'_>,
    columns: &[f32],
    d: usize,
    k: usize,
) -> Vec<TokenLogit> {
    let vocab = head.rows();
    let n = columns.len() / d;
    let chunk = (PROJECTION_BUDGET / vocab).clamp(1, n.max(1));
    let mut records = vec![TokenLogit::default(); n * 2 * k];
    let mut logits = vec![0.0f32; chunk * vocab];
    for (c, part) in columns.chunks(chunk * d).enumerate() {
        let m = part.len() / d;
        matmul(head, part, m, &mut logits[..m * vocab]);
        let out = &mut records[c * chunk * 2 * k..(c * chunk + m) * 2 * k];
        let logits = &logits[..m * vocab];
        pool::global().for_each_chunk_mut(out, 2 * k, &|i, rec| {
            extremes(&logits[i * vocab..(i + 1) * vocab], k, rec);
        });
    }
    records
}

/// Fills `out` (2k records) with the k largest then the k smallest values of `scores`, each
/// list ordered from the extreme inwards. One pass; `k` is small, so the sorted candidate
/// lists rarely change after the first few thousand values.
fn extremes(scores: &[f32], k: usize, out: &mut [TokenLogit]) {
    // `high` ascending (its first entry is the bar to beat), `low` descending.
    let mut high: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    let mut low: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (id, &s) in (0u32..).zip(scores) {
        if high.len() < k || s > high[0].0 {
            let at = high.partition_point(|&(v, _)| v.total_cmp(&s).is_le());
            high.insert(at, (s, id));
            if high.len() > k {
                high.remove(0);
            }
        }
        if low.len() < k || s < low[0].0 {
            let at = low.partition_point(|&(v, _)| v.total_cmp(&s).is_ge());
            low.insert(at, (s, id));
            if low.len() > k {
                low.remove(0);
            }
        }
    }
    let ordered = high.iter().rev().chain(low.iter().rev());
    for (slot, &(logit, token)) in out.iter_mut().zip(ordered) {
        *slot = TokenLogit { token, logit };
    }
}

/// A GGUF holding only the tokenizer's metadata (and the architecture name), which
/// `Tokenizer::from_gguf` reads like any model file.
fn write_tokenizer(file: &GgufFile, dir: &Path) -> Result<FileEntry, VindexError> {
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        if key.starts_with("tokenizer.") || key == "general.architecture" {
            w.add_metadata(key, value.clone())?;
        }
    }
    let path = dir.join(TOKENIZER);
    w.write(&path)?;
    let (sha256, bytes) = hash_file(&path, u64::MAX)?;
    Ok(FileEntry {
        name: TOKENIZER.into(),
        bytes,
        sha256,
        element: Element::Bytes,
        shape: vec![],
    })
}

/// Writes `value` as JSON to `dir/name` and describes the file.
fn write_json(
    dir: &Path,
    name: &str,
    value: &impl serde::Serialize,
) -> Result<FileEntry, VindexError> {
    let path = dir.join(name);
    let json = serde_json::to_vec(value).expect("plain data serializes");
    fs::write(&path, json).map_err(io(&path, "write"))?;
    let (sha256, bytes) = hash_file(&path, u64::MAX)?;
    Ok(FileEntry {
        name: name.into(),
        bytes,
        sha256,
        element: Element::Bytes,
        shape: vec![],
    })
}

fn copy_model(source: &Path, dir: &Path) -> Result<FileEntry, VindexError> {
    let path = dir.join(MODEL);
    fs::copy(source, &path).map_err(io(&path, "copy the model into"))?;
    let (sha256, bytes) = hash_file(&path, u64::MAX)?;
    Ok(FileEntry {
        name: MODEL.into(),
        bytes,
        sha256,
        element: Element::Bytes,
        shape: vec![],
    })
}

/// The sha256 and length of the regular file at `path`, reading at most `max` + 1 bytes (a
/// length above `max` says the file is longer than expected without reading all of it).
pub(crate) fn hash_file(path: &Path, max: u64) -> Result<(String, u64), VindexError> {
    let f = quarry_format::input::open_regular(path).map_err(io(path, "open"))?;
    let mut f = f.take(max.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io(path, "read"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((hex(&hasher.finalize()), bytes))
}

pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A data file being written: buffered, hashed as it goes, checked against its shape.
struct DataFile {
    path: PathBuf,
    name: &'static str,
    out: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
    element: Element,
    shape: Vec<u64>,
}

impl DataFile {
    fn create(
        dir: &Path,
        name: &'static str,
        element: Element,
        shape: Vec<u64>,
    ) -> Result<DataFile, VindexError> {
        let path = dir.join(name);
        let file = File::create(&path).map_err(io(&path, "create"))?;
        Ok(DataFile {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            name,
            hasher: Sha256::new(),
            bytes: 0,
            element,
            shape,
        })
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), VindexError> {
        self.out.write_all(bytes).map_err(io(&self.path, "write"))?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn floats(&mut self, values: &[f32], dtype: Dtype) -> Result<(), VindexError> {
        match dtype {
            Dtype::F32 => self.raw(bytemuck::cast_slice(values)),
            Dtype::F16 => {
                let mut half = vec![f16::ZERO; values.len()];
                half.convert_from_f32_slice(values);
                self.raw(bytemuck::cast_slice(&half))
            }
        }
    }

    fn finish(mut self) -> Result<FileEntry, VindexError> {
        self.out.flush().map_err(io(&self.path, "write"))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(io(&self.path, "sync"))?;
        let expected = self.shape.iter().product::<u64>() * self.element.size() as u64;
        assert_eq!(
            self.bytes, expected,
            "{}: wrote {} bytes for shape {:?}",
            self.name, self.bytes, self.shape
        );
        Ok(FileEntry {
            name: self.name.into(),
            bytes: self.bytes,
            sha256: hex(&self.hasher.finalize()),
            element: self.element,
            shape: self.shape,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extremes_are_sorted_and_exact() {
        let scores = [0.5, -2.0, 3.0, 1.0, -1.0, 3.0, 0.0];
        let mut out = vec![TokenLogit::default(); 4];
        extremes(&scores, 2, &mut out);
        let logits: Vec<f32> = out.iter().map(|r| r.logit).collect();
        assert_eq!(logits, [3.0, 3.0, -2.0, -1.0]);
        assert_eq!(out[2].token, 1);
        assert_eq!(out[3].token, 4);
    }
}
