//! A model's weights, held over its GGUF file, and where its forward pass runs.
//!
//! Matrices stay in their quantized blocks inside the memory map ([`WeightView`]), plus, where
//! the decode kernel reads a layout of its own, one repacked copy made at load ([`Matrix`]);
//! only norm vectors (a few KiB each) are copied out as `f32`. The forward pass is
//! [`crate::forward`]'s program, on the CPU backend ([`crate::cpu`]) or on the device the model
//! was put on ([`Model::on_device`]); it takes a batch of tokens — the whole prompt at once
//! during prefill, one token during decoding, or any mix of several sequences' prompt chunks
//! and decode tokens when serving.
//!
//! A [`Model`] owns what it reads: the file (an `Arc`, so the map lives as long as any model
//! over it) and the copies made at load, behind one more `Arc`, so a clone is cheap and the
//! value can be handed to other threads. The FFN down projections may be read through an
//! [`FfnOverlay`] of low-rank deltas (edits): per sequence of a batch
//! ([`SequenceBatch::overlay`]), or by default for a whole model value ([`Model::with_overlay`]).

use quarry_format::{GgufFile, TensorView};
use quarry_kernels::{matmul_quantized, Matrix, QuantizedActivations, WeightView};
use std::ops::Range;
use std::sync::Arc;

use crate::backend::{DeviceBackend, DeviceForward, DeviceKvPool, DeviceModel};
use crate::config::{Experts, ModelConfig, QkNorm};
use crate::cpu::{Cpu, CpuLayer};
use crate::ffn::{FeatureBlock, FfnFeatures};
use crate::forward::{not_on_device, Ffn, GatedFfn, Layer, Linear, MoeFfn, Program, SequenceInput};
use crate::kv_cache::{ContiguousKvCache, KvCache};
use crate::ops::{softcap, Rope};
use crate::overlay::FfnOverlay;
use crate::ModelError;

/// A loaded model: configuration, weights, and the overlay its sequences run under unless
/// they name their own. Cloning shares the weights (an `Arc`); [`Model::with_overlay`] gives a
/// clone over other deltas.
#[derive(Clone)]
pub struct Model {
    weights: Arc<Loaded>,
    overlay: Option<Arc<FfnOverlay>>,
    /// The device the forward pass runs on, its weights uploaded ([`Model::on_device`]);
    /// `None`: the CPU.
    device: Option<Arc<dyn DeviceForward>>,
}

/// What [`Model::load`] builds over a file, shared by every clone of the model.
///
/// The views have the `'static` lifetime but really borrow `file`: a GGUF file's bytes (its
/// memory map, or the heap buffer of one read into memory) never move or change while the
/// `GgufFile` lives, and the `Arc` keeps it alive as long as this value. So the views are
/// valid for as long as `Loaded` exists; they never leave it with that lifetime (every
/// accessor ties what it returns to `&self`).
pub(crate) struct Loaded {
    pub(crate) config: ModelConfig,
    token_embd: WeightView<'static>,
    pub(crate) output: Matrix<'static>,
    /// The embedding is the output head (tied): looked up through `output`, whose file pages
    /// may have been released for a repacked copy.
    embed_from_head: bool,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) layers: Vec<CpuLayer>,
    rope_global: Rope,
    /// LongRoPE's long factors, for sequences whose cache holds more than the original
    /// context ([`ModelConfig::rope_original_context`]).
    rope_long: Option<Rope>,
    pub(crate) rope_local: Rope,
    /// Declared last, so dropped after the views into it.
    pub(crate) file: Arc<GgufFile>,
}

/// Sees the inside of a forward pass (for tracing and attribution). Every slice holds one
/// row per token of the batch; methods default to doing nothing.
pub trait ForwardObserver {
    /// The scaled token embeddings: the residual stream entering layer 0 (`d_model` per row).
    fn embeddings(&mut self, _x: &[f32]) {}
    /// What layer `layer`'s attention adds to the residual (after any post-attention norm).
    fn attention_output(&mut self, _layer: usize, _added: &[f32]) {}
    /// The normalized input layer `layer`'s FFN reads (`d_model` per row) and its hidden
    /// activations, one per feature ([`Model::ffn_features`]): `act(gate · x) ⊙ (up · x)`,
    /// times the block's routing weight in a mixture of experts (zero for the experts a row
    /// is not routed to).
    fn ffn_activations(&mut self, _layer: usize, _input: &[f32], _activations: &[f32]) {}
    /// Whether [`ForwardObserver::ffn_activations`] is wanted: a mixture of experts builds
    /// its feature-wide activations only for an observer that reads them.
    fn observes_ffn_activations(&self) -> bool {
        true
    }
    /// Layer `layer`'s FFN down projection `y` (overlay included), before any post-FFN norm.
    fn ffn_projection(&mut self, _layer: usize, _y: &[f32]) {}
    /// What layer `layer`'s FFN adds to the residual (after any post-FFN norm).
    fn ffn_output(&mut self, _layer: usize, _added: &[f32]) {}
    /// The residual stream after the last layer, before the final norm.
    fn final_residual(&mut self, _x: &[f32]) {}
}

