//! A vindex's values checked against each other before any of them is used.
//!
//! The manifest's hashes only say that files are the ones it lists; they say nothing about
//! whether what it lists makes sense. A vindex is a directory anyone can edit or hand over, so
//! everything a query later indexes with (layer bands, relation and token ids, dimensions,
//! file names) is checked here once, when it is opened or verified, and the first problem is
//! reported as one error naming the file and field. After [`parse_index`],
//! [`parse_relations`] and the per-file checks pass, no lookup a query makes can go out of
//! bounds.
//!
//! These functions take bytes, not paths, so the fuzz targets call them directly.

use quarry_model::{Activation, ModelConfig};

use crate::error::VindexError;
use crate::layout::{
    Element, Index, DOWN, EMBEDDINGS, FEATURE_STATS, FORMAT, GATE, INDEX, MODEL, NORMS, RELATIONS,
    ROUTER, TOKENIZER, UP, VERSION, WRITES,
};
use crate::relations::Relations;
use crate::TokenLogit;

/// Largest manifest read: it lists about ten files, so a few KiB is normal.
pub const MAX_INDEX_BYTES: u64 = 1 << 20;
/// Largest `relations.json` parsed (a 70B model's knowledge band makes about 200 MiB).
pub const MAX_RELATIONS_BYTES: u64 = 512 << 20;
/// Bound on every dimension, as for a model file's hyper-parameters.
const MAX_DIM: usize = 1 << 24;
/// Every file a vindex may hold.
const KNOWN_FILES: [&str; 11] = [
    TOKENIZER,
    RELATIONS,
    EMBEDDINGS,
    GATE,
    UP,
    NORMS,
    FEATURE_STATS,
    WRITES,
    MODEL,
    DOWN,
    ROUTER,
];

/// The `activation` names a manifest may hold, as `extract` writes them.
pub fn activation_name(activation: Activation) -> &'static str {
    match activation {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_tanh",
    }
}

/// Parses and checks `index.json`; `path` (the vindex) names it in errors.
pub fn parse_index(bytes: &[u8], path: &str) -> Result<Index, VindexError> {
    let manifest = || format!("{path}/{INDEX}");
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|source| VindexError::Manifest {
            path: manifest(),
            source,
        })?;
    let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
    if format != FORMAT {
        return Err(VindexError::Foreign {
            path: path.into(),
            found: format.into(),
        });
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != VERSION as u64 {
        return Err(VindexError::Version {
            path: path.into(),
            found: version.min(u32::MAX as u64) as u32,
        });
    }
    let index: Index = serde_json::from_value(value).map_err(|source| VindexError::Manifest {
        path: manifest(),
        source,
    })?;
    check_index(&index, path)?;
    Ok(index)
}

