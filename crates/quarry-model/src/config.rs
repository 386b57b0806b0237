//! Architectures as configuration.
//!
//! Every supported family runs through the same forward pass; what differs is captured here:
//! norms, activation, rotary style and bases, QK-norm, sandwich norms, sliding windows,
//! soft-caps, embedding scale. Values come from GGUF metadata where the file carries them and
//! from the family's published defaults where it does not (for instance Gemma 3's
//! one-global-in-six layer pattern, which GGUF files do not record).

use quarry_format::GgufFile;

use crate::ModelError;

/// The families the forward pass knows. Each differs only by configuration values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama and its descendants (SmolLM, Mistral).
    Llama,
    /// Gemma 3.
    Gemma3,
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): GGUF's `llama` layout (Q/K rows are permuted at conversion).
    Interleaved,
    /// Halves (i, i + d/2): the GPT-NeoX layout used by Gemma.
    Halves,
}

/// The gate activation of the gated FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU.
    Silu,
    /// GeGLU with the tanh approximation of GELU.
    GeluTanh,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// `general.architecture` as written in the file.
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ff_dim: usize,
    pub vocab_size: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    pub norm_eps: f32,
    pub activation: Activation,
    pub rope_style: RopeStyle,
    /// Dimensions of each head that are rotated (the rest pass through).
    pub rope_dims: usize,
    /// RoPE base of global-attention layers.
    pub rope_base: f32,
    /// RoPE base of sliding-window layers.
    pub rope_base_local: f32,
    /// Linear RoPE scaling of global layers (positions divided by this).
    pub rope_scale: f32,
    /// Window of sliding-window layers, in tokens (a query sees keys less than this far back).
    pub sliding_window: Option<usize>,
    /// Per layer: true when it attends globally, false when it uses the sliding window.
    pub global_layers: Vec<bool>,
    /// Multiplier applied to attention scores before soft-capping and softmax.
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Multiplier applied to token embeddings (Gemma: sqrt(d_model)).
    pub embed_scale: f32,
}

