//! The backend seam: the operations one forward pass is made of, over buffers a backend owns
//! ([`Backend`]), and the one program that strings them together for every family
//! ([`DeviceModel`]).
//!
//! Why operations and not tensors: a GPU keeps the weights, the KV cache and every activation
//! in its own memory and hands back only hidden states or logits, so the seam has to be where
//! work is recorded, not where values are read. Which norm runs where, biases, QK-norm, which
//! rotation a layer uses, sliding windows, soft-caps and post-norms belong to the family (the
//! [`ModelConfig`]), not to the device, so the program is written once, here, and a backend
//! only supplies the operations.
//!
//! The CPU forward pass ([`Model::forward_batch`](crate::Model::forward_batch)) does not run
//! through this seam yet: beyond these operations it multiplies several sequences in one
//! product, reads edit overlays, shows observers the inside of a layer, routes experts and
//! picks 8-bit or `f32` products row by row. A model on a device refuses overlays, observers
//! and experts by name instead of running them somewhere else.

use std::ops::Range;

use quarry_kernels::{Matrix, WeightView};

use crate::attention::AttentionSpec;
use crate::config::{Activation, ModelConfig};
use crate::kv_cache::DeviceSlot;
use crate::model::{Ffn, Layer, Linear, Loaded};
use crate::ops::RopeTable;
use crate::ModelError;

