//! A study's tables as Markdown: in distribution, out of distribution,
//! uncertainty and detection, posterior diagnostics, phase times.

use super::curves::read_metrics;
use super::evals::{detection_tasks, Collected, EvalSet, Summary};
use super::spec::TaskSpec;
use melora_core::{Metrics, Uncertainty};
use melora_llama::posterior::{objective_verdict, AdapterOff, ObjectiveVerdict};
use melora_llama::settings::Loader;
use melora_llama::train::objective::objective_curve;
use melora_llama::train::{Checkpoint, TrainConfig};
use std::path::Path;

/// The scaled mean and sample standard deviation (`n - 1`; 0 for one
/// value) of `values`, and " (n = k)" when their count is not `want`;
/// `None` for no values.
pub(crate) fn spread(values: &[f64], scale: f64, want: usize) -> Option<(f64, f64, String)> {
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

/// What `times.tsv` adds up to: the phases' wall seconds, and the CPU
/// seconds (user + system) of the phases that record them (rows written
/// by an older `study.sh` have no such column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeTotals {
    /// The phases listed.
    pub phases: usize,
    /// Their wall seconds.
    pub wall: u64,
    /// The CPU seconds of those that record them.
    pub cpu: u64,
    /// How many record them.
    pub cpu_phases: usize,
}

/// The phases of `times.tsv` (run, phase, seconds, peak RSS MiB, commit and,
/// where recorded, CPU seconds) as a Markdown table, and their totals.
pub fn times_table(tsv: &str) -> (String, TimeTotals) {
    let mut out = String::from(
        "| run | phase | seconds | CPU seconds | peak RSS (MiB) | commit |\n|---|---|---:|---:|---:|---|\n",
    );
    let mut totals = TimeTotals::default();
    for line in tsv.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 5 {
            continue;
        }
        totals.phases += 1;
        totals.wall += f[2].parse::<u64>().unwrap_or(0);
        let cpu = f.get(5).and_then(|c| c.parse::<u64>().ok());
        if let Some(c) = cpu {
            totals.cpu += c;
            totals.cpu_phases += 1;
        }
        let cpu = cpu.map_or("-".to_string(), |c| c.to_string());
        out.push_str(&format!(
            "| {} | {} | {} | {cpu} | {} | {} |\n",
            f[0], f[1], f[2], f[3], f[4]
        ));
    }
    (out, totals)
}

/// The sentence under the times table: the wall total over every phase, the
/// CPU total over those that record it.
pub fn times_summary(t: TimeTotals) -> String {
    let hours = |s: u64| s as f64 / 3600.0;
    let mut text = format!(
        "Total: {} s ({:.1} h) of wall time, summed over the {} phases (each on the machine that ran it).",
        t.wall,
        hours(t.wall),
        t.phases
    );
    if t.cpu_phases > 0 {
        text.push_str(&format!(
            " CPU time (user + system): {} s ({:.1} h) over the {} phases that record it.",
            t.cpu,
            hours(t.cpu),
            t.cpu_phases
        ));
    }
    text
}

/// The verdict on a run's posterior at the end of its training (the
/// `posterior: ` line its log ends with, kept as `verdict.txt` beside the
/// run's record): "converged", "still moving", or "-" when there is none.
fn run_verdict(record: &Path) -> String {
    let kept = std::fs::read_to_string(record.join("verdict.txt")).unwrap_or_default();
    melora_llama::posterior::verdict_word(&kept).unwrap_or("-").to_string()
}

/// The adapter switched off on `task`'s training split: the zero-shot
/// model's NLL there, from the evaluation kept in
/// `<results>/evals/<task>/zero-shot-train/` (`melora eval --zero-shot
/// --split train`), on the whole split.
fn adapter_off(results: &Path, task: &str) -> Option<AdapterOff> {
    let set = EvalSet::load(&results.join("evals").join(task).join("zero-shot-train")).ok()??;
    let row = set.rows.get(task)?;
    let n = row.metrics.count;
    (row.split == "train").then_some(AdapterOff {
        nll: row.metrics.nll,
        se: 0.0,
        examples: n,
        of: n,
    })
}

