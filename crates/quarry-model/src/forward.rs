//! The forward pass: one program for every family and every backend.
//!
//! [`forward`] strings a backend's operations ([`Backend`]) together as the family's
//! [`ModelConfig`] says: norm placement, biases, QK-norm, global or local rotation, sliding
//! windows, soft-caps, post-norms, a dense or a mixture-of-experts FFN, edit overlays. The CPU
//! ([`crate::cpu::Cpu`]) and a device (quarry-gpu) run this same code; what differs is only
//! how each operation is done and where the buffers live.
//!
//! A batch is several sequences' tokens at once (a prompt, a decode step, or a server's mix
//! of both): every weight matrix is read once per call whatever the batch size, and only
//! RoPE, the KV cache writes and attention look at which sequence a row belongs to. What a
//! backend needs to multiply each row exactly as it would be multiplied alone (the CPU's
//! 8-bit decode rows, each prompt's rows apart) travels with every tensor as its [`RowPlan`].
//!
//! Overlays and observers read and write activations in place on the host
//! ([`Backend::host`]); a backend that keeps them elsewhere refuses those by name. Experts
//! are routed on the host too, but through [`Backend::read`] and a tensor written back, so
//! they run on any backend.

use std::ops::Range;

use crate::attention::AttentionSpec;
use crate::backend::Backend;
use crate::config::{Experts, ModelConfig};
use crate::ffn::Router;
use crate::model::{ForwardObserver, Loaded};
use crate::overlay::FfnOverlay;
use crate::ModelError;

/// A projection `W · x + b`, the bias where the file has one.
pub(crate) struct Linear<M, V> {
    pub(crate) weight: M,
    pub(crate) bias: Option<V>,
}

/// One transformer layer over a backend's matrices `M` and vectors `V`; which norms exist
/// is the family's [`crate::ArchSpec`].
pub(crate) struct Layer<M, V> {
    pub(crate) attn_norm: Option<V>,
    pub(crate) wq: Linear<M, V>,
    pub(crate) wk: Linear<M, V>,
    pub(crate) wv: Linear<M, V>,
    pub(crate) wo: Linear<M, V>,
    pub(crate) q_norm: Option<V>,
    pub(crate) k_norm: Option<V>,
    pub(crate) post_attn_norm: Option<V>,
    pub(crate) ffn_norm: Option<V>,
    pub(crate) ffn: Ffn<M>,
    pub(crate) post_ffn_norm: Option<V>,
}

/// A layer's FFN: one gated FFN, or a router over several (mixture of experts).
pub(crate) enum Ffn<M> {
    Dense(GatedFfn<M>),
    Experts(MoeFfn<M>),
}

/// `down · (act(gate · x) ⊙ (up · x))`.
pub(crate) struct GatedFfn<M> {
    pub(crate) gate: M,
    pub(crate) up: M,
    pub(crate) down: M,
}

/// A mixture-of-experts FFN: the router's softmax picks each token's top experts, whose
/// outputs are summed with those weights; a shared expert (Qwen2-MoE) runs on every token,
/// scaled by the sigmoid of its own one-row gate. The router runs on the host.
pub(crate) struct MoeFfn<M> {
    /// `count × d_model`, in `f32` ([`Router::weights`]).
    pub(crate) router: Vec<f32>,
    pub(crate) experts: Vec<GatedFfn<M>>,
    pub(crate) shared: Option<GatedFfn<M>>,
    pub(crate) shared_gate: Option<Vec<f32>>,
}

impl<M> MoeFfn<M> {
    pub(crate) fn router(&self, spec: &Experts) -> Router<'_> {
        Router::new(spec, &self.router, self.shared_gate.as_deref())
    }
}

/// The layers of backend `B`.
pub(crate) type Layers<B> = [Layer<<B as Backend>::Matrix, <B as Backend>::Vector>];

/// How a backend is to multiply a tensor's rows so that each gives what it would alone: the
/// first `decode` rows are decode steps (single-token sequences: the CPU multiplies them in
/// 8 bits), and the rest are the rows of later sequences, `segments` long each (multiplied
/// one sequence at a time). A device that multiplies every row alike reads only `rows`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowPlan {
    pub rows: usize,
    pub decode: usize,
    pub segments: Vec<usize>,
}

