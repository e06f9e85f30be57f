//! The calibration study's tables (`experiments/study.sh`, issue 15),
//! regenerated from its run folders: every evaluation folder's sample
//! probabilities (`predictions-<k>.json`) are read back and summarised, so
//! a table never holds a number that no file supports.
//!
//! Layout read: `<runs>/evals/<method>-seed<s>/` (and `zero-shot/`), each
//! one `melora eval --ood` of ARC-Easy test and the out-of-distribution
//! tasks; `<runs>/times.tsv`, the wall time and peak memory of each phase.
//! ENS is built here from the MAP seeds' predictions (their probabilities
//! averaged: one ensemble, members = the MAP runs).

use crate::error::{LlamaError, Result};
use crate::eval::SampledProbs;
use crate::report::{write_results, ResultRow, Spread};
use melora_core::{auroc, Metrics, Uncertainty};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The study's methods: folder name and table label, in table order.
pub const METHODS: [(&str, &str); 8] = [
    ("zero-shot", "SmolLM2-135M zero-shot"),
    ("map", "MAP"),
    ("mcd", "MCD"),
    ("ens", "ENS (the 3 MAP runs)"),
    ("lap", "LAP"),
    ("blob", "BLoB"),
    ("melora-paper", "Me-LoRA (paper: Eq. 8 KL, one C per batch)"),
    ("melora", "Me-LoRA (melora: subspace KL, one C per example)"),
];

/// The in-distribution task and split.
pub const IN_DISTRIBUTION: &str = "arc-e";
/// The out-of-distribution tasks, in table order; the MMLU ones are pooled
/// for detection.
pub const OUT_OF_DISTRIBUTION: [&str; 4] = ["arc-c", "mmlu-chem", "mmlu-phys", "mmlu-math"];

/// One evaluation folder: each task's sample probabilities.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// Task name -> probabilities.
    pub tasks: BTreeMap<String, SampledProbs>,
}

impl EvalSet {
    /// Reads `dir` (its `results.json` names each row's task); `None` when
    /// the evaluation has not finished (no `ood.json` yet).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        if !dir.join("ood.json").exists() {
            return Ok(None);
        }
        let read = |name: &str| -> Result<String> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e))
        };
        let rows: Vec<ResultRow> = serde_json::from_str(&read("results.json")?).map_err(|e| LlamaError::format(dir.join("results.json"), e.to_string()))?;
        let mut tasks = BTreeMap::new();
        for (k, row) in rows.iter().enumerate() {
            let name = format!("predictions-{k}.json");
            let probs: SampledProbs = serde_json::from_str(&read(&name)?).map_err(|e| LlamaError::format(dir.join(&name), e.to_string()))?;
            tasks.insert(row.task.clone(), probs);
        }
        Ok(Some(Self { tasks }))
    }

    /// An ensemble of `members` (each one sample per example, the same
    /// examples): member `m`'s probabilities become sample `m`.
    pub fn ensemble(members: &[EvalSet]) -> Result<Self> {
        let first = members.first().ok_or_else(|| LlamaError::Mismatch("an ensemble of no members".into()))?;
        let mut tasks = BTreeMap::new();
        for (task, probs) in &first.tasks {
            let mut rows = Vec::new();
            for m in members {
                let p = m.tasks.get(task).ok_or_else(|| LlamaError::Mismatch(format!("an ensemble member has no {task} evaluation")))?;
                if p.labels != probs.labels || p.classes != probs.classes {
                    return Err(LlamaError::Mismatch(format!("the ensemble members' {task} evaluations hold different examples")));
                }
                rows.push(p.average().probs().to_vec());
            }
            tasks.insert(task.clone(), SampledProbs::from_members(&rows, probs.classes, probs.labels.clone()));
        }
        Ok(Self { tasks })
    }
}

/// What the tables report of one evaluation folder.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run's seed (`None` for the zero-shot model and the ensemble).
    pub seed: Option<u64>,
    /// Samples per example.
    pub samples: usize,
    /// Metrics per task.
    pub metrics: BTreeMap<String, Metrics>,
    /// Mean uncertainty decomposition per task.
    pub uncertainty: BTreeMap<String, Uncertainty>,
    /// The AUROC of telling the pooled MMLU questions from the
    /// in-distribution ones, by total entropy.
    pub auroc_total: Option<f64>,
    /// The same by the epistemic part (`None` for one sample).
    pub auroc_epistemic: Option<f64>,
}

