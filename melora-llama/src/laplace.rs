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

use crate::assets::write_atomic;
use crate::classify::length_batches;
use crate::data::{Encoded, Padding};
use crate::scoring::{PassLayout, ScoreBatch, Scorer};
use crate::error::LlamaError;
use crate::model::Llama;
use burn::config::Config;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use melora_core::{AnyAdapter, LoraTap, NoiseSource, Sampler, SamplingMode, Taps};
use nalgebra::{DMatrix, SymmetricEigen};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
                return bad(format!("prior_precision Fixed({l}) must be in (0, 1e12] (the grid searches 1e-4 .. 1e6)"));
            }
        }
        Ok(())
    }
}

/// The grid of prior precisions searched: `10^-4 .. 10^6` in steps of 10^0.2.
pub fn precision_grid() -> Vec<f64> {
    (0..=50).map(|i| 10f64.powf(-4.0 + 0.2 * i as f64)).collect()
}

/// The raw curvature sums of one LoRA layer.
#[derive(Debug, Clone)]
pub struct LayerCurvature {
    /// Module path (`model.layers.0.self_attn.q_proj`).
    pub name: String,
    /// `Σ x x^T`, `[n, n]`.
    pub xx: DMatrix<f64>,
    /// `Σ u u^T`, `u = A x`, `[r, r]`.
    pub uu: DMatrix<f64>,
    /// `Σ g g^T` over tokens and Fisher square roots, `[m, m]`.
    pub gg: DMatrix<f64>,
    /// The MAP `A`, `[r, n]`.
    pub a: DMatrix<f64>,
    /// The MAP `B`, `[m, r]`.
    pub b: DMatrix<f64>,
    /// `s = alpha / r`.
    pub scaling: f64,
}

/// Curvature accumulated over a data set.
#[derive(Debug, Clone)]
pub struct Curvature {
    /// One entry per LoRA layer, in the model's order.
    pub layers: Vec<LayerCurvature>,
    /// Examples seen.
    pub examples: usize,
    /// Real tokens seen.
    pub tokens: usize,
    /// Sum of the examples' NLL at the MAP.
    pub nll: f64,
}

/// One Kronecker factor, eigendecomposed and truncated.
#[derive(Debug, Clone)]
pub struct Factor {
    /// Eigenvectors as columns, `[dim, k]`.
    pub vectors: DMatrix<f64>,
    /// Eigenvalues (descending, clamped at 0), `k` of them.
    pub values: Vec<f64>,
}

impl Factor {
    /// The top `rank` eigenpairs of the symmetric matrix `m`.
    pub fn of(m: &DMatrix<f64>, rank: usize) -> Self {
        let sym = (m + m.transpose()) * 0.5;
        let eig = SymmetricEigen::new(sym);
        let mut order: Vec<usize> = (0..eig.eigenvalues.len()).collect();
        order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
        order.truncate(rank.min(order.len()));
        let vectors = DMatrix::from_fn(m.nrows(), order.len(), |r, c| eig.eigenvectors[(r, order[c])]);
        let values = order.iter().map(|&i| eig.eigenvalues[i].max(0.0)).collect();
        Self { vectors, values }
    }

    /// The dimension of the factor.
    pub fn dim(&self) -> usize {
        self.vectors.nrows()
    }

    /// The (truncated) factor as a dense matrix `Q Λ Q^T`.
    pub fn dense(&self) -> DMatrix<f64> {
        let scaled = DMatrix::from_fn(self.dim(), self.values.len(), |r, c| self.vectors[(r, c)] * self.values[c]);
        &scaled * self.vectors.transpose()
    }
}

/// The posterior curvature block of one LoRA matrix: `output ⊗ input`.
#[derive(Debug, Clone)]
pub struct Block {
    /// `model.layers.0.self_attn.q_proj.lora_A` etc.
    pub name: String,
    /// Output-side factor (`rows x rows` of the matrix).
    pub output: Factor,
    /// Input-side factor (`cols x cols`).
    pub input: Factor,
}

