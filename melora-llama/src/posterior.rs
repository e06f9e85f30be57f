//! Where a variational posterior stands: the spread of the adapters'
//! random weights (overall and per adapted projection), read off a model,
//! whether training has stopped moving it, and whether the objective it
//! trains ended above a point every run can reach (the adapter switched
//! off).
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

/// Where a run's objective ended against a point every run can reach.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ObjectiveVerdict {
    /// It ended above the adapter switched off by more than two standard
    /// errors: short of the optimum of what it trains.
    ShortOfOptimum,
    /// It ended within two standard errors of that point: no better than
    /// the base model, where a posterior collapsed onto its prior (KL near
    /// 0, `B` near 0) ends.
    LevelWithOff,
    /// It ended below that point by more than two standard errors (which
    /// does not make it the optimum).
    BelowOff,
    /// No point to compare with (not measured, or a KL term that is not
    /// 0 at the prior).
    NoBound,
}

/// The negative ELBO per training example at one validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectivePoint {
    /// After this many steps.
    pub step: usize,
    /// The training NLL (the mean over the steps since the previous
    /// validation, one sample each) plus the step's KL over `N`, whatever
    /// weight the run's schedule gave the KL at that step.
    pub value: f64,
    /// Its KL part, the KL over `N`.
    pub kl: f64,
    /// The standard error of the training NLL's mean, when known.
    pub se: Option<f64>,
}

/// The training NLL of the adapter switched off, on all of the training
/// set or a random sample of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdapterOff {
    /// The mean NLL over the examples scored.
    pub nll: f64,
    /// Its standard error as an estimate of the whole set's: 0 when it is
    /// the whole set, else that of a sample drawn without replacement.
    pub se: f64,
    /// Examples scored.
    pub examples: usize,
    /// Of this many.
    pub of: usize,
}

impl AdapterOff {
    /// From the NLLs of a random sample of `of` examples, drawn without
    /// replacement (all of them: no sampling error).
    pub fn of(nlls: &[f64], of: usize) -> Self {
        let k = nlls.len();
        let nll = nlls.iter().sum::<f64>() / k.max(1) as f64;
        // The finite-population correction: sqrt((n - k) / (n - 1)).
        let se = match standard_error(nlls) {
            Some(se) if k < of => se * ((of - k) as f64 / (of - 1) as f64).sqrt(),
            _ => 0.0,
        };
        Self {
            nll,
            se,
            examples: k,
            of,
        }
    }
}

/// The verdict on a run's objective from its `curve` (in step order),
/// against `bound` (the adapter switched off: `B = 0` with a posterior of
/// KL 0; `Err`: why there is none), with its line; `None` without a curve.
/// Short of the optimum when the end is above the bound by more than two
/// standard errors of their difference, below it when under it by as
/// much, level with it otherwise.
pub fn objective_verdict(
    curve: &[ObjectivePoint],
    bound: Result<AdapterOff, &str>,
    n_train: usize,
) -> Option<(ObjectiveVerdict, String)> {
    let end = curve.last()?;
    let lowest = curve.iter().min_by(|a, b| a.value.total_cmp(&b.value))?;
    let what = format!(
        "negative ELBO per training example (training NLL + KL / {n_train}) {:.4} at step {}, lowest {:.4} at step {}",
        end.value, end.step, lowest.value, lowest.step
    );
    let se = end.se.map_or(String::new(), |se| format!(", standard error {se:.4}"));
    let (verdict, line) = match bound {
        Err(why) => (
            ObjectiveVerdict::NoBound,
            format!("objective: no bound: {what}{se}; {why}"),
        ),
        Ok(off) => {
            let margin = 2.0 * (end.se.unwrap_or(0.0).powi(2) + off.se.powi(2)).sqrt();
            let sample = if off.examples < off.of {
                format!(
                    " (on {} of the {} training examples, standard error {:.4})",
                    off.examples, off.of, off.se
                )
            } else {
                String::new()
            };
            let off_line = format!(
                "the adapter switched off (B = 0, a posterior of KL 0) scores {:.4}{sample}",
                off.nll
            );
            let gap = end.value - off.nll;
            if gap > margin {
                (
                    ObjectiveVerdict::ShortOfOptimum,
                    format!(
                        "objective: short of its optimum: {what}{se}; {off_line}, {gap:.4} lower: a point the run can reach"
                    ),
                )
            } else if gap < -margin {
                (
                    ObjectiveVerdict::BelowOff,
                    format!(
                        "objective: below the adapter switched off: {what}{se}; {off_line}, {:.4} higher: no sign that the run fell short, no proof that it reached the optimum",
                        -gap
                    ),
                )
            } else {
                (
                    ObjectiveVerdict::LevelWithOff,
                    format!(
                        "objective: level with the adapter switched off: {what}{se}, its KL / {n_train} {:.4}; {off_line}, within two standard errors ({margin:.4}): the run did no better than the base model, as far as two standard errors tell (a posterior collapsed onto its prior, KL near 0 and B near 0, ends here)",
                        end.kl
                    ),
                )
            }
        }
    };
    Some((verdict, line))
}

