//! Hugging Face model directories: `config.json` and a safetensors checkpoint, turned into the
//! GGUF layout the forward pass reads.
//!
//! The result is the GGUF file llama.cpp's own converter would write for the model, built in
//! memory: hyper-parameters under GGUF keys, tensors under GGUF names, Llama's Q/K rows
//! permuted into adjacent rotary pairs, Gemma's norm gains stored as `1 + w`, experts stacked
//! into 3-D tensors; weights keep their stored type (`f32`, `f16`, `bf16`) or are quantized
//! on the way (`--quantize`). So one loader, one set of shape checks and one forward pass
//! serve both formats, and the tokenizer's `tokenizer.json` travels inside the file
//! (`tokenizer.huggingface.json`) with the chat template and special token ids.
//!
//! The converted copy lives on the heap: a model costs its weights' size in memory, not the
//! memory map's pages, once the conversion is done.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use quarry_format::input::read_text_capped;
use quarry_format::safetensors::{Checkpoint, CheckpointTensor};
use quarry_format::{GgmlType, GgufFile, GgufWriter, Value, ValueType};
use serde_json::{Map, Value as Json};

use crate::config::ArchSpec;
use crate::ModelError;

/// Most bytes of `config.json`, `tokenizer_config.json` or `generation_config.json`.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Most bytes of `tokenizer.json` (large vocabularies run to tens of MiB).
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// Weight types `--quantize` offers for a safetensors model.
pub const QUANTIZE_TYPES: &[GgmlType] = &[GgmlType::Q8_0, GgmlType::Q4_K];

