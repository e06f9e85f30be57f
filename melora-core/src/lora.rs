//! LoRA (Hu et al. 2021): `y = W0 x + (alpha / r) B A dropout(x)`, the
//! shared low-rank part ([`LowRank`]) alone.
//!
//! Follows PEFT's `tuners/lora/layer.py` (see [`crate::low_rank`]).
//!
//! Tests: `melora-core/tests/adapters.rs` (the base layer at
//! initialisation, the merged layer, gradients, any-rank input) and
//! `melora-llama/tests/peft.rs` (PEFT's files and outputs, from the
//! transformers + PEFT fixtures).

use crate::adapter::{Adapter, LowRankConfig, NamedParam, ParamRole};
use crate::low_rank::LowRank;
use crate::noise::NoiseSource;
use crate::sampling::{LoraTap, Sampler};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

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
    /// The base layer, `A`, `B`, the scale and the dropout.
    pub low_rank: LowRank<B>,
}

/// LoRA's tensors, in [`Adapter::named_params`] order: `A`, `B`.
pub const LORA_PARAMS: [&str; 2] = ["lora_A", "lora_B"];

impl LoraLinearConfig {
    /// Checks every field; the error names the field and the value.
    pub fn validate(&self) -> crate::Result<()> {
        self.low_rank.validate()
    }

    /// Wraps `base` (frozen here) with a fresh adapter: `A` Kaiming-uniform
    /// (drawn from `noise`), `B = 0`.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<LoraLinear<B>> {
        Ok(LoraLinear {
            low_rank: self.low_rank.init(base, noise)?,
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
        Ok(LoraLinear {
            low_rank: self.low_rank.init_with(base, a, b)?,
        })
    }
}

impl<B: Backend> Adapter<B> for LoraLinear<B> {
    fn forward_seq(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let low_rank = &self.low_rank;
        let dropped = low_rank.dropped(x.clone(), sampler);
        // The scale applied to the rank-r intermediate (a few hundred times
        // smaller than the output; exact either way for alpha / r = 2).
        let u = low_rank.project(dropped.clone()).mul_scalar(low_rank.scaling);
        let out = low_rank.base_forward(x).add(low_rank.up(u));
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
        let low_rank = &self.low_rank;
        low_rank
            .project(low_rank.dropped(x, sampler))
            .mul_scalar(low_rank.scaling)
    }

    fn lora_b(&self) -> Tensor<B, 2> {
        self.low_rank.lora_b.val()
    }

    fn kl(&self, _prior_std: f64) -> Tensor<B, 1> {
        Tensor::zeros([1], &self.low_rank.lora_a.device())
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.low_rank.delta_weight(None)
    }

    fn base(&self) -> &Linear<B> {
        &self.low_rank.base
    }

    fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        use ParamRole::Mean;
        let [a, b] = LORA_PARAMS;
        vec![
            NamedParam {
                name: a,
                role: Mean,
                param: &self.low_rank.lora_a,
            },
            NamedParam {
                name: b,
                role: Mean,
                param: &self.low_rank.lora_b,
            },
        ]
    }

    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let [a, b] = LORA_PARAMS;
        vec![(a, &mut self.low_rank.lora_a), (b, &mut self.low_rank.lora_b)]
    }
}