pub(crate) struct NoObserver;

/// One sequence's part of a batched forward pass ([`Model::forward_batch`]).
pub struct SequenceBatch<'t, 'c, C> {
    /// Tokens placed after what `cache` holds (at least one).
    pub tokens: &'t [u32],
    pub cache: &'c mut C,
    /// Indices within `tokens` of the rows whose logits are returned.
    pub rows: Range<usize>,
    /// The deltas this sequence's FFN down projections are read with; `None`: the model's
    /// own ([`Model::overlay`]), so a batch that mixes base weights with overlays runs on a
    /// model without one. A sequence's cache must have been filled under the same overlay.
    pub overlay: Option<&'t FfnOverlay>,
}

impl ForwardObserver for NoObserver {
    fn observes_ffn_activations(&self) -> bool {
        false
    }
}

/// One layer's attention weights, for tools that recompute the block outside the forward pass
/// (the editor's reverse mode): `x + post_norm(wo · attend(rope(q_norm(wq · a + bq)), …))`
/// with `a` the residual through `norm` (the residual itself when the family has no
/// pre-norm). A QK-norm gain as long as a head normalises each head; one as long as all of
/// Q (or K) normalises them together.
#[derive(Clone, Copy, Debug)]
pub struct AttentionWeights<'m, 'a> {
    pub norm: Option<&'m [f32]>,
    pub wq: WeightView<'a>,
    pub wk: WeightView<'a>,
    pub wv: WeightView<'a>,
    pub wo: WeightView<'a>,
    /// Biases of Q, K, V and the output projection, where the family has them (Qwen 2).
    pub biases: [Option<&'m [f32]>; 4],
    pub q_norm: Option<&'m [f32]>,
    pub k_norm: Option<&'m [f32]>,
    pub post_norm: Option<&'m [f32]>,
}

/// One layer's gated FFN: `down · (act(gate · x) ⊙ (up · x))` with `x` the residual through
/// `norm` (the residual itself without one: OLMo 2), and the result through `post_norm`
/// when the family has one (Gemma, OLMo 2).
#[derive(Clone, Copy, Debug)]
pub struct FfnWeights<'m, 'a> {
    pub norm: Option<&'m [f32]>,
    pub gate: WeightView<'a>,
    pub up: WeightView<'a>,
    pub down: WeightView<'a>,
    pub post_norm: Option<&'m [f32]>,
}

impl Loaded {
    /// The rotation of global layers for a sequence whose cache holds `capacity` tokens: the
    /// long LongRoPE factors when that is more than the context the factors were made for
    /// (llama.cpp chooses by its `n_ctx` the same way), the model's own otherwise.
    pub(crate) fn global_rope(&self, capacity: usize) -> &Rope {
        match &self.rope_long {
            Some(long) if capacity > self.config.rope_original_context => long,
            _ => &self.rope_global,
        }
    }
}

impl Model {
    /// Builds a model over `file`'s tensors, checking every shape against the configuration.
    /// The model keeps the file open (and mapped) for as long as it or a clone lives.
    pub fn load(file: Arc<GgufFile>) -> Result<Model, ModelError> {
        Model::load_packed(file, true)
    }

    /// The model over `file` with its forward pass on `backend` ([`Model::on_device`]), loaded
    /// for it: no repacked host copies are made, so the host keeps only norms, biases and the
    /// embedding rows it looks up.
    pub fn load_on_device<B: DeviceBackend>(
        file: Arc<GgufFile>,
        backend: B,
    ) -> Result<Model, ModelError> {
        Model::load_packed(file, false)?.on_device(backend)
    }

