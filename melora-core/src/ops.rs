//! Tensor helpers shared by the adapters and the model.

use burn::nn::Linear;
use burn::tensor::module::linear;
use burn::tensor::{backend::Backend, Tensor};

/// `x W (+ b)` for `x` `[batch, seq, d_in]` and `W` `[d_in, d_out]`, computed
/// as one `[batch * seq, d_in] x [d_in, d_out]` product.
///
/// Burn's `linear` broadcasts `W` over the batch and multiplies each
/// sequence separately; on ndarray that packs `W` (and, in the backward
/// pass, `W^T`) once per sequence and runs `batch` small GEMMs. One tall
/// product packs it once and keeps the GEMM kernel busy (a training step of
/// SmolLM2 spends most of its time here). The result is the same up to
/// summation order.
pub fn flat_linear<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 3> {
    let [batch, seq, d_in] = x.dims();
    let out = linear(x.reshape([batch * seq, d_in]), weight, bias);
    let d_out = out.dims()[1];
    out.reshape([batch, seq, d_out])
}

/// [`flat_linear`] through a [`Linear`] module (what `layer.forward(x)` does).
pub fn linear_forward<B: Backend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    flat_linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::TestBackend;
    use crate::NoiseSource;
    use burn::nn::LinearConfig;

    #[test]
    fn flat_linear_equals_the_module_forward() {
        let device = Default::default();
        let layer = LinearConfig::new(6, 5).init::<TestBackend>(&device);
        let x = NoiseSource::seeded(1).normal::<TestBackend, 3>([3, 4, 6], &device);
        let ours: Vec<f64> = linear_forward(&layer, x.clone()).into_data().to_vec().unwrap();
        let burn: Vec<f64> = layer.forward(x).into_data().to_vec().unwrap();
        assert_eq!(ours.len(), 3 * 4 * 5);
        for (a, b) in ours.iter().zip(&burn) {
            assert!((a - b).abs() < 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
