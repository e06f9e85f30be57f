//! One peer's training loop (the only peer of a run on one device), in its
//! phases: [`PeerLoop::open`] (the checkpoint to resume, the adapters, the
//! optimisers, the peers' agreement on the step, a fresh Bayesian run's
//! adapter-off point), then per step its batch ([`PeerLoop::batch`]), the
//! ELBO step, and the lead's share ([`PeerLoop::lead_work`]: the log,
//! [`PeerLoop::validate`], the checkpoints, the stop key), and at the end
//! the verdicts on the posterior and the objective, and the summary
//! ([`PeerLoop::finish`]).

use super::objective;
use super::parallel::{Agreement, Peer};
use super::run::Ordered;
use super::{
    mix, stable_adapter_ids, EvalRecord, Progress, RunDir, StepOutcome, StepReport, Stepper, TrainConfig, TrainData,
    TrainState, TrainSummary,
};
use crate::assets::{remove_leftover_temporaries, write_atomic};
use crate::data::{seeded_shuffle, Encoded, Padding};
use crate::error::LlamaError;
use crate::eval::{predict, predict_samples, PredictOptions};
use crate::model::scoring::{ScoreBatch, Scorer};
use crate::model::Llama;
use crate::posterior::{last_fifth_start, standard_error, verdict, Diagnostics, PosteriorStats};
use crate::weights::peft::{load_adapter, save_adapter};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use melora_core::{NoiseSource, NonFinite, OptimizerSplit, SamplingMode};
use std::path::Path;
use std::time::Instant;

/// A peer's run in progress: its model and optimisers, the run's state and
/// what the summary needs.
pub(super) struct PeerLoop<'a, B: AutodiffBackend> {
    config: &'a TrainConfig,
    run: &'a RunDir,
    data: TrainData<'a>,
    device: &'a B::Device,
    progress: &'a mut dyn Progress,
    /// `None`: the only peer.
    peer: Option<&'a Peer>,
    /// Whether this peer writes the run folder and reports progress.
    lead: bool,
    model: Llama<B>,
    stepper: Stepper<B>,
    recorder: BinFileRecorder<FullPrecisionSettings>,
    state: TrainState,
    /// The epoch whose seeded permutation `order` is.
    order_epoch: usize,
    order: Vec<usize>,
    /// Every step's NLL in this process, and those since the last validation.
    nlls: Vec<f64>,
    since_eval: Vec<f64>,
    step_times: Vec<f64>,
}

/// One step's numbers, as the lead reports them.
struct Stepped {
    outcome: StepOutcome,
    posterior_std: Option<f64>,
    seconds: f64,
}

