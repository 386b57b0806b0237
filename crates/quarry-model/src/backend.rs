//! The backend seam: the operations one forward pass is made of, over buffers a backend owns
//! ([`Backend`]); the uploads that put a model on a device ([`DeviceBackend`]), and the model
//! on one ([`DeviceModel`]).
//!
//! Why operations and not tensors: a GPU keeps the weights, the KV cache and every activation
//! in its own memory and hands back only hidden states or logits, so the seam has to be where
//! work is recorded, not where values are read. Which norm runs where, biases, QK-norm, which
//! rotation a layer uses, sliding windows, soft-caps and post-norms belong to the family (the
//! [`ModelConfig`]), not to the device, so the program is written once
//! ([`crate::forward`]) and a backend only supplies the operations. The CPU is one such
//! backend ([`crate::cpu::Cpu`]); its policies (8-bit decode rows, repacked panels, one pool
//! dispatch for several products) stay inside its operations.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use quarry_kernels::{Matrix, WeightView};

use crate::attention::AttentionSpec;
use crate::config::{Activation, ModelConfig};
use crate::cpu::CpuLayer;
use crate::forward::{
    Ffn, GatedFfn, Layer, Layers, Linear, MoeFfn, Program, RowPlan, SequenceInput, SequenceRows,
};
use crate::kv_cache::DeviceKv;
use crate::model::{Loaded, NoObserver};
use crate::ops::RopeTable;
use crate::ModelError;

/// What runs a forward pass's operations. Operations may be recorded and run later; only
/// [`Backend::read`] (and [`Backend::host`]) must see them done. Every operation reads and
/// writes buffers of this backend; shapes are checked by the program, which only passes
/// buffers of the sizes stated.
pub trait Backend {
    /// Activations: `rows × cols` `f32`, row major, multiplied as their [`RowPlan`] says.
    type Tensor;
    /// A weight matrix, in the blocks the file stores it in (or a layout of the backend's).
    type Matrix;
    /// A vector of `f32` (norm gains, biases).
    type Vector;
    /// One sequence's keys and values for every layer.
    type Kv;
    /// The rotary tables of a batch's sequences ([`Backend::rotation`]), made once per
    /// forward pass and read by every layer that uses them.
    type Rotation<'r>;

    /// What the backend runs on, for messages (`"gpu: NVIDIA H200 (vulkan)"`).
    fn describe(&self) -> String;
    /// A tensor of `plan.rows × cols` holding `values` (or zeros when `values` is empty).
    fn tensor(
        &self,
        plan: &RowPlan,
        cols: usize,
        values: &[f32],
    ) -> Result<Self::Tensor, ModelError>;

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
    ) -> Result<(), ModelError> {
        self.matmul_many(&mut [(w, out)], x)
    }
    /// Several products of the same `x` ([`Backend::matmul`] for each).
    fn matmul_many(
        &self,
        products: &mut [(&Self::Matrix, &mut Self::Tensor)],
        x: &Self::Tensor,
    ) -> Result<(), ModelError>;
    /// Adds `bias` to every row of `x`.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Vector) -> Result<(), ModelError>;
    /// The rotations of a batch: `tables[s]` for the rows of its sequence `s`, in order.
    fn rotation<'r>(&self, tables: Vec<RopeTable<'r>>) -> Result<Self::Rotation<'r>, ModelError>;
    /// Rotates every `head_dim`-wide head of each row of `q` and of `k` by its position.
    fn rope(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        rotation: &Self::Rotation<'_>,
        head_dim: usize,
    ) -> Result<(), ModelError>;
    /// Stores the keys and values of each sequence's rows (`spans[s]`, into `kv[s]` from its
    /// position `start`) for `layer`.
    fn kv_write(
        &self,
        kv: &mut [&mut Self::Kv],
        spans: &[SequenceRows],
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
    ) -> Result<(), ModelError>;
    /// Causal attention of each sequence's queries (`spans[s]`, row `t` at position
    /// `start + t`) over `layer`'s keys and values in `kv[s]` up to each row's own position;
    /// `out` like `q`.
    fn attend(
        &self,
        spec: &AttentionSpec,
        kv: &[&mut Self::Kv],
        spans: &[SequenceRows],
        layer: usize,
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
    /// `x`'s values where they live on the host, for what reads and writes activations
    /// there (observers, overlays); `None` on a device.
    fn host<'t>(&self, _x: &'t Self::Tensor) -> Option<&'t [f32]> {
        None
    }
    /// [`Backend::host`], writable.
    fn host_mut<'t>(&self, _x: &'t mut Self::Tensor) -> Option<&'t mut [f32]> {
        None
    }
}

