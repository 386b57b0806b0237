//! Architectures as data.
//!
//! Every supported family runs through the same forward pass over the same blocks; what
//! differs is an [`ArchSpec`] (where the norms sit, QK-norm, fused projections, activation,
//! rotary layout, which layers slide, embedding scale) plus the hyper-parameters a file
//! carries. Values come from GGUF metadata where the file has them and from the family's
//! published defaults where it does not (for instance Gemma 3's one-global-in-six layer
//! pattern, which GGUF files do not record). Adding a family is one entry of
//! [`ARCHITECTURES`].

use quarry_format::GgufFile;

use crate::ModelError;

/// What sets one family apart from the others, as data the shared forward pass reads.
#[derive(Debug, PartialEq, Eq)]
pub struct ArchSpec {
    /// `general.architecture` in a GGUF file.
    pub gguf: &'static str,
    /// The `model_type`s of Hugging Face `config.json` files that llama.cpp's converter
    /// writes as this architecture.
    pub hf: &'static [&'static str],
    /// Hugging Face checkpoints store the RMSNorm gains as offsets from 1 (Gemma).
    pub hf_norms_add_one: bool,
    /// The FFN's gate activation.
    pub activation: Activation,
    /// How rotary embeddings pair dimensions (llama.cpp's converter permutes only `llama`
    /// Q/K rows into adjacent pairs; every other family keeps halves).
    pub rope_style: RopeStyle,
    /// An RMSNorm before attention and before the FFN (`attn_norm`, `ffn_norm`).
    pub pre_norms: bool,
    /// An RMSNorm on what attention and the FFN add to the residual (`post_attention_norm`,
    /// `post_ffw_norm`): Gemma 2/3 have both kinds, OLMo 2 only these.
    pub post_norms: bool,
    pub qk_norm: QkNorm,
    /// Q, K and V stored as one matrix (`attn_qkv`, rows in that order): Phi-3.
    pub fused_qkv: bool,
    /// Gate and up stored as one matrix (`ffn_up`, gate rows first): Phi-3.
    pub fused_gate_up: bool,
    /// Token embeddings multiplied by `sqrt(d_model)`: Gemma.
    pub scale_embeddings: bool,
    /// Which layers use the sliding window when the file declares one.
    pub sliding: SlidingLayers,
    /// Whether the top-k routing weights of a mixture-of-experts layer are renormalised to
    /// sum to 1 (Mixtral, Qwen3-MoE) or kept as the softmax gave them (Qwen2-MoE, OLMoE),
    /// unless the file says (`expert_weights_norm`).
    pub normalize_expert_weights: bool,
}

/// RMSNorm of the queries and keys before RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Each head normalised on its own with one `head_dim` gain vector (Qwen 3, Gemma 3).
    PerHead,
    /// All heads normalised together, gains as wide as Q (or K): OLMo 2.
    Whole,
}

/// Which layers attend through the sliding window (when the file declares a window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlidingLayers {
    /// Every layer (Mistral, Phi-3).
    All,
    /// Layers 0, 2, 4, … slide; odd layers are global (Gemma 2).
    Even,
    /// Every layer but each `n`-th (1-based) slides, `n` from
    /// `attention.sliding_window_pattern` or this default (Gemma 3: 6); the local layers
    /// use their own RoPE base (`rope.freq_base_swa`, 10k by default).
    AllButEvery(usize),
}

/// The families Quarry runs, by their GGUF architecture names.
pub const ARCHITECTURES: &[ArchSpec] = &[
    LLAMA,
    ArchSpec {
        gguf: "mistral",
        hf: &[],
        ..LLAMA
    },
    ArchSpec {
        gguf: "qwen2",
        hf: &["qwen2"],
        rope_style: RopeStyle::Halves,
        ..LLAMA
    },
    ArchSpec {
        gguf: "qwen2moe",
        hf: &["qwen2_moe"],
        rope_style: RopeStyle::Halves,
        normalize_expert_weights: false,
        ..LLAMA
    },
    ArchSpec {
        gguf: "qwen3",
        hf: &["qwen3"],
        rope_style: RopeStyle::Halves,
        qk_norm: QkNorm::PerHead,
        ..LLAMA
    },
    ArchSpec {
        gguf: "qwen3moe",
        hf: &["qwen3_moe"],
        rope_style: RopeStyle::Halves,
        qk_norm: QkNorm::PerHead,
        ..LLAMA
    },
    ArchSpec {
        gguf: "olmo2",
        hf: &["olmo2"],
        rope_style: RopeStyle::Halves,
        pre_norms: false,
        post_norms: true,
        qk_norm: QkNorm::Whole,
        ..LLAMA
    },
    ArchSpec {
        gguf: "olmoe",
        hf: &["olmoe"],
        rope_style: RopeStyle::Halves,
        qk_norm: QkNorm::Whole,
        normalize_expert_weights: false,
        ..LLAMA
    },
    ArchSpec {
        gguf: "phi3",
        hf: &["phi3"],
        rope_style: RopeStyle::Halves,
        fused_qkv: true,
        fused_gate_up: true,
        ..LLAMA
    },
    ArchSpec {
        gguf: "gemma2",
        hf: &["gemma2"],
        hf_norms_add_one: true,
        activation: Activation::GeluTanh,
        rope_style: RopeStyle::Halves,
        post_norms: true,
        scale_embeddings: true,
        sliding: SlidingLayers::Even,
        ..LLAMA
    },
    ArchSpec {
        gguf: "gemma3",
        hf: &["gemma3_text"],
        hf_norms_add_one: true,
        activation: Activation::GeluTanh,
        rope_style: RopeStyle::Halves,
        post_norms: true,
        qk_norm: QkNorm::PerHead,
        scale_embeddings: true,
        sliding: SlidingLayers::AllButEvery(6),
        ..LLAMA
    },
];

