//! A study as a file: its tasks, methods, seeds, checkpoints and the
//! arguments of every command it runs (`experiments/study-*.json`), and the
//! plan of phases (train, Laplace fit, evaluation) that `experiments/study.sh`
//! runs and `melora study-report` reads back.
//!
//! Layout under the study's run folder `R` (and, for what is kept and
//! committed, under its results folder):
//! - `R/<task>/<method>-seed<s>/`: a training run;
//! - `R/<task>/<of>-seed<s>/laplace-<checkpoint>/`: a Laplace fit of run `of`;
//! - `R/evals/<task>/<checkpoint>/<method>-seed<s>/`: an evaluation;
//! - `R/evals/<task>/zero-shot/`: the base model's.
//!
//! A phase is done when its marker file exists: a training run's and an
//! evaluation's `done` (written by the runner once the command succeeded),
//! a Laplace fit's `laplace.json`.

use melora_llama::data::{Split, Task};
use melora_llama::error::{LlamaError, Result};
use melora_llama::train::Checkpoint;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A study file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Study {
    /// One line on what the study is.
    pub description: String,
    /// Where its runs go (ignored by git).
    pub runs: PathBuf,
    /// Where its kept evaluations, run records and tables go (committed).
    pub results: PathBuf,
    /// The folder of the training settings files: a method with `config`
    /// `c` trains on task `t` from `<configs>/<t>-<c>.json`.
    pub configs: PathBuf,
    /// Arguments of every `melora train`, before each method's own.
    pub train: Vec<String>,
    /// Arguments of every evaluation of a trained or fitted method, before
    /// the method's own.
    #[serde(default)]
    pub eval: Vec<String>,
    /// Arguments of the base model's evaluation (`--zero-shot` is added).
    #[serde(default)]
    pub zero_shot: Vec<String>,
    /// The base model's row label.
    #[serde(default = "zero_shot_label")]
    pub zero_shot_label: String,
    /// The seeds, in the order they run: each seed of every task and
    /// method before the next seed, so that a one-seed table exists early.
    pub seeds: Vec<u64>,
    /// The checkpoints evaluated of every run, in table order.
    pub checkpoints: Vec<Checkpoint>,
    /// The in-distribution tasks.
    pub tasks: Vec<TaskSpec>,
    /// The methods, in table order.
    pub methods: Vec<MethodSpec>,
    /// Which differences the tables report.
    pub compare: Compare,
}

/// An in-distribution task of a study.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The task trained on and evaluated.
    pub task: Task,
    /// The split every method is evaluated on.
    pub split: Split,
    /// A fixed, seeded subset of at most this many questions.
    #[serde(default)]
    pub max_examples: Option<usize>,
    /// The seeds of this task (default: the study's).
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
    /// Out-of-distribution tasks, evaluated with the adapters trained here.
    #[serde(default)]
    pub ood: Option<OodSpec>,
}

/// The out-of-distribution evaluation of a task's adapters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OodSpec {
    /// In table order; the `mmlu-*` ones are pooled for detection.
    pub tasks: Vec<Task>,
    /// The checkpoint whose evaluation includes them.
    pub checkpoint: Checkpoint,
    /// The seeds evaluated out of distribution (default: the task's).
    #[serde(default)]
    pub seeds: Option<Vec<u64>>,
}

/// A method of a study: trained, an ensemble of a trained method's seeds,
/// or a Laplace fit on a trained method's runs (exactly one of the three).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// Its folder name.
    pub key: String,
    /// Its table label.
    pub label: String,
    /// How it trains, for a trained method.
    #[serde(default)]
    pub train: Option<TrainSpec>,
    /// The trained method whose seeds are this ensemble's members (their
    /// evaluations averaged; nothing is run for it).
    #[serde(default)]
    pub ensemble_of: Option<String>,
    /// The fit, for a Laplace method.
    #[serde(default)]
    pub laplace: Option<LaplaceSpec>,
    /// Arguments of its evaluations, after the study's.
    #[serde(default)]
    pub eval: Vec<String>,
    /// The seeds evaluated out of distribution, in place of the task's
    /// (say every seed of a cheap method whose ensemble needs them all).
    #[serde(default)]
    pub ood_seeds: Option<Vec<u64>>,
}

/// How a method trains.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// The settings file's suffix: `<configs>/<task>-<config>.json`.
    pub config: String,
    /// Arguments after the study's `train`.
    #[serde(default)]
    pub args: Vec<String>,
}

/// A Laplace fit on each run (and each checkpoint) of a trained method.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaplaceSpec {
    /// The trained method.
    pub of: String,
    /// The Laplace settings file, in `configs`.
    pub config: String,
    /// Arguments of `melora laplace` after those.
    #[serde(default)]
    pub args: Vec<String>,
}

