//! Calibration metrics on class probabilities, and the Bayesian model average.
//!
//! method.md section 3: accuracy, NLL (mean over examples), ECE (top-label,
//! 15 equal-width bins, L1, binned as torchmetrics does: bin `k` holds
//! confidences in `[k/15, (k+1)/15)`, the last bin also holds 1), Brier
//! score (`mean_i sum_k (p_ik - y_ik)^2`). All in f64 on the host.

use crate::error::{CoreError, Result};
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// The number of ECE bins method.md prescribes.
pub const ECE_BINS: usize = 15;

/// Class probabilities of `n` examples over `k` classes, with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassProbs {
    probs: Vec<f64>,
    labels: Vec<usize>,
    classes: usize,
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge of the confidence interval.
    pub lower: f64,
    /// Upper edge.
    pub upper: f64,
    /// Examples whose top-label confidence falls in the bin.
    pub count: usize,
    /// Their accuracy (0 if empty).
    pub accuracy: f64,
    /// Their mean confidence (0 if empty).
    pub confidence: f64,
}

/// The summary metrics of a set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Number of examples.
    pub count: usize,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// Mean negative log-likelihood of the label.
    pub nll: f64,
    /// Expected calibration error (15 bins, top label, L1).
    pub ece: f64,
    /// Brier score.
    pub brier: f64,
}

impl ClassProbs {
    /// Probabilities `probs` (row-major, `labels.len()` rows of `classes`).
    /// Rows must be non-negative and sum to 1 (within 1e-4); labels must be
    /// below `classes`.
    pub fn new(probs: Vec<f64>, classes: usize, labels: Vec<usize>) -> Result<Self> {
        if classes == 0 || probs.len() != classes * labels.len() {
            return Err(CoreError::Metric(format!(
                "{} probabilities for {} examples of {classes} classes",
                probs.len(),
                labels.len()
            )));
        }
        for (i, row) in probs.chunks(classes).enumerate() {
            let sum: f64 = row.iter().sum();
            if row.iter().any(|p| !(p.is_finite() && *p >= 0.0)) || (sum - 1.0).abs() > 1e-4 {
                return Err(CoreError::Metric(format!("row {i} is not a distribution: {row:?}")));
            }
            if labels[i] >= classes {
                return Err(CoreError::Metric(format!("label {} of row {i} is not below {classes}", labels[i])));
            }
        }
        Ok(Self { probs, labels, classes })
    }

    /// The probabilities, row-major.
    pub fn probs(&self) -> &[f64] {
        &self.probs
    }

    /// Probabilities from logits (softmax per row, in f64).
    pub fn from_logits(logits: &[f64], classes: usize, labels: Vec<usize>) -> Result<Self> {
        if classes == 0 || logits.len() != classes * labels.len() {
            return Err(CoreError::Metric(format!("{} logits for {} examples", logits.len(), labels.len())));
        }
        let probs = logits.chunks(classes).flat_map(softmax_f64).collect();
        Self::new(probs, classes, labels)
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The probability rows.
    pub fn rows(&self) -> impl Iterator<Item = &[f64]> {
        self.probs.chunks(self.classes)
    }

    /// The labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The predicted class (first maximum) and its probability, per example.
    pub fn top(&self) -> Vec<(usize, f64)> {
        self.rows()
            .map(|row| {
                row.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (k, &p)| if p > best.1 { (k, p) } else { best })
            })
            .collect()
    }

    /// Fraction of examples whose top class is the label.
    pub fn accuracy(&self) -> f64 {
        let correct = self.top().iter().zip(&self.labels).filter(|((k, _), y)| k == *y).count();
        correct as f64 / self.len().max(1) as f64
    }

    /// Mean `-ln p(label)`; a zero probability counts as `-ln(f64::MIN_POSITIVE)`.
    pub fn nll(&self) -> f64 {
        let total: f64 = self.rows().zip(&self.labels).map(|(row, &y)| -row[y].max(f64::MIN_POSITIVE).ln()).sum();
        total / self.len().max(1) as f64
    }

    /// Mean over examples of `sum_k (p_k - 1[k = label])^2`.
    pub fn brier(&self) -> f64 {
        let total: f64 = self
            .rows()
            .zip(&self.labels)
            .map(|(row, &y)| row.iter().enumerate().map(|(k, p)| (p - if k == y { 1.0 } else { 0.0 }).powi(2)).sum::<f64>())
            .sum();
        total / self.len().max(1) as f64
    }

    /// The reliability diagram's bins (top-label confidence, equal width).
    pub fn reliability(&self, bins: usize) -> Vec<ReliabilityBin> {
        let mut count = vec![0usize; bins];
        let mut correct = vec![0f64; bins];
        let mut confidence = vec![0f64; bins];
        for ((k, p), &y) in self.top().into_iter().zip(&self.labels) {
            let bin = ((p * bins as f64).floor() as usize).min(bins - 1);
            count[bin] += 1;
            correct[bin] += if k == y { 1.0 } else { 0.0 };
            confidence[bin] += p;
        }
        (0..bins)
            .map(|b| {
                let n = count[b].max(1) as f64;
                ReliabilityBin {
                    lower: b as f64 / bins as f64,
                    upper: (b + 1) as f64 / bins as f64,
                    count: count[b],
                    accuracy: correct[b] / n,
                    confidence: confidence[b] / n,
                }
            })
            .collect()
    }