impl Block {
    /// Rows and columns of the matrix.
    pub fn shape(&self) -> (usize, usize) {
        (self.output.dim(), self.input.dim())
    }

    /// `Σ_ij ln(1 + g_i a_j / λ)`: this block's part of
    /// `ln det(H + λ I) - P ln λ`.
    pub fn log_det_ratio(&self, lambda: f64) -> f64 {
        self.output.values.iter().flat_map(|g| self.input.values.iter().map(move |a| (1.0 + g * a / lambda).ln())).sum()
    }

    /// The block's curvature `G ⊗ I_in` (truncated factors) as a dense
    /// matrix over row-major `vec(W)` (for tests; `P^2` entries).
    pub fn dense_curvature(&self) -> DMatrix<f64> {
        self.output.dense().kronecker(&self.input.dense())
    }
}

/// The Laplace posterior: the MAP adapter (stored beside it), the blocks and
/// the prior precision.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// One block per LoRA matrix (`lora_A`, `lora_B` of each layer in order).
    pub blocks: Vec<Block>,
    /// The prior precision `λ`.
    pub prior_precision: f64,
}

impl Curvature {
    /// The posterior blocks, with the output factors scaled by
    /// `data_scale` (`N / n` when the curvature saw `n` of `N` examples).
    /// A layer whose accumulated curvature is not finite (an overflow in
    /// its gradients or activations) is an error naming it.
    pub fn blocks(&self, data_scale: f64, factor_rank: usize) -> crate::Result<Vec<Block>> {
        let tokens = self.tokens.max(1) as f64;
        let mut blocks = Vec::new();
        for layer in &self.layers {
            for (what, m) in [("output gradients' (G)", &layer.gg), ("inputs' (A)", &layer.xx), ("rank-space inputs' (U)", &layer.uu)] {
                let bad = m.iter().filter(|v| !v.is_finite()).count();
                if bad > 0 {
                    return Err(LlamaError::Numerical(format!(
                        "the Laplace curvature of {}: {bad} of the {} entries of the {what} factor are not finite",
                        layer.name,
                        m.len()
                    )));
                }
            }
            let s2 = layer.scaling * layer.scaling * data_scale;
            let g_a = layer.b.transpose() * &layer.gg * &layer.b * s2;
            blocks.push(Block {
                name: format!("{}.lora_A", layer.name),
                output: Factor::of(&g_a, factor_rank),
                input: Factor::of(&(&layer.xx / tokens), factor_rank),
            });
            blocks.push(Block {
                name: format!("{}.lora_B", layer.name),
                output: Factor::of(&(&layer.gg * s2), factor_rank),
                input: Factor::of(&(&layer.uu / tokens), factor_rank),
            });
        }
        Ok(blocks)
    }

    /// `Σ ||θ_MAP||^2` over every LoRA matrix.
    pub fn map_norm_sq(&self) -> f64 {
        self.layers.iter().map(|l| l.a.norm_squared() + l.b.norm_squared()).sum()
    }
}

/// The Laplace approximation of the log marginal likelihood (up to a
/// constant): `-NLL - λ ||θ||^2 / 2 - Σ ln(1 + g_i a_j / λ) / 2`, where the
/// prior is `N(0, I / λ)` and `nll` is the training NLL (summed).
pub fn log_marginal_likelihood(blocks: &[Block], nll: f64, map_norm_sq: f64, lambda: f64) -> f64 {
    -nll - 0.5 * lambda * map_norm_sq - 0.5 * blocks.iter().map(|b| b.log_det_ratio(lambda)).sum::<f64>()
}

fn to_matrix<B: burn::tensor::backend::Backend>(t: Tensor<B, 2>) -> DMatrix<f64> {
    let [r, c] = t.dims();
    DMatrix::from_row_slice(r, c, &t.into_data().convert::<f64>().to_vec::<f64>().expect("f64 data"))
}

