//! A study's tables, regenerated from the evaluations it keeps: every
//! evaluation folder's sample probabilities (`predictions-<k>.json`, or
//! gzipped as kept) are read back and summarised, so a table never holds a
//! number that no file supports. What a study is, and where its files go,
//! is its study file ([`spec::Study`], `experiments/study-*.json`);
//! `experiments/study.sh` runs it.
//!
//! An ensemble method is built here from its members' evaluations (their
//! probabilities averaged: one ensemble, the members the seeds of the
//! method it names).

pub mod curves;
pub mod spec;

use melora_core::metrics::ECE_BINS;
use melora_core::{auroc, ClassProbs, Metrics, Uncertainty};
use melora_llama::error::{LlamaError, Result};
use melora_llama::eval::SampledProbs;
use melora_llama::report::{write_results, ResultRow, Spread};
use melora_llama::train::Checkpoint;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use spec::{Compare, Study, TaskSpec, ZERO_SHOT};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// One evaluation folder: each task's sample probabilities and result row.
#[derive(Debug, Clone)]
pub struct EvalSet {
    /// Task name -> probabilities.
    pub tasks: BTreeMap<String, SampledProbs>,
    /// Task name -> the row `melora eval` wrote (`None` for an ensemble).
    pub rows: BTreeMap<String, ResultRow>,
}

/// Reads `dir/name`, or its gzipped copy `dir/name.gz`.
fn read_maybe_gz(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    if path.is_file() {
        return std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e));
    }
    let gz = dir.join(format!("{name}.gz"));
    let file = std::fs::File::open(&gz).map_err(|e| LlamaError::io(&gz, e))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| LlamaError::io(&gz, e))?;
    Ok(text)
}

impl EvalSet {
    /// Reads `dir` (its `results.json` names each row's task); `None` when
    /// the evaluation has not finished (no `done`).
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        if !dir.join("done").exists() {
            return Ok(None);
        }
        let rows: Vec<ResultRow> = serde_json::from_str(&read_maybe_gz(dir, "results.json")?)
            .map_err(|e| LlamaError::format(dir.join("results.json"), e.to_string()))?;
        let mut tasks = BTreeMap::new();
        for (k, row) in rows.iter().enumerate() {
            let name = format!("predictions-{k}.json");
            let probs: SampledProbs = serde_json::from_str(&read_maybe_gz(dir, &name)?)
                .map_err(|e| LlamaError::format(dir.join(&name), e.to_string()))?;
            tasks.insert(row.task.clone(), probs);
        }
        let rows = rows.into_iter().map(|r| (r.task.clone(), r)).collect();
        Ok(Some(Self { tasks, rows }))
    }

    /// An ensemble of `members` (each one sample per example, the same
    /// examples): member `m`'s probabilities become sample `m`; the tasks
    /// are those every member has.
    pub fn ensemble(members: &[EvalSet]) -> Result<Self> {
        let first = members
            .first()
            .ok_or_else(|| LlamaError::Mismatch("an ensemble of no members".into()))?;
        let mut tasks = BTreeMap::new();
        for (task, probs) in &first.tasks {
            if members.iter().any(|m| !m.tasks.contains_key(task)) {
                continue;
            }
            let mut rows = Vec::new();
            for m in members {
                let p = &m.tasks[task];
                if p.labels != probs.labels || p.classes != probs.classes {
                    return Err(LlamaError::Mismatch(format!(
                        "the ensemble members' {task} evaluations hold different examples"
                    )));
                }
                rows.push(p.average().probs().to_vec());
            }
            tasks.insert(
                task.clone(),
                SampledProbs::from_members(&rows, probs.classes, probs.labels.clone()),
            );
        }
        Ok(Self {
            tasks,
            rows: BTreeMap::new(),
        })
    }
}

