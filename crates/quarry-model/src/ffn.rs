//! A layer's FFN read as features, for the tools that treat the model as data (the vindex,
//! TRACE, DESCRIBE).
//!
//! A dense gated FFN computes `down · (act(gate · x) ⊙ (up · x))`: hidden unit `f` is a
//! feature that reads `x` through row `f` of `gate` and `up` and writes column `f` of `down`.
//! A mixture of experts is the same thing with more features: every expert's hidden units,
//! then the shared expert's, numbered one block after another. What the router adds is a
//! weight per block for each input — the routing weight of a chosen expert, zero for one not
//! chosen, the sigmoid gate of the shared expert — by which that block's activations are
//! multiplied. With that weight folded into the activations, the FFN's output is
//! `Σ_f a_f · down_f` whether or not the layer has experts, which is why one view serves both:
//! [`FfnFeatures::write`] and [`FfnFeatures::read_back`] are that sum and its transpose, and
//! [`Router::route`] is the routing the forward pass itself runs.

use quarry_kernels::vec::dot;
use quarry_kernels::WeightView;

use crate::config::Experts;
use crate::ops::softmax;

/// The features of one layer's FFN ([`crate::Model::ffn_features`]).
#[derive(Clone, Debug)]
pub struct FfnFeatures<'m, 'a> {
    /// The pre-FFN norm's gains (none: the FFN reads the residual itself, as in OLMo 2).
    pub norm: Option<&'m [f32]>,
    /// The post-FFN norm's gains, where the family has one (Gemma, OLMo 2).
    pub post_norm: Option<&'m [f32]>,
    /// One block for a dense FFN; for a mixture of experts one per expert, then the shared
    /// expert where there is one.
    pub blocks: Vec<FeatureBlock<'a>>,
    /// The router of a mixture of experts.
    pub router: Option<Router<'m>>,
}

/// One gated FFN among a layer's features: `width` hidden units.
#[derive(Clone, Copy, Debug)]
pub struct FeatureBlock<'a> {
    pub gate: WeightView<'a>,
    pub up: WeightView<'a>,
    pub down: WeightView<'a>,
}

impl FeatureBlock<'_> {
    pub fn width(&self) -> usize {
        self.gate.rows()
    }
}

/// What a feature number names inside a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureOwner {
    /// Hidden unit `neuron` of the layer's only FFN.
    Dense { neuron: usize },
    /// Hidden unit `neuron` of expert `expert`.
    Expert { expert: usize, neuron: usize },
    /// Hidden unit `neuron` of the shared expert.
    Shared { neuron: usize },
}

impl FeatureOwner {
    /// Feature `feature` of a layer whose blocks are `widths` wide, `experts` of them routed
    /// (0 for a dense layer); `None` past the last block.
    pub fn of(feature: usize, widths: &[usize], experts: usize) -> Option<FeatureOwner> {
        let mut start = 0;
        for (block, &width) in widths.iter().enumerate() {
            if feature < start + width {
                let neuron = feature - start;
                return Some(match (experts, block < experts) {
                    (0, _) => FeatureOwner::Dense { neuron },
                    (_, true) => FeatureOwner::Expert {
                        expert: block,
                        neuron,
                    },
                    (_, false) => FeatureOwner::Shared { neuron },
                });
            }
            start += width;
        }
        None
    }
}

impl FfnFeatures<'_, '_> {
    /// Features in the layer: the sum of the blocks' widths.
    pub fn width(&self) -> usize {
        self.blocks.iter().map(FeatureBlock::width).sum()
    }

    pub fn d_model(&self) -> usize {
        self.blocks[0].gate.cols()
    }

    /// What feature `feature` is (`None`: not one of the layer's).
    pub fn owner(&self, feature: usize) -> Option<FeatureOwner> {
        let widths: Vec<usize> = self.blocks.iter().map(FeatureBlock::width).collect();
        FeatureOwner::of(feature, &widths, self.router.map_or(0, |r| r.count()))
    }

    /// Each block's weight for the normalised input `x`: 1 for a dense FFN; for a mixture of
    /// experts the routing weight of each expert (0 where not chosen), then the shared
    /// expert's gate.
    pub fn block_weights(&self, x: &[f32]) -> Vec<f32> {
        match &self.router {
            None => vec![1.0; self.blocks.len()],
            Some(router) => router.block_weights(x, self.blocks.len()),
        }
    }

