//! Transformer architectures as configuration over shared blocks, and the forward pass.
//!
//! `quarry-model` knows transformers, not text or HTTP: it maps a GGUF file's tensors into a
//! [`Model`] (weights stay quantized in the memory map), runs batches of token ids through the
//! one forward pass all families share, and keeps attention state in a [`KvCache`].

mod attention;
mod backend;
mod config;
mod cpu;
mod error;
mod export;
pub mod ffn;
mod forward;
pub mod hf;
mod kv_cache;
mod lora;
mod model;
pub mod ops;
mod overlay;

pub use attention::AttentionSpec;
pub use backend::{Backend, DeviceBackend, DeviceKvPool};
pub use config::{
    Activation, ArchSpec, Experts, ModelConfig, QkNorm, RopeStyle, SlidingLayers, ARCHITECTURES,
};
pub use error::ModelError;
pub use export::{write_patched_model, DEFAULT_PATCHED_TYPE, PATCHED_TYPES};
pub use ffn::{FeatureBlock, FeatureOwner, FfnFeatures, Router};
pub use forward::{RowPlan, SequenceRows};
pub use kv_cache::{ContiguousKvCache, DeviceKv, DeviceSlot, KvCache, KV_BYTES_PER_VALUE};
pub use lora::{read_adapter, write_adapter};
pub use model::{AttentionWeights, FfnWeights, ForwardObserver, Model, SequenceBatch};
pub use overlay::{FfnOverlay, LowRank, NeuronRows};
