//! The model from one layer's FFN upwards in `f32`, with reverse mode: how the editor finds the
//! change of an FFN output that makes the model say something new.
//!
//! The quantized forward pass has no gradients, and the editor needs only a few of them (one
//! vector per edit, over prompts of a few dozen tokens), so this module keeps a dense `f32`
//! copy of the layers above the edited one and runs them on one sequence at a time, recording
//! what the backward pass needs. The added vector `δ` enters layer `first`'s FFN output at one
//! position, before the post-FFN norm (where the down projection's overlay adds its delta);
//! [`DenseTail::loss_and_grad`] returns the loss and `∂loss/∂δ`. The maths mirrors
//! `quarry-model`'s forward pass block for block (pre-norms, QK-norm, RoPE, grouped-query
//! attention with sliding windows and soft-caps, gated FFN, post-norms, final norm, soft-capped
//! head); `tests/gradients.rs` checks every path against finite differences.

use quarry_kernels::gemm::{gemm, MatRef};
use quarry_kernels::WeightView;
use quarry_model::ops::Rope;
use quarry_model::{Activation, Model, ModelConfig};

use crate::EditError;

/// A dense `rows × cols` matrix, row-major, and the bias added to its products (if any).
struct Dense {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Dense {
    fn from_view(view: WeightView<'_>) -> Result<Dense, EditError> {
        let (rows, cols) = (view.rows(), view.cols());
        let mut data = vec![0.0f32; rows * cols];
        quarry_kernels::dequantize(view.dtype(), view.data(), &mut data)
            .map_err(|e| EditError::Model(e.to_string()))?;
        Ok(Dense {
            rows,
            cols,
            data,
            bias: None,
        })
    }

    fn with_bias(self, bias: Option<&[f32]>) -> Dense {
        Dense {
            bias: bias.map(<[f32]>::to_vec),
            ..self
        }
    }

    /// `x · selfᵀ + bias` for `n` rows of `x` (`cols` wide): `n × rows`.
    fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; n * self.rows];
        gemm(
            1.0,
            MatRef::row_major(x, n, self.cols, self.cols),
            MatRef::row_major(&self.data, self.rows, self.cols, self.cols).t(),
            0.0,
            &mut out,
            self.rows,
        );
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(self.rows) {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
        }
        out
    }

    /// `dy · self` for `n` rows of `dy` (`rows` wide), added into `dx` (`n × cols`).
    fn backward_into(&self, dy: &[f32], n: usize, dx: &mut [f32]) {
        gemm(
            1.0,
            MatRef::row_major(dy, n, self.rows, self.rows),
            MatRef::row_major(&self.data, self.rows, self.cols, self.cols),
            1.0,
            dx,
            self.cols,
        );
    }
}

struct DenseFfn {
    norm: Option<Vec<f32>>,
    gate: Dense,
    up: Dense,
    down: Dense,
    post_norm: Option<Vec<f32>>,
}

struct DenseAttention {
    norm: Option<Vec<f32>>,
    wq: Dense,
    wk: Dense,
    wv: Dense,
    wo: Dense,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    post_norm: Option<Vec<f32>>,
    global: bool,
}

/// Layers `first..n_layers` of a model in `f32`: layer `first`'s FFN, then every later layer
/// whole, the final norm and the output head.
pub struct DenseTail {
    cfg: ModelConfig,
    first: usize,
    ffn0: DenseFfn,
    layers: Vec<(DenseAttention, DenseFfn)>,
    output_norm: Vec<f32>,
    head: Dense,
    rope_global: Rope,
    rope_local: Rope,
}

/// What the loss asks of the predictions at some rows of the sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// Make each `(row, token)` likely: mean negative log-probability.
    Likelihood,
    /// Make each `(row, token)` unlikely: mean `−log(1 − p)`.
    Unlikelihood,
}

