//! Fine-tuning with LoRA, BLoB or Me-LoRA: the training loop, its
//! checkpoints and its run folder.
//!
//! The loop is melora's own rather than `burn-train`'s `Learner`: the
//! optimiser splits of docs/method.md section 2 step the mean and the std
//! parameters with optimisers of their own (AdamW and Adam by default,
//! AdamW and SGD in BLoB's recipe), which the learner's single optimiser
//! cannot express. It uses Burn's optimisers (AdamW, Adam, SGD, gradient
//! clipping) and records.
//!
//! Restart safety: the data order, the sampling noise, dropout and the prior
//! noise of step `t` are all drawn from generators seeded by `(seed, t)`
//! (each example's own noise by `(seed, t, its index in the batch)`, which
//! data-parallel peers need: [`parallel`]), and adapter parameters get ids
//! derived from their names, so a run resumed from a checkpoint continues
//! exactly as the uninterrupted run would.

mod config;
pub mod objective;
pub mod parallel;
mod peer;
mod run;
mod step;

pub use config::{Method, Recipe, TrainConfig};
pub use melora_core::{NonFinite, OptimizerSplit};
pub use parallel::{Cluster, Nodes, Peer};
pub use run::{metrics_records, Checkpoint, EvalRecord, RunDir, TrainState};
pub use step::{linear_warmup_decay, mix, stable_adapter_ids, StepOutcome, Stepper};

use crate::assets::{remove_leftover_temporaries, write_atomic, Assets};
use crate::data::{Encoded, Split};
use crate::error::LlamaError;
use crate::model::scoring::Scorer;
use crate::model::Llama;
use crate::posterior::{Diagnostics, ObjectiveVerdict, PosteriorStats, Verdict};
use crate::pretrained::Pretrained;
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use melora_core::Metrics;
use peer::PeerLoop;
use std::path::PathBuf;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The run folder.
    pub dir: PathBuf,
    /// Training NLL (mean over the first and the last 10% of steps run).
    pub first_nll: f64,
    /// Same, last 10%.
    pub last_nll: f64,
    /// Seconds per step (median of the steps run in this process).
    pub step_seconds: f64,
    /// Steps run in this process.
    pub steps_run: usize,
    /// Whether the run stopped early because [`Progress::stop_requested`]
    /// said so (its last checkpoint is written: `--resume` continues it).
    pub stopped: bool,
    /// A Bayesian run's posterior at the end, and the mean posterior std at
    /// initialisation.
    pub posterior: Option<(PosteriorStats, Option<f64>)>,
    /// A finished Bayesian run's verdict on its posterior, and its line.
    pub verdict: Option<(Verdict, String)>,
    /// Its verdict on the objective (the negative ELBO per example against
    /// the adapter switched off), and its line.
    pub objective: Option<(ObjectiveVerdict, String)>,
}

/// One training step's numbers, for a dashboard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The batch's mean NLL.
    pub nll: f64,
    /// The KL term (0 for LoRA).
    pub kl: f64,
    /// The weight the KL entered the loss with (0 for LoRA).
    pub kl_weight: f64,
    /// The mean posterior std after the step (Bayesian runs).
    pub posterior_std: Option<f64>,
    /// The AdamW learning rate.
    pub lr: f64,
    /// Seconds the step took.
    pub seconds: f64,
}

/// Where progress goes: an interactive bar or plain lines.
pub trait Progress {
    /// A new step finished.
    fn step(&mut self, step: usize, total: usize, message: &str);
    /// A line for the log.
    fn line(&mut self, line: &str);
    /// The numbers of step `step` of `total` (after [`Progress::step`]).
    fn step_values(&mut self, _step: usize, _total: usize, _report: &StepReport) {}
    /// A validation evaluation after step `step` (mean weights), with a
    /// Bayesian run's posterior diagnostics.
    fn validation(&mut self, _step: usize, _metrics: &Metrics, _posterior: Option<&Diagnostics>) {}
    /// Whether the user asked the run to stop: checked after each step's
    /// checkpointing; the run then writes its last checkpoint and returns
    /// with [`TrainSummary::stopped`].
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// Progress that goes nowhere (the run folder's log still has every step).
pub struct Quiet;

impl Progress for Quiet {
    fn step(&mut self, _: usize, _: usize, _: &str) {}
    fn line(&mut self, _: &str) {}
}

/// The examples a run trains on and validates with, and how they are scored.
#[derive(Clone, Copy)]
pub struct TrainData<'a> {
    /// Training examples.
    pub train: &'a [Encoded],
    /// Validation examples (none: no validation during training).
    pub validation: &'a [Encoded],
    /// The task's scorer.
    pub scorer: &'a Scorer,
}

/// A training run, set up step by step as Burn's `LearnerBuilder` is: the
/// settings and the run folder, then (each optional) resuming, the nodes
/// of a run over several machines and where progress goes, then
/// [`Trainer::train`] (the model and the task loaded from the assets) or
/// [`Trainer::fit`] (a model and data one has). The run folder holds
/// everything; the summary says how it went.
///
/// With `config.devices > 1` the run is data-parallel over that many peers
/// in this process ([`parallel`]), the same steps as on one device; with
/// nodes, each process (an MPI rank) is one part of a run over several,
/// every rank with rank 0's settings (checked first), and rank 0 writes the
/// run folder.
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    run: &'a RunDir,
    resume: bool,
    nodes: Option<&'a Nodes>,
    progress: Option<&'a mut dyn Progress>,
}

