//! Me-LoRA: a random `r x r` matrix `C ~ N(M, Omega^2)` between LoRA's `B`
//! and `A`, `y = W0 x + (alpha / r) B C A dropout(x)`, `Omega = H^2` (or
//! softplus). BLoB's Bayesian treatment at LoRA's parameter count plus
//! `2 r^2` per layer.
//!
//! Initialisation (the paper does not give one): `A` Kaiming-uniform and
//! `B = 0` as in LoRA, `M = I` so Me-LoRA starts as LoRA, and `Omega`
//! starting with the relative noise BLoB starts with ([`StdInit`]): BLoB's
//! range `[eps^2 / 2, eps^2]` (`eps = 0.05`) scaled by `sqrt(3 n / r)`,
//! because `C`'s entries are of order 1 where `A`'s are of order
//! `1 / sqrt(3 n)` (docs/derivations.md section 1). Both are configurable.
//!
//! Sampling `PerExample` (the default of the training code) draws one `C` per
//! sequence: `batch * r^2` normals and `r^2` extra multiply-adds per token
//! (derivations.md section 4). `A`, `B`, the base layer, scale and dropout
//! are the shared [`LowRank`] part.
//!
//! Tests: `melora-core/tests/adapters.rs` (sampling modes, BLoB's relative
//! noise at initialisation, any-rank input), `tests/derivations.rs` (each
//! KL variant against the dense Gaussian KL it equals, its gradient
//! against finite differences) and `tests/posterior.rs` (training reaches the
//! closed-form posterior, exact and subspace KL).

use crate::adapter::{expect_shape, Adapter, LowRankConfig, NamedParam, ParamRole, StdParam};
use crate::error::check;
use crate::kl::{melora_kl, melora_kl_given, MeLoraKl};
use crate::low_rank::{kaiming_a, LowRank};
use crate::noise::NoiseSource;
use crate::sampling::{Sampler, SamplingMode};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};
use melora_kernels::flat_linear;

/// How `M`, the mean of `C`, starts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MeanInit {
    /// `M = I`: Me-LoRA starts as LoRA (the default).
    Identity,
    /// Kaiming-uniform like `A`.
    KaimingUniform,
}

/// How `Omega`, the std of `C`, starts.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum StdInit {
    /// `Omega ~ [eps^2 / 2, eps^2]` entrywise, BLoB's numbers for `A`: with
    /// `M = I` the noise is `sqrt(3 n / r)` times smaller relative to the
    /// signal than BLoB's, and predictions barely vary (the 10 samples of
    /// a 150-step run gave the mean weights' prediction to 4 digits).
    Blob,
    /// The same range times `sqrt(3 n / r)` (`n` the layer's input width):
    /// the rank-`r` intermediate `C A x` then starts with the relative
    /// noise BLoB's `A x` starts with (the default).
    BlobRelative,
}

/// Configuration of a [`MeLoraLinear`]: the low-rank part every adapter
/// has and Me-LoRA's own settings.
#[derive(Config, Debug)]
pub struct MeLoraLinearConfig {
    /// Rank, scaling and dropout.
    #[config(default = "LowRankConfig::new()")]
    pub low_rank: LowRankConfig,
    /// The KL variant and how `M` and the std of `C` start and are
    /// parameterised.
    #[config(default = "MeLoraPosteriorConfig::new()")]
    pub posterior: MeLoraPosteriorConfig,
}

/// Me-LoRA's own settings: the KL variant and how `C`'s mean and std start
/// and are parameterised (a run's `melora` section).
#[derive(Config, Debug, PartialEq)]
pub struct MeLoraPosteriorConfig {
    /// Which KL term [`Adapter::kl`] returns.
    #[config(default = "MeLoraKl::Subspace")]
    pub kl: MeLoraKl,
    /// How `M` starts.
    #[config(default = "MeanInit::Identity")]
    pub mean_init: MeanInit,
    /// `eps` of the std initialisation: the std starts in `[eps^2/2, eps^2]`,
    /// times `sqrt(3 n / r)` under [`StdInit::BlobRelative`].
    #[config(default = 0.05)]
    pub init_eps: f64,
    /// How the std starts.
    #[config(default = "StdInit::BlobRelative")]
    pub std_init: StdInit,
    /// How `Omega` is obtained from `H`.
    #[config(default = "StdParam::Square")]
    pub std_param: StdParam,
}

