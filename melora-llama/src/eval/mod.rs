//! Prediction with a Bayesian model average over `S` samples, and the
//! metrics of docs/method.md section 3.

use crate::data::length_batches;
use crate::data::{Encoded, Padding};
use crate::model::scoring::Scorer;
use crate::model::Llama;
use burn::config::Config;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use melora_core::{ClassProbs, NoiseDevice, NoiseSource, Sampler, SamplingMode, Uncertainty};
use serde::{Deserialize, Serialize};

mod ensemble;
pub use ensemble::{ensemble_probs, predict_ensemble, EnsembleAverage, EnsembleConfig};

/// How a run predicts at evaluation (a run's `predict` section): what
/// [`PredictOptions`] takes from the run's settings.
#[derive(Config, Debug, PartialEq)]
pub struct PredictConfig {
    /// Samples of the Bayesian model average (MC dropout: passes with
    /// dropout on).
    #[config(default = 10)]
    pub samples: usize,
    /// Examples per forward pass.
    #[config(default = 8)]
    pub batch_size: usize,
}

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
        Self {
            samples: 1,
            mode: SamplingMode::Mean,
            dropout: false,
            batch_size,
            seed: 0,
            padding: Padding::Left,
            noise: NoiseDevice::Auto,
        }
    }

    /// How an adapter with no run configuration beside it predicts: a
    /// Bayesian one (BLoB, Me-LoRA) averages 10 per-example draws, LoRA
    /// uses its weights.
    pub fn for_adapter(bayesian: bool, batch_size: usize) -> Self {
        match bayesian {
            true => Self {
                samples: 10,
                mode: SamplingMode::PerExample,
                ..Self::mean(batch_size)
            },
            false => Self::mean(batch_size),
        }
    }
}

/// What a user asks of an evaluation on top of a model's own way of
/// predicting (`melora eval`'s flags).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PredictFlags {
    /// Samples `S`.
    pub samples: Option<usize>,
    /// Sampling mode.
    pub mode: Option<SamplingMode>,
    /// Keep adapter dropout on (MC dropout on any adapter).
    pub dropout: bool,
    /// Seed of the sampling noise.
    pub seed: u64,
}

impl PredictFlags {
    /// `defaults` (the run's way of predicting, or
    /// [`PredictOptions::for_adapter`]) with the flags on top: dropout
    /// asked of a model that does not already sample with it means 10 MC
    /// dropout samples unless `samples` says otherwise; a Bayesian adapter
    /// with more than one sample draws per example unless `mode` says
    /// otherwise.
    pub fn apply(self, defaults: PredictOptions, bayesian: bool) -> PredictOptions {
        let dropout = self.dropout || defaults.dropout;
        // `--mode mean` without dropout draws nothing: one pass, not the
        // run's samples over and over.
        let deterministic = self.mode == Some(SamplingMode::Mean) && !dropout;
        let samples = self.samples.unwrap_or(if self.dropout && !defaults.dropout {
            10
        } else if deterministic {
            1
        } else {
            defaults.samples
        });
        let mode = self.mode.unwrap_or(if bayesian && samples > 1 {
            SamplingMode::PerExample
        } else {
            SamplingMode::Mean
        });
        PredictOptions {
            samples,
            mode,
            dropout,
            seed: self.seed,
            ..defaults
        }
    }
}

/// Class probabilities of `examples` (scored by `scorer`), averaged over
/// the samples as probabilities (the Bayesian model average).
/// `on_batch(done, total)` reports progress.
pub fn predict<B: Backend>(
    model: &Llama<B>,
    examples: &[Encoded],
    scorer: &Scorer,
    options: &PredictOptions,
    device: &B::Device,
    on_batch: impl FnMut(usize, usize),
) -> crate::Result<ClassProbs> {
    Ok(predict_samples(model, examples, scorer, options, device, on_batch)?.average())
}

