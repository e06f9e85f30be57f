//! `melora train`, `melora laplace` and `melora quickstart`.

use crate::ensure_assets;
use crate::eval::log_row;
use crate::progress::{PhaseBars, Reporter};
use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use clap::Args;
use melora_cli::backend::{self, Train};
use melora_cli::{out, outln};
use melora_core::SamplingMode;
use melora_llama::data::own::DataFiles;
use melora_llama::data::{Scoring, Split, Task};
use melora_llama::eval::PredictOptions;
use melora_llama::laplace::{self, LaplaceConfig, LaplaceDir};
use melora_llama::predict::{evaluate, Evaluated};
use melora_llama::report::{markdown, write_results};
use melora_llama::settings::Loader;
use melora_llama::train::{Checkpoint, Method, Nodes, Recipe, RunDir, TrainConfig, TrainData, Trainer};
use melora_llama::weights::peft::{load_adapter, save_adapter};
use melora_llama::Pretrained;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Fine-tune with LoRA, BLoB or Me-LoRA.
#[derive(Args)]
pub struct TrainCmd {
    /// A JSON training configuration (see experiments/); defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override: lora, map (LoRA + weight decay 1e-5), mcd (MC dropout,
    /// S = 3), ens (3 seeded MAP adapters), blob or melora. Laplace:
    /// `melora laplace --run DIR` on a map run.
    #[arg(long)]
    method: Option<Method>,
    /// A named recipe over the configuration (before the `--set`s):
    /// blob-official (BLoB's code as its scripts run it) or study
    /// (the recipe of melora's 600-step calibration study).
    #[arg(long)]
    recipe: Option<Recipe>,
    /// Override: the task.
    #[arg(long)]
    task: Option<Task>,
    /// Train on one's own questions: a JSONL, CSV, TSV or Parquet file
    /// (question, choices, answer; optional id and context; see the guide).
    /// The task becomes `files`; needs --validation.
    #[arg(long, requires = "validation")]
    data: Option<PathBuf>,
    /// The validation questions of --data (checkpoint selection).
    #[arg(long, requires = "data")]
    validation: Option<PathBuf>,
    /// The test questions of --data (for `melora eval --run`).
    #[arg(long, requires = "data")]
    test: Option<PathBuf>,
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
    /// Print the settings the run would train with (every setting, as a
    /// run folder's config.json spells it) and exit without training.
    #[arg(long)]
    print_config: bool,
    /// Override: data-parallel peers in this process, one per device
    /// (GPUs 0..N on CUDA; threads sharing the CPU on ndarray); every
    /// batch is split over them and the gradients all-reduced.
    #[arg(long)]
    devices: Option<usize>,
    #[command(flatten)]
    nodes: NodeArgs,
}

impl TrainCmd {
    /// The settings: the file (or the defaults), the typed flags (the
    /// method with its preset first, then the recipe), then the `--set`s,
    /// which can change anything the others set.
    fn config(&self) -> Result<TrainConfig> {
        // The files by absolute path: the run folder keeps them for
        // `eval --run` and `predict --run` from anywhere.
        let absolute = |p: &Path| std::fs::canonicalize(p).with_context(|| format!("reading {}", p.display()));
        let files = match (&self.data, &self.validation) {
            (Some(train), Some(validation)) => {
                if self.task.is_some_and(|t| t != Task::Files) {
                    bail!("--data trains on your own questions (the task files): drop --task");
                }
                Some((
                    absolute(train)?,
                    absolute(validation)?,
                    self.test.as_deref().map(absolute).transpose()?,
                ))
            }
            _ => None,
        };
        let flags = |mut c: TrainConfig| {
            if let Some(m) = self.method {
                c = m.preset(c);
            }
            if let Some(r) = self.recipe {
                c = r.apply(c);
            }
            c.task = self.task.unwrap_or(c.task);
            if let Some((train, validation, test)) = files.clone() {
                let template = c.data.take().map(|d| d.template).unwrap_or_default();
                c.data = Some(DataFiles {
                    train,
                    validation,
                    test,
                    template,
                });
                c.task = Task::Files;
            }
            c.steps = self.steps.unwrap_or(c.steps);
            c.seed = self.seed.unwrap_or(c.seed);
            c.scoring = self.scoring.unwrap_or(c.scoring);
            c.devices = self.devices.unwrap_or(c.devices);
            c
        };
        Ok(Loader::file(self.config.as_deref())
            .edit(flags)
            .overrides(&self.set)
            .load()?)
    }

