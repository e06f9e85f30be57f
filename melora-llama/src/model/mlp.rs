//! The SwiGLU MLP.

use super::Proj;
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use melora_core::Sampler;
use melora_kernels::silu;

/// The SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection.
    pub gate_proj: Proj<B>,
    /// Up projection.
    pub up_proj: Proj<B>,
    /// Down projection.
    pub down_proj: Proj<B>,
}

impl<B: Backend> Mlp<B> {
    pub(super) fn forward(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let gate = silu(self.gate_proj.forward(x.clone(), sampler));
        self.down_proj
            .forward(gate.mul(self.up_proj.forward(x, sampler)), sampler)
    }
}