fn token_mask<B: burn::tensor::backend::Backend>(pass: &PassLayout, device: &B::Device) -> Tensor<B, 3> {
    let (b, t) = (pass.mask.len(), pass.mask.first().map_or(0, |r| r.len()));
    let values: Vec<f32> = pass.mask.iter().flat_map(|row| row.iter().map(|&m| if m { 1.0 } else { 0.0 })).collect();
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
fn tapped<B: AutodiffBackend>(model: &Llama<B>, batch: &ScoreBatch, scorer: &Scorer, device: &B::Device) -> (Tensor<B, 2>, Taps) {
    let mut taps = Taps::default();
    let mut noise = NoiseSource::seeded(0);
    let logits = {
        let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise).with_taps(&mut taps);
        scorer.scores(model, batch, &mut sampler, device)
    };
    (logits, taps)
}

/// The MAP LoRA layers of `model`: name, `A`, `B`, scaling.
fn lora_layers<B: AutodiffBackend>(model: &Llama<B>) -> crate::Result<Vec<(String, Tensor<B::InnerBackend, 2>, Tensor<B::InnerBackend, 2>, f64)>> {
    let layers: Vec<_> = model
        .adapters()
        .into_iter()
        .map(|(name, adapter)| match adapter {
            AnyAdapter::Lora(a) => Ok((name, a.lora_a.val().inner(), a.lora_b.val().inner(), a.scaling)),
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
fn probe_grads<B: AutodiffBackend>(taps: &[&LoraTap<B>], grads: &B::Gradients, mask: &Tensor<B::InnerBackend, 3>) -> Vec<Tensor<B::InnerBackend, 3>> {
    taps.iter()
        .map(|tap| {
            let g = tap.probe.grad(grads).unwrap_or_else(|| tap.probe.clone().inner().zeros_like());
            g.mul(mask.clone())
        })
        .collect()
}

fn gram<B: burn::tensor::backend::Backend>(x: Tensor<B, 3>) -> DMatrix<f64> {
    let [b, t, d] = x.dims();
    let flat = x.reshape([b * t, d]);
    to_matrix(melora_kernels::matmul(flat.clone().transpose(), flat))
}

/// Accumulates the KFAC curvature of `model`'s LoRA layers over `examples`.
#[allow(clippy::too_many_arguments)]
pub fn accumulate<B: AutodiffBackend>(
    model: &Llama<B>,
    examples: &[Encoded],
    scorer: &Scorer,
    config: &LaplaceConfig,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize),
) -> crate::Result<Curvature> {
    let layers = lora_layers(model)?;
    let k = scorer.classes;
    let mut curvature = Curvature {
        layers: layers
            .iter()
            .map(|(name, a, b, s)| {
                let (a, b) = (to_matrix(a.clone()), to_matrix(b.clone()));
                LayerCurvature {
                    name: name.clone(),
                    xx: DMatrix::zeros(a.ncols(), a.ncols()),
                    uu: DMatrix::zeros(a.nrows(), a.nrows()),
                    gg: DMatrix::zeros(b.nrows(), b.nrows()),
                    a,
                    b,
                    scaling: *s,
                }
            })
            .collect(),
        examples: 0,
        tokens: 0,
        nll: 0.0,
    };
    let mut rng = StdRng::seed_from_u64(config.seed);
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, config.batch_size);
    for (done, chunk) in batches.iter().enumerate() {
        let batch = scorer.batch(examples, chunk, Padding::Left);
        let passes = batch.passes();
        let n = chunk.len();
        let masks: Vec<Tensor<B::InnerBackend, 3>> = passes.iter().map(|p| token_mask::<B::InnerBackend>(p, device)).collect();
        // The first pass: probabilities, NLL and the input factors.
        let (logits, taps) = tapped(model, &batch, scorer, device);
        let p: Vec<f64> = burn::tensor::activation::softmax(logits.clone().detach(), 1).into_data().convert::<f64>().to_vec().expect("f64");
        for (row, &i) in chunk.iter().enumerate() {
            curvature.nll -= p[row * k + examples[i].label].max(f64::MIN_POSITIVE).ln();
        }
        curvature.examples += n;
        curvature.tokens += passes.iter().map(|p| p.mask.iter().flatten().filter(|&&m| m).count()).sum::<usize>();
        for (pass, mask) in lora_taps::<B>(&taps, layers.len(), passes.len()).iter().zip(&masks) {
            for (j, tap) in pass.iter().enumerate() {
                let x = tap.input.clone().inner().mul(mask.clone());
                let u = x.clone().matmul(layers[j].1.clone().transpose().unsqueeze::<3>());
                curvature.layers[j].xx += gram(x);
                curvature.layers[j].uu += gram(u);
            }
        }
        // The Fisher's square roots: weights w with ∇ = J^T w per example.
        let weights: Vec<Vec<f64>> = match config.fisher {
            FisherKind::Exact => (0..k)
                .map(|c| {
                    (0..n)
                        .flat_map(|row| {
                            let p = &p[row * k..(row + 1) * k];
                            (0..k).map(move |j| p[c].sqrt() * (f64::from(j == c) - p[j]))
                        })
                        .collect()
                })
                .collect(),
            FisherKind::MonteCarlo => (0..config.mc_samples)
                .map(|_| {
                    let scale = 1.0 / (config.mc_samples as f64).sqrt();
                    let mut w = Vec::with_capacity(n * k);
                    for row in 0..n {
                        let p = &p[row * k..(row + 1) * k];
                        let y = sample_class(p, rng.random::<f64>());
                        w.extend((0..k).map(|j| scale * (p[j] - f64::from(j == y))));
                    }
                    w
                })
                .collect(),
        };
        let mut first = Some((logits, taps));
        for w in weights {
            let (logits, taps) = first.take().unwrap_or_else(|| tapped(model, &batch, scorer, device));
            let w = Tensor::<B, 2>::from_data(TensorData::new(w, [n, k]), device);
            let grads = logits.mul(w).sum().backward();
            for (pass, mask) in lora_taps::<B>(&taps, layers.len(), passes.len()).iter().zip(&masks) {
                for (j, g) in probe_grads::<B>(pass, &grads, mask).into_iter().enumerate() {
                    curvature.layers[j].gg += gram(g);
                }
            }
        }
        on_batch(done + 1, batches.len());
    }
    Ok(curvature)
}

/// The class drawn by a uniform `u` from probabilities `p`.
fn sample_class(p: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (j, &pj) in p.iter().enumerate() {
        acc += pj;
        if u < acc {
            return j;
        }
    }
    p.len() - 1
}

/// The linearised predictive of a set of examples: MAP logits and the
/// logit covariances `J Σ J^T` for each prior precision asked for.
#[derive(Debug, Clone)]
pub struct Linearised {
    /// Classes.
    pub k: usize,
    /// MAP class logits, `[examples, k]` row-major.
    pub mean: Vec<f64>,
    /// Per prior precision: `[examples, k, k]` row-major.
    pub covariance: Vec<Vec<f64>>,
}

/// The per-example Jacobian of every class logit with respect to each LoRA
/// matrix, contracted with the posterior blocks into `J Σ J^T`.
#[allow(clippy::too_many_arguments)]
pub fn linearise<B: AutodiffBackend>(
    model: &Llama<B>,
    blocks: &[Block],
    lambdas: &[f64],
    examples: &[Encoded],
    scorer: &Scorer,
    batch_size: usize,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize),
) -> crate::Result<Linearised> {
    let layers = lora_layers(model)?;
    if blocks.len() != 2 * layers.len() {
        return Err(LlamaError::Mismatch(format!("the posterior has {} blocks for {} LoRA layers", blocks.len(), layers.len())));
    }
    for (j, (name, a, b, _)) in layers.iter().enumerate() {
        let ([r, n], [m, _]) = (a.dims(), b.dims());
        if blocks[2 * j].shape() != (r, n) || blocks[2 * j + 1].shape() != (m, r) || !blocks[2 * j].name.starts_with(name.as_str()) {
            return Err(LlamaError::Mismatch(format!("the posterior's block {} does not match the adapter {name}", blocks[2 * j].name)));
        }
    }
    let k = scorer.classes;
    let mut out = Linearised { k, mean: vec![0.0; examples.len() * k], covariance: vec![vec![0.0; examples.len() * k * k]; lambdas.len()] };
    // c_ij(λ) = 1 / (g_i a_j + λ) - 1 / λ per block.
    let coefficients: Vec<Vec<DMatrix<f64>>> = lambdas
        .iter()
        .map(|&l| {
            blocks
                .iter()
                .map(|b| DMatrix::from_fn(b.output.values.len(), b.input.values.len(), |i, j| 1.0 / (b.output.values[i] * b.input.values[j] + l) - 1.0 / l))
                .collect()
        })
        .collect();
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, batch_size);
    for (done, chunk) in batches.iter().enumerate() {
        let batch = scorer.batch(examples, chunk, Padding::Left);
        let passes = batch.passes();
        let n = chunk.len();
        let masks: Vec<Tensor<B::InnerBackend, 3>> = passes.iter().map(|p| token_mask::<B::InnerBackend>(p, device)).collect();
        // jac[block][class]: [n, rows * cols] row-major per example.
        let mut jac: Vec<Vec<Vec<f64>>> = vec![Vec::with_capacity(k); blocks.len()];
        for c in 0..k {
            let (logits, taps) = tapped(model, &batch, scorer, device);
            if c == 0 {
                let values: Vec<f64> = logits.clone().detach().into_data().convert::<f64>().to_vec().expect("f64");
                for (row, &i) in chunk.iter().enumerate() {
                    out.mean[i * k..(i + 1) * k].copy_from_slice(&values[row * k..(row + 1) * k]);
                }
            }
            // Only examples that have class c: the others' masked logit is a constant.
            let w: Vec<f32> = chunk.iter().flat_map(|&i| (0..k).map(move |j| if j == c && c < examples[i].n_choices { 1.0 } else { 0.0 })).collect();
            let w = Tensor::<B, 2>::from_data(TensorData::new(w, [n, k]), device);
            let grads = logits.mul(w).sum().backward();
            let taps = lora_taps::<B>(&taps, layers.len(), passes.len());
            // Per layer, the Jacobians summed over the passes' rows of each example.
            let mut sums: Vec<Option<(Tensor<B::InnerBackend, 3>, Tensor<B::InnerBackend, 3>)>> = vec![None; layers.len()];
            for ((pass, mask), layout) in taps.iter().zip(&masks).zip(&passes) {
                for (j, g) in probe_grads::<B>(pass, &grads, mask).into_iter().enumerate() {
                    let (_, a, b, s) = &layers[j];
                    let x = pass[j].input.clone().inner().mul(mask.clone());
                    let u = x.clone().matmul(a.clone().transpose().unsqueeze::<3>());
                    // J_A = s B^T Σ_t g_t x_t^T, J_B = s Σ_t g_t u_t^T.
                    let gb = g.clone().matmul(b.clone().unsqueeze::<3>());
                    let j_a = rows_to_examples(gb.swap_dims(1, 2).matmul(x).mul_scalar(*s), &layout.example, n);
                    let j_b = rows_to_examples(g.swap_dims(1, 2).matmul(u).mul_scalar(*s), &layout.example, n);
                    sums[j] = Some(match sums[j].take() {
                        Some((sa, sb)) => (sa.add(j_a), sb.add(j_b)),
                        None => (j_a, j_b),
                    });
                }
            }
            for (j, sum) in sums.into_iter().enumerate() {
                let (j_a, j_b) = sum.expect("every layer tapped");
                jac[2 * j].push(j_a.into_data().convert::<f64>().to_vec().expect("f64"));
                jac[2 * j + 1].push(j_b.into_data().convert::<f64>().to_vec().expect("f64"));
            }
        }
        for (bi, block) in blocks.iter().enumerate() {
            let (rows, cols) = block.shape();
            let size = rows * cols;
            for (row, &i) in chunk.iter().enumerate() {
                let js: Vec<DMatrix<f64>> = (0..k).map(|c| DMatrix::from_row_slice(rows, cols, &jac[bi][c][row * size..(row + 1) * size])).collect();
                let ts: Vec<DMatrix<f64>> = js.iter().map(|j| block.output.vectors.transpose() * j * &block.input.vectors).collect();
                for c in 0..k {
                    for d in c..k {
                        let inner = js[c].dot(&js[d]);
                        let product = ts[c].component_mul(&ts[d]);
                        for (li, &lambda) in lambdas.iter().enumerate() {
                            let v = inner / lambda + coefficients[li][bi].dot(&product);
                            let cov = &mut out.covariance[li][i * k * k..(i + 1) * k * k];
                            cov[c * k + d] += v;
                            if d != c {
                                cov[d * k + c] += v;
                            }
                        }
                    }
                }
            }
        }
        on_batch(done + 1, batches.len());
    }
    Ok(out)
}

