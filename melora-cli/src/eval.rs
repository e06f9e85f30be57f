//! `melora eval`, `melora predict` and `melora export`: their flags, parsed
//! into a [`Request`] (or an adapter to merge), and what they print and
//! write.

use crate::ensure_assets;
use crate::progress::PhaseBars;
use anyhow::{bail, Context, Result};
use clap::Args;
use melora_cli::backend::{self, Inner, Train};
use melora_cli::out;
use melora_core::SamplingMode;
use melora_llama::data::{read_questions, Item, LengthNorm, Scoring, Split, Task};
use melora_llama::eval::{EnsembleAverage, PredictFlags};
use melora_llama::laplace::LaplaceDir;
use melora_llama::predict::{Evaluation, Questions, Request, Subject};
use melora_llama::pretrained::DEFAULT_MODEL;
use melora_llama::report::{markdown, ood_detection, ood_markdown, write_evaluation, ResultRow};
use melora_llama::settings::Loader;
use melora_llama::train::{Checkpoint, Method, RunDir, TrainConfig};
use melora_llama::weights::peft::load_adapter;
use melora_llama::Pretrained;
use std::path::PathBuf;

/// What predicts: a run, an adapter or the base model.
#[derive(Args)]
pub struct SubjectArgs {
    /// A training run folder (its best checkpoint; an ensemble or a Laplace
    /// posterior too).
    #[arg(long, conflicts_with_all = ["adapter", "zero_shot"])]
    run: Option<PathBuf>,
    /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
    #[arg(long)]
    checkpoint: Option<Checkpoint>,
    /// An adapter folder (PEFT format).
    #[arg(long, conflicts_with = "zero_shot")]
    adapter: Option<PathBuf>,
    /// The base model without adapter.
    #[arg(long)]
    zero_shot: bool,
    /// The base model (default: the run's, or smollm2-135m).
    #[arg(long)]
    model: Option<String>,
}

impl SubjectArgs {
    /// The task of the run (its settings, kept in the run or Laplace
    /// folder), when the subject is a run.
    fn run_task(&self) -> Result<Option<Task>> {
        let Some(dir) = &self.run else { return Ok(None) };
        let config: TrainConfig = Loader::file(Some(&dir.join("config.json"))).load()?;
        Ok(Some(config.task))
    }

    fn subject(&self) -> Result<Subject> {
        Ok(match (&self.run, &self.adapter, self.zero_shot) {
            (Some(r), _, _) => Subject::Run(r.clone()),
            (_, Some(a), _) => Subject::Adapter(a.clone()),
            (_, _, true) => Subject::ZeroShot,
            _ => bail!("give --run DIR, --adapter DIR or --zero-shot"),
        })
    }
}

/// How `eval` and `predict` predict, on top of the run's own way.
#[derive(Args)]
pub struct How {
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
    /// Seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Deep ensembles: average probabilities (default) or logits.
    #[arg(long)]
    ensemble_average: Option<EnsembleAverage>,
}

/// The request the subject and the flags make.
fn request(subject: &SubjectArgs, how: &How, batch_size: usize) -> Result<Request> {
    Ok(Request {
        subject: subject.subject()?,
        checkpoint: subject.checkpoint,
        model: subject.model.clone(),
        ensemble_average: how.ensemble_average,
        flags: PredictFlags {
            samples: how.samples,
            mode: how.mode,
            dropout: how.dropout,
            seed: how.seed,
        },
        scoring: how.scoring,
        length_norm: how.length_norm,
        batch_size,
        data: None,
    })
}

/// `request`'s answers to `questions` of `task`, the model and data
/// fetched first when missing.
fn predict(request: &Request, task: Task, questions: &Questions) -> Result<Evaluation> {
    let assets = ensure_assets(&request.model_name()?)?;
    let mut bars = PhaseBars::default();
    let evaluation = request.predict::<Train>(task, questions, &assets, &backend::device(), &mut bars)?;
    bars.finish();
    Ok(evaluation)
}

/// One line with an evaluation's metrics and time.
pub fn log_row(evaluation: &Evaluation) {
    let row = &evaluation.row;
    eprintln!(
        "{}: {} examples, S = {}, {:.0} s: ACC {:.4} ECE {:.4} NLL {:.4}",
        row.name,
        row.metrics.count,
        row.samples,
        evaluation.seconds,
        row.metrics.accuracy,
        row.metrics.ece,
        row.metrics.nll
    );
}

