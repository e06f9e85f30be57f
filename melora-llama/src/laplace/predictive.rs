//! The linearised predictive: the logits' mean and covariance per example,
//! then the probit approximation or samples of the logit Gaussian.

use super::{lora_layers, lora_taps, probe_grads, rows_to_examples, tapped, token_mask, Block};
use crate::data::{length_batches, Encoded, Padding};
use crate::error::LlamaError;
use crate::eval::SampledProbs;
use crate::model::scoring::Scorer;
use crate::model::Llama;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use nalgebra::{DMatrix, SymmetricEigen};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

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
        return Err(LlamaError::Mismatch(format!(
            "the posterior has {} blocks for {} LoRA layers",
            blocks.len(),
            layers.len()
        )));
    }
    for (j, (name, a, b, _)) in layers.iter().enumerate() {
        let ([r, n], [m, _]) = (a.dims(), b.dims());
        if blocks[2 * j].shape() != (r, n)
            || blocks[2 * j + 1].shape() != (m, r)
            || !blocks[2 * j].name.starts_with(name.as_str())
        {
            return Err(LlamaError::Mismatch(format!(
                "the posterior's block {} does not match the adapter {name}",
                blocks[2 * j].name
            )));
        }
    }
    let k = scorer.classes;
    let mut out = Linearised {
        k,
        mean: vec![0.0; examples.len() * k],
        covariance: vec![vec![0.0; examples.len() * k * k]; lambdas.len()],
    };
    // c_ij(λ) = 1 / (g_i a_j + λ) - 1 / λ per block.
    let coefficients: Vec<Vec<DMatrix<f64>>> = lambdas
        .iter()
        .map(|&l| {
            blocks
                .iter()
                .map(|b| {
                    DMatrix::from_fn(b.output.values.len(), b.input.values.len(), |i, j| {
                        1.0 / (b.output.values[i] * b.input.values[j] + l) - 1.0 / l
                    })
                })
                .collect()
        })
        .collect();
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, batch_size);
    for (done, chunk) in batches.iter().enumerate() {
        let batch = scorer.batch(examples, chunk, Padding::Left);
        let passes = batch.passes();
        let n = chunk.len();
        let masks: Vec<Tensor<B::InnerBackend, 3>> = passes
            .iter()
            .map(|p| token_mask::<B::InnerBackend>(p, device))
            .collect();
        // jac[block][class]: [n, rows * cols] row-major per example.
        let mut jac: Vec<Vec<Vec<f64>>> = vec![Vec::with_capacity(k); blocks.len()];
        for c in 0..k {
            let (logits, taps) = tapped(model, &batch, scorer, device);
            if c == 0 {
                let values: Vec<f64> = logits
                    .clone()
                    .detach()
                    .into_data()
                    .convert::<f64>()
                    .to_vec()
                    .expect("f64");
                for (row, &i) in chunk.iter().enumerate() {
                    out.mean[i * k..(i + 1) * k].copy_from_slice(&values[row * k..(row + 1) * k]);
                }
            }
            // Only examples that have class c: the others' masked logit is a constant.
            let w: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| (0..k).map(move |j| if j == c && c < examples[i].n_choices { 1.0 } else { 0.0 }))
                .collect();
            let w = Tensor::<B, 2>::from_data(TensorData::new(w, [n, k]), device);
            let grads = logits.mul(w).sum().backward();
            let taps = lora_taps::<B>(&taps, layers.len(), passes.len());
            // Per layer, the Jacobians summed over the passes' rows of each example.
            let mut sums: Vec<Option<(Tensor<B::InnerBackend, 3>, Tensor<B::InnerBackend, 3>)>> =
                vec![None; layers.len()];
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
                let js: Vec<DMatrix<f64>> = (0..k)
                    .map(|c| DMatrix::from_row_slice(rows, cols, &jac[bi][c][row * size..(row + 1) * size]))
                    .collect();
                let ts: Vec<DMatrix<f64>> = js
                    .iter()
                    .map(|j| block.output.vectors.transpose() * j * &block.input.vectors)
                    .collect();
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
pub fn sampled(
    mean: &[f64],
    covariance: &[f64],
    k: usize,
    samples: usize,
    seed: u64,
    prior_precision: f64,
) -> crate::Result<Vec<f64>> {
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
pub fn draws(
    mean: &[f64],
    covariance: &[f64],
    k: usize,
    samples: usize,
    seed: u64,
    prior_precision: f64,
) -> crate::Result<Vec<f64>> {
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
            return Err(not_positive(
                i,
                prior_precision,
                &format!("smallest eigenvalue {smallest:e} after a jitter of {jitter:e}"),
            ));
        };
        for _ in 0..samples.max(1) {
            let z = nalgebra::DVector::from_fn(k, |_, _| normal());
            let f: Vec<f64> = (0..k).map(|j| mu[j] + (l.row(j) * &z)[0]).collect();
            out.extend(crate::eval::softmax_rows(&f, k));
        }
    }
    Ok(out)
}

/// The predictive of `lin` (one prior precision, `λ`): the probit
/// approximation for `samples = 1`, else `samples` draws of the logit
/// Gaussian per example (the samples of the uncertainty decomposition;
/// seeded by `seed`).
pub fn predictive(
    lin: &Linearised,
    labels: Vec<usize>,
    samples: usize,
    seed: u64,
    prior_precision: f64,
) -> crate::Result<SampledProbs> {
    let k = lin.k;
    let cov = lin
        .covariance
        .first()
        .ok_or_else(|| LlamaError::Mismatch("a linearised predictive with no covariance".into()))?;
    Ok(if samples > 1 {
        SampledProbs {
            probs: draws(&lin.mean, cov, k, samples, seed, prior_precision)?,
            samples,
            classes: k,
            labels,
        }
    } else {
        SampledProbs {
            probs: probit(&lin.mean, cov, k, prior_precision)?,
            samples: 1,
            classes: k,
            labels,
        }
    })
}