impl Summary {
    /// The summary of `set`.
    pub fn of(set: &EvalSet) -> Self {
        let mut metrics = BTreeMap::new();
        let mut uncertainty = BTreeMap::new();
        for (task, probs) in &set.tasks {
            metrics.insert(task.clone(), probs.average().metrics());
            let (total, aleatoric, epistemic) = probs.uncertainty();
            uncertainty.insert(task.clone(), Uncertainty { total, aleatoric, epistemic });
        }
        let inside: Vec<Uncertainty> = set.tasks.get(IN_DISTRIBUTION).map(|p| p.per_example()).unwrap_or_default();
        let outside: Vec<Uncertainty> =
            set.tasks.iter().filter(|(t, _)| t.starts_with("mmlu-")).flat_map(|(_, p)| p.per_example()).collect();
        let score = |f: fn(&Uncertainty) -> f64| auroc(&outside.iter().map(f).collect::<Vec<_>>(), &inside.iter().map(f).collect::<Vec<_>>());
        let samples = set.tasks.values().map(|p| p.samples).min().unwrap_or(1);
        Self {
            seed: None,
            samples,
            metrics,
            uncertainty,
            auroc_total: score(|u| u.total),
            auroc_epistemic: if samples > 1 { score(|u| u.epistemic) } else { None },
        }
    }
}

/// The scaled mean and sample standard deviation (`n - 1`; 0 for one
/// value) of `values`, and " (n = k)" when their count is not `want`;
/// `None` for no values.
fn spread(values: &[f64], scale: f64, want: usize) -> Option<(f64, f64, String)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    let count = if values.len() == want { String::new() } else { format!(" (n = {})", values.len()) };
    Some((scale * mean, scale * var.sqrt(), count))
}

/// Mean and sample standard deviation (`n - 1`) of the present values,
/// formatted with `digits` decimals after scaling by `scale`, with the
/// count when it is not `want`; one value has no spread, so it is printed
/// alone (with its count when more were wanted: a method whose other seeds
/// have not finished).
pub fn mean_std(values: &[f64], scale: f64, digits: usize, want: usize) -> String {
    let Some((mean, std, count)) = spread(values, scale, want) else { return "-".into() };
    // One value (a single run by design, zero-shot or the ensemble, or the
    // one finished seed so far): its value, no spread.
    if values.len() == 1 {
        let value = if mean != 0.0 && mean.abs() < 10f64.powi(1 - digits as i32) { format!("{mean:.2e}") } else { format!("{mean:.digits$}") };
        return format!("{value}{count}");
    }
    // Values too small for `digits` decimals (an epistemic part of 1e-5 nats) in scientific notation.
    if mean != 0.0 && mean.abs() < 10f64.powi(1 - digits as i32) {
        return format!("{mean:.2e} ± {std:.1e}{count}");
    }
    format!("{mean:.digits$} ± {std:.digits$}{count}")
}

/// One method's evaluations as the tables read them.
pub struct Collected {
    /// The method's folder name.
    pub key: &'static str,
    /// Its table label.
    pub label: &'static str,
    /// One summary per finished seed (one for zero-shot and ENS).
    pub summaries: Vec<Summary>,
    /// The first seed's evaluation (the ensemble, the zero-shot model):
    /// its reliability diagram.
    pub first: Option<EvalSet>,
}

/// Every method's summaries, each evaluation folder read once.
pub fn collect(runs: &Path, seeds: &[u64]) -> Result<Vec<Collected>> {
    let evals = runs.join("evals");
    let mut out = Vec::new();
    let mut map_sets = Vec::new();
    for (key, label) in METHODS {
        let sets: Vec<(u64, EvalSet)> = match key {
            "zero-shot" => EvalSet::load(&evals.join(key))?.map(|s| (0, s)).into_iter().collect(),
            "ens" if map_sets.len() == seeds.len() && !map_sets.is_empty() => vec![(0, EvalSet::ensemble(&map_sets)?)],
            "ens" => Vec::new(),
            _ => {
                let mut sets = Vec::new();
                for &seed in seeds {
                    if let Some(set) = EvalSet::load(&evals.join(format!("{key}-seed{seed}")))? {
                        sets.push((seed, set));
                    }
                }
                if key == "map" {
                    map_sets = sets.iter().map(|(_, s)| s.clone()).collect();
                }
                sets
            }
        };
        let per_seed = !matches!(key, "zero-shot" | "ens");
        let summaries = sets.iter().map(|(seed, s)| Summary { seed: per_seed.then_some(*seed), ..Summary::of(s) }).collect();
        let first_seed = if per_seed { seeds.first().copied() } else { Some(0) };
        let first = sets.into_iter().find(|(seed, _)| Some(*seed) == first_seed).map(|(_, s)| s);
        out.push(Collected { key, label, summaries, first });
    }
    Ok(out)
}