impl RowPlan {
    /// The plan of a batch of sequences `lengths` long: those at its front with one token
    /// each are decode steps.
    fn of_sequences(lengths: &[usize]) -> RowPlan {
        let decode = lengths.iter().take_while(|&&len| len == 1).count();
        RowPlan {
            rows: lengths.iter().sum(),
            decode,
            segments: lengths[decode..].to_vec(),
        }
    }

    /// `rows` rows multiplied together, none as a decode step.
    pub fn of_rows(rows: usize) -> RowPlan {
        RowPlan {
            rows,
            decode: 0,
            segments: vec![rows],
        }
    }

    /// The plan of the rows `rows` (ascending) of this one: the decode rows among them, and
    /// the rest split by the sequence they belong to.
    fn select(&self, rows: &[usize]) -> RowPlan {
        let decode = rows.iter().take_while(|&&r| r < self.decode).count();
        // The first row after each sequence that is multiplied apart.
        let ends: Vec<usize> = self
            .segments
            .iter()
            .scan(self.decode, |end, len| {
                *end += len;
                Some(*end)
            })
            .collect();
        let mut segments: Vec<(usize, usize)> = Vec::new();
        for &row in &rows[decode..] {
            let seq = ends.partition_point(|&end| end <= row);
            match segments.last_mut() {
                Some((last, len)) if *last == seq => *len += 1,
                _ => segments.push((seq, 1)),
            }
        }
        RowPlan {
            rows: rows.len(),
            decode,
            segments: segments.into_iter().map(|(_, len)| len).collect(),
        }
    }
}

/// Where one sequence's rows of a batch go: its first position, and which rows of the
/// batch's tensors are its own.
#[derive(Clone, Debug)]
pub struct SequenceRows {
    pub start: usize,
    pub rows: Range<usize>,
}

/// One sequence of a batch: its tokens, placed from `start`, in a cache of `capacity`
/// positions (which picks LongRoPE's factors); `rows`, indices within `tokens`, are the
/// rows whose hidden states are returned.
pub(crate) struct SequenceInput<'t> {
    pub(crate) tokens: &'t [u32],
    pub(crate) start: usize,
    pub(crate) capacity: usize,
    pub(crate) rows: Range<usize>,
}

/// What the program needs of a model: its configuration, embedding and rotations
/// ([`Loaded`]), and its layers and final norm on the backend.
pub(crate) struct Program<'m, B: Backend> {
    pub(crate) backend: &'m B,
    pub(crate) model: &'m Loaded,
    pub(crate) layers: &'m Layers<B>,
    pub(crate) output_norm: &'m B::Vector,
}

/// The error for `what`, which the device `described` does not run.
pub(crate) fn not_on_device(described: &str, what: &str) -> ModelError {
    ModelError::Device(format!("{described} does not run {what} yet (use the CPU)"))
}

/// An error naming what `b` cannot do because it keeps its activations off the host.
fn off_host<B: Backend>(b: &B, what: &str) -> ModelError {
    not_on_device(&b.describe(), what)
}