/// One sequence the loss reads: its residual stream entering layer `first`'s FFN
/// (`t × d_model`), the row `δ` is added at (the entity's last token), and the `(row, token)`
/// predictions the loss is about.
pub struct Probe<'a> {
    pub residual: &'a [f32],
    pub position: usize,
    pub targets: Vec<(usize, u32)>,
    pub objective: Objective,
}

/// Where the rows of a batch of probes lie: each row's position in its sequence and the row
/// its sequence starts at, each probe's first row; which rows a pass computes (`live`, in
/// order) and, among those, the rows `δ` is added at (`injected`, indices into `live`).
/// Rows before a probe's `δ` row do not depend on `δ`: the optimisation computes them once
/// ([`DenseTail::freeze`]) and each step runs only the rows from `δ` on.
struct Layout {
    pos: Vec<usize>,
    start: Vec<usize>,
    offsets: Vec<usize>,
    live: Vec<usize>,
    injected: Vec<usize>,
}

/// Which rows of each probe a pass computes.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    All,
    BeforeDelta,
    FromDelta,
}

impl Layout {
    fn of(probes: &[Probe<'_>], d: usize, rows: Rows) -> Layout {
        let mut layout = Layout {
            pos: Vec::new(),
            start: Vec::new(),
            offsets: Vec::new(),
            live: Vec::new(),
            injected: Vec::new(),
        };
        for p in probes {
            let (offset, t) = (layout.pos.len(), p.residual.len() / d);
            assert!(p.position < t && t * d == p.residual.len());
            let live = match rows {
                Rows::All => 0..t,
                Rows::BeforeDelta => 0..p.position,
                Rows::FromDelta => p.position..t,
            };
            if live.contains(&p.position) {
                layout
                    .injected
                    .push(layout.live.len() + p.position - live.start);
            }
            layout.offsets.push(offset);
            layout.live.extend(live.map(|r| offset + r));
            layout.pos.extend(0..t);
            layout.start.extend(std::iter::repeat_n(offset, t));
        }
        layout
    }

    /// The index in `live` of row `row`.
    fn live_index(&self, row: usize) -> usize {
        self.live
            .binary_search(&row)
            .expect("the loss reads rows the pass computes")
    }

    /// The first row row `i` attends to: its sequence's start, or the sliding window's.
    fn first_visible(&self, attn: &DenseAttention, i: usize, window: Option<usize>) -> usize {
        match (attn.global, window) {
            (false, Some(w)) => self.start[i] + (self.pos[i] + 1).saturating_sub(w),
            _ => self.start[i],
        }
    }
}

/// The rotated keys and values of every row of a batch of probes at each layer above the
/// edited one, of which the rows before each probe's `δ` row are read: they do not depend on
/// `δ`, so [`DenseTail::freeze`] computes them once per edit.
pub struct Frozen {
    kv: Vec<(Vec<f32>, Vec<f32>)>,
}

/// The forward pass of a batch of probes: the final residual and the tapes of every block.
struct Run {
    x: Vec<f32>,
    tape0: FfnTape,
    tapes: Vec<(AttnTape, FfnTape)>,
}

/// Everything the forward pass recorded for the backward pass of one FFN block.
struct FfnTape {
    x: Vec<f32>,
    inv: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    y: Vec<f32>,
    post_inv: Vec<f32>,
}

/// Everything the forward pass recorded for the backward pass of one attention block.
struct AttnTape {
    x: Vec<f32>,
    inv: Vec<f32>,
    q: Vec<f32>,
    q_inv: Vec<f32>,
    k: Vec<f32>,
    k_inv: Vec<f32>,
    q_rot: Vec<f32>,
    /// Rotated keys and values of every row of the batch (live rows computed, others frozen).
    k_rot: Vec<f32>,
    v: Vec<f32>,
    /// Per head, `live × rows` softmax weights (zero where masked).
    probs: Vec<f32>,
    /// Per head, `live × rows` scores after the soft-cap (used for its derivative).
    capped: Vec<f32>,
    y: Vec<f32>,
    post_inv: Vec<f32>,
}

impl DenseTail {
    /// Dense copies of `model`'s layers from `first` upwards. Costs `4 · (weights of those
    /// layers + head)` bytes.
    pub fn new(model: &Model, first: usize) -> Result<DenseTail, EditError> {
        EditError::check_dense(model)?;
        let cfg = model.config().clone();
        if first >= cfg.n_layers {
            return Err(EditError::BadLayer {
                layer: first,
                n_layers: cfg.n_layers,
            });
        }
        let ffn = |l: usize| -> Result<DenseFfn, EditError> {
            let w = model.ffn_weights(l);
            Ok(DenseFfn {
                norm: w.norm.map(<[f32]>::to_vec),
                gate: Dense::from_view(w.gate)?,
                up: Dense::from_view(w.up)?,
                down: Dense::from_view(w.down)?,
                post_norm: w.post_norm.map(<[f32]>::to_vec),
            })
        };
        let attention = |l: usize| -> Result<DenseAttention, EditError> {
            let w = model.attention_weights(l);
            Ok(DenseAttention {
                norm: w.norm.map(<[f32]>::to_vec),
                wq: Dense::from_view(w.wq)?.with_bias(w.biases[0]),
                wk: Dense::from_view(w.wk)?.with_bias(w.biases[1]),
                wv: Dense::from_view(w.wv)?.with_bias(w.biases[2]),
                wo: Dense::from_view(w.wo)?.with_bias(w.biases[3]),
                q_norm: w.q_norm.map(<[f32]>::to_vec),
                k_norm: w.k_norm.map(<[f32]>::to_vec),
                post_norm: w.post_norm.map(<[f32]>::to_vec),
                global: cfg.global_layers[l],
            })
        };
        let layers = (first + 1..cfg.n_layers)
            .map(|l| Ok((attention(l)?, ffn(l)?)))
            .collect::<Result<Vec<_>, EditError>>()?;
        let (rope_global, rope_local) = (model.rope(true).clone(), model.rope(false).clone());
        Ok(DenseTail {
            ffn0: ffn(first)?,
            layers,
            output_norm: model.output_norm().to_vec(),
            head: Dense::from_view(model.output_head())?,
            rope_global,
            rope_local,
            first,
            cfg,
        })
    }

