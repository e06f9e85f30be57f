//! One entry for every prediction: a [`Request`] names what predicts (a
//! training run, which may be a deep ensemble or a Laplace posterior; an
//! adapter folder; or the base model alone) and how, and
//! [`Request::predict`] answers a set of questions (a split of a task, or
//! questions of one's own in its format) with every sample's probabilities
//! and the table row of their Bayesian model average. `melora eval` and
//! `melora predict` parse their flags into a `Request` and print what it
//! returns; a library user builds one directly.

use crate::assets::Assets;
use crate::data::own::DataFiles;
use crate::data::{Encoded, Item, LengthNorm, Scoring, Split, Task};
use crate::eval::{predict_ensemble, predict_samples, EnsembleAverage, PredictFlags, PredictOptions, SampledProbs};
use crate::laplace::{self, LaplaceDir};
use crate::model::scoring::Scorer;
use crate::model::Llama;
use crate::posterior::PosteriorStats;
use crate::pretrained::DEFAULT_MODEL;
use crate::report::{ResultRow, Spread};
use crate::settings::Loader;
use crate::task::TaskSetup;
use crate::train::{Checkpoint, Method, RunDir, TrainConfig, TrainState};
use crate::weights::peft::load_adapter;
use crate::{LlamaError, Pretrained, Result, Tokenizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What predicts.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    /// A training run folder: its best checkpoint (else its last), every
    /// member of a deep ensemble, or a Laplace posterior (`melora laplace`).
    Run(PathBuf),
    /// An adapter folder (PEFT format) on the request's model.
    Adapter(PathBuf),
    /// The base model alone.
    ZeroShot,
}

/// The questions answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Questions {
    /// A split of the task, or a fixed, seeded subset of at most
    /// `max_examples` of it.
    Split {
        /// The split.
        split: Split,
        /// The subset's size.
        max_examples: Option<usize>,
    },
    /// Questions of one's own, in the task's prompt format.
    Own(Vec<Item>),
}

impl Questions {
    /// The name a result row gives them: the split's, or `questions`.
    pub fn name(&self) -> &'static str {
        match self {
            Questions::Split { split, .. } => split.name(),
            Questions::Own(_) => "questions",
        }
    }
}

/// A prediction request: the subject and, on top of its own way of
/// predicting (a run's settings, or an adapter's kind), what the user
/// asks.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// What predicts.
    pub subject: Subject,
    /// A run's checkpoint (default: the best, else the last).
    pub checkpoint: Option<Checkpoint>,
    /// The base model (default: the run's, else [`DEFAULT_MODEL`]).
    pub model: Option<String>,
    /// How a deep ensemble combines its members (default: the run's).
    pub ensemble_average: Option<EnsembleAverage>,
    /// Samples, sampling mode, MC dropout, seed.
    pub flags: PredictFlags,
    /// The answer scoring (default: the run's).
    pub scoring: Option<Scoring>,
    /// The length normalisation (default: the run's).
    pub length_norm: Option<LengthNorm>,
    /// Examples per forward pass.
    pub batch_size: usize,
    /// One's own questions for the task `files`, in place of a run's own
    /// files: asked in the run's templates, the defaults without a run.
    pub data: Option<PathBuf>,
}

/// One task's answers: the table row (metrics of the Bayesian model
/// average, uncertainty split), every sample's probabilities, and the
/// seconds the prediction took.
pub struct Evaluation {
    /// The row of the results table.
    pub row: ResultRow,
    /// Every sample's class probabilities.
    pub sampled: SampledProbs,
    /// Wall time of the prediction (loading excluded).
    pub seconds: f64,
}

/// What a prediction reports while it runs.
pub trait PredictProgress {
    /// A line for the user (what is predicted, how).
    fn note(&mut self, line: &str);
    /// `done` of `total` batches of a phase (an ensemble member, the
    /// Laplace linearisation, the samples of one model).
    fn batches(&mut self, phase: &str, done: usize, total: usize);
}

/// A [`PredictProgress`] that reports nothing.
pub struct Silent;

impl PredictProgress for Silent {
    fn note(&mut self, _line: &str) {}
    fn batches(&mut self, _phase: &str, _done: usize, _total: usize) {}
}

impl Request {
    /// A request with the subject's own way of predicting, batches of 8.
    pub fn new(subject: Subject) -> Self {
        Self {
            subject,
            checkpoint: None,
            model: None,
            ensemble_average: None,
            flags: PredictFlags::default(),
            scoring: None,
            length_norm: None,
            batch_size: 8,
            data: None,
        }
    }

