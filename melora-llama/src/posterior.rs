//! Where a variational posterior stands: the spread of the adapters'
//! random weights (overall and per adapted projection), read off a model,
//! and whether training has stopped moving it.
//!
//! A Bayesian adapter's std parameters start at a fixed small value; the
//! numbers here are what show that training moved them to where the data
//! and the prior put them (docs/derivations.md section 7).

use crate::model::Llama;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use melora_core::AnyAdapter;
use serde::{Deserialize, Serialize};

/// The spread of some random weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StdSummary {
    /// Entries (random weights) summarised.
    pub count: usize,
    /// Their mean posterior standard deviation.
    pub mean: f64,
    /// The standard deviation of those standard deviations.
    pub spread: f64,
    /// The mean std over the root mean square of the corresponding means
    /// (BLoB's `M_A`, Me-LoRA's `M`): how wide the posterior is for the
    /// size of the weights it is a posterior of.
    pub relative: f64,
}

/// The posterior's spread over a model's adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PosteriorStats {
    /// Every random weight of every adapter.
    pub all: StdSummary,
    /// The same per adapted projection (`q_proj`, `v_proj`, ...), in the
    /// order they first appear.
    pub targets: Vec<(String, StdSummary)>,
}

/// Accumulates the entries of one group.
#[derive(Default)]
struct Sums {
    count: usize,
    std: f64,
    std_sq: f64,
    mean_sq: f64,
    mean_count: usize,
}

impl Sums {
    fn add(&mut self, stds: &[f64], means: &[f64]) {
        self.count += stds.len();
        self.std += stds.iter().sum::<f64>();
        self.std_sq += stds.iter().map(|s| s * s).sum::<f64>();
        self.mean_count += means.len();
        self.mean_sq += means.iter().map(|m| m * m).sum::<f64>();
    }

    fn summary(&self) -> StdSummary {
        let n = self.count.max(1) as f64;
        let mean = self.std / n;
        let spread = (self.std_sq / n - mean * mean).max(0.0).sqrt();
        let rms = (self.mean_sq / self.mean_count.max(1) as f64).sqrt();
        StdSummary {
            count: self.count,
            mean,
            spread,
            relative: if rms > 0.0 { mean / rms } else { f64::INFINITY },
        }
    }
}

fn host<B: Backend>(t: Tensor<B, 2>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().expect("f64 data after convert")
}

impl PosteriorStats {
    /// The stats of `model`'s random weights (BLoB's `A`, Me-LoRA's `C`);
    /// `None` when no adapter has any.
    pub fn of<B: Backend>(model: &Llama<B>) -> Option<Self> {
        let mut all = Sums::default();
        let mut targets: Vec<(String, Sums)> = Vec::new();
        for (path, adapter) in model.adapters() {
            let (stds, means) = match adapter {
                AnyAdapter::Blob(a) => (host(a.omega()), host(a.low_rank.lora_a.val())),
                AnyAdapter::MeLora(m) => (host(m.omega()), host(m.lora_m.val())),
                AnyAdapter::Lora(_) => continue,
            };
            all.add(&stds, &means);
            let target = path.rsplit('.').next().unwrap_or(&path).to_string();
            match targets.iter_mut().find(|(t, _)| *t == target) {
                Some((_, sums)) => sums.add(&stds, &means),
                None => {
                    let mut sums = Sums::default();
                    sums.add(&stds, &means);
                    targets.push((target, sums));
                }
            }
        }
        (all.count > 0).then(|| Self {
            all: all.summary(),
            targets: targets.into_iter().map(|(t, s)| (t, s.summary())).collect(),
        })
    }

    /// One line: `std 0.0123 ± 0.0040 (0.52 x |mean|); q_proj 0.0120, v_proj 0.0126`.
    pub fn line(&self) -> String {
        let targets: Vec<String> = self.targets.iter().map(|(t, s)| format!("{t} {:.4}", s.mean)).collect();
        format!(
            "std {:.4} ± {:.4} ({:.2} x rms mean); {}",
            self.all.mean,
            self.all.spread,
            self.all.relative,
            targets.join(", ")
        )
    }
}