/// What the tables report of one evaluation folder.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The run's seed (`None` for the zero-shot model and an ensemble).
    pub seed: Option<u64>,
    /// Samples per example.
    pub samples: usize,
    /// Metrics per task.
    pub metrics: BTreeMap<String, Metrics>,
    /// Mean uncertainty decomposition per task.
    pub uncertainty: BTreeMap<String, Uncertainty>,
    /// The AUROC of telling the pooled detection questions (the MMLU
    /// ones, else every out-of-distribution task) from the
    /// in-distribution ones, by total entropy.
    pub auroc_total: Option<f64>,
    /// The same by the epistemic part (`None` for one sample).
    pub auroc_epistemic: Option<f64>,
    /// The in-distribution evaluation's posterior spread (a Bayesian run's
    /// mean posterior std at initialisation and at the checkpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
}

/// The out-of-distribution tasks pooled for detection: the MMLU ones,
/// else all of them.
pub fn detection_tasks(ood: &[String]) -> Vec<String> {
    let mmlu: Vec<String> = ood.iter().filter(|t| t.starts_with("mmlu-")).cloned().collect();
    if mmlu.is_empty() {
        ood.to_vec()
    } else {
        mmlu
    }
}

impl Summary {
    /// The summary of `set`, whose in-distribution task is `task`.
    pub fn of(set: &EvalSet, task: &str) -> Self {
        let mut metrics = BTreeMap::new();
        let mut uncertainty = BTreeMap::new();
        for (name, probs) in &set.tasks {
            metrics.insert(name.clone(), probs.average().metrics());
            let (total, aleatoric, epistemic) = probs.uncertainty();
            uncertainty.insert(
                name.clone(),
                Uncertainty {
                    total,
                    aleatoric,
                    epistemic,
                },
            );
        }
        let ood: Vec<String> = set.tasks.keys().filter(|t| *t != task).cloned().collect();
        let detect = detection_tasks(&ood);
        let inside: Vec<Uncertainty> = set.tasks.get(task).map(|p| p.per_example()).unwrap_or_default();
        let outside: Vec<Uncertainty> = set
            .tasks
            .iter()
            .filter(|(t, _)| detect.contains(t))
            .flat_map(|(_, p)| p.per_example())
            .collect();
        let score = |f: fn(&Uncertainty) -> f64| {
            auroc(
                &outside.iter().map(f).collect::<Vec<_>>(),
                &inside.iter().map(f).collect::<Vec<_>>(),
            )
        };
        let samples = set.tasks.values().map(|p| p.samples).min().unwrap_or(1);
        Self {
            seed: None,
            samples,
            metrics,
            uncertainty,
            auroc_total: score(|u| u.total),
            auroc_epistemic: if samples > 1 { score(|u| u.epistemic) } else { None },
            spread: set.rows.get(task).and_then(|r| r.spread.clone()),
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
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let count = if values.len() == want {
        String::new()
    } else {
        format!(" (n = {})", values.len())
    };
    Some((scale * mean, scale * var.sqrt(), count))
}

/// Mean and sample standard deviation (`n - 1`) of the present values,
/// formatted with `digits` decimals after scaling by `scale`, with the
/// count when it is not `want`; one value has no spread, so it is printed
/// alone (with its count when more were wanted: a method whose other seeds
/// have not finished).
pub fn mean_std(values: &[f64], scale: f64, digits: usize, want: usize) -> String {
    let Some((mean, std, count)) = spread(values, scale, want) else {
        return "-".into();
    };
    // One value (a single run by design, zero-shot or the ensemble, or the
    // one finished seed so far): its value, no spread.
    if values.len() == 1 {
        let value = if mean != 0.0 && mean.abs() < 10f64.powi(1 - digits as i32) {
            format!("{mean:.2e}")
        } else {
            format!("{mean:.digits$}")
        };
        return format!("{value}{count}");
    }
    // Values too small for `digits` decimals (an epistemic part of 1e-5 nats) in scientific notation.
    if mean != 0.0 && mean.abs() < 10f64.powi(1 - digits as i32) {
        return format!("{mean:.2e} ± {std:.1e}{count}");
    }
    format!("{mean:.digits$} ± {std:.digits$}{count}")
}

/// A method's in-distribution predictions (the model average), each with
/// its seed (`None` for the zero-shot model and the ensemble).
pub type SeedPredictions = Vec<(Option<u64>, ClassProbs)>;

/// One method's evaluations as the tables read them.
pub struct Collected {
    /// The method's folder name.
    pub key: String,
    /// Its table label.
    pub label: String,
    /// One summary per finished seed (one for zero-shot and an ensemble).
    pub summaries: Vec<Summary>,
    /// The first seed's evaluation (an ensemble's, the zero-shot model's):
    /// its reliability diagram.
    pub first: Option<EvalSet>,
    /// Each summary's seed and in-distribution predictions (the model
    /// average), in the order of `summaries`: the bootstrap over questions.
    pub in_distribution: SeedPredictions,
}

/// Every method's evaluations of task `t` at `checkpoint`, read from the
/// folder `evals` (a study's results or runs folder), each folder once;
/// the zero-shot model first.
pub fn collect(study: &Study, evals: &Path, t: &TaskSpec, checkpoint: Checkpoint) -> Result<Vec<Collected>> {
    let task = t.task.name();
    let seeds = study.task_seeds(t);
    let mut out = Vec::new();
    let mut by_key: BTreeMap<String, Vec<EvalSet>> = BTreeMap::new();
    let zero_shot = EvalSet::load(&evals.join(Study::eval_rel(t.task, None)))?;
    let methods = std::iter::once((ZERO_SHOT.to_string(), study.zero_shot_label.clone(), None))
        .chain(study.methods.iter().map(|m| (m.key.clone(), m.label.clone(), Some(m))));
    for (key, label, method) in methods {
        let (per_seed, sets): (bool, Vec<(u64, EvalSet)>) = match method {
            None => (false, zero_shot.clone().map(|s| (0, s)).into_iter().collect()),
            Some(m) => match &m.ensemble_of {
                // One ensemble of every seed of its members' method.
                Some(of) => {
                    let members = by_key.get(of).cloned().unwrap_or_default();
                    let all = members.len() == seeds.len() && !members.is_empty();
                    (
                        false,
                        if all {
                            vec![(0, EvalSet::ensemble(&members)?)]
                        } else {
                            Vec::new()
                        },
                    )
                }
                None => {
                    let mut sets = Vec::new();
                    for &seed in &seeds {
                        if let Some(set) =
                            EvalSet::load(&evals.join(Study::eval_rel(t.task, Some((checkpoint, &key, seed)))))?
                        {
                            sets.push((seed, set));
                        }
                    }
                    by_key.insert(key.clone(), sets.iter().map(|(_, s)| s.clone()).collect());
                    (true, sets)
                }
            },
        };
        let summaries: Vec<Summary> = sets
            .iter()
            .map(|(seed, s)| Summary {
                seed: per_seed.then_some(*seed),
                ..Summary::of(s, task)
            })
            .collect();
        let in_distribution = sets
            .iter()
            .zip(&summaries)
            .filter_map(|((_, set), summary)| set.tasks.get(task).map(|p| (summary.seed, p.average())))
            .collect();
        let first_seed = if per_seed { seeds.first().copied() } else { Some(0) };
        let first = sets
            .into_iter()
            .find(|(seed, _)| Some(*seed) == first_seed)
            .map(|(_, s)| s);
        out.push(Collected {
            key,
            label,
            summaries,
            first,
            in_distribution,
        });
    }
    Ok(out)
}

/// How many values a method's cell wants: one for a single evaluation by
/// design (the zero-shot model, an ensemble: summaries without a seed),
/// else the seeds.
fn wanted(s: &[Summary], seeds: usize) -> usize {
    if !s.is_empty() && s.iter().all(|x| x.seed.is_none()) {
        1
    } else {
        seeds
    }
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

/// What the tables of one task say of it: the in-distribution task, its
/// title ("ARC-Easy") and split, and the out-of-distribution tasks.
pub struct Scope {
    /// The in-distribution task's name.
    pub task: &'static str,
    /// Its title.
    pub title: &'static str,
    /// The split evaluated.
    pub split: &'static str,
    /// The out-of-distribution tasks of these tables (none at a checkpoint
    /// evaluated in distribution only).
    pub ood: Vec<String>,
}

impl Scope {
    /// Task `t` of a study: its out-of-distribution tasks when `with_ood`.
    pub fn of(t: &TaskSpec, with_ood: bool) -> Self {
        let ood = match (&t.ood, with_ood) {
            (Some(o), true) => o.tasks.iter().map(|x| x.name().to_string()).collect(),
            _ => Vec::new(),
        };
        Scope {
            task: t.task.name(),
            title: t.task.title(),
            split: t.split.name(),
            ood,
        }
    }

    /// "ARC-Easy test (arc-e)".
    pub fn heading(&self) -> String {
        format!("{} {} ({})", self.title, self.split, self.task)
    }
}

/// The three tables (in distribution, out of distribution, uncertainty and
/// detection) as Markdown; the second is empty without out-of-distribution
/// tasks, and the third then has no detection columns.
pub fn tables(methods: &[(&str, &str, Vec<Summary>)], seeds: usize, scope: &Scope) -> (String, String, String) {
    let task = scope.task;
    let header = "| method | S | ACC (%) | ECE (%) | NLL | Brier |\n|---|---:|---:|---:|---:|---:|\n";
    let mut id = format!("{}, mean ± std over the seeds\n\n{header}", scope.heading());
    let mut ood = String::new();
    for (_, label, s) in methods {
        if let Some(first) = s.first() {
            id.push_str(&format!(
                "| {label} | {} | {} |\n",
                first.samples,
                metric_cells(s, task, wanted(s, seeds))
            ));
        }
    }
    let in_title = scope.title;
    for other in &scope.ood {
        ood.push_str(&format!(
            "\n{other} (adapters trained on {in_title}), mean ± std over the seeds\n\n{header}"
        ));
        for (_, label, s) in methods {
            if let Some(first) = s.first() {
                ood.push_str(&format!(
                    "| {label} | {} | {} |\n",
                    first.samples,
                    metric_cells(s, other, wanted(s, seeds))
                ));
            }
        }
    }
    let detect = detection_tasks(&scope.ood);
    let pooled = if detect.iter().all(|t| t.starts_with("mmlu-")) {
        "MMLU".to_string()
    } else {
        detect.join(" + ")
    };
    let mut unc = if detect.is_empty() {
        format!(
            "Mean over examples of the predictive entropy (total), the expected entropy (aleatoric) and their difference \
             (epistemic, the mutual information), in nats, on {}. Mean ± std over the seeds.\n\n\
             | method | S | total | aleatoric | epistemic |\n|---|---:|---:|---:|---:|\n",
            scope.heading()
        )
    } else {
        format!(
            "Mean over examples of the predictive entropy (total), the expected entropy (aleatoric) and their difference \
             (epistemic, the mutual information), in nats, on {in_title} {} and on the pooled {pooled} questions; the AUROC of \
             telling {pooled} questions from {in_title} ones by each example's total and epistemic uncertainty. Mean ± std over the seeds.\n\n\
             | method | S | total, {short} | aleatoric, {short} | epistemic, {short} | epistemic, {pooled} | AUROC, total | AUROC, epistemic |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n",
            scope.split,
            short = short_name(task)
        )
    };
    for (_, label, s) in methods {
        let Some(first) = s.first() else { continue };
        let n = wanted(s, seeds);
        let u = |name: &str, f: fn(&Uncertainty) -> f64| {
            s.iter()
                .filter_map(|x| x.uncertainty.get(name).map(f))
                .collect::<Vec<_>>()
        };
        let cells = [
            mean_std(&u(task, |v| v.total), 1.0, 4, n),
            mean_std(&u(task, |v| v.aleatoric), 1.0, 4, n),
            mean_std(&u(task, |v| v.epistemic), 1.0, 4, n),
        ];
        if detect.is_empty() {
            unc.push_str(&format!("| {label} | {} | {} |\n", first.samples, cells.join(" | ")));
            continue;
        }
        let pooled_epistemic: Vec<f64> = s
            .iter()
            .filter(|x| detect.iter().all(|t| x.uncertainty.contains_key(t)))
            .map(|x| {
                // The pooled mean: the per-task means weighted by their counts.
                let parts: Vec<(f64, f64)> = detect
                    .iter()
                    .map(|t| (x.uncertainty[t].epistemic, x.metrics[t].count as f64))
                    .collect();
                parts.iter().map(|(v, c)| v * c).sum::<f64>() / parts.iter().map(|p| p.1).sum::<f64>().max(1.0)
            })
            .collect();
        let a = |f: fn(&Summary) -> Option<f64>| s.iter().filter_map(f).collect::<Vec<_>>();
        unc.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} |\n",
            first.samples,
            cells.join(" | "),
            mean_std(&pooled_epistemic, 1.0, 4, n),
            mean_std(&a(|x| x.auroc_total), 1.0, 3, n),
            mean_std(&a(|x| x.auroc_epistemic), 1.0, 3, n),
        ));
    }
    (id, ood, unc)
}