    /// `Σ_f a_f · down_f`: the FFN output of activations `a` (one per feature, any routing
    /// weights already in them), before the post-FFN norm.
    pub fn write(&self, a: &[f32]) -> Vec<f32> {
        let d = self.d_model();
        let mut y = vec![0.0f32; d];
        let mut part = vec![0.0f32; d];
        for (block, a) in self.blocks.iter().zip(split(a, &self.blocks)) {
            if a.iter().all(|&v| v == 0.0) {
                continue;
            }
            quarry_kernels::matmul(&block.down, a, 1, &mut part);
            y.iter_mut().zip(&part).for_each(|(y, p)| *y += p);
        }
        y
    }

    /// `down_f · k` for every feature and every `k` of `ks`, in `f64`: what one unit of each
    /// feature adds along `k` (the transpose of [`FfnFeatures::write`]). The down matrices are
    /// decoded once for all of `ks`.
    pub fn read_back(&self, ks: &[&[f64]]) -> Vec<Vec<f64>> {
        let mut out = vec![Vec::with_capacity(self.width()); ks.len()];
        for block in &self.blocks {
            let mut acc = vec![vec![0.0f64; block.width()]; ks.len()];
            let mut row = vec![0.0f32; block.width()];
            for j in 0..self.d_model() {
                block.down.dequantize_row(j, &mut row);
                for (acc, k) in acc.iter_mut().zip(ks) {
                    acc.iter_mut()
                        .zip(&row)
                        .for_each(|(a, &w)| *a += k[j] * w as f64);
                }
            }
            for (out, acc) in out.iter_mut().zip(acc) {
                out.extend(acc);
            }
        }
        out
    }
}

/// `a` cut into the blocks' shares.
fn split<'v>(a: &'v [f32], blocks: &[FeatureBlock<'_>]) -> Vec<&'v [f32]> {
    let mut rest = a;
    blocks
        .iter()
        .map(|b| {
            let (head, tail) = rest.split_at(b.width());
            rest = tail;
            head
        })
        .collect()
}

/// A mixture of experts' router: the softmax of `weights · x` picks each token's top `used`
/// experts (renormalised when `normalize`, times `scale`); a shared expert's output is
/// scaled by the sigmoid of `shared_gate · x`.
#[derive(Clone, Copy, Debug)]
pub struct Router<'m> {
    /// `experts × d_model`, in `f32`: routing is decided from exact scores, row by row, so a
    /// token picks the same experts whatever else is in the batch.
    pub weights: &'m [f32],
    pub experts: usize,
    pub shared_gate: Option<&'m [f32]>,
    pub used: usize,
    pub normalize: bool,
    pub scale: f32,
}

impl<'m> Router<'m> {
    /// The router of `spec` over `weights` (`spec.count` rows).
    pub fn new(spec: &Experts, weights: &'m [f32], shared_gate: Option<&'m [f32]>) -> Router<'m> {
        Router {
            weights,
            experts: spec.count,
            shared_gate,
            used: spec.used,
            normalize: spec.normalize,
            scale: spec.scale,
        }
    }

    pub fn count(&self) -> usize {
        self.experts
    }

    /// The experts the normalised row `x` goes to and their weights: the `used` largest of
    /// the softmax of the router's scores (ties to the lower index), renormalised to sum to 1
    /// when `normalize`, times `scale`.
    pub fn route(&self, x: &[f32]) -> Vec<(usize, f32)> {
        let d = x.len();
        let scores: Vec<f32> = self.weights.chunks_exact(d).map(|r| dot(r, x)).collect();
        let p = softmax(&scores);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        order.truncate(self.used);
        let total = if self.normalize {
            order.iter().map(|&e| p[e]).sum()
        } else {
            1.0
        };
        order
            .into_iter()
            .map(|e| (e, (p[e] / total) as f32 * self.scale))
            .collect()
    }

    /// The shared expert's weight for `x`: the sigmoid of its gate, 1 without a gate.
    pub fn shared_weight(&self, x: &[f32]) -> f32 {
        self.shared_gate
            .map_or(1.0, |w| 1.0 / (1.0 + (-dot(w, x)).exp()))
    }

    /// The weight of each of `blocks` blocks (the experts, then a shared expert) for `x`.
    pub fn block_weights(&self, x: &[f32], blocks: usize) -> Vec<f32> {
        let mut w = vec![0.0f32; blocks];
        for (expert, weight) in self.route(x) {
            w[expert] = weight;
        }
        if blocks > self.experts {
            w[self.experts] = self.shared_weight(x);
        }
        w
    }
}
