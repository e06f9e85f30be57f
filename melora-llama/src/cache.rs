//! The key/value cache: generation, and answer scoring's shared prefixes.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

/// Per layer, the keys and values of the positions seen so far,
/// `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<(Option<Tensor<B, 4>>, Option<Tensor<B, 4>>)>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self { layers: (0..layers).map(|_| (None, None)).collect(), len: 0 }
    }

    /// The number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A cache whose row `j` is row `rows[j]` of this one (the same
    /// positions): how the continuations of a question attend to its
    /// prefix. Gradients flow back to the selected rows.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let pick = |t: &Option<Tensor<B, 4>>| {
            t.as_ref().map(|t| {
                let device = t.device();
                let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                t.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(index, [rows.len()]), &device))
            })
        };
        Self { layers: self.layers.iter().map(|(k, v)| (pick(k), pick(v))).collect(), len: self.len }
    }

    pub(crate) fn layer(&mut self, i: usize) -> &mut (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}