/// The probit approximation (multi-class, as in laplace-torch):
/// `softmax(μ / sqrt(1 + π/8 diag Σ))` per example. A variance that is
/// not finite or clearly negative is an error naming the example and
/// the prior precision (`prior_precision`, for the message).
pub fn probit(mean: &[f64], covariance: &[f64], k: usize, prior_precision: f64) -> crate::Result<Vec<f64>> {
    let mut scaled = Vec::with_capacity(mean.len());
    for (i, (mu, cov)) in mean.chunks(k).zip(covariance.chunks(k * k)).enumerate() {
        let diagonal: Vec<f64> = (0..k).map(|j| cov[j * k + j]).collect();
        let scale = diagonal.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if let Some(v) = diagonal.iter().find(|v| !v.is_finite() || **v < -1e-9 * (1.0 + scale)) {
            return Err(not_positive(i, prior_precision, &format!("a logit variance of {v:e}")));
        }
        scaled.extend((0..k).map(|j| mu[j] / (1.0 + std::f64::consts::PI / 8.0 * diagonal[j].max(0.0)).sqrt()));
    }
    Ok(crate::eval::softmax_rows(&scaled, k))
}

fn not_positive(example: usize, prior_precision: f64, what: &str) -> LlamaError {
    LlamaError::Numerical(format!(
        "Laplace: the linearised logit covariance of example {example} under prior precision {prior_precision:e} is not positive \
         semi-definite ({what}); the posterior's factors are broken, or the prior precision is too small for f64 to keep \
         J Σ J^T apart from its cancellation"
    ))
}

