//! BLoB (Wang et al. 2024): LoRA whose `A` is Gaussian,
//! `A ~ N(M_A, Omega_A^2)`, `Omega_A = G_A^2` (or softplus), `B` deterministic.
//!
//! Initialisation follows BLoB's code: `M_A` Kaiming-uniform as LoRA's `A`,
//! `B = 0`, `G_A ~ U(eps / sqrt(2), eps)` with `eps = 0.05`, so the initial
//! std lies in `[eps^2 / 2, eps^2] = [0.00125, 0.0025]`. `M_A`, `B`, the
//! base layer, scale and dropout are the shared [`LowRank`] part.
//!
//! Tests: `melora-core/tests/adapters.rs` (sampling modes unbiased,
//! per-example draws, the initial std range, any-rank input),
//! `tests/derivations.rs` (the KL against the dense Gaussian KL, its
//! gradient against finite differences) and
//! `tests/posterior.rs` (training reaches the closed-form posterior of a
//! linear-Gaussian model).

use crate::adapter::{expect_shape, Adapter, LowRankConfig, NamedParam, ParamRole, StdParam};
use crate::error::check;
use crate::kl::blob_kl;
use crate::low_rank::LowRank;
use crate::noise::NoiseSource;
use crate::sampling::{Sampler, SamplingMode};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use melora_kernels::flat_linear;

/// Configuration of a [`BlobLinear`]: the low-rank part every adapter has
/// and BLoB's own settings.
#[derive(Config, Debug)]
pub struct BlobLinearConfig {
    /// Rank, scaling and dropout.
    #[config(default = "LowRankConfig::new()")]
    pub low_rank: LowRankConfig,
    /// How the std of `A` starts and is parameterised.
    #[config(default = "BlobPosteriorConfig::new()")]
    pub posterior: BlobPosteriorConfig,
}

/// BLoB's own settings: how the std of `A` starts and is parameterised
/// (a run's `blob` section).
#[derive(Config, Debug, PartialEq)]
pub struct BlobPosteriorConfig {
    /// `eps` of the std initialisation: `G_A ~ U(eps / sqrt(2), eps)` for
    /// `Square` (the std then lies in `[eps^2/2, eps^2]`).
    #[config(default = 0.05)]
    pub init_eps: f64,
    /// How `Omega_A` is obtained from `G_A`.
    #[config(default = "StdParam::Square")]
    pub std_param: StdParam,
}

impl BlobPosteriorConfig {
    /// Checks every field.
    pub fn validate(&self) -> crate::Result<()> {
        check(
            self.init_eps > 0.0 && self.init_eps <= 1.0,
            "init_eps",
            self.init_eps,
            "must be in (0, 1]",
        )
    }
}

/// A frozen linear layer plus BLoB's Bayesian low-rank update `B A`.
#[derive(Module, Debug)]
pub struct BlobLinear<B: Backend> {
    /// The base layer, `M_A` (the mean of `A`), `B`, the scale and the
    /// dropout.
    pub low_rank: LowRank<B>,
    /// `G_A`, the std parameter of `A`, `[r, d_input]`.
    pub lora_a_std: Param<Tensor<B, 2>>,
    /// How the std is obtained from `G_A`.
    #[module(skip)]
    pub std_param: StdParam,
}

impl BlobLinearConfig {
    /// Checks every field.
    pub fn validate(&self) -> crate::Result<()> {
        self.low_rank.validate()?;
        self.posterior.validate()
    }

    /// Wraps `base` (frozen here) with a fresh adapter, drawn from `noise`:
    /// `M_A` first, then `G_A`.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<BlobLinear<B>> {
        self.validate()?;
        let low_rank = self.low_rank.init(base, noise)?;
        let [r, d_input] = low_rank.lora_a.dims();
        let eps = self.posterior.init_eps;
        let device = low_rank.lora_a.device();
        let g = Param::from_tensor(noise.uniform([r, d_input], eps / 2f64.sqrt(), eps, &device));
        // The std a `Square` parameter g would give; other parameterisations
        // are set to the same initial std.
        let g = match self.posterior.std_param {
            StdParam::Square => g,
            other => g.map(|g| other.inverse(StdParam::Square.std(g))),
        };
        Ok(BlobLinear {
            low_rank,
            lora_a_std: g,
            std_param: self.posterior.std_param,
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
        let low_rank = self.low_rank.init_with(base, a, b)?;
        expect_shape("lora_A_std", &a_std.dims(), &low_rank.lora_a.dims())?;
        Ok(BlobLinear {
            low_rank,
            lora_a_std: Param::from_tensor(a_std),
            std_param: self.posterior.std_param,
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
        let mean = self.low_rank.lora_a.val();
        let [r, n] = mean.dims();
        let [batch, seq, _] = x.dims();
        let device = x.device();
        match sampler.mode {
            SamplingMode::Mean => flat_linear(x, mean.transpose(), None),
            SamplingMode::PerBatch => {
                let a = mean.add(self.omega().mul(sampler.batch_normals::<B, 2>(
                    self.low_rank.lora_a.id,
                    [r, n],
                    &device,
                )));
                flat_linear(x, a.transpose(), None)
            }
            SamplingMode::PerExample => {
                let eps = sampler.example_normals::<B, 3>(self.low_rank.lora_a.id, [batch, r, n], &device);
                let a = mean.unsqueeze::<3>().add(self.omega().unsqueeze::<3>().mul(eps));
                melora_kernels::matmul(x, a.swap_dims(1, 2))
            }
            SamplingMode::Flipout => {
                let delta = self
                    .omega()
                    .mul(sampler.batch_normals::<B, 2>(self.low_rank.lora_a.id, [r, n], &device));
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
    fn forward_seq(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        self.low_rank.output(x.clone(), self.code(x, sampler))
    }

    fn code(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let low_rank = &self.low_rank;
        self.project(low_rank.dropped(x, sampler), sampler)
            .mul_scalar(low_rank.scaling)
    }

    fn lora_b(&self) -> Tensor<B, 2> {
        self.low_rank.lora_b.val()
    }

    fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        blob_kl(self.low_rank.lora_a.val(), self.omega(), prior_std)
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.low_rank.delta_weight(None)
    }

    fn base(&self) -> &Linear<B> {
        &self.low_rank.base
    }

    fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        use ParamRole::{Mean, Std};
        let [a, a_std, b] = BLOB_PARAMS;
        vec![
            NamedParam {
                name: a,
                role: Mean,
                param: &self.low_rank.lora_a,
            },
            NamedParam {
                name: a_std,
                role: Std,
                param: &self.lora_a_std,
            },
            NamedParam {
                name: b,
                role: Mean,
                param: &self.low_rank.lora_b,
            },
        ]
    }

    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let [a, a_std, b] = BLOB_PARAMS;
        vec![
            (a, &mut self.low_rank.lora_a),
            (a_std, &mut self.lora_a_std),
            (b, &mut self.low_rank.lora_b),
        ]
    }
}
