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
pub mod parallel;
mod run;
mod step;

pub use config::{Method, Recipe, TrainConfig};
pub use melora_core::{NonFinite, OptimizerSplit};
pub use parallel::{Cluster, Nodes, Peer};
pub use run::{Checkpoint, EvalRecord, RunDir, TrainState};
pub use step::{linear_warmup_decay, mix, stable_adapter_ids, StepOutcome, Stepper};

use crate::assets::{write_atomic, Assets};
use crate::data::{seeded_shuffle, Encoded, Padding, Split};
use crate::error::LlamaError;
use crate::eval::{predict, predict_samples, PredictOptions};
use crate::model::scoring::Scorer;
use crate::model::Llama;
use crate::posterior::{last_fifth_start, verdict, Diagnostics, PosteriorStats, Verdict};
use crate::pretrained::Pretrained;
use crate::weights::peft::{load_adapter, save_adapter};
use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use melora_core::{Metrics, NoiseSource, SamplingMode};
use parallel::Agreement;
use run::Ordered;
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// Trains per `config` in `run` (loading the model and the task); with
/// `resume`, continues from the last checkpoint. The run folder holds
/// everything; the summary says how it went.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    assets: &Assets,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> crate::Result<TrainSummary> {
    train_on::<B>(config, run, resume, assets, device, progress, None)
}

/// [`train`] as one node of a run over several processes (machines):
/// see [`parallel`].
pub fn train_on<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    assets: &Assets,
    device: &B::Device,
    progress: &mut dyn Progress,
    nodes: Option<&Nodes>,
) -> crate::Result<TrainSummary> {
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
    fit_on(config, run, resume, base, &data, device, progress, nodes)
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

/// The training loop on prepared data: `base` is the model without
/// adapters; fresh adapters are attached (or the last checkpoint's with
/// `resume`).
///
/// With `config.devices > 1` the run is data-parallel over that many
/// peers ([`parallel`]), the same steps as on one device.
pub fn fit<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    base: Llama<B>,
    data: &TrainData<'_>,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> crate::Result<TrainSummary> {
    fit_on(config, run, resume, base, data, device, progress, None)
}

/// [`fit`] as one node of a run over several processes (machines), each
/// with `config.devices` peers; node 0 writes the run folder.
#[allow(clippy::too_many_arguments)]
pub fn fit_on<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    base: Llama<B>,
    data: &TrainData<'_>,
    device: &B::Device,
    progress: &mut dyn Progress,
    nodes: Option<&Nodes>,
) -> crate::Result<TrainSummary> {
    config.validate()?;
    let cluster = Cluster {
        devices: config.devices,
        nodes: nodes.cloned(),
    };
    let lead_node = nodes.is_none_or(|n| n.rank == 0);
    if lead_node {
        std::fs::create_dir_all(&run.dir).map_err(|e| LlamaError::write(&run.dir, e))?;
    }
    if config.method == Method::Ens {
        return fit_ensemble(config, run, resume, base, data, device, progress, nodes);
    }
    if !cluster.is_parallel() {
        return fit_peer(config, run, resume, base, data, device, progress, None);
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
        fit_peer(
            config,
            run,
            resume,
            take(peer.local),
            data,
            &peer_device,
            &mut Quiet,
            Some(&peer),
        )
    };
    let lead = |peer: Peer, peer_device: B::Device| {
        fit_peer(config, run, resume, take(0), data, &peer_device, progress, Some(&peer))
    };
    parallel::run_peers::<B, TrainSummary>(&cluster, config.batch_size, device, lead, &others)
}