    /// [`Model::load`], with repacked copies where the CPU kernels read them (`pack`) or
    /// without any.
    fn load_packed(file: Arc<GgufFile>, pack: bool) -> Result<Model, ModelError> {
        // SAFETY: the views made from this reference are stored in `Loaded` beside `file`, an
        // `Arc` of the same `GgufFile`, which keeps it alive (and its bytes in place) for as
        // long as they exist; see `Loaded`.
        let bytes: &'static GgufFile = unsafe { &*Arc::as_ptr(&file) };
        let config = ModelConfig::from_gguf(bytes)?;
        let (d, q, kv, ff) = (
            config.d_model,
            config.q_dim(),
            config.kv_dim(),
            config.ff_dim,
        );
        let weights = Weights { file: bytes, pack };
        let token_embd = weights.matrix("token_embd.weight", config.vocab_size, d)?;
        // Tied embeddings: without an output matrix the embedding doubles as the head.
        let embed_from_head = bytes.tensor("output.weight").is_err();
        let output = match embed_from_head {
            false => weights.matrix("output.weight", config.vocab_size, d)?,
            true => token_embd,
        };
        let output = weights.prepared_head(output);
        let spec = config.spec;
        let layers = (0..config.n_layers)
            .map(|i| {
                let name = |s: &str| format!("blk.{i}.{s}.weight");
                let bias =
                    |s: &str, len| weights.optional_vector(&format!("blk.{i}.{s}.bias"), len);
                let linear =
                    |s: &str, view| -> Result<Linear<Matrix<'static>, Vec<f32>>, ModelError> {
                        Ok(Linear {
                            weight: weights.prepared(view),
                            bias: bias(s, view.rows())?,
                        })
                    };
                // A norm the family has must be in the file; one it lacks is not read.
                let norm = |present: bool, s: &str, len| match present {
                    true => weights.vector(&name(s), len).map(Some),
                    false => Ok(None),
                };
                let (wq, wk, wv) = if spec.fused_qkv {
                    let qkv = weights.matrix(&name("attn_qkv"), q + 2 * kv, d)?;
                    (
                        linear("attn_q", qkv.row_range(0..q))?,
                        linear("attn_k", qkv.row_range(q..q + kv))?,
                        linear("attn_v", qkv.row_range(q + kv..q + 2 * kv))?,
                    )
                } else {
                    (
                        linear("attn_q", weights.matrix(&name("attn_q"), q, d)?)?,
                        linear("attn_k", weights.matrix(&name("attn_k"), kv, d)?)?,
                        linear("attn_v", weights.matrix(&name("attn_v"), kv, d)?)?,
                    )
                };
                let ffn = match &config.experts {
                    Some(experts) if bytes.tensor(&name("ffn_gate_inp")).is_ok() => {
                        Ffn::Experts(weights.moe(i, experts, d)?)
                    }
                    _ if spec.fused_gate_up => {
                        let gate_up = weights.matrix(&name("ffn_up"), 2 * ff, d)?;
                        Ffn::Dense(GatedFfn {
                            gate: weights.prepared(gate_up.row_range(0..ff)),
                            up: weights.prepared(gate_up.row_range(ff..2 * ff)),
                            down: weights.prepared(weights.matrix(&name("ffn_down"), d, ff)?),
                        })
                    }
                    _ => Ffn::Dense(weights.gated(|p| format!("blk.{i}.ffn_{p}.weight"), ff, d)?),
                };
                let (q_norm_len, k_norm_len) = match spec.qk_norm {
                    QkNorm::PerHead => (config.head_dim, config.head_dim),
                    _ => (q, kv),
                };
                let qk_norm = spec.qk_norm != QkNorm::None;
                Ok(Layer {
                    attn_norm: norm(spec.pre_norms, "attn_norm", d)?,
                    wq,
                    wk,
                    wv,
                    wo: linear("attn_output", weights.matrix(&name("attn_output"), d, q)?)?,
                    q_norm: norm(qk_norm, "attn_q_norm", q_norm_len)?,
                    k_norm: norm(qk_norm, "attn_k_norm", k_norm_len)?,
                    post_attn_norm: norm(spec.post_norms, "post_attention_norm", d)?,
                    ffn_norm: norm(spec.pre_norms, "ffn_norm", d)?,
                    ffn,
                    post_ffn_norm: norm(spec.post_norms, "post_ffw_norm", d)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        // Per-frequency divisors of global layers, where the file has them (the families with
        // local layers have none): Llama 3's one set, or Phi-3's LongRoPE pair, the short
        // factors within the original context and the long ones beyond it.
        let half = config.rope_dims / 2;
        let rope_freqs = weights.optional_vector("rope_freqs.weight", half)?;
        let short = weights.optional_vector("rope_factors_short.weight", half)?;
        let long = weights.optional_vector("rope_factors_long.weight", half)?;
        if short.is_some() != long.is_some() {
            let missing = match short {
                None => "rope_factors_short.weight",
                Some(_) => "rope_factors_long.weight",
            };
            return Err(ModelError::Invalid {
                file: file.source().to_string(),
                item: missing.into(),
                problem: "is missing: LongRoPE needs both its short and its long factors".into(),
            });
        }
        let global = |factors: Option<&[f32]>| {
            match config.rope_yarn {
                Some((factor, original)) => Rope::yarn(
                    config.rope_style,
                    config.rope_dims,
                    config.rope_base,
                    factor,
                    original,
                ),
                None => Rope::with_factors(
                    config.rope_style,
                    config.rope_dims,
                    config.rope_base,
                    config.rope_scale,
                    factors,
                ),
            }
            .with_amplitude(config.rope_attn_factor)
        };
        let rope_global = global(rope_freqs.as_deref().or(short.as_deref()));
        let rope_long = long.as_deref().map(|f| global(Some(f)));
        let rope_local = Rope::new(
            config.rope_style,
            config.rope_dims,
            config.rope_base_local,
            1.0,
        );
        let loaded = Loaded {
            output_norm: weights.vector("output_norm.weight", d)?,
            config,
            token_embd,
            output,
            embed_from_head,
            layers,
            rope_global,
            rope_long,
            rope_local,
            file,
        };
        Ok(Model {
            weights: Arc::new(loaded),
            overlay: None,
            device: None,
        })
    }

    /// This model over the same weights with `overlay` (`None`: none) as the deltas of every
    /// sequence that does not name its own; a cheap clone. Fails when the overlay does not
    /// fit the model ([`Model::check_overlay`]).
    pub fn with_overlay(&self, overlay: Option<Arc<FfnOverlay>>) -> Result<Model, ModelError> {
        if let Some(o) = &overlay {
            self.check_overlay(o)?;
            self.refuse_on_device("edit overlays (LoRA adapters, patches)")?;
        }
        Ok(Model {
            weights: Arc::clone(&self.weights),
            overlay,
            device: self.device.clone(),
        })
    }

    /// This model with its forward pass on `backend`, every weight uploaded there once (and
    /// the file's pages of it let go as it is: they come back from the file if read again); a
    /// model with an overlay, or with experts, is refused by name.
    pub fn on_device<B: DeviceBackend>(&self, backend: B) -> Result<Model, ModelError> {
        if self.overlay.is_some() {
            return Err(ModelError::Device(format!(
                "{} does not run edit overlays (LoRA adapters, patches) yet",
                backend.describe()
            )));
        }
        let device = DeviceModel::upload(backend, &self.weights)?;
        Ok(Model {
            weights: Arc::clone(&self.weights),
            overlay: None,
            device: Some(Arc::new(device)),
        })
    }

    /// The device the forward pass runs on, described (`None`: the CPU).
    pub fn device(&self) -> Option<String> {
        self.device.as_ref().map(|d| d.describe())
    }

    /// A pool of `blocks` KV blocks of `block_size` positions on the model's device, for a
    /// paged cache whose sequences share them; `None` for a model on the CPU.
    pub fn device_kv_pool(
        &self,
        block_size: usize,
        blocks: usize,
    ) -> Result<Option<DeviceKvPool>, ModelError> {
        self.device
            .as_ref()
            .map(|d| Arc::clone(d).kv_pool(self.config(), block_size, blocks))
            .transpose()
    }

    /// An error naming `what` when the model runs on a device, which does not do it.
    fn refuse_on_device(&self, what: &str) -> Result<(), ModelError> {
        match &self.device {
            Some(d) => Err(not_on_device(&d.describe(), what)),
            None => Ok(()),
        }
    }

    /// The overlay sequences run under unless they name their own.
    pub fn overlay(&self) -> Option<&Arc<FfnOverlay>> {
        self.overlay.as_ref()
    }

    /// Checks that every delta of `overlay` belongs to a layer of this model and has the
    /// shape of its down projection (`d_model × ff_dim`, factors of the stated rank).
    pub fn check_overlay(&self, overlay: &FfnOverlay) -> Result<(), ModelError> {
        let cfg = self.config();
        for (layer, delta) in overlay.deltas() {
            let reason = if layer >= cfg.n_layers {
                format!("the model has only {} layers", cfg.n_layers)
            } else if cfg.experts.is_some() {
                "edits of mixture-of-experts models are not supported".to_string()
            } else if (delta.rows, delta.cols) != (cfg.d_model, cfg.ff_dim) {
                format!(
                    "the delta is {} × {} but the down projection is {} × {}",
                    delta.rows, delta.cols, cfg.d_model, cfg.ff_dim
                )
            } else if delta.rank == 0
                || delta.a.len() != delta.rank * delta.cols
                || delta.b.len() != delta.rows * delta.rank
            {
                format!(
                    "factors of {} and {} values do not make a rank-{} delta of {} × {}",
                    delta.a.len(),
                    delta.b.len(),
                    delta.rank,
                    delta.rows,
                    delta.cols
                )
            } else {
                continue;
            };
            return Err(ModelError::BadOverlay { layer, reason });
        }
        for layer in 0..cfg.n_layers {
            let Some(n) = overlay.neurons(layer) else {
                continue;
            };
            let k = n.index.len();
            if cfg.experts.is_some() {
                return Err(ModelError::BadOverlay {
                    layer,
                    reason: "edits of mixture-of-experts models are not supported".into(),
                });
            }
            if k == 0
                || n.gate.len() != k * cfg.d_model
                || n.up.len() != k * cfg.d_model
                || n.index.iter().any(|&j| j >= cfg.ff_dim)
            {
                return Err(ModelError::BadOverlay {
                    layer,
                    reason: format!(
                        "{k} replaced neurons need rows of {} values and indices below {}",
                        cfg.d_model, cfg.ff_dim
                    ),
                });
            }
        }
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    /// The file the model was loaded from (its metadata holds the tokenizer, for one).
    pub fn file(&self) -> &GgufFile {
        &self.weights.file
    }

    /// The token embedding matrix (`vocab_size × d_model`, before `embed_scale`).
    pub fn token_embeddings(&self) -> WeightView<'_> {
        self.weights.token_embd
    }

    /// The output head (`vocab_size × d_model`; the embedding matrix when tied).
    pub fn output_head(&self) -> WeightView<'_> {
        self.weights.output.view()
    }

    /// The gains of the final norm, applied before the output head.
    pub fn output_norm(&self) -> &[f32] {
        &self.weights.output_norm
    }

    /// The FFN weights of layer `layer` as stored (for tools that read the model as data;
    /// the overlay is not part of them). Panics if `layer >= n_layers` or if the layer is a
    /// mixture of experts (tools check [`ModelConfig::experts`] first).
    pub fn ffn_weights(&self, layer: usize) -> FfnWeights<'_, '_> {
        let l = &self.weights.layers[layer];
        let Ffn::Dense(ffn) = &l.ffn else {
            panic!("layer {layer} is a mixture of experts, not one FFN");
        };
        FfnWeights {
            norm: l.ffn_norm.as_deref(),
            gate: ffn.gate.view(),
            up: ffn.up.view(),
            down: ffn.down.view(),
            post_norm: l.post_ffn_norm.as_deref(),
        }
    }

    /// Layer `layer`'s FFN as features, dense or a mixture of experts (see [`crate::ffn`]).
    /// Panics if `layer >= n_layers`.
    pub fn ffn_features(&self, layer: usize) -> FfnFeatures<'_, '_> {
        let l = &self.weights.layers[layer];
        let block = |f: &GatedFfn<Matrix<'static>>| FeatureBlock {
            gate: f.gate.view(),
            up: f.up.view(),
            down: f.down.view(),
        };
        let (blocks, router) = match &l.ffn {
            Ffn::Dense(f) => (vec![block(f)], None),
            Ffn::Experts(m) => {
                let spec = self.config().experts.as_ref().expect("an expert layer");
                let blocks = m.experts.iter().chain(&m.shared).map(block).collect();
                (blocks, Some(m.router(spec)))
            }
        };
        FfnFeatures {
            norm: l.ffn_norm.as_deref(),
            post_norm: l.post_ffn_norm.as_deref(),
            blocks,
            router,
        }
    }

    /// The rotary embedding of global-attention layers (`true`, with LongRoPE the one of
    /// sequences within the original context) or sliding-window ones.
    pub fn rope(&self, global: bool) -> &Rope {
        match global {
            true => &self.weights.rope_global,
            false => &self.weights.rope_local,
        }
    }

    /// The attention weights of layer `layer`. Panics if `layer >= n_layers`.
    pub fn attention_weights(&self, layer: usize) -> AttentionWeights<'_, '_> {
        let l = &self.weights.layers[layer];
        AttentionWeights {
            norm: l.attn_norm.as_deref(),
            wq: l.wq.weight.view(),
            wk: l.wk.weight.view(),
            wv: l.wv.weight.view(),
            wo: l.wo.weight.view(),
            biases: [&l.wq, &l.wk, &l.wv, &l.wo].map(|w| w.bias.as_deref()),
            q_norm: l.q_norm.as_deref(),
            k_norm: l.k_norm.as_deref(),
            post_norm: l.post_attn_norm.as_deref(),
        }
    }

    /// Bytes of weight data one decode step reads: every layer matrix (of a mixture of
    /// experts, the share of the experts a token uses) and the output head (the embedding
    /// lookup reads a single row, and norm vectors are negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        let w = &self.weights;
        let bytes = |m: &Matrix<'_>| m.view().data().len();
        let gated = |f: &GatedFfn<Matrix<'_>>| bytes(&f.gate) + bytes(&f.up) + bytes(&f.down);
        let layers: usize = w
            .layers
            .iter()
            .map(|l| {
                let attention: usize = [&l.wq, &l.wk, &l.wv, &l.wo]
                    .iter()
                    .map(|w| bytes(&w.weight))
                    .sum();
                let ffn = match &l.ffn {
                    Ffn::Dense(f) => gated(f),
                    Ffn::Experts(m) => {
                        let experts: usize = m.experts.iter().map(gated).sum();
                        experts * self.config().experts.as_ref().map_or(1, |e| e.used)
                            / m.experts.len()
                            + m.shared.as_ref().map_or(0, gated)
                    }
                };
                attention + ffn
            })
            .sum();
        layers + w.output.view().data().len()
    }

