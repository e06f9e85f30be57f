//! The chaos check: `melora train` killed with SIGKILL again and
//! again, at seeded random moments and while a checkpoint is being
//! written, resumed with `--resume` each time, ends with the same bytes as
//! a run that was never interrupted: adapters, optimiser states, training
//! states, validation records, for LoRA, BLoB, Me-LoRA and both members of
//! an ensemble.
//!
//! The binary runs the tiny fixture model (with a word-level tokenizer) on
//! ARC-Easy data written in the real format into a temporary
//! `MELORA_HOME`; the ignored test does the same on SmolLM2-135M and the
//! fetched data. Each kill is printed (`--nocapture`): when, whether a
//! checkpoint folder was half-written at that moment, where the run
//! resumed.

#[path = "../../melora-llama/tests/common/mod.rs"]
mod common;

use common::fake_data::{tiny_home, TinyHome};
use common::{differing_files, run_files, with_method_preset};
use melora_llama::assets::Assets;
use melora_llama::data::Scoring;
use melora_llama::eval::{EnsembleConfig, PredictConfig};
use melora_llama::train::{Method, TrainConfig};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const KILLS: usize = 6;

struct Setup {
    home: PathBuf,
    model: String,
    root: PathBuf,
    /// The Bayesian runs' pass with the adapter switched off, before the
    /// first step (`objective_examples`).
    objective_examples: usize,
}

/// A `MELORA_HOME` with ARC-Easy (and every other task) in the real
/// format, and the tiny fixture model with a tokenizer.
fn tiny_setup() -> Setup {
    let TinyHome { root, home, model } = tiny_home("chaos");
    Setup {
        home,
        model: model.display().to_string(),
        root,
        objective_examples: TrainConfig::new().objective_examples,
    }
}

fn config(model: &str, method: Method, steps: usize) -> TrainConfig {
    let config = TrainConfig::new()
        .with_model(model.into())
        .with_scoring(Scoring::Answer)
        .with_rank(4)
        .with_steps(steps)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_eval_every(4)
        .with_checkpoint_every(1)
        .with_max_validation(Some(6))
        .with_predict(PredictConfig::new().with_batch_size(4))
        .with_ensemble(EnsembleConfig::new().with_members(2))
        .with_seed(3);
    with_method_preset(config, method)
}

fn start(setup: &Setup, config_path: &Path, out: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(["train", "--config"])
        .arg(config_path)
        .arg("--out")
        .arg(out)
        .arg("--resume")
        .env("MELORA_HOME", &setup.home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// A checkpoint folder being written (`.last.tmp`, `.best.tmp`) anywhere
/// in the run folder, created (or last changed) at `since` or later: one
/// left by an earlier killed process does not count.
fn half_written(dir: &Path, since: SystemTime) -> Option<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".tmp"))
                {
                    if std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t >= since)
                    {
                        return Some(path);
                    }
                    continue;
                }
                dirs.push(path);
            }
        }
    }
    None
}

/// The step of the newest checkpoint in `dir/checkpoints` (or the last
/// member's), for the report.
fn checkpoint_step(dir: &Path) -> String {
    let mut found = Vec::new();
    for state in run_files(dir)
        .into_iter()
        .filter(|p| p.ends_with("last/state.json") || p.ends_with(".last.old/state.json"))
    {
        let text = std::fs::read_to_string(dir.join(&state)).unwrap_or_default();
        let step = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["step"].as_u64());
        found.push(format!(
            "{} at step {}",
            state.parent().unwrap().display(),
            step.map_or("?".into(), |s| s.to_string())
        ));
    }
    if found.is_empty() {
        "no checkpoint yet".into()
    } else {
        found.join(", ")
    }
}

