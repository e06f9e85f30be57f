//! Calibration metrics on class probabilities, the Bayesian model average,
//! the entropy decomposition of a sampled prediction and the AUROC of an
//! out-of-distribution detector.
//!
//! docs/method.md section 3: accuracy, NLL (mean over examples), ECE (top-label,
//! 15 equal-width bins, L1, binned as torchmetrics does: bin `k` holds
//! confidences in `[k/15, (k+1)/15)`, the last bin also holds 1), Brier
//! score (`mean_i sum_k (p_ik - y_ik)^2`). All in f64 on the host.

use crate::error::{CoreError, Result};
use burn::tensor::activation::softmax;
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// The number of ECE bins docs/method.md prescribes.
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
                return Err(CoreError::Metric(format!(
                    "label {} of row {i} is not below {classes}",
                    labels[i]
                )));
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
            return Err(CoreError::Metric(format!(
                "{} logits for {} examples",
                logits.len(),
                labels.len()
            )));
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
                row.iter().enumerate().fold(
                    (0, f64::NEG_INFINITY),
                    |best, (k, &p)| if p > best.1 { (k, p) } else { best },
                )
            })
            .collect()
    }

    /// Fraction of examples whose top class is the label.
    pub fn accuracy(&self) -> f64 {
        let correct = self
            .top()
            .iter()
            .zip(&self.labels)
            .filter(|((k, _), y)| k == *y)
            .count();
        correct as f64 / self.len().max(1) as f64
    }

    /// Mean `-ln p(label)`; a zero probability counts as `-ln(f64::MIN_POSITIVE)`.
    pub fn nll(&self) -> f64 {
        self.nlls().iter().sum::<f64>() / self.len().max(1) as f64
    }

    /// Each example's `-ln p(label)` (probabilities floored at the
    /// smallest positive f64).
    pub fn nlls(&self) -> Vec<f64> {
        (self.rows().zip(&self.labels))
            .map(|(row, &y)| -row[y].max(f64::MIN_POSITIVE).ln())
            .collect()
    }

    /// Mean over examples of `sum_k (p_k - 1[k = label])^2`.
    pub fn brier(&self) -> f64 {
        let total: f64 = self
            .rows()
            .zip(&self.labels)
            .map(|(row, &y)| {
                row.iter()
                    .enumerate()
                    .map(|(k, p)| (p - if k == y { 1.0 } else { 0.0 }).powi(2))
                    .sum::<f64>()
            })
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
        self.reliability(bins)
            .iter()
            .map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs())
            .sum()
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
    let probs: Vec<Tensor<B, 3>> = logit_samples
        .into_iter()
        .map(|l| softmax(l, 1).unsqueeze::<3>())
        .collect();
    Tensor::cat(probs, 0).mean_dim(0).squeeze_dim::<2>(0)
}

/// The entropy (nats) of a probability vector; zero entries add nothing.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter().filter(|&&v| v > 0.0).map(|&v| v * v.ln()).sum::<f64>()
}

/// The decomposition of one example's predictive uncertainty from its `S`
/// sampled probability vectors (`samples`, `[S, k]` row-major): the total
/// (the entropy of their mean), the aleatoric part (the mean of their
/// entropies) and the epistemic part, their difference, the mutual
/// information between the prediction and the weights (Depeweg et al.
/// 2018). One sample: epistemic 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Uncertainty {
    /// `H[mean_s p_s]`.
    pub total: f64,
    /// `mean_s H[p_s]`.
    pub aleatoric: f64,
    /// `total - aleatoric` (never negative: entropy is concave; 0 below
    /// the entropies' rounding).
    pub epistemic: f64,
}

impl Uncertainty {
    /// The decomposition of `samples` (`[S, k]` row-major, `S >= 1`).
    ///
    /// # Panics
    ///
    /// If `k` is 0 or does not divide `samples.len()`.
    pub fn of(samples: &[f64], k: usize) -> Self {
        assert!(
            k > 0 && !samples.is_empty() && samples.len() % k == 0,
            "Uncertainty::of: {} values are not rows of {k}",
            samples.len()
        );
        let s = samples.len() / k;
        let mean: Vec<f64> = (0..k)
            .map(|c| samples.chunks(k).map(|r| r[c]).sum::<f64>() / s as f64)
            .collect();
        let total = entropy(&mean);
        let aleatoric = samples.chunks(k).map(entropy).sum::<f64>() / s as f64;
        // Samples that agree leave rounding (±1e-17) where the mutual
        // information is 0: below the precision of the entropies, 0.
        let epistemic = total - aleatoric;
        let epistemic = if epistemic <= 1e-12 * total.max(1.0) {
            0.0
        } else {
            epistemic
        };
        Self {
            total,
            aleatoric,
            epistemic,
        }
    }
}

