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
    /// When set, LoRA layers record their inputs and add a zero probe to
    /// their outputs (see [`LoraTap`]): Laplace-LoRA's curvature and
    /// Jacobians need the per-token inputs and output gradients.
    pub taps: Option<&'a mut Taps>,
}

/// What a LoRA layer records in a tapped forward pass.
#[derive(Debug, Clone)]
pub struct LoraTap<B: Backend> {
    /// The layer's input, `[batch, seq, d_input]` (after dropout, if on).
    pub input: Tensor<B, 3>,
    /// A zero tensor added to the layer's output, `[batch, seq, d_output]`,
    /// marked as requiring a gradient: its gradient is the gradient of the
    /// loss with respect to the layer's output, token by token.
    pub probe: Tensor<B, 3>,
}

/// The records of a tapped forward pass, one per LoRA layer in the order
/// the layers ran (each a [`LoraTap`] of the pass's backend).
#[derive(Default)]
pub struct Taps {
    /// The records.
    pub records: Vec<Box<dyn std::any::Any>>,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Taps({} records)", self.records.len())
    }
}

impl Taps {
    /// The records as [`LoraTap`]s of backend `B`; `None` if any is not.
    pub fn lora<B: Backend>(&self) -> Option<Vec<&LoraTap<B>>> {
        self.records.iter().map(|r| r.downcast_ref::<LoraTap<B>>()).collect()
    }
}

impl<'a> Sampler<'a> {
    /// A sampler with the given mode; dropout off.
    pub fn new(mode: SamplingMode, noise: &'a mut NoiseSource) -> Self {
        Self { mode, dropout: false, noise, taps: None }
    }

    /// The same sampler recording LoRA layers into `taps`.
    pub fn with_taps(mut self, taps: &'a mut Taps) -> Self {
        self.taps = Some(taps);
        self
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