    pub fn run(self) -> Result<()> {
        let config = self.config()?;
        if self.print_config {
            outln!("{}", serde_json::to_string_pretty(&config)?)?;
            return Ok(());
        }
        let out = self.out.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "runs/{}-{}-seed{}",
                config.task,
                config.method.name(),
                config.seed
            ))
        });
        let nodes = self.nodes.nodes()?;
        let rank = nodes.as_ref().map(|n| n.rank);
        let result = train(config, out, self.resume, self.plain, nodes);
        match (result, rank) {
            // A rank that fails ends without finalising MPI (which would
            // wait for the others): the launcher then ends the job. Each
            // failing rank lingers a moment first: the ranks that fail at
            // the same step (a non-finite loss stops every one, each seeing
            // it itself) all get to say so before the launcher ends them.
            (Err(e), Some(rank)) => {
                // One write: the launcher merges the ranks' output.
                let line = format!("Error: rank {rank}: {e:#}\n");
                std::io::stderr().write_all(line.as_bytes()).ok();
                std::thread::sleep(Duration::from_secs(3));
                std::process::exit(1);
            }
            (result, _) => result,
        }
    }
}

/// The ranks of a data-parallel run over several processes, as an MPI
/// launcher started them (`mpirun -np N melora train ...`).
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Under an MPI launcher: seconds a rank waits for the others in a sum
    /// before it gives up, which ends the job.
    #[arg(long, default_value_t = 3600)]
    peer_timeout: u64,
}

impl NodeArgs {
    /// This process's place among the ranks, when an MPI launcher started
    /// several.
    pub fn nodes(&self) -> Result<Option<Nodes>> {
        Ok(Nodes::from_launcher(Duration::from_secs(self.peer_timeout))?)
    }
}

/// Trains `config` into `out` (continuing it with `resume`): the dashboard
/// on a terminal unless `plain`.
/// The first training question as the model will see it: the prompt and,
/// under answer scoring, each choice's continuation.
fn show_prompt(data: &DataFiles, scoring: Scoring) -> Result<()> {
    let questions = data.read(Split::Train)?;
    let first = &questions[0];
    eprintln!(
        "the first of {} training questions as the model sees it:",
        questions.len()
    );
    match scoring {
        Scoring::Label => eprintln!("{}", data.template.label_text(first)),
        Scoring::Answer => {
            for (k, cloze) in data.template.cloze(first).iter().enumerate() {
                let mark = if k == first.answer { "*" } else { " " };
                eprintln!("{mark} {:?} + {:?}", cloze.context, cloze.continuation);
            }
        }
    }
    Ok(())
}