    /// Expected calibration error over `bins` equal-width bins:
    /// `sum_b (n_b / n) |acc_b - conf_b|`.
    pub fn ece(&self, bins: usize) -> f64 {
        let n = self.len().max(1) as f64;
        self.reliability(bins).iter().map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs()).sum()
    }

    /// Every summary metric (ECE with [`ECE_BINS`] bins).
    pub fn metrics(&self) -> Metrics {
        Metrics {
            count: self.len(),
            accuracy: self.accuracy(),
            nll: self.nll(),
            ece: self.ece(ECE_BINS),
            brier: self.brier(),
        }
    }
}

/// A numerically stable softmax of one row.
pub fn softmax_f64(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|v| v / sum).collect()
}

/// The Bayesian model average of `S` samples: the mean of their softmax
/// probabilities (not of their logits).
///
/// # Shapes
///
/// - each sample: `[examples, classes]` logits
/// - output: `[examples, classes]` probabilities
pub fn bayesian_average<B: Backend>(logit_samples: Vec<Tensor<B, 2>>) -> Tensor<B, 2> {
    let s = logit_samples.len();
    assert!(s > 0, "bayesian_average needs at least one sample");
    let probs: Vec<Tensor<B, 3>> = logit_samples.into_iter().map(|l| softmax(l, 1).unsqueeze::<3>()).collect();
    Tensor::cat(probs, 0).mean_dim(0).squeeze_dim::<2>(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::TestBackend;

    fn example() -> ClassProbs {
        // Four examples, three classes.
        ClassProbs::new(
            vec![
                0.7, 0.2, 0.1, // label 0: correct, conf 0.7
                0.1, 0.5, 0.4, // label 2: wrong, conf 0.5
                0.05, 0.05, 0.9, // label 2: correct, conf 0.9
                0.3, 0.34, 0.36, // label 0: wrong, conf 0.36
            ],
            3,
            vec![0, 2, 2, 0],
        )
        .unwrap()
    }

    #[test]
    fn accuracy_nll_brier_by_hand() {
        let p = example();
        assert_eq!(p.accuracy(), 0.5);
        let nll = -(0.7f64.ln() + 0.4f64.ln() + 0.9f64.ln() + 0.3f64.ln()) / 4.0;
        assert!((p.nll() - nll).abs() < 1e-12);
        let brier = ((0.3f64.powi(2) + 0.04 + 0.01)
            + (0.01 + 0.25 + 0.36)
            + (0.0025 + 0.0025 + 0.01)
            + (0.49 + 0.34f64.powi(2) + 0.36f64.powi(2)))
            / 4.0;
        assert!((p.brier() - brier).abs() < 1e-12);
    }

    #[test]
    fn ece_by_hand() {
        // 15 bins of width 1/15: 0.36 -> bin 5, 0.5 -> bin 7, 0.7 -> bin 10,
        // 0.9 -> bin 13: one example per bin, so ECE = mean |correct - conf|.
        let p = example();
        let ece = ((1.0 - 0.7) + 0.5 + (1.0 - 0.9) + 0.36) / 4.0;
        assert!((p.ece(15) - ece).abs() < 1e-12, "{} vs {ece}", p.ece(15));
        // Two bins: [0, .5) holds 0.36 (wrong); [.5, 1] holds 0.7 (right),
        // 0.5 (wrong), 0.9 (right): |2/3 - 0.7| * 3/4 + |0 - 0.36| / 4.
        let ece2 = (2.0 / 3.0 - 0.7f64).abs() * 0.75 + 0.36 / 4.0;
        assert!((p.ece(2) - ece2).abs() < 1e-12);
        // A confidence of exactly 1 goes to the last bin.
        let sure = ClassProbs::new(vec![1.0, 0.0], 2, vec![0]).unwrap();
        assert_eq!(sure.reliability(15)[14].count, 1);
        assert_eq!(sure.ece(15), 0.0);
    }

    #[test]
    fn invalid_inputs_are_rejected() {
        assert!(ClassProbs::new(vec![0.5, 0.6], 2, vec![0]).is_err());
        assert!(ClassProbs::new(vec![0.5, 0.5], 2, vec![2]).is_err());
        assert!(ClassProbs::new(vec![0.5, 0.5, 1.0], 2, vec![0]).is_err());
    }

    #[test]
    fn bayesian_average_averages_probabilities_not_logits() {
        let device = Default::default();
        let a = Tensor::<TestBackend, 2>::from_floats([[4.0, 0.0]], &device);
        let b = Tensor::<TestBackend, 2>::from_floats([[0.0, 4.0]], &device);
        let avg: Vec<f64> = bayesian_average(vec![a, b]).into_data().to_vec().unwrap();
        let p = softmax_f64(&[4.0, 0.0]);
        assert!((avg[0] - (p[0] + p[1]) / 2.0).abs() < 1e-12);
        assert!((avg[0] - 0.5).abs() < 1e-12);
        let single = Tensor::<TestBackend, 2>::from_floats([[1.0, 2.0, 3.0]], &device);
        let one: Vec<f64> = bayesian_average(vec![single]).into_data().to_vec().unwrap();
        let expected = softmax_f64(&[1.0, 2.0, 3.0]);
        for (x, y) in one.iter().zip(&expected) {
            assert!((x - y).abs() < 1e-12);
        }
    }
}