    /// A contiguous KV cache for up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> ContiguousKvCache {
        let cfg = self.config();
        ContiguousKvCache::new(cfg.n_layers, cfg.kv_dim(), capacity)
    }

    /// Runs `tokens` (placed after what `cache` holds) through the model, under its overlay,
    /// and returns the logits of the tokens whose indices within `tokens` lie in `rows`,
    /// `vocab_size` floats each.
    pub fn forward<C: KvCache + Sync>(
        &self,
        tokens: &[u32],
        cache: &mut C,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let hidden = self.forward_hidden(tokens, cache, rows)?;
        self.logits(&hidden)
    }

    /// Like [`Model::forward`] but stops before the output head: the final-normed hidden states
    /// of the selected rows (`d_model` floats each). [`Model::logits`] finishes the job, which
    /// lets callers project a long batch a few rows at a time.
    pub fn forward_hidden<C: KvCache + Sync>(
        &self,
        tokens: &[u32],
        cache: &mut C,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        self.run_one(tokens, cache, rows, &mut NoObserver)
    }

    /// [`Model::forward_hidden`] that also shows `observer` the inside of every layer.
    pub fn forward_observed<C: KvCache + Sync>(
        &self,
        tokens: &[u32],
        cache: &mut C,
        rows: Range<usize>,
        observer: &mut dyn ForwardObserver,
    ) -> Result<Vec<f32>, ModelError> {
        self.refuse_on_device("observed forward passes (TRACE, extraction, editing)")?;
        self.run_one(tokens, cache, rows, observer)
    }

