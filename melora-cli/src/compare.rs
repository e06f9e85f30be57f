//! Two evaluations of the same questions side by side (`melora compare`):
//! each one's accuracy, ECE, NLL and Brier score, their difference, and the
//! central 95% interval of that difference over paired bootstrap resamples
//! of the questions ([`paired_bootstrap`], the intervals of a study's
//! `differences.md`). What it answers: could the choice of test questions
//! alone have moved this difference, given the two trained models?

use crate::study::{interval_cell, paired_bootstrap, EvalSet};
use melora_core::Metrics;
use melora_llama::error::{LlamaError, Result};
use serde::Serialize;

/// One task both evaluations hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The task's name.
    pub task: String,
    /// Its questions.
    pub questions: usize,
    /// Samples per question of the first evaluation and of the second.
    pub samples: [usize; 2],
    /// The first evaluation's metrics (of its model average).
    pub a: Metrics,
    /// The second's.
    pub b: Metrics,
    /// The central 95% interval of `a - b` over the bootstrap resamples,
    /// for accuracy, ECE, NLL and Brier (fractions, as [`Metrics`]).
    pub interval: [(f64, f64); 4],
}

/// Accuracy, ECE, NLL and Brier, in the order of [`paired_bootstrap`]'s
/// intervals.
fn values(m: &Metrics) -> [f64; 4] {
    [m.accuracy, m.ece, m.nll, m.brier]
}

impl Comparison {
    /// `a - b` for accuracy, ECE, NLL and Brier.
    pub fn difference(&self) -> [f64; 4] {
        let (a, b) = (values(&self.a), values(&self.b));
        std::array::from_fn(|m| a[m] - b[m])
    }
}

/// Compares `a` with `b` on every task both hold, with `resamples`
/// bootstrap draws from `seed`. An error when they share no task, or when
/// a shared task's labels differ (not the same questions: a paired
/// comparison would be meaningless).
pub fn compare(a: &EvalSet, b: &EvalSet, resamples: usize, seed: u64) -> Result<Vec<Comparison>> {
    if resamples == 0 {
        return Err(LlamaError::Config("--resamples must be at least 1, got 0".into()));
    }
    let mut out = Vec::new();
    for (task, pa) in &a.tasks {
        let Some(pb) = b.tasks.get(task) else { continue };
        if pa.labels != pb.labels || pa.classes != pb.classes {
            let found = if pa.labels.len() == pb.labels.len() && pa.classes == pb.classes {
                format!("both hold {} questions, with other answers", pa.labels.len())
            } else {
                format!(
                    "{} questions of {} choices against {} of {}",
                    pa.labels.len(),
                    pa.classes,
                    pb.labels.len(),
                    pb.classes
                )
            };
            return Err(LlamaError::Mismatch(format!(
                "the two evaluations of {task} hold different questions ({found}); compare evaluations of the same \
                 split and --max-examples"
            )));
        }
        let (ca, cb) = (pa.average(), pb.average());
        let interval = paired_bootstrap(&[(&ca, &cb)], resamples, seed)
            .ok_or_else(|| LlamaError::Mismatch(format!("the evaluations of {task} hold no questions")))?;
        out.push(Comparison {
            task: task.clone(),
            questions: pa.labels.len(),
            samples: [pa.samples, pb.samples],
            a: ca.metrics(),
            b: cb.metrics(),
            interval,
        });
    }
    if out.is_empty() {
        let names = |s: &EvalSet| s.tasks.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(LlamaError::Mismatch(format!(
            "the two evaluations share no task: the first holds {}, the second {}",
            names(a),
            names(b)
        )));
    }
    Ok(out)
}