    /// The base model the subject runs on (whose assets must be present).
    pub fn model_name(&self) -> Result<String> {
        Ok(match &self.subject {
            Subject::Run(dir) if LaplaceDir::is_laplace(dir) => laplace_config(dir)?.model,
            Subject::Run(dir) => {
                let config = run_config(dir)?;
                match config.method {
                    Method::Ens => config.model,
                    _ => self.model.clone().unwrap_or(config.model),
                }
            }
            Subject::Adapter(_) | Subject::ZeroShot => self.model.clone().unwrap_or_else(|| DEFAULT_MODEL.into()),
        })
    }

    /// The subject's answers to `questions` in `task`'s format. `B` is an
    /// autodiff backend because a Laplace posterior's predictive needs the
    /// Jacobians; everything else runs on its inner backend.
    pub fn predict<B: AutodiffBackend>(
        &self,
        task: Task,
        questions: &Questions,
        assets: &Assets,
        device: &B::Device,
        progress: &mut impl PredictProgress,
    ) -> Result<Evaluation> {
        let (config, adapter_dir) = match &self.subject {
            Subject::Run(dir) if LaplaceDir::is_laplace(dir) => {
                if self.checkpoint.is_some() {
                    return Err(LlamaError::Config(format!(
                        "{} is a Laplace posterior: it holds one adapter; its checkpoint is chosen when it is fitted (melora laplace --checkpoint)",
                        dir.display()
                    )));
                }
                return self.laplace::<B>(dir, task, questions, assets, device, progress);
            }
            Subject::Run(dir) => {
                let run = RunDir { dir: dir.clone() };
                let config = run_config(dir)?;
                if config.method == Method::Ens {
                    return self.ensemble::<B::InnerBackend>(&run, &config, task, questions, assets, device, progress);
                }
                (Some(config), Some(run.checkpoint(self.checkpoint)?))
            }
            Subject::Adapter(dir) => (None, Some(dir.clone())),
            Subject::ZeroShot => (None, None),
        };
        // The request's model, else the run's (read above), else the default.
        let model_name = self
            .model
            .clone()
            .or_else(|| config.as_ref().map(|c| c.model.clone()))
            .unwrap_or_else(|| DEFAULT_MODEL.into());
        let (model, tokenizer) = Pretrained::load::<B::InnerBackend>(&model_name, assets, device)?;
        let (model, bayesian) = match &adapter_dir {
            Some(dir) => {
                let (model, meta) = load_adapter(model, dir, device)?;
                (model, meta.config.kind() != melora_core::AdapterKind::Lora)
            }
            None => (model, false),
        };
        // The run's own way of predicting, then the flags on top.
        let defaults = match &config {
            Some(c) => c.eval_options(self.batch_size, self.flags.seed),
            None => PredictOptions::for_adapter(bayesian, self.batch_size),
        };
        let options = self.flags.apply(defaults, bayesian);
        // The run's scoring and prompt length unless the request says otherwise.
        let config = config.unwrap_or_else(|| TrainConfig::new().with_max_tokens(crate::data::MAX_TOKENS));
        let setup = self.setup(&config, task, tokenizer, assets)?;
        let examples = examples_of(questions, &setup)?;
        let name = match &adapter_dir {
            None => "zero-shot".to_string(),
            Some(dir) => format!("{} (S = {})", dir.display(), options.samples),
        };
        progress.note(&match questions {
            Questions::Own(q) => format!(
                "{} question{} in {task}'s format, {:?} scoring",
                q.len(),
                if q.len() == 1 { "" } else { "s" },
                setup.scoring
            ),
            Questions::Split { split, .. } => format!("{task} {} examples, {:?} scoring", split.name(), setup.scoring),
        });
        let std_init = adapter_dir.as_deref().and_then(checkpoint_std_init);
        let what = Evaluated {
            name: &name,
            task,
            questions: questions.name(),
            std_init,
        };
        evaluate(&what, &model, &setup.scorer, &examples, &options, device, progress)
    }

