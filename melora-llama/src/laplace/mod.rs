//! Laplace-LoRA (Yang et al. 2024), post hoc on a MAP (LoRA) run:
//! Kronecker-factored curvature per LoRA matrix, a prior precision chosen by
//! the marginal likelihood (or on validation data), and the linearised
//! predictive (probit approximation, or samples of the logit Gaussian).
//!
//! Conventions. A LoRA layer computes `y = W0 x + s B A x` with `A` `[r, n]`,
//! `B` `[m, r]`. For one token with input `x` and output gradient `g`, the
//! gradients are `s g (A x)^T` for `B` and `s B^T g x^T` for `A`. With
//! row-major `vec`, `vec(g a^T) = g ⊗ a`, so each matrix `W` gets the
//! curvature block `G ⊗ I_in` ("output factor ⊗ input factor"):
//!
//! - `B`: `G = s^2 Σ g g^T` (`m x m`), `I_in = Σ u u^T / T`, `u = A x` (`r x r`);
//! - `A`: `G = s^2 B^T (Σ g g^T) B` (`r x r`), `I_in = Σ x x^T / T` (`n x n`);
//!
//! sums over the real (unpadded) tokens of the curvature data, `T` their
//! number (KFAC "expand": each token an example of the factorisation). The
//! output gradients `g` are those of the per-example Fisher's square roots:
//! `l_c = sqrt(p_c) (e_c - p)` for every class `c` (exact Fisher, which for
//! the softmax likelihood equals the GGN), or `p - e_y` with `y ~ p` (Monte
//! Carlo Fisher). With one example of one token the factorisation is exact
//! (`tests/laplace.rs` checks it against the dense Fisher and GGN). Computed
//! on a subset of `n` of the `N` training examples, `G` is scaled by `N / n`.
//!
//! Each factor is eigendecomposed in f64 and truncated to its largest
//! `factor_rank` eigenpairs (Robeyns' `bayesian_lora` keeps low-rank factors
//! likewise); the posterior precision of a matrix is
//! `Σ_ij g_i a_j (q_i q_i^T ⊗ v_j v_j^T) + λ I`, whose inverse is
//! `I / λ + Σ_ij (1 / (g_i a_j + λ) - 1 / λ) (q_i q_i^T ⊗ v_j v_j^T)`.
//! Blocks of different matrices are independent (block-diagonal KFAC).
//!
//! The linearised predictive of example `x` is `f ~ N(f_MAP(x), J Σ J^T)`
//! with `J` the Jacobian of the class logits with respect to every LoRA
//! matrix, computed per example from the same taps (one backward pass per
//! class).

mod curvature;
mod posterior;
mod predictive;

pub use curvature::{accumulate, Block, Curvature, Factor, LayerCurvature};
pub use posterior::{
    choose_prior_precision, fit_posterior, log_marginal_likelihood, LaplaceDir, LaplaceMeta, Posterior, PriorChoice,
};
pub use predictive::{draws, linearise, predictive, probit, sampled, Linearised};

use crate::error::LlamaError;
use crate::model::scoring::{PassLayout, ScoreBatch, Scorer};
use crate::model::Llama;
use burn::config::Config;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use melora_core::{AnyAdapter, LoraTap, NoiseSource, Sampler, SamplingMode, Taps};
use nalgebra::DMatrix;

/// Which Fisher the output factors come from.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum FisherKind {
    /// The exact Fisher (equal to the GGN): one backward pass per class.
    Exact,
    /// The Monte Carlo Fisher: `mc_samples` backward passes with labels
    /// drawn from the model.
    MonteCarlo,
}

/// How the prior precision `λ` is chosen.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum PriorPrecision {
    /// Maximise the Laplace approximation of the marginal likelihood over a
    /// log grid.
    MarginalLikelihood,
    /// Minimise the validation NLL of the probit predictive over the grid.
    Validation,
    /// A given value.
    Fixed(f64),
}

/// The settings of `melora laplace`; saved in `laplace.json`.
#[derive(Config, Debug)]
pub struct LaplaceConfig {
    /// Exact or Monte Carlo Fisher.
    #[config(default = "FisherKind::Exact")]
    pub fisher: FisherKind,
    /// Monte Carlo Fisher: labels drawn per example.
    #[config(default = 1)]
    pub mc_samples: usize,
    /// Training examples the curvature is accumulated over (a fixed seeded
    /// subset; all when unset).
    pub max_examples: Option<usize>,
    /// Validation examples for `PriorPrecision::Validation`.
    #[config(default = 100)]
    pub max_validation: usize,
    /// Examples per forward pass.
    #[config(default = 4)]
    pub batch_size: usize,
    /// Eigenpairs kept per Kronecker factor.
    #[config(default = 64)]
    pub factor_rank: usize,
    /// How the prior precision is chosen.
    #[config(default = "PriorPrecision::MarginalLikelihood")]
    pub prior_precision: PriorPrecision,
    /// Seed of the Monte Carlo Fisher's labels.
    #[config(default = 0)]
    pub seed: u64,
}

impl LaplaceConfig {
    /// Checks the settings; messages name the setting.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(LlamaError::Config(m));
        if self.batch_size == 0 || self.factor_rank == 0 || self.mc_samples == 0 {
            return bad("batch_size, factor_rank and mc_samples must be positive".into());
        }
        if let PriorPrecision::Fixed(l) = self.prior_precision {
            if !(l > 0.0 && l <= 1e12) {
                return bad(format!(
                    "prior_precision Fixed({l}) must be in (0, 1e12] (the grid searches 1e-4 .. 1e6)"
                ));
            }
        }
        Ok(())
    }
}