/// The model in Hugging Face directory `dir` as an in-memory GGUF file, its matrices stored as
/// `quantize` when given (those whose rows are a whole number of its blocks).
pub fn gguf_from_hf_dir(dir: &Path, quantize: Option<GgmlType>) -> Result<GgufFile, ModelError> {
    let source = dir.display().to_string();
    if let Some(q) = quantize.filter(|q| !QUANTIZE_TYPES.contains(q)) {
        return Err(ModelError::Invalid {
            file: source,
            item: "--quantize".into(),
            problem: format!("{q} is not offered (Q8_0 or Q4_K)"),
        });
    }
    let config = Config::read(dir)?;
    let spec = config.spec;
    let checkpoint = Checkpoint::open(dir)?;
    let mut w = GgufWriter::new();
    config.metadata(&mut w)?;
    tokenizer_metadata(dir, &config, &mut w)?;

    let mut tensors = Tensors {
        checkpoint: &checkpoint,
        writer: &mut w,
        quantize,
        norms_add_one: spec.hf_norms_add_one,
    };
    tensors.copy("model.embed_tokens.weight", "token_embd.weight")?;
    if checkpoint.contains("lm_head.weight") && !config.flag("tie_word_embeddings")? {
        tensors.copy("lm_head.weight", "output.weight")?;
    }
    tensors.norm("model.norm.weight", "output_norm.weight")?;
    for (name, factors) in config.rope_factors()? {
        let bytes = bytemuck::cast_slice(&factors).to_vec();
        let dims = vec![factors.len() as u64];
        tensors.add(name, dims, GgmlType::F32, Cow::Owned(bytes))?;
    }
    let n_layers = config.usize("num_hidden_layers")?;
    let (heads, kv_heads) = (config.heads()?, config.kv_heads()?);
    for i in 0..n_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        let present = |s: &str| checkpoint.contains(&hf(s));
        // Where a family has norms on both sides of a block, HF's `post_attention_layernorm`
        // is the attention's post-norm; elsewhere it is the FFN's pre-norm.
        let norms: &[(&str, &str)] = if spec.post_norms {
            &[
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
            ]
        } else {
            &[
                ("input_layernorm", "attn_norm"),
                ("post_attention_layernorm", "ffn_norm"),
                ("self_attn.q_norm", "attn_q_norm"),
                ("self_attn.k_norm", "attn_k_norm"),
            ]
        };
        for (from, to) in norms {
            if present(&format!("{from}.weight")) {
                tensors.norm(&hf(&format!("{from}.weight")), &gg(&format!("{to}.weight")))?;
            }
        }
        if spec.fused_qkv {
            tensors.copy(&hf("self_attn.qkv_proj.weight"), &gg("attn_qkv.weight"))?;
        }
        for (proj, name, rotary_heads) in [
            ("q_proj", "attn_q", Some(heads)),
            ("k_proj", "attn_k", Some(kv_heads)),
            ("v_proj", "attn_v", None),
            ("o_proj", "attn_output", None),
        ] {
            // GGUF's `llama` layout pairs rotary dimensions (2i, 2i+1); HF's pairs halves.
            let permute = rotary_heads.filter(|_| spec.gguf == "llama");
            for kind in ["weight", "bias"] {
                let from = hf(&format!("self_attn.{proj}.{kind}"));
                if present(&format!("self_attn.{proj}.{kind}")) {
                    tensors.rows(&from, &gg(&format!("{name}.{kind}")), permute)?;
                } else if kind == "weight" && !(spec.fused_qkv && proj != "o_proj") {
                    return Err(missing(&checkpoint, &from));
                }
            }
        }
        let moe_gate = ["block_sparse_moe.gate.weight", "mlp.gate.weight"]
            .into_iter()
            .find(|s| present(s));
        match moe_gate {
            Some(gate) => {
                tensors.copy(&hf(gate), &gg("ffn_gate_inp.weight"))?;
                let experts = config.usize_any(&["num_local_experts", "num_experts"])?;
                let mixtral = gate.starts_with("block_sparse_moe");
                for (hf_part, mixtral_part, name) in [
                    ("gate_proj", "w1", "ffn_gate_exps"),
                    ("up_proj", "w3", "ffn_up_exps"),
                    ("down_proj", "w2", "ffn_down_exps"),
                ] {
                    let each: Vec<String> = (0..experts)
                        .map(|e| match mixtral {
                            true => hf(&format!(
                                "block_sparse_moe.experts.{e}.{mixtral_part}.weight"
                            )),
                            false => hf(&format!("mlp.experts.{e}.{hf_part}.weight")),
                        })
                        .collect();
                    tensors.stack(&each, &gg(&format!("{name}.weight")))?;
                }
                if present("mlp.shared_expert.up_proj.weight") {
                    for part in ["gate", "up", "down"] {
                        tensors.copy(
                            &hf(&format!("mlp.shared_expert.{part}_proj.weight")),
                            &gg(&format!("ffn_{part}_shexp.weight")),
                        )?;
                    }
                }
                if present("mlp.shared_expert_gate.weight") {
                    tensors.copy(
                        &hf("mlp.shared_expert_gate.weight"),
                        &gg("ffn_gate_inp_shexp.weight"),
                    )?;
                }
            }
            None if spec.fused_gate_up => {
                tensors.copy(&hf("mlp.gate_up_proj.weight"), &gg("ffn_up.weight"))?;
                tensors.copy(&hf("mlp.down_proj.weight"), &gg("ffn_down.weight"))?;
            }
            None => {
                for part in ["gate", "up", "down"] {
                    tensors.copy(
                        &hf(&format!("mlp.{part}_proj.weight")),
                        &gg(&format!("ffn_{part}.weight")),
                    )?;
                }
            }
        }
    }
    Ok(GgufFile::from_bytes(w.to_bytes(), &source)?)
}

/// Whether `path` is a Hugging Face model directory: a `config.json`, and no vindex manifest
/// (`index.json`), the other kind of directory a model argument may name.
pub fn is_hf_dir(path: &Path) -> bool {
    path.join("config.json").is_file() && !path.join("index.json").exists()
}

/// [`gguf_from_hf_dir`] shared, ready for [`crate::Model::load`].
pub fn open_hf_dir(dir: &Path, quantize: Option<GgmlType>) -> Result<Arc<GgufFile>, ModelError> {
    gguf_from_hf_dir(dir, quantize).map(Arc::new)
}

fn missing(checkpoint: &Checkpoint, name: &str) -> ModelError {
    ModelError::Format(quarry_format::FormatError::MissingTensor {
        file: checkpoint.source().to_string(),
        tensor: name.to_string(),
    })
}