/// The Monte Carlo predictive: the mean softmax of `samples` draws of the
/// logits from `N(μ, Σ)` per example.
pub fn sampled(mean: &[f64], covariance: &[f64], k: usize, samples: usize, seed: u64, prior_precision: f64) -> crate::Result<Vec<f64>> {
    let s = samples.max(1);
    Ok(draws(mean, covariance, k, s, seed, prior_precision)?
        .chunks(s * k)
        .flat_map(|rows| (0..k).map(move |j| rows.chunks(k).map(|r| r[j]).sum::<f64>() / s as f64))
        .collect())
}

/// The softmax of each of `samples` draws of the logits from `N(μ, Σ)`
/// per example, `[examples, samples, k]` row-major. A covariance whose
/// Cholesky factorisation fails (after a jitter of 1e-10 of its largest
/// variance) is an error naming the example and the prior precision
/// (`prior_precision`, for the message), never a silent `Σ = 0`.
pub fn draws(mean: &[f64], covariance: &[f64], k: usize, samples: usize, seed: u64, prior_precision: f64) -> crate::Result<Vec<f64>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = move || {
        // Box-Muller.
        let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let mut out = Vec::with_capacity(mean.len() * samples.max(1));
    for (i, (mu, cov)) in mean.chunks(k).zip(covariance.chunks(k * k)).enumerate() {
        let mut sigma = DMatrix::from_row_slice(k, k, cov);
        if let Some(v) = sigma.iter().find(|v| !v.is_finite()) {
            return Err(not_positive(i, prior_precision, &format!("an entry of {v}")));
        }
        let jitter = 1e-10 * (1.0 + sigma.diagonal().max());
        for j in 0..k {
            sigma[(j, j)] += jitter;
        }
        let Some(l) = nalgebra::Cholesky::new(sigma.clone()).map(|c| c.l()) else {
            let smallest = SymmetricEigen::new(sigma).eigenvalues.min();
            return Err(not_positive(i, prior_precision, &format!("smallest eigenvalue {smallest:e} after a jitter of {jitter:e}")));
        };
        for _ in 0..samples.max(1) {
            let z = nalgebra::DVector::from_fn(k, |_, _| normal());
            let f: Vec<f64> = (0..k).map(|j| mu[j] + (l.row(j) * &z)[0]).collect();
            out.extend(crate::eval::softmax_rows(&f, k));
        }
    }
    Ok(out)
}