impl<'a, B: AutodiffBackend> PeerLoop<'a, B> {
    /// The run opened: its settings written, the adapters fresh or the last
    /// checkpoint's (with `resume`), the optimisers' state and the step
    /// restored, every peer at the same step.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        config: &'a TrainConfig,
        run: &'a RunDir,
        resume: bool,
        base: Llama<B>,
        data: TrainData<'a>,
        device: &'a B::Device,
        progress: &'a mut dyn Progress,
        peer: Option<&'a Peer>,
    ) -> crate::Result<Self> {
        let lead = peer.is_none_or(|p| p.lead());
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
            remove_leftover_temporaries(&run.dir);
            let text =
                serde_json::to_string_pretty(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
            write_atomic(&run.config(), text.as_bytes())?;
        }
        let model = match &checkpoint {
            Some(dir) => load_adapter(base, dir, device)?.0,
            None => base.with_adapters(
                &config.adapter(),
                &config.targets,
                &mut NoiseSource::seeded(config.seed),
            )?,
        };
        let model = stable_adapter_ids(model);
        if data.train.is_empty() {
            return Err(LlamaError::Data {
                task: config.task.to_string(),
                message: "no training examples".into(),
            });
        }
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        let mut stepper = Stepper::new(config, &model, data.train.len());
        let mut state = TrainState::default();
        if let Some(dir) = &checkpoint {
            (state, stepper) = restore(config, dir, stepper, &recorder, device)?;
            progress.line(&format!("resumed from {} at step {}", dir.display(), state.step));
        }
        let mut this = Self {
            config,
            run,
            data,
            device,
            progress,
            peer,
            lead,
            model,
            stepper,
            recorder,
            state,
            order_epoch: usize::MAX,
            order: Vec::new(),
            nlls: Vec::new(),
            since_eval: Vec::new(),
            step_times: Vec::new(),
        };
        this.agree_on_the_step()?;
        // Validation records past the checkpoint (written before a crash) are
        // dropped: the resumed run writes them again, so each step has one.
        if lead {
            run.truncate_metrics(this.state.step)?;
        }
        if this.state.step == 0 {
            if let Some(stats) = PosteriorStats::of(&this.model) {
                this.state.std_init = Some(stats.all.mean);
                let line = format!("posterior at initialisation: {}", stats.line());
                this.progress.line(&line);
                if lead {
                    run.append(&run.log(), &line)?;
                }
            }
            let measured = if lead {
                objective::adapter_off(config, &this.model, data.train, data.scorer, device)?
            } else {
                None
            };
            if let Some((off, line)) = measured {
                this.state.adapter_off = off;
                this.progress.line(&line);
                run.append(&run.log(), &line)?;
            }
        }
        let peers = peer.map_or(String::new(), |p| format!(", {} data-parallel peers", p.peers));
        let line = format!(
            "{} on {} with {:?}: {} trainable parameters, {} training / {} validation examples, steps {}..{}{peers}",
            config.model,
            config.task,
            config.method,
            this.model.num_trainable(),
            data.train.len(),
            data.validation.len(),
            this.state.step,
            config.steps
        );
        this.progress.line(&line);
        this.since_eval = std::mem::take(&mut this.state.since_eval);
        Ok(this)
    }

    /// Every peer must start where the lead does (a node resuming without
    /// the lead's checkpoint would train other batches).
    fn agree_on_the_step(&self) -> crate::Result<()> {
        let Some(peer) = self.peer else {
            return Ok(());
        };
        let step = self.state.step;
        let sum = peer.sum::<B::InnerBackend>(&[step as f64], self.device)?[0];
        if sum != (step * peer.peers) as f64 {
            return Err(LlamaError::Peers(format!(
                "the peers start at different steps (this one at {step}, the mean {:.1}): every rank needs the lead's run folder (its checkpoints/last) to resume",
                sum / peer.peers as f64
            )));
        }
        Ok(())
    }

    /// Steps until the last or until the user stops the run.
    pub fn run(mut self) -> crate::Result<TrainSummary> {
        let mut stopped = false;
        while self.state.step < self.config.steps {
            let step = self.state.step;
            let started = Instant::now();
            let batch = self.batch(step);
            let outcome = match self.step(&batch, step)? {
                Ok(outcome) => outcome,
                Err(bad) => return Err(self.non_finite(step, bad)),
            };
            self.state.step += 1;
            let posterior_std = self.config.is_bayesian().then(|| self.model.posterior_std()).flatten();
            if self.state.step == last_fifth_start(self.config.steps) {
                self.state.std_last_fifth = posterior_std;
            }
            self.nlls.push(outcome.nll);
            self.since_eval.push(outcome.nll);
            let seconds = started.elapsed().as_secs_f64();
            self.step_times.push(seconds);
            let stepped = Stepped {
                outcome,
                posterior_std,
                seconds,
            };
            let work = self.lead_work(&stepped);
            if self.agree_to_stop(work)? {
                let line = format!(
                    "stopped at step {} of {}: its checkpoint is written, --resume continues",
                    self.state.step, self.config.steps
                );
                self.progress.line(&line);
                stopped = true;
                break;
            }
        }
        self.finish(stopped)
    }

    /// The batch of 0-based `step`: a seeded permutation per epoch, read in
    /// order.
    fn batch(&mut self, step: usize) -> ScoreBatch {
        let (config, n_train) = (self.config, self.data.train.len());
        let epoch = step * config.batch_size / n_train;
        if epoch != self.order_epoch {
            self.order = seeded_shuffle((0..n_train).collect(), mix(config.seed, 1_000_000 + epoch as u64));
            self.order_epoch = epoch;
        }
        let start = (step * config.batch_size) % n_train;
        let indices: Vec<usize> = (0..config.batch_size)
            .map(|i| self.order[(start + i) % n_train])
            .collect();
        self.data.scorer.batch(self.data.train, &indices, Padding::Left)
    }

    /// The ELBO step on `batch`, this peer's share of it when there are
    /// several.
    fn step(&mut self, batch: &ScoreBatch, step: usize) -> crate::Result<Result<StepOutcome, NonFinite>> {
        let scorer = self.data.scorer;
        Ok(match self.peer {
            None => self.stepper.step(&mut self.model, batch, scorer, step, self.device),
            Some(peer) => {
                let rows = peer.share(self.config.batch_size);
                self.stepper.step_peer(
                    &mut self.model,
                    &batch.rows(rows.clone()),
                    rows.start,
                    self.config.batch_size,
                    scorer,
                    step,
                    peer,
                    self.device,
                )?
            }
        })
    }

    /// The lead's share of a step: the progress line and log, validation
    /// (and the best checkpoint), the last checkpoint, the stop key.
    /// Whether the user asked to stop.
    fn lead_work(&mut self, stepped: &Stepped) -> crate::Result<bool> {
        if !self.lead {
            return Ok(false);
        }
        let (config, run) = (self.config, self.run);
        let (step, at_end) = (self.state.step, self.state.step == config.steps);
        let o = &stepped.outcome;
        let std = stepped.posterior_std.map_or(String::new(), |s| format!(" std {s:.4}"));
        let message = format!("nll {:.4} kl {:.1}{std} lr {:.2e}", o.nll, o.kl, o.lr);
        self.progress.step(step, config.steps, &message);
        let report = StepReport {
            nll: o.nll,
            kl: o.kl,
            kl_weight: o.kl_weight,
            posterior_std: stepped.posterior_std,
            lr: o.lr,
            seconds: stepped.seconds,
        };
        self.progress.step_values(step, config.steps, &report);
        run.append(&run.log(), &format!("step {step} {message} {:.2}s", stepped.seconds))?;
        if (config.eval_every > 0 && step % config.eval_every == 0) || at_end {
            self.validate(o.kl, o.kl_weight)?;
        }
        let stop = !at_end && self.progress.stop_requested();
        if step % config.checkpoint_every.max(1) == 0 || at_end || stop {
            self.state.since_eval.clone_from(&self.since_eval);
            self.save_checkpoint(&run.last())?;
        }
        Ok(stop)
    }

    /// A validation of the mean weights: its record, its lines, the
    /// posterior diagnostics, and the best checkpoint when it is the best.
    fn validate(&mut self, kl: f64, kl_weight: f64) -> crate::Result<()> {
        let (config, run, validation) = (self.config, self.run, self.data.validation);
        if validation.is_empty() {
            return Ok(());
        }
        let options = PredictOptions::mean(config.predict.batch_size);
        let probs = predict(
            &self.model.valid(),
            validation,
            self.data.scorer,
            &options,
            self.device,
            |_, _| {},
        )?;
        let metrics = probs.metrics();
        let step = self.state.step;
        let train_nll = self.since_eval.iter().sum::<f64>() / self.since_eval.len().max(1) as f64;
        let train_nll_se = standard_error(&self.since_eval);
        self.since_eval.clear();
        let posterior = diagnostics(
            config,
            &self.model,
            validation,
            self.data.scorer,
            kl,
            kl_weight,
            self.device,
        )?;
        let record = EvalRecord {
            step,
            metrics: metrics.clone(),
            train_nll,
            train_nll_se,
            posterior: posterior.clone(),
        };
        let line = serde_json::to_string(&record).map_err(|e| LlamaError::serialize("a metrics record", e))?;
        run.append(&run.metrics(), &line)?;
        self.progress.line(&format!(
            "step {step}: validation acc {:.4} nll {:.4} ece {:.4} (train nll {train_nll:.4})",
            metrics.accuracy, metrics.nll, metrics.ece
        ));
        if let (Some(d), Some(point)) = (&posterior, objective::objective_point(&record, self.data.train.len())) {
            let gold = d.gold_std.map_or(String::new(), |g| format!(", std of p(gold) {g:.4}"));
            // The objective the end verdict judges, so that a run that
            // climbs away from the adapter-off point shows it as it does.
            let off = (self.state.adapter_off).map_or(String::new(), |o| format!(" (adapter off {:.4})", o.nll));
            let line = format!(
                "posterior at step {step}: {}; kl {:.1} x {:.3e}{gold}; negative ELBO per example {:.4}{off}",
                d.stats.line(),
                d.kl,
                d.kl_weight,
                point.value,
            );
            self.progress.line(&line);
            run.append(&run.log(), &line)?;
        }
        self.progress.validation(step, &metrics, posterior.as_ref());
        if config.select_best && self.state.best.is_none_or(|(acc, _)| metrics.accuracy > acc) {
            self.state.best = Some((metrics.accuracy, step));
            self.state.since_eval.clear();
            self.save_checkpoint(&run.best())?;
        }
        Ok(())
    }

    /// The adapter, the optimisers' state and the run's state, replacing
    /// the checkpoint at `target` at once.
    fn save_checkpoint(&self, target: &Path) -> crate::Result<()> {
        let config = self.config;
        self.run.replace_checkpoint(target, |tmp| {
            save_adapter(&self.model, &config.adapter(), tmp, &config.model)?;
            let cannot =
                |file: &str, e| LlamaError::format(tmp.join(file), format!("cannot write the optimiser state: {e}"));
            let elbo = &self.stepper.elbo;
            self.recorder
                .record(Ordered(elbo.adamw.to_record()), tmp.join("adamw"))
                .map_err(|e| cannot("adamw.bin", e))?;
            if keeps_std_adam(self.config) {
                self.recorder
                    .record(Ordered(elbo.std_adam.to_record()), tmp.join("std-adam"))
                    .map_err(|e| cannot("std-adam.bin", e))?;
            }
            let text = serde_json::to_string_pretty(&self.state)
                .map_err(|e| LlamaError::serialize("the training state", e))?;
            write_atomic(&tmp.join("state.json"), text.as_bytes())
        })
    }

    /// Whether the run stops after this step: the lead's answer, which every
    /// peer learns (and whether the lead failed).
    fn agree_to_stop(&self, work: crate::Result<bool>) -> crate::Result<bool> {
        let Some(peer) = self.peer else {
            return work;
        };
        let agreement = peer.agree::<B::InnerBackend>(work.is_err(), *work.as_ref().unwrap_or(&false), self.device)?;
        match (agreement, work) {
            (_, Err(e)) => Err(e),
            (Agreement::Failed, Ok(_)) => Err(LlamaError::Peers("another peer failed".into())),
            (Agreement::Stop, Ok(_)) => Ok(true),
            (Agreement::Continue, Ok(stop)) => Ok(stop),
        }
    }

    /// The error of a step whose NLL or KL was not finite.
    fn non_finite(&self, step: usize, bad: NonFinite) -> LlamaError {
        LlamaError::Stopped {
            step: step + 1,
            what: bad.what,
            value: bad.value,
            checkpoint: self.run.last(),
        }
    }

    /// The posterior at the end and its verdict (logged by the lead), and
    /// the summary.
    fn finish(mut self, stopped: bool) -> crate::Result<TrainSummary> {
        let (config, run, state) = (self.config, self.run, &self.state);
        let posterior = PosteriorStats::of(&self.model).map(|stats| (stats, state.std_init));
        let verdict = match (&posterior, state.std_last_fifth) {
            (Some((stats, _)), Some(before)) if state.step == config.steps => {
                Some(verdict(state.std_init, before, stats.all.mean, config.steps))
            }
            _ => None,
        };
        if self.lead {
            if let Some((stats, _)) = &posterior {
                let line = format!("posterior after step {}: {}", state.step, stats.line());
                self.progress.line(&line);
                run.append(&run.log(), &line)?;
            }
            if let Some((_, line)) = &verdict {
                self.progress.line(line);
                run.append(&run.log(), line)?;
            }
        }
        let finished = self.lead && posterior.is_some() && self.state.step == config.steps;
        let objective = if finished {
            objective::verdict(config, run, self.data.train.len(), self.state.adapter_off)?
        } else {
            None
        };
        if let Some((_, line)) = &objective {
            self.progress.line(line);
            run.append(&run.log(), line)?;
        }
        let nlls = &self.nlls;
        let tenth = (nlls.len() / 10).max(1);
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        self.step_times.sort_by(f64::total_cmp);
        Ok(TrainSummary {
            dir: run.dir.clone(),
            first_nll: mean(&nlls[..tenth.min(nlls.len())]),
            last_nll: mean(&nlls[nlls.len().saturating_sub(tenth)..]),
            step_seconds: self.step_times.get(self.step_times.len() / 2).copied().unwrap_or(0.0),
            steps_run: nlls.len(),
            stopped,
            posterior,
            verdict,
            objective,
        })
    }
}