/// `config.json`, read with the family it names.
struct Config {
    file: String,
    json: Map<String, Json>,
    spec: &'static ArchSpec,
    model_type: String,
}

impl Config {
    fn read(dir: &Path) -> Result<Config, ModelError> {
        let path = dir.join("config.json");
        let file = path.display().to_string();
        let json = read_json(&path, MAX_CONFIG_BYTES, "a config.json")?;
        let json = match json {
            Some(Json::Object(json)) => json,
            Some(_) => return Err(invalid(&file, "JSON", "is not an object".into())),
            None => {
                return Err(invalid(
                    &dir.display().to_string(),
                    "config.json",
                    "missing: the path is a directory, not a regular file (a GGUF model), and \
                     not a Hugging Face model directory either"
                        .into(),
                ))
            }
        };
        let model_type = match json.get("model_type") {
            Some(Json::String(s)) => s.clone(),
            other => {
                return Err(invalid(
                    &file,
                    "model_type",
                    format!("must be a string, found {}", shown(other)),
                ))
            }
        };
        let spec =
            ArchSpec::of_hf(&model_type).ok_or_else(|| ModelError::UnsupportedArchitecture {
                file: file.clone(),
                arch: model_type.clone(),
                supported: ArchSpec::supported_hf(),
            })?;
        Ok(Config {
            file,
            json,
            spec,
            model_type,
        })
    }

