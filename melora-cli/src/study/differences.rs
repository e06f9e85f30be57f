//! A study's comparisons: each method minus a baseline, paired by seed,
//! and the paired bootstrap over test questions of each difference.

use super::evals::{SeedPredictions, Summary};
use super::spec::{Compare, ZERO_SHOT};
use super::tables::{spread, Scope};
use melora_core::metrics::ECE_BINS;
use melora_core::{ClassProbs, Metrics};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// A difference's mean and sample standard deviation over its pairs, signed,
/// after scaling by `scale`, with the count when it is not `want` (one pair:
/// its value alone).
fn difference_cell(values: &[f64], scale: f64, digits: usize, want: usize) -> String {
    match spread(values, scale, want) {
        None => "-".into(),
        Some((mean, _, count)) if values.len() == 1 => format!("{mean:+.digits$}{count}"),
        Some((mean, std, count)) => format!("{mean:+.digits$} ± {std:.digits$}{count}"),
    }
}

/// The comparisons of a study, in table order (method, baseline): each
/// focus method against every other method (but the zero-shot model and
/// the focus methods listed before it), then every other method against
/// the baseline. `keys` are the methods in table order.
pub fn comparisons(compare: &Compare, keys: &[&str]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, focus) in compare.focus.iter().enumerate() {
        for &base in keys {
            if base != ZERO_SHOT && base != focus && !compare.focus[..k].iter().any(|f| f == base) {
                out.push((focus.clone(), base.to_string()));
            }
        }
    }
    for &key in keys {
        if key != ZERO_SHOT && key != compare.baseline && !compare.focus.iter().any(|f| f == key) {
            out.push((key.to_string(), compare.baseline.clone()));
        }
    }
    out
}

/// The pairs of one comparison, `(seed, method's, baseline's)`: two
/// per-seed methods paired by seed (a seed gives every method the same
/// training questions in the same order, and every evaluation the same
/// test questions); a single evaluation (an ensemble: no seed) against
/// every seed of the other side.
fn pair_up<'a, T>(runs: &'a [(Option<u64>, T)], base: &'a [(Option<u64>, T)]) -> Vec<(Option<u64>, &'a T, &'a T)> {
    let single = |x: &[(Option<u64>, T)]| x.len() == 1 && x[0].0.is_none();
    match (single(runs), single(base)) {
        (true, _) => runs
            .first()
            .map(|(_, e)| base.iter().map(|(seed, b)| (*seed, e, b)).collect())
            .unwrap_or_default(),
        (_, true) => base
            .first()
            .map(|(_, e)| runs.iter().map(|(seed, s)| (*seed, s, e)).collect())
            .unwrap_or_default(),
        _ => runs
            .iter()
            .filter_map(|(seed, s)| {
                base.iter()
                    .find(|(b_seed, _)| b_seed == seed)
                    .map(|(_, b)| (*seed, s, b))
            })
            .collect(),
    }
}

