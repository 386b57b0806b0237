//! The CPU backend: the forward pass's operations on host memory, with the kernels of
//! `quarry-kernels`.
//!
//! Its policies live here, behind the operations: products read the matrices' repacked
//! panels; the activations of one tensor are quantized once for every product that reads
//! them (Q, K and V; gate and up) in one dispatch of the pool; decode rows are multiplied in
//! 8 bits and each later sequence's rows apart ([`RowPlan`]), so a row's result does not
//! depend on the batch it came in; and the KV cache is any [`KvCache`].

use std::marker::PhantomData;
use std::ops::Range;

use quarry_kernels::{matmul_quantized_many, Matrix, QuantizedActivations};

use crate::attention::{attend, AttentionSpec, SequenceAttention};
use crate::backend::Backend;
use crate::config::Activation;
use crate::forward::{Layer, RowPlan, SequenceRows};
use crate::kv_cache::KvCache;
use crate::ops::{gated_activation, rms_norm, rotate_each, softcap, RopeTable};
use crate::ModelError;

/// A layer as the CPU keeps it: matrices over the file (and their repacked copies), norms
/// and biases in `f32`.
pub(crate) type CpuLayer = Layer<Matrix<'static>, Vec<f32>>;

/// The CPU backend over KV caches of type `C`.
pub(crate) struct Cpu<C>(PhantomData<fn(&mut C)>);

impl<C> Cpu<C> {
    pub(crate) fn new() -> Self {
        Cpu(PhantomData)
    }
}

/// Activations on the host, with how their rows are multiplied.
pub(crate) struct CpuTensor {
    values: Vec<f32>,
    cols: usize,
    plan: RowPlan,
}

impl CpuTensor {
    /// The rows for a product: decode rows in 8 bits, each later sequence's rows apart.
    fn activations(&self) -> QuantizedActivations<'_> {
        QuantizedActivations::new(&self.values, self.plan.rows, self.cols)
            .with_integer_tokens(self.plan.decode)
            .with_segments(self.plan.segments.clone())
    }
}

impl<C: KvCache + Sync> Backend for Cpu<C> {
    type Tensor = CpuTensor;
    type Matrix = Matrix<'static>;
    type Vector = Vec<f32>;
    type Kv = C;
    type Rotation<'r> = Vec<RopeTable<'r>>;

    fn describe(&self) -> String {
        "cpu".to_owned()
    }

    fn tensor(&self, plan: &RowPlan, cols: usize, values: &[f32]) -> Result<CpuTensor, ModelError> {
        let values = match values.is_empty() {
            true => vec![0.0; plan.rows * cols],
            false => values.to_vec(),
        };
        assert_eq!(values.len(), plan.rows * cols, "a tensor's values");
        Ok(CpuTensor {
            values,
            cols,
            plan: plan.clone(),
        })
    }

    fn copy(&self, x: &CpuTensor, out: &mut CpuTensor) -> Result<(), ModelError> {
        out.values.copy_from_slice(&x.values);
        Ok(())
    }

    fn rms_norm(&self, x: &mut CpuTensor, gain: &Vec<f32>, eps: f32) -> Result<(), ModelError> {
        rms_norm(&mut x.values, gain, eps);
        Ok(())
    }

    fn matmul_many(
        &self,
        products: &mut [(&Matrix<'static>, &mut CpuTensor)],
        x: &CpuTensor,
    ) -> Result<(), ModelError> {
        let mut outs: Vec<(&Matrix<'_>, &mut [f32])> = products
            .iter_mut()
            .map(|(w, out)| (*w, out.values.as_mut_slice()))
            .collect();
        matmul_quantized_many(&mut outs, &x.activations());
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuTensor, bias: &Vec<f32>) -> Result<(), ModelError> {
        for row in x.values.chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        Ok(())
    }

    fn rotation<'r>(&self, tables: Vec<RopeTable<'r>>) -> Result<Vec<RopeTable<'r>>, ModelError> {
        Ok(tables)
    }

    /// Both tensors' rows of every sequence in one dispatch of the pool: a decode batch has
    /// one row per sequence, far too little work to split each apart.
    fn rope(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        rotation: &Vec<RopeTable<'_>>,
        head_dim: usize,
    ) -> Result<(), ModelError> {
        let mut parts = Vec::with_capacity(2 * rotation.len());
        let (q_dim, kv_dim) = (q.cols, k.cols);
        let (mut q_rest, mut k_rest) = (q.values.as_mut_slice(), k.values.as_mut_slice());
        for table in rotation {
            let (q, q_tail) = q_rest.split_at_mut(table.positions() * q_dim);
            let (k, k_tail) = k_rest.split_at_mut(table.positions() * kv_dim);
            parts.extend([(table, q), (table, k)]);
            (q_rest, k_rest) = (q_tail, k_tail);
        }
        rotate_each(&mut parts, head_dim);
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut [&mut C],
        spans: &[SequenceRows],
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
    ) -> Result<(), ModelError> {
        let kv_dim = k.cols;
        for (cache, span) in kv.iter_mut().zip(spans) {
            let rows = span.rows.start * kv_dim..span.rows.end * kv_dim;
            cache.write(layer, &k.values[rows.clone()], &v.values[rows]);
        }
        Ok(())
    }

    fn attend(
        &self,
        spec: &AttentionSpec,
        kv: &[&mut C],
        spans: &[SequenceRows],
        layer: usize,
        q: &CpuTensor,
        out: &mut CpuTensor,
    ) -> Result<(), ModelError> {
        let sequences: Vec<_> = kv
            .iter()
            .zip(spans)
            .map(|(cache, span)| SequenceAttention {
                cache: &**cache,
                start: span.start,
                rows: span.rows.clone(),
            })
            .collect();
        attend(spec, layer, &sequences, &q.values, &mut out.values);
        Ok(())
    }

    fn gated_activation(
        &self,
        gate: &mut CpuTensor,
        up: &CpuTensor,
        act: Activation,
    ) -> Result<(), ModelError> {
        gated_activation(&mut gate.values, &up.values, act);
        Ok(())
    }

    fn softcap(&self, x: &mut CpuTensor, cap: f32) -> Result<(), ModelError> {
        softcap(&mut x.values, cap);
        Ok(())
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<(), ModelError> {
        x.values
            .iter_mut()
            .zip(&y.values)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn read(&self, x: &CpuTensor, rows: Range<usize>) -> Result<Vec<f32>, ModelError> {
        Ok(x.values[rows.start * x.cols..rows.end * x.cols].to_vec())
    }

    fn host<'t>(&self, x: &'t CpuTensor) -> Option<&'t [f32]> {
        Some(&x.values)
    }

    fn host_mut<'t>(&self, x: &'t mut CpuTensor) -> Option<&'t mut [f32]> {
        Some(&mut x.values)
    }
}