/// The comparisons as Markdown, one table per task, the folders named as
/// given.
pub fn markdown(a: &str, b: &str, comparisons: &[Comparison], resamples: usize) -> String {
    // Accuracy and ECE in points, NLL and Brier as they are.
    const SCALE: [f64; 4] = [100.0, 100.0, 1.0, 1.0];
    const DIGITS: [usize; 4] = [2, 2, 3, 3];
    let cells = |v: [f64; 4], signed: bool| {
        (0..4)
            .map(|m| {
                let (x, d) = (v[m] * SCALE[m], DIGITS[m]);
                if signed {
                    format!("{x:+.d$}")
                } else {
                    format!("{x:.d$}")
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let mut out = String::new();
    for c in comparisons {
        let interval = (0..4)
            .map(|m| interval_cell(c.interval[m], SCALE[m], DIGITS[m]))
            .collect::<Vec<_>>()
            .join(" | ");
        out.push_str(&format!(
            "{task}, {n} questions: the first evaluation minus the second, with the central 95% interval of that \
             difference over {resamples} paired bootstrap resamples of the questions (in bold: an interval that \
             excludes 0). Higher ACC is better; lower ECE, NLL and Brier are better.\n\n\
             | evaluation | S | ACC (%) | ECE (%) | NLL | Brier |\n|---|---:|---:|---:|---:|---:|\n\
             | {a} | {sa} | {ma} |\n| {b} | {sb} | {mb} |\n| first minus second | | {d} |\n| 95% interval | | {interval} |\n\n",
            task = c.task,
            n = c.questions,
            sa = c.samples[0],
            sb = c.samples[1],
            ma = cells(values(&c.a), false),
            mb = cells(values(&c.b), false),
            d = cells(c.difference(), true),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use melora_llama::eval::SampledProbs;
    use std::collections::BTreeMap;

    fn set(task: &str, probs: Vec<f64>, samples: usize, labels: Vec<usize>) -> EvalSet {
        let mut tasks = BTreeMap::new();
        tasks.insert(
            task.to_string(),
            SampledProbs {
                probs,
                samples,
                classes: 2,
                labels,
            },
        );
        EvalSet {
            tasks,
            rows: BTreeMap::new(),
        }
    }

    #[test]
    fn an_evaluation_against_itself_differs_by_nothing() {
        let a = set("wg-s", vec![0.9, 0.1, 0.3, 0.7, 0.6, 0.4], 1, vec![0, 1, 1]);
        let c = compare(&a, &a, 500, 1).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].difference(), [0.0; 4]);
        assert_eq!(c[0].interval, [(0.0, 0.0); 4]);
        assert_eq!(c[0].questions, 3);
    }

    #[test]
    fn the_model_average_is_compared_and_a_right_model_beats_a_wrong_one_on_every_resample() {
        // Two samples per question whose average is right with 0.75; the
        // other evaluation is wrong with 0.75 on every question.
        let right = set("wg-s", vec![1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.5, 0.5], 2, vec![0, 1]);
        let wrong = set("wg-s", vec![0.25, 0.75, 0.75, 0.25], 1, vec![0, 1]);
        let c = &compare(&right, &wrong, 300, 2).unwrap()[0];
        assert_eq!(c.samples, [2, 1]);
        assert!((c.a.accuracy - 1.0).abs() < 1e-12 && c.b.accuracy.abs() < 1e-12);
        // On every resample: accuracy +1, ECE 0.25 - 0.75, NLL -ln 0.75 + ln 0.25 = -ln 3.
        assert_eq!(c.interval[0], (1.0, 1.0));
        let near = |(lo, hi): (f64, f64), x: f64| (lo - x).abs() < 1e-9 && (hi - x).abs() < 1e-9;
        assert!(near(c.interval[1], -0.5), "{:?}", c.interval[1]);
        assert!(near(c.interval[2], -(3f64.ln())), "{:?}", c.interval[2]);
        let md = markdown("right", "wrong", std::slice::from_ref(c), 300);
        assert!(
            md.contains("| first minus second | | +100.00 | -50.00 | -1.099 |"),
            "{md}"
        );
        assert!(md.contains("**+100.00 to +100.00**"), "{md}");
    }

    #[test]
    fn a_folder_without_results_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("melora-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = EvalSet::read(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            err.contains(&format!("{} holds no results.json", dir.display())),
            "{err}"
        );
    }

    #[test]
    fn evaluations_of_other_questions_or_tasks_are_refused() {
        let a = set("wg-s", vec![0.9, 0.1, 0.3, 0.7], 1, vec![0, 1]);
        let other_labels = set("wg-s", vec![0.9, 0.1, 0.3, 0.7], 1, vec![0, 0]);
        let other_task = set("arc-e", vec![0.9, 0.1, 0.3, 0.7], 1, vec![0, 1]);
        let err = compare(&a, &other_labels, 100, 0).unwrap_err().to_string();
        assert!(
            err.contains("different questions (both hold 2 questions, with other answers)"),
            "{err}"
        );
        let fewer = set("wg-s", vec![0.9, 0.1], 1, vec![0]);
        let err = compare(&a, &fewer, 100, 0).unwrap_err().to_string();
        assert!(err.contains("2 questions of 2 choices against 1 of 2"), "{err}");
        let err = compare(&a, &other_task, 100, 0).unwrap_err().to_string();
        assert!(err.contains("share no task") && err.contains("arc-e"), "{err}");
        let err = compare(&a, &a, 0, 0).unwrap_err().to_string();
        assert!(err.contains("--resamples"), "{err}");
    }
}