/// What [`predict_samples`] returns: every sample's class probabilities
/// (an evaluation's `predictions.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledProbs {
    /// `[examples, samples, classes]` row-major.
    pub probs: Vec<f64>,
    /// Samples per example.
    pub samples: usize,
    /// Classes.
    pub classes: usize,
    /// Labels.
    pub labels: Vec<usize>,
}

impl SampledProbs {
    /// The Bayesian model average: the mean of the samples' probabilities.
    pub fn average(&self) -> ClassProbs {
        let (s, k) = (self.samples, self.classes);
        let mut probs = vec![0f64; self.labels.len() * k];
        for (i, row) in probs.chunks_mut(k).enumerate() {
            for sample in self.probs[i * s * k..(i + 1) * s * k].chunks(k) {
                row.iter_mut().zip(sample).for_each(|(p, q)| *p += q / s as f64);
            }
            // Renormalise away rounding so every row sums to 1.
            let sum: f64 = row.iter().sum();
            row.iter_mut().for_each(|p| *p /= sum);
        }
        ClassProbs::new(probs, k, self.labels.clone()).expect("probabilities of the right shape")
    }

    /// The posterior spread of the prediction: the mean over examples of
    /// the standard deviation across samples of the gold choice's
    /// probability (0 for a deterministic model).
    pub fn gold_std(&self) -> f64 {
        let (s, k) = (self.samples, self.classes);
        if self.labels.is_empty() {
            return 0.0;
        }
        let total: f64 = self
            .labels
            .iter()
            .enumerate()
            .map(|(i, &y)| {
                let p: Vec<f64> = (0..s).map(|j| self.probs[(i * s + j) * k + y]).collect();
                let mean = p.iter().sum::<f64>() / s as f64;
                (p.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / s as f64).sqrt()
            })
            .sum();
        total / self.labels.len() as f64
    }

    /// Total, aleatoric and epistemic uncertainty, each the mean over
    /// examples: the entropy of the averaged prediction, the mean entropy of
    /// the samples, and their difference (the mutual information).
    pub fn uncertainty(&self) -> (f64, f64, f64) {
        let per = self.per_example();
        let n = per.len().max(1) as f64;
        let mean = |f: fn(&Uncertainty) -> f64| per.iter().map(f).sum::<f64>() / n;
        (mean(|u| u.total), mean(|u| u.aleatoric), mean(|u| u.epistemic))
    }

    /// Each example's uncertainty decomposition ([`Uncertainty::of`] its samples).
    pub fn per_example(&self) -> Vec<Uncertainty> {
        let sk = self.samples * self.classes;
        (0..self.labels.len())
            .map(|i| Uncertainty::of(&self.probs[i * sk..(i + 1) * sk], self.classes))
            .collect()
    }

    /// Each example's answer: the model-average probabilities of its
    /// `n_choices[i]` choices (the padding classes of a shorter question,
    /// whose probability is 0, dropped), the most probable choice, its
    /// probability, and the uncertainty decomposition of the samples.
    pub fn answers(&self, n_choices: &[usize]) -> Vec<Answer> {
        let average = self.average();
        let per = self.per_example();
        average
            .rows()
            .zip(per)
            .zip(n_choices)
            .map(|((row, uncertainty), &n)| {
                let probabilities = row[..n.min(row.len())].to_vec();
                let (prediction, confidence) =
                    probabilities
                        .iter()
                        .copied()
                        .enumerate()
                        .fold(
                            (0, f64::NEG_INFINITY),
                            |best, (i, p)| if p > best.1 { (i, p) } else { best },
                        );
                Answer {
                    probabilities,
                    prediction,
                    confidence,
                    uncertainty,
                }
            })
            .collect()
    }