/// The manifest's own consistency: dimensions, numbers, bands and file entries.
pub fn check_index(index: &Index, path: &str) -> Result<(), VindexError> {
    let invalid = |field: &str, problem: String| invalid(path, INDEX, field, problem);
    let m = &index.model;
    for (field, value) in [
        ("model.n_layers", m.n_layers),
        ("model.d_model", m.d_model),
        ("model.ff_dim", m.ff_dim),
        ("model.vocab_size", m.vocab_size),
    ] {
        if value == 0 || value > MAX_DIM {
            return Err(invalid(
                field,
                format!("is {value}; it must be between 1 and {MAX_DIM}"),
            ));
        }
    }
    let names = [Activation::Silu, Activation::GeluTanh].map(activation_name);
    if !names.contains(&m.activation.as_str()) {
        return Err(invalid(
            "model.activation",
            format!("is {:?}; it must be one of {names:?}", m.activation),
        ));
    }
    // RMS-norm epsilons are 1e-5 or 1e-6 in practice; a hundredth would already swamp the
    // mean square of a normalized residual.
    if !(m.norm_eps.is_finite() && m.norm_eps > 0.0 && m.norm_eps <= 0.01) {
        return Err(invalid(
            "model.norm_eps",
            format!("is {}; it must be in (0, 0.01]", m.norm_eps),
        ));
    }
    // 1 (Llama) or sqrt(d_model) (Gemma): at most sqrt(MAX_DIM).
    if !(m.embed_scale.is_finite() && m.embed_scale > 0.0 && m.embed_scale <= 4096.0) {
        return Err(invalid(
            "model.embed_scale",
            format!("is {}; it must be in (0, 4096]", m.embed_scale),
        ));
    }
    if let Some(e) = &m.experts {
        let features = e
            .count
            .checked_mul(e.ff_dim)
            .and_then(|n| n.checked_add(e.shared_ff_dim));
        let problem = if e.count == 0 || e.count > MAX_DIM {
            Some((
                "model.experts.count",
                format!("is {}; it must be between 1 and {MAX_DIM}", e.count),
            ))
        } else if e.used == 0 || e.used > e.count {
            Some((
                "model.experts.used",
                format!(
                    "is {}; it must be between 1 and the {} experts",
                    e.used, e.count
                ),
            ))
        } else if e.ff_dim == 0 || features != Some(m.ff_dim) {
            Some((
                "model.experts.ff_dim",
                format!(
                    "is {}: {} experts of it and a shared expert of {} are not the layer's {} features",
                    e.ff_dim, e.count, e.shared_ff_dim, m.ff_dim
                ),
            ))
        } else if e.shared_gate && e.shared_ff_dim == 0 {
            Some((
                "model.experts.shared_gate",
                "is set but there is no shared expert".to_string(),
            ))
        } else if !(e.scale.is_finite() && e.scale > 0.0) {
            Some((
                "model.experts.scale",
                format!("is {}; it must be positive", e.scale),
            ))
        } else {
            None
        };
        if let Some((field, problem)) = problem {
            return Err(invalid(field, problem));
        }
    }
    for (field, band) in [
        ("bands.syntax", index.bands.syntax),
        ("bands.knowledge", index.bands.knowledge),
        ("bands.output", index.bands.output),
    ] {
        check_layer_range(band, m.n_layers)
            .map_err(|problem| invalid(field, format!("{band:?} {problem}")))?;
    }
    if index.top_k == 0 || index.top_k > m.vocab_size {
        return Err(invalid(
            "top_k",
            format!(
                "is {}; it must be between 1 and the vocabulary size {}",
                index.top_k, m.vocab_size
            ),
        ));
    }
    if index.calibration_tokens > m.vocab_size {
        return Err(invalid(
            "calibration_tokens",
            format!(
                "is {}, more than the vocabulary's {} tokens",
                index.calibration_tokens, m.vocab_size
            ),
        ));
    }
    for (i, entry) in index.files.iter().enumerate() {
        let field = format!("files[{i}]");
        let name = entry.name.as_str();
        if !KNOWN_FILES.contains(&name) {
            // Names are plain file names inside the directory: this also refuses "../x",
            // "/etc/passwd", "a/b" and the empty name, so nothing outside is ever opened.
            return Err(invalid(
                &field,
                format!(
                    "names {name:?}, which is not a vindex file (one of {})",
                    KNOWN_FILES.join(", ")
                ),
            ));
        }
        if index.files[..i].iter().any(|e| e.name == name) {
            return Err(invalid(&field, format!("lists {name} a second time")));
        }
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if entry.sha256.len() != 64 || !entry.sha256.chars().all(hex) {
            return Err(invalid(
                &field,
                format!(
                    "{name}: sha256 {:?} is not 64 lowercase hex digits",
                    entry.sha256
                ),
            ));
        }
        let opaque = entry.element == Element::Bytes;
        if opaque != entry.shape.is_empty() {
            return Err(invalid(
                &field,
                format!(
                    "{name}: element {:?} with shape {:?} (opaque files have no shape, arrays one)",
                    entry.element, entry.shape
                ),
            ));
        }
    }
    Ok(())
}

/// The error for `field` of `file` in the vindex at `path`.
fn invalid(path: &str, file: &'static str, field: &str, problem: String) -> VindexError {
    VindexError::Invalid {
        path: path.into(),
        file,
        problem: format!("{field} {problem}"),
    }
}

/// Whether `[first, last]` is an ordered range of a model's layers.
fn check_layer_range([first, last]: [usize; 2], n_layers: usize) -> Result<(), String> {
    if first > last {
        return Err("is reversed: its first layer must not be after its last".into());
    }
    if last >= n_layers {
        return Err(format!(
            "reaches beyond the model's layers 0-{}",
            n_layers - 1
        ));
    }
    Ok(())
}