impl<'a> Trainer<'a> {
    /// A run of `config` in `run`, from step 0, on this process alone,
    /// reporting nothing (the run folder's log has every step).
    pub fn new(config: &'a TrainConfig, run: &'a RunDir) -> Self {
        Self {
            config,
            run,
            resume: false,
            nodes: None,
            progress: None,
        }
    }

    /// Whether to continue from the run's last checkpoint (from step 0
    /// when there is none).
    pub fn resume(self, resume: bool) -> Self {
        Self { resume, ..self }
    }

    /// This process as one node of a run over several ([`parallel`]).
    pub fn nodes(self, nodes: Option<&'a Nodes>) -> Self {
        Self { nodes, ..self }
    }

    /// Where the steps, lines and validations go.
    pub fn progress(self, progress: &'a mut dyn Progress) -> Self {
        Self {
            progress: Some(progress),
            ..self
        }
    }

    /// Loads the model and the task from `assets`, then trains.
    pub fn train<B: AutodiffBackend>(self, assets: &Assets, device: &B::Device) -> crate::Result<TrainSummary> {
        let config = self.config;
        config.validate()?;
        let (base, tokenizer) = Pretrained::load::<B>(&config.model, assets, device)?;
        let setup = config.task_setup(tokenizer, assets)?;
        let train_set = setup.split(Split::Train, None)?;
        let validation = setup.split(Split::Validation, config.max_validation)?;
        let data = TrainData {
            train: &train_set,
            validation: &validation,
            scorer: &setup.scorer,
        };
        self.fit(base, &data, device)
    }

    /// Trains on prepared data: `base` is the model without adapters; fresh
    /// adapters are attached (or the last checkpoint's when resuming).
    pub fn fit<B: AutodiffBackend>(
        self,
        base: Llama<B>,
        data: &TrainData<'_>,
        device: &B::Device,
    ) -> crate::Result<TrainSummary> {
        let mut quiet = Quiet;
        let Self {
            config,
            run,
            resume,
            nodes,
            progress,
        } = self;
        let progress = progress.unwrap_or(&mut quiet);
        config.validate()?;
        if let Some(nodes) = nodes {
            let settings =
                serde_json::to_value(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
            nodes.agree_on_settings(&settings)?;
        }
        let cluster = Cluster {
            devices: config.devices,
            nodes: nodes.cloned(),
        };
        if nodes.is_none_or(|n| n.rank == 0) {
            std::fs::create_dir_all(&run.dir).map_err(|e| LlamaError::write(&run.dir, e))?;
        }
        if config.method == Method::Ens {
            return fit_ensemble(config, run, resume, base, data, device, progress, nodes);
        }
        if !cluster.is_parallel() {
            return PeerLoop::open(config, run, resume, base, *data, device, progress, None)?.run();
        }
        // One replica per local peer, moved to its device (on the CPU the
        // peers share the device, and the frozen weights with it).
        let replicas: Vec<std::sync::Mutex<Option<Llama<B>>>> = (0..cluster.devices)
            .map(|d| {
                let target = parallel::peer_device::<B>(device, d);
                let replica = if target == *device {
                    base.clone()
                } else {
                    base.clone().fork(&target)
                };
                std::sync::Mutex::new(Some(replica))
            })
            .collect();
        drop(base);
        let take = |d: usize| {
            replicas[d]
                .lock()
                .expect("a replica")
                .take()
                .expect("each replica is taken once")
        };
        let others = |peer: Peer, peer_device: B::Device| {
            let replica = take(peer.local);
            PeerLoop::open(
                config,
                run,
                resume,
                replica,
                *data,
                &peer_device,
                &mut Quiet,
                Some(&peer),
            )?
            .run()
        };
        let lead = |peer: Peer, peer_device: B::Device| {
            PeerLoop::open(config, run, resume, take(0), *data, &peer_device, progress, Some(&peer))?.run()
        };
        parallel::run_peers::<B, TrainSummary>(&cluster, config.batch_size, device, lead, &others)
    }
}

/// A deep ensemble: each member is a MAP run in `run/members/k` with its
/// own seed, trained one after the other (each resumable on its own).
#[allow(clippy::too_many_arguments)]
fn fit_ensemble<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    base: Llama<B>,
    data: &TrainData<'_>,
    device: &B::Device,
    progress: &mut dyn Progress,
    nodes: Option<&Nodes>,
) -> crate::Result<TrainSummary> {
    if nodes.is_none_or(|n| n.rank == 0) {
        remove_leftover_temporaries(&run.dir);
        let text =
            serde_json::to_string_pretty(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
        write_atomic(&run.config(), text.as_bytes())?;
    }
    let seeds = config.ensemble_seeds();
    let mut summaries = Vec::new();
    for (k, seed) in seeds.iter().enumerate() {
        progress.line(&format!("ensemble member {}/{} (seed {seed})", k + 1, seeds.len()));
        let member = run.member(k);
        let member_config = config.member(k);
        let trainer = Trainer::new(&member_config, &member)
            .resume(resume)
            .nodes(nodes)
            .progress(&mut *progress);
        summaries.push(trainer.fit(base.clone(), data, device)?);
        if summaries.last().is_some_and(|s| s.stopped) {
            break;
        }
    }
    let mean = |f: fn(&TrainSummary) -> f64| summaries.iter().map(f).sum::<f64>() / summaries.len() as f64;
    Ok(TrainSummary {
        dir: run.dir.clone(),
        first_nll: mean(|s| s.first_nll),
        last_nll: mean(|s| s.last_nll),
        step_seconds: mean(|s| s.step_seconds),
        steps_run: summaries.iter().map(|s| s.steps_run).sum(),
        stopped: summaries.iter().any(|s| s.stopped),
        posterior: None,
        verdict: None,
        objective: None,
    })
}