const LLAMA: ArchSpec = ArchSpec {
    gguf: "llama",
    hf: &["llama", "mistral", "mixtral"],
    hf_norms_add_one: false,
    activation: Activation::Silu,
    rope_style: RopeStyle::Interleaved,
    pre_norms: true,
    post_norms: false,
    qk_norm: QkNorm::None,
    fused_qkv: false,
    fused_gate_up: false,
    scale_embeddings: false,
    sliding: SlidingLayers::All,
    normalize_expert_weights: true,
};

impl ArchSpec {
    /// The spec of GGUF architecture `name`.
    pub fn of_gguf(name: &str) -> Option<&'static ArchSpec> {
        ARCHITECTURES.iter().find(|a| a.gguf == name)
    }

    /// The spec of a Hugging Face `model_type`.
    pub fn of_hf(model_type: &str) -> Option<&'static ArchSpec> {
        ARCHITECTURES.iter().find(|a| a.hf.contains(&model_type))
    }

    /// Every supported Hugging Face `model_type`, comma-separated (for error messages).
    pub fn supported_hf() -> String {
        ARCHITECTURES
            .iter()
            .flat_map(|a| a.hf.iter().copied())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every supported GGUF architecture name, comma-separated (for error messages).
    pub fn supported() -> String {
        ARCHITECTURES
            .iter()
            .map(|a| a.gguf)
            .collect::<Vec<_>>()
            .join(", ")
    }
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

/// The mixture-of-experts FFN of a model whose layers route each token to a few experts
/// (`blk.N.ffn_gate_inp`); layers without a router keep a dense FFN.
#[derive(Clone, Debug, PartialEq)]
pub struct Experts {
    /// Experts per layer.
    pub count: usize,
    /// Experts each token is routed to (top-k of the router's softmax).
    pub used: usize,
    /// Hidden width of one expert.
    pub ff_dim: usize,
    /// Hidden width of the shared expert every token also runs (Qwen2-MoE), where there is one.
    pub shared_ff_dim: usize,
    /// Renormalise the top-k weights to sum to 1.
    pub normalize: bool,
    /// Multiplier of every routing weight (`expert_weights_scale`, 1 by default).
    pub scale: f32,
}

/// Hyper-parameters of a decoder-only transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub spec: &'static ArchSpec,
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
    /// YaRN scaling of global layers: `(factor, original context)`.
    pub rope_yarn: Option<(f32, usize)>,
    /// The amplitude of the rotation's cosines and sines (LongRoPE's attention factor, GGUF
    /// `rope.scaling.attn_factor`; 1 otherwise).
    pub rope_attn_factor: f32,
    /// The context the RoPE factors were made for (`rope.scaling.original_context_length`,
    /// else the training context): a model with LongRoPE's two sets of factors uses its long
    /// ones for a sequence whose cache holds more, as llama.cpp does for a larger `n_ctx`.
    pub rope_original_context: usize,
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
    /// The experts, for a mixture-of-experts model.
    pub experts: Option<Experts>,
}