/// The seeds of some pairs, as a table cell.
fn seed_list<T, U>(pairs: &[(Option<u64>, T, U)]) -> String {
    pairs
        .iter()
        .filter_map(|(seed, _, _)| seed.map(|s| s.to_string()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The comparisons of [`comparisons`] on ARC-Easy test, as Markdown: each
/// difference's mean and standard deviation over its pairs ([`pair_up`]).
pub fn differences(
    methods: &[(&str, &str, Vec<Summary>)],
    seeds: usize,
    scope: &Scope,
    comparisons: &[(String, String)],
) -> String {
    let task = scope.task;
    let mut out = format!(
        "{} {}: method minus baseline, mean ± std over the seeds both have finished (paired by seed; \
         an ensemble, one evaluation, against each seed of the other side). Higher ACC is better; lower ECE, NLL \
         and Brier are better.\n\n\
         | method | minus | seeds | ΔACC (points) | ΔECE (points) | ΔNLL | ΔBrier |\n\
         |---|---|---|---:|---:|---:|---:|\n",
        scope.title, scope.split
    );
    let by_seed = |s: &[Summary]| -> Vec<(Option<u64>, Summary)> { s.iter().map(|x| (x.seed, x.clone())).collect() };
    for (key, base_key) in comparisons {
        let (Some((_, label, runs)), Some((_, base_label, base))) = (
            methods.iter().find(|m| m.0 == key),
            methods.iter().find(|m| m.0 == base_key),
        ) else {
            continue;
        };
        let (runs, base) = (by_seed(runs), by_seed(base));
        let pairs = pair_up(&runs, &base);
        if pairs.is_empty() {
            continue;
        }
        let d = |f: fn(&Metrics) -> f64| -> Vec<f64> {
            pairs
                .iter()
                .filter_map(|(_, s, b)| Some(f(s.metrics.get(task)?) - f(b.metrics.get(task)?)))
                .collect()
        };
        out.push_str(&format!(
            "| {label} | {base_label} | {} | {} | {} | {} | {} |\n",
            seed_list(&pairs),
            difference_cell(&d(|m| m.accuracy), 100.0, 2, seeds),
            difference_cell(&d(|m| m.ece), 100.0, 2, seeds),
            difference_cell(&d(|m| m.nll), 1.0, 3, seeds),
            difference_cell(&d(|m| m.brier), 1.0, 3, seeds),
        ));
    }
    out
}

/// One example's share of the summary metrics: whether its top class is
/// the label, its NLL and Brier terms, its top-label confidence and ECE bin.
struct ExampleScore {
    correct: f64,
    nll: f64,
    brier: f64,
    confidence: f64,
    bin: usize,
}

/// Each example's [`ExampleScore`], from [`ClassProbs`]' own metrics of the
/// example alone (so a resample's metrics are those `ClassProbs` would
/// give for the resampled questions).
fn example_scores(probs: &ClassProbs) -> Vec<ExampleScore> {
    probs
        .rows()
        .zip(probs.labels())
        .map(|(row, &y)| {
            let one = ClassProbs::new(row.to_vec(), probs.classes(), vec![y]).expect("a row of a valid ClassProbs");
            let m = one.metrics();
            let bin = one
                .reliability(ECE_BINS)
                .iter()
                .position(|b| b.count == 1)
                .expect("one example in one bin");
            ExampleScore {
                correct: m.accuracy,
                nll: m.nll,
                brier: m.brier,
                confidence: one.top()[0].1,
                bin,
            }
        })
        .collect()
}

/// Accuracy, ECE, NLL and Brier of the examples `idx` (repeats allowed).
fn resampled_metrics(scores: &[ExampleScore], idx: &[usize]) -> [f64; 4] {
    let n = idx.len().max(1) as f64;
    let (mut correct, mut nll, mut brier) = (0.0, 0.0, 0.0);
    // Per bin, the sum of (correct - confidence): n_b |acc_b - conf_b|.
    let mut gap = [0f64; ECE_BINS];
    for &i in idx {
        let e = &scores[i];
        correct += e.correct;
        nll += e.nll;
        brier += e.brier;
        gap[e.bin] += e.correct - e.confidence;
    }
    [
        correct / n,
        gap.iter().map(|g| g.abs()).sum::<f64>() / n,
        nll / n,
        brier / n,
    ]
}

/// The paired bootstrap over test questions of a comparison's difference
/// in accuracy, ECE, NLL and Brier, averaged over its pairs `(method,
/// baseline)`: each of `resamples` draws takes the questions with
/// replacement (the same draw for every pair: every evaluation holds the
/// same questions) and recomputes every metric; returns each metric's
/// central 95% interval of the draws, `None` when the pairs do not hold
/// the same labels (not the same questions) or there are none.
pub fn paired_bootstrap(pairs: &[(&ClassProbs, &ClassProbs)], resamples: usize, seed: u64) -> Option<[(f64, f64); 4]> {
    let labels = pairs.first()?.0.labels();
    if labels.is_empty() || resamples == 0 || pairs.iter().any(|(a, b)| a.labels() != labels || b.labels() != labels) {
        return None;
    }
    let scored: Vec<(Vec<ExampleScore>, Vec<ExampleScore>)> = pairs
        .iter()
        .map(|(a, b)| (example_scores(a), example_scores(b)))
        .collect();
    let n = labels.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; 4] = Default::default();
    let mut idx = vec![0usize; n];
    for _ in 0..resamples {
        idx.iter_mut().for_each(|i| *i = rng.random_range(0..n));
        let mut mean = [0f64; 4];
        for (a, b) in &scored {
            let (ma, mb) = (resampled_metrics(a, &idx), resampled_metrics(b, &idx));
            (0..4).for_each(|m| mean[m] += (ma[m] - mb[m]) / scored.len() as f64);
        }
        (0..4).for_each(|m| draws[m].push(mean[m]));
    }
    Some(draws.map(|mut d| {
        d.sort_by(|x, y| x.total_cmp(y));
        let at = |q: f64| d[((d.len() - 1) as f64 * q).round() as usize];
        (at(0.025), at(0.975))
    }))
}

/// An interval `(lo, hi)` scaled by `scale`, signed, to `digits`
/// decimals, as a Markdown cell: in bold when it excludes 0.
pub fn interval_cell((lo, hi): (f64, f64), scale: f64, digits: usize) -> String {
    let text = format!("{:+.digits$} to {:+.digits$}", scale * lo, scale * hi);
    if lo > 0.0 || hi < 0.0 {
        format!("**{text}**")
    } else {
        text
    }
}

/// The bootstrap resamples behind `differences.md`'s intervals.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// [`differences`]' comparisons with [`paired_bootstrap`]'s 95% interval
/// of each seed-mean difference over test questions, as Markdown: what the
/// choice of the 1000 test questions alone could move a difference by
/// (the seed-to-seed spread is the other table's). An interval that
/// excludes 0 is in bold.
pub fn bootstrap_differences(
    methods: &[(&str, &str, SeedPredictions)],
    resamples: usize,
    scope: &Scope,
    comparisons: &[(String, String)],
) -> String {
    let mut out = format!(
        "{} {}: the same differences, averaged over the paired seeds, with the central 95% interval of that \
         mean over {resamples} paired bootstrap resamples of the test questions (the same resample for every run: \
         what the choice of test questions alone could move the difference by, given the trained models; the seed \
         spread is the table above). In bold: an interval that excludes 0.\n\n\
         | method | minus | seeds | ΔACC (points) | ΔECE (points) | ΔNLL | ΔBrier |\n\
         |---|---|---|---:|---:|---:|---:|\n",
        scope.title, scope.split
    );
    for (k, (key, base_key)) in comparisons.iter().enumerate() {
        let (Some((_, label, runs)), Some((_, base_label, base))) = (
            methods.iter().find(|m| m.0 == key),
            methods.iter().find(|m| m.0 == base_key),
        ) else {
            continue;
        };
        let pairs = pair_up(runs, base);
        let probs: Vec<(&ClassProbs, &ClassProbs)> = pairs.iter().map(|(_, a, b)| (*a, *b)).collect();
        // Each comparison its own seeded stream: a row does not move when another is added.
        let Some(intervals) = paired_bootstrap(&probs, resamples, k as u64) else {
            continue;
        };
        out.push_str(&format!(
            "| {label} | {base_label} | {} | {} | {} | {} | {} |\n",
            seed_list(&pairs),
            interval_cell(intervals[0], 100.0, 2),
            interval_cell(intervals[1], 100.0, 2),
            interval_cell(intervals[2], 1.0, 3),
            interval_cell(intervals[3], 1.0, 3),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use melora_core::ClassProbs;
    use std::collections::BTreeMap;

    fn summary(seed: Option<u64>, accuracy: f64, nll: f64) -> Summary {
        let m = Metrics {
            count: 1000,
            accuracy,
            nll,
            ece: accuracy / 10.0,
            brier: nll / 4.0,
        };
        Summary {
            seed,
            samples: 1,
            metrics: BTreeMap::from([("arc-e".to_string(), m)]),
            uncertainty: BTreeMap::new(),
            auroc_total: None,
            auroc_epistemic: None,
            spread: None,
        }
    }

    /// ARC-Easy test, no out-of-distribution tasks.
    fn scope() -> Scope {
        Scope {
            task: "arc-e",
            title: "ARC-Easy",
            split: "test",
            ood: Vec::new(),
        }
    }

    /// The first study's comparisons.
    fn first_study(keys: &[&str]) -> Vec<(String, String)> {
        comparisons(
            &Compare {
                focus: vec!["melora".into(), "melora-paper".into()],
                baseline: "map".into(),
            },
            keys,
        )
    }

    #[test]
    fn comparisons_take_each_focus_method_then_the_others_against_the_baseline() {
        let keys = [
            "zero-shot",
            "map",
            "mcd",
            "ens",
            "lap",
            "blob",
            "melora-paper",
            "melora",
        ];
        let got = first_study(&keys);
        let want = [
            ("melora", "map"),
            ("melora", "mcd"),
            ("melora", "ens"),
            ("melora", "lap"),
            ("melora", "blob"),
            ("melora", "melora-paper"),
            ("melora-paper", "map"),
            ("melora-paper", "mcd"),
            ("melora-paper", "ens"),
            ("melora-paper", "lap"),
            ("melora-paper", "blob"),
            ("mcd", "map"),
            ("ens", "map"),
            ("lap", "map"),
            ("blob", "map"),
        ];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
    }

    #[test]
    fn differences_pair_by_seed_and_the_ensemble_with_every_seed() {
        let map = (
            "map",
            "MAP",
            vec![
                summary(Some(0), 0.70, 1.0),
                summary(Some(1), 0.71, 1.1),
                summary(Some(2), 0.72, 1.2),
            ],
        );
        let ens = ("ens", "ENS", vec![summary(None, 0.75, 0.9)]);
        let lap = ("lap", "LAP", vec![summary(Some(1), 0.68, 1.0)]);
        // BLoB has only seed 2, melora's Me-LoRA only 0 and 1: no pair.
        let blob = ("blob", "BLoB", vec![summary(Some(2), 0.80, 1.0)]);
        let melora = (
            "melora",
            "Me-LoRA",
            vec![summary(Some(0), 0.72, 1.05), summary(Some(1), 0.71, 1.0)],
        );
        let keys = ["map", "ens", "lap", "blob", "melora"];
        let table = differences(&[map, ens, lap, blob, melora], 3, &scope(), &first_study(&keys));
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
            .collect();
        // Me-LoRA minus MAP on seeds 0 and 1: ACC +2 and 0 points, NLL
        // +0.05 and -0.1; ECE is ACC / 10, Brier NLL / 4.
        assert_eq!(rows[0], "| Me-LoRA | MAP | 0, 1 | +1.00 ± 1.41 (n = 2) | +0.10 ± 0.14 (n = 2) | -0.025 ± 0.106 (n = 2) | -0.006 ± 0.027 (n = 2) |");
        // Me-LoRA minus the ensemble: each of its seeds against the one ENS.
        assert_eq!(rows[1], "| Me-LoRA | ENS | 0, 1 | -3.50 ± 0.71 (n = 2) | -0.35 ± 0.07 (n = 2) | +0.125 ± 0.035 (n = 2) | +0.031 ± 0.009 (n = 2) |");
        // LAP's only seed is 1, which Me-LoRA has: one pair, no spread.
        assert_eq!(
            rows[2],
            "| Me-LoRA | LAP | 1 | +3.00 (n = 1) | +0.30 (n = 1) | +0.000 (n = 1) | +0.000 (n = 1) |"
        );
        // Against MAP: ENS minus each MAP seed (3 pairs), LAP on seed 1;
        // BLoB's seed 2 against MAP's seed 2.
        assert_eq!(
            rows[3],
            "| ENS | MAP | 0, 1, 2 | +4.00 ± 1.00 | +0.40 ± 0.10 | -0.200 ± 0.100 | -0.050 ± 0.025 |"
        );
        assert_eq!(
            rows[4],
            "| LAP | MAP | 1 | -3.00 (n = 1) | -0.30 (n = 1) | -0.100 (n = 1) | -0.025 (n = 1) |"
        );
        assert_eq!(
            rows[5],
            "| BLoB | MAP | 2 | +8.00 (n = 1) | +0.80 (n = 1) | -0.200 (n = 1) | -0.050 (n = 1) |"
        );
        // Me-LoRA against BLoB (no common seed) and methods that are missing: no rows.
        assert_eq!(rows.len(), 6);
    }

    /// `n` examples of 3 classes whose top confidences fall in many ECE
    /// bins, the label the top class on every other example.
    fn spread_probs(n: usize) -> ClassProbs {
        let mut probs = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let top = 0.34 + 0.65 * (i as f64 / n as f64);
            probs.extend([top, (1.0 - top) * 0.7, (1.0 - top) * 0.3]);
            labels.push(if i % 2 == 0 { 0 } else { 1 + i % 2 });
        }
        ClassProbs::new(probs, 3, labels).unwrap()
    }

    #[test]
    fn every_question_once_gives_the_class_probs_own_metrics() {
        let probs = spread_probs(97);
        let m = probs.metrics();
        let got = resampled_metrics(&example_scores(&probs), &(0..97).collect::<Vec<_>>());
        for (g, want) in got.iter().zip([m.accuracy, m.ece, m.nll, m.brier]) {
            assert!((g - want).abs() < 1e-12, "{got:?} against {m:?}");
        }
        // A repeated question counts twice: the metrics of the set with it written twice.
        let twice = ClassProbs::new(
            [probs.probs(), &probs.probs()[..3]].concat(),
            3,
            [probs.labels(), &probs.labels()[..1]].concat(),
        )
        .unwrap();
        let m = twice.metrics();
        let got = resampled_metrics(
            &example_scores(&probs),
            &[(0..97).collect::<Vec<_>>(), vec![0]].concat(),
        );
        for (g, want) in got.iter().zip([m.accuracy, m.ece, m.nll, m.brier]) {
            assert!((g - want).abs() < 1e-12, "{got:?} against {m:?}");
        }
    }

    #[test]
    fn the_paired_bootstrap_on_hand_computed_cases() {
        // A run against itself: every resample's difference is 0.
        let a = spread_probs(50);
        assert_eq!(paired_bootstrap(&[(&a, &a)], 200, 1), Some([(0.0, 0.0); 4]));
        // Always right with certainty (ECE 0, NLL 0, Brier 0) against always
        // wrong with certainty (ECE 1, NLL -ln(f64::MIN_POSITIVE) = 708,
        // Brier 2): ΔACC +1, ΔECE -1, ΔNLL -708, ΔBrier -2 on every resample.
        let right = ClassProbs::new(vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 2, vec![0, 0, 1]).unwrap();
        let wrong = ClassProbs::new(vec![0.0, 1.0, 0.0, 1.0, 1.0, 0.0], 2, vec![0, 0, 1]).unwrap();
        let [acc, ece, nll, brier] = paired_bootstrap(&[(&right, &wrong)], 100, 2).unwrap();
        assert_eq!((acc, ece, brier), ((1.0, 1.0), (-1.0, -1.0), (-2.0, -2.0)));
        assert!(nll.0 == nll.1 && nll.0 < -700.0);
        // Two questions; the method is right on the first only, the
        // baseline on neither (both certain): a resample's ΔACC is the
        // share of its two draws that are the first question, 0, 1/2 or 1
        // with probabilities 1/4, 1/2, 1/4, so the central 95% runs from 0
        // to 1. Averaged over two identical pairs: the same.
        let method = ClassProbs::new(vec![1.0, 0.0, 1.0, 0.0], 2, vec![0, 1]).unwrap();
        let base = ClassProbs::new(vec![0.0, 1.0, 1.0, 0.0], 2, vec![0, 1]).unwrap();
        assert_eq!(paired_bootstrap(&[(&method, &base)], 2000, 3).unwrap()[0], (0.0, 1.0));
        assert_eq!(
            paired_bootstrap(&[(&method, &base), (&method, &base)], 2000, 3).unwrap()[0],
            (0.0, 1.0)
        );
        // Different questions (labels) or nothing to pair: no interval.
        let other = ClassProbs::new(vec![1.0, 0.0, 1.0, 0.0], 2, vec![0, 0]).unwrap();
        assert_eq!(paired_bootstrap(&[(&method, &other)], 100, 4), None);
        assert_eq!(paired_bootstrap(&[(&method, &base), (&other, &other)], 100, 4), None);
        assert_eq!(paired_bootstrap(&[], 100, 4), None);
    }

    #[test]
    fn bootstrap_rows_pair_by_seed_and_bold_the_intervals_that_exclude_zero() {
        let right = ClassProbs::new(vec![0.9, 0.1, 0.2, 0.8], 2, vec![0, 1]).unwrap();
        let wrong = ClassProbs::new(vec![0.3, 0.7, 0.6, 0.4], 2, vec![0, 1]).unwrap();
        let map = ("map", "MAP", vec![(Some(0), wrong.clone()), (Some(1), wrong.clone())]);
        // BLoB has seed 1 only; melora seeds 0 and 2 (2 has no MAP): one pair each.
        let blob = ("blob", "BLoB", vec![(Some(1), right.clone())]);
        let melora = (
            "melora",
            "Me-LoRA",
            vec![(Some(0), wrong.clone()), (Some(2), right.clone())],
        );
        let table = bootstrap_differences(
            &[map, blob, melora],
            100,
            &scope(),
            &first_study(&["map", "blob", "melora"]),
        );
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
            .collect();
        // Me-LoRA seed 0 is MAP seed 0: 0 on every resample, not bold.
        assert_eq!(
            rows[0],
            "| Me-LoRA | MAP | 0 | +0.00 to +0.00 | +0.00 to +0.00 | +0.000 to +0.000 | +0.000 to +0.000 |"
        );
        // BLoB is right on both questions where MAP is wrong on both: ΔACC
        // +100 points on every resample, bold; Me-LoRA and BLoB share no seed.
        assert!(
            rows[1].starts_with("| BLoB | MAP | 1 | **+100.00 to +100.00** |"),
            "{}",
            rows[1]
        );
        assert_eq!(rows.len(), 2);
    }
}
