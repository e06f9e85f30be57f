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

pub mod adapter;
pub mod blob;
pub mod config;
pub mod error;
pub mod kl;
pub mod linalg;
pub mod lora;
pub mod melora;
pub mod metrics;
pub mod noise;
pub mod params;
pub mod sampling;

pub use adapter::{count_params, Adapter, LowRankConfig, NamedParam, ParamGroups, ParamRole, StdParam};
pub use blob::{BlobLinear, BlobLinearConfig};
pub use config::{total_kl, AdapterConfig, AdapterKind, AnyAdapter};
pub use error::{CoreError, Result};
pub use kl::{KlSchedule, MeLoraKl, PriorConfig};
pub use lora::{LoraLinear, LoraLinearConfig};
pub use melora::{MeanInit, MeLoraLinear, MeLoraLinearConfig, StdInit};
pub use metrics::{auroc, bayesian_average, ClassProbs, Metrics, Uncertainty};
pub use noise::{NoiseDevice, NoiseSource};
pub use sampling::{LoraTap, Sampler, SamplingMode, SharedDraws, Taps};

#[cfg(test)]
pub(crate) mod tests {
    /// The math tests run in f64 on ndarray.
    pub type TestBackend = burn::backend::NdArray<f64>;
}