/// Evaluate a run, an adapter or the base model (ACC, ECE, NLL, Brier,
/// reliability diagram).
#[derive(Args)]
pub struct EvalCmd {
    #[command(flatten)]
    subject: SubjectArgs,
    /// The task (default: the run's own; another task than the training
    /// one gives the OOD setting; `files` is a run's own questions).
    #[arg(long)]
    task: Option<Task>,
    /// The split.
    #[arg(long, default_value = "test")]
    split: Split,
    /// One's own questions (JSONL, CSV, TSV or Parquet; see the guide):
    /// the task `files`, asked in the run's templates (the defaults without
    /// a run); e.g. the base model's score on them (with --zero-shot).
    #[arg(long, conflicts_with = "split")]
    data: Option<PathBuf>,
    #[command(flatten)]
    how: How,
    /// Evaluate a fixed, seeded subset of at most this many examples.
    #[arg(long)]
    max_examples: Option<usize>,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Output folder (default: <run or adapter>/eval-<task>-<split>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Out-of-distribution tasks (comma-separated), evaluated after
    /// --task on the same split and subset size; adds the AUROC of
    /// telling each (and all of them pooled) apart from --task by
    /// total predictive entropy and by its epistemic part (ood.json).
    #[arg(long, value_delimiter = ',')]
    ood: Vec<Task>,
}

impl EvalCmd {
    /// The task, then each out-of-distribution task; the table printed and
    /// written with the predictions and diagrams.
    pub fn run(self) -> Result<()> {
        let mut request = request(&self.subject, &self.how, self.batch_size)?;
        request.data = self.data.clone();
        // One's own file stands for every split (`DataFiles::one_file`).
        let split = if self.data.is_some() { Split::Test } else { self.split };
        let questions = Questions::Split {
            split,
            max_examples: self.max_examples,
        };
        let task = match (self.task, &self.data) {
            (Some(task), Some(_)) if task != Task::Files => {
                bail!("--data FILE is the task files: it can't be evaluated as {task}")
            }
            (Some(task), _) => task,
            (None, Some(_)) => Task::Files,
            (None, None) => self
                .subject
                .run_task()?
                .context("give --task: only a run has a task of its own")?,
        };
        let mut evaluations = Vec::with_capacity(1 + self.ood.len());
        for task in std::iter::once(task).chain(self.ood.iter().copied()) {
            let evaluation = predict(&request, task, &questions)?;
            log_row(&evaluation);
            evaluations.push(evaluation);
        }
        let out = self.out.clone().unwrap_or_else(|| {
            let base = match &request.subject {
                Subject::Run(dir) | Subject::Adapter(dir) => dir.clone(),
                Subject::ZeroShot => PathBuf::from("runs/zero-shot"),
            };
            match &self.data {
                Some(file) => {
                    let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned());
                    base.join(format!("eval-files-{}", stem.unwrap_or_default()))
                }
                None => base.join(format!("eval-{}-{}", task.name(), self.split.name())),
            }
        });
        let rows: Vec<ResultRow> = evaluations.iter().map(|e| e.row.clone()).collect();
        let ood = match evaluations.split_first() {
            Some((first, rest)) if !rest.is_empty() => ood_detection(
                (&first.row.task, &first.sampled),
                &rest
                    .iter()
                    .map(|e| (e.row.task.as_str(), &e.sampled))
                    .collect::<Vec<_>>(),
            ),
            _ => Vec::new(),
        };
        let sampled: Vec<_> = evaluations.iter().map(|e| &e.sampled).collect();
        let files = write_evaluation(&out, &rows, &sampled, &ood)?;
        out!("{}", markdown(&rows))?;
        if !ood.is_empty() {
            out!("\n{}", ood_markdown(&ood))?;
        }
        eprintln!("results in {} ({} diagram files)", out.display(), files.len());
        Ok(())
    }
}