    /// Field `key`, absent when missing or `null`.
    fn get(&self, key: &str) -> Option<&Json> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.optional_usize(key)?
            .ok_or_else(|| invalid(&self.file, key, "is missing".into()))
    }

    fn usize_any(&self, keys: &[&str]) -> Result<usize, ModelError> {
        for key in keys {
            if let Some(v) = self.optional_usize(key)? {
                return Ok(v);
            }
        }
        Err(invalid(&self.file, keys[0], "is missing".into()))
    }

    fn optional_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= 1 << 24 => Ok(Some(n as usize)),
                _ => Err(invalid(
                    &self.file,
                    key,
                    format!("must be an integer between 1 and 2^24, found {v}"),
                )),
            },
        }
    }

    fn optional_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x as f32)),
                _ => Err(invalid(
                    &self.file,
                    key,
                    format!("must be a positive number, found {v}"),
                )),
            },
        }
    }

    fn flag(&self, key: &str) -> Result<bool, ModelError> {
        Ok(self.optional_flag(key)?.unwrap_or(false))
    }

    fn optional_flag(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(invalid(
                &self.file,
                key,
                format!("must be true or false, found {v}"),
            )),
        }
    }

    fn heads(&self) -> Result<usize, ModelError> {
        self.usize("num_attention_heads")
    }

    fn kv_heads(&self) -> Result<usize, ModelError> {
        Ok(self
            .optional_usize("num_key_value_heads")?
            .unwrap_or(self.heads()?))
    }

    /// The hyper-parameters under the GGUF keys of the family's architecture.
    fn metadata(&self, w: &mut GgufWriter<'_>) -> Result<(), ModelError> {
        let arch = self.spec.gguf;
        let mut meta = |key: &str, value: Value| -> Result<(), ModelError> {
            w.add_metadata(format!("{arch}.{key}"), value)?;
            Ok(())
        };
        let u = |n: usize| Value::U32(n as u32);
        let d = self.usize("hidden_size")?;
        let heads = self.heads()?;
        meta("block_count", u(self.usize("num_hidden_layers")?))?;
        meta("embedding_length", u(d))?;
        meta("feed_forward_length", u(self.usize("intermediate_size")?))?;
        meta("attention.head_count", u(heads))?;
        meta("attention.head_count_kv", u(self.kv_heads()?))?;
        meta("vocab_size", u(self.usize("vocab_size")?))?;
        let head_dim = match self.optional_usize("head_dim")? {
            Some(h) => {
                meta("attention.key_length", u(h))?;
                meta("attention.value_length", u(h))?;
                h
            }
            None => d / heads,
        };
        if let Some(n) = self.optional_usize("max_position_embeddings")? {
            meta("context_length", u(n))?;
        }
        if let Some(eps) = self.optional_f32("rms_norm_eps")? {
            meta("attention.layer_norm_rms_epsilon", Value::F32(eps))?;
        }
        if let Some(theta) = self.optional_f32("rope_theta")? {
            meta("rope.freq_base", Value::F32(theta))?;
        }
        if let Some(theta) = self.optional_f32("rope_local_base_freq")? {
            meta("rope.freq_base_swa", Value::F32(theta))?;
        }
        if let Some(factor) = self.optional_f32("partial_rotary_factor")? {
            let dims = (head_dim as f32 * factor).round() as usize;
            meta("rope.dimension_count", u(dims))?;
        }
        self.rope_scaling(&mut meta)?;
        // A window is used unless the config turns it off (Qwen 2 keeps one it does not use).
        if self.optional_flag("use_sliding_window")? != Some(false) {
            if let Some(window) = self.optional_usize("sliding_window")? {
                meta("attention.sliding_window", u(window))?;
            }
        }
        if let Some(pattern) = self.optional_usize("sliding_window_pattern")? {
            meta("attention.sliding_window_pattern", u(pattern))?;
        }
        for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if let Some(cap) = self.optional_f32(key)? {
                meta(key, Value::F32(cap))?;
            }
        }
        if let Some(q) = self.optional_f32("query_pre_attn_scalar")? {
            if q != head_dim as f32 {
                meta("attention.scale", Value::F32(1.0 / q.sqrt()))?;
            }
        }
        if let Some(experts) = self
            .optional_usize("num_local_experts")?
            .or(self.optional_usize("num_experts")?)
        {
            meta("expert_count", u(experts))?;
            meta("expert_used_count", u(self.usize("num_experts_per_tok")?))?;
            if let Some(ff) = self.optional_usize("moe_intermediate_size")? {
                meta("expert_feed_forward_length", u(ff))?;
            }
            if let Some(ff) = self.optional_usize("shared_expert_intermediate_size")? {
                meta("expert_shared_feed_forward_length", u(ff))?;
            }
            if let Some(norm) = self.optional_flag("norm_topk_prob")? {
                meta("expert_weights_norm", Value::Bool(norm))?;
            }
        }
        w.add_metadata("general.architecture", Value::String(arch.into()))?;
        w.add_metadata("general.name", Value::String(self.model_type.clone()))?;
        Ok(())
    }

    /// The per-frequency RoPE divisors `rope_scaling` implies, as GGUF tensors: Llama 3's
    /// (`rope_freqs.weight`), computed as llama.cpp's converter does — unchanged above the
    /// high-frequency wavelength, divided by `factor` below the low one, interpolated between
    /// — or LongRoPE's two lists as given (`rope_factors_long.weight`,
    /// `rope_factors_short.weight`).
    fn rope_factors(&self) -> Result<Vec<(&'static str, Vec<f32>)>, ModelError> {
        let Some(scaling) = self.get("rope_scaling") else {
            return Ok(Vec::new());
        };
        match scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Json::as_str)
        {
            Some("llama3") => Ok(vec![("rope_freqs.weight", self.llama3_factors(scaling)?)]),
            Some("longrope") | Some("su") => {
                let list = |key: &str| -> Result<Vec<f32>, ModelError> {
                    let values = scaling.get(key).and_then(Json::as_array);
                    let parsed: Option<Vec<f32>> = values.and_then(|v| {
                        v.iter()
                            .map(|x| x.as_f64().filter(|x| x.is_finite() && *x > 0.0))
                            .map(|x| x.map(|x| x as f32))
                            .collect()
                    });
                    parsed.filter(|p| !p.is_empty()).ok_or_else(|| {
                        let problem = "must be a list of positive numbers".to_string();
                        invalid(&self.file, &format!("rope_scaling.{key}"), problem)
                    })
                };
                Ok(vec![
                    ("rope_factors_long.weight", list("long_factor")?),
                    ("rope_factors_short.weight", list("short_factor")?),
                ])
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Llama 3's divisors ([`Config::rope_factors`]).
    fn llama3_factors(&self, scaling: &Json) -> Result<Vec<f32>, ModelError> {
        let number = |key: &str, default: f64| -> Result<f64, ModelError> {
            match scaling.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| {
                        let problem = format!("must be a positive number, found {v}");
                        invalid(&self.file, &format!("rope_scaling.{key}"), problem)
                    }),
            }
        };
        let factor = number("factor", 8.0)?;
        let low = number("low_freq_factor", 1.0)?;
        let high = number("high_freq_factor", 4.0)?;
        let context = number("original_max_position_embeddings", 8192.0)?;
        if high <= low {
            let problem = "high_freq_factor must exceed low_freq_factor".to_string();
            return Err(invalid(&self.file, "rope_scaling", problem));
        }
        let base = f64::from(self.optional_f32("rope_theta")?.unwrap_or(10_000.0));
        let dim = match self.optional_usize("head_dim")? {
            Some(h) => h,
            None => self.usize("hidden_size")? / self.heads()?,
        };
        let (low_wavelen, high_wavelen) = (context / low, context / high);
        Ok((0..dim / 2)
            .map(|i| {
                let freq = base.powf(-((2 * i) as f64) / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let divisor = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth = (context / wavelen - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                divisor as f32
            })
            .collect())
    }

    /// `rope_scaling`: linear scaling and YaRN are GGUF keys, Llama 3's scaling a tensor,
    /// LongRoPE two tensors ([`Config::rope_factors`]) and the keys below, as transformers
    /// computes them; the other schemes are refused by name rather than run wrong.
    fn rope_scaling(
        &self,
        meta: &mut impl FnMut(&str, Value) -> Result<(), ModelError>,
    ) -> Result<(), ModelError> {
        let Some(scaling) = self.get("rope_scaling") else {
            return Ok(());
        };
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Json::as_str);
        match kind {
            Some("default") | Some("llama3") => Ok(()),
            Some("yarn") => {
                // The paper's defaults, which llama.cpp assumes; other values are refused.
                for (key, default) in [
                    ("beta_fast", Some(32.0)),
                    ("beta_slow", Some(1.0)),
                    ("attention_factor", None),
                    ("mscale", None),
                    ("mscale_all_dim", None),
                ] {
                    if let Some(v) = scaling.get(key).filter(|v| !v.is_null()) {
                        if v.as_f64() != default {
                            let problem = format!("{v} is not supported (YaRN runs with the defaults llama.cpp assumes)");
                            return Err(invalid(
                                &self.file,
                                &format!("rope_scaling.{key}"),
                                problem,
                            ));
                        }
                    }
                }
                let factor = scaling
                    .get("factor")
                    .and_then(Json::as_f64)
                    .filter(|f| f.is_finite() && *f >= 1.0)
                    .ok_or_else(|| {
                        invalid(
                            &self.file,
                            "rope_scaling.factor",
                            "must be a number ≥ 1".into(),
                        )
                    })?;
                let original = match scaling.get("original_max_position_embeddings") {
                    Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                        let problem = "must be a positive integer".to_string();
                        invalid(
                            &self.file,
                            "rope_scaling.original_max_position_embeddings",
                            problem,
                        )
                    })? as usize,
                    None => self.usize("max_position_embeddings")?,
                };
                meta("rope.scaling.type", Value::String("yarn".into()))?;
                meta("rope.scaling.factor", Value::F32(factor as f32))?;
                meta(
                    "rope.scaling.original_context_length",
                    Value::U32(original.min(u32::MAX as usize) as u32),
                )
            }
            Some("longrope") | Some("su") => {
                // Phi-3 keeps the pretrained context beside the extended one, whose ratio is
                // the scale; the factors' amplitude is sqrt(1 + ln(scale) / ln(original)).
                let extended = self.usize("max_position_embeddings")?;
                let original = self
                    .optional_usize("original_max_position_embeddings")?
                    .unwrap_or(extended);
                let scale = extended as f64 / original as f64;
                let amplitude = match scaling.get("attention_factor").and_then(Json::as_f64) {
                    Some(a) => a,
                    None if scale <= 1.0 => 1.0,
                    None => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
                };
                meta("rope.scaling.attn_factor", Value::F32(amplitude as f32))?;
                meta(
                    "rope.scaling.original_context_length",
                    Value::U32(original.min(u32::MAX as usize) as u32),
                )
            }
            Some("linear") => {
                let factor = scaling
                    .get("factor")
                    .and_then(Json::as_f64)
                    .filter(|f| f.is_finite() && *f > 0.0);
                let factor = factor.ok_or_else(|| {
                    invalid(
                        &self.file,
                        "rope_scaling.factor",
                        "must be a positive number".into(),
                    )
                })?;
                meta("rope.scaling.type", Value::String("linear".into()))?;
                meta("rope.scaling.factor", Value::F32(factor as f32))
            }
            other => Err(invalid(
                &self.file,
                "rope_scaling",
                format!(
                    "type {} is not supported (linear, llama3, yarn and longrope are)",
                    shown(other.map(|s| Json::String(s.into())).as_ref())
                ),
            )),
        }
    }
}