/// The standard error of the mean of `values`; `None` for fewer than two.
pub fn standard_error(values: &[f64]) -> Option<f64> {
    let n = values.len();
    if n < 2 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((var / n as f64).sqrt())
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

    /// A point whose KL part is a tenth of it.
    fn point(step: usize, value: f64, se: Option<f64>) -> ObjectivePoint {
        ObjectivePoint {
            step,
            value,
            kl: value / 10.0,
            se,
        }
    }

    /// The adapter switched off, scored on the whole training set.
    fn off(nll: f64) -> Result<AdapterOff, &'static str> {
        Ok(AdapterOff {
            nll,
            se: 0.0,
            examples: 8,
            of: 8,
        })
    }

    #[test]
    fn objective_above_the_adapter_off_point_is_short_of_the_optimum() {
        // The BLoB run of BLoB's code's recipe on WinoGrande-S: 3.05 at
        // the end against 0.799 with the adapter switched off.
        let curve = [
            point(250, 1852.0, Some(0.02)),
            point(4750, 3.03, Some(0.01)),
            point(5000, 3.05, Some(0.01)),
        ];
        let (v, line) = objective_verdict(&curve, off(0.799), 640).unwrap();
        assert_eq!(v, ObjectiveVerdict::ShortOfOptimum);
        assert!(line.starts_with("objective: short of its optimum: "), "{line}");
        assert!(
            line.contains("KL / 640) 3.0500 at step 5000, lowest 3.0300 at step 4750"),
            "{line}"
        );
        assert!(line.contains("scores 0.7990, 2.2510 lower"), "{line}");
    }

    #[test]
    fn objective_within_two_standard_errors_of_the_bound_is_level_with_it() {
        // 0.80 against 0.79: 0.01 above, two standard errors 0.012.
        let (v, line) = objective_verdict(&[point(100, 0.80, Some(0.006))], off(0.79), 64).unwrap();
        assert_eq!(v, ObjectiveVerdict::LevelWithOff);
        assert!(
            line.starts_with("objective: level with the adapter switched off: ")
                && line.contains("standard error 0.0060, its KL / 64 0.0800;")
                && line.contains("within two standard errors (0.0120)"),
            "{line}"
        );
        // The same gap with a standard error of 0.004: above.
        let (v, _) = objective_verdict(&[point(100, 0.80, Some(0.004))], off(0.79), 64).unwrap();
        assert_eq!(v, ObjectiveVerdict::ShortOfOptimum);
        // 0.01 below, within two standard errors: level; 0.04 below: below.
        let (v, _) = objective_verdict(&[point(100, 0.78, Some(0.006))], off(0.79), 64).unwrap();
        assert_eq!(v, ObjectiveVerdict::LevelWithOff);
        let (v, line) = objective_verdict(&[point(100, 0.75, Some(0.006))], off(0.79), 64).unwrap();
        assert_eq!(v, ObjectiveVerdict::BelowOff);
        assert!(
            line.starts_with("objective: below the adapter switched off: ") && line.contains("0.0400 higher"),
            "{line}"
        );
        // Without a standard error any gap counts.
        let (v, _) = objective_verdict(&[point(100, 0.789, None)], off(0.79), 64).unwrap();
        assert_eq!(v, ObjectiveVerdict::BelowOff);
        // A sampled bound adds its error: sqrt(0.004^2 + 0.004^2) = 0.0057,
        // two of which (0.0113) the gap of 0.01 does not exceed.
        let sampled = AdapterOff {
            nll: 0.79,
            se: 0.004,
            examples: 4,
            of: 8,
        };
        let (v, line) = objective_verdict(&[point(100, 0.80, Some(0.004))], Ok(sampled), 64).unwrap();
        assert_eq!(v, ObjectiveVerdict::LevelWithOff);
        assert!(
            line.contains("scores 0.7900 (on 4 of the 8 training examples, standard error 0.0040)"),
            "{line}"
        );
    }

    #[test]
    fn adapter_off_on_a_sample_has_the_finite_population_error() {
        // NLLs 1, 2, 3, 4: standard error sqrt(5/12) as if from an infinite
        // population; of 10 examples, times sqrt((10 - 4) / 9).
        let off = AdapterOff::of(&[1.0, 2.0, 3.0, 4.0], 10);
        assert_eq!((off.nll, off.examples, off.of), (2.5, 4, 10));
        assert!((off.se - (5.0f64 / 12.0 * 6.0 / 9.0).sqrt()).abs() < 1e-15);
        // The whole set: no sampling error.
        assert_eq!(AdapterOff::of(&[1.0, 2.0, 3.0, 4.0], 4).se, 0.0);
    }

    #[test]
    fn objective_without_a_bound_says_why_and_without_a_curve_says_nothing() {
        let (v, line) = objective_verdict(&[point(10, 1.5, None)], Err("not measured"), 8).unwrap();
        assert_eq!(v, ObjectiveVerdict::NoBound);
        assert!(line.ends_with("; not measured"), "{line}");
        assert_eq!(objective_verdict(&[], off(0.5), 8), None);
    }

    #[test]
    fn standard_error_of_a_mean() {
        // Sample variance of 1, 2, 3, 4 is 5/3; over n = 4.
        let se = standard_error(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((se - (5.0f64 / 12.0).sqrt()).abs() < 1e-15);
        assert_eq!(standard_error(&[1.0]), None);
    }
}
