//! The posterior: its blocks and prior precision, the marginal likelihood
//! that chooses the precision, and the folder it is saved in.

use super::{accumulate, linearise, precision_grid, probit, Block, Factor, LaplaceConfig, PriorPrecision};
use crate::assets::write_atomic;
use crate::data::{seeded_shuffle, Encoded, SPLIT_SEED};
use crate::error::LlamaError;
use crate::model::Llama;
use crate::train::TrainData;
use burn::tensor::backend::AutodiffBackend;
use melora_core::ClassProbs;
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The Laplace posterior: the MAP adapter (stored beside it), the blocks and
/// the prior precision.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// One block per LoRA matrix (`lora_A`, `lora_B` of each layer in order).
    pub blocks: Vec<Block>,
    /// The prior precision `λ`.
    pub prior_precision: f64,
}

/// The Laplace approximation of the log marginal likelihood (up to a
/// constant): `-NLL - λ ||θ||^2 / 2 - Σ ln(1 + g_i a_j / λ) / 2`, where the
/// prior is `N(0, I / λ)` and `nll` is the training NLL (summed).
pub fn log_marginal_likelihood(blocks: &[Block], nll: f64, map_norm_sq: f64, lambda: f64) -> f64 {
    -nll - 0.5 * lambda * map_norm_sq - 0.5 * blocks.iter().map(|b| b.log_det_ratio(lambda)).sum::<f64>()
}

/// The chosen prior precision and the search behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct PriorChoice {
    /// `λ`.
    pub precision: f64,
    /// `(λ, criterion)` over [`precision_grid`]: the log marginal
    /// likelihood, or the validation NLL (empty for a fixed `λ`).
    pub search: Vec<(f64, f64)>,
    /// Whether a searched `λ` is the grid's first or last: the optimum may
    /// lie beyond it.
    pub at_edge: bool,
}