/// The differences reported: each `focus` method against every other
/// method (but the focus methods listed before it), then every other
/// method against `baseline`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// The methods the study is about, in table order of the comparisons.
    pub focus: Vec<String>,
    /// The method every other one is compared with.
    pub baseline: String,
}

/// The base model's key in tables and folders.
pub const ZERO_SHOT: &str = "zero-shot";

fn zero_shot_label() -> String {
    ZERO_SHOT.into()
}

/// What a phase does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PhaseKind {
    /// `melora train`.
    Train,
    /// `melora laplace`.
    Laplace,
    /// `melora eval`.
    Eval,
}

/// One command of the study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    /// `<task>/<method>-seed<s>` (with `/<checkpoint>` for the checkpoint's
    /// Laplace fit and evaluation): its row in `times.tsv`.
    pub name: String,
    /// What it runs.
    pub kind: PhaseKind,
    /// The folder it writes.
    pub out: PathBuf,
    /// The file whose existence means it is done.
    pub marker: PathBuf,
    /// The marker of the phase it needs, if any.
    pub needs: Option<PathBuf>,
    /// `melora`'s arguments (a training run adds `--resume` when its
    /// folder already holds a run).
    pub args: Vec<String>,
    /// Where it is kept, relative to the results folder.
    pub keep: PathBuf,
}

