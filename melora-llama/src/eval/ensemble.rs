//! Deep ensembles at prediction time: combining the members' predictions.

use super::{predict_logits, softmax_rows, SampledProbs};
use crate::data::Encoded;
use crate::model::scoring::Scorer;
use crate::model::Llama;
use burn::config::Config;
use burn::tensor::backend::Backend;
use melora_core::ClassProbs;

/// How a deep ensemble combines its members' predictions.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum EnsembleAverage {
    /// The mean of the members' class probabilities (the usual deep ensemble).
    Probabilities,
    /// The softmax of the members' mean logits.
    Logits,
}

/// A deep ensemble (a run's `ensemble` section): its members, their
/// seeds and how their predictions combine.
#[derive(Config, Debug, PartialEq)]
pub struct EnsembleConfig {
    /// The number of members.
    #[config(default = 3)]
    pub members: usize,
    /// The members' seeds (default: the run's `seed, seed + 1, ...`).
    #[config(default = "None")]
    pub seeds: Option<Vec<u64>>,
    /// How the members' predictions are combined.
    #[config(default = "EnsembleAverage::Probabilities")]
    pub average: EnsembleAverage,
}

impl std::str::FromStr for EnsembleAverage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "probabilities" | "probs" => Ok(Self::Probabilities),
            "logits" => Ok(Self::Logits),
            _ => Err(format!(
                "unknown ensemble average {s:?}: expected probabilities or logits"
            )),
        }
    }
}

/// A deep ensemble's probabilities from its members' logits (each
/// `[examples, k]` row-major): the mean of the members' softmaxes, or the
/// softmax of their mean logits.
pub fn ensemble_probs(members: &[Vec<f64>], k: usize, average: EnsembleAverage) -> Vec<f64> {
    let n = members.first().map_or(0, |m| m.len());
    let mean = |rows: Vec<Vec<f64>>| -> Vec<f64> {
        (0..n)
            .map(|i| rows.iter().map(|r| r[i]).sum::<f64>() / rows.len() as f64)
            .collect()
    };
    match average {
        EnsembleAverage::Probabilities => mean(members.iter().map(|m| softmax_rows(m, k)).collect()),
        EnsembleAverage::Logits => softmax_rows(&mean(members.to_vec()), k),
    }
}

/// A deep ensemble's prediction of `examples`: each member's logits in
/// turn (`members` yields them one at a time, so one is in memory at
/// once), combined by `average`. The members are also the samples of the
/// uncertainty decomposition. `on_batch(member, done, total)` reports
/// progress.
pub fn predict_ensemble<B: Backend>(
    members: impl IntoIterator<Item = crate::Result<Llama<B>>>,
    examples: &[Encoded],
    scorer: &Scorer,
    batch_size: usize,
    average: EnsembleAverage,
    device: &B::Device,
    mut on_batch: impl FnMut(usize, usize, usize),
) -> crate::Result<(ClassProbs, SampledProbs)> {
    let k = scorer.classes;
    let mut logits = Vec::new();
    for (m, member) in members.into_iter().enumerate() {
        logits.push(predict_logits(
            &member?,
            examples,
            scorer,
            batch_size,
            device,
            |done, total| on_batch(m, done, total),
        ));
    }
    let labels: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let probs = ClassProbs::new(ensemble_probs(&logits, k, average), k, labels.clone())?;
    let sampled = SampledProbs::from_members(
        &logits.iter().map(|m| softmax_rows(m, k)).collect::<Vec<_>>(),
        k,
        labels,
    );
    Ok((probs, sampled))
}