    /// [`Model::run`] of one sequence under the model's overlay.
    fn run_one<C: KvCache + Sync>(
        &self,
        tokens: &[u32],
        cache: &mut C,
        rows: Range<usize>,
        observer: &mut dyn ForwardObserver,
    ) -> Result<Vec<f32>, ModelError> {
        let seq = SequenceBatch {
            tokens,
            cache,
            rows,
            overlay: None,
        };
        self.run(&mut [seq], observer)
    }

    /// Runs the tokens of several sequences, each after what its own cache holds and under
    /// its own overlay (or the model's), as one batch; returns the logits of every
    /// sequence's selected rows, in order.
    ///
    /// Sequences at the front of the batch with a single token are decode steps: their
    /// products, like every selected row's output head, use 8-bit activations; every later
    /// sequence's rows are multiplied apart from the others (8-bit on a repacked matrix, `f32`
    /// otherwise: see `matmul_quantized`). So each sequence's logits are exactly those it
    /// would get from [`Model::forward`] alone with the same tokens.
    pub fn forward_batch<C: KvCache + Sync>(
        &self,
        batch: &mut [SequenceBatch<'_, '_, C>],
    ) -> Result<Vec<f32>, ModelError> {
        let hidden = self.run(batch, &mut NoObserver)?;
        let rows = hidden.len() / self.config().d_model;
        self.project(&hidden, rows)
    }

