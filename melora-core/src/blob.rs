//! BLoB (Wang et al. 2024): LoRA whose `A` is Gaussian,
//! `A ~ N(M_A, Omega_A^2)`, `Omega_A = G_A^2` (or softplus), `B` deterministic.
//!
//! Initialisation follows BLoB's code: `M_A` Kaiming-uniform as LoRA's `A`,
//! `B = 0`, `G_A ~ U(eps / sqrt(2), eps)` with `eps = 0.05`, so the initial
//! std lies in `[eps^2 / 2, eps^2] = [0.00125, 0.0025]`.

use crate::adapter::{expect_shape, freeze, linear_dims, Adapter, LowRankConfig, NamedParam, ParamRole, StdParam};
use crate::error::check;
use crate::kl::blob_kl;
use crate::lora::kaiming_a;
use crate::noise::NoiseSource;
use crate::sampling::{Sampler, SamplingMode};
use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use melora_kernels::{flat_linear, linear_forward};

/// Configuration of a [`BlobLinear`].
#[derive(Config, Debug)]
pub struct BlobLinearConfig {
    /// Rank, scaling and dropout.
    #[config(default = "LowRankConfig::new()")]
    pub low_rank: LowRankConfig,
    /// `eps` of the std initialisation: `G_A ~ U(eps / sqrt(2), eps)` for
    /// `Square` (the std then lies in `[eps^2/2, eps^2]`).
    #[config(default = 0.05)]
    pub init_eps: f64,
    /// How `Omega_A` is obtained from `G_A`.
    #[config(default = "StdParam::Square")]
    pub std_param: StdParam,
}

/// A frozen linear layer plus BLoB's Bayesian low-rank update `B A`.
#[derive(Module, Debug)]
pub struct BlobLinear<B: Backend> {
    /// The frozen base layer.
    pub base: Linear<B>,
    /// `M_A`, the mean of `A`, `[r, d_input]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `G_A`, the std parameter of `A`, `[r, d_input]`.
    pub lora_a_std: Param<Tensor<B, 2>>,
    /// `B`, `[d_output, r]`.
    pub lora_b: Param<Tensor<B, 2>>,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scaling: f64,
    /// Input dropout probability.
    pub dropout: f64,
    /// How the std is obtained from `G_A`.
    #[module(skip)]
    pub std_param: StdParam,
}

impl BlobLinearConfig {
    /// Checks every field.
    pub fn validate(&self) -> crate::Result<()> {
        self.low_rank.validate()?;
        check(
            self.init_eps > 0.0 && self.init_eps <= 1.0,
            "init_eps",
            self.init_eps,
            "must be in (0, 1]",
        )
    }

    /// Wraps `base` (frozen here) with a fresh adapter, drawn from `noise`.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<BlobLinear<B>> {
        self.validate()?;
        let (d_input, d_output) = linear_dims(&base);
        self.low_rank.validate_for(d_input, d_output)?;
        let device = base.weight.device();
        let r = self.low_rank.rank;
        let lora_a = kaiming_a::<B>(r, d_input, noise, &device);
        let lora_b = Initializer::Zeros.init([d_output, r], &device);
        let eps = self.init_eps;
        let g = Param::from_tensor(noise.uniform([r, d_input], eps / 2f64.sqrt(), eps, &device));
        // The std a `Square` parameter g would give; other parameterisations
        // are set to the same initial std.
        let g = match self.std_param {
            StdParam::Square => g,
            other => g.map(|g| other.inverse(StdParam::Square.std(g))),
        };
        Ok(BlobLinear {
            base: freeze(base),
            lora_a,
            lora_a_std: g,
            lora_b,
            scaling: self.low_rank.scaling(),
            dropout: self.low_rank.dropout,
            std_param: self.std_param,
        })
    }

    /// Builds the adapter from existing tensors: `a` and `a_std` (the raw
    /// parameter `G_A`) `[r, d_input]`, `b` `[d_output, r]`.
    pub fn init_with<B: Backend>(
        &self,
        base: Linear<B>,
        a: Tensor<B, 2>,
        a_std: Tensor<B, 2>,
        b: Tensor<B, 2>,
    ) -> crate::Result<BlobLinear<B>> {
        self.validate()?;
        let (d_input, d_output) = linear_dims(&base);
        self.low_rank.validate_for(d_input, d_output)?;
        let r = self.low_rank.rank;
        expect_shape("lora_A", &a.dims(), &[r, d_input])?;
        expect_shape("lora_A_std", &a_std.dims(), &[r, d_input])?;
        expect_shape("lora_B", &b.dims(), &[d_output, r])?;
        Ok(BlobLinear {
            base: freeze(base),
            lora_a: Param::from_tensor(a),
            lora_a_std: Param::from_tensor(a_std),
            lora_b: Param::from_tensor(b),
            scaling: self.low_rank.scaling(),
            dropout: self.low_rank.dropout,
            std_param: self.std_param,
        })
    }
}

