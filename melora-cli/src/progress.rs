//! Progress on the terminal: a bar when stderr is one, plain lines
//! otherwise (CI, logs).

use indicatif::{ProgressBar, ProgressStyle};
use melora_llama::predict::PredictProgress;
use melora_llama::train::Progress;
use std::io::IsTerminal;

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

/// Progress of work in named phases (ensemble members, Laplace's
/// curvature then validation): a bar per phase on a terminal, lines
/// otherwise.
#[derive(Default)]
pub struct PhaseBars {
    phase: String,
    bar: Option<ProgressBar>,
}

impl PhaseBars {
    pub fn update(&mut self, phase: &str, done: usize, total: usize) {
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

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl PredictProgress for PhaseBars {
    fn note(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
    fn batches(&mut self, phase: &str, done: usize, total: usize) {
        self.update(phase, done, total);
    }
}