/// The area under the ROC curve of a detector whose score should be
/// higher on `positives` (out of distribution) than on `negatives` (in
/// distribution): the probability that a random positive scores above a
/// random negative, ties counting one half (the Mann-Whitney U statistic
/// over `|positives| |negatives|`). `None` when either set is empty or a
/// score is NaN.
pub fn auroc(positives: &[f64], negatives: &[f64]) -> Option<f64> {
    if positives.is_empty() || negatives.is_empty() || positives.iter().chain(negatives).any(|v| v.is_nan()) {
        return None;
    }
    // Rank everything together (average ranks over ties), then U = the
    // positives' rank sum minus its least value.
    let mut all: Vec<(f64, bool)> = positives
        .iter()
        .map(|&v| (v, true))
        .chain(negatives.iter().map(|&v| (v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        // Positions i..=j (0-based) share the rank (i + j) / 2 + 1.
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * all[i..=j].iter().filter(|x| x.1).count() as f64;
        i = j + 1;
    }
    let (p, n) = (positives.len() as f64, negatives.len() as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
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

    #[test]
    fn uncertainty_of_known_distributions() {
        let ln2 = std::f64::consts::LN_2;
        // Two confident samples that disagree: all of the uncertainty is epistemic.
        let u = Uncertainty::of(&[1.0, 0.0, 0.0, 1.0], 2);
        assert!((u.total - ln2).abs() < 1e-15 && u.aleatoric == 0.0 && (u.epistemic - ln2).abs() < 1e-15);
        // Identical uniform samples: all aleatoric.
        let u = Uncertainty::of(&[0.25; 8], 4);
        assert!((u.total - 4f64.ln()).abs() < 1e-15 && (u.aleatoric - 4f64.ln()).abs() < 1e-15 && u.epistemic == 0.0);
        // One sample: total = aleatoric, no epistemic part.
        let u = Uncertainty::of(&[0.7, 0.2, 0.1], 3);
        let h = -(0.7f64 * 0.7f64.ln() + 0.2 * 0.2f64.ln() + 0.1 * 0.1f64.ln());
        assert!((u.total - h).abs() < 1e-15 && u.aleatoric == u.total && u.epistemic == 0.0);
        // A mixed case by hand: samples (0.9, 0.1) and (0.5, 0.5), mean (0.7, 0.3).
        let u = Uncertainty::of(&[0.9, 0.1, 0.5, 0.5], 2);
        let (h_mean, h1, h2) = (entropy(&[0.7, 0.3]), entropy(&[0.9, 0.1]), ln2);
        assert!((u.total - h_mean).abs() < 1e-15 && (u.aleatoric - (h1 + h2) / 2.0).abs() < 1e-15);
        assert!((u.epistemic - (h_mean - (h1 + h2) / 2.0)).abs() < 1e-15 && u.epistemic > 0.0);
    }

    #[test]
    fn auroc_by_hand_with_ties() {
        // Perfect separation, reversed, and nothing to tell apart.
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), Some(1.0));
        assert_eq!(auroc(&[1.0, 2.0], &[3.0, 4.0]), Some(0.0));
        assert_eq!(auroc(&[5.0, 5.0, 5.0], &[5.0, 5.0]), Some(0.5));
        // Positives {0.8, 0.4, 0.4}, negatives {0.4, 0.1}: of the 6 pairs,
        // 0.8 beats both (2), each 0.4 beats 0.1 (2) and ties 0.4 (2 x 1/2).
        assert_eq!(auroc(&[0.8, 0.4, 0.4], &[0.4, 0.1]), Some(5.0 / 6.0));
        // The same by brute force on seeded random scores with many ties.
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 7) as f64
        };
        let pos: Vec<f64> = (0..40).map(|_| next() + 1.0).collect();
        let neg: Vec<f64> = (0..31).map(|_| next()).collect();
        let pairs: f64 = pos
            .iter()
            .map(|p| {
                neg.iter()
                    .map(|n| {
                        if p > n {
                            1.0
                        } else if p == n {
                            0.5
                        } else {
                            0.0
                        }
                    })
                    .sum::<f64>()
            })
            .sum();
        let want = pairs / (pos.len() * neg.len()) as f64;
        assert!((auroc(&pos, &neg).unwrap() - want).abs() < 1e-12);
        // Nothing to compare, or a NaN score: no AUROC.
        assert_eq!(auroc(&[], &[1.0]), None);
        assert_eq!(auroc(&[f64::NAN], &[1.0]), None);
    }
}