/// The objective of the run kept in `record` at the end of training: its
/// negative ELBO per example (each validation's training NLL plus its KL
/// over the training split's size) against the adapter switched off, as
/// the verdict's words and the two numbers; "-" without the run's records
/// or the bound's evaluation.
fn objective_cell(record: &Path, off: Option<AdapterOff>) -> String {
    let (Ok(Some(records)), Some(off)) = (read_metrics(record), off) else {
        return "-".into();
    };
    let curve = objective_curve(&records, off.of);
    let config: Option<TrainConfig> = Loader::file(Some(&record.join("config.json"))).load().ok();
    let Some(unbounded) = config.map(|c| c.objective_unbounded()) else {
        return "-".into();
    };
    let bound = unbounded.map_or(Ok(off), Err);
    let (Some((verdict, _)), Some(end)) = (objective_verdict(&curve, bound, off.of), curve.last()) else {
        return "-".into();
    };
    match verdict {
        ObjectiveVerdict::ShortOfOptimum => format!("short of its optimum: {:.2} against {:.3}", end.value, off.nll),
        ObjectiveVerdict::LevelWithOff => format!(
            "level with the adapter off: {:.3} against {:.3} (KL / N {:.3})",
            end.value, off.nll, end.kl
        ),
        ObjectiveVerdict::BelowOff => format!("below the adapter off: {:.3} against {:.3}", end.value, off.nll),
        ObjectiveVerdict::NoBound => format!("no bound: {:.2}", end.value),
    }
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
         whether the std had converged at the end of training (within 5% over the last fifth of the steps); and \
         the objective at the end of training, the negative ELBO per training example (the training NLL since the \
         last validation plus the KL over the training split's size), against the adapter switched off (B = 0 with \
         a posterior of KL 0, a point every run can reach: the zero-shot model's training NLL, \
         `evals/{task}/zero-shot-train/`): short of its optimum when above it by more than two standard errors \
         of the training NLL, below it when under it by as much, level with it otherwise, no better than the \
         base model (where a posterior collapsed onto its prior ends, with a KL near 0); no bound for the \
         paper's Me-LoRA term, which is not a KL, nor with the prior noise.\n\n\
         | method | seed | std at init | std | std / rms mean | epistemic | the std at the end of training | \
         the objective at the end of training |\n\
         |---|---:|---:|---:|---:|---:|---|---|\n",
        t.task.title(),
        t.split.name(),
        checkpoint.name()
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
    let off = adapter_off(results, task);
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
                "| {} | {seed} | {} | {} | {} | {} | {} | {} |\n",
                c.label,
                cell(spread.std_init),
                cell(spread.posterior_std),
                cell(spread.std_relative),
                epistemic.map_or("-".into(), |e| if e != 0.0 && e.abs() < 1e-3 {
                    format!("{e:.2e}")
                } else {
                    format!("{e:.4}")
                }),
                run_verdict(&record),
                objective_cell(&record, off)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_times_table_totals_wall_time_over_all_phases_and_cpu_time_over_those_that_record_it() {
        let tsv = "run\tphase\tseconds\tpeak_rss_mib\tcommit\n\
                   wg-s/map-seed0\ttrain\t643\t823\t0aaf49d\n\
                   wg-s/best/map-seed0\teval\t127\t694\t0aaf49d\t-\n\
                   wg-s/mcd-seed1\ttrain\t1518\t824\t0aaf49d\t1702\n\
                   wg-s/mcd-seed1\ttrain-failed\t0\t-\t0aaf49d\t-\n\
                   \n\
                   a short line\n\
                   wg-s/best/mcd-seed1\teval\t745\t1336\t0aaf49d\t1460\n";
        let (table, totals) = times_table(tsv);
        assert_eq!(
            totals,
            TimeTotals {
                phases: 5,
                wall: 643 + 127 + 1518 + 745,
                cpu: 1702 + 1460,
                cpu_phases: 2
            }
        );
        assert!(table.contains("| wg-s/map-seed0 | train | 643 | - | 823 | 0aaf49d |"));
        assert!(table.contains("| wg-s/mcd-seed1 | train | 1518 | 1702 | 824 | 0aaf49d |"));
        assert_eq!(table.lines().count(), 2 + 5);
        let summary = times_summary(totals);
        assert!(summary.starts_with("Total: 3033 s (0.8 h) of wall time, summed over the 5 phases"));
        assert!(summary.ends_with("CPU time (user + system): 3162 s (0.9 h) over the 2 phases that record it."));
        let old = times_summary(TimeTotals {
            cpu: 0,
            cpu_phases: 0,
            ..totals
        });
        assert!(!old.contains("CPU"));
    }

    #[test]
    fn the_objective_cell_reads_a_kept_run_against_the_adapter_off_point() {
        // The 5000-step study's WinoGrande-S runs, seed 0: the study's
        // README worked their objective out with experiments/elbo-curve.sh
        // (N = 640): 3.05 (BLoB, its code's recipe), 12.40 (BLoB, melora's
        // default at lr 1e-3), 11.93 (Me-LoRA as the paper defines it), 0.571
        // and 0.578 (Me-LoRA and BLoB, melora's defaults at lr 1e-4), against
        // the zero-shot model's training NLL of 0.799.
        let runs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/results/study-5000/runs/wg-s");
        let off = Some(AdapterOff {
            nll: 0.7994,
            se: 0.0,
            examples: 640,
            of: 640,
        });
        let cell = |run: &str| objective_cell(&runs.join(run), off);
        assert_eq!(cell("blob-official-seed0"), "short of its optimum: 3.05 against 0.799");
        assert_eq!(cell("blob-seed0"), "short of its optimum: 12.40 against 0.799");
        assert_eq!(cell("melora-paper-seed0"), "no bound: 11.93");
        // Me-LoRA and BLoB under melora's defaults at lr 1e-4: 0.571 and
        // 0.578 at the end.
        assert_eq!(
            cell("melora-lr1e-4-seed0"),
            "below the adapter off: 0.571 against 0.799"
        );
        assert_eq!(cell("blob-lr1e-4-seed0"), "below the adapter off: 0.578 against 0.799");
        // MAP has no posterior records; a run or a bound that is not there: "-".
        assert_eq!(cell("map-seed0"), "-");
        assert_eq!(cell("no-such-run"), "-");
        assert_eq!(objective_cell(&runs.join("blob-seed0"), None), "-");
    }
}