/// What a validation records of a Bayesian run's posterior
/// (`metrics.jsonl`'s `posterior`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// The posterior's spread.
    pub stats: PosteriorStats,
    /// The unweighted KL of the last step.
    pub kl: f64,
    /// The weight it entered that step's loss with.
    pub kl_weight: f64,
    /// The mean over validation examples of the std, across posterior
    /// samples, of the gold answer's probability (`None`: not measured).
    pub gold_std: Option<f64>,
    /// Samples and examples it was measured on.
    pub gold_std_on: Option<(usize, usize)>,
}

/// The fraction of its value by which the mean posterior std may change
/// over the last fifth of training for [`Verdict::Converged`].
pub const CONVERGED_WITHIN: f64 = 0.05;

/// Whether training stopped moving the posterior.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// The mean posterior std changed by less than [`CONVERGED_WITHIN`] of
    /// its value over the last fifth of the steps.
    Converged,
    /// It changed by more.
    StillMoving,
}

/// The step from which the last fifth of `steps` runs.
pub fn last_fifth_start(steps: usize) -> usize {
    steps - steps / 5
}

/// The verdict's word ("converged", "still moving") in a text holding a
/// [`verdict`] line (a run's log or the `verdict.txt` kept beside it).
pub fn verdict_word(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("posterior: "))
        .and_then(|v| v.split(':').next())
}

/// The verdict on a mean posterior std of `at_start` at the initialisation,
/// `before` at [`last_fifth_start`] and `end` at the end, as a line.
pub fn verdict(at_start: Option<f64>, before: f64, end: f64, steps: usize) -> (Verdict, String) {
    let change = (end - before) / before;
    let verdict = if change.abs() < CONVERGED_WITHIN {
        Verdict::Converged
    } else {
        Verdict::StillMoving
    };
    let word = match verdict {
        Verdict::Converged => "converged",
        Verdict::StillMoving => "still moving",
    };
    let start = at_start.map_or(String::new(), |s| format!("{s:.4} at initialisation, "));
    let line = format!(
        "posterior: {word}: mean std {start}{before:.4} at step {}, {end:.4} at step {steps} ({:+.1}% over the last fifth; converged means within ±{:.0}%; the learning rates decay over that fifth: read it with the curve, every step's std is in log.txt)",
        last_fifth_start(steps),
        100.0 * change,
        100.0 * CONVERGED_WITHIN
    );
    (verdict, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_give_mean_spread_and_relative_size() {
        let mut sums = Sums::default();
        sums.add(&[0.1, 0.3], &[1.0, -1.0]);
        sums.add(&[0.2], &[2.0, 2.0]);
        let s = sums.summary();
        assert_eq!(s.count, 3);
        assert!((s.mean - 0.2).abs() < 1e-15);
        // Population std of 0.1, 0.3, 0.2.
        assert!((s.spread - (0.02f64 / 3.0).sqrt()).abs() < 1e-12);
        // rms of the means: sqrt((1 + 1 + 4 + 4) / 4).
        assert!((s.relative - 0.2 / 2.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn the_verdicts_word_reads_back_from_its_line() {
        let (_, line) = verdict(Some(0.03), 0.100, 0.104, 100);
        let log = format!("step 100 nll 0.5\nposterior after step 100: std 0.104\n{line}\n");
        assert_eq!(verdict_word(&log), Some("converged"));
        assert_eq!(verdict_word(&verdict(None, 0.100, 0.2, 100).1), Some("still moving"));
        assert_eq!(verdict_word("step 1 nll 0.5\n"), None);
    }

    #[test]
    fn the_verdict_compares_the_last_fifth() {
        assert_eq!(last_fifth_start(100), 80);
        assert_eq!(last_fifth_start(600), 480);
        let (v, line) = verdict(Some(0.03), 0.100, 0.104, 100);
        assert_eq!(v, Verdict::Converged, "{line}");
        assert!(
            line.contains("+4.0%") && line.contains("0.0300 at initialisation") && line.contains("at step 80"),
            "{line}"
        );
        assert_eq!(verdict(None, 0.100, 0.094, 100).0, Verdict::StillMoving);
    }
}