impl<B: Backend> Program<'_, B> {
    /// The forward pass of a batch of sequences, each after the positions its KV cache
    /// (`kv`, one per sequence) holds, each range of `overlays` (rows of the batch) read
    /// through that overlay's deltas: the final-normed hidden states of every sequence's
    /// selected rows, in order. The caches are written, not advanced.
    pub(crate) fn forward(
        &self,
        batch: &[SequenceInput<'_>],
        kv: &mut [&mut B::Kv],
        overlays: &[(Range<usize>, &FfnOverlay)],
        observer: &mut dyn ForwardObserver,
    ) -> Result<Vec<f32>, ModelError> {
        let (b, w) = (self.backend, self.model);
        let cfg = &w.config;
        let (d, eps, hd) = (cfg.d_model, cfg.norm_eps, cfg.head_dim);
        let lengths: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
        let plan = RowPlan::of_sequences(&lengths);
        let mut spans = Vec::with_capacity(batch.len());
        let mut first = 0;
        for s in batch {
            spans.push(SequenceRows {
                start: s.start,
                rows: first..first + s.tokens.len(),
            });
            first += s.tokens.len();
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|s| s.tokens).copied().collect();
        let embedded = w.embed(&tokens)?;
        observer.embeddings(&embedded);
        let tensor = |cols: usize| b.tensor(&plan, cols, &[]);
        let mut x = b.tensor(&plan, d, &embedded)?;
        let mut h = tensor(d)?;
        let mut t = Activations {
            q: tensor(cfg.q_dim())?,
            k: tensor(cfg.kv_dim())?,
            v: tensor(cfg.kv_dim())?,
            attn: tensor(cfg.q_dim())?,
            gate: tensor(cfg.ff_dim)?,
            up: tensor(cfg.ff_dim)?,
        };
        let tables = |global: bool| {
            batch
                .iter()
                .map(|s| match global {
                    true => w.global_rope(s.capacity).table(s.start, s.tokens.len()),
                    false => w.rope_local.table(s.start, s.tokens.len()),
                })
                .collect()
        };
        let rotations = [b.rotation(tables(true))?, b.rotation(tables(false))?];
        for (i, layer) in self.layers.iter().enumerate() {
            let global = cfg.global_layers[i];
            let rotation = &rotations[usize::from(!global)];
            b.copy(&x, &mut h)?;
            self.norm(&mut h, &layer.attn_norm, eps)?;
            let mut qkv = [
                (&layer.wq.weight, &mut t.q),
                (&layer.wk.weight, &mut t.k),
                (&layer.wv.weight, &mut t.v),
            ];
            b.matmul_many(&mut qkv, &h)?;
            self.bias(&mut t.q, &layer.wq)?;
            self.bias(&mut t.k, &layer.wk)?;
            self.bias(&mut t.v, &layer.wv)?;
            self.norm(&mut t.q, &layer.q_norm, eps)?;
            self.norm(&mut t.k, &layer.k_norm, eps)?;
            b.rope(&mut t.q, &mut t.k, rotation, hd)?;
            b.kv_write(kv, &spans, i, &t.k, &t.v)?;
            let spec = attention_spec(cfg, global);
            b.attend(&spec, kv, &spans, i, &t.q, &mut t.attn)?;
            b.matmul(&layer.wo.weight, &t.attn, &mut h)?;
            self.bias(&mut h, &layer.wo)?;
            self.norm(&mut h, &layer.post_attn_norm, eps)?;
            if let Some(added) = b.host(&h) {
                observer.attention_output(i, added);
            }
            b.add(&mut x, &h)?;

            b.copy(&x, &mut h)?;
            self.norm(&mut h, &layer.ffn_norm, eps)?;
            match &layer.ffn {
                Ffn::Dense(ffn) => self.dense_ffn(i, ffn, &mut h, &mut t, overlays, observer)?,
                Ffn::Experts(moe) => self.experts(i, moe, &mut h, &plan, observer)?,
            }
            if let Some(y) = b.host(&h) {
                observer.ffn_projection(i, y);
            }
            self.norm(&mut h, &layer.post_ffn_norm, eps)?;
            if let Some(added) = b.host(&h) {
                observer.ffn_output(i, added);
            }
            b.add(&mut x, &h)?;
        }
        if let Some(x) = b.host(&x) {
            observer.final_residual(x);
        }
        b.rms_norm(&mut x, self.output_norm, eps)?;
        let mut hidden = Vec::new();
        for (s, span) in batch.iter().zip(&spans) {
            let first = span.rows.start;
            hidden.extend(b.read(&x, first + s.rows.start..first + s.rows.end)?);
        }
        Ok(hidden)
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

    /// Adds `l`'s bias, where it has one, to its product `y`.
    fn bias(&self, y: &mut B::Tensor, l: &Linear<B::Matrix, B::Vector>) -> Result<(), ModelError> {
        match &l.bias {
            Some(bias) => self.backend.add_bias(y, bias),
            None => Ok(()),
        }
    }

    /// A gated FFN over the normed rows `h`, its projection left in `h`; the overlays'
    /// neuron rows edit the activations and their deltas add to the projection itself, so a
    /// post-FFN norm sees `W + B·A`.
    fn dense_ffn(
        &self,
        index: usize,
        ffn: &GatedFfn<B::Matrix>,
        h: &mut B::Tensor,
        t: &mut Activations<B::Tensor>,
        overlays: &[(Range<usize>, &FfnOverlay)],
        observer: &mut dyn ForwardObserver,
    ) -> Result<(), ModelError> {
        let b = self.backend;
        let cfg = &self.model.config;
        let (ff, d) = (cfg.ff_dim, cfg.d_model);
        b.matmul_many(&mut [(&ffn.gate, &mut t.gate), (&ffn.up, &mut t.up)], h)?;
        b.gated_activation(&mut t.gate, &t.up, cfg.activation)?;
        let edits = || off_host(b, "edit overlays (LoRA adapters, patches)");
        for (rows, overlay) in overlays {
            if let Some(neurons) = overlay.neurons(index) {
                let x = b.host(h).ok_or_else(edits)?;
                let gate = b.host_mut(&mut t.gate).ok_or_else(edits)?;
                neurons.apply(
                    &x[rows.start * d..rows.end * d],
                    &mut gate[rows.start * ff..rows.end * ff],
                    cfg.activation,
                );
            }
        }
        if let (Some(x), Some(gate)) = (b.host(h), b.host(&t.gate)) {
            observer.ffn_activations(index, x, gate);
        }
        b.matmul(&ffn.down, &t.gate, h)?;
        for (rows, overlay) in overlays {
            if let Some(delta) = overlay.layer(index) {
                let gate = b.host(&t.gate).ok_or_else(edits)?;
                let y = b.host_mut(h).ok_or_else(edits)?;
                delta.apply(
                    &gate[rows.start * ff..rows.end * ff],
                    &mut y[rows.start * d..rows.end * d],
                );
            }
        }
        Ok(())
    }

    /// A mixture-of-experts FFN over the normed rows `h`, its output left in `h`: each row's
    /// top experts by the router's softmax, the rows routed to one expert multiplied
    /// together, and the weighted outputs summed (plus the gated shared expert, where there
    /// is one). An observer that wants them is shown the weighted activations of every
    /// expert's features (zeros where a row was not routed), then the shared expert's.
    ///
    /// Routing and the weighted sum run on the host (the router is a small `f32` matrix):
    /// on a device that is one read of `h` and one of each expert's output per layer.
    fn experts(
        &self,
        index: usize,
        moe: &MoeFfn<B::Matrix>,
        h: &mut B::Tensor,
        plan: &RowPlan,
        observer: &mut dyn ForwardObserver,
    ) -> Result<(), ModelError> {
        let b = self.backend;
        let cfg = &self.model.config;
        let spec = cfg
            .experts
            .as_ref()
            .expect("a model with expert layers has experts");
        let router = moe.router(spec);
        let d = cfg.d_model;
        let xn = b.read(h, 0..plan.rows)?;
        let n = plan.rows;
        let observing = observer.observes_ffn_activations();
        let features =
            moe.experts.len() * spec.ff_dim + moe.shared.as_ref().map_or(0, |_| spec.shared_ff_dim);
        let mut observed = match observing {
            true => vec![0.0f32; n * features],
            false => Vec::new(),
        };
        let mut observe = |row: usize, offset: usize, weight: f32, hidden: &[f32]| {
            if let Some(out) = observed.get_mut(row * features + offset..) {
                out.iter_mut()
                    .zip(hidden)
                    .for_each(|(o, h)| *o = weight * h);
            }
        };
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); moe.experts.len()];
        for (row, x) in xn.chunks_exact(d).enumerate() {
            for (expert, weight) in router.route(x) {
                routed[expert].push((row, weight));
            }
        }
        let mut y = vec![0.0f32; n * d];
        for (expert, (ffn, rows)) in moe.experts.iter().zip(&routed).enumerate() {
            if rows.is_empty() {
                continue;
            }
            let picked: Vec<usize> = rows.iter().map(|&(r, _)| r).collect();
            let xe: Vec<f32> = picked
                .iter()
                .flat_map(|&r| xn[r * d..(r + 1) * d].iter().copied())
                .collect();
            let (out, hidden) =
                self.gated_ffn(ffn, &xe, spec.ff_dim, plan.select(&picked), observing)?;
            for (i, (&(row, weight), o)) in rows.iter().zip(out.chunks_exact(d)).enumerate() {
                y[row * d..(row + 1) * d]
                    .iter_mut()
                    .zip(o)
                    .for_each(|(a, b)| *a += weight * b);
                if let Some(hidden) = &hidden {
                    let h = &hidden[i * spec.ff_dim..(i + 1) * spec.ff_dim];
                    observe(row, expert * spec.ff_dim, weight, h);
                }
            }
        }
        if let Some(shared) = &moe.shared {
            let (out, hidden) =
                self.gated_ffn(shared, &xn, spec.shared_ff_dim, plan.clone(), observing)?;
            for (row, ((yr, o), x)) in y
                .chunks_exact_mut(d)
                .zip(out.chunks_exact(d))
                .zip(xn.chunks_exact(d))
                .enumerate()
            {
                let g = router.shared_weight(x);
                yr.iter_mut().zip(o).for_each(|(a, b)| *a += g * b);
                if let Some(hidden) = &hidden {
                    let h = &hidden[row * spec.shared_ff_dim..(row + 1) * spec.shared_ff_dim];
                    observe(row, moe.experts.len() * spec.ff_dim, g, h);
                }
            }
        }
        if !observed.is_empty() {
            observer.ffn_activations(index, &xn, &observed);
        }
        b.copy(&b.tensor(plan, d, &y)?, h)
    }

    /// One gated FFN of hidden width `ff` over the rows `x`, multiplied as `plan` says: its
    /// output and (when `hidden`) its hidden activations, on the host.
    fn gated_ffn(
        &self,
        ffn: &GatedFfn<B::Matrix>,
        x: &[f32],
        ff: usize,
        plan: RowPlan,
        hidden: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>), ModelError> {
        let b = self.backend;
        let cfg = &self.model.config;
        let rows = plan.rows;
        let x = b.tensor(&plan, cfg.d_model, x)?;
        let (mut gate, mut up) = (b.tensor(&plan, ff, &[])?, b.tensor(&plan, ff, &[])?);
        b.matmul_many(&mut [(&ffn.gate, &mut gate), (&ffn.up, &mut up)], &x)?;
        b.gated_activation(&mut gate, &up, cfg.activation)?;
        let mut out = b.tensor(&plan, cfg.d_model, &[])?;
        b.matmul(&ffn.down, &gate, &mut out)?;
        let hidden = match hidden {
            true => Some(b.read(&gate, 0..rows)?),
            false => None,
        };
        Ok((b.read(&out, 0..rows)?, hidden))
    }
}

/// The activations of one forward call other than the residual and its normed copy,
/// allocated once and reused by every layer.
struct Activations<T> {
    q: T,
    k: T,
    v: T,
    attn: T,
    gate: T,
    up: T,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Selecting rows keeps the decode rows among them and splits the rest by sequence.
    #[test]
    fn a_selection_of_rows_keeps_their_sequences_apart() {
        let plan = RowPlan::of_sequences(&[1, 1, 3, 2]);
        assert_eq!(
            plan,
            RowPlan {
                rows: 7,
                decode: 2,
                segments: vec![3, 2]
            }
        );
        let picked = plan.select(&[1, 3, 4, 5]);
        assert_eq!(
            picked,
            RowPlan {
                rows: 4,
                decode: 1,
                segments: vec![2, 1]
            }
        );
        assert_eq!(plan.select(&[2, 6]).segments, vec![1, 1]);
        assert_eq!(plan.select(&[0]).decode, 1);
    }
}
