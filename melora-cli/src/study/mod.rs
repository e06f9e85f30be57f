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
pub mod differences;
pub mod evals;
pub mod spec;
pub mod tables;

pub use differences::{
    bootstrap_differences, comparisons, differences, interval_cell, paired_bootstrap, BOOTSTRAP_RESAMPLES,
};
pub use evals::{collect, detection_tasks, Collected, EvalSet, SeedPredictions, Summary};
pub use tables::{mean_std, posterior_table, tables, times_summary, times_table, Scope, TimeTotals};

use melora_llama::error::{LlamaError, Result};
use melora_llama::report::{write_results, ResultRow, Spread};
use melora_llama::train::Checkpoint;
use spec::Study;
use std::collections::BTreeMap;
use std::path::Path;

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
        let (table, totals) = times_table(&tsv);
        write(
            &results.join("times.md"),
            &format!("{table}\n{}\n", times_summary(totals)),
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