/// A device that runs a forward pass's operations. Operations are recorded in order and may
/// run later; only [`Backend::read`] waits for them. Every operation reads and writes buffers
/// of this backend; shapes are checked by the program, which only passes buffers of the sizes
/// stated.
pub trait Backend: Send + Sync + 'static {
    /// Activations: `rows × cols` `f32`, row major.
    type Tensor;
    /// A weight matrix, in the blocks the file stores it in.
    type Matrix: Send + Sync;
    /// A vector of `f32` (norm gains, biases).
    type Vector: Send + Sync;
    /// One sequence's keys and values for every layer, up to a capacity of positions.
    type Kv: Send + Sync + 'static;
    /// A rotary table on the device ([`Backend::rotation`]), made once per forward pass and
    /// read by every layer that uses it.
    type Rotation;

    /// What the backend runs on, for messages (`"gpu: NVIDIA H200 (vulkan)"`).
    fn describe(&self) -> String;
    /// Uploads a weight matrix (`name` is for messages).
    fn matrix(&self, name: &str, view: WeightView<'_>) -> Result<Self::Matrix, ModelError>;
    fn vector(&self, name: &str, values: &[f32]) -> Result<Self::Vector, ModelError>;
    /// Room for `capacity` positions of `layers` layers, `kv_dim` keys and values each.
    fn kv(&self, layers: usize, kv_dim: usize, capacity: usize) -> Result<Self::Kv, ModelError>;
    /// A tensor of `rows × cols` holding `values` (or zeros when `values` is empty).
    fn tensor(&self, rows: usize, cols: usize, values: &[f32]) -> Result<Self::Tensor, ModelError>;

    /// `out ← x`.
    fn copy(&self, x: &Self::Tensor, out: &mut Self::Tensor) -> Result<(), ModelError>;
    /// RMS normalisation of every `gain.len()`-wide run of `x` (a row, or a head), in place.
    fn rms_norm(
        &self,
        x: &mut Self::Tensor,
        gain: &Self::Vector,
        eps: f32,
    ) -> Result<(), ModelError>;
    /// `out ← x · wᵀ`: `x` is `rows × w.cols`, `out` `rows × w.rows`.
    fn matmul(
        &self,
        w: &Self::Matrix,
        x: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<(), ModelError>;
    /// Adds `bias` to every row of `x`.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Vector) -> Result<(), ModelError>;
    /// `table` on the device.
    fn rotation(&self, table: &RopeTable<'_>) -> Result<Self::Rotation, ModelError>;
    /// Rotates every `head_dim`-wide head of row `t` of `x` by the table's position `t`.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        rotation: &Self::Rotation,
        head_dim: usize,
    ) -> Result<(), ModelError>;
    /// Stores the keys and values of `k.rows` positions from `start` for `layer`.
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        start: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<(), ModelError>;
    /// Causal attention of the queries `q` (row `t` at position `start + t`) over `layer`'s
    /// stored keys and values up to each row's own position; `out` like `q`.
    fn attend(
        &self,
        spec: &AttentionSpec,
        kv: &Self::Kv,
        layer: usize,
        start: usize,
        q: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<(), ModelError>;
    /// `gate ← act(gate) ⊙ up`.
    fn gated_activation(
        &self,
        gate: &mut Self::Tensor,
        up: &Self::Tensor,
        act: Activation,
    ) -> Result<(), ModelError>;
    /// `x ← cap · tanh(x / cap)`.
    fn softcap(&self, x: &mut Self::Tensor, cap: f32) -> Result<(), ModelError>;
    /// `x ← x + y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), ModelError>;
    /// Runs what was recorded and returns rows `rows` of `x`.
    fn read(&self, x: &Self::Tensor, rows: Range<usize>) -> Result<Vec<f32>, ModelError>;
}

/// Rows of logits one device product computes.
const LOGIT_ROWS: usize = 32;

/// A projection on the device, its bias where the file has one.
struct DeviceLinear<B: Backend> {
    weight: B::Matrix,
    bias: Option<B::Vector>,
}

/// One layer's weights on the device; the norms the family has.
struct DeviceLayer<B: Backend> {
    attn_norm: Option<B::Vector>,
    wq: DeviceLinear<B>,
    wk: DeviceLinear<B>,
    wv: DeviceLinear<B>,
    wo: DeviceLinear<B>,
    q_norm: Option<B::Vector>,
    k_norm: Option<B::Vector>,
    post_attn_norm: Option<B::Vector>,
    ffn_norm: Option<B::Vector>,
    gate: B::Matrix,
    up: B::Matrix,
    down: B::Matrix,
    post_ffn_norm: Option<B::Vector>,
}

/// A model's weights uploaded to a backend, and the forward pass over its operations.
pub(crate) struct DeviceModel<B: Backend> {
    backend: B,
    layers: Vec<DeviceLayer<B>>,
    output: B::Matrix,
    output_norm: B::Vector,
}

impl<B: Backend> DeviceModel<B> {
    /// Uploads every weight of `w` (matrices as the file stores them, never an `f32` copy),
    /// letting the file's pages of each go once it is uploaded.
    pub(crate) fn upload(backend: B, w: &Loaded) -> Result<Self, ModelError> {
        let b = &backend;
        let matrix = |name: &str, m: &Matrix<'_>| {
            let uploaded = b.matrix(name, m.view())?;
            w.file.release(m.view().data());
            Ok::<_, ModelError>(uploaded)
        };
        let vector =
            |name: String, v: &Option<Vec<f32>>| v.as_ref().map(|v| b.vector(&name, v)).transpose();
        let linear = |name: String, l: &Linear<'_>| -> Result<DeviceLinear<B>, ModelError> {
            Ok(DeviceLinear {
                weight: matrix(&name, &l.weight)?,
                bias: vector(format!("{name} bias"), &l.bias)?,
            })
        };
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer): (usize, &Layer<'_>)| {
                let name = |s: &str| format!("blk.{i}.{s}");
                let Ffn::Dense(ffn) = &layer.ffn else {
                    return Err(ModelError::Device(format!(
                        "layer {i} is a mixture of experts, which the {} backend does not run \
                         yet (run it with --device cpu)",
                        b.describe()
                    )));
                };
                Ok(DeviceLayer {
                    attn_norm: vector(name("attn_norm"), &layer.attn_norm)?,
                    wq: linear(name("attn_q"), &layer.wq)?,
                    wk: linear(name("attn_k"), &layer.wk)?,
                    wv: linear(name("attn_v"), &layer.wv)?,
                    wo: linear(name("attn_output"), &layer.wo)?,
                    q_norm: vector(name("attn_q_norm"), &layer.q_norm)?,
                    k_norm: vector(name("attn_k_norm"), &layer.k_norm)?,
                    post_attn_norm: vector(name("post_attention_norm"), &layer.post_attn_norm)?,
                    ffn_norm: vector(name("ffn_norm"), &layer.ffn_norm)?,
                    gate: matrix(&name("ffn_gate"), &ffn.gate)?,
                    up: matrix(&name("ffn_up"), &ffn.up)?,
                    down: matrix(&name("ffn_down"), &ffn.down)?,
                    post_ffn_norm: vector(name("post_ffw_norm"), &layer.post_ffn_norm)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(DeviceModel {
            output: matrix("output", &w.output)?,
            output_norm: b.vector("output_norm", &w.output_norm)?,
            layers,
            backend,
        })
    }

    fn project(
        &self,
        l: &DeviceLinear<B>,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<(), ModelError> {
        self.backend.matmul(&l.weight, x, out)?;
        match &l.bias {
            Some(bias) => self.backend.add_bias(out, bias),
            None => Ok(()),
        }
    }

    /// `x ← norm(x)` where the family has the norm.
    fn norm(
        &self,
        x: &mut B::Tensor,
        gain: &Option<B::Vector>,
        eps: f32,
    ) -> Result<(), ModelError> {
        match gain {
            Some(g) => self.backend.rms_norm(x, g, eps),
            None => Ok(()),
        }
    }

    /// The forward pass of `tokens` placed at `start` of a sequence whose keys and values are
    /// in `kv` (sized for `capacity` positions): the final-normed hidden states of `rows`.
    fn forward(
        &self,
        w: &Loaded,
        tokens: &[u32],
        kv: &mut B::Kv,
        start: usize,
        capacity: usize,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let (b, cfg) = (&self.backend, &w.config);
        let (n, d, eps) = (tokens.len(), cfg.d_model, cfg.norm_eps);
        let (q_dim, kv_dim, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let mut x = b.tensor(n, d, &w.embed(tokens)?)?;
        let mut h = b.tensor(n, d, &[])?;
        let mut q = b.tensor(n, q_dim, &[])?;
        let mut k = b.tensor(n, kv_dim, &[])?;
        let mut v = b.tensor(n, kv_dim, &[])?;
        let mut attn = b.tensor(n, q_dim, &[])?;
        let mut gate = b.tensor(n, cfg.ff_dim, &[])?;
        let mut up = b.tensor(n, cfg.ff_dim, &[])?;
        let rope_global = b.rotation(&w.global_rope(capacity).table(start, n))?;
        let rope_local = b.rotation(&w.rope_local.table(start, n))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let global = cfg.global_layers[i];
            b.copy(&x, &mut h)?;
            self.norm(&mut h, &layer.attn_norm, eps)?;
            self.project(&layer.wq, &h, &mut q)?;
            self.project(&layer.wk, &h, &mut k)?;
            self.project(&layer.wv, &h, &mut v)?;
            self.norm(&mut q, &layer.q_norm, eps)?;
            self.norm(&mut k, &layer.k_norm, eps)?;
            let rope = if global { &rope_global } else { &rope_local };
            b.rope(&mut q, rope, hd)?;
            b.rope(&mut k, rope, hd)?;
            b.kv_write(kv, i, start, &k, &v)?;
            let spec = attention_spec(cfg, global);
            b.attend(&spec, kv, i, start, &q, &mut attn)?;
            self.project(&layer.wo, &attn, &mut h)?;
            self.norm(&mut h, &layer.post_attn_norm, eps)?;
            b.add(&mut x, &h)?;

            b.copy(&x, &mut h)?;
            self.norm(&mut h, &layer.ffn_norm, eps)?;
            b.matmul(&layer.gate, &h, &mut gate)?;
            b.matmul(&layer.up, &h, &mut up)?;
            b.gated_activation(&mut gate, &up, cfg.activation)?;
            b.matmul(&layer.down, &gate, &mut h)?;
            self.norm(&mut h, &layer.post_ffn_norm, eps)?;
            b.add(&mut x, &h)?;
        }
        b.rms_norm(&mut x, &self.output_norm, eps)?;
        b.read(&x, rows)
    }

    /// The output head (and final soft-cap) over final-normed hidden states.
    fn logits(&self, cfg: &ModelConfig, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        let b = &self.backend;
        let n = hidden.len() / cfg.d_model;
        if n == 0 {
            return Ok(Vec::new());
        }
        // A few rows at a time: a large vocabulary's logits of a long batch would not fit one
        // device buffer.
        let mut logits = Vec::with_capacity(n * cfg.vocab_size);
        for rows in hidden.chunks(LOGIT_ROWS * cfg.d_model) {
            let m = rows.len() / cfg.d_model;
            let x = b.tensor(m, cfg.d_model, rows)?;
            let mut y = b.tensor(m, cfg.vocab_size, &[])?;
            b.matmul(&self.output, &x, &mut y)?;
            if let Some(cap) = cfg.final_softcap {
                b.softcap(&mut y, cap)?;
            }
            logits.extend(b.read(&y, 0..m)?);
        }
        Ok(logits)
    }
}

/// Layer attention as the family defines it: global or sliding window.
pub(crate) fn attention_spec(cfg: &ModelConfig, global: bool) -> AttentionSpec {
    AttentionSpec {
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
        scale: cfg.attn_scale,
        softcap: cfg.attn_softcap,
        window: if global { None } else { cfg.sliding_window },
    }
}

/// Where a batch of one sequence goes: its first position, the cache's capacity (which picks
/// LongRoPE's factors) and how many positions the device keeps for it.
pub(crate) struct DevicePosition {
    pub start: usize,
    pub capacity: usize,
    pub positions: usize,
}

/// A [`DeviceModel`] behind a type-erased face, so [`crate::Model`] holds one whatever its
/// backend.
pub(crate) trait DeviceForward: Send + Sync {
    fn describe(&self) -> String;
    /// [`DeviceModel::forward`] with the sequence's keys and values in `slot`, created there
    /// on first use; the `at.start` positions before the batch must already be in it.
    fn forward(
        &self,
        w: &Loaded,
        tokens: &[u32],
        slot: &mut DeviceSlot,
        at: DevicePosition,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, ModelError>;
    fn logits(&self, cfg: &ModelConfig, hidden: &[f32]) -> Result<Vec<f32>, ModelError>;
}

/// What a device backend keeps in a cache's [`DeviceSlot`]: its keys and values and how many
/// positions they hold.
struct SlotKv<K> {
    kv: K,
    positions: usize,
}

impl<B: Backend> DeviceForward for DeviceModel<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn forward(
        &self,
        w: &Loaded,
        tokens: &[u32],
        slot: &mut DeviceSlot,
        at: DevicePosition,
        rows: Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let DevicePosition {
            start,
            capacity,
            positions,
        } = at;
        if start + tokens.len() > positions {
            return Err(ModelError::ContextOverflow {
                needed: start + tokens.len(),
                capacity: positions,
            });
        }
        let held = slot
            .0
            .as_mut()
            .and_then(|k| k.downcast_mut::<SlotKv<B::Kv>>())
            .filter(|k| k.positions == positions);
        let kv = match held {
            Some(held) => &mut held.kv,
            None if start > 0 => {
                return Err(ModelError::Device(format!(
                    "the KV cache holds {start} positions that are not on the {} device (a \
                     cache filled on the CPU, or cloned)",
                    self.backend.describe()
                )))
            }
            None => {
                let cfg = &w.config;
                let kv = self.backend.kv(cfg.n_layers, cfg.kv_dim(), positions)?;
                let boxed = slot.0.insert(Box::new(SlotKv { kv, positions }));
                &mut boxed
                    .downcast_mut::<SlotKv<B::Kv>>()
                    .expect("just stored")
                    .kv
            }
        };
        DeviceModel::forward(self, w, tokens, kv, start, capacity, rows)
    }

    fn logits(&self, cfg: &ModelConfig, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        DeviceModel::logits(self, cfg, hidden)
    }
}