/// Ask a run, an adapter or the base model questions of one's own: each
/// choice's Bayesian-model-average probability, the prediction, its
/// confidence and its uncertainty (total, aleatoric, epistemic).
#[derive(Args)]
pub struct PredictCmd {
    #[command(flatten)]
    subject: SubjectArgs,
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
    /// The prompt format and label set: arc-e (up to 5 choices; the
    /// default without a run), mmlu-chem (4), ..., files (a run's own
    /// questions' templates; the default of a run trained with --data).
    #[arg(long)]
    task: Option<Task>,
    #[command(flatten)]
    how: How,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl PredictCmd {
    /// The Bayesian-model-average prediction of each question, with its
    /// confidence and uncertainty split, as a table (or JSON); for a file
    /// with answers, which ones are right.
    pub fn run(self) -> Result<()> {
        let (items, answered) = match (&self.question, &self.choices, &self.file) {
            (Some(q), Some(c), None) => {
                let choices = c
                    .split('|')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                let item = Item::Choice {
                    question: q.clone(),
                    choices,
                    label: 0,
                };
                (vec![item], false)
            }
            (None, None, Some(f)) => read_questions(f)?,
            _ => bail!("give --question TEXT --choices 'A|B|C', or --file QUESTIONS.jsonl"),
        };
        let mut request = request(&self.subject, &self.how, 8)?;
        // A Laplace posterior predicts by probit unless asked for samples:
        // the uncertainty split needs draws.
        if matches!(&request.subject, Subject::Run(dir) if LaplaceDir::is_laplace(dir)) {
            request.flags.samples = request.flags.samples.or(Some(10));
        }
        let task = match self.task {
            Some(task) => task,
            // A run of one's own questions asks in its own templates.
            None => self
                .subject
                .run_task()?
                .filter(|t| *t == Task::Files)
                .unwrap_or(Task::ArcE),
        };
        let evaluation = predict(&request, task, &Questions::Own(items.clone()))?;
        eprintln!(
            "{}: S = {}, {:.0} s",
            evaluation.row.name, evaluation.row.samples, evaluation.seconds
        );
        crate::answers::print(&items, &evaluation, answered, self.json)
    }
}

/// Merge a run's adapter (its mean weights) into the base model and write
/// a Hugging Face folder (config.json, model.safetensors, tokenizer.json)
/// that transformers and `--model FOLDER` load.
#[derive(Args)]
pub struct ExportCmd {
    /// A training run folder (its final checkpoint) or a Laplace
    /// posterior (its MAP adapter).
    #[arg(long, conflicts_with = "adapter")]
    run: Option<PathBuf>,
    /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
    #[arg(long)]
    checkpoint: Option<Checkpoint>,
    /// An adapter folder (PEFT format), on --model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The base model (default: the run's, or smollm2-135m).
    #[arg(long)]
    model: Option<String>,
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
}

impl ExportCmd {
    /// The adapter (a run's checkpoint, a Laplace posterior's MAP adapter,
    /// or an adapter folder on `model`) merged into the base weights,
    /// written as a Hugging Face folder.
    pub fn run(self) -> Result<()> {
        let load_config = |path: PathBuf| -> Result<TrainConfig> { Ok(Loader::file(Some(&path)).load()?) };
        let (model_name, adapter) = match (self.run, self.adapter) {
            (Some(dir), _) if LaplaceDir::is_laplace(&dir) => {
                anyhow::ensure!(
                    self.checkpoint.is_none(),
                    "{} is a Laplace posterior: it holds one adapter",
                    dir.display()
                );
                let config = load_config(dir.join("config.json"))?;
                (config.model, LaplaceDir { dir }.adapter())
            }
            (Some(dir), _) => {
                let run = RunDir { dir: dir.clone() };
                let config = load_config(run.config())?;
                anyhow::ensure!(
                    config.method != Method::Ens,
                    "{} is an ensemble: it has no single adapter to merge; export a member (--run {})",
                    dir.display(),
                    run.member(0).dir.display()
                );
                (self.model.unwrap_or(config.model), run.checkpoint(self.checkpoint)?)
            }
            (None, Some(dir)) => (self.model.unwrap_or_else(|| DEFAULT_MODEL.into()), dir),
            (None, None) => bail!("give --run DIR or --adapter DIR: the base model alone needs no export"),
        };
        let assets = ensure_assets(&model_name)?;
        let device = backend::device();
        let pretrained = Pretrained::open(&model_name, &assets)?;
        let mut config = pretrained.config.clone();
        let (base, tokenizer, _) = pretrained.build::<Inner>(&device)?;
        let (model, meta) = load_adapter(base, &adapter, &device)?;
        let merged = model.merged()?;
        // An adapter on a tied output layer unties it.
        config.tie_word_embeddings = merged.lm_head.is_none();
        let out = &self.out;
        melora_llama::weights::export::save_hf(&merged, &config, tokenizer.as_ref(), out)
            .with_context(|| format!("exporting to {}", out.display()))?;
        eprintln!(
            "{} ({:?}, its mean weights) merged into {model_name}: a Hugging Face folder in {} (load it with --model {})",
            adapter.display(),
            meta.config.kind(),
            out.display(),
            out.display()
        );
        Ok(())
    }
}