fn metric_cells(s: &[Summary], task: &str, want: usize) -> String {
    let get = |f: fn(&Metrics) -> f64| s.iter().filter_map(|x| x.metrics.get(task).map(f)).collect::<Vec<_>>();
    format!(
        "{} | {} | {} | {}",
        mean_std(&get(|m| m.accuracy), 100.0, 2, want),
        mean_std(&get(|m| m.ece), 100.0, 2, want),
        mean_std(&get(|m| m.nll), 1.0, 3, want),
        mean_std(&get(|m| m.brier), 1.0, 3, want)
    )
}

/// The three tables (in distribution, out of distribution, uncertainty and
/// detection) as Markdown.
pub fn tables(methods: &[(&str, &str, Vec<Summary>)], seeds: usize) -> (String, String, String) {
    let want = |key: &str| if key == "zero-shot" || key == "ens" { 1 } else { seeds };
    let header = "| method | S | ACC (%) | ECE (%) | NLL | Brier |\n|---|---:|---:|---:|---:|---:|\n";
    let mut id = format!("ARC-Easy test ({IN_DISTRIBUTION}), mean ± std over the seeds\n\n{header}");
    let mut ood = String::new();
    for (key, label, s) in methods {
        if let Some(first) = s.first() {
            id.push_str(&format!("| {label} | {} | {} |\n", first.samples, metric_cells(s, IN_DISTRIBUTION, want(key))));
        }
    }
    for task in OUT_OF_DISTRIBUTION {
        ood.push_str(&format!("\n{task} (adapters trained on ARC-Easy), mean ± std over the seeds\n\n{header}"));
        for (key, label, s) in methods {
            if let Some(first) = s.first() {
                ood.push_str(&format!("| {label} | {} | {} |\n", first.samples, metric_cells(s, task, want(key))));
            }
        }
    }
    let mut unc = String::from(
        "Mean over examples of the predictive entropy (total), the expected entropy (aleatoric) and their difference \
         (epistemic, the mutual information), in nats, on ARC-Easy test and on the pooled MMLU questions; the AUROC of \
         telling MMLU questions from ARC-Easy ones by each example's total and epistemic uncertainty. Mean ± std over the seeds.\n\n\
         | method | S | total, ARC-E | aleatoric, ARC-E | epistemic, ARC-E | epistemic, MMLU | AUROC, total | AUROC, epistemic |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (key, label, s) in methods {
        let Some(first) = s.first() else { continue };
        let n = want(key);
        let u = |task: &str, f: fn(&Uncertainty) -> f64| s.iter().filter_map(|x| x.uncertainty.get(task).map(f)).collect::<Vec<_>>();
        let mmlu_epistemic: Vec<f64> = s
            .iter()
            .map(|x| {
                // The pooled MMLU mean: the per-task means weighted by their counts.
                let parts: Vec<(f64, f64)> = x
                    .uncertainty
                    .iter()
                    .filter(|(t, _)| t.starts_with("mmlu-"))
                    .map(|(t, v)| (v.epistemic, x.metrics[t].count as f64))
                    .collect();
                parts.iter().map(|(v, c)| v * c).sum::<f64>() / parts.iter().map(|p| p.1).sum::<f64>().max(1.0)
            })
            .collect();
        let a = |f: fn(&Summary) -> Option<f64>| s.iter().filter_map(f).collect::<Vec<_>>();
        unc.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} |\n",
            first.samples,
            mean_std(&u(IN_DISTRIBUTION, |v| v.total), 1.0, 4, n),
            mean_std(&u(IN_DISTRIBUTION, |v| v.aleatoric), 1.0, 4, n),
            mean_std(&u(IN_DISTRIBUTION, |v| v.epistemic), 1.0, 4, n),
            mean_std(&mmlu_epistemic, 1.0, 4, n),
            mean_std(&a(|x| x.auroc_total), 1.0, 3, n),
            mean_std(&a(|x| x.auroc_epistemic), 1.0, 3, n),
        ));
    }
    (id, ood, unc)
}

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