/// Whether a run's checkpoints hold the std parameters' own Adam
/// (`StdAdam`; the other splits have none).
fn keeps_std_adam(config: &TrainConfig) -> bool {
    config.elbo.optimizer == OptimizerSplit::StdAdam && config.is_bayesian()
}

/// The run's state and the optimisers' of the checkpoint in `dir`.
fn restore<B: AutodiffBackend>(
    config: &TrainConfig,
    dir: &Path,
    mut stepper: Stepper<B>,
    recorder: &BinFileRecorder<FullPrecisionSettings>,
    device: &B::Device,
) -> crate::Result<(TrainState, Stepper<B>)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e))?;
    let state = serde_json::from_str(&text).map_err(|e| LlamaError::format(&path, e.to_string()))?;
    let record: Ordered<_> = recorder
        .load(dir.join("adamw"), device)
        .map_err(|e| LlamaError::format(dir.join("adamw.bin"), e.to_string()))?;
    stepper.elbo.adamw = stepper.elbo.adamw.load_record(record.0);
    if keeps_std_adam(config) {
        let record: Ordered<_> = recorder
            .load(dir.join("std-adam"), device)
            .map_err(|e| LlamaError::format(dir.join("std-adam.bin"), e.to_string()))?;
        stepper.elbo.std_adam = stepper.elbo.std_adam.load_record(record.0);
    }
    Ok((state, stepper))
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
            ..config.eval_options(config.predict.batch_size, 0)
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