/// A backend that holds a model of its own: weights uploaded once, and keys and values in
/// pools of blocks ([`DeviceBackend::kv_pool`]): an engine's pool shared by its sequences,
/// or a cache's own pool of one block.
pub trait DeviceBackend:
    Backend<Matrix: Send + Sync, Vector: Send + Sync> + Send + Sync + 'static
{
    /// Keys and values of `blocks` blocks of positions.
    type KvPool: Send + Sync + 'static;
    /// Uploads a weight matrix (`name` is for messages).
    fn matrix(&self, name: &str, view: WeightView<'_>) -> Result<Self::Matrix, ModelError>;
    fn vector(&self, name: &str, values: &[f32]) -> Result<Self::Vector, ModelError>;
    /// Room for `blocks` blocks of `block_size` positions of `layers` layers, `kv_dim` keys
    /// and values each.
    fn kv_pool(
        &self,
        layers: usize,
        kv_dim: usize,
        block_size: usize,
        blocks: usize,
    ) -> Result<Self::KvPool, ModelError>;
    /// One sequence's keys and values: `blocks` of `pool`, in order (`blocks[i]` holds its
    /// positions `i · block_size ..`); an error for a block outside the pool.
    fn kv_view(&self, pool: &Self::KvPool, blocks: &[usize]) -> Result<Self::Kv, ModelError>;
    /// Copies the first `positions` positions of block `from` into block `to`, every layer
    /// (an error for a block outside the pool, or more positions than a block holds).
    fn kv_copy(
        &self,
        pool: &Self::KvPool,
        from: usize,
        to: usize,
        positions: usize,
    ) -> Result<(), ModelError>;
}

/// A device's pool of KV blocks ([`crate::Model::device_kv_pool`]), shared by the sequences
/// of a paged cache: the engine hands out its blocks by index and shares full ones between
/// sequences with the same prefix, as on the CPU.
#[derive(Clone)]
pub struct DeviceKvPool {
    pages: Arc<dyn DevicePages>,
    block_size: usize,
    blocks: usize,
}

impl std::fmt::Debug for DeviceKvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceKvPool({} blocks of {} positions)",
            self.blocks, self.block_size
        )
    }
}

impl DeviceKvPool {
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn blocks(&self) -> usize {
        self.blocks
    }
    /// Copies the first `positions` positions of block `from` into block `to`, every layer
    /// (a prefix reused up to the middle of a block).
    pub fn copy_positions(
        &self,
        from: usize,
        to: usize,
        positions: usize,
    ) -> Result<(), ModelError> {
        self.pages.copy_positions(from, to, positions)
    }
}

/// A pool and the device it lives on, behind a type-erased face.
trait DevicePages: Send + Sync {
    fn copy_positions(&self, from: usize, to: usize, positions: usize) -> Result<(), ModelError>;
    fn as_any(&self) -> &dyn Any;
}

struct PagesOf<B: DeviceBackend> {
    device: Arc<DeviceModel<B>>,
    pool: B::KvPool,
}

