//! `melora train` on a terminal: Burn's training dashboard (burn-train's
//! TUI metrics renderer) driven from melora's own loop. It plots each
//! step's NLL, KL, mean posterior std (Bayesian runs), learning rate and
//! time, and each validation's ACC, ECE, NLL and the spread across
//! posterior samples of the gold answer's probability, over the steps; its stop key (`q`, then confirm) asks the run
//! to stop after writing its checkpoint, so that `--resume` continues it.
//! While it is up, log lines go to the run folder's `log.txt` only.

use burn_train::metric::{
    MetricAttributes, MetricDefinition, MetricEntry, MetricId, NumericAttributes, NumericEntry, SerializedEntry,
};
use burn_train::renderer::tui::TuiMetricsRendererWrapper;
use burn_train::renderer::{MetricState, MetricsRenderer, MetricsRendererTraining, TrainingProgress};
use burn_train::Interrupter;
use melora_core::Metrics;
use melora_llama::posterior::Diagnostics;
use melora_llama::train::{Progress, StepReport};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// The metrics the dashboard shows: (id, name, unit, higher is better).
const TRAIN: [(&str, &str, Option<&str>, bool); 5] = [
    ("nll", "NLL", None, false),
    ("kl", "KL", None, false),
    ("std", "Posterior std", None, false),
    ("lr", "Learning rate", None, false),
    ("time", "Step time", Some("s"), false),
];
const VALID: [(&str, &str, Option<&str>, bool); 4] = [
    ("acc", "Accuracy", Some("%"), true),
    ("ece", "ECE", Some("%"), false),
    ("vnll", "Validation NLL", None, false),
    ("gold", "Std of p(gold)", None, false),
];

/// Burn's dashboard as a [`Progress`].
pub struct Dashboard {
    renderer: TuiMetricsRendererWrapper,
    interrupter: Interrupter,
    log: PathBuf,
    first_step: Option<usize>,
}

fn id(name: &str) -> MetricId {
    MetricId::new(Arc::new(name.to_string()))
}

impl Dashboard {
    /// A dashboard for a run whose log is `log` (lines go there).
    pub fn new(log: PathBuf) -> Self {
        let interrupter = Interrupter::new();
        let mut renderer = TuiMetricsRendererWrapper::new(interrupter.clone(), None);
        for (key, name, unit, higher) in TRAIN.iter().chain(&VALID) {
            renderer.register_metric(MetricDefinition {
                metric_id: id(key),
                name: name.to_string(),
                description: None,
                attributes: MetricAttributes::Numeric(NumericAttributes {
                    unit: unit.map(String::from),
                    higher_is_better: *higher,
                }),
            });
        }
        Self {
            renderer,
            interrupter,
            log,
            first_step: None,
        }
    }

    fn entry(key: &str, value: f64, shown: String) -> MetricState {
        MetricState::Numeric(
            MetricEntry::new(id(key), SerializedEntry::new(shown, value.to_string())),
            NumericEntry::Value(value),
        )
    }

    fn progress(&self, step: usize, total: usize) -> TrainingProgress {
        let done = step - self.first_step.unwrap_or(0).min(step);
        let run = total - self.first_step.unwrap_or(0).min(total);
        TrainingProgress {
            progress: Some(burn::data::dataloader::Progress {
                items_processed: done,
                items_total: run.max(1),
            }),
            global_progress: burn::data::dataloader::Progress {
                items_processed: step,
                items_total: total,
            },
            iteration: Some(step),
        }
    }
}

impl Progress for Dashboard {
    fn step(&mut self, _step: usize, _total: usize, _message: &str) {}

    fn step_values(&mut self, step: usize, total: usize, r: &StepReport) {
        self.first_step.get_or_insert(step - 1);
        self.renderer
            .update_train(Self::entry("nll", r.nll, format!("{:.4}", r.nll)));
        self.renderer
            .update_train(Self::entry("kl", r.kl, format!("{:.1} (x {:.2e})", r.kl, r.kl_weight)));
        if let Some(std) = r.posterior_std {
            self.renderer.update_train(Self::entry("std", std, format!("{std:.4}")));
        }
        self.renderer
            .update_train(Self::entry("lr", r.lr, format!("{:.2e}", r.lr)));
        self.renderer
            .update_train(Self::entry("time", r.seconds, format!("{:.2}", r.seconds)));
        let progress = self.progress(step, total);
        self.renderer.render_train(progress, vec![]);
    }

    fn validation(&mut self, step: usize, m: &Metrics, posterior: Option<&Diagnostics>) {
        self.renderer.update_valid(Self::entry(
            "acc",
            100.0 * m.accuracy,
            format!("{:.2}", 100.0 * m.accuracy),
        ));
        self.renderer
            .update_valid(Self::entry("ece", 100.0 * m.ece, format!("{:.2}", 100.0 * m.ece)));
        self.renderer
            .update_valid(Self::entry("vnll", m.nll, format!("{:.4}", m.nll)));
        if let Some(gold) = posterior.and_then(|d| d.gold_std) {
            self.renderer
                .update_valid(Self::entry("gold", gold, format!("{gold:.4}")));
        }
        let progress = self.progress(step, step.max(1));
        self.renderer.render_valid(progress, vec![]);
    }

    fn line(&mut self, line: &str) {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = writeln!(f, "{line}");
        }
    }

    fn stop_requested(&mut self) -> bool {
        self.interrupter.should_stop()
    }
}