/// What `laplace.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaplaceMeta {
    /// The MAP run this posterior belongs to.
    pub run: PathBuf,
    /// The settings.
    pub config: LaplaceConfig,
    /// The chosen prior precision.
    pub prior_precision: f64,
    /// Training examples (all) and those the curvature saw.
    pub n_train: usize,
    /// Examples the curvature was accumulated over.
    pub curvature_examples: usize,
    /// Their real tokens.
    pub curvature_tokens: usize,
    /// Training NLL (summed, scaled to all training examples).
    pub train_nll: f64,
    /// `(λ, criterion)` over the grid: log marginal likelihood, or
    /// validation NLL.
    pub search: Vec<(f64, f64)>,
    /// Seconds spent on the curvature and on the search.
    pub seconds: (f64, f64),
}

/// `laplace.json`, the blocks' factors and a copy of the MAP adapter.
pub struct LaplaceDir {
    /// The folder.
    pub dir: PathBuf,
}

impl LaplaceDir {
    /// `dir/laplace.json`.
    pub fn meta(&self) -> PathBuf {
        self.dir.join("laplace.json")
    }
    /// `dir/factors.safetensors`.
    pub fn factors(&self) -> PathBuf {
        self.dir.join("factors.safetensors")
    }
    /// `dir/adapter`: the MAP adapter (PEFT format).
    pub fn adapter(&self) -> PathBuf {
        self.dir.join("adapter")
    }
    /// Whether `dir` holds a Laplace posterior.
    pub fn is_laplace(dir: &Path) -> bool {
        dir.join("laplace.json").is_file()
    }