fn train(config: TrainConfig, out: PathBuf, resume: bool, plain: bool, nodes: Option<Nodes>) -> Result<()> {
    let assets = ensure_assets(&config.model)?;
    let run = RunDir { dir: out };
    let lead_node = nodes.as_ref().is_none_or(|n| n.rank == 0);
    if lead_node && !resume && (run.last().exists() || run.config().exists()) {
        bail!(
            "{} already holds a run: pass --resume to continue it, or choose another --out",
            run.dir.display()
        );
    }
    if let (Some(data), true) = (&config.data, lead_node) {
        show_prompt(data, config.scoring)?;
    }
    let start = Instant::now();
    let trainer = Trainer::new(&config, &run).resume(resume).nodes(nodes.as_ref());
    // Burn's dashboard on a terminal (unless --plain), a bar or lines
    // otherwise; under a launcher, which merges every rank's output, rank 0
    // speaks for all.
    let summary = if !lead_node {
        trainer
            .progress(&mut melora_llama::train::Quiet)
            .train::<Train>(&assets, &backend::device())?
    } else if !plain && std::io::stdout().is_terminal() {
        std::fs::create_dir_all(&run.dir).with_context(|| format!("creating {}", run.dir.display()))?;
        let mut dashboard = crate::dashboard::Dashboard::new(run.log());
        trainer
            .progress(&mut dashboard)
            .train::<Train>(&assets, &backend::device())?
    } else {
        let mut reporter = Reporter::new(config.steps as u64);
        trainer
            .progress(&mut reporter)
            .train::<Train>(&assets, &backend::device())?
    };
    if !lead_node {
        return Ok(());
    }
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

/// Laplace-LoRA on a MAP run: KFAC curvature of the LoRA matrices over
/// the training data, prior precision by marginal likelihood (or on
/// validation data); writes a posterior that `melora eval --run` takes
/// (linearised predictive: probit, or `--samples S` logit draws).
#[derive(Args)]
pub struct LaplaceCmd {
    /// The MAP run folder.
    #[arg(long)]
    run: PathBuf,
    /// Which checkpoint of the run: best (the best validation accuracy of the mean weights) or last (default: best, else last).
    #[arg(long)]
    checkpoint: Option<Checkpoint>,
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
}

impl LaplaceCmd {
    pub fn run(self) -> Result<()> {
        let config: LaplaceConfig = Loader::file(self.config.as_deref()).overrides(&self.set).load()?;
        let out = self.out.unwrap_or_else(|| self.run.join("laplace"));
        laplace_fit(self.run, self.checkpoint, config, out)
    }
}

/// `melora laplace`: the Laplace posterior of a MAP run, saved in `out`.
fn laplace_fit(run_dir: PathBuf, checkpoint: Option<Checkpoint>, config: LaplaceConfig, out: PathBuf) -> Result<()> {
    let run = RunDir { dir: run_dir.clone() };
    let train_config: TrainConfig = Loader::file(Some(&run.config())).load()?;
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
    outln!(
        "Laplace posterior in {} (evaluate with: melora eval --run {} --task {})",
        out.display(),
        out.display(),
        train_config.task.name()
    )?;
    Ok(())
}

/// The quickstart's configuration, embedded from `experiments/`.
pub const QUICKSTART: &str = include_str!("../../experiments/smollm2-135m/quickstart.json");

/// The main job: fetch what is missing, evaluate SmolLM2-135M zero-shot
/// on ARC-Easy with answer scoring, fine-tune it with LoRA and with
/// Me-LoRA on the CPU, evaluate both (Me-LoRA with a 10-sample Bayesian
/// model average), print the table.
#[derive(Args)]
pub struct QuickstartCmd {
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
}

impl QuickstartCmd {
    pub fn run(self) -> Result<()> {
        quickstart(self.out, self.results, self.max_validation)
    }
}

/// The README's main job: fetch what is missing, zero-shot evaluation,
/// LoRA and Me-LoRA fine-tuning within the CPU budget, evaluation (Me-LoRA
/// with a Bayesian model average), table.
fn quickstart(out: PathBuf, results: PathBuf, max_validation: Option<usize>) -> Result<()> {
    let start = Instant::now();
    let config: TrainConfig = Loader::text(QUICKSTART, Path::new("experiments/smollm2-135m/quickstart.json"))
        .edit(|c| TrainConfig { max_validation, ..c })
        .load()?;
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
        config.predict.samples
    );
    let mut rows = Vec::new();
    let mean = PredictOptions::mean(config.predict.batch_size);
    let mut bars = PhaseBars::default();
    let zero_shot = evaluate(
        &Evaluated {
            name: "SmolLM2-135M zero-shot",
            task: config.task,
            questions: Split::Validation.name(),
            std_init: None,
        },
        &base.valid(),
        scorer,
        &validation,
        &mean,
        &device,
        &mut bars,
    )?;
    bars.finish();
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
        let summary = Trainer::new(method_config, &run)
            .progress(&mut reporter)
            .fit(base.clone(), &data, &device)?;
        eprintln!(
            "{label}: {} steps at {:.2} s/step, training NLL {:.4} -> {:.4}",
            summary.steps_run, summary.step_seconds, summary.first_nll, summary.last_nll
        );
        let trained = load_adapter(base.valid(), &run.last(), &device)?.0;
        let options = method_config.eval_options(config.predict.batch_size, 0);
        let name = if options.samples > 1 {
            format!("{label}, {} steps (S = {})", method_config.steps, options.samples)
        } else {
            format!("{label}, {} steps", method_config.steps)
        };
        let std_init = summary.posterior.as_ref().and_then(|(_, init)| *init);
        let evaluated = Evaluated {
            name: &name,
            task: config.task,
            questions: Split::Validation.name(),
            std_init,
        };
        let evaluation = evaluate(&evaluated, &trained, scorer, &validation, &options, &device, &mut bars)?;
        bars.finish();
        log_row(&evaluation);
        rows.push(evaluation.row);
    }
    write_results(&results, &rows)?;
    outln!(
        "\nARC-Easy validation ({} examples{subset}), SmolLM2-135M, {:?} scoring:\n",
        validation.len(),
        config.scoring
    )?;
    out!("{}", markdown(&rows))?;
    outln!(
        "\nwall time {:.0} s; results and reliability diagrams in {}",
        start.elapsed().as_secs_f64(),
        results.display()
    )?;
    Ok(())
}