impl MeLoraPosteriorConfig {
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

/// A frozen linear layer plus Me-LoRA's update `B C A`.
#[derive(Module, Debug)]
pub struct MeLoraLinear<B: Backend> {
    /// The base layer, `A`, `B`, the scale and the dropout.
    pub low_rank: LowRank<B>,
    /// `M`, the mean of `C`, `[r, r]`.
    pub lora_m: Param<Tensor<B, 2>>,
    /// `H`, the std parameter of `C`, `[r, r]`.
    pub lora_h: Param<Tensor<B, 2>>,
    /// How `Omega` is obtained from `H`.
    #[module(skip)]
    pub std_param: StdParam,
    /// The KL variant.
    #[module(skip)]
    pub kl: MeLoraKl,
}

impl MeLoraLinearConfig {
    /// Checks every field.
    pub fn validate(&self) -> crate::Result<()> {
        self.low_rank.validate()?;
        self.posterior.validate()
    }

    /// Wraps `base` (frozen here) with a fresh adapter, drawn from `noise`:
    /// `M` (when not the identity), `H`, then `A`.
    pub fn init<B: Backend>(&self, base: Linear<B>, noise: &mut NoiseSource) -> crate::Result<MeLoraLinear<B>> {
        self.validate()?;
        let (d_input, _) = self.low_rank.check_base(&base)?;
        let device = base.weight.device();
        let r = self.low_rank.rank;
        let posterior = &self.posterior;
        let lora_m = match posterior.mean_init {
            MeanInit::Identity => Param::from_tensor(Tensor::eye(r, &device)),
            MeanInit::KaimingUniform => kaiming_a::<B>(r, r, noise, &device),
        };
        // Omega = H^2: scaling Omega by sqrt(3 n / r) scales H by its square root.
        let eps = match posterior.std_init {
            StdInit::Blob => posterior.init_eps,
            StdInit::BlobRelative => posterior.init_eps * (3.0 * d_input as f64 / r as f64).powf(0.25),
        };
        let h = Param::from_tensor(noise.uniform([r, r], eps / 2f64.sqrt(), eps, &device));
        let h = match posterior.std_param {
            StdParam::Square => h,
            other => h.map(|h| other.inverse(StdParam::Square.std(h))),
        };
        Ok(MeLoraLinear {
            low_rank: self.low_rank.init(base, noise)?,
            lora_m,
            lora_h: h,
            std_param: self.posterior.std_param,
            kl: self.posterior.kl,
        })
    }

    /// Builds the adapter from existing tensors: `a` `[r, d_input]`, `b`
    /// `[d_output, r]`, `m` and `h` (the raw std parameter) `[r, r]`.
    pub fn init_with<B: Backend>(
        &self,
        base: Linear<B>,
        a: Tensor<B, 2>,
        b: Tensor<B, 2>,
        m: Tensor<B, 2>,
        h: Tensor<B, 2>,
    ) -> crate::Result<MeLoraLinear<B>> {
        self.validate()?;
        let low_rank = self.low_rank.init_with(base, a, b)?;
        let r = self.low_rank.rank;
        expect_shape("lora_M", &m.dims(), &[r, r])?;
        expect_shape("lora_H", &h.dims(), &[r, r])?;
        Ok(MeLoraLinear {
            low_rank,
            lora_m: Param::from_tensor(m),
            lora_h: Param::from_tensor(h),
            std_param: self.posterior.std_param,
            kl: self.posterior.kl,
        })
    }
}

impl<B: Backend> MeLoraLinear<B> {
    /// `Omega`, the std of `C`.
    pub fn omega(&self) -> Tensor<B, 2> {
        self.std_param.std(self.lora_h.val())
    }

    /// `A`, when this adapter's KL needs `ln det(A A^T)` (the `Subspace`
    /// variant): see [`crate::total_kl`], which computes those terms for
    /// all adapters at once.
    pub fn logdet_input(&self) -> Option<Tensor<B, 2>> {
        (self.kl == MeLoraKl::Subspace).then(|| self.low_rank.lora_a.val())
    }

    /// The KL term with `ln det(A A^T)` given (for [`Self::logdet_input`]).
    pub fn kl_given(&self, prior_std: f64, logdet: Option<Tensor<B, 1>>) -> Tensor<B, 1> {
        melora_kl_given(
            self.kl,
            self.lora_m.val(),
            self.omega(),
            self.low_rank.lora_a.val(),
            prior_std,
            logdet,
        )
    }

