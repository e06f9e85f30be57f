#![warn(missing_docs)]
//! # melora-core
//!
//! Bayesian low-rank adapters for linear layers, generic over Burn backends:
//!
//! - [`LoraLinear`] (Hu et al. 2021, PEFT's layout and initialisation),
//! - [`BlobLinear`] (Wang et al. 2024, "BLoB": Gaussian `A`),
//! - [`MeLoraLinear`] ("Me-LoRA": a Gaussian `r x r` matrix `C` between `B`
//!   and `A`, `W = W0 + B C A`),
//!
//! their KL terms ([`kl`]: the paper's Eq. 7 and the exact variants of
//! `docs/derivations.md`), the sampling modes ([`SamplingMode`]), explicit
//! random sources ([`NoiseSource`]), the KL weighting schedules, calibration
//! metrics ([`metrics`]) and parameter accounting ([`params`]).
//!
//! Reference implementations read while writing this crate: Hugging Face
//! PEFT (`tuners/lora/layer.py`) and Wang-ML-Lab/bayesian-peft (BLoB).
//!
//! ## Me-LoRA in a model of your own
//!
//! A classifier whose layer is a Me-LoRA adapter over a frozen linear
//! layer, trained with the ELBO step ([`ElboStep`]: AdamW on the NLL, SGD
//! on the KL) and evaluated as a 10-sample Bayesian model average:
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::{loss::CrossEntropyLossConfig, LinearConfig};
//! use burn::prelude::*;
//! use burn::tensor::backend::AutodiffBackend;
//! use melora_core::*;
//!
//! #[derive(Module, Debug)]
//! struct Classifier<B: Backend> { layer: MeLoraLinear<B> }
//!
//! impl<B: AutodiffBackend> Bayesian<B> for Classifier<B> {
//!     fn kl(&self, prior_std: f64) -> Tensor<B, 1> { self.layer.kl(prior_std) }
//!     fn param_groups(&self) -> ParamGroups { self.layer.param_groups() }
//! }
//!
//! type B = Autodiff<NdArray<f32>>;
//! let (device, mut noise) = (Default::default(), NoiseSource::seeded(0));
//! let base = LinearConfig::new(4, 2).init::<B>(&device);
//! let low_rank = LowRankConfig::new().with_rank(2).with_dropout(0.0);
//! let mut model = Classifier { layer: MeLoraLinearConfig::new().with_low_rank(low_rank).init(base, &mut noise)? };
//! // 16 examples of 4 features; the class is the sign of the first feature.
//! let x = noise.normal::<B, 3>([16, 1, 4], &device);
//! let first: Vec<f32> = x.clone().slice([0..16, 0..1, 0..1]).into_data().to_vec().unwrap();
//! let labels: Vec<i64> = first.iter().map(|&v| (v > 0.0) as i64).collect();
//! let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [16]), &device);
//! let mut step = ElboStep::new(ElboConfig::new(), &model);
//! let loss = CrossEntropyLossConfig::new().init(&device);
//! for _ in 0..30 {
//!     let mut sampler = Sampler::new(SamplingMode::PerExample, &mut noise);
//!     let nll = loss.forward(model.layer.forward(x.clone(), &mut sampler).reshape([16, 2]), y.clone());
//!     step.step(&mut model, nll, Rates::new(0.05, 0.01), Some(KlTerm { prior_std: 0.2, weight: 1.0 / 16.0 })).unwrap();
//! }
//! // Predict: S = 10 weight samples per example, probabilities averaged.
//! let samples: Vec<Tensor<B, 2>> = (0..10)
//!     .map(|_| model.layer.forward(x.clone(), &mut Sampler::new(SamplingMode::PerExample, &mut noise)).reshape([16, 2]))
//!     .collect();
//! let probs = bayesian_average(samples);
//! let accuracy: f32 = probs.argmax(1).squeeze_dim::<1>(1).equal(y).float().mean().into_scalar();
//! assert!(accuracy >= 0.75, "accuracy {accuracy}");
//! # Ok::<(), CoreError>(())
//! ```

pub mod adapter;
pub mod blob;
pub mod config;
pub mod elbo;
pub mod error;
pub mod kl;
/// Small dense `f64` linear algebra behind the subspace KL; public for the
/// derivation tests (`tests/derivations.rs`), not part of the API.
#[doc(hidden)]
pub mod linalg;
pub mod lora;
pub mod low_rank;
pub mod melora;
pub mod metrics;
pub mod noise;
pub mod params;
pub mod sampling;

pub use adapter::{count_params, Adapter, LowRankConfig, NamedParam, ParamGroups, ParamRole, StdParam};
pub use blob::{BlobLinear, BlobLinearConfig, BlobPosteriorConfig};
pub use config::{total_kl, AdapterConfig, AdapterKind, AnyAdapter};
pub use elbo::{
    Bayesian, ElboConfig, ElboStep, KlTerm, NonFinite, OptimizerSplit, Rates, ReducedStepError, StepValues,
};
pub use error::{CoreError, Result};
pub use kl::{KlSchedule, MeLoraKl, PriorConfig};
pub use lora::{LoraLinear, LoraLinearConfig};
pub use low_rank::LowRank;
pub use melora::{MeLoraLinear, MeLoraLinearConfig, MeLoraPosteriorConfig, MeanInit, StdInit};
pub use metrics::{auroc, bayesian_average, ClassProbs, Metrics, Uncertainty};
pub use noise::{NoiseDevice, NoiseSource, RowNoise};
pub use sampling::{LoraTap, Sampler, SamplingMode, SharedDraws, Taps};

#[cfg(test)]
pub(crate) mod tests {
    /// The math tests run in f64 on ndarray.
    pub type TestBackend = burn::backend::NdArray<f64>;
}