/// Parses `relations.json` and checks every id in it against the manifest (itself checked
/// first, so an `Index` built by hand gets the same guarantees as a parsed one).
pub fn parse_relations(bytes: &[u8], index: &Index, path: &str) -> Result<Relations, VindexError> {
    check_index(index, path)?;
    let invalid = |field: String, problem: String| invalid(path, RELATIONS, &field, problem);
    if bytes.len() as u64 > MAX_RELATIONS_BYTES {
        return Err(invalid(
            "size".into(),
            format!(
                "is {} bytes, more than the {} this reader parses",
                bytes.len(),
                quarry_format::input::human_bytes(MAX_RELATIONS_BYTES)
            ),
        ));
    }
    let relations: Relations = serde_json::from_slice(bytes)
        .map_err(|e| invalid("contents".into(), format!("are not a relation table: {e}")))?;
    let m = &index.model;
    check_layer_range(relations.layers, m.n_layers)
        .map_err(|problem| invalid("layers".into(), format!("{:?} {problem}", relations.layers)))?;
    for (i, relation) in relations.relations.iter().enumerate() {
        if relation.id != i {
            return Err(invalid(
                format!("relations[{i}].id"),
                format!("is {}; relations are numbered in order from 0", relation.id),
            ));
        }
    }
    let features = m.n_layers.saturating_mul(m.ff_dim);
    if relations.edges.len() > features {
        return Err(invalid(
            "edges".into(),
            format!(
                "has {} entries but the model has only {features} features",
                relations.edges.len()
            ),
        ));
    }
    let n = relations.relations.len();
    for (i, e) in relations.edges.iter().enumerate() {
        let problem = if e.layer >= m.n_layers {
            Some(format!(
                "layer {} is not one of the model's {} layers",
                e.layer, m.n_layers
            ))
        } else if e.feature >= m.ff_dim {
            Some(format!(
                "feature {} is not one of the layer's {} features",
                e.feature, m.ff_dim
            ))
        } else if e.relation >= n {
            Some(format!(
                "relation {} is not one of the {n} relations listed",
                e.relation
            ))
        } else if e.input as usize >= m.vocab_size || e.output as usize >= m.vocab_size {
            Some(format!(
                "token {} or {} is not in the vocabulary of {} tokens",
                e.input, e.output, m.vocab_size
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(invalid(format!("edges[{i}]"), problem));
        }
    }
    for (i, a) in relations.catalogue.iter().enumerate() {
        let problem = if quarry_relations::catalogue::find(&a.relation).is_none() {
            Some(format!("relation {:?} is not in the catalogue", a.relation))
        } else if a.answered > a.asked {
            Some(format!("{} of {} pairs answered", a.answered, a.asked))
        } else if a.examples.len() > a.answered {
            Some(format!(
                "{} examples of {} answers",
                a.examples.len(),
                a.answered
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(invalid(format!("catalogue[{i}]"), problem));
        }
    }
    Ok(relations)
}

/// The token ids in `writes.bin` (every record's `token` must be in the vocabulary).
pub fn check_writes(records: &[TokenLogit], index: &Index, path: &str) -> Result<(), VindexError> {
    let vocab = index.model.vocab_size;
    match records.iter().position(|r| r.token as usize >= vocab) {
        None => Ok(()),
        Some(i) => Err(invalid(
            path,
            WRITES,
            &format!("record {i}"),
            format!(
                "names token {}, outside the vocabulary of {vocab} tokens",
                records[i].token
            ),
        )),
    }
}

/// The model inside an `inference` or `all` vindex agrees with what the manifest says of it.
pub fn check_model(index: &Index, config: &ModelConfig, path: &str) -> Result<(), VindexError> {
    let m = &index.model;
    // Features per layer: the dense FFN's, or per expert (the shared expert's width is the
    // manifest's, which the configuration cannot confirm: only the file's tensors say
    // whether there is one).
    let ffn = |experts: Option<(usize, usize, usize, bool, f32)>, ff: usize| match experts {
        None => format!("a dense FFN of {ff} features"),
        Some((count, ff, used, normalize, scale)) => format!(
            "{count} experts of {ff} features, {used} used (normalize {normalize}, scale {scale})"
        ),
    };
    let manifest_ffn = ffn(
        m.experts
            .as_ref()
            .map(|e| (e.count, e.ff_dim, e.used, e.normalize, e.scale)),
        m.ff_dim,
    );
    let model_ffn = ffn(
        config
            .experts
            .as_ref()
            .map(|e| (e.count, e.ff_dim, e.used, e.normalize, e.scale)),
        config.ff_dim,
    );
    let pairs = [
        (
            "n_layers",
            m.n_layers.to_string(),
            config.n_layers.to_string(),
        ),
        ("d_model", m.d_model.to_string(), config.d_model.to_string()),
        ("ffn", manifest_ffn, model_ffn),
        (
            "vocab_size",
            m.vocab_size.to_string(),
            config.vocab_size.to_string(),
        ),
        (
            "activation",
            m.activation.clone(),
            activation_name(config.activation).to_string(),
        ),
        (
            "norm_eps",
            m.norm_eps.to_string(),
            config.norm_eps.to_string(),
        ),
        (
            "embed_scale",
            m.embed_scale.to_string(),
            config.embed_scale.to_string(),
        ),
    ];
    for (field, manifest, model) in pairs {
        if manifest != model {
            return Err(invalid(
                path,
                MODEL,
                field,
                format!("is {model} in the model but {manifest} in {INDEX} (files from different models?)"),
            ));
        }
    }
    Ok(())
}