/// The tokenizer files beside the checkpoint as GGUF metadata: `tokenizer.json` whole (model
/// `huggingface`, which Quarry's tokenizer runs with HF `tokenizers`), its vocabulary as the
/// token list (padded to the model's vocabulary with `[PAD<id>]`, as llama.cpp's converter
/// does; added special tokens as control tokens), the chat template, BOS/EOS ids (from
/// `config.json`, else `generation_config.json`) and whether BOS is added.
fn tokenizer_metadata(
    dir: &Path,
    config: &Config,
    w: &mut GgufWriter<'_>,
) -> Result<(), ModelError> {
    let path = dir.join("tokenizer.json");
    let file = path.display().to_string();
    let tokenizer_config = read_json(
        &dir.join("tokenizer_config.json"),
        MAX_CONFIG_BYTES,
        "a tokenizer_config.json",
    )?;
    if path.exists() {
        let text = read_text(&path, MAX_TOKENIZER_BYTES, "a tokenizer.json")?;
        let json = parse_json(&file, &text)?;
        let (tokens, types) = vocabulary(&json, config.usize("vocab_size")?, &file)?;
        let strings = tokens.into_iter().map(Value::String).collect();
        w.add_metadata("tokenizer.ggml.model", Value::String("huggingface".into()))?;
        let tokens = Value::Array(ValueType::String, strings);
        w.add_metadata("tokenizer.ggml.tokens", tokens)?;
        let types = types.into_iter().map(Value::I32).collect();
        w.add_metadata(
            "tokenizer.ggml.token_type",
            Value::Array(ValueType::I32, types),
        )?;
        // BOS is added where tokenizer_config.json says so, or where tokenizer.json's
        // post-processor puts a special token before the text (Llama 3).
        let add_bos = match tokenizer_config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
        {
            Some(Json::Bool(b)) => *b,
            _ => json
                .pointer("/post_processor/single/0/SpecialToken")
                .is_some(),
        };
        w.add_metadata("tokenizer.ggml.add_bos_token", Value::Bool(add_bos))?;
        w.add_metadata("tokenizer.huggingface.json", Value::String(text))?;
    }
    if let Some(Json::String(template)) = tokenizer_config
        .as_ref()
        .and_then(|c| c.get("chat_template"))
    {
        w.add_metadata("tokenizer.chat_template", Value::String(template.clone()))?;
    }
    let generation = read_json(
        &dir.join("generation_config.json"),
        MAX_CONFIG_BYTES,
        "a generation_config.json",
    )?;
    for (key, gguf) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ] {
        let id = config
            .get(key)
            .or_else(|| generation.as_ref().and_then(|g| g.get(key)))
            // A list of end tokens: the first is the EOS.
            .map(|v| v.as_array().and_then(|a| a.first()).unwrap_or(v));
        if let Some(id) = id {
            let id = id
                .as_u64()
                .filter(|&n| n < u32::MAX as u64)
                .ok_or_else(|| {
                    invalid(&config.file, key, format!("must be a token id, found {id}"))
                })?;
            w.add_metadata(gguf, Value::U32(id as u32))?;
        }
    }
    Ok(())
}

