//! The Kronecker-factored curvature of each LoRA matrix ([`super`]'s
//! conventions): accumulating the factors over data, eigendecomposing and
//! truncating them into posterior blocks.

use super::{gram, lora_layers, lora_taps, probe_grads, tapped, to_matrix, token_mask, FisherKind, LaplaceConfig};
use crate::data::{length_batches, Encoded, Padding};
use crate::error::LlamaError;
use crate::model::scoring::Scorer;
use crate::model::Llama;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use nalgebra::{DMatrix, SymmetricEigen};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

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
        let scaled = DMatrix::from_fn(self.dim(), self.values.len(), |r, c| {
            self.vectors[(r, c)] * self.values[c]
        });
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
        self.output
            .values
            .iter()
            .flat_map(|g| self.input.values.iter().map(move |a| (1.0 + g * a / lambda).ln()))
            .sum()
    }

    /// The block's curvature `G ⊗ I_in` (truncated factors) as a dense
    /// matrix over row-major `vec(W)` (for tests; `P^2` entries).
    pub fn dense_curvature(&self) -> DMatrix<f64> {
        self.output.dense().kronecker(&self.input.dense())
    }
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
            for (what, m) in [
                ("output gradients' (G)", &layer.gg),
                ("inputs' (A)", &layer.xx),
                ("rank-space inputs' (U)", &layer.uu),
            ] {
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
        self.layers
            .iter()
            .map(|l| l.a.norm_squared() + l.b.norm_squared())
            .sum()
    }
}

/// Accumulates the KFAC curvature of `model`'s LoRA layers over `examples`.
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
        let masks: Vec<Tensor<B::InnerBackend, 3>> = passes
            .iter()
            .map(|p| token_mask::<B::InnerBackend>(p, device))
            .collect();
        // The first pass: probabilities, NLL and the input factors.
        let (logits, taps) = tapped(model, &batch, scorer, device);
        let p: Vec<f64> = burn::tensor::activation::softmax(logits.clone().detach(), 1)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64");
        for (row, &i) in chunk.iter().enumerate() {
            curvature.nll -= p[row * k + examples[i].label].max(f64::MIN_POSITIVE).ln();
        }
        curvature.examples += n;
        curvature.tokens += passes
            .iter()
            .map(|p| p.mask.iter().flatten().filter(|&&m| m).count())
            .sum::<usize>();
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