    /// Writes the metadata and the factors (f64).
    pub fn save(&self, meta: &LaplaceMeta, blocks: &[Block]) -> crate::Result<()> {
        use safetensors::tensor::{Dtype, TensorView};
        std::fs::create_dir_all(&self.dir).map_err(|e| LlamaError::write(&self.dir, e))?;
        let mut buffers: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for b in blocks {
            for (side, f) in [("output", &b.output), ("input", &b.input)] {
                // Column-major nalgebra storage -> row-major [dim, k].
                let rows: Vec<f64> = (0..f.dim()).flat_map(|r| (0..f.values.len()).map(move |c| f.vectors[(r, c)])).collect();
                buffers.push((format!("{}.{side}.vectors", b.name), rows.iter().flat_map(|v| v.to_le_bytes()).collect(), vec![f.dim(), f.values.len()]));
                buffers.push((format!("{}.{side}.values", b.name), f.values.iter().flat_map(|v| v.to_le_bytes()).collect(), vec![f.values.len()]));
            }
        }
        let views: Vec<(String, TensorView)> = buffers
            .iter()
            .map(|(name, bytes, shape)| Ok((name.clone(), TensorView::new(Dtype::F64, shape.clone(), bytes).map_err(|e| LlamaError::serialize(name.as_str(), e))?)))
            .collect::<crate::Result<_>>()?;
        let order: Vec<String> = blocks.iter().map(|b| b.name.clone()).collect();
        let metadata = std::collections::HashMap::from([("blocks".to_string(), order.join(","))]);
        let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| LlamaError::serialize("the posterior's tensors", e))?;
        write_atomic(&self.factors(), &bytes)?;
        let text = serde_json::to_string_pretty(meta).map_err(|e| LlamaError::serialize("laplace.json", e))?;
        write_atomic(&self.meta(), text.as_bytes())
    }

    /// Reads the metadata and the blocks.
    pub fn load(&self) -> crate::Result<(LaplaceMeta, Vec<Block>)> {
        let path = self.meta();
        let text = std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e))?;
        let meta: LaplaceMeta = serde_json::from_str(&text).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        if !(meta.prior_precision > 0.0 && meta.prior_precision <= 1e12) {
            return Err(LlamaError::format(&path, format!("prior_precision {} must be in (0, 1e12]", meta.prior_precision)));
        }
        // The summed training NLL: a mean above 1e4 nats per example is no MAP fit.
        if !(meta.train_nll >= 0.0 && meta.train_nll <= 1e4 * meta.n_train.max(1) as f64) {
            return Err(LlamaError::format(&path, format!("train_nll {} must be in [0, 1e4 n_train]", meta.train_nll)));
        }
        if meta.curvature_examples > meta.n_train {
            return Err(LlamaError::format(
                &path,
                format!("curvature_examples {} exceeds n_train {}", meta.curvature_examples, meta.n_train),
            ));
        }
        let path = self.factors();
        let bytes = std::fs::read(&path).map_err(|e| LlamaError::io(&path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        let order = header.metadata().as_ref().and_then(|m| m.get("blocks").cloned()).ok_or_else(|| LlamaError::format(&path, "no block list in the metadata"))?;
        let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        let read = |name: &str| -> crate::Result<(Vec<f64>, Vec<usize>)> {
            let t = tensors.tensor(name).map_err(|_| LlamaError::format(&path, format!("missing tensor {name}")))?;
            if t.dtype() != safetensors::Dtype::F64 {
                return Err(LlamaError::format(&path, format!("{name} is not f64")));
            }
            Ok((t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(), t.shape().to_vec()))
        };
        let factor = |name: &str| -> crate::Result<Factor> {
            let (vectors, shape) = read(&format!("{name}.vectors"))?;
            let (values, _) = read(&format!("{name}.values"))?;
            if shape.len() != 2 || shape[1] != values.len() {
                return Err(LlamaError::format(&path, format!("{name}: vectors {shape:?} and {} values", values.len())));
            }
            if let Some(v) = vectors.iter().find(|v| !v.is_finite()) {
                return Err(LlamaError::format(&path, format!("{name}.vectors holds {v}")));
            }
            if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(LlamaError::format(&path, format!("{name}.values holds {v} (eigenvalues of a curvature factor are finite and >= 0)")));
            }
            Ok(Factor { vectors: DMatrix::from_row_slice(shape[0], shape[1], &vectors), values })
        };
        let blocks = order
            .split(',')
            .map(|name| Ok(Block { name: name.to_string(), output: factor(&format!("{name}.output"))?, input: factor(&format!("{name}.input"))? }))
            .collect::<crate::Result<_>>()?;
        Ok((meta, blocks))
    }
}
