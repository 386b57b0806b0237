//! llama.cpp LoRA adapter files as FFN overlays, both ways.
//!
//! An adapter is a GGUF file with `general.type = "adapter"`, `adapter.type = "lora"`, the
//! base's `general.architecture`, an optional `adapter.lora.alpha` (f32), and per adapted
//! weight `W` two tensors `W.lora_a` (ggml `[W.ne0, rank]`) and `W.lora_b` (ggml `[rank,
//! W.ne1]`). llama.cpp (`src/llama-adapter.cpp`, `llama_adapter_lora_weight::get_scale`) adds
//! `scale · B·A·x` to `W·x` with `scale = alpha / rank` when alpha is non-zero and `1` when it
//! is zero or absent (the rank being `lora_b`'s `ne0`, so it can differ per tensor). For
//! `blk.N.ffn_down.weight` (ggml `[ff_dim, d_model]`) that is exactly an [`FfnOverlay`] layer:
//! `lora_a` is `A` (`rank × ff_dim` row-major) and `lora_b` is `B` (`d_model × rank`), with the
//! scale folded into `B`.

use std::borrow::Cow;
use std::path::Path;

use quarry_format::{GgmlType, GgufFile, GgufWriter, TensorView, Value};

use crate::{FfnOverlay, LowRank, ModelConfig, ModelError};

const SUFFIX_A: &str = ".lora_a";
const SUFFIX_B: &str = ".lora_b";
const TYPE_KEY: &str = "general.type";
const ADAPTER_TYPE_KEY: &str = "adapter.type";
const ALPHA_KEY: &str = "adapter.lora.alpha";
/// Activated LoRA: the adapter applies only after these tokens appear. Quarry's overlay is
/// always on, so such an adapter cannot be honoured.
const ALORA_KEY: &str = "adapter.alora.invocation_tokens";

fn invalid(file: &str, item: &str, problem: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        file: file.to_owned(),
        item: item.to_owned(),
        problem: problem.into(),
    }
}

/// The name of layer `layer`'s down projection, the only weight adapters may touch.
fn down_name(layer: usize) -> String {
    format!("blk.{layer}.ffn_down.weight")
}

/// The layer of `blk.N.ffn_down.weight` (N written as the model writes it: decimal, no
/// leading zeros, so that the name is one the base model really has), or `None` for any
/// other weight name.
pub(crate) fn down_layer(name: &str) -> Option<usize> {
    let n = name
        .strip_prefix("blk.")?
        .strip_suffix(".ffn_down.weight")?;
    let layer: usize = n.parse().ok()?;
    (layer.to_string() == n).then_some(layer)
}