/// The training loop of one peer (`None`: the only one).
#[allow(clippy::too_many_arguments)]
fn fit_peer<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    base: Llama<B>,
    data: &TrainData<'_>,
    device: &B::Device,
    progress: &mut dyn Progress,
    peer: Option<&Peer>,
) -> crate::Result<TrainSummary> {
    let lead = peer.is_none_or(|p| p.lead());
    let TrainData {
        train: train_set,
        validation,
        scorer,
    } = *data;
    let checkpoint = if resume {
        let found = run.complete_checkpoint(&run.last());
        if found.is_none() {
            progress.line("no checkpoint to resume from: starting from step 0");
        }
        found
    } else {
        None
    };
    if lead {
        let text =
            serde_json::to_string_pretty(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
        write_atomic(&run.config(), text.as_bytes())?;
    }
    let mut model = match &checkpoint {
        Some(dir) => load_adapter(base, dir, device)?.0,
        None => base.with_adapters(
            &config.adapter(),
            &config.targets,
            &mut NoiseSource::seeded(config.seed),
        )?,
    };
    model = stable_adapter_ids(model);
    if train_set.is_empty() {
        return Err(LlamaError::Data {
            task: config.task.to_string(),
            message: "no training examples".into(),
        });
    }
    let n_train = train_set.len();

    let mut stepper = Stepper::new(config, &model, n_train);
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let mut state = TrainState::default();
    if let Some(dir) = &checkpoint {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e))?;
        state = serde_json::from_str(&text).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        let record: Ordered<_> = recorder
            .load(dir.join("adamw"), device)
            .map_err(|e| LlamaError::format(dir.join("adamw.bin"), e.to_string()))?;
        stepper.elbo.adamw = stepper.elbo.adamw.load_record(record.0);
        // The std parameters' Adam (`StdAdam`); checkpoints of the other
        // splits have none.
        if config.optimizer == OptimizerSplit::StdAdam && config.is_bayesian() {
            let record: Ordered<_> = recorder
                .load(dir.join("std-adam"), device)
                .map_err(|e| LlamaError::format(dir.join("std-adam.bin"), e.to_string()))?;
            stepper.elbo.std_adam = stepper.elbo.std_adam.load_record(record.0);
        }
        progress.line(&format!("resumed from {} at step {}", dir.display(), state.step));
    }
    if let Some(peer) = peer {
        // Every peer must start where the lead does (a node resuming
        // without the lead's checkpoint would train other batches).
        let sum = peer.sum::<B::InnerBackend>(&[state.step as f64], device)?[0];
        if sum != (state.step * peer.peers) as f64 {
            return Err(LlamaError::Peers(format!(
                "the peers start at different steps (this one at {}, the mean {:.1}): every node needs the lead's run folder (its checkpoints/last) to resume",
                state.step,
                sum / peer.peers as f64
            )));
        }
    }
    // Validation records past the checkpoint (written before a crash) are
    // dropped: the resumed run writes them again, so each step has one.
    if lead {
        run.truncate_metrics(state.step)?;
    }
    if state.step == 0 {
        if let Some(stats) = PosteriorStats::of(&model) {
            state.std_init = Some(stats.all.mean);
            let line = format!("posterior at initialisation: {}", stats.line());
            progress.line(&line);
            if lead {
                run.append(&run.log(), &line)?;
            }
        }
    }
    let peers = peer.map_or(String::new(), |p| format!(", {} data-parallel peers", p.peers));
    progress.line(&format!(
        "{} on {} with {:?}: {} trainable parameters, {} training / {} validation examples, steps {}..{}{peers}",
        config.model,
        config.task,
        config.method,
        model.num_trainable(),
        n_train,
        validation.len(),
        state.step,
        config.steps
    ));

    let mut order_epoch = usize::MAX;
    let mut order: Vec<usize> = Vec::new();
    let mut nlls: Vec<f64> = Vec::new();
    let mut since_eval: Vec<f64> = std::mem::take(&mut state.since_eval);
    let mut step_times: Vec<f64> = Vec::new();
    let mut stopped = false;

    let save_checkpoint =
        |model: &Llama<B>, stepper: &Stepper<B>, state: &TrainState, target: &Path| -> crate::Result<()> {
            run.replace_checkpoint(target, |tmp| {
                save_adapter(model, &config.adapter(), tmp, &config.model)?;
                let cannot = |file: &str, e| {
                    LlamaError::format(tmp.join(file), format!("cannot write the optimiser state: {e}"))
                };
                recorder
                    .record(Ordered(stepper.elbo.adamw.to_record()), tmp.join("adamw"))
                    .map_err(|e| cannot("adamw.bin", e))?;
                if config.optimizer == OptimizerSplit::StdAdam && config.is_bayesian() {
                    recorder
                        .record(Ordered(stepper.elbo.std_adam.to_record()), tmp.join("std-adam"))
                        .map_err(|e| cannot("std-adam.bin", e))?;
                }
                let text =
                    serde_json::to_string_pretty(state).map_err(|e| LlamaError::serialize("the training state", e))?;
                write_atomic(&tmp.join("state.json"), text.as_bytes())
            })
        };

    while state.step < config.steps {
        let step = state.step;
        let started = Instant::now();
        // Data order: a seeded permutation per epoch.
        let epoch = step * config.batch_size / n_train;
        if epoch != order_epoch {
            order = seeded_shuffle((0..n_train).collect(), mix(config.seed, 1_000_000 + epoch as u64));
            order_epoch = epoch;
        }
        let start = (step * config.batch_size) % n_train;
        let indices: Vec<usize> = (0..config.batch_size).map(|i| order[(start + i) % n_train]).collect();
        let batch = scorer.batch(train_set, &indices, Padding::Left);

        let outcome = match peer {
            None => stepper.step(&mut model, &batch, scorer, step, device),
            Some(peer) => {
                let rows = peer.share(config.batch_size);
                stepper.step_peer(
                    &mut model,
                    &batch.rows(rows.clone()),
                    rows.start,
                    config.batch_size,
                    scorer,
                    step,
                    peer,
                    device,
                )?
            }
        };
        let (nll_value, kl_value, kl_weight, lr) = match outcome {
            Ok(o) => (o.nll, o.kl, o.kl_weight, o.lr),
            Err(bad) => return Err(nan_error(run, step, bad)),
        };
        state.step += 1;
        let posterior_std = config.is_bayesian().then(|| model.posterior_std()).flatten();
        if state.step == last_fifth_start(config.steps) {
            state.std_last_fifth = posterior_std;
        }
        nlls.push(nll_value);
        since_eval.push(nll_value);
        step_times.push(started.elapsed().as_secs_f64());
        let at_end = state.step == config.steps;
        // The lead's part: the log, validation, checkpoints, the stop key.
        let mut lead_work = || -> crate::Result<bool> {
            if !lead {
                return Ok(false);
            }
            let std = posterior_std.map_or(String::new(), |s| format!(" std {s:.4}"));
            let message = format!("nll {nll_value:.4} kl {kl_value:.1}{std} lr {lr:.2e}");
            progress.step(state.step, config.steps, &message);
            let seconds = *step_times.last().expect("a step time");
            let report = StepReport {
                nll: nll_value,
                kl: kl_value,
                kl_weight,
                posterior_std,
                lr,
                seconds,
            };
            progress.step_values(state.step, config.steps, &report);
            run.append(&run.log(), &format!("step {} {message} {seconds:.2}s", state.step))?;
            if (config.eval_every > 0 && state.step % config.eval_every == 0) || at_end {
                let metrics = if validation.is_empty() {
                    None
                } else {
                    let valid = model.valid();
                    let probs = predict(
                        &valid,
                        validation,
                        scorer,
                        &PredictOptions::mean(config.eval_batch_size),
                        device,
                        |_, _| {},
                    )?;
                    Some(probs.metrics())
                };
                if let Some(metrics) = metrics {
                    let train_nll = since_eval.iter().sum::<f64>() / since_eval.len().max(1) as f64;
                    since_eval.clear();
                    let posterior = diagnostics(config, &model, validation, scorer, kl_value, kl_weight, device)?;
                    let record = EvalRecord {
                        step: state.step,
                        metrics: metrics.clone(),
                        train_nll,
                        posterior: posterior.clone(),
                    };
                    run.append(
                        &run.metrics(),
                        &serde_json::to_string(&record).map_err(|e| LlamaError::serialize("a metrics record", e))?,
                    )?;
                    progress.line(&format!(
                        "step {}: validation acc {:.4} nll {:.4} ece {:.4} (train nll {train_nll:.4})",
                        state.step, metrics.accuracy, metrics.nll, metrics.ece
                    ));
                    if let Some(d) = &posterior {
                        let gold = d.gold_std.map_or(String::new(), |g| format!(", std of p(gold) {g:.4}"));
                        let line = format!(
                            "posterior at step {}: {}; kl {:.1} x {:.3e}{gold}",
                            state.step,
                            d.stats.line(),
                            d.kl,
                            d.kl_weight
                        );
                        progress.line(&line);
                        run.append(&run.log(), &line)?;
                    }
                    progress.validation(state.step, &metrics, posterior.as_ref());
                    if config.select_best && state.best.is_none_or(|(acc, _)| metrics.accuracy > acc) {
                        state.best = Some((metrics.accuracy, state.step));
                        state.since_eval.clear();
                        save_checkpoint(&model, &stepper, &state, &run.best())?;
                    }
                }
            }
            let stop = !at_end && progress.stop_requested();
            if state.step % config.checkpoint_every.max(1) == 0 || at_end || stop {
                state.since_eval.clone_from(&since_eval);
                save_checkpoint(&model, &stepper, &state, &run.last())?;
            }
            Ok(stop)
        };
        let work = lead_work();
        let stop = match peer {
            None => work?,
            // Every peer learns whether the lead failed or stops.
            Some(peer) => match (
                peer.agree::<B::InnerBackend>(work.is_err(), *work.as_ref().unwrap_or(&false), device)?,
                work,
            ) {
                (_, Err(e)) => return Err(e),
                (Agreement::Failed, Ok(_)) => return Err(LlamaError::Peers("another peer failed".into())),
                (Agreement::Stop, Ok(_)) => true,
                (Agreement::Continue, Ok(stop)) => stop,
            },
        };
        if stop {
            progress.line(&format!(
                "stopped at step {} of {}: its checkpoint is written, --resume continues",
                state.step, config.steps
            ));
            stopped = true;
            break;
        }
    }
    let posterior = PosteriorStats::of(&model).map(|stats| (stats, state.std_init));
    let verdict = match (&posterior, state.std_last_fifth) {
        (Some((stats, _)), Some(before)) if state.step == config.steps => {
            Some(verdict(state.std_init, before, stats.all.mean, config.steps))
        }
        _ => None,
    };
    if lead {
        if let Some((stats, _)) = &posterior {
            progress.line(&format!("posterior after step {}: {}", state.step, stats.line()));
            run.append(
                &run.log(),
                &format!("posterior after step {}: {}", state.step, stats.line()),
            )?;
        }
        if let Some((_, line)) = &verdict {
            progress.line(line);
            run.append(&run.log(), line)?;
        }
    }
    let tenth = (nlls.len() / 10).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    step_times.sort_by(f64::total_cmp);
    Ok(TrainSummary {
        dir: run.dir.clone(),
        first_nll: mean(&nlls[..tenth.min(nlls.len())]),
        last_nll: mean(&nlls[nlls.len().saturating_sub(tenth)..]),
        step_seconds: step_times.get(step_times.len() / 2).copied().unwrap_or(0.0),
        steps_run: nlls.len(),
        stopped,
        posterior,
        verdict,
    })
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
        let text =
            serde_json::to_string_pretty(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
        write_atomic(&run.config(), text.as_bytes())?;
    }
    let seeds = config.ensemble_seeds();
    let mut summaries = Vec::new();
    for (k, seed) in seeds.iter().enumerate() {
        progress.line(&format!("ensemble member {}/{} (seed {seed})", k + 1, seeds.len()));
        let member = run.member(k);
        summaries.push(fit_on(
            &config.member(k),
            &member,
            resume,
            base.clone(),
            data,
            device,
            progress,
            nodes,
        )?);
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
    })
}

