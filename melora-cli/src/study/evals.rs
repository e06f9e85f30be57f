//! A study's evaluations read back: each folder's sample probabilities and
//! rows, an ensemble built from its members' evaluations, and what the
//! tables report of each ([`Summary`]).

use super::spec::{Study, TaskSpec, ZERO_SHOT};
use melora_core::{auroc, ClassProbs, Metrics, Uncertainty};
use melora_llama::error::{LlamaError, Result};
use melora_llama::eval::SampledProbs;
use melora_llama::report::{ResultRow, Spread};
use melora_llama::train::Checkpoint;
use serde::Serialize;
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
    if !gz.is_file() {
        return Err(LlamaError::Unavailable(format!(
            "{} holds no {name} (nor {name}.gz): not a finished evaluation of `melora eval`",
            dir.display()
        )));
    }
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
        Self::read(dir).map(Some)
    }

    /// Reads an evaluation folder as `melora eval` writes it
    /// (`results.json`, whose rows name the tasks, and each row's
    /// `predictions-<k>.json`, or their gzipped copies).
    pub fn read(dir: &Path) -> Result<Self> {
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
        Ok(Self { tasks, rows })
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

#[cfg(test)]
mod tests {
    use super::*;
    use melora_llama::eval::SampledProbs;

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
}