    fn run<C: KvCache + Sync>(
        &self,
        batch: &mut [SequenceBatch<'_, '_, C>],
        observer: &mut dyn ForwardObserver,
    ) -> Result<Vec<f32>, ModelError> {
        let mut inputs = Vec::with_capacity(batch.len());
        for seq in batch.iter() {
            let (len, start, capacity) = (seq.tokens.len(), seq.cache.len(), seq.cache.capacity());
            if start + len > capacity {
                return Err(ModelError::ContextOverflow {
                    needed: start + len,
                    capacity,
                });
            }
            assert!(len > 0, "a sequence of the batch has no tokens");
            assert!(
                seq.rows.start <= seq.rows.end && seq.rows.end <= len,
                "rows {:?} outside a batch of {len}",
                seq.rows
            );
            inputs.push(SequenceInput {
                tokens: seq.tokens,
                start,
                capacity,
                rows: seq.rows.clone(),
            });
        }
        let hidden = match &self.device {
            Some(device) => self.run_on_device(device.as_ref(), batch, &inputs)?,
            None => self.run_on_cpu(batch, &inputs, observer)?,
        };
        for seq in batch.iter_mut() {
            seq.cache.advance(seq.tokens.len());
        }
        Ok(hidden)
    }

    /// [`Model::run`]'s forward pass on the CPU, each sequence under its overlay (or the
    /// model's).
    fn run_on_cpu<C: KvCache + Sync>(
        &self,
        batch: &mut [SequenceBatch<'_, '_, C>],
        inputs: &[SequenceInput<'_>],
        observer: &mut dyn ForwardObserver,
    ) -> Result<Vec<f32>, ModelError> {
        let w = &*self.weights;
        // Runs of consecutive sequences under the same overlay: each gets one product per
        // edited layer.
        let mut overlays: Vec<(Range<usize>, &FfnOverlay)> = Vec::new();
        let mut n = 0;
        for seq in batch.iter() {
            let len = seq.tokens.len();
            if let Some(overlay) = seq.overlay.or(self.overlay.as_deref()) {
                match overlays.last_mut() {
                    Some((rows, last)) if rows.end == n && last.version() == overlay.version() => {
                        rows.end += len
                    }
                    _ => {
                        self.check_overlay(overlay)?;
                        overlays.push((n..n + len, overlay));
                    }
                }
            }
            n += len;
        }
        let mut caches: Vec<&mut C> = batch.iter_mut().map(|seq| &mut *seq.cache).collect();
        let program = Program {
            backend: &Cpu::<C>::new(),
            model: w,
            layers: &w.layers,
            output_norm: &w.output_norm,
        };
        program.forward(inputs, &mut caches, &overlays, observer)
    }

    /// [`Model::run`]'s forward pass on the model's device, where each sequence's cache says
    /// its keys and values are ([`KvCache::device_kv`]).
    fn run_on_device<C: KvCache + Sync>(
        &self,
        device: &dyn DeviceForward,
        batch: &mut [SequenceBatch<'_, '_, C>],
        inputs: &[SequenceInput<'_>],
    ) -> Result<Vec<f32>, ModelError> {
        let mut kv = Vec::with_capacity(batch.len());
        for seq in batch.iter_mut() {
            if seq.overlay.is_some() {
                self.refuse_on_device("edit overlays (LoRA adapters, patches)")?;
            }
            let Some(seq_kv) = seq.cache.device_kv() else {
                return Err(ModelError::Device(format!(
                    "{} needs a KV cache with room for device buffers",
                    device.describe()
                )));
            };
            kv.push(seq_kv);
        }
        device.forward(&self.weights, inputs, kv)
    }

    /// Projects final hidden states (from [`Model::forward_hidden`]) onto the vocabulary.
    pub fn logits(&self, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        let n = hidden.len() / self.config().d_model;
        self.project(hidden, usize::from(n == 1))
    }

    /// [`Model::logits`] with the first `decode_rows` rows projected as decode steps are
    /// (on the CPU; a device projects every row alike).
    fn project(&self, hidden: &[f32], decode_rows: usize) -> Result<Vec<f32>, ModelError> {
        match &self.device {
            Some(device) => device.logits(self.config(), hidden),
            None => Ok(self.weights.project(hidden, decode_rows)),
        }
    }
}

impl Loaded {
    /// The scaled embeddings of `tokens`, `d_model` floats each.
    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let cfg = &self.config;
        let d = cfg.d_model;
        let mut x = vec![0.0f32; tokens.len() * d];
        for (row, &id) in x.chunks_exact_mut(d).zip(tokens) {
            if id as usize >= cfg.vocab_size {
                return Err(ModelError::TokenOutOfRange {
                    id,
                    vocab: cfg.vocab_size,
                });
            }
            match self.embed_from_head {
                true => self.output.dequantize_row(id as usize, row),
                false => self.token_embd.dequantize_row(id as usize, row),
            }
            if cfg.embed_scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= cfg.embed_scale);
            }
        }
        Ok(x)
    }

    /// [`Model::logits`] with the first `decode_rows` rows projected as decode steps are.
    fn project(&self, hidden: &[f32], decode_rows: usize) -> Vec<f32> {
        let n = hidden.len() / self.config.d_model;
        let mut logits = vec![0.0f32; n * self.config.vocab_size];
        let xq = QuantizedActivations::new(hidden, n, self.config.d_model)
            .with_integer_tokens(decode_rows);
        matmul_quantized(&self.output, &xq, &mut logits);
        if let Some(cap) = self.config.final_softcap {
            softcap(&mut logits, cap);
        }
        logits
    }
}

