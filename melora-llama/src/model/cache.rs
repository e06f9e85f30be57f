//! The key/value cache of generation.

use burn::tensor::{backend::Backend, Tensor};

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
        Self {
            layers: (0..layers).map(|_| (None, None)).collect(),
            len: 0,
        }
    }

    /// The number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layer(&mut self, i: usize) -> &mut (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}