/// The comparisons the study is about: each Me-LoRA against each baseline
/// and against the other Me-LoRA, and every method against MAP, on
/// ARC-Easy test. Two per-seed methods are paired by seed (a seed gives
/// every method the same training questions in the same order, and every
/// evaluation the same test questions), so the spread is that of the
/// paired difference; against the one ensemble, each seed of the method
/// minus the ensemble (and the ensemble minus each MAP seed).
pub fn differences(methods: &[(&str, &str, Vec<Summary>)], seeds: usize) -> String {
    let find = |key: &str| methods.iter().find(|(k, _, _)| *k == key);
    let mut out = String::from(
        "ARC-Easy test: method minus baseline, mean ± std over the seeds both have finished (paired by seed; \
         ENS, the one ensemble, against each seed of the other side). Higher ACC is better; lower ECE, NLL \
         and Brier are better.\n\n\
         | method | minus | seeds | ΔACC (points) | ΔECE (points) | ΔNLL | ΔBrier |\n\
         |---|---|---|---:|---:|---:|---:|\n",
    );
    let mut row = |(key, label, runs): &(&str, &str, Vec<Summary>), (base_key, base_label, base): &(&str, &str, Vec<Summary>)| {
        // (seed, method, baseline): the one ensemble against every seed of the other side.
        let pairs: Vec<(Option<u64>, &Summary, &Summary)> = match (*key, *base_key) {
            ("ens", _) => runs.first().map(|e| base.iter().map(|b| (b.seed, e, b)).collect()).unwrap_or_default(),
            (_, "ens") => base.first().map(|e| runs.iter().map(|s| (s.seed, s, e)).collect()).unwrap_or_default(),
            _ => runs.iter().filter_map(|s| base.iter().find(|b| b.seed == s.seed).map(|b| (s.seed, s, b))).collect(),
        };
        let d = |f: fn(&Metrics) -> f64| -> Vec<f64> {
            pairs
                .iter()
                .filter_map(|(_, s, b)| Some(f(s.metrics.get(IN_DISTRIBUTION)?) - f(b.metrics.get(IN_DISTRIBUTION)?)))
                .collect()
        };
        if pairs.is_empty() {
            return;
        }
        let seed_list = pairs.iter().filter_map(|(seed, _, _)| seed.map(|s| s.to_string())).collect::<Vec<_>>().join(", ");
        out.push_str(&format!(
            "| {label} | {base_label} | {seed_list} | {} | {} | {} | {} |\n",
            difference_cell(&d(|m| m.accuracy), 100.0, 2, seeds),
            difference_cell(&d(|m| m.ece), 100.0, 2, seeds),
            difference_cell(&d(|m| m.nll), 1.0, 3, seeds),
            difference_cell(&d(|m| m.brier), 1.0, 3, seeds),
        ));
    };
    for key in ["melora", "melora-paper"] {
        let Some(m) = find(key) else { continue };
        for base in ["map", "mcd", "ens", "lap", "blob", "melora-paper"] {
            if base != key {
                if let Some(b) = find(base) {
                    row(m, b);
                }
            }
        }
    }
    if let Some(map) = find("map") {
        for key in ["mcd", "ens", "lap", "blob"] {
            if let Some(m) = find(key) {
                row(m, map);
            }
        }
    }
    out
}

/// The phases of `times.tsv` (run, phase, seconds, peak RSS MiB, commit)
/// as a Markdown table, and their total seconds.
pub fn times_table(tsv: &str) -> (String, u64) {
    let mut out = String::from("| run | phase | seconds | peak RSS (MiB) | commit |\n|---|---|---:|---:|---|\n");
    let mut total = 0;
    for line in tsv.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 5 {
            continue;
        }
        total += f[2].parse::<u64>().unwrap_or(0);
        out.push_str(&format!("| {} | {} | {} | {} | {} |\n", f[0], f[1], f[2], f[3], f[4]));
    }
    (out, total)
}