/// Looks tensors up by name and checks them against the shapes the configuration implies.
struct Weights<'a> {
    file: &'a GgufFile,
    /// Whether matrices get the CPU kernels' repacked copies.
    pack: bool,
}

impl<'a> Weights<'a> {
    fn tensor(&self, name: &str, expected: &[u64]) -> Result<TensorView<'a>, ModelError> {
        let view = self.file.tensor(name)?;
        // ggml's shapes have implicit trailing 1s: llama-quantize writes as [64] the vector
        // that llama.cpp's converter wrote as [64, 1].
        let significant =
            |dims: &[u64]| dims.len() - dims.iter().rev().take_while(|&&d| d == 1).count();
        let (found, wanted) = (&view.info.dims, expected);
        if found[..significant(found)] != wanted[..significant(wanted)] {
            return Err(ModelError::WrongShape {
                file: self.file.source().to_string(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: view.info.dims.clone(),
            });
        }
        Ok(view)
    }

    /// A `rows × cols` matrix (GGUF dims `[cols, rows]`).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<WeightView<'a>, ModelError> {
        let view = self.tensor(name, &[cols as u64, rows as u64])?;
        WeightView::new(view.info.dtype, rows, cols, view.data)
            .map_err(|source| self.kernel(name, source))
    }

    /// `view` ready for products; when the kernels keep a packed copy, the file's pages of
    /// it are released as it is packed, since nothing reads them again (prompts read the
    /// copy too).
    fn prepared(&self, view: WeightView<'a>) -> Matrix<'a> {
        match self.pack {
            true => Matrix::releasing(view, false, &|bytes| self.file.release(bytes)),
            false => Matrix::unpacked(view),
        }
    }

    /// [`Weights::prepared`] for the output head, which products read a row at a time
    /// ([`Matrix::for_single_rows`]).
    fn prepared_head(&self, view: WeightView<'a>) -> Matrix<'a> {
        match self.pack {
            true => Matrix::releasing(view, true, &|bytes| self.file.release(bytes)),
            false => Matrix::unpacked(view),
        }
    }

    /// A vector of `len` values, dequantized to `f32`.
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let view = self.tensor(name, &[len as u64])?;
        let mut out = vec![0.0f32; len];
        quarry_kernels::dequantize(view.info.dtype, view.data, &mut out)
            .map_err(|source| self.kernel(name, source))?;
        Ok(out)
    }

    /// A gated FFN whose tensors are `name("gate")`, `name("up")` and `name("down")`.
    fn gated(
        &self,
        name: impl Fn(&str) -> String,
        ff: usize,
        d: usize,
    ) -> Result<GatedFfn<Matrix<'a>>, ModelError> {
        Ok(GatedFfn {
            gate: self.prepared(self.matrix(&name("gate"), ff, d)?),
            up: self.prepared(self.matrix(&name("up"), ff, d)?),
            down: self.prepared(self.matrix(&name("down"), d, ff)?),
        })
    }

    /// Layer `i`'s mixture of experts: the router, the experts (3-D tensors, one expert's
    /// matrix after another), and the shared expert with its gate where the file has them.
    fn moe(&self, i: usize, experts: &Experts, d: usize) -> Result<MoeFfn<Matrix<'a>>, ModelError> {
        let (count, ff) = (experts.count, experts.ff_dim);
        let name = |s: &str| format!("blk.{i}.{s}.weight");
        let stacked = |s: &str, rows: usize, cols: usize| -> Result<WeightView<'a>, ModelError> {
            let n = name(s);
            let view = self.tensor(&n, &[cols as u64, rows as u64, count as u64])?;
            WeightView::new(view.info.dtype, count * rows, cols, view.data)
                .map_err(|source| self.kernel(&n, source))
        };
        let (gate, up, down) = (
            stacked("ffn_gate_exps", ff, d)?,
            stacked("ffn_up_exps", ff, d)?,
            stacked("ffn_down_exps", d, ff)?,
        );
        let each = (0..count)
            .map(|e| GatedFfn {
                gate: self.prepared(gate.row_range(e * ff..(e + 1) * ff)),
                up: self.prepared(up.row_range(e * ff..(e + 1) * ff)),
                down: self.prepared(down.row_range(e * d..(e + 1) * d)),
            })
            .collect();
        let shared = match self.file.tensor(&name("ffn_up_shexp")) {
            Ok(_) => Some(self.gated(
                |p| format!("blk.{i}.ffn_{p}_shexp.weight"),
                experts.shared_ff_dim,
                d,
            )?),
            Err(_) => None,
        };
        Ok(MoeFfn {
            router: self.dense(&name("ffn_gate_inp"), count, d)?,
            experts: each,
            shared,
            shared_gate: match self.file.tensor(&name("ffn_gate_inp_shexp")) {
                Ok(_) => Some(self.dense(&name("ffn_gate_inp_shexp"), 1, d)?),
                Err(_) => None,
            },
        })
    }

    /// A `rows × cols` matrix decoded to `f32`.
    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>, ModelError> {
        let view = self.matrix(name, rows, cols)?;
        let mut out = vec![0.0f32; rows * cols];
        quarry_kernels::dequantize(view.dtype(), view.data(), &mut out)
            .map_err(|source| self.kernel(name, source))?;
        Ok(out)
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        if self.file.tensor(name).is_err() {
            return Ok(None);
        }
        self.vector(name, len).map(Some)
    }

    fn kernel(&self, name: &str, source: quarry_kernels::KernelError) -> ModelError {
        ModelError::Kernel {
            file: self.file.source().to_string(),
            tensor: name.to_string(),
            source,
        }
    }
}
