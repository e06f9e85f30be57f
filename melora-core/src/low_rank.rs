//! The part every adapter shares: the frozen base layer, LoRA's `A` and
//! `B`, the scale and the input dropout, built and checked in one place.
//! [`crate::LoraLinear`] is this part alone; [`crate::BlobLinear`] adds
//! `A`'s std, [`crate::MeLoraLinear`] the matrix `C` between `B` and `A`.
//!
//! PEFT's `tuners/lora/layer.py` is the reference: `A` Kaiming-uniform
//! (`U(-1/sqrt(n), 1/sqrt(n))`), `B = 0`, so the adapted layer equals the
//! base layer at initialisation; `A` is stored `[r, d_input]` and `B`
//! `[d_output, r]`, PEFT's layout.

use crate::adapter::{expect_shape, LowRankConfig};
use crate::noise::NoiseSource;
use crate::sampling::Sampler;
use burn::module::{Initializer, Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use melora_kernels::{flat_linear, linear_forward};

/// A frozen linear layer with LoRA's `A` and `B`.
#[derive(Module, Debug)]
pub struct LowRank<B: Backend> {
    /// The frozen base layer (Burn layout: weight `[d_input, d_output]`).
    pub base: Linear<B>,
    /// `A` (BLoB: the mean `M_A`), `[r, d_input]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B`, `[d_output, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scaling: f64,
    /// Input dropout probability.
    pub dropout: f64,
}

impl LowRankConfig {
    /// The shared part over `base` (frozen here), fresh: `A`
    /// Kaiming-uniform, drawn from `noise`, `B = 0`. Fails when the
    /// settings are invalid or the rank exceeds the layer's sizes.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<LowRank<B>> {
        let (d_input, d_output) = self.check_base(&base)?;
        let device = base.weight.device();
        let lora_a = kaiming_a::<B>(self.rank, d_input, noise, &device);
        let lora_b = Initializer::Zeros.init([d_output, self.rank], &device);
        Ok(self.assemble(base, lora_a, lora_b))
    }

    /// The shared part from existing tensors (a PEFT checkpoint): `a`
    /// `[r, d_input]`, `b` `[d_output, r]`; their shapes are checked.
    pub fn init_with<B: Backend>(
        &self,
        base: Linear<B>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
    ) -> crate::Result<LowRank<B>> {
        let (d_input, d_output) = self.check_base(&base)?;
        expect_shape("lora_A", &a.dims(), &[self.rank, d_input])?;
        expect_shape("lora_B", &b.dims(), &[d_output, self.rank])?;
        Ok(self.assemble(base, Param::from_tensor(a), Param::from_tensor(b)))
    }

    /// The settings checked against `base`; its `(d_input, d_output)`.
    pub(crate) fn check_base<B: Backend>(&self, base: &Linear<B>) -> crate::Result<(usize, usize)> {
        let [d_input, d_output] = base.weight.shape().dims();
        self.validate_for(d_input, d_output)?;
        Ok((d_input, d_output))
    }

    fn assemble<B: Backend>(
        &self,
        base: Linear<B>,
        lora_a: Param<Tensor<B, 2>>,
        lora_b: Param<Tensor<B, 2>>,
    ) -> LowRank<B> {
        LowRank {
            base: base.no_grad(),
            lora_a,
            lora_b,
            scaling: self.scaling(),
            dropout: self.dropout,
        }
    }
}

impl<B: Backend> LowRank<B> {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// The base layer's output, `[batch, seq, d_output]`.
    pub fn base_forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        linear_forward(&self.base, x)
    }

    /// `x` after the input dropout the sampler applies.
    pub fn dropped(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        sampler.dropout(x, self.dropout)
    }

    /// `x A^T` with `A`'s mean, `[batch, seq, r]`.
    pub fn project(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        flat_linear(x, self.lora_a.val().transpose(), None)
    }

    /// `code B^T`, the update of a rank-`r` code, `[batch, seq, d_output]`.
    pub fn up(&self, code: Tensor<B, 3>) -> Tensor<B, 3> {
        flat_linear(code, self.lora_b.val().transpose(), None)
    }

    /// `base(x) + code B^T` for a rank-`r` code (the update first).
    pub fn output(&self, x: Tensor<B, 3>, code: Tensor<B, 3>) -> Tensor<B, 3> {
        let update = self.up(code);
        self.base_forward(x).add(update)
    }

    /// `scaling * B X A` for the `r x r` matrix `X` between them (`None`:
    /// the identity), `[d_output, d_input]`.
    pub fn delta_weight(&self, middle: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let b = self.lora_b.val();
        let b = match middle {
            Some(m) => b.matmul(m),
            None => b,
        };
        b.matmul(self.lora_a.val()).mul_scalar(self.scaling)
    }
}

/// PEFT's initialisation of `A`: Kaiming-uniform with a = sqrt(5), which is
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
pub(crate) fn kaiming_a<B: Backend>(
    r: usize,
    d_input: usize,
    noise: &mut NoiseSource,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    let bound = 1.0 / (d_input as f64).sqrt();
    Param::from_tensor(noise.uniform([r, d_input], -bound, bound, device))
}
