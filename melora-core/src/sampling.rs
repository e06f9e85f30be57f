//! Sampling modes and the per-forward context the adapters read.
//!
//! method.md section 1: `Mean` (no noise), `PerBatch` (one draw per forward
//! pass, BLoB's code), `PerExample` (one draw per sequence; Me-LoRA's
//! default, derivations.md section 4), `Flipout` (per-token random signs,
//! BLoB's official code).

use crate::noise::NoiseSource;
use burn::config::Config;
use burn::tensor::{backend::Backend, Tensor};

/// How an adapter draws its random weights in a forward pass.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum SamplingMode {
    /// No noise: the mean weights (the MAP prediction, BLoB's "N = 0").
    Mean,
    /// One draw of the random matrix shared by the whole batch.
    PerBatch,
    /// One draw per example (per sequence) in the batch.
    PerExample,
    /// Flipout: one draw per batch, decorrelated per token by random signs
    /// on the input and on the rank dimension (BLoB's official code).
    Flipout,
}

impl std::str::FromStr for SamplingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "mean" => Ok(Self::Mean),
            "perbatch" => Ok(Self::PerBatch),
            "perexample" => Ok(Self::PerExample),
            "flipout" => Ok(Self::Flipout),
            _ => Err(format!(
                "unknown sampling mode {s:?}: expected mean, per-batch, per-example or flipout"
            )),
        }
    }
}

/// What one forward pass of an adapter should do with randomness.
#[derive(Debug)]
pub struct Sampler<'a> {
    /// How to draw the random weights.
    pub mode: SamplingMode,
    /// Whether input dropout on the adapter path is active (training, or
    /// MC dropout at evaluation).
    pub dropout: bool,
    /// Where the random numbers come from.
    pub noise: &'a mut NoiseSource,
}

impl<'a> Sampler<'a> {
    /// A sampler with the given mode; dropout off.
    pub fn new(mode: SamplingMode, noise: &'a mut NoiseSource) -> Self {
        Self { mode, dropout: false, noise }
    }

    /// The same sampler with dropout switched on or off.
    pub fn with_dropout(mut self, dropout: bool) -> Self {
        self.dropout = dropout;
        self
    }

    /// Input dropout with drop probability `p`, when active; the identity
    /// otherwise. Kept entries are scaled by `1 / (1 - p)`.
    pub fn dropout<B: Backend, const D: usize>(&mut self, x: Tensor<B, D>, p: f64) -> Tensor<B, D> {
        if !self.dropout || p <= 0.0 {
            return x;
        }
        let keep = self.noise.bernoulli::<B, D>(x.dims(), 1.0 - p, &x.device());
        x.mul(keep).div_scalar(1.0 - p)
    }
}