/// A Bayesian run's posterior diagnostics at a validation: the spread of
/// its random weights, the last step's KL and weight, and the std across
/// `posterior_samples` draws of the gold answer's probability on the first
/// `posterior_examples` validation examples.
#[allow(clippy::too_many_arguments)]
fn diagnostics<B: AutodiffBackend>(
    config: &TrainConfig,
    model: &Llama<B>,
    validation: &[Encoded],
    scorer: &Scorer,
    kl: f64,
    kl_weight: f64,
    device: &B::Device,
) -> crate::Result<Option<Diagnostics>> {
    let Some(stats) = PosteriorStats::of(model) else {
        return Ok(None);
    };
    let examples = &validation[..config.posterior_examples.min(validation.len())];
    let samples = config.posterior_samples;
    let (gold_std, gold_std_on) = if examples.is_empty() || samples < 2 {
        (None, None)
    } else {
        let options = PredictOptions {
            samples,
            mode: SamplingMode::PerExample,
            ..config.eval_options(config.eval_batch_size, 0)
        };
        let sampled = predict_samples(&model.valid(), examples, scorer, &options, device, |_, _| {})?;
        (Some(sampled.gold_std()), Some((samples, examples.len())))
    };
    Ok(Some(Diagnostics {
        stats,
        kl,
        kl_weight,
        gold_std,
        gold_std_on,
    }))
}

fn nan_error(run: &RunDir, step: usize, bad: NonFinite) -> LlamaError {
    LlamaError::Stopped {
        step: step + 1,
        what: bad.what,
        value: bad.value,
        checkpoint: run.last(),
    }
}