impl ModelConfig {
    /// Reads the configuration from a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, ModelError> {
        let arch = file.architecture()?.to_string();
        let Some(spec) = ArchSpec::of_gguf(&arch) else {
            return Err(ModelError::UnsupportedArchitecture {
                file: file.source().to_string(),
                arch,
                supported: ArchSpec::supported(),
            });
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
            None => file.array_items("tokenizer.ggml.tokens")?.len(),
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
        // LongRoPE's factors are tensors and its amplitude a key (Phi-3's converter writes no
        // type, the generic one "longrope"). Other schemes are refused rather than run wrong.
        let unsupported = |problem: String| ModelError::Invalid {
            file: file.source().to_string(),
            item: key("rope.scaling.type"),
            problem,
        };
        let rope_original_context =
            get_usize_or("rope.scaling.original_context_length", context_length)?;
        let (rope_scale, rope_yarn) =
            match file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                Some("linear") => (get_f32_or("rope.scaling.factor", 1.0)?, None),
                None | Some("none") | Some("longrope") => (1.0, None),
                Some("yarn") => {
                    // DeepSeek's variant rescales the amplitude by a log multiplier.
                    if file.get(&key("rope.scaling.yarn_log_multiplier")).is_some() {
                        return Err(unsupported(
                            "YaRN with a yarn_log_multiplier (DeepSeek's variant) is not \
                             supported"
                                .into(),
                        ));
                    }
                    let factor = get_f32_or("rope.scaling.factor", 1.0)?;
                    (1.0, Some((factor, rope_original_context)))
                }
                Some(other) => {
                    return Err(unsupported(format!(
                        "{other:?} RoPE scaling is not supported (linear, YaRN, Llama 3's \
                         rope_freqs and Phi-3's LongRoPE factors are)"
                    )))
                }
            };
        let rope_attn_factor = get_f32_or("rope.scaling.attn_factor", 1.0)?;
        let attn_softcap = get_f32("attn_logit_softcapping")?;
        let final_softcap = get_f32("final_logit_softcapping")?;
        // A window of 0 (Phi-3's converter writes one for "none") means no window.
        let sliding = match file.get(&key("attention.sliding_window")) {
            Some(_) if file.get_u64(&key("attention.sliding_window"))? == 0 => None,
            Some(_) => Some(get_usize("attention.sliding_window")?),
            None => None,
        };
        // Gemma 2 27B scales queries by 1/sqrt(d_model / heads) (its query_pre_attn_scalar),
        // not by the head size; its GGUF says so only by having 46 layers, which is how
        // llama.cpp recognises it.
        let scaled_by = match (arch.as_str(), n_layers) {
            ("gemma2", 46) => d_model / n_heads,
            _ => head_dim,
        };
        let default_scale = 1.0 / (scaled_by as f32).sqrt();
        let attn_scale = get_f32_or("attention.scale", default_scale)?;

        let (rope_base_local, global_layers) = match spec.sliding {
            SlidingLayers::All => (rope_base, vec![sliding.is_none(); n_layers]),
            SlidingLayers::Even => (
                rope_base,
                (0..n_layers)
                    .map(|i| sliding.is_none() || i % 2 == 1)
                    .collect(),
            ),
            SlidingLayers::AllButEvery(default) => {
                let pattern = get_usize_or("attention.sliding_window_pattern", default)?;
                (
                    get_f32_or("rope.freq_base_swa", 10_000.0)?,
                    (0..n_layers)
                        .map(|i| sliding.is_none() || (i + 1) % pattern == 0)
                        .collect(),
                )
            }
        };
        // A Mixtral GGUF says `llama` and adds experts: the expert count decides.
        let experts = match file.get(&key("expert_count")).and_then(|v| v.as_u64()) {
            None | Some(0) => None,
            Some(_) => {
                let count = get_usize("expert_count")?;
                let used = get_usize("expert_used_count")?;
                if used > count {
                    return Err(bad(
                        file,
                        &key("expert_used_count"),
                        used,
                        "must be at most expert_count",
                    ));
                }
                let normalize = match file.get(&key("expert_weights_norm")) {
                    Some(v) => v.as_bool().ok_or_else(|| {
                        bad(file, &key("expert_weights_norm"), "?", "must be a boolean")
                    })?,
                    None => spec.normalize_expert_weights,
                };
                Some(Experts {
                    count,
                    used,
                    ff_dim: get_usize_or("expert_feed_forward_length", ff_dim)?,
                    shared_ff_dim: get_usize_or("expert_shared_feed_forward_length", ff_dim)?,
                    normalize,
                    scale: get_f32_or("expert_weights_scale", 1.0)?,
                })
            }
        };
        let embed_scale = if spec.scale_embeddings {
            (d_model as f32).sqrt()
        } else {
            1.0
        };
        let config = ModelConfig {
            spec,
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
            activation: spec.activation,
            rope_style: spec.rope_style,
            rope_dims,
            rope_base,
            rope_base_local,
            rope_scale,
            rope_yarn,
            rope_attn_factor,
            rope_original_context,
            sliding_window: sliding,
            global_layers,
            attn_scale,
            attn_softcap,
            final_softcap,
            embed_scale,
            experts,
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