/// `melora study-report`: writes `in-distribution.md`, `ood.md`,
/// `uncertainty.md`, `differences.md`, `times.md`, `study.json` and a
/// reliability diagram per method (seed 0, ARC-Easy test) into `out`;
/// returns the four tables.
pub fn report(runs: &Path, out: &Path, seeds: &[u64]) -> Result<String> {
    std::fs::create_dir_all(out).map_err(|e| LlamaError::write(out, e))?;
    let collected = collect(runs, seeds)?;
    let methods: Vec<(&str, &str, Vec<Summary>)> = collected.iter().map(|c| (c.key, c.label, c.summaries.clone())).collect();
    let (id, ood, unc) = tables(&methods, seeds.len());
    let diff = differences(&methods, seeds.len());
    let write = |name: &str, text: &str| crate::assets::write_atomic(&out.join(name), text.as_bytes());
    write("in-distribution.md", &id)?;
    write("ood.md", &ood)?;
    write("uncertainty.md", &unc)?;
    write("differences.md", &diff)?;
    let tsv_path = runs.join("times.tsv");
    if let Ok(tsv) = std::fs::read_to_string(&tsv_path) {
        let (table, total) = times_table(&tsv);
        write("times.md", &format!("{table}\nTotal: {total} s ({:.1} h) of wall time, summed over the phases (each on the machine that ran it).\n", total as f64 / 3600.0))?;
    }
    let json: BTreeMap<&str, &Vec<Summary>> = collected.iter().map(|c| (c.key, &c.summaries)).collect();
    write("study.json", &serde_json::to_string_pretty(&json).map_err(|e| LlamaError::serialize("study.json", e))?)?;
    // Reliability diagrams: seed 0 of each method (the ensemble, the zero-shot model).
    for c in &collected {
        let Some(probs) = c.first.as_ref().and_then(|s| s.tasks.get(IN_DISTRIBUTION)) else { continue };
        let mut row = ResultRow::new(c.label, IN_DISTRIBUTION, "test", probs.samples, &probs.average());
        row.spread = Some(Spread::of(probs, None));
        write_results(&out.join("reliability").join(c.key), &[row])?;
    }
    Ok(format!("{id}\n{ood}\n{unc}\n{diff}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(task_probs: &[(&str, Vec<f64>, usize)]) -> EvalSet {
        let tasks = task_probs
            .iter()
            .map(|(t, p, s)| {
                let n = p.len() / (2 * s);
                (t.to_string(), SampledProbs { probs: p.clone(), samples: *s, classes: 2, labels: vec![0; n] })
            })
            .collect();
        EvalSet { tasks }
    }

    #[test]
    fn mean_std_uses_the_sample_std_and_says_when_seeds_are_missing() {
        assert_eq!(mean_std(&[1.0, 2.0, 3.0], 1.0, 2, 3), "2.00 ± 1.00");
        assert_eq!(mean_std(&[0.5], 100.0, 1, 3), "50.0 (n = 1)");
        assert_eq!(mean_std(&[2e-5], 1.0, 4, 3), "2.00e-5 (n = 1)");
        assert_eq!(mean_std(&[0.25], 1.0, 3, 1), "0.250");
        assert_eq!(mean_std(&[], 1.0, 2, 3), "-");
        assert_eq!(mean_std(&[2e-5, 4e-5], 1.0, 4, 2), "3.00e-5 ± 1.4e-5");
        assert_eq!(mean_std(&[0.0, 0.0], 1.0, 4, 2), "0.0000 ± 0.0000");
        assert_eq!(mean_std(&[0.5183], 100.0, 2, 1), "51.83");
    }

    #[test]
    fn the_ensemble_averages_its_members_and_detection_pools_mmlu() {
        // Two members that disagree on an ARC-E example: the ensemble's
        // epistemic part is the disagreement.
        let a = set(&[("arc-e", vec![0.9, 0.1, 0.5, 0.5], 1), ("mmlu-chem", vec![0.6, 0.4], 1), ("mmlu-math", vec![0.5, 0.5], 1)]);
        let b = set(&[("arc-e", vec![0.1, 0.9, 0.5, 0.5], 1), ("mmlu-chem", vec![0.6, 0.4], 1), ("mmlu-math", vec![0.5, 0.5], 1)]);
        let ens = EvalSet::ensemble(&[a.clone(), b]).unwrap();
        let arc = &ens.tasks["arc-e"];
        assert_eq!((arc.samples, arc.average().probs().to_vec()), (2, vec![0.5, 0.5, 0.5, 0.5]));
        let s = Summary::of(&ens);
        assert!(s.uncertainty["arc-e"].epistemic > 0.15);
        // Total entropy: ARC-E (negatives) {ln 2, ln 2}, pooled MMLU
        // (positives) {H(0.6, 0.4), ln 2}: H(0.6, 0.4) loses both pairs,
        // ln 2 ties both, so AUROC = (0 + 0 + 1/2 + 1/2) / 4.
        assert_eq!(s.auroc_total, Some(0.25));
        // Epistemic: ARC-E {0.37, 0}, MMLU {0, 0} (its members agree):
        // each MMLU question loses to the first and ties the second.
        assert_eq!(s.auroc_epistemic, Some(0.25));
        // One member: no epistemic AUROC.
        assert_eq!(Summary::of(&a).auroc_epistemic, None);
    }

    fn summary(seed: Option<u64>, accuracy: f64, nll: f64) -> Summary {
        let m = Metrics { count: 1000, accuracy, nll, ece: accuracy / 10.0, brier: nll / 4.0 };
        Summary {
            seed,
            samples: 1,
            metrics: BTreeMap::from([(IN_DISTRIBUTION.to_string(), m)]),
            uncertainty: BTreeMap::new(),
            auroc_total: None,
            auroc_epistemic: None,
        }
    }

    #[test]
    fn differences_pair_by_seed_and_the_ensemble_with_every_seed() {
        let map = ("map", "MAP", vec![summary(Some(0), 0.70, 1.0), summary(Some(1), 0.71, 1.1), summary(Some(2), 0.72, 1.2)]);
        let ens = ("ens", "ENS", vec![summary(None, 0.75, 0.9)]);
        let lap = ("lap", "LAP", vec![summary(Some(1), 0.68, 1.0)]);
        // BLoB has only seed 2, melora's Me-LoRA only 0 and 1: no pair.
        let blob = ("blob", "BLoB", vec![summary(Some(2), 0.80, 1.0)]);
        let melora = ("melora", "Me-LoRA", vec![summary(Some(0), 0.72, 1.05), summary(Some(1), 0.71, 1.0)]);
        let table = differences(&[map, ens, lap, blob, melora], 3);
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| method")).collect();
        // Me-LoRA minus MAP on seeds 0 and 1: ACC +2 and 0 points, NLL
        // +0.05 and -0.1; ECE is ACC / 10, Brier NLL / 4.
        assert_eq!(rows[0], "| Me-LoRA | MAP | 0, 1 | +1.00 ± 1.41 (n = 2) | +0.10 ± 0.14 (n = 2) | -0.025 ± 0.106 (n = 2) | -0.006 ± 0.027 (n = 2) |");
        // Me-LoRA minus the ensemble: each of its seeds against the one ENS.
        assert_eq!(rows[1], "| Me-LoRA | ENS | 0, 1 | -3.50 ± 0.71 (n = 2) | -0.35 ± 0.07 (n = 2) | +0.125 ± 0.035 (n = 2) | +0.031 ± 0.009 (n = 2) |");
        // LAP's only seed is 1, which Me-LoRA has: one pair, no spread.
        assert_eq!(rows[2], "| Me-LoRA | LAP | 1 | +3.00 (n = 1) | +0.30 (n = 1) | +0.000 (n = 1) | +0.000 (n = 1) |");
        // Against MAP: ENS minus each MAP seed (3 pairs), LAP on seed 1;
        // BLoB's seed 2 against MAP's seed 2.
        assert_eq!(rows[3], "| ENS | MAP | 0, 1, 2 | +4.00 ± 1.00 | +0.40 ± 0.10 | -0.200 ± 0.100 | -0.050 ± 0.025 |");
        assert_eq!(rows[4], "| LAP | MAP | 1 | -3.00 (n = 1) | -0.30 (n = 1) | -0.100 (n = 1) | -0.025 (n = 1) |");
        assert_eq!(rows[5], "| BLoB | MAP | 2 | +8.00 (n = 1) | +0.80 (n = 1) | -0.200 (n = 1) | -0.050 (n = 1) |");
        // Me-LoRA against BLoB (no common seed) and methods that are missing: no rows.
        assert_eq!(rows.len(), 6);
    }
}