impl<B: DeviceBackend> DevicePages for PagesOf<B> {
    fn copy_positions(&self, from: usize, to: usize, positions: usize) -> Result<(), ModelError> {
        self.device.backend.kv_copy(&self.pool, from, to, positions)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Rows of logits one device product computes.
const LOGIT_ROWS: usize = 32;

/// A model's weights uploaded to a device backend.
pub(crate) struct DeviceModel<B: DeviceBackend> {
    backend: B,
    layers: Vec<Layer<B::Matrix, B::Vector>>,
    output: B::Matrix,
    output_norm: B::Vector,
}

impl<B: DeviceBackend> DeviceModel<B> {
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
        let linear = |name: String, l: &Linear<Matrix<'_>, Vec<f32>>| {
            Ok::<_, ModelError>(Linear {
                weight: matrix(&name, &l.weight)?,
                bias: vector(format!("{name} bias"), &l.bias)?,
            })
        };
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer): (usize, &CpuLayer)| {
                let name = |s: &str| format!("blk.{i}.{s}");
                let gated = |what: &str, f: &GatedFfn<Matrix<'_>>| {
                    Ok::<_, ModelError>(GatedFfn {
                        gate: matrix(&name(&format!("{what}_gate")), &f.gate)?,
                        up: matrix(&name(&format!("{what}_up")), &f.up)?,
                        down: matrix(&name(&format!("{what}_down")), &f.down)?,
                    })
                };
                // A router stays on the host, where experts are chosen.
                let ffn = match &layer.ffn {
                    Ffn::Dense(f) => Ffn::Dense(gated("ffn", f)?),
                    Ffn::Experts(moe) => Ffn::Experts(MoeFfn {
                        router: moe.router.clone(),
                        experts: moe
                            .experts
                            .iter()
                            .enumerate()
                            .map(|(e, f)| gated(&format!("ffn_exps.{e}"), f))
                            .collect::<Result<_, _>>()?,
                        shared: moe
                            .shared
                            .as_ref()
                            .map(|f| gated("ffn_shexp", f))
                            .transpose()?,
                        shared_gate: moe.shared_gate.clone(),
                    }),
                };
                Ok(Layer {
                    attn_norm: vector(name("attn_norm"), &layer.attn_norm)?,
                    wq: linear(name("attn_q"), &layer.wq)?,
                    wk: linear(name("attn_k"), &layer.wk)?,
                    wv: linear(name("attn_v"), &layer.wv)?,
                    wo: linear(name("attn_output"), &layer.wo)?,
                    q_norm: vector(name("attn_q_norm"), &layer.q_norm)?,
                    k_norm: vector(name("attn_k_norm"), &layer.k_norm)?,
                    post_attn_norm: vector(name("post_attention_norm"), &layer.post_attn_norm)?,
                    ffn_norm: vector(name("ffn_norm"), &layer.ffn_norm)?,
                    ffn,
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
            let plan = RowPlan::of_rows(rows.len() / cfg.d_model);
            let x = b.tensor(&plan, cfg.d_model, rows)?;
            let mut y = b.tensor(&plan, cfg.vocab_size, &[])?;
            b.matmul(&self.output, &x, &mut y)?;
            if let Some(cap) = cfg.final_softcap {
                b.softcap(&mut y, cap)?;
            }
            logits.extend(b.read(&y, 0..plan.rows)?);
        }
        Ok(logits)
    }
}