/// Reads a llama.cpp LoRA adapter for the model described by `config` into an overlay, with
/// llama.cpp's scale folded into each `B`. Every rule llama.cpp applies when loading is
/// checked here too, plus Quarry's own limit: only `blk.N.ffn_down.weight` may be adapted.
pub fn read_adapter(file: &GgufFile, config: &ModelConfig) -> Result<FfnOverlay, ModelError> {
    let src = file.source();
    match file.get(TYPE_KEY) {
        None => {
            return Err(invalid(
                src,
                TYPE_KEY,
                "is missing; a LoRA adapter says \"adapter\" (is this a model file?)",
            ))
        }
        Some(_) => {
            let t = file.get_str(TYPE_KEY)?;
            if t != "adapter" {
                return Err(invalid(
                    src,
                    TYPE_KEY,
                    format!("is \"{t}\", expected \"adapter\" (is this a model file?)"),
                ));
            }
        }
    }
    let arch = file.architecture()?;
    if arch != config.architecture {
        return Err(invalid(
            src,
            "general.architecture",
            format!(
                "the adapter is for \"{arch}\", the model is \"{}\"",
                config.architecture
            ),
        ));
    }
    let kind = match file.get(ADAPTER_TYPE_KEY) {
        None => {
            return Err(invalid(
                src,
                ADAPTER_TYPE_KEY,
                "is missing, expected \"lora\"",
            ))
        }
        Some(_) => file.get_str(ADAPTER_TYPE_KEY)?,
    };
    if kind != "lora" {
        return Err(invalid(
            src,
            ADAPTER_TYPE_KEY,
            format!("is \"{kind}\"; only \"lora\" adapters are supported"),
        ));
    }
    if file.get(ALORA_KEY).is_some() {
        return Err(invalid(
            src,
            ALORA_KEY,
            "activated LoRA (applied only after invocation tokens) is not supported",
        ));
    }
    // llama.cpp reads the alpha with gguf_get_val_f32, which aborts on any other type.
    let alpha = match file.get(ALPHA_KEY) {
        None => 0.0,
        Some(&Value::F32(a)) if a.is_finite() => a,
        Some(&Value::F32(a)) => {
            return Err(invalid(
                src,
                ALPHA_KEY,
                format!("is {a}, not a finite number"),
            ))
        }
        Some(other) => {
            return Err(invalid(
                src,
                ALPHA_KEY,
                format!("is a {}, expected an f32", other.value_type()),
            ))
        }
    };

    // Pair the halves by the weight they adapt, in layer order.
    let mut pairs: Vec<(Option<TensorView<'_>>, Option<TensorView<'_>>)> =
        vec![(None, None); config.n_layers];
    for info in file.tensors() {
        let name = info.name.as_str();
        let (weight, is_a) = if let Some(w) = name.strip_suffix(SUFFIX_A) {
            (w, true)
        } else if let Some(w) = name.strip_suffix(SUFFIX_B) {
            (w, false)
        } else {
            return Err(invalid(
                src,
                &format!("tensor '{name}'"),
                "is not a LoRA factor (names end in .lora_a or .lora_b)",
            ));
        };
        let Some(layer) = down_layer(weight) else {
            return Err(invalid(
                src,
                &format!("tensor '{name}'"),
                format!(
                    "adapts '{weight}': only ffn_down adapters are supported \
                     (blk.N.ffn_down.weight.lora_a/lora_b)"
                ),
            ));
        };
        if layer >= config.n_layers {
            return Err(invalid(
                src,
                &format!("tensor '{name}'"),
                format!(
                    "layer {layer} is out of range: the model has {} layers",
                    config.n_layers
                ),
            ));
        }
        let view = file.tensor(name)?;
        let slot = &mut pairs[layer];
        if is_a {
            slot.0 = Some(view);
        } else {
            slot.1 = Some(view);
        }
    }

    let mut deltas = Vec::new();
    for (layer, pair) in pairs.into_iter().enumerate() {
        let weight = down_name(layer);
        let (a, b) = match pair {
            (None, None) => continue,
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) | (None, Some(_)) => {
                let (have, missing) = if pair.0.is_some() {
                    (SUFFIX_A, SUFFIX_B)
                } else {
                    (SUFFIX_B, SUFFIX_A)
                };
                return Err(invalid(
                    src,
                    &format!("tensor '{weight}{missing}'"),
                    format!("is missing ('{weight}{have}' has no other half)"),
                ));
            }
        };
        // ggml drops trailing dimensions of 1 when it writes a tensor, so a rank-1 lora_a
        // may come as [ff_dim].
        let dims_a = matrix_dims(src, a)?;
        let dims_b = matrix_dims(src, b)?;
        let rank = dims_a[1];
        if dims_a[0] != config.ff_dim as u64 {
            return Err(ModelError::WrongShape {
                file: src.to_owned(),
                tensor: a.info.name.clone(),
                expected: vec![config.ff_dim as u64, rank],
                found: a.info.dims.clone(),
            });
        }
        if dims_b[1] != config.d_model as u64 {
            return Err(ModelError::WrongShape {
                file: src.to_owned(),
                tensor: b.info.name.clone(),
                expected: vec![dims_b[0], config.d_model as u64],
                found: b.info.dims.clone(),
            });
        }
        if dims_b[0] != rank {
            return Err(invalid(
                src,
                &format!("tensor '{}'", b.info.name),
                format!(
                    "has rank {} but '{}' has rank {rank} (lora_a is [ff_dim, rank], \
                     lora_b is [rank, d_model])",
                    dims_b[0], a.info.name
                ),
            ));
        }
        let rank = rank as usize;
        let a_values = factor_values(src, a)?;
        let mut b_values = factor_values(src, b)?;
        // llama.cpp's get_scale: alpha / rank, computed in f32, or 1 without an alpha.
        if alpha != 0.0 {
            let scale = alpha / rank as f32;
            b_values.iter_mut().for_each(|x| *x *= scale);
            if let Some(i) = b_values.iter().position(|x| !x.is_finite()) {
                return Err(invalid(
                    src,
                    &format!("tensor '{}'", b.info.name),
                    format!("value {i} overflows when scaled by alpha / rank = {scale}"),
                ));
            }
        }
        let delta = LowRank::new(config.d_model, config.ff_dim, rank, a_values, b_values)
            .expect("factor lengths follow from the checked dims");
        deltas.push((layer, delta));
    }
    Ok(FfnOverlay::new(config.n_layers, deltas))
}

/// A LoRA factor's dims as `[ne0, ne1]`: two dimensions, or one (a trailing 1 dropped).
fn matrix_dims(src: &str, t: TensorView<'_>) -> Result<[u64; 2], ModelError> {
    match t.info.dims[..] {
        [n0] => Ok([n0, 1]),
        [n0, n1] => Ok([n0, n1]),
        _ => Err(invalid(
            src,
            &format!("tensor '{}'", t.info.name),
            format!("has shape {:?}; a LoRA factor is a matrix", t.info.dims),
        )),
    }
}

