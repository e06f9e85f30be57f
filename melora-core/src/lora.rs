//! LoRA (Hu et al. 2021): `y = W0 x + (alpha / r) B A dropout(x)`.
//!
//! Follows PEFT's `tuners/lora/layer.py`: the adapter wraps the frozen base
//! layer, `A` is Kaiming-uniform (a = sqrt(5), i.e. `U(-1/sqrt(n), 1/sqrt(n))`),
//! `B` is zero so the adapted layer equals the base layer at initialisation.
//! `A` is stored `[r, d_input]` and `B` `[d_output, r]`, PEFT's layout.

use crate::adapter::{expect_shape, freeze, linear_dims, Adapter, LowRankConfig, NamedParam, ParamRole};

use crate::noise::NoiseSource;
use crate::sampling::{LoraTap, Sampler};
use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use melora_kernels::{flat_linear, linear_forward};

/// Configuration of a [`LoraLinear`].
#[derive(Config, Debug)]
pub struct LoraLinearConfig {
    /// Rank, scaling and dropout.
    #[config(default = "LowRankConfig::new()")]
    pub low_rank: LowRankConfig,
}

/// A frozen linear layer plus a trainable low-rank update `B A`.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The frozen base layer (Burn layout: weight `[d_input, d_output]`).
    pub base: Linear<B>,
    /// `A`, `[r, d_input]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `B`, `[d_output, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scaling: f64,
    /// Input dropout probability.
    pub dropout: f64,
}

/// LoRA's tensors, in [`Adapter::named_params`] order: `A`, `B`.
pub const LORA_PARAMS: [&str; 2] = ["lora_A", "lora_B"];

impl LoraLinearConfig {
    /// Wraps `base` (frozen here) with a fresh adapter: `A` Kaiming-uniform
    /// (drawn from `noise`), `B = 0`.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<LoraLinear<B>> {
        let (d_input, d_output) = linear_dims(&base);
        self.low_rank.validate_for(d_input, d_output)?;
        let device = base.weight.device();
        let r = self.low_rank.rank;
        let lora_a = kaiming_a::<B>(r, d_input, noise, &device);
        let lora_b = Initializer::Zeros.init([d_output, r], &device);
        Ok(LoraLinear {
            base: freeze(base),
            lora_a,
            lora_b,
            scaling: self.low_rank.scaling(),
            dropout: self.low_rank.dropout,
        })
    }

    /// Builds the adapter from existing tensors (e.g. a PEFT checkpoint):
    /// `a` is `[r, d_input]`, `b` is `[d_output, r]`.
    pub fn init_with<B: Backend>(
        &self,
        base: Linear<B>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
    ) -> crate::Result<LoraLinear<B>> {
        let (d_input, d_output) = linear_dims(&base);
        self.low_rank.validate_for(d_input, d_output)?;
        let r = self.low_rank.rank;
        expect_shape("lora_A", &a.dims(), &[r, d_input])?;
        expect_shape("lora_B", &b.dims(), &[d_output, r])?;
        Ok(LoraLinear {
            base: freeze(base),
            lora_a: Param::from_tensor(a),
            lora_b: Param::from_tensor(b),
            scaling: self.low_rank.scaling(),
            dropout: self.low_rank.dropout,
        })
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

impl<B: Backend> Adapter<B> for LoraLinear<B> {
    fn forward(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let dropped = sampler.dropout(x.clone(), self.dropout);
        // The scale applied to the rank-r intermediate (a few hundred times
        // smaller than the output; exact either way for alpha / r = 2).
        let u = flat_linear(dropped.clone(), self.lora_a.val().transpose(), None).mul_scalar(self.scaling);
        let out = linear_forward(&self.base, x).add(flat_linear(u, self.lora_b.val().transpose(), None));
        match sampler.taps.as_deref_mut() {
            Some(taps) => {
                let probe = Tensor::zeros(out.dims(), &out.device()).require_grad();
                taps.records.push(Box::new(LoraTap {
                    input: dropped.detach(),
                    probe: probe.clone(),
                }));
                out.add(probe)
            }
            None => out,
        }
    }

    fn code(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        flat_linear(sampler.dropout(x, self.dropout), self.lora_a.val().transpose(), None).mul_scalar(self.scaling)
    }

    fn lora_b(&self) -> Tensor<B, 2> {
        self.lora_b.val()
    }

    fn kl(&self, _prior_std: f64) -> Tensor<B, 1> {
        Tensor::zeros([1], &self.lora_a.device())
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b.val().matmul(self.lora_a.val()).mul_scalar(self.scaling)
    }

    fn base(&self) -> &Linear<B> {
        &self.base
    }

    fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        use ParamRole::Mean;
        let [a, b] = LORA_PARAMS;
        vec![
            NamedParam {
                name: a,
                role: Mean,
                param: &self.lora_a,
            },
            NamedParam {
                name: b,
                role: Mean,
                param: &self.lora_b,
            },
        ]
    }

    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let [a, b] = LORA_PARAMS;
        vec![(a, &mut self.lora_a), (b, &mut self.lora_b)]
    }
}
