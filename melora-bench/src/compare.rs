//! `melora-bench compare`: our step and the PyTorch + PEFT peer's step
//! (`peers/peft_step.py`) on the same model and settings, alternating
//! rounds so that both see the same machine load, and the ratios.

use crate::step::{run, StepArgs, StepReport};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// Runs the peer script with `python` and parses its JSON report.
fn peer(python: &Path, args: &StepArgs) -> Result<serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/peft_step.py");
    let output = Command::new(python)
        .arg(&script)
        .args([
            "--model",
            &args.model,
            "--batch",
            &args.batch.to_string(),
            "--seq",
            &args.seq.to_string(),
        ])
        .args([
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
            "--rank",
            &args.rank.to_string(),
        ])
        .args(["--targets", &args.targets, "--seed", &args.seed.to_string()])
        .output()
        .with_context(|| {
            format!(
                "cannot run {}: create the peer environment with melora-bench/peers/setup.sh",
                python.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "the peer failed ({}): {}\n(set it up with melora-bench/peers/setup.sh)",
            output.status,
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("")
        );
    }
    serde_json::from_slice(&output.stdout).context("the peer's output is not JSON")
}

/// `rounds` alternating measurements; returns (ours, theirs) per round.
pub fn compare(python: &Path, args: &StepArgs, rounds: usize) -> Result<Vec<(StepReport, serde_json::Value)>> {
    let mut out = Vec::new();
    for _ in 0..rounds.max(1) {
        let ours = run(args)?;
        let theirs = peer(python, args)?;
        out.push((ours, theirs));
    }
    Ok(out)
}

/// The comparison table (Markdown), with the ratios ours / theirs.
pub fn markdown(results: &[(StepReport, serde_json::Value)]) -> String {
    let mut out = String::from("| round | ours s/step | PyTorch+PEFT s/step | time ratio | ours tok/s | peer tok/s | ours peak RSS MiB | peer peak RSS MiB | memory ratio |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (i, (ours, theirs)) in results.iter().enumerate() {
        let t = theirs["median_seconds"].as_f64().unwrap_or(f64::NAN);
        let tt = theirs["tokens_per_second"].as_f64().unwrap_or(f64::NAN);
        let m = theirs["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
        let ours_m = ours.peak_rss_mib.unwrap_or(f64::NAN);
        out.push_str(&format!(
            "| {} | {:.3} | {t:.3} | {:.2} | {:.0} | {tt:.0} | {ours_m:.0} | {m:.0} | {:.2} |\n",
            i + 1,
            ours.median_seconds,
            ours.median_seconds / t,
            ours.tokens_per_second,
            ours_m / m
        ));
    }
    out
}