    /// The layer whose FFN output `δ` is added to.
    pub fn first(&self) -> usize {
        self.first
    }

    /// The keys and values of the rows before each probe's `δ` row, at every layer above the
    /// edited one: what [`DenseTail::loss_and_grad`] reads instead of recomputing them.
    pub fn freeze(&self, probes: &[Probe<'_>]) -> Frozen {
        let layout = Layout::of(probes, self.cfg.d_model, Rows::BeforeDelta);
        if layout.live.is_empty() {
            let zeros = vec![0.0f32; layout.pos.len() * self.cfg.kv_dim()];
            return Frozen {
                kv: vec![(zeros.clone(), zeros); self.layers.len()],
            };
        }
        let run = self.run_forward(probes, &layout, None, &[]);
        Frozen {
            kv: run.tapes.into_iter().map(|(a, _)| (a.k_rot, a.v)).collect(),
        }
    }

    /// The mean loss of every probe's targets, each probe a sequence whose residual stream
    /// entering layer `first`'s FFN is given, with `delta` added to that FFN's output (before
    /// its post-norm) at the probe's `position`; and `∂loss/∂delta`. `frozen` is
    /// [`DenseTail::freeze`] of the same probes. All probes run as one batch of rows
    /// (attention keeps them apart), so each weight is read once per pass.
    pub fn loss_and_grad(
        &self,
        probes: &[Probe<'_>],
        frozen: &Frozen,
        delta: &[f32],
    ) -> (f32, Vec<f32>) {
        let d = self.cfg.d_model;
        assert!(delta.len() == d && !probes.is_empty());
        let layout = Layout::of(probes, d, Rows::FromDelta);
        let run = self.run_forward(probes, &layout, Some(frozen), delta);
        let targets: Vec<(usize, u32, Objective)> = probes
            .iter()
            .zip(&layout.offsets)
            .flat_map(|(p, &o)| {
                p.targets
                    .iter()
                    .map(move |&(r, tok)| (o + r, tok, p.objective))
            })
            .map(|(row, tok, objective)| (layout.live_index(row), tok, objective))
            .collect();
        let (loss, mut dx) = self.head_loss(&run.x, &targets);
        for ((attn, ffn), (a, f)) in self.layers.iter().zip(&run.tapes).rev() {
            self.ffn_backward(ffn, f, &mut dx, layout.live.len());
            self.attention_backward(attn, a, &mut dx, &layout);
        }
        // `δ` is added to layer `first`'s FFN output before its post-norm: its gradient is
        // that of the pre-norm output at each probe's position.
        let dy = norm_backward(
            &run.tape0.y,
            self.ffn0.post_norm.as_deref(),
            &run.tape0.post_inv,
            dx,
        );
        let mut grad = vec![0.0f32; d];
        for &row in &layout.injected {
            grad.iter_mut()
                .zip(&dy[row * d..(row + 1) * d])
                .for_each(|(g, v)| *g += v);
        }
        (loss, grad)
    }

    /// Log-probabilities of every vocabulary entry at each of `rows` of `probe`, with `delta`
    /// added as in [`DenseTail::loss_and_grad`] (every row computed: the reference the
    /// frozen rows are tested against).
    pub fn log_probs(&self, probe: &Probe<'_>, delta: &[f32], rows: &[usize]) -> Vec<Vec<f32>> {
        let d = self.cfg.d_model;
        let probes = std::slice::from_ref(probe);
        let run = self.run_forward(probes, &Layout::of(probes, d, Rows::All), None, delta);
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|&r| run.x[r * d..(r + 1) * d].iter().copied())
            .collect();
        let (logits, _) = self.logits(&x, rows.len());
        logits
            .chunks_exact(self.cfg.vocab_size)
            .map(log_softmax)
            .collect()
    }

    /// Layer `first`'s FFN output at row `position` of a sequence with `residual` entering it,
    /// before any post-norm: the vector `δ` is added to.
    pub fn ffn_output(&self, residual: &[f32], position: usize) -> Vec<f32> {
        let d = self.cfg.d_model;
        let mut x = residual[position * d..(position + 1) * d].to_vec();
        self.ffn_forward(&self.ffn0, &mut x, 1, &[], &[]).y
    }

    /// The live rows of `layout` from layer `first`'s FFN to the final residual; attention
    /// reads the other rows' keys and values from `frozen`.
    fn run_forward(
        &self,
        probes: &[Probe<'_>],
        layout: &Layout,
        frozen: Option<&Frozen>,
        delta: &[f32],
    ) -> Run {
        let d = self.cfg.d_model;
        let rows: Vec<&[f32]> = probes
            .iter()
            .flat_map(|p| p.residual.chunks_exact(d))
            .collect();
        let mut x: Vec<f32> = layout
            .live
            .iter()
            .flat_map(|&r| rows[r].iter().copied())
            .collect();
        let t = layout.live.len();
        let tape0 = self.ffn_forward(&self.ffn0, &mut x, t, &layout.injected, delta);
        let tapes = self
            .layers
            .iter()
            .enumerate()
            .map(|(l, (attn, ffn))| {
                let kv = frozen.map(|f| &f.kv[l]);
                let a = self.attention_forward(attn, &mut x, layout, kv);
                let f = self.ffn_forward(ffn, &mut x, t, &[], &[]);
                (a, f)
            })
            .collect();
        Run { x, tape0, tapes }
    }

    /// Final norm, head and soft-cap of `n` rows: the logits and each row's `1/rms`.
    fn logits(&self, rows: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut normed = vec![0.0f32; rows.len()];
        let inv = rms_forward(rows, &self.output_norm, self.cfg.norm_eps, &mut normed);
        let mut logits = self.head.forward(&normed, n);
        if let Some(cap) = self.cfg.final_softcap {
            logits.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        (logits, inv)
    }

    /// The mean loss over `targets` (`(row, token, objective)`) and its gradient at every
    /// row of `x`; the head is read once for all of them.
    fn head_loss(&self, x: &[f32], targets: &[(usize, u32, Objective)]) -> (f32, Vec<f32>) {
        let (d, vocab) = (self.cfg.d_model, self.cfg.vocab_size);
        let rows: Vec<f32> = targets
            .iter()
            .flat_map(|&(r, _, _)| x[r * d..(r + 1) * d].iter().copied())
            .collect();
        let n = targets.len();
        let scale = 1.0 / n as f32;
        let (logits, inv) = self.logits(&rows, n);
        let mut dlogits = vec![0.0f32; n * vocab];
        let mut loss = 0.0f32;
        for ((&(_, tok, objective), l), g) in targets
            .iter()
            .zip(logits.chunks_exact(vocab))
            .zip(dlogits.chunks_exact_mut(vocab))
        {
            let lp = log_softmax(l);
            let p_tok = lp[tok as usize].exp();
            // ∂loss/∂logit_j = coef·(p_j − [j = tok]) for both objectives: coef = 1 for the
            // likelihood, −p/(1 − p) for −log(1 − p).
            let coef = match objective {
                Objective::Likelihood => {
                    loss -= lp[tok as usize] * scale;
                    1.0
                }
                Objective::Unlikelihood => {
                    let rest = (1.0 - p_tok).max(1e-12);
                    loss -= rest.ln() * scale;
                    -p_tok / rest
                }
            };
            g.iter_mut()
                .zip(&lp)
                .for_each(|(g, l)| *g = coef * scale * l.exp());
            g[tok as usize] -= coef * scale;
            if let Some(cap) = self.cfg.final_softcap {
                for (g, l) in g.iter_mut().zip(l) {
                    let th = l / cap;
                    *g *= 1.0 - th * th;
                }
            }
        }
        let mut dnormed = vec![0.0f32; n * d];
        self.head.backward_into(&dlogits, n, &mut dnormed);
        let drows = rms_backward(&rows, &self.output_norm, &inv, &dnormed);
        let mut dx = vec![0.0f32; x.len()];
        for (&(r, _, _), g) in targets.iter().zip(drows.chunks_exact(d)) {
            dx[r * d..(r + 1) * d]
                .iter_mut()
                .zip(g)
                .for_each(|(a, b)| *a += b);
        }
        (loss, dx)
    }

    fn ffn_forward(
        &self,
        ffn: &DenseFfn,
        x: &mut [f32],
        t: usize,
        inject_rows: &[usize],
        delta: &[f32],
    ) -> FfnTape {
        let (d, eps) = (self.cfg.d_model, self.cfg.norm_eps);
        let (normed, inv) = norm_forward(x, ffn.norm.as_deref(), eps);
        let gate = ffn.gate.forward(&normed, t);
        let up = ffn.up.forward(&normed, t);
        let h: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| activation(self.cfg.activation, g).0 * u)
            .collect();
        let mut y = ffn.down.forward(&h, t);
        for &row in inject_rows {
            y[row * d..(row + 1) * d]
                .iter_mut()
                .zip(delta)
                .for_each(|(a, b)| *a += b);
        }
        let (out, post_inv) = norm_forward(&y, ffn.post_norm.as_deref(), eps);
        let tape = FfnTape {
            x: x.to_vec(),
            inv,
            gate,
            up,
            y,
            post_inv,
        };
        x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
        tape
    }

    /// Turns `dx` (the gradient at the block's output) into the gradient at its input.
    fn ffn_backward(&self, ffn: &DenseFfn, tape: &FfnTape, dx: &mut [f32], t: usize) {
        let dy = norm_backward(
            &tape.y,
            ffn.post_norm.as_deref(),
            &tape.post_inv,
            dx.to_vec(),
        );
        let ff = self.cfg.ff_dim;
        let mut dh = vec![0.0f32; t * ff];
        ffn.down.backward_into(&dy, t, &mut dh);
        let mut dgate = vec![0.0f32; t * ff];
        let mut dup = vec![0.0f32; t * ff];
        for i in 0..t * ff {
            let (a, da) = activation(self.cfg.activation, tape.gate[i]);
            dgate[i] = dh[i] * tape.up[i] * da;
            dup[i] = dh[i] * a;
        }
        let mut dnormed = vec![0.0f32; t * self.cfg.d_model];
        ffn.gate.backward_into(&dgate, t, &mut dnormed);
        ffn.up.backward_into(&dup, t, &mut dnormed);
        let dres = norm_backward(&tape.x, ffn.norm.as_deref(), &tape.inv, dnormed);
        dx.iter_mut().zip(dres).for_each(|(a, b)| *a += b);
    }

    /// Attention of the live rows of `layout`; keys and values of the other rows come from
    /// `frozen` (rows a live row sees are either live or frozen).
    fn attention_forward(
        &self,
        attn: &DenseAttention,
        x: &mut [f32],
        layout: &Layout,
        frozen: Option<&(Vec<f32>, Vec<f32>)>,
    ) -> AttnTape {
        let (t, rows) = (layout.live.len(), layout.pos.len());
        let cfg = &self.cfg;
        let (hd, eps) = (cfg.head_dim, cfg.norm_eps);
        let (nh, group) = (cfg.n_heads, cfg.n_heads / cfg.n_kv_heads);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let (normed, inv) = norm_forward(x, attn.norm.as_deref(), eps);
        let q = attn.wq.forward(&normed, t);
        let k = attn.wk.forward(&normed, t);
        let v_live = attn.wv.forward(&normed, t);
        let (mut q_rot, q_inv) = norm_forward(&q, attn.q_norm.as_deref(), eps);
        let (mut k_live, k_inv) = norm_forward(&k, attn.k_norm.as_deref(), eps);
        let rope = self.rope(attn);
        for (p, &row) in layout.live.iter().enumerate() {
            let pos = layout.pos[row];
            rope.rotate_heads(pos, &mut q_rot[p * q_dim..(p + 1) * q_dim], hd, false);
            rope.rotate_heads(pos, &mut k_live[p * kv_dim..(p + 1) * kv_dim], hd, false);
        }
        let (mut k_rot, mut v) = match frozen {
            Some((k, v)) => (k.clone(), v.clone()),
            None => (vec![0.0f32; rows * kv_dim], vec![0.0f32; rows * kv_dim]),
        };
        for (p, &row) in layout.live.iter().enumerate() {
            k_rot[row * kv_dim..(row + 1) * kv_dim]
                .copy_from_slice(&k_live[p * kv_dim..(p + 1) * kv_dim]);
            v[row * kv_dim..(row + 1) * kv_dim]
                .copy_from_slice(&v_live[p * kv_dim..(p + 1) * kv_dim]);
        }
        let mut probs = vec![0.0f32; nh * t * rows];
        let mut capped = vec![0.0f32; nh * t * rows];
        let mut o = vec![0.0f32; t * q_dim];
        for h in 0..nh {
            let g = h / group;
            for (i, &row) in layout.live.iter().enumerate() {
                let qi = &q_rot[i * q_dim + h * hd..][..hd];
                let first = layout.first_visible(attn, row, self.cfg.sliding_window);
                let base = (h * t + i) * rows;
                let mut max = f32::NEG_INFINITY;
                for j in first..=row {
                    let kj = &k_rot[j * kv_dim + g * hd..][..hd];
                    let mut s = cfg.attn_scale * dot(qi, kj);
                    if let Some(cap) = cfg.attn_softcap {
                        s = cap * (s / cap).tanh();
                    }
                    capped[base + j] = s;
                    max = max.max(s);
                }
                let mut sum = 0.0f32;
                for j in first..=row {
                    let e = (capped[base + j] - max).exp();
                    probs[base + j] = e;
                    sum += e;
                }
                let oi = &mut o[i * q_dim + h * hd..][..hd];
                for j in first..=row {
                    probs[base + j] /= sum;
                    let vj = &v[j * kv_dim + g * hd..][..hd];
                    oi.iter_mut()
                        .zip(vj)
                        .for_each(|(a, b)| *a += probs[base + j] * b);
                }
            }
        }
        let y = attn.wo.forward(&o, t);
        let (out, post_inv) = norm_forward(&y, attn.post_norm.as_deref(), eps);
        let tape = AttnTape {
            x: x.to_vec(),
            inv,
            q,
            q_inv,
            k,
            k_inv,
            q_rot,
            k_rot,
            v,
            probs,
            capped,
            y,
            post_inv,
        };
        x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
        tape
    }

    /// The backward pass of [`DenseTail::attention_forward`]: gradients reach the live rows
    /// only (frozen keys and values are constants).
    fn attention_backward(
        &self,
        attn: &DenseAttention,
        tape: &AttnTape,
        dx: &mut [f32],
        layout: &Layout,
    ) {
        let (t, rows) = (layout.live.len(), layout.pos.len());
        let cfg = &self.cfg;
        let (d, hd) = (cfg.d_model, cfg.head_dim);
        let (nh, group) = (cfg.n_heads, cfg.n_heads / cfg.n_kv_heads);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let dy = norm_backward(
            &tape.y,
            attn.post_norm.as_deref(),
            &tape.post_inv,
            dx.to_vec(),
        );
        let mut d_o = vec![0.0f32; t * q_dim];
        attn.wo.backward_into(&dy, t, &mut d_o);
        let mut dq_rot = vec![0.0f32; t * q_dim];
        let mut dk_all = vec![0.0f32; rows * kv_dim];
        let mut dv_all = vec![0.0f32; rows * kv_dim];
        let mut dp = vec![0.0f32; rows];
        for h in 0..nh {
            let g = h / group;
            for (i, &row) in layout.live.iter().enumerate() {
                let first = layout.first_visible(attn, row, self.cfg.sliding_window);
                let base = (h * t + i) * rows;
                let doi = &d_o[i * q_dim + h * hd..][..hd];
                let mut weighted = 0.0f32;
                for j in first..=row {
                    let vj = &tape.v[j * kv_dim + g * hd..][..hd];
                    dp[j] = dot(doi, vj);
                    weighted += tape.probs[base + j] * dp[j];
                    let p = tape.probs[base + j];
                    dv_all[j * kv_dim + g * hd..][..hd]
                        .iter_mut()
                        .zip(doi)
                        .for_each(|(a, b)| *a += p * b);
                }
                for j in first..=row {
                    let mut ds = tape.probs[base + j] * (dp[j] - weighted);
                    if let Some(cap) = cfg.attn_softcap {
                        let th = tape.capped[base + j] / cap;
                        ds *= 1.0 - th * th;
                    }
                    let ds = ds * cfg.attn_scale;
                    let qi = &tape.q_rot[i * q_dim + h * hd..][..hd];
                    let kj = &tape.k_rot[j * kv_dim + g * hd..][..hd];
                    dq_rot[i * q_dim + h * hd..][..hd]
                        .iter_mut()
                        .zip(kj)
                        .for_each(|(a, b)| *a += ds * b);
                    dk_all[j * kv_dim + g * hd..][..hd]
                        .iter_mut()
                        .zip(qi)
                        .for_each(|(a, b)| *a += ds * b);
                }
            }
        }
        let live_rows = |all: &[f32]| -> Vec<f32> {
            layout
                .live
                .iter()
                .flat_map(|&r| all[r * kv_dim..(r + 1) * kv_dim].iter().copied())
                .collect()
        };
        let (mut dk_rot, dv) = (live_rows(&dk_all), live_rows(&dv_all));
        let rope = self.rope(attn);
        for (p, &row) in layout.live.iter().enumerate() {
            let pos = layout.pos[row];
            rope.rotate_heads(pos, &mut dq_rot[p * q_dim..(p + 1) * q_dim], hd, true);
            rope.rotate_heads(pos, &mut dk_rot[p * kv_dim..(p + 1) * kv_dim], hd, true);
        }
        let dq = norm_backward(&tape.q, attn.q_norm.as_deref(), &tape.q_inv, dq_rot);
        let dk = norm_backward(&tape.k, attn.k_norm.as_deref(), &tape.k_inv, dk_rot);
        let mut dnormed = vec![0.0f32; t * d];
        attn.wq.backward_into(&dq, t, &mut dnormed);
        attn.wk.backward_into(&dk, t, &mut dnormed);
        attn.wv.backward_into(&dv, t, &mut dnormed);
        let dres = norm_backward(&tape.x, attn.norm.as_deref(), &tape.inv, dnormed);
        dx.iter_mut().zip(dres).for_each(|(a, b)| *a += b);
    }

    fn rope(&self, attn: &DenseAttention) -> &Rope {
        if attn.global {
            &self.rope_global
        } else {
            &self.rope_local
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `act(g)` and its derivative.
fn activation(act: Activation, g: f32) -> (f32, f32) {
    match act {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-g).exp());
            (g * s, s * (1.0 + g * (1.0 - s)))
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // √(2/π)
            let u = C * (g + 0.044_715 * g * g * g);
            let th = u.tanh();
            let du = C * (1.0 + 3.0 * 0.044_715 * g * g);
            (
                0.5 * g * (1.0 + th),
                0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * du,
            )
        }
    }
}

/// RMS norm of each `w.len()`-wide row of `x` into `out`; returns each row's `1/rms`.
fn rms_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Vec<f32> {
    let n = w.len();
    x.chunks_exact(n)
        .zip(out.chunks_exact_mut(n))
        .map(|(row, o)| {
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / n as f32 + eps).sqrt();
            o.iter_mut()
                .zip(row.iter().zip(w))
                .for_each(|(o, (v, w))| *o = v * inv * w);
            inv
        })
        .collect()
}

/// `x` through the RMSNorm of gains `w` (every row of `w.len()` values: one per head for a
/// per-head QK-norm), or unchanged when the block has no such norm; and each row's `1/rms`.
fn norm_forward(x: &[f32], w: Option<&[f32]>, eps: f32) -> (Vec<f32>, Vec<f32>) {
    match w {
        Some(w) => {
            let mut out = vec![0.0f32; x.len()];
            let inv = rms_forward(x, w, eps, &mut out);
            (out, inv)
        }
        None => (x.to_vec(), Vec::new()),
    }
}

/// The gradient at the input of [`norm_forward`] from `dy`, the gradient at its output.
fn norm_backward(x: &[f32], w: Option<&[f32]>, inv: &[f32], dy: Vec<f32>) -> Vec<f32> {
    match w {
        Some(w) => rms_backward(x, w, inv, &dy),
        None => dy,
    }
}

/// The gradient at the input of [`rms_forward`] from the gradient `dy` at its output:
/// `dx = inv·(w⊙dy) − x·inv³·⟨w⊙dy, x⟩/n`.
fn rms_backward(x: &[f32], w: &[f32], inv: &[f32], dy: &[f32]) -> Vec<f32> {
    let n = w.len();
    let mut dx = vec![0.0f32; x.len()];
    for (((row, d), out), &r) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
        .zip(inv)
    {
        let proj: f32 = row
            .iter()
            .zip(d.iter().zip(w))
            .map(|(x, (d, w))| x * d * w)
            .sum();
        let c = r * r * r * proj / n as f32;
        for ((o, x), (d, w)) in out.iter_mut().zip(row).zip(d.iter().zip(w)) {
            *o = r * w * d - x * c;
        }
    }
    dx
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
    let log_sum = max + sum.ln() as f32;
    logits.iter().map(|l| l - log_sum).collect()
}