/// A factor's values in `f32`, checked finite (a NaN or infinity would poison every
/// activation of the layer it is added to).
fn factor_values(src: &str, t: TensorView<'_>) -> Result<Vec<f32>, ModelError> {
    if !matches!(t.info.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(ModelError::WrongType {
            file: src.to_owned(),
            tensor: t.info.name.clone(),
            dtype: t.info.dtype,
            role: "a LoRA factor (F32, F16 or BF16)",
        });
    }
    let mut values = vec![0.0f32; t.info.n_elements() as usize];
    quarry_kernels::dequantize(t.info.dtype, t.data, &mut values).map_err(|source| {
        ModelError::Kernel {
            file: src.to_owned(),
            tensor: t.info.name.clone(),
            source,
        }
    })?;
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(invalid(
            src,
            &format!("tensor '{}'", t.info.name),
            format!("value {i} is {}, not a finite number", values[i]),
        ));
    }
    Ok(values)
}

/// Checks that every delta of `overlay` fits the model `config` describes and holds only
/// finite values; `file` is the output the overlay is bound for, named in errors.
pub(crate) fn check_overlay(
    overlay: &FfnOverlay,
    config: &ModelConfig,
    file: &str,
) -> Result<(), ModelError> {
    if overlay.has_neurons() {
        return Err(invalid(
            file,
            "overlay",
            "rewrites FFN neurons (COMPOSE); only down-projection deltas can be written",
        ));
    }
    for (layer, d) in overlay.deltas() {
        let item = format!("delta of layer {layer}");
        if layer >= config.n_layers {
            return Err(invalid(
                file,
                &item,
                format!("the model has {} layers", config.n_layers),
            ));
        }
        if d.rows != config.d_model || d.cols != config.ff_dim {
            return Err(invalid(
                file,
                &item,
                format!(
                    "is {} × {}, the down projection is {} × {} (d_model × ff_dim)",
                    d.rows, d.cols, config.d_model, config.ff_dim
                ),
            ));
        }
        if d.rank == 0 || d.a.len() != d.rank * d.cols || d.b.len() != d.rows * d.rank {
            return Err(invalid(
                file,
                &item,
                format!(
                    "factors of {} and {} values do not make rank {} (A: rank × {}, B: {} × rank)",
                    d.a.len(),
                    d.b.len(),
                    d.rank,
                    d.cols,
                    d.rows
                ),
            ));
        }
        if d.a.iter().chain(&d.b).any(|x| !x.is_finite()) {
            return Err(invalid(file, &item, "holds a value that is not finite"));
        }
    }
    Ok(())
}

/// Fails with the error [`GgufWriter::write_new`] gives when `path` already exists, so a
/// caller can refuse before doing the work that produces the file.
pub(crate) fn refuse_existing(path: &Path) -> Result<(), ModelError> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(quarry_format::FormatError::Io {
            file: path.display().to_string(),
            action: "create the file (it already exists and is never replaced)",
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        }
        .into());
    }
    Ok(())
}

/// Writes `overlay` as a llama.cpp LoRA adapter for the model `config` describes: F32
/// factors, `blk.N.ffn_down.weight.lora_a/lora_b` in layer order. The scale llama.cpp applies
/// is exactly 1: `adapter.lora.alpha` is the rank when every layer has the same rank (alpha /
/// rank = 1 in f32), and absent otherwise (one alpha cannot equal several ranks; without it
/// llama.cpp's scale is 1). Atomic, and never replaces an existing `path`.
pub fn write_adapter(
    overlay: &FfnOverlay,
    config: &ModelConfig,
    path: impl AsRef<Path>,
) -> Result<(), ModelError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    check_overlay(overlay, config, &name)?;
    refuse_existing(path)?;

    let mut w = GgufWriter::new();
    let mut meta = |key: &str, value: Value| w.add_metadata(key, value);
    meta(
        "general.architecture",
        Value::String(config.architecture.clone()),
    )?;
    meta(TYPE_KEY, Value::String("adapter".into()))?;
    meta(ADAPTER_TYPE_KEY, Value::String("lora".into()))?;
    let mut ranks = overlay.deltas().map(|(_, d)| d.rank);
    if let Some(first) = ranks.next() {
        if ranks.all(|r| r == first) {
            meta(ALPHA_KEY, Value::F32(first as f32))?;
        }
    }
    for (layer, d) in overlay.deltas() {
        let weight = down_name(layer);
        let a_bytes: Vec<u8> = d.a.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b_bytes: Vec<u8> = d.b.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_tensor(
            format!("{weight}{SUFFIX_A}"),
            &[d.cols as u64, d.rank as u64],
            GgmlType::F32,
            Cow::Owned(a_bytes),
        )?;
        w.add_tensor(
            format!("{weight}{SUFFIX_B}"),
            &[d.rank as u64, d.rows as u64],
            GgmlType::F32,
            Cow::Owned(b_bytes),
        )?;
    }
    w.write_new(path)?;
    Ok(())
}