impl Study {
    /// Reads and checks a study file; relative `runs`, `results` and
    /// `configs` stay relative to the working folder (the repository root).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
        let study: Study = serde_json::from_str(&text).map_err(|e| LlamaError::format(path, e.to_string()))?;
        study.check().map_err(|e| LlamaError::format(path, e))?;
        Ok(study)
    }

    /// The method named `key`.
    pub fn method(&self, key: &str) -> Option<&MethodSpec> {
        self.methods.iter().find(|m| m.key == key)
    }

    /// Every inconsistency, as one message.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut errors = Vec::new();
        let unique = |what: &str, items: Vec<String>, errors: &mut Vec<String>| {
            let mut seen = BTreeSet::new();
            for item in items {
                if !seen.insert(item.clone()) {
                    errors.push(format!("{what} {item} is listed twice"));
                }
            }
        };
        if self.seeds.is_empty() {
            errors.push("no seeds".into());
        }
        if self.checkpoints.is_empty() {
            errors.push("no checkpoints".into());
        }
        if self.tasks.is_empty() {
            errors.push("no tasks".into());
        }
        unique("seed", self.seeds.iter().map(u64::to_string).collect(), &mut errors);
        unique(
            "checkpoint",
            self.checkpoints.iter().map(|c| c.name().to_string()).collect(),
            &mut errors,
        );
        unique(
            "task",
            self.tasks.iter().map(|t| t.task.name().to_string()).collect(),
            &mut errors,
        );
        unique(
            "method",
            self.methods.iter().map(|m| m.key.clone()).collect(),
            &mut errors,
        );
        for t in &self.tasks {
            let name = t.task.name();
            let seeds = self.task_seeds(t);
            if let Some(extra) = seeds.iter().find(|s| !self.seeds.contains(s)) {
                errors.push(format!("task {name}: seed {extra} is not one of the study's seeds"));
            }
            if let Some(ood) = &t.ood {
                if !self.checkpoints.contains(&ood.checkpoint) {
                    errors.push(format!(
                        "task {name}: the out-of-distribution checkpoint {} is not evaluated",
                        ood.checkpoint
                    ));
                }
                if let Some(extra) = ood.seeds.iter().flatten().find(|s| !seeds.contains(s)) {
                    errors.push(format!(
                        "task {name}: out-of-distribution seed {extra} is not one of the task's seeds"
                    ));
                }
                if ood.tasks.is_empty() || ood.tasks.contains(&t.task) {
                    errors.push(format!(
                        "task {name}: the out-of-distribution tasks must be other tasks, at least one"
                    ));
                }
            }
            for m in &self.methods {
                if let Some(train) = &m.train {
                    let file = self.train_config(t.task, train);
                    if !file.is_file() {
                        errors.push(format!(
                            "method {}: no settings file {} for task {name}",
                            m.key,
                            file.display()
                        ));
                    }
                }
            }
        }
        for (k, m) in self.methods.iter().enumerate() {
            if m.key == ZERO_SHOT
                || m.key.is_empty()
                || !m.key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                errors.push(format!(
                    "method key {:?}: letters, digits, '-' and '_', not {ZERO_SHOT}",
                    m.key
                ));
            }
            if let Some(extra) = m.ood_seeds.iter().flatten().find(|s| !self.seeds.contains(s)) {
                errors.push(format!(
                    "method {}: out-of-distribution seed {extra} is not one of the study's seeds",
                    m.key
                ));
            }
            let trained_before = |key: &str| self.methods[..k].iter().any(|b| b.key == key && b.train.is_some());
            match (&m.train, &m.ensemble_of, &m.laplace) {
                (Some(_), None, None) => {}
                (None, Some(of), None) if trained_before(of) => {}
                (None, None, Some(l)) if trained_before(&l.of) => {
                    let file = self.configs.join(&l.config);
                    if !file.is_file() {
                        errors.push(format!("method {}: no Laplace settings file {}", m.key, file.display()));
                    }
                }
                (None, Some(of), None) | (None, None, Some(LaplaceSpec { of, .. })) => errors.push(format!(
                    "method {}: {of} is not a trained method listed before it",
                    m.key
                )),
                _ => errors.push(format!(
                    "method {}: give exactly one of train, ensemble_of and laplace",
                    m.key
                )),
            }
        }
        for key in self.compare.focus.iter().chain([&self.compare.baseline]) {
            if self.method(key).is_none() {
                errors.push(format!("compare: no method {key}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// The seeds of task `t`.
    pub fn task_seeds(&self, t: &TaskSpec) -> Vec<u64> {
        t.seeds.clone().unwrap_or_else(|| self.seeds.clone())
    }

    /// The settings file a trained method reads on `task`.
    pub fn train_config(&self, task: Task, train: &TrainSpec) -> PathBuf {
        self.configs.join(format!("{}-{}.json", task.name(), train.config))
    }

    /// A training run's folder.
    pub fn run_dir(&self, runs: &Path, task: Task, key: &str, seed: u64) -> PathBuf {
        runs.join(task.name()).join(format!("{key}-seed{seed}"))
    }

    /// The evaluations' folder, relative to a run or results folder:
    /// `evals/<task>/<checkpoint>/<key>-seed<s>`, or `evals/<task>/zero-shot`.
    pub fn eval_rel(task: Task, at: Option<(Checkpoint, &str, u64)>) -> PathBuf {
        let base = PathBuf::from("evals").join(task.name());
        match at {
            Some((checkpoint, key, seed)) => base.join(checkpoint.name()).join(format!("{key}-seed{seed}")),
            None => base.join(ZERO_SHOT),
        }
    }

    /// The ordered phases that remain for the run folder `runs`: every
    /// evaluation without its marker, the Laplace fits those need, and the
    /// training runs those need (a finished evaluation kept from another
    /// machine needs no run). `only_tasks`, `only_methods` and `only_seeds`
    /// (when not empty) restrict the plan, so that two runners can share
    /// a machine's cores; the base model's evaluation is the method
    /// [`ZERO_SHOT`].
    pub fn plan(&self, runs: &Path, only_tasks: &[Task], only_methods: &[String], only_seeds: &[u64]) -> Vec<Phase> {
        let all = self.phases(runs);
        let wanted = |task: Task, key: Option<&str>, seed: Option<u64>| {
            (only_tasks.is_empty() || only_tasks.contains(&task))
                && (only_methods.is_empty() || only_methods.iter().any(|m| m == key.unwrap_or(ZERO_SHOT)))
                && (only_seeds.is_empty() || seed.is_none_or(|s| only_seeds.contains(&s)))
        };
        // Backwards: an evaluation is needed when it is not done; a phase
        // another needed phase needs is needed when it is not done.
        let mut needed_markers: BTreeSet<PathBuf> = BTreeSet::new();
        let mut keep = vec![false; all.len()];
        for (i, (p, task, key, seed)) in all.iter().enumerate().rev() {
            if p.marker.exists() {
                continue;
            }
            let needed = match p.kind {
                PhaseKind::Eval => wanted(*task, key.as_deref(), *seed),
                _ => needed_markers.contains(&p.marker),
            };
            if needed {
                keep[i] = true;
                if let Some(n) = &p.needs {
                    needed_markers.insert(n.clone());
                }
            }
        }
        all.into_iter()
            .zip(keep)
            .filter_map(|((p, ..), k)| k.then_some(p))
            .collect()
    }

    /// Every phase of the study, in running order, with its task, method
    /// and seed (none for the zero-shot evaluation).
    fn phases(&self, runs: &Path) -> Vec<(Phase, Task, Option<String>, Option<u64>)> {
        let mut out = Vec::new();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for (n, &seed) in self.seeds.iter().enumerate() {
            for t in &self.tasks {
                let task = t.task;
                let name = task.name();
                let mut target = s(&["--task", name, "--split", t.split.name()]);
                if let Some(n) = t.max_examples {
                    target.extend(s(&["--max-examples", &n.to_string()]));
                }
                if n == 0 {
                    let rel = Self::eval_rel(task, None);
                    let dir = runs.join(&rel);
                    let mut args = s(&["eval", "--zero-shot"]);
                    args.extend(target.clone());
                    args.extend(self.ood_args(t, None, seed));
                    args.extend(self.zero_shot.clone());
                    args.extend(s(&["--out", &dir.display().to_string()]));
                    let phase = Phase {
                        name: format!("{name}/{ZERO_SHOT}"),
                        kind: PhaseKind::Eval,
                        marker: dir.join("done"),
                        out: dir,
                        needs: None,
                        args,
                        keep: rel,
                    };
                    out.push((phase, task, None, None));
                }
                if !self.task_seeds(t).contains(&seed) {
                    continue;
                }
                for m in &self.methods {
                    let key = Some(m.key.clone());
                    let eval = |subject: &Path, checkpoint: Checkpoint, needs: PathBuf, with_checkpoint: bool| {
                        let rel = Self::eval_rel(task, Some((checkpoint, &m.key, seed)));
                        let dir = runs.join(&rel);
                        let mut args = s(&["eval", "--run", &subject.display().to_string()]);
                        if with_checkpoint {
                            args.extend(s(&["--checkpoint", checkpoint.name()]));
                        }
                        args.extend(target.clone());
                        args.extend(self.ood_args(t, Some((checkpoint, m)), seed));
                        args.extend(self.eval.clone());
                        args.extend(m.eval.clone());
                        args.extend(s(&["--out", &dir.display().to_string()]));
                        Phase {
                            name: format!("{name}/{}/{}-seed{seed}", checkpoint.name(), m.key),
                            kind: PhaseKind::Eval,
                            marker: dir.join("done"),
                            out: dir,
                            needs: Some(needs),
                            args,
                            keep: rel,
                        }
                    };
                    if let Some(train) = &m.train {
                        let dir = self.run_dir(runs, task, &m.key, seed);
                        let mut args = s(&[
                            "train",
                            "--config",
                            &self.train_config(task, train).display().to_string(),
                            "--seed",
                            &seed.to_string(),
                        ]);
                        args.extend(self.train.clone());
                        args.extend(train.args.clone());
                        args.extend(s(&["--out", &dir.display().to_string()]));
                        let done = dir.join("done");
                        let phase = Phase {
                            name: format!("{name}/{}-seed{seed}", m.key),
                            kind: PhaseKind::Train,
                            marker: done.clone(),
                            out: dir.clone(),
                            needs: None,
                            args,
                            keep: PathBuf::from("runs").join(name).join(format!("{}-seed{seed}", m.key)),
                        };
                        out.push((phase, task, key.clone(), Some(seed)));
                        for &c in &self.checkpoints {
                            out.push((eval(&dir, c, done.clone(), true), task, key.clone(), Some(seed)));
                        }
                    } else if let Some(l) = &m.laplace {
                        let of = self.run_dir(runs, task, &l.of, seed);
                        for &c in &self.checkpoints {
                            let dir = of.join(format!("laplace-{}", c.name()));
                            let mut args =
                                s(&["laplace", "--run", &of.display().to_string(), "--checkpoint", c.name()]);
                            args.extend(s(&["--config", &self.configs.join(&l.config).display().to_string()]));
                            args.extend(l.args.clone());
                            args.extend(s(&["--out", &dir.display().to_string()]));
                            let marker = dir.join("laplace.json");
                            let phase = Phase {
                                name: format!("{name}/{}/{}-seed{seed}", c.name(), m.key),
                                kind: PhaseKind::Laplace,
                                marker: marker.clone(),
                                out: dir.clone(),
                                needs: Some(of.join("done")),
                                args,
                                keep: PathBuf::from("runs")
                                    .join(name)
                                    .join(format!("{}-seed{seed}", l.of))
                                    .join(format!("laplace-{}", c.name())),
                            };
                            out.push((phase, task, key.clone(), Some(seed)));
                            out.push((eval(&dir, c, marker, false), task, key.clone(), Some(seed)));
                        }
                    }
                }
            }
        }
        out
    }

    /// `--ood a,b,...` for an evaluation of `t` at a checkpoint of a
    /// method (`None`: the base model) with `seed`, when the study asks for
    /// it there.
    fn ood_args(&self, t: &TaskSpec, at: Option<(Checkpoint, &MethodSpec)>, seed: u64) -> Vec<String> {
        let Some(ood) = &t.ood else { return Vec::new() };
        let at_checkpoint = at.is_none_or(|(c, _)| c == ood.checkpoint);
        let seeds = at.and_then(|(_, m)| m.ood_seeds.as_ref()).or(ood.seeds.as_ref());
        let seeded = at.is_none() || seeds.is_none_or(|s| s.contains(&seed));
        if at_checkpoint && seeded {
            vec![
                "--ood".into(),
                ood.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(","),
            ]
        } else {
            Vec::new()
        }
    }
}
