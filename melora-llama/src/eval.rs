//! Prediction with a Bayesian model average over `S` samples, and the
//! metrics of method.md section 3.

use crate::classify::{batch_of, length_batches};
use crate::data::{Encoded, Padding};
use crate::model::Llama;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use melora_core::{ClassProbs, NoiseDevice, NoiseSource, Sampler, SamplingMode};
use serde::{Deserialize, Serialize};

/// How to predict.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictOptions {
    /// Samples averaged per example (1 for a deterministic model).
    pub samples: usize,
    /// How each sample draws the adapters' random weights (`PerExample`
    /// makes the `S` copies of an example independent samples).
    pub mode: SamplingMode,
    /// Keep adapter dropout on (MC dropout).
    pub dropout: bool,
    /// Examples per forward pass (each repeated `samples` times).
    pub batch_size: usize,
    /// Seed of the sampling noise.
    pub seed: u64,
    /// Padding side.
    pub padding: Padding,
    /// Which generator draws the sampling noise.
    #[serde(default)]
    pub noise: NoiseDevice,
}

impl PredictOptions {
    /// One deterministic pass with the mean weights.
    pub fn mean(batch_size: usize) -> Self {
        Self { samples: 1, mode: SamplingMode::Mean, dropout: false, batch_size, seed: 0, padding: Padding::Left, noise: NoiseDevice::Auto }
    }
}

/// Class probabilities of `examples` (over `label_ids`, `labels` classes),
/// averaged over the samples as probabilities (the Bayesian model average).
/// `on_batch(done, total)` reports progress.
pub fn predict<B: Backend>(
    model: &Llama<B>,
    examples: &[Encoded],
    label_ids: &[u32],
    pad: u32,
    options: &PredictOptions,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize),
) -> crate::Result<ClassProbs> {
    let k = label_ids.len();
    let deterministic = options.mode == SamplingMode::Mean && !options.dropout;
    let samples = if deterministic { 1 } else { options.samples.max(1) };
    let mut probs = vec![0f64; examples.len() * k];
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, options.batch_size);
    let mut noise = options.noise.source::<B>(options.seed, device);
    for (done, chunk) in batches.iter().enumerate() {
        // Each example repeated `samples` times: with per-example sampling
        // every copy gets its own draw.
        let repeated: Vec<usize> = chunk.iter().flat_map(|&i| std::iter::repeat_n(i, samples)).collect();
        let batch = batch_of(examples, &repeated, pad, options.padding);
        let mut sampler = Sampler::new(options.mode, &mut noise).with_dropout(options.dropout);
        let logits = model.class_logits(&batch, label_ids, &mut sampler, device);
        let p: Vec<f64> = softmax(logits, 1).into_data().convert::<f64>().to_vec().expect("f64 probabilities");
        for (row, &i) in repeated.iter().enumerate() {
            for j in 0..k {
                probs[i * k + j] += p[row * k + j] / samples as f64;
            }
        }
        on_batch(done + 1, batches.len());
    }
    // Renormalise away rounding so every row sums to 1.
    for row in probs.chunks_mut(k) {
        let sum: f64 = row.iter().sum();
        row.iter_mut().for_each(|p| *p /= sum);
    }
    let labels = examples.iter().map(|e| e.label).collect();
    Ok(ClassProbs::new(probs, k, labels)?)
}

/// The class logits `[examples, labels]` (row-major) of a deterministic
/// pass with the mean weights; labels an example lacks get
/// [`crate::classify::MASKED_LOGIT`].
pub fn predict_logits<B: Backend>(
    model: &Llama<B>,
    examples: &[Encoded],
    label_ids: &[u32],
    pad: u32,
    batch_size: usize,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize),
) -> Vec<f64> {
    let k = label_ids.len();
    let mut out = vec![0f64; examples.len() * k];
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, batch_size);
    let mut noise = NoiseSource::seeded(0);
    for (done, chunk) in batches.iter().enumerate() {
        let batch = batch_of(examples, chunk, pad, Padding::Left);
        let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise);
        let logits: Vec<f64> = model.class_logits(&batch, label_ids, &mut sampler, device).into_data().convert::<f64>().to_vec().expect("f64 logits");
        for (row, &i) in chunk.iter().enumerate() {
            out[i * k..(i + 1) * k].copy_from_slice(&logits[row * k..(row + 1) * k]);
        }
        on_batch(done + 1, batches.len());
    }
    out
}

/// Softmax of each row of `logits` (`k` columns), in f64.
pub fn softmax_rows(logits: &[f64], k: usize) -> Vec<f64> {
    logits.chunks(k).flat_map(melora_core::metrics::softmax_f64).collect()
}

/// A deep ensemble's probabilities from its members' logits (each
/// `[examples, k]` row-major): the mean of the members' softmaxes, or the
/// softmax of their mean logits.
pub fn ensemble_probs(members: &[Vec<f64>], k: usize, average: crate::train::EnsembleAverage) -> Vec<f64> {
    let n = members.first().map_or(0, |m| m.len());
    let mean = |rows: Vec<Vec<f64>>| -> Vec<f64> {
        (0..n).map(|i| rows.iter().map(|r| r[i]).sum::<f64>() / rows.len() as f64).collect()
    };
    match average {
        crate::train::EnsembleAverage::Probabilities => mean(members.iter().map(|m| softmax_rows(m, k)).collect()),
        crate::train::EnsembleAverage::Logits => softmax_rows(&mean(members.to_vec()), k),
    }
}