/// The step of `dir/checkpoints/last` (0 without one; an ensemble's
/// members have their own).
fn done_steps(dir: &Path) -> usize {
    let text = std::fs::read_to_string(dir.join("checkpoints/last/state.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0) as usize
}

/// Prints `line` (with `--nocapture`) and keeps it for the summary.
fn say(report: &mut Vec<String>, line: String) {
    println!("{line}");
    report.push(line);
}

/// Trains `method` once without interruption and once under `KILLS`
/// SIGKILLs; returns the report lines. Panics when a file differs.
/// Even-numbered kills come at a moment drawn from `delay` (fractions of
/// the uninterrupted run's wall time) after the start.
fn chaos(setup: &Setup, method: Method, steps: usize, delay: Range<f64>, seed: u64) -> Vec<String> {
    let config = config(&setup.model, method, steps).with_objective_examples(setup.objective_examples);
    let base = setup.root.join(format!("{method:?}"));
    std::fs::create_dir_all(&base).unwrap();
    let config_path = base.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let (whole, killed) = (base.join("whole"), base.join("killed"));
    let t0 = Instant::now();
    let status = start(setup, &config_path, &whole).wait().unwrap();
    assert!(status.success(), "{method:?}: the uninterrupted run failed");
    let wall = t0.elapsed();
    let mut report = Vec::new();
    say(
        &mut report,
        format!(
            "{method:?}: uninterrupted run {:.2} s, {steps} steps, a checkpoint every step",
            wall.as_secs_f64()
        ),
    );

    let mut rng = StdRng::seed_from_u64(seed);
    let mut kills = 0;
    let mut during_write = 0;
    for attempt in 0..10 * KILLS {
        if kills == KILLS {
            break;
        }
        let since = SystemTime::now();
        let mut child = start(setup, &config_path, &killed);
        let started = Instant::now();
        // Odd attempts wait for a checkpoint folder to appear and kill at
        // once; even ones at a seeded moment within a fraction of the run.
        let when = if attempt % 2 == 1 {
            while half_written(&killed, since).is_none() && child.try_wait().unwrap().is_none() {}
            started.elapsed()
        } else {
            // A fraction of what is left of the run: a resumed run has
            // fewer steps to go, and a delay drawn from the whole run's
            // time let it finish first, so that no later attempt could kill
            // it (seen on SmolLM2's 8 steps).
            let left = 1.0 - done_steps(&killed) as f64 / steps as f64;
            let delay = wall.mul_f64(rng.random_range(delay.clone()) * left);
            while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_micros(200));
            }
            started.elapsed()
        };
        if child.try_wait().unwrap().is_some() {
            say(
                &mut report,
                format!("  attempt {attempt}: the run ended before the kill"),
            );
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let caught = half_written(&killed, since).is_some();
        during_write += caught as usize;
        say(
            &mut report,
            format!(
                "  kill {kills}: SIGKILL after {:.3} s{}; newest checkpoint: {}",
                when.as_secs_f64(),
                if caught {
                    ", a checkpoint folder half-written"
                } else {
                    ""
                },
                checkpoint_step(&killed)
            ),
        );
    }
    assert_eq!(kills, KILLS, "{method:?}: only {kills} kills landed");
    assert!(
        during_write > 0,
        "{method:?}: no kill landed while a checkpoint was being written"
    );
    let status = start(setup, &config_path, &killed).wait().unwrap();
    assert!(status.success(), "{method:?}: the resumed run failed");
    let differ = differing_files(&whole, &killed);
    let files = run_files(&whole);
    say(&mut report, format!(
        "  resumed to the end: {} files compared byte for byte (adapters, adamw.bin, state.json, metrics.jsonl, config.json), {} differ; {during_write} of {kills} kills during a checkpoint write",
        files.len(),
        differ.len()
    ));
    for kind in ["adapter_model.safetensors", "adamw.bin", "state.json", "metrics.jsonl"] {
        assert!(
            files.iter().any(|p| p.ends_with(kind)),
            "{method:?}: no {kind} in {files:?}"
        );
    }
    assert!(differ.is_empty(), "{method:?}: differ after {kills} kills: {differ:?}");
    report
}

#[test]
fn training_killed_again_and_again_ends_with_the_uninterrupted_runs_bytes() {
    let setup = tiny_setup();
    let mut report = Vec::new();
    for (k, method) in [Method::Lora, Method::Blob, Method::MeLora, Method::Ens]
        .into_iter()
        .enumerate()
    {
        report.extend(chaos(&setup, method, 60, 0.02..0.15, k as u64));
    }
    println!("\nsummary\n{}", report.join("\n"));
    std::fs::remove_dir_all(&setup.root).ok();
}

#[test]
#[ignore = "needs the fetched model and data: run `melora fetch`, then `cargo test --workspace -- --ignored`"]
fn smollm2_training_killed_again_and_again_ends_with_the_uninterrupted_runs_bytes() {
    let assets = Assets::from_env();
    assert!(
        assets.smollm2_gguf().is_file(),
        "{} is absent: run `melora fetch` first",
        assets.smollm2_gguf().display()
    );
    let root = std::env::temp_dir().join(format!("melora-chaos-smollm2-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let setup = Setup {
        home: assets.home.clone(),
        model: "smollm2-135m".into(),
        root,
        // Scoring 512 ARC-Easy questions would take most of an 8-step
        // run's time, and the kills that land there find no checkpoint.
        objective_examples: 0,
    };
    chaos(&setup, Method::MeLora, 8, 0.2..0.6, 9);
    std::fs::remove_dir_all(&setup.root).ok();
}