    /// `count` independent draws of `C`, `[count, r, r]`.
    pub fn sample_c(&self, count: usize, noise: &mut NoiseSource) -> Tensor<B, 3> {
        let mean = self.lora_m.val();
        let [r, _] = mean.dims();
        self.c_from(noise.normal::<B, 3>([count, r, r], &mean.device()))
    }

    /// `C = M + Omega * eps` for standard normals `eps`, `[count, r, r]`.
    fn c_from(&self, eps: Tensor<B, 3>) -> Tensor<B, 3> {
        self.lora_m
            .val()
            .unsqueeze::<3>()
            .add(self.omega().unsqueeze::<3>().mul(eps))
    }

    /// `z = C u` for the sampling mode, with `u = A x`; `[batch, seq, r]`.
    fn mix(&self, u: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let mean = self.lora_m.val();
        let [r, _] = mean.dims();
        let [batch, seq, _] = u.dims();
        let device = u.device();
        match sampler.mode {
            SamplingMode::Mean => flat_linear(u, mean.transpose(), None),
            SamplingMode::PerBatch => {
                let c = self
                    .c_from(sampler.batch_normals::<B, 3>(self.low_rank.lora_a.id, [1, r, r], &device))
                    .squeeze_dim::<2>(0);
                flat_linear(u, c.transpose(), None)
            }
            SamplingMode::PerExample => {
                let c = self.c_from(sampler.example_normals::<B, 3>(self.low_rank.lora_a.id, [batch, r, r], &device));
                melora_kernels::matmul(u, c.swap_dims(1, 2))
            }
            SamplingMode::Flipout => {
                let delta = self
                    .omega()
                    .mul(sampler.batch_normals::<B, 2>(self.low_rank.lora_a.id, [r, r], &device));
                let sign_in = sampler.row_signs::<B, 3>([batch, seq, r], &device);
                let sign_out = sampler.row_signs::<B, 3>([batch, seq, r], &device);
                let noise = flat_linear(u.clone().mul(sign_in), delta.transpose(), None).mul(sign_out);
                flat_linear(u, mean.transpose(), None).add(noise)
            }
        }
    }
}

/// Me-LoRA's tensors, in [`Adapter::named_params`] order: `A`, `B`, `M`, `H`.
pub const MELORA_PARAMS: [&str; 4] = ["lora_A", "lora_B", "lora_M", "lora_H"];

impl<B: Backend> Adapter<B> for MeLoraLinear<B> {
    fn forward_seq(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        self.low_rank.output(x.clone(), self.code(x, sampler))
    }

    fn code(&self, x: Tensor<B, 3>, sampler: &mut Sampler) -> Tensor<B, 3> {
        let low_rank = &self.low_rank;
        let u = low_rank.project(low_rank.dropped(x, sampler));
        self.mix(u, sampler).mul_scalar(low_rank.scaling)
    }

    fn lora_b(&self) -> Tensor<B, 2> {
        self.low_rank.lora_b.val()
    }

    fn kl(&self, prior_std: f64) -> Tensor<B, 1> {
        melora_kl(
            self.kl,
            self.lora_m.val(),
            self.omega(),
            self.low_rank.lora_a.val(),
            prior_std,
        )
    }

    fn delta_weight(&self) -> Tensor<B, 2> {
        self.low_rank.delta_weight(Some(self.lora_m.val()))
    }

    fn base(&self) -> &Linear<B> {
        &self.low_rank.base
    }

    fn named_params(&self) -> Vec<NamedParam<'_, B>> {
        use ParamRole::{Mean, Std};
        let [a, b, m, h] = MELORA_PARAMS;
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
            NamedParam {
                name: m,
                role: Mean,
                param: &self.lora_m,
            },
            NamedParam {
                name: h,
                role: Std,
                param: &self.lora_h,
            },
        ]
    }

    fn named_params_mut(&mut self) -> Vec<(&'static str, &mut Param<Tensor<B, 2>>)> {
        let [a, b, m, h] = MELORA_PARAMS;
        vec![
            (a, &mut self.low_rank.lora_a),
            (b, &mut self.low_rank.lora_b),
            (m, &mut self.lora_m),
            (h, &mut self.lora_h),
        ]
    }
}