    /// Samples of `k` classes from per-member (or per-draw) probabilities,
    /// each `[examples, k]` row-major: member `m` becomes sample `m`.
    pub fn from_members(members: &[Vec<f64>], k: usize, labels: Vec<usize>) -> Self {
        let (n, s) = (labels.len(), members.len());
        let mut probs = vec![0f64; n * s * k];
        for (m, member) in members.iter().enumerate() {
            assert_eq!(member.len(), n * k, "a member's probabilities for every example");
            for i in 0..n {
                probs[(i * s + m) * k..(i * s + m + 1) * k].copy_from_slice(&member[i * k..(i + 1) * k]);
            }
        }
        Self {
            probs,
            samples: s,
            classes: k,
            labels,
        }
    }
}

/// One question's prediction ([`SampledProbs::answers`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The Bayesian-model-average probability of each choice.
    pub probabilities: Vec<f64>,
    /// The most probable choice.
    pub prediction: usize,
    /// Its probability.
    pub confidence: f64,
    /// Total, aleatoric and epistemic (mutual information) uncertainty, in nats.
    pub uncertainty: Uncertainty,
}

/// Every sample's class probabilities of `examples`, `[examples, samples,
/// classes]`; see [`predict`].
pub fn predict_samples<B: Backend>(
    model: &Llama<B>,
    examples: &[Encoded],
    scorer: &Scorer,
    options: &PredictOptions,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize),
) -> crate::Result<SampledProbs> {
    let k = scorer.classes;
    let deterministic = options.mode == SamplingMode::Mean && !options.dropout;
    let samples = if deterministic { 1 } else { options.samples.max(1) };
    let mut probs = vec![0f64; examples.len() * samples * k];
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, options.batch_size);
    let mut noise = options.noise.source::<B>(options.seed, device);
    for (done, chunk) in batches.iter().enumerate() {
        // Each example repeated `samples` times: with per-example sampling
        // every copy gets its own draw.
        let repeated: Vec<usize> = chunk.iter().flat_map(|&i| std::iter::repeat_n(i, samples)).collect();
        let batch = scorer.batch(examples, &repeated, options.padding);
        let mut sampler = Sampler::new(options.mode, &mut noise).with_dropout(options.dropout);
        let scores = scorer.scores(model, &batch, &mut sampler, device);
        let p: Vec<f64> = softmax(scores, 1)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64 probabilities");
        for (row, &i) in repeated.iter().enumerate() {
            let j = row % samples;
            probs[(i * samples + j) * k..(i * samples + j + 1) * k].copy_from_slice(&p[row * k..(row + 1) * k]);
        }
        on_batch(done + 1, batches.len());
    }
    if examples.iter().any(|e| e.label >= k) {
        return Err(crate::LlamaError::Mismatch(format!(
            "an example's label is out of range for {k} classes"
        )));
    }
    let labels = examples.iter().map(|e| e.label).collect();
    Ok(SampledProbs {
        probs,
        samples,
        classes: k,
        labels,
    })
}