impl crate::settings::Settings for LaplaceConfig {
    const WHAT: &'static str = "Laplace configuration";
    fn defaults() -> Self {
        Self::new()
    }
    fn validate(&self) -> crate::Result<()> {
        LaplaceConfig::validate(self)
    }
}

/// The grid of prior precisions searched: `10^-4 .. 10^6` in steps of 10^0.2.
pub fn precision_grid() -> Vec<f64> {
    (0..=50).map(|i| 10f64.powf(-4.0 + 0.2 * i as f64)).collect()
}

fn to_matrix<B: burn::tensor::backend::Backend>(t: Tensor<B, 2>) -> DMatrix<f64> {
    let [r, c] = t.dims();
    DMatrix::from_row_slice(r, c, &t.into_data().convert::<f64>().to_vec::<f64>().expect("f64 data"))
}

fn token_mask<B: burn::tensor::backend::Backend>(pass: &PassLayout, device: &B::Device) -> Tensor<B, 3> {
    let (b, t) = (pass.mask.len(), pass.mask.first().map_or(0, |r| r.len()));
    let values: Vec<f32> = pass
        .mask
        .iter()
        .flat_map(|row| row.iter().map(|&m| if m { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [b, t, 1]), device)
}

/// Sums the rows of `t` (`[rows, ...]`) into their examples: row `j` goes
/// to `example[j]` of `n`.
fn rows_to_examples<B: burn::tensor::backend::Backend>(t: Tensor<B, 3>, example: &[usize], n: usize) -> Tensor<B, 3> {
    let [rows, a, b] = t.dims();
    if rows == n && example.iter().enumerate().all(|(j, &e)| j == e) {
        return t;
    }
    let mut sum = vec![0f32; n * rows];
    for (j, &e) in example.iter().enumerate() {
        sum[e * rows + j] = 1.0;
    }
    let device = t.device();
    let sum = Tensor::<B, 2>::from_data(TensorData::new(sum, [n, rows]), &device);
    sum.matmul(t.reshape([rows, a * b])).reshape([n, a, b])
}

/// One tapped forward pass: class scores and the LoRA layers' taps.
fn tapped<B: AutodiffBackend>(
    model: &Llama<B>,
    batch: &ScoreBatch,
    scorer: &Scorer,
    device: &B::Device,
) -> (Tensor<B, 2>, Taps) {
    let mut taps = Taps::default();
    let mut noise = NoiseSource::seeded(0);
    let logits = {
        let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise).with_taps(&mut taps);
        scorer.scores(model, batch, &mut sampler, device)
    };
    (logits, taps)
}

/// The MAP LoRA layers of `model`: name, `A`, `B`, scaling.
fn lora_layers<B: AutodiffBackend>(
    model: &Llama<B>,
) -> crate::Result<Vec<(String, Tensor<B::InnerBackend, 2>, Tensor<B::InnerBackend, 2>, f64)>> {
    let layers: Vec<_> = model
        .adapters()
        .into_iter()
        .map(|(name, adapter)| match adapter {
            _ if name == "lm_head" => Err(LlamaError::Mismatch(
                "Laplace-LoRA covers the decoder layers' LoRA adapters; this run also adapts lm_head (train the map run without it)".into(),
            )),
            AnyAdapter::Lora(a) => Ok((name, a.low_rank.lora_a.val().inner(), a.low_rank.lora_b.val().inner(), a.low_rank.scaling)),
            _ => Err(LlamaError::Mismatch(format!("Laplace-LoRA needs LoRA adapters (a map run); {name} is not one"))),
        })
        .collect::<crate::Result<_>>()?;
    if layers.is_empty() {
        return Err(LlamaError::Mismatch("the model has no LoRA adapters".into()));
    }
    Ok(layers)
}

/// The taps of each forward pass (`passes` of them), each one per LoRA layer.
fn lora_taps<B: AutodiffBackend>(taps: &Taps, layers: usize, passes: usize) -> Vec<Vec<&LoraTap<B>>> {
    let taps = taps.lora::<B>().expect("LoRA taps of this backend");
    assert_eq!(taps.len(), layers * passes, "one tap per LoRA layer and forward pass");
    taps.chunks(layers).map(|c| c.to_vec()).collect()
}

/// The output gradients `g` (masked), `[batch, seq, m]`, of each LoRA layer.
fn probe_grads<B: AutodiffBackend>(
    taps: &[&LoraTap<B>],
    grads: &B::Gradients,
    mask: &Tensor<B::InnerBackend, 3>,
) -> Vec<Tensor<B::InnerBackend, 3>> {
    taps.iter()
        .map(|tap| {
            let g = tap
                .probe
                .grad(grads)
                .unwrap_or_else(|| tap.probe.clone().inner().zeros_like());
            g.mul(mask.clone())
        })
        .collect()
}

fn gram<B: burn::tensor::backend::Backend>(x: Tensor<B, 3>) -> DMatrix<f64> {
    let [b, t, d] = x.dims();
    let flat = x.reshape([b * t, d]);
    to_matrix(melora_kernels::matmul(flat.clone().transpose(), flat))
}