/// Copies checkpoint tensors into the writer under GGUF names.
struct Tensors<'c, 'w> {
    checkpoint: &'c Checkpoint,
    writer: &'w mut GgufWriter<'c>,
    quantize: Option<GgmlType>,
    norms_add_one: bool,
}

impl<'c> Tensors<'c, '_> {
    fn tensor(&self, name: &str) -> Result<CheckpointTensor<'c>, ModelError> {
        Ok(self.checkpoint.tensor(name)?)
    }

    fn add(
        &mut self,
        name: &str,
        dims: Vec<u64>,
        dtype: GgmlType,
        data: Cow<'c, [u8]>,
    ) -> Result<(), ModelError> {
        // Matrices are quantized when asked and their rows are whole blocks; vectors, the
        // routers and odd shapes keep their type.
        let quantize = self.quantize.filter(|q| {
            dims.len() >= 2
                && !name.contains("ffn_gate_inp")
                && dims[0].is_multiple_of(q.block_size() as u64)
        });
        let (dtype, data) = match quantize {
            Some(q) if q != dtype => {
                let values = to_f32(dtype, &data, self.checkpoint.source(), name)?;
                let mut out = vec![0u8; q.bytes_for(values.len() as u64).unwrap_or(0) as usize];
                quarry_kernels::quantize(q, &values, &mut out).map_err(|source| {
                    ModelError::Kernel {
                        file: self.checkpoint.source().to_string(),
                        tensor: name.to_string(),
                        source,
                    }
                })?;
                (q, Cow::Owned(out))
            }
            _ => (dtype, data),
        };
        self.writer.add_tensor(name, &dims, dtype, data)?;
        Ok(())
    }

    /// A tensor as stored (GGUF dims are the row-major shape reversed).
    fn copy(&mut self, from: &str, to: &str) -> Result<(), ModelError> {
        self.rows(from, to, None)
    }

    /// A tensor whose rows, head by head of `heads`, are reordered from halves to adjacent
    /// rotary pairs (GGUF's `llama` layout) when `heads` is given.
    fn rows(&mut self, from: &str, to: &str, heads: Option<usize>) -> Result<(), ModelError> {
        let t = self.tensor(from)?;
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let data = match heads {
            None => Cow::Borrowed(t.data),
            Some(heads) => {
                let rows = t.shape[0];
                let row_bytes = t.data.len() / rows.max(1);
                if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
                    return Err(ModelError::Invalid {
                        file: self.checkpoint.source().to_string(),
                        item: from.to_string(),
                        problem: format!(
                            "{rows} rows do not split into {heads} heads of rotary pairs"
                        ),
                    });
                }
                let half = rows / heads / 2;
                let mut out = Vec::with_capacity(t.data.len());
                for h in 0..heads {
                    for i in 0..half {
                        for j in 0..2 {
                            let row = h * 2 * half + j * half + i;
                            out.extend_from_slice(&t.data[row * row_bytes..(row + 1) * row_bytes]);
                        }
                    }
                }
                Cow::Owned(out)
            }
        };
        self.add(to, dims, t.dtype, data)
    }

    /// A norm's gains, as `f32`, plus 1 where the family stores offsets from 1 (Gemma).
    fn norm(&mut self, from: &str, to: &str) -> Result<(), ModelError> {
        let t = self.tensor(from)?;
        let mut values = to_f32(t.dtype, t.data, self.checkpoint.source(), from)?;
        if self.norms_add_one {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        let dims = t.shape.iter().rev().map(|&d| d as u64).collect();
        self.add(
            to,
            dims,
            GgmlType::F32,
            Cow::Owned(bytemuck::cast_slice(&values).to_vec()),
        )
    }

    /// Same-shaped tensors (one per expert) stacked into one 3-D tensor.
    fn stack(&mut self, from: &[String], to: &str) -> Result<(), ModelError> {
        let first = self.tensor(&from[0])?;
        let mut data = Vec::with_capacity(first.data.len() * from.len());
        for name in from {
            let t = self.tensor(name)?;
            if t.shape != first.shape || t.dtype != first.dtype {
                return Err(ModelError::Invalid {
                    file: self.checkpoint.source().to_string(),
                    item: name.clone(),
                    problem: format!(
                        "is {:?} {:?}, unlike {} ({:?} {:?})",
                        t.dtype, t.shape, from[0], first.dtype, first.shape
                    ),
                });
            }
            data.extend_from_slice(t.data);
        }
        let mut dims: Vec<u64> = first.shape.iter().rev().map(|&d| d as u64).collect();
        dims.push(from.len() as u64);
        self.add(to, dims, first.dtype, Cow::Owned(data))
    }
}