/// A task's short name in column headings: ARC-E, WG-S, ...
fn short_name(task: &str) -> String {
    task.to_uppercase()
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
        let cell = |(lo, hi): (f64, f64), scale: f64, digits: usize| {
            let text = format!("{:+.digits$} to {:+.digits$}", scale * lo, scale * hi);
            if lo > 0.0 || hi < 0.0 {
                format!("**{text}**")
            } else {
                text
            }
        };
        out.push_str(&format!(
            "| {label} | {base_label} | {} | {} | {} | {} | {} |\n",
            seed_list(&pairs),
            cell(intervals[0], 100.0, 2),
            cell(intervals[1], 100.0, 2),
            cell(intervals[2], 1.0, 3),
            cell(intervals[3], 1.0, 3),
        ));
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

/// The verdict on a run's posterior at the end of its training (the
/// `posterior: ` line its log ends with, kept as `verdict.txt` beside the
/// run's record): "converged", "still moving", or "-" when there is none.
fn run_verdict(record: &Path) -> String {
    std::fs::read_to_string(record.join("verdict.txt"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("posterior: ")
                .map(|v| v.split(':').next().unwrap_or(v).to_string())
        })
        .unwrap_or_else(|| "-".into())
}

/// The posterior diagnostics of every Bayesian run evaluated at one
/// checkpoint, as Markdown: its mean posterior std at initialisation and at
/// the checkpoint, that std over the means' RMS, the epistemic part on the
/// task, and the verdict at the end of training.
pub fn posterior_table(results: &Path, t: &TaskSpec, collected: &[Collected], checkpoint: Checkpoint) -> String {
    let task = t.task.name();
    let mut out = format!(
        "{} {}, the {} checkpoint: each Bayesian run's mean posterior std (of Me-LoRA's C, BLoB's A) at initialisation and \
         at the checkpoint, that std over the root mean square of the means, the mean epistemic part (nats), and \
         whether the std had converged at the end of training (within 5% over the last fifth of the steps).\n\n\
         | method | seed | std at init | std | std / rms mean | epistemic | at the end of training |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
        t.task.title(),
        t.split.name(),
        checkpoint.name()
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    for c in collected {
        for summary in &c.summaries {
            let (Some(seed), Some(spread)) = (summary.seed, &summary.spread) else {
                continue;
            };
            if spread.posterior_std.is_none() {
                continue;
            }
            let record = results.join("runs").join(task).join(format!("{}-seed{seed}", c.key));
            let epistemic = summary.uncertainty.get(task).map(|u| u.epistemic);
            out.push_str(&format!(
                "| {} | {seed} | {} | {} | {} | {} | {} |\n",
                c.label,
                cell(spread.std_init),
                cell(spread.posterior_std),
                cell(spread.std_relative),
                epistemic.map_or("-".into(), |e| if e != 0.0 && e.abs() < 1e-3 {
                    format!("{e:.2e}")
                } else {
                    format!("{e:.4}")
                }),
                run_verdict(&record)
            ));
        }
    }
    out
}

/// `melora study-report`: for each task of `study` and each checkpoint,
/// from the evaluations kept in its results folder, writes into
/// `<results>/<task>/<checkpoint>/` `in-distribution.md`,
/// `uncertainty.md`, `differences.md`, `posterior.md` and a reliability
/// diagram per method (its first seed); `<results>/<task>/ood.md` at the
/// out-of-distribution checkpoint; the validation curves
/// ([`curves::plot_task`], from the kept run records or, for runs still
/// training, the run folders under `runs`); `study.json` and `times.md`.
/// Returns the tables.
pub fn report(study: &Study, runs: Option<&Path>) -> Result<String> {
    let results = study.results.as_path();
    std::fs::create_dir_all(results).map_err(|e| LlamaError::write(results, e))?;
    let write = |path: &Path, text: &str| melora_llama::assets::write_atomic(path, text.as_bytes());
    let mut text = String::new();
    let mut json: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<Summary>>>> = BTreeMap::new();
    for t in &study.tasks {
        let task_dir = results.join(t.task.name());
        let seeds = study.task_seeds(t).len();
        for &checkpoint in &study.checkpoints {
            let collected = collect(study, results, t, checkpoint)?;
            let with_ood = t.ood.as_ref().is_some_and(|o| o.checkpoint == checkpoint);
            let scope = Scope::of(t, with_ood);
            let keys: Vec<&str> = collected.iter().map(|c| c.key.as_str()).collect();
            let comparisons = comparisons(&study.compare, &keys);
            let methods: Vec<(&str, &str, Vec<Summary>)> = collected
                .iter()
                .map(|c| (c.key.as_str(), c.label.as_str(), c.summaries.clone()))
                .collect();
            let (id, ood, unc) = tables(&methods, seeds, &scope);
            let predictions: Vec<(&str, &str, SeedPredictions)> = collected
                .iter()
                .map(|c| (c.key.as_str(), c.label.as_str(), c.in_distribution.clone()))
                .collect();
            let diff = format!(
                "{}\n{}",
                differences(&methods, seeds, &scope, &comparisons),
                bootstrap_differences(&predictions, BOOTSTRAP_RESAMPLES, &scope, &comparisons)
            );
            let posterior = posterior_table(results, t, &collected, checkpoint);
            let dir = task_dir.join(checkpoint.name());
            std::fs::create_dir_all(&dir).map_err(|e| LlamaError::write(&dir, e))?;
            let title = format!("{} checkpoint ({})", checkpoint.name(), checkpoint_rule(checkpoint));
            write(&dir.join("in-distribution.md"), &format!("The {title}.\n\n{id}"))?;
            write(&dir.join("uncertainty.md"), &format!("The {title}.\n\n{unc}"))?;
            write(&dir.join("differences.md"), &format!("The {title}.\n\n{diff}"))?;
            write(&dir.join("posterior.md"), &posterior)?;
            if with_ood {
                write(&task_dir.join("ood.md"), &format!("The {title}.\n{ood}"))?;
            }
            text.push_str(&format!(
                "# {}, the {title}\n\n{id}\n{ood}\n{unc}\n{diff}\n{posterior}\n",
                t.task.title()
            ));
            for c in &collected {
                let Some(probs) = c.first.as_ref().and_then(|s| s.tasks.get(t.task.name())) else {
                    continue;
                };
                let mut row = ResultRow::new(&c.label, t.task.name(), t.split.name(), probs.samples, &probs.average());
                row.spread = Some(Spread::of(probs, None, None));
                write_results(&dir.join("reliability").join(&c.key), &[row])?;
            }
            json.entry(t.task.name().to_string()).or_default().insert(
                checkpoint.name().to_string(),
                collected.iter().map(|c| (c.key.clone(), c.summaries.clone())).collect(),
            );
        }
        curves::plot_task(study, t, runs, &task_dir)?;
    }
    write(
        &results.join("study.json"),
        &serde_json::to_string_pretty(&json).map_err(|e| LlamaError::serialize("study.json", e))?,
    )?;
    if let Ok(tsv) = std::fs::read_to_string(results.join("times.tsv")) {
        let (table, total) = times_table(&tsv);
        write(
            &results.join("times.md"),
            &format!("{table}\nTotal: {total} s ({:.1} h) of wall time, summed over the phases (each on the machine that ran it).\n", total as f64 / 3600.0),
        )?;
    }
    Ok(text)
}

/// How a checkpoint is chosen, in words.
fn checkpoint_rule(checkpoint: Checkpoint) -> &'static str {
    match checkpoint {
        Checkpoint::Best => "the best validation accuracy of the mean weights, the paper's rule",
        Checkpoint::Last => "the last step, BLoB's code's rule",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(task_probs: &[(&str, Vec<f64>, usize)]) -> EvalSet {
        let tasks = task_probs
            .iter()
            .map(|(t, p, s)| {
                let n = p.len() / (2 * s);
                (
                    t.to_string(),
                    SampledProbs {
                        probs: p.clone(),
                        samples: *s,
                        classes: 2,
                        labels: vec![0; n],
                    },
                )
            })
            .collect();
        EvalSet {
            tasks,
            rows: BTreeMap::new(),
        }
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
        let a = set(&[
            ("arc-e", vec![0.9, 0.1, 0.5, 0.5], 1),
            ("mmlu-chem", vec![0.6, 0.4], 1),
            ("mmlu-math", vec![0.5, 0.5], 1),
        ]);
        let b = set(&[
            ("arc-e", vec![0.1, 0.9, 0.5, 0.5], 1),
            ("mmlu-chem", vec![0.6, 0.4], 1),
            ("mmlu-math", vec![0.5, 0.5], 1),
        ]);
        let ens = EvalSet::ensemble(&[a.clone(), b]).unwrap();
        let arc = &ens.tasks["arc-e"];
        assert_eq!(
            (arc.samples, arc.average().probs().to_vec()),
            (2, vec![0.5, 0.5, 0.5, 0.5])
        );
        let s = Summary::of(&ens, "arc-e");
        assert!(s.uncertainty["arc-e"].epistemic > 0.15);
        // Total entropy: ARC-E (negatives) {ln 2, ln 2}, pooled MMLU
        // (positives) {H(0.6, 0.4), ln 2}: H(0.6, 0.4) loses both pairs,
        // ln 2 ties both, so AUROC = (0 + 0 + 1/2 + 1/2) / 4.
        assert_eq!(s.auroc_total, Some(0.25));
        // Epistemic: ARC-E {0.37, 0}, MMLU {0, 0} (its members agree):
        // each MMLU question loses to the first and ties the second.
        assert_eq!(s.auroc_epistemic, Some(0.25));
        // One member: no epistemic AUROC.
        assert_eq!(Summary::of(&a, "arc-e").auroc_epistemic, None);
    }

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
