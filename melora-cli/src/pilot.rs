//! `melora posterior-report`: the posterior pilot's plot and table
//! (experiments/posterior/pilot.sh) from the files each run keeps: its
//! mean posterior std after every step (`std.tsv`), its evaluation
//! (`results.json`) and its verdict (`verdict.txt`).

use anyhow::{bail, Context, Result};
use melora_cli::out;
use melora_cli::study::curves::draw_lines;
use melora_llama::posterior::verdict_word;
use melora_llama::report::{font_available, markdown, ResultRow};
use plotters::prelude::*;
use std::path::Path;

/// One run's curve and evaluation.
struct Run {
    name: String,
    curve: Vec<(f64, f64)>,
    row: Option<ResultRow>,
    verdict: String,
}

fn read_run(dir: &Path) -> Result<Run> {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?").to_string();
    let tsv = dir.join("std.tsv");
    let text = std::fs::read_to_string(&tsv).with_context(|| format!("reading {}", tsv.display()))?;
    let mut curve = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace().map(str::parse::<f64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(step)), Some(Ok(std))) => curve.push((step, std)),
            _ => bail!("{} line {}: expected `step std`, found {line:?}", tsv.display(), i + 1),
        }
    }
    let results = dir.join("results.json");
    let row = match std::fs::read_to_string(&results) {
        Ok(text) => {
            let rows: Vec<ResultRow> =
                serde_json::from_str(&text).with_context(|| format!("reading {}", results.display()))?;
            rows.into_iter().next()
        }
        Err(_) => None,
    };
    let kept = std::fs::read_to_string(dir.join("verdict.txt")).unwrap_or_default();
    let verdict = verdict_word(&kept).unwrap_or("-").to_string();
    Ok(Run {
        name,
        curve,
        row,
        verdict,
    })
}

/// Reads every run folder under `runs` (those with a `std.tsv`), writes
/// `std.svg` (and `std.png` when a font is available) and `table.md` into
/// `out`, and prints the table.
pub fn posterior_report(runs: &Path, out: &Path) -> Result<()> {
    let mut dirs: Vec<_> = std::fs::read_dir(runs)
        .with_context(|| format!("reading {}", runs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("std.tsv").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!("no run with a std.tsv under {}", runs.display());
    }
    let runs: Vec<Run> = dirs.iter().map(|d| read_run(d)).collect::<Result<_>>()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let text = font_available();
    let svg = out.join("std.svg");
    plot(SVGBackend::new(&svg, (720, 480)).into_drawing_area(), &runs, text).map_err(anyhow::Error::msg)?;
    if text {
        let png = out.join("std.png");
        plot(BitMapBackend::new(&png, (720, 480)).into_drawing_area(), &runs, text).map_err(anyhow::Error::msg)?;
    }
    let table = table(&runs);
    std::fs::write(out.join("table.md"), &table)
        .with_context(|| format!("writing {}", out.join("table.md").display()))?;
    out!("{table}")?;
    Ok(())
}

/// The tables: each run's mean posterior std at its first and last step
/// and its verdict, then the evaluations as `melora eval` prints them
/// ([`markdown`], one row per run, named by it).
fn table(runs: &[Run]) -> String {
    let mut out = String::from("| run | std after step 1 | std at the end | verdict |\n|---|---:|---:|---|\n");
    for run in runs {
        let first = run.curve.first().map_or("-".into(), |p| format!("{:.4}", p.1));
        let last = run
            .curve
            .last()
            .map_or("-".into(), |p| format!("{:.4} (step {})", p.1, p.0));
        out.push_str(&format!("| {} | {first} | {last} | {} |\n", run.name, run.verdict));
    }
    let rows: Vec<ResultRow> = runs
        .iter()
        .filter_map(|r| {
            r.row.clone().map(|row| ResultRow {
                name: r.name.clone(),
                ..row
            })
        })
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&markdown(&rows));
    }
    out
}

/// The mean posterior std against the step, one line per run, on a log
/// scale (the stds start near 0.002-0.03 and may end at 0.2).
fn plot<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    runs: &[Run],
    text: bool,
) -> std::result::Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    area.fill(&WHITE).map_err(|e| err(&e))?;
    let steps = runs
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let (low, high) = runs
        .iter()
        .flat_map(|r| r.curve.iter().map(|p| p.1))
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = if low.is_finite() {
        (low / 1.5, high * 1.5)
    } else {
        (1e-3, 1.0)
    };
    let mut builder = ChartBuilder::on(&area);
    builder.margin(12);
    if text {
        builder
            .caption("mean posterior std over training", ("sans-serif", 18))
            .x_label_area_size(36)
            .y_label_area_size(56);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..steps, (low..high).log_scale())
        .map_err(|e| err(&e))?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("mean posterior std")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()
            .map_err(|e| err(&e))?;
    }
    let lines: Vec<(String, Vec<(f64, f64)>)> = runs.iter().map(|r| (r.name.clone(), r.curve.clone())).collect();
    draw_lines(&mut chart, &lines, text, SeriesLabelPosition::LowerRight)?;
    area.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_reads_back_and_tabulates() {
        let dir = std::env::temp_dir().join(format!("melora-pilot-{}", std::process::id()));
        let run = dir.join("blob-default");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("std.tsv"), "1 0.0020\n2 0.0030\n600 0.1500\n").unwrap();
        std::fs::write(
            run.join("verdict.txt"),
            "posterior after step 600: std ...\nposterior: converged: mean std ...\n",
        )
        .unwrap();
        let out = dir.join("out");
        posterior_report(&dir, &out).unwrap();
        let table = std::fs::read_to_string(out.join("table.md")).unwrap();
        assert!(
            table.contains("| blob-default | 0.0020 | 0.1500 (step 600) | converged |"),
            "{table}"
        );
        assert!(out.join("std.svg").is_file());
        std::fs::write(run.join("std.tsv"), "1 x\n").unwrap();
        let err = posterior_report(&dir, &out).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