/// A [`DeviceModel`] behind a type-erased face, so [`crate::Model`] holds one whatever its
/// backend.
pub(crate) trait DeviceForward: Send + Sync {
    fn describe(&self) -> String;
    /// The forward pass of a batch of sequences, each with its keys and values where `kv[s]`
    /// says (a cache's own buffers are made on first use); the `start` positions before a
    /// sequence's tokens must already be there. Returns the final-normed hidden states of
    /// every sequence's rows.
    fn forward(
        &self,
        w: &Loaded,
        batch: &[SequenceInput<'_>],
        kv: Vec<DeviceKv<'_>>,
    ) -> Result<Vec<f32>, ModelError>;
    fn logits(&self, cfg: &ModelConfig, hidden: &[f32]) -> Result<Vec<f32>, ModelError>;
    /// A pool of `blocks` blocks of `block_size` positions on this device.
    fn kv_pool(
        self: Arc<Self>,
        cfg: &ModelConfig,
        block_size: usize,
        blocks: usize,
    ) -> Result<DeviceKvPool, ModelError>;
}

/// What a device backend keeps in a cache's [`crate::DeviceSlot`]: a pool of one block of
/// `positions`.
struct SlotKv<P> {
    pool: P,
    positions: usize,
}

impl<B: DeviceBackend> DeviceModel<B> {
    /// The keys and values `kv` names for a sequence whose tokens go at `start..end`; a
    /// cache's own are made when the sequence starts.
    fn kv_view(
        &self,
        cfg: &ModelConfig,
        kv: DeviceKv<'_>,
        start: usize,
        end: usize,
    ) -> Result<B::Kv, ModelError> {
        let overflow = |capacity| {
            Err(ModelError::ContextOverflow {
                needed: end,
                capacity,
            })
        };
        match kv {
            DeviceKv::Own { slot, positions } => {
                if end > positions {
                    return overflow(positions);
                }
                let held = slot
                    .0
                    .as_ref()
                    .and_then(|k| k.downcast_ref::<SlotKv<B::KvPool>>())
                    .is_some_and(|k| k.positions == positions);
                if !held {
                    if start > 0 {
                        return Err(ModelError::Device(format!(
                            "the KV cache holds {start} positions that are not on the {} \
                             device (a cache filled on the CPU, or cloned)",
                            self.backend.describe()
                        )));
                    }
                    let pool = self
                        .backend
                        .kv_pool(cfg.n_layers, cfg.kv_dim(), positions, 1)?;
                    slot.0 = Some(Box::new(SlotKv { pool, positions }));
                }
                let own = slot
                    .0
                    .as_ref()
                    .and_then(|k| k.downcast_ref::<SlotKv<B::KvPool>>())
                    .expect("held or just stored");
                self.backend.kv_view(&own.pool, &[0])
            }
            DeviceKv::Pages { pool, blocks } => {
                let capacity = blocks.len() * pool.block_size;
                if end > capacity {
                    return overflow(capacity);
                }
                let Some(pages) = pool.pages.as_any().downcast_ref::<PagesOf<B>>() else {
                    return Err(ModelError::Device(format!(
                        "a KV pool made for another device than {}",
                        self.backend.describe()
                    )));
                };
                self.backend.kv_view(&pages.pool, &blocks)
            }
        }
    }
}

impl<B: DeviceBackend> DeviceForward for DeviceModel<B> {
    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn forward(
        &self,
        w: &Loaded,
        batch: &[SequenceInput<'_>],
        kv: Vec<DeviceKv<'_>>,
    ) -> Result<Vec<f32>, ModelError> {
        let mut views = Vec::with_capacity(batch.len());
        for (s, kv) in batch.iter().zip(kv) {
            let end = s.start + s.tokens.len();
            views.push(self.kv_view(&w.config, kv, s.start, end)?);
        }
        let mut views: Vec<&mut B::Kv> = views.iter_mut().collect();
        let program = Program {
            backend: &self.backend,
            model: w,
            layers: &self.layers as &Layers<B>,
            output_norm: &self.output_norm,
        };
        program.forward(batch, &mut views, &[], &mut NoObserver)
    }

    fn logits(&self, cfg: &ModelConfig, hidden: &[f32]) -> Result<Vec<f32>, ModelError> {
        DeviceModel::logits(self, cfg, hidden)
    }

    fn kv_pool(
        self: Arc<Self>,
        cfg: &ModelConfig,
        block_size: usize,
        blocks: usize,
    ) -> Result<DeviceKvPool, ModelError> {
        if block_size == 0 || blocks == 0 {
            return Err(ModelError::Device(format!(
                "a KV pool of {blocks} blocks of {block_size} positions"
            )));
        }
        let pool = self
            .backend
            .kv_pool(cfg.n_layers, cfg.kv_dim(), block_size, blocks)?;
        Ok(DeviceKvPool {
            pages: Arc::new(PagesOf { device: self, pool }),
            block_size,
            blocks,
        })
    }
}