impl ModelConfig {
    /// Reads the configuration from a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch = file.architecture()?.to_string();
        let family = match arch.as_str() {
            "llama" | "mistral" => Family::Llama,
            "gemma3" => Family::Gemma3,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    file: file.source().to_string(),
                    arch,
                    supported: "llama, mistral, gemma3",
                })
            }
        };
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let get_usize = |suffix: &str| -> Result<usize, ModelError> {
            let k = key(suffix);
            let v = file.get_u64(&k)?;
            positive(file, &k, v)
        };
        let get_usize_or = |suffix: &str, default: usize| -> Result<usize, ModelError> {
            match file.get(&key(suffix)) {
                Some(_) => get_usize(suffix),
                None => Ok(default),
            }
        };
        // Every float hyper-parameter (epsilons, RoPE bases and factors, scales, soft-caps) is
        // a positive finite number; a NaN or a negative one would run and produce garbage.
        let get_f32 = |suffix: &str| -> Result<Option<f32>, ModelError> {
            let k = key(suffix);
            if file.get(&k).is_none() {
                return Ok(None);
            }
            let v = file.get_f32(&k)?;
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(file, &k, v, "must be a positive finite number"));
            }
            Ok(Some(v))
        };
        let get_f32_or = |suffix: &str, default: f32| -> Result<f32, ModelError> {
            Ok(get_f32(suffix)?.unwrap_or(default))
        };

        // A Mixtral GGUF says `llama` and adds experts; the dense forward pass would only
        // miss its FFN tensors, so say what the file is instead.
        if let Some(experts) = file.get(&key("expert_count")).and_then(|v| v.as_u64()) {
            if experts > 0 {
                return Err(ModelError::Invalid {
                    file: file.source().to_string(),
                    item: key("expert_count"),
                    problem: format!(
                        "a mixture-of-experts model ({experts} experts); Quarry runs dense \
                         models only so far"
                    ),
                });
            }
        }
        let n_layers = get_usize("block_count")?;
        let d_model = get_usize("embedding_length")?;
        let n_heads = get_usize("attention.head_count")?;
        let n_kv_heads = get_usize_or("attention.head_count_kv", n_heads)?;
        let head_dim = get_usize_or("attention.key_length", d_model / n_heads)?;
        let value_dim = get_usize_or("attention.value_length", head_dim)?;
        if value_dim != head_dim {
            return Err(bad(
                file,
                &key("attention.value_length"),
                value_dim,
                "must equal key_length",
            ));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(bad(
                file,
                &key("attention.head_count_kv"),
                n_kv_heads,
                "must divide attention.head_count",
            ));
        }
        let ff_dim = get_usize("feed_forward_length")?;
        let context_length = get_usize_or("context_length", 4096)?;
        let vocab_size = match file.get(&key("vocab_size")) {
            Some(_) => get_usize("vocab_size")?,
            None => file.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let norm_eps = get_f32_or("attention.layer_norm_rms_epsilon", 1e-5)?;
        let rope_dims = get_usize_or("rope.dimension_count", head_dim)?;
        if rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(bad(
                file,
                &key("rope.dimension_count"),
                rope_dims,
                "must be even and at most the head size",
            ));
        }
        let rope_base = get_f32_or("rope.freq_base", 10_000.0)?;
        let rope_scale = match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
            Some("linear") => get_f32_or("rope.scaling.factor", 1.0)?,
            _ => 1.0,
        };
        let attn_softcap = get_f32("attn_logit_softcapping")?;
        let final_softcap = get_f32("final_logit_softcapping")?;
        let sliding = match file.get(&key("attention.sliding_window")) {
            Some(_) => Some(get_usize("attention.sliding_window")?),
            None => None,
        };
        let default_scale = 1.0 / (head_dim as f32).sqrt();
        let attn_scale = get_f32_or("attention.scale", default_scale)?;

        // What GGUF files leave implicit, per family. Gemma 3 interleaves five sliding-window
        // layers with one global layer, and its local layers use their own RoPE base (10k).
        let (activation, rope_style, embed_scale, rope_base_local, global_layers) = match family {
            Family::Llama => (
                Activation::Silu,
                RopeStyle::Interleaved,
                1.0,
                rope_base,
                vec![sliding.is_none(); n_layers],
            ),
            Family::Gemma3 => {
                let pattern = get_usize_or("attention.sliding_window_pattern", 6)?;
                (
                    Activation::GeluTanh,
                    RopeStyle::Halves,
                    (d_model as f32).sqrt(),
                    get_f32_or("rope.freq_base_swa", 10_000.0)?,
                    (0..n_layers)
                        .map(|i| sliding.is_none() || (i + 1) % pattern == 0)
                        .collect(),
                )
            }
        };
        let config = ModelConfig {
            family,
            architecture: arch.clone(),
            n_layers,
            d_model,
            n_heads,
            n_kv_heads,
            head_dim,
            ff_dim,
            vocab_size,
            context_length,
            norm_eps,
            activation,
            rope_style,
            rope_dims,
            rope_base,
            rope_base_local,
            rope_scale,
            sliding_window: sliding,
            global_layers,
            attn_scale,
            attn_softcap,
            final_softcap,
            embed_scale,
        };
        Ok(config)
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn positive(file: &GgufFile, key: &str, v: u64) -> Result<usize, ModelError> {
    // Generous bound: anything larger is a corrupt or hostile header, not a model.
    const LIMIT: u64 = 1 << 24;
    if v == 0 || v > LIMIT {
        return Err(bad(file, key, v, "must be between 1 and 2^24"));
    }
    Ok(v as usize)
}

fn bad(file: &GgufFile, key: &str, value: impl ToString, reason: &'static str) -> ModelError {
    ModelError::BadHyperParameter {
        file: file.source().to_string(),
        key: key.to_string(),
        value: value.to_string(),
        reason,
    }
}