/// Chooses the prior precision as `how` says: the given one; the maximum
/// of [`log_marginal_likelihood`] over [`precision_grid`] (`train_nll`
/// summed over the training set, `map_norm_sq` from
/// [`super::Curvature::map_norm_sq`]); or the smallest NLL of the probit
/// predictive on `validation` (examples and their labels). `validation`
/// is read only by `PriorPrecision::Validation`.
pub fn choose_prior_precision<B: AutodiffBackend>(
    how: PriorPrecision,
    blocks: &[Block],
    (train_nll, map_norm_sq): (f64, f64),
    validation: (&Llama<B>, &TrainData<'_>, usize),
    device: &B::Device,
    on_batch: impl FnMut(usize, usize),
) -> crate::Result<PriorChoice> {
    let grid = precision_grid();
    let (search, best) = match how {
        PriorPrecision::Fixed(l) => {
            return Ok(PriorChoice {
                precision: l,
                search: vec![],
                at_edge: false,
            })
        }
        PriorPrecision::MarginalLikelihood => {
            let search: Vec<(f64, f64)> = grid
                .iter()
                .map(|&l| (l, log_marginal_likelihood(blocks, train_nll, map_norm_sq, l)))
                .collect();
            let best = search
                .iter()
                .copied()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .expect("a grid");
            (search, best)
        }
        PriorPrecision::Validation => {
            let (model, data, batch_size) = validation;
            let lin = linearise(
                model,
                blocks,
                &grid,
                data.validation,
                data.scorer,
                batch_size,
                device,
                on_batch,
            )?;
            let labels: Vec<usize> = data.validation.iter().map(|e| e.label).collect();
            let search: Vec<(f64, f64)> = grid
                .iter()
                .zip(&lin.covariance)
                .map(|(&l, cov)| {
                    Ok((
                        l,
                        ClassProbs::new(probit(&lin.mean, cov, lin.k, l)?, lin.k, labels.clone())?
                            .metrics()
                            .nll,
                    ))
                })
                .collect::<crate::Result<_>>()?;
            let best = search
                .iter()
                .copied()
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .expect("a grid");
            (search, best)
        }
    };
    Ok(PriorChoice {
        precision: best.0,
        at_edge: best.0 == grid[0] || best.0 == grid[grid.len() - 1],
        search,
    })
}

/// Fits the Laplace posterior of `model` (a MAP LoRA run, `run` its
/// folder): the curvature over a seeded subset of `data.train` of
/// `config.max_examples` examples, the blocks, then the prior precision
/// (on `data.validation` when `config` chooses it by validation).
/// `on_batch(phase, done, total)` reports progress (`"curvature"`,
/// `"validation"`).
pub fn fit_posterior<B: AutodiffBackend>(
    model: &Llama<B>,
    data: &TrainData<'_>,
    config: &LaplaceConfig,
    run: &Path,
    device: &B::Device,
    mut on_batch: impl FnMut(&str, usize, usize),
) -> crate::Result<(LaplaceMeta, Vec<Block>)> {
    let n_train = data.train.len();
    let mut subset: Vec<Encoded> = seeded_shuffle(data.train.to_vec(), SPLIT_SEED);
    subset.truncate(config.max_examples.unwrap_or(n_train));
    let start = Instant::now();
    let curvature = accumulate(model, &subset, data.scorer, config, device, |done, total| {
        on_batch("curvature", done, total)
    })?;
    let data_scale = n_train as f64 / curvature.examples.max(1) as f64;
    let blocks = curvature.blocks(data_scale, config.factor_rank)?;
    let curvature_seconds = start.elapsed().as_secs_f64();
    let train_nll = curvature.nll * data_scale;
    let start = Instant::now();
    let choice = choose_prior_precision(
        config.prior_precision,
        &blocks,
        (train_nll, curvature.map_norm_sq()),
        (model, data, config.batch_size),
        device,
        |done, total| on_batch("validation", done, total),
    )?;
    let meta = LaplaceMeta {
        run: run.to_path_buf(),
        config: config.clone(),
        prior_precision: choice.precision,
        n_train,
        curvature_examples: curvature.examples,
        curvature_tokens: curvature.tokens,
        train_nll,
        search: choice.search,
        seconds: (curvature_seconds, start.elapsed().as_secs_f64()),
    };
    Ok((meta, blocks))
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

impl LaplaceMeta {
    /// Whether the prior precision was searched and came out at an end of
    /// [`precision_grid`]: the optimum may lie beyond it.
    pub fn at_grid_edge(&self) -> bool {
        let grid = precision_grid();
        !matches!(self.config.prior_precision, PriorPrecision::Fixed(_))
            && (self.prior_precision == grid[0] || self.prior_precision == grid[grid.len() - 1])
    }
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
                let rows: Vec<f64> = (0..f.dim())
                    .flat_map(|r| (0..f.values.len()).map(move |c| f.vectors[(r, c)]))
                    .collect();
                buffers.push((
                    format!("{}.{side}.vectors", b.name),
                    rows.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    vec![f.dim(), f.values.len()],
                ));
                buffers.push((
                    format!("{}.{side}.values", b.name),
                    f.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    vec![f.values.len()],
                ));
            }
        }
        let views: Vec<(String, TensorView)> = buffers
            .iter()
            .map(|(name, bytes, shape)| {
                Ok((
                    name.clone(),
                    TensorView::new(Dtype::F64, shape.clone(), bytes)
                        .map_err(|e| LlamaError::serialize(name.as_str(), e))?,
                ))
            })
            .collect::<crate::Result<_>>()?;
        let order: Vec<String> = blocks.iter().map(|b| b.name.clone()).collect();
        let metadata = std::collections::HashMap::from([("blocks".to_string(), order.join(","))]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| LlamaError::serialize("the posterior's tensors", e))?;
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
            return Err(LlamaError::format(
                &path,
                format!("prior_precision {} must be in (0, 1e12]", meta.prior_precision),
            ));
        }
        // The summed training NLL: a mean above 1e4 nats per example is no MAP fit.
        if !(meta.train_nll >= 0.0 && meta.train_nll <= 1e4 * meta.n_train.max(1) as f64) {
            return Err(LlamaError::format(
                &path,
                format!("train_nll {} must be in [0, 1e4 n_train]", meta.train_nll),
            ));
        }
        if meta.curvature_examples > meta.n_train {
            return Err(LlamaError::format(
                &path,
                format!(
                    "curvature_examples {} exceeds n_train {}",
                    meta.curvature_examples, meta.n_train
                ),
            ));
        }
        let path = self.factors();
        let bytes = std::fs::read(&path).map_err(|e| LlamaError::io(&path, e))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        let order = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("blocks").cloned())
            .ok_or_else(|| LlamaError::format(&path, "no block list in the metadata"))?;
        let tensors =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        let read = |name: &str| -> crate::Result<(Vec<f64>, Vec<usize>)> {
            let t = tensors
                .tensor(name)
                .map_err(|_| LlamaError::format(&path, format!("missing tensor {name}")))?;
            if t.dtype() != safetensors::Dtype::F64 {
                return Err(LlamaError::format(&path, format!("{name} is not f64")));
            }
            Ok((
                t.data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
                t.shape().to_vec(),
            ))
        };
        let factor = |name: &str| -> crate::Result<Factor> {
            let (vectors, shape) = read(&format!("{name}.vectors"))?;
            let (values, _) = read(&format!("{name}.values"))?;
            if shape.len() != 2 || shape[1] != values.len() {
                return Err(LlamaError::format(
                    &path,
                    format!("{name}: vectors {shape:?} and {} values", values.len()),
                ));
            }
            if let Some(v) = vectors.iter().find(|v| !v.is_finite()) {
                return Err(LlamaError::format(&path, format!("{name}.vectors holds {v}")));
            }
            if let Some(v) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(LlamaError::format(
                    &path,
                    format!("{name}.values holds {v} (eigenvalues of a curvature factor are finite and >= 0)"),
                ));
            }
            Ok(Factor {
                vectors: DMatrix::from_row_slice(shape[0], shape[1], &vectors),
                values,
            })
        };
        let blocks = order
            .split(',')
            .map(|name| {
                Ok(Block {
                    name: name.to_string(),
                    output: factor(&format!("{name}.output"))?,
                    input: factor(&format!("{name}.input"))?,
                })
            })
            .collect::<crate::Result<_>>()?;
        Ok((meta, blocks))
    }
}