impl<B: Backend> BlobLinear<B> {
    /// `Omega_A`, the std of `A`.
    pub fn omega(&self) -> Tensor<B, 2> {
        self.std_param.std(self.lora_a_std.val())
    }

    /// `u = A x` for the sampling mode; `[batch, seq, r]`.
    fn project(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let mean = self.lora_a.val();
        let [r, n] = mean.dims();
        let [batch, seq, _] = x.dims();
        let device = x.device();
        match sampler.mode {
            SamplingMode::Mean => flat_linear(x, mean.transpose(), None),
            SamplingMode::PerBatch => {
                let a = mean.add(
                    self.omega()
                        .mul(sampler.batch_normals::<B, 2>(self.lora_a.id, [r, n], &device)),
                );
                flat_linear(x, a.transpose(), None)
            }
            SamplingMode::PerExample => {
                let eps = sampler.example_normals::<B, 3>(self.lora_a.id, [batch, r, n], &device);
                let a = mean.unsqueeze::<3>().add(self.omega().unsqueeze::<3>().mul(eps));
                melora_kernels::matmul(x, a.swap_dims(1, 2))
            }
            SamplingMode::Flipout => {
                let delta = self
                    .omega()
                    .mul(sampler.batch_normals::<B, 2>(self.lora_a.id, [r, n], &device));
                let sign_in = sampler.row_signs::<B, 3>([batch, seq, n], &device);
                let sign_out = sampler.row_signs::<B, 3>([batch, seq, r], &device);
                let noise = flat_linear(x.clone().mul(sign_in), delta.transpose(), None).mul(sign_out);
                flat_linear(x, mean.transpose(), None).add(noise)
            }
        }
    }
}

/// BLoB's tensors, in [`Adapter::named_params`] order: `M_A`, `G_A`, `B`.
pub const BLOB_PARAMS: [&str; 3] = ["lora_A", "lora_A_std", "lora_B"];

impl<B: Backend> Adapter<B> for BlobLinear<B> {
    fn forward(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let update = flat_linear(self.code(x.clone(), sampler), self.lora_b.val().transpose(), None);
        linear_forward(&self.base, x).add(update)
    }

    fn code(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        self.project(sampler.dropout(x, self.dropout), sampler)
            .mul_scalar(self.scaling)
    }

    fn lora_b(&self) -> Tensor<B, 2> {
        self.lora_b.val()
    }

    fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        blob_kl(self.lora_a.val(), self.omega(), prior_std)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_b.val().matmul(self.lora_a.val()).mul_scalar(self.scaling)
    }

    fn base(&self) -> &Linear<B> {
        &self.base
    }

    fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        use ParamRole::{Mean, Std};
        let [a, a_std, b] = BLOB_PARAMS;
        vec![
            NamedParam {
                name: a,
                role: Mean,
                param: &self.lora_a,
            },
            NamedParam {
                name: a_std,
                role: Std,
                param: &self.lora_a_std,
            },
            NamedParam {
                name: b,
                role: Mean,
                param: &self.lora_b,
            },
        ]
    }

    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let [a, a_std, b] = BLOB_PARAMS;
        vec![
            (a, &mut self.lora_a),
            (a_std, &mut self.lora_a_std),
            (b, &mut self.lora_b),
        ]
    }
}