fn to_f32(dtype: GgmlType, data: &[u8], file: &str, name: &str) -> Result<Vec<f32>, ModelError> {
    let n = data.len() / dtype.type_size().max(1);
    let mut values = vec![0.0f32; n];
    quarry_kernels::dequantize(dtype, data, &mut values).map_err(|source| ModelError::Kernel {
        file: file.to_string(),
        tensor: name.to_string(),
        source,
    })?;
    Ok(values)
}

/// A JSON file beside the checkpoint, `None` when it does not exist.
fn read_json(path: &Path, max: u64, what: &str) -> Result<Option<Json>, ModelError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = read_text(path, max, what)?;
    parse_json(&path.display().to_string(), &text).map(Some)
}

/// The text of `path`, at most `max` bytes (`what` names the limit in the error).
fn read_text(path: &Path, max: u64, what: &str) -> Result<String, ModelError> {
    read_text_capped(path, max, what).map_err(|source| {
        ModelError::Format(quarry_format::FormatError::Io {
            file: path.display().to_string(),
            action: "read",
            source,
        })
    })
}

fn parse_json(file: &str, text: &str) -> Result<Json, ModelError> {
    serde_json::from_str(text).map_err(|e| invalid(file, "JSON", format!("does not parse: {e}")))
}

/// GGUF token types (llama.cpp's numbering).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Every token of `tokenizer.json` by id, with its GGUF type, padded to `vocab_size`.
fn vocabulary(
    json: &Json,
    vocab_size: usize,
    file: &str,
) -> Result<(Vec<String>, Vec<i32>), ModelError> {
    let bad = |what: String| invalid(file, "model.vocab", what);
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    let mut put = |id: u64, text: &str, kind: i32| -> Result<(), ModelError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!(
                "token id {id} is outside the model's {vocab_size} tokens"
            ))
        })?;
        *slot = Some((text.to_string(), kind));
        Ok(())
    };
    let kind = |t: &str| match t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') {
        true => BYTE,
        false => NORMAL,
    };
    match json.pointer("/model/vocab") {
        // BPE and WordPiece: text → id.
        Some(Json::Object(vocab)) => {
            for (text, id) in vocab {
                let id = id
                    .as_u64()
                    .ok_or_else(|| bad(format!("maps \"{text}\" to {id}, not an id")))?;
                put(id, text, kind(text))?;
            }
        }
        // Unigram: [text, score] in id order.
        Some(Json::Array(vocab)) => {
            for (id, entry) in vocab.iter().enumerate() {
                let text = entry
                    .get(0)
                    .and_then(Json::as_str)
                    .ok_or_else(|| bad(format!("entry {id} is not [text, score]")))?;
                put(id as u64, text, kind(text))?;
            }
        }
        _ => return Err(bad("is missing".into())),
    }
    let added = json.get("added_tokens").and_then(Json::as_array);
    for token in added.into_iter().flatten() {
        let id = token.get("id").and_then(Json::as_u64);
        let text = token.get("content").and_then(Json::as_str);
        let (Some(id), Some(text)) = (id, text) else {
            let problem = "has an entry without an id and content".to_string();
            return Err(invalid(file, "added_tokens", problem));
        };
        // Tokenizers add tokens past the embedding table (Gemma's fast tokenizer, </s> and
        // <s>); the model can neither read nor write them, so they are left out.
        if id as usize >= vocab_size {
            continue;
        }
        let special = token.get("special").and_then(Json::as_bool) == Some(true);
        put(id, text, if special { CONTROL } else { USER_DEFINED })?;
    }
    Ok(tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| t.unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED)))
        .unzip())
}

fn invalid(file: &str, item: &str, problem: String) -> ModelError {
    ModelError::Invalid {
        file: file.to_string(),
        item: item.to_string(),
        problem,
    }
}

fn shown(v: Option<&Json>) -> String {
    v.map_or("nothing".into(), |v| v.to_string())
}