    /// A deep ensemble: each member's logits in turn, then combined; the
    /// members are the samples of the uncertainty decomposition.
    #[allow(clippy::too_many_arguments)]
    fn ensemble<B: Backend>(
        &self,
        run: &RunDir,
        config: &TrainConfig,
        task: Task,
        questions: &Questions,
        assets: &Assets,
        device: &B::Device,
        progress: &mut impl PredictProgress,
    ) -> Result<Evaluation> {
        let (base, tokenizer) = Pretrained::load::<B>(&config.model, assets, device)?;
        let setup = self.setup(config, task, tokenizer, assets)?;
        let examples = examples_of(questions, &setup)?;
        let average = self.ensemble_average.unwrap_or(config.ensemble.average);
        let start = Instant::now();
        let members = (0..config.ensemble.members).map(|k| {
            let checkpoint = run.member(k).checkpoint(self.checkpoint)?;
            Ok(load_adapter(base.clone(), &checkpoint, device)?.0)
        });
        let (probs, sampled) = predict_ensemble(
            members,
            &examples,
            &setup.scorer,
            self.batch_size,
            average,
            device,
            |k, done, total| progress.batches(&format!("member {}/{}", k + 1, config.ensemble.members), done, total),
        )?;
        let name = format!(
            "{} (ensemble of {}, {:?} averaged)",
            run.dir.display(),
            config.ensemble.members,
            average
        );
        let mut row = ResultRow::new(&name, task.name(), questions.name(), config.ensemble.members, &probs);
        row.spread = Some(Spread::of(&sampled, None, None));
        Ok(Evaluation {
            row,
            sampled,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// A Laplace posterior: the linearised predictive, probit (S = 1) or
    /// sampled (S logit draws, the samples of the uncertainty decomposition).
    fn laplace<B: AutodiffBackend>(
        &self,
        dir: &Path,
        task: Task,
        questions: &Questions,
        assets: &Assets,
        device: &B::Device,
        progress: &mut impl PredictProgress,
    ) -> Result<Evaluation> {
        let posterior = LaplaceDir { dir: dir.to_path_buf() };
        let (meta, blocks) = posterior.load()?;
        let config = laplace_config(dir)?;
        let (base, tokenizer) = Pretrained::load::<B>(&config.model, assets, device)?;
        let model = load_adapter(base, &posterior.adapter(), device)?.0;
        let setup = self.setup(&config, task, tokenizer, assets)?;
        if setup.scoring != config.scoring {
            return Err(LlamaError::Config(format!(
                "this Laplace posterior was fitted under {:?} scoring: its curvature does not hold for {:?} scoring",
                config.scoring, setup.scoring
            )));
        }
        let examples = examples_of(questions, &setup)?;
        let start = Instant::now();
        let lin = laplace::linearise(
            &model,
            &blocks,
            &[meta.prior_precision],
            &examples,
            &setup.scorer,
            self.batch_size,
            device,
            |done, total| progress.batches("laplace", done, total),
        )?;
        let samples = self.flags.samples.unwrap_or(1);
        let labels: Vec<usize> = examples.iter().map(|e| e.label).collect();
        let sampled = laplace::predictive(&lin, labels, samples, self.flags.seed, meta.prior_precision)?;
        let how = match samples {
            1 => "probit".to_string(),
            _ => format!("sampled, S = {samples}"),
        };
        let name = format!("{} (Laplace, λ = {:.3e}, {how})", dir.display(), meta.prior_precision);
        let mut row = ResultRow::new(&name, task.name(), questions.name(), samples, &sampled.average());
        row.spread = Some(Spread::of(&sampled, None, None));
        Ok(Evaluation {
            row,
            sampled,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// The task set-up: the run's scoring, length normalisation and prompt
    /// length unless the request says otherwise.
    fn setup(&self, config: &TrainConfig, task: Task, tokenizer: Tokenizer, assets: &Assets) -> Result<TaskSetup> {
        let (scoring, norm) = (
            self.scoring.unwrap_or(config.scoring),
            self.length_norm.unwrap_or(config.length_norm),
        );
        if task == Task::Files {
            let data = match (&self.data, &config.data) {
                (Some(file), own) => {
                    let template = own.as_ref().map(|d| d.template.clone()).unwrap_or_default();
                    DataFiles::one_file(file, template)
                }
                (None, Some(own)) => own.clone(),
                (None, None) => {
                    return Err(LlamaError::Config(
                        "the task \"files\" is one's own questions: evaluate a run trained with --data (--run DIR), or give the questions (--data FILE)"
                            .into(),
                    ))
                }
            };
            return TaskSetup::files(data, scoring, norm, config.max_tokens, tokenizer);
        }
        TaskSetup::new(task, scoring, norm, config.max_tokens, tokenizer, assets)
    }
}

/// What an evaluation's row names: the subject, the task, the questions,
/// and the posterior std at the start of training (when known).
pub struct Evaluated<'a> {
    /// The row's name.
    pub name: &'a str,
    /// The task.
    pub task: Task,
    /// The questions' name ([`Questions::name`]).
    pub questions: &'a str,
    /// The mean posterior std at initialisation.
    pub std_init: Option<f64>,
}

/// One model's answers to `examples` under `options`, with its row.
pub fn evaluate<B: Backend>(
    what: &Evaluated<'_>,
    model: &Llama<B>,
    scorer: &Scorer,
    examples: &[Encoded],
    options: &PredictOptions,
    device: &B::Device,
    progress: &mut impl PredictProgress,
) -> Result<Evaluation> {
    let start = Instant::now();
    let sampled = predict_samples(model, examples, scorer, options, device, |done, total| {
        progress.batches(what.name, done, total)
    })?;
    let mut row = ResultRow::new(
        what.name,
        what.task.name(),
        what.questions,
        options.samples,
        &sampled.average(),
    );
    row.spread = Some(Spread::of(&sampled, PosteriorStats::of(model).as_ref(), what.std_init));
    Ok(Evaluation {
        row,
        sampled,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The examples a prediction reads: the user's questions, or the split.
fn examples_of(questions: &Questions, setup: &TaskSetup) -> Result<Vec<Encoded>> {
    match questions {
        Questions::Own(items) => setup.encode(items),
        Questions::Split { split, max_examples } => setup.split(*split, *max_examples),
    }
}

/// A training run's settings.
fn run_config(dir: &Path) -> Result<TrainConfig> {
    Loader::file(Some(&RunDir { dir: dir.to_path_buf() }.config())).load()
}

/// The settings of the run a Laplace posterior was fitted on (kept with it).
fn laplace_config(dir: &Path) -> Result<TrainConfig> {
    Loader::file(Some(&dir.join("config.json"))).load()
}

/// The mean posterior std a training checkpoint records for the start of
/// its run (`state.json`; `None` for an adapter folder without one).
fn checkpoint_std_init(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("state.json")).ok()?;
    serde_json::from_str::<TrainState>(&text).ok()?.std_init
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run folder with `config`, and a Laplace posterior folder fitted on it.
    fn folders(config: &TrainConfig, name: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("melora-predict-{name}-{}", std::process::id()));
        let (run, laplace) = (dir.join("run"), dir.join("laplace"));
        for d in [&run, &laplace] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("config.json"), serde_json::to_string(config).unwrap()).unwrap();
        }
        std::fs::write(laplace.join("laplace.json"), "{}").unwrap();
        (run, laplace)
    }

    #[test]
    fn the_model_is_the_requests_then_the_runs_then_the_default() {
        let config = TrainConfig {
            model: "trained-on".into(),
            ..TrainConfig::new()
        };
        let (run, laplace) = folders(&config, "model");
        let ask = |subject: Subject, model: Option<&str>| {
            Request {
                model: model.map(Into::into),
                ..Request::new(subject)
            }
            .model_name()
            .unwrap()
        };
        assert_eq!(ask(Subject::Run(run.clone()), None), "trained-on");
        assert_eq!(ask(Subject::Run(run.clone()), Some("other")), "other");
        // A Laplace posterior's curvature holds for its own model only.
        assert_eq!(ask(Subject::Run(laplace.clone()), Some("other")), "trained-on");
        assert_eq!(ask(Subject::ZeroShot, None), DEFAULT_MODEL);
        assert_eq!(ask(Subject::Adapter(run.clone()), Some("other")), "other");
        // An ensemble's members were trained on its model.
        let ensemble = Method::Ens.preset(config);
        let (run, _) = folders(&ensemble, "ensemble");
        assert_eq!(ask(Subject::Run(run.clone()), Some("other")), "trained-on");
        let missing = Request::new(Subject::Run(run.join("nothing-here"))).model_name();
        assert!(missing.is_err(), "a folder without a run is an error");
    }

    #[test]
    fn a_laplace_posterior_refuses_a_checkpoint_before_loading_anything() {
        let (_, laplace) = folders(&TrainConfig::new(), "checkpoint");
        let request = Request {
            checkpoint: Some(Checkpoint::Last),
            ..Request::new(Subject::Run(laplace))
        };
        type B = burn::backend::Autodiff<burn::backend::NdArray>;
        let questions = Questions::Own(Vec::new());
        let assets = Assets {
            home: std::env::temp_dir().join("melora-predict-no-assets"),
        };
        let error = request
            .predict::<B>(Task::ArcE, &questions, &assets, &Default::default(), &mut Silent)
            .err()
            .expect("refused");
        assert!(error.to_string().contains("Laplace posterior"), "{error}");
    }
}
