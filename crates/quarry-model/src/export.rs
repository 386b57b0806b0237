//! Compiling an overlay into a standalone model file.
//!
//! The output is the base GGUF with every metadata entry and every tensor copied byte for
//! byte, in the same order and at the same alignment, except the down projections the overlay
//! touches: each is dequantized, gets its `B·A` added in `f32`, and is quantized again. The
//! requantization type decides how much of an edit survives, which
//! [`DEFAULT_PATCHED_TYPE`] documents.

use std::borrow::Cow;
use std::path::Path;

use quarry_format::{GgmlType, GgufFile, GgufWriter};

use crate::lora::{check_overlay, refuse_existing};
use crate::{FfnOverlay, ModelConfig, ModelError};

/// The type an edited down projection is stored in unless the caller picks one: Q8_0.
///
/// Measured with `cargo run --release -p quarry-model --example requant_edit -- MODEL` (see
/// its header for the method): a rank-4 least-norm delta on real FFN activations `k` (subject
/// phrases' last tokens), each edit moving `W·k` by `c·‖W·k‖`, every fourth layer; the share
/// of the edit lost, `‖(Q(W+ΔW) − Q(W))·k − ΔW·k‖ / ‖ΔW·k‖`, and the noise requantizing adds
/// on 20 unrelated keys, `‖(Q(W+ΔW) − (W+ΔW))·u‖ / ‖W·u‖` (median over layers):
///
/// | type | lost, c = 0.5 | c = 1 | c = 2 | unrelated noise |
/// |---|---|---|---|---|
/// | SmolLM2 (Q4_1 base) Q4_K | 58.7% | 34.1% | 13.7% | 11.1% |
/// | Q6_K | 4.9% | 2.4% | 1.2% | 1.6% |
/// | Q8_0 | 1.5% | 0.8% | 0.4% | 0.5% |
/// | F16 | 0.05% | 0.03% | 0.01% | 0.02% |
/// | Gemma 3 (Q6_K/Q4_K base) Q4_K | 17.2% | 8.5% | 4.7% | 6.5% |
/// | Q6_K | 4.5% | 2.1% | 1.1% | 1.5% |
/// | Q8_0 | 1.4% | 0.7% | 0.3% | 0.5% |
/// | F16 | 0.04% | 0.02% | 0.01% | 0.02% |
///
/// Q4_K loses most of a small edit. Q6_K is at the 5% edge for the smallest edits; Q8_0 keeps
/// 98.5% or more of every edit for a cost of about 0.1 MiB per edited layer over Q6_K (only
/// the edited down projections are stored in it), and its quantizer rounds exactly as ggml's.
pub const DEFAULT_PATCHED_TYPE: GgmlType = GgmlType::Q8_0;

/// The types an edited down projection may be stored in: those Quarry quantizes to, less
/// Q8_K (ggml uses it only for activations; llama.cpp has no weight kernels for it).
pub const PATCHED_TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q6_K,
    GgmlType::Q4_K,
];

/// Writes `base` with `overlay` folded into its down projections to `path`: the overlaid
/// `blk.N.ffn_down.weight` tensors become `Q(W + B·A)` in `dtype` (default
/// [`DEFAULT_PATCHED_TYPE`]); everything else is copied unchanged. Atomic, and never replaces
/// an existing `path` (checked before any work is done).
pub fn write_patched_model(
    base: &GgufFile,
    overlay: &FfnOverlay,
    dtype: Option<GgmlType>,
    path: impl AsRef<Path>,
) -> Result<(), ModelError> {
    let path = path.as_ref();
    let out_name = path.display().to_string();
    refuse_existing(path)?;
    let dtype = dtype.unwrap_or(DEFAULT_PATCHED_TYPE);
    if !PATCHED_TYPES.contains(&dtype) {
        let names: Vec<String> = PATCHED_TYPES.iter().map(|t| t.to_string()).collect();
        return Err(ModelError::Invalid {
            file: out_name,
            item: "requantization type".into(),
            problem: format!(
                "{dtype} is not one an edited weight can be stored in (use one of {})",
                names.join(", ")
            ),
        });
    }
    let config = ModelConfig::from_gguf(base)?;
    check_overlay(overlay, &config, &out_name)?;
    let src = base.source();

    let mut w = GgufWriter::new();
    // Copying general.alignment (when present) sets the writer's alignment, so tensors land
    // on the base's boundaries.
    for (key, value) in base.metadata() {
        w.add_metadata(key, value.clone())?;
    }
    for info in base.tensors() {
        let view = base.tensor(&info.name)?;
        let delta = crate::lora::down_layer(&info.name).and_then(|l| overlay.layer(l));
        let Some(delta) = delta else {
            w.add_tensor(
                info.name.clone(),
                &info.dims,
                info.dtype,
                Cow::Borrowed(view.data),
            )?;
            continue;
        };
        let expected = [config.ff_dim as u64, config.d_model as u64];
        if info.dims != expected {
            return Err(ModelError::WrongShape {
                file: src.to_owned(),
                tensor: info.name.clone(),
                expected: expected.to_vec(),
                found: info.dims.clone(),
            });
        }
        let kernel = |source| ModelError::Kernel {
            file: src.to_owned(),
            tensor: info.name.clone(),
            source,
        };
        let mut weight = vec![0.0f32; config.d_model * config.ff_dim];
        quarry_kernels::dequantize(info.dtype, view.data, &mut weight).map_err(kernel)?;
        // Row-major d_model × ff_dim on both sides: ggml's [ff_dim, d_model] is d_model rows.
        for (x, d) in weight.iter_mut().zip(delta.dense()) {
            *x += d;
        }
        if let Some(i) = weight.iter().position(|x| !x.is_finite()) {
            return Err(ModelError::Invalid {
                file: out_name,
                item: format!("tensor '{}'", info.name),
                problem: format!("element {i} of the edited weight is not finite"),
            });
        }
        let n_bytes = dtype
            .bytes_for(weight.len() as u64)
            .filter(|_| config.ff_dim % dtype.block_size() == 0)
            .ok_or_else(|| ModelError::Invalid {
                file: out_name.clone(),
                item: format!("tensor '{}'", info.name),
                problem: format!(
                    "rows of {} values cannot be stored as {dtype} (blocks of {})",
                    config.ff_dim,
                    dtype.block_size()
                ),
            })?;
        let mut bytes = vec![0u8; n_bytes as usize];
        quarry_kernels::quantize(dtype, &weight, &mut bytes).map_err(kernel)?;
        w.add_tensor(info.name.clone(), &info.dims, dtype, Cow::Owned(bytes))?;
    }
    w.write_new(path)?;
    Ok(())
}