/// The class scores `[examples, classes]` (row-major) of a deterministic
/// pass with the mean weights; labels an example lacks get
/// [`crate::model::classify::MASKED_LOGIT`].
pub fn predict_logits<B: Backend>(
    model: &Llama<B>,
    examples: &[Encoded],
    scorer: &Scorer,
    batch_size: usize,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize),
) -> Vec<f64> {
    let k = scorer.classes;
    let mut out = vec![0f64; examples.len() * k];
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batches = length_batches(examples, &indices, batch_size);
    let mut noise = NoiseSource::seeded(0);
    for (done, chunk) in batches.iter().enumerate() {
        let batch = scorer.batch(examples, chunk, Padding::Left);
        let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise);
        let logits: Vec<f64> = scorer
            .scores(model, &batch, &mut sampler, device)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64 logits");
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

#[cfg(test)]
mod tests {
    use super::SampledProbs;

    fn entropy(p: &[f64]) -> f64 {
        -p.iter().map(|v| v * v.ln()).sum::<f64>()
    }

    #[test]
    fn sampled_probs_average_spread_and_mutual_information() {
        // Two examples, two samples each: the first's samples disagree, the
        // second's agree.
        let sampled = SampledProbs {
            probs: vec![0.9, 0.1, 0.5, 0.5, 0.2, 0.8, 0.2, 0.8],
            samples: 2,
            classes: 2,
            labels: vec![0, 1],
        };
        let avg = sampled.average();
        assert_eq!(avg.probs(), &[0.7, 0.3, 0.2, 0.8]);
        // The gold probability's std across samples: 0.2 and 0.
        assert!((sampled.gold_std() - 0.1).abs() < 1e-15);
        let (total, aleatoric, epistemic) = sampled.uncertainty();
        let want_total = (entropy(&[0.7, 0.3]) + entropy(&[0.2, 0.8])) / 2.0;
        let want_aleatoric = ((entropy(&[0.9, 0.1]) + entropy(&[0.5, 0.5])) / 2.0 + entropy(&[0.2, 0.8])) / 2.0;
        assert!((total - want_total).abs() < 1e-15 && (aleatoric - want_aleatoric).abs() < 1e-15);
        assert!((epistemic - (want_total - want_aleatoric)).abs() < 1e-15 && epistemic > 0.0);
        // One sample: no spread and no epistemic part.
        let one = SampledProbs {
            probs: vec![0.9, 0.1],
            samples: 1,
            classes: 2,
            labels: vec![0],
        };
        assert_eq!((one.gold_std(), one.uncertainty().2), (0.0, 0.0));
    }

    /// `melora eval`'s flags over a model's own way of predicting.
    #[test]
    fn flags_over_the_defaults() {
        use super::{PredictFlags, PredictOptions};
        use melora_core::SamplingMode;
        let none = PredictFlags {
            seed: 3,
            ..Default::default()
        };
        // A LoRA adapter: the mean weights; a Bayesian one: 10 per-example draws.
        let lora = none.apply(PredictOptions::for_adapter(false, 8), false);
        assert_eq!(
            (lora.samples, lora.mode, lora.dropout, lora.seed),
            (1, SamplingMode::Mean, false, 3)
        );
        let bayes = none.apply(PredictOptions::for_adapter(true, 8), true);
        assert_eq!(
            (bayes.samples, bayes.mode, bayes.dropout),
            (10, SamplingMode::PerExample, false)
        );
        // --dropout on LoRA: MC dropout with 10 samples, or --samples.
        let mcd = PredictFlags { dropout: true, ..none }.apply(PredictOptions::mean(8), false);
        assert_eq!((mcd.samples, mcd.mode, mcd.dropout), (10, SamplingMode::Mean, true));
        let mcd = PredictFlags {
            dropout: true,
            samples: Some(4),
            ..none
        }
        .apply(PredictOptions::mean(8), false);
        assert_eq!(mcd.samples, 4);
        // --samples 1 on a Bayesian adapter: the mean weights; --mode wins.
        let one = PredictFlags {
            samples: Some(1),
            ..none
        }
        .apply(PredictOptions::for_adapter(true, 8), true);
        assert_eq!((one.samples, one.mode), (1, SamplingMode::Mean));
        let batch = PredictFlags {
            mode: Some(SamplingMode::PerBatch),
            ..none
        }
        .apply(PredictOptions::for_adapter(true, 8), true);
        assert_eq!((batch.samples, batch.mode), (10, SamplingMode::PerBatch));
        // --mode mean: one pass at the mean weights, unless dropout samples.
        let mean = PredictFlags {
            mode: Some(SamplingMode::Mean),
            ..none
        };
        let at_mean = mean.apply(PredictOptions::for_adapter(true, 8), true);
        assert_eq!((at_mean.samples, at_mean.mode), (1, SamplingMode::Mean));
        let mcd_run = PredictOptions {
            samples: 10,
            dropout: true,
            ..PredictOptions::mean(8)
        };
        assert_eq!(mean.apply(mcd_run, false).samples, 10);
    }
}
