//! A study's validation curves, from each training run's `metrics.jsonl`
//! (the mean weights on the validation split at every validation): the
//! baseline method's first seed (the pilot: accuracy, ECE and NLL against
//! the step) and every trained method's first seed (ECE against the step).

use super::spec::{Study, TaskSpec};
use melora_llama::error::{LlamaError, Result};
use melora_llama::report::font_available;
use melora_llama::train::{metrics_records, EvalRecord};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One run's validation records, in step order.
pub struct Curve {
    /// The method's label.
    pub label: String,
    /// Its validation records.
    pub records: Vec<EvalRecord>,
}

/// Reads `metrics.jsonl` in `dir`; `None` when there is none. A last line
/// cut short (a run writing it now) is left out.
pub fn read_metrics(dir: &Path) -> Result<Option<Vec<EvalRecord>>> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let records = metrics_records(&path, &text)?;
    Ok(Some(records.into_iter().map(|(r, _)| r).collect()))
}

/// The folder holding a run's `metrics.jsonl`: its kept record in the
/// results folder, else (still training) its run folder under `runs`.
fn record_dir(study: &Study, t: &TaskSpec, key: &str, seed: u64, runs: Option<&Path>) -> Option<PathBuf> {
    let kept = study
        .results
        .join("runs")
        .join(t.task.name())
        .join(format!("{key}-seed{seed}"));
    if kept.join("metrics.jsonl").is_file() {
        return Some(kept);
    }
    runs.map(|r| study.run_dir(r, t.task, key, seed))
        .filter(|d| d.join("metrics.jsonl").is_file())
}

/// The first seed's curve of every trained method of task `t`, in table
/// order (methods without one left out).
pub fn first_seed_curves(study: &Study, t: &TaskSpec, runs: Option<&Path>) -> Result<Vec<(String, Curve)>> {
    let Some(&seed) = study.task_seeds(t).first() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for m in study.methods.iter().filter(|m| m.train.is_some()) {
        let Some(dir) = record_dir(study, t, &m.key, seed, runs) else {
            continue;
        };
        if let Some(records) = read_metrics(&dir)? {
            if !records.is_empty() {
                out.push((
                    m.key.clone(),
                    Curve {
                        label: m.label.clone(),
                        records,
                    },
                ));
            }
        }
    }
    Ok(out)
}

/// Writes into `dir`: `pilot.md` and `pilot.svg` (the baseline method's
/// first seed: validation accuracy, ECE and NLL against the step) and
/// `validation-ece.svg` (every trained method's first seed), with PNG
/// twins when a font is available. Nothing is written for curves that do
/// not exist yet.
pub fn plot_task(study: &Study, t: &TaskSpec, runs: Option<&Path>, dir: &Path) -> Result<()> {
    let curves = first_seed_curves(study, t, runs)?;
    if curves.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| LlamaError::write(dir, e))?;
    let text = font_available();
    let draw = |name: &str,
                size: (u32, u32),
                f: &dyn Fn(DrawingArea<SVGBackend, Shift>) -> std::result::Result<(), String>|
     -> Result<()> {
        let svg = dir.join(format!("{name}.svg"));
        f(SVGBackend::new(&svg, size).into_drawing_area()).map_err(|e| LlamaError::format(&svg, e))
    };
    let draw_png = |name: &str,
                    size: (u32, u32),
                    f: &dyn Fn(DrawingArea<BitMapBackend, Shift>) -> std::result::Result<(), String>|
     -> Result<()> {
        let png = dir.join(format!("{name}.png"));
        f(BitMapBackend::new(&png, size).into_drawing_area()).map_err(|e| LlamaError::format(&png, e))
    };
    let title = t.task.title();
    if let Some((_, pilot)) = curves.iter().find(|(k, _)| *k == study.compare.baseline) {
        melora_llama::assets::write_atomic(&dir.join("pilot.md"), pilot_table(pilot, title).as_bytes())?;
        let panels: [(&str, fn(&EvalRecord) -> f64); 3] = [
            ("accuracy (%)", |r| 100.0 * r.metrics.accuracy),
            ("ECE (%)", |r| 100.0 * r.metrics.ece),
            ("NLL", |r| r.metrics.nll),
        ];
        let caption = format!("{}: validation, {title}", pilot.label);
        draw("pilot", (960, 360), &|area| {
            panels_plot(area, pilot, &panels, &caption, text)
        })?;
        if text {
            draw_png("pilot", (960, 360), &|area| {
                panels_plot(area, pilot, &panels, &caption, text)
            })?;
        }
    }
    let caption = format!("validation ECE (%), first seed, {title}");
    draw("validation-ece", (720, 480), &|area| {
        ece_plot(area, &curves, &caption, text)
    })?;
    if text {
        draw_png("validation-ece", (720, 480), &|area| {
            ece_plot(area, &curves, &caption, text)
        })?;
    }
    Ok(())
}

/// The pilot's curve as a Markdown table.
fn pilot_table(curve: &Curve, title: &str) -> String {
    let mut out = format!(
        "{}, {title}: the mean weights on the validation split at each validation.\n\n\
         | step | ACC (%) | ECE (%) | NLL | Brier | training NLL (since the last validation) |\n|---:|---:|---:|---:|---:|---:|\n",
        curve.label
    );
    for r in &curve.records {
        let m = &r.metrics;
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.4} | {:.4} | {:.4} |\n",
            r.step,
            100.0 * m.accuracy,
            100.0 * m.ece,
            m.nll,
            m.brier,
            r.train_nll
        ));
    }
    out
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A value's range with a margin, for an axis.
fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.1).max(1e-3);
    (lo - pad)..(hi + pad)
}

/// `y` raised at the top so that a legend of `series` lines in the upper
/// corner covers no data: each line of it takes about a twentieth of the
/// plot's height, and the data keep the part below.
fn with_legend_room(y: std::ops::Range<f64>, series: usize) -> std::ops::Range<f64> {
    let legend = (0.05 + 0.05 * series as f64).min(0.6);
    y.start..y.start + (y.end - y.start) / (1.0 - legend)
}

/// Side by side, one panel per metric of one curve.
fn panels_plot<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    curve: &Curve,
    panels: &[(&str, fn(&EvalRecord) -> f64)],
    caption: &str,
    text: bool,
) -> std::result::Result<(), String> {
    area.fill(&WHITE).map_err(err)?;
    let area = if text {
        area.titled(caption, ("sans-serif", 18)).map_err(err)?
    } else {
        area
    };
    let steps = curve.records.iter().map(|r| r.step as f64).fold(1.0, f64::max);
    for (panel, (name, f)) in area.split_evenly((1, panels.len())).into_iter().zip(panels) {
        let mut builder = ChartBuilder::on(&panel);
        builder.margin(10);
        if text {
            builder.x_label_area_size(32).y_label_area_size(64);
        }
        let mut chart = builder
            .build_cartesian_2d(0f64..steps, range(curve.records.iter().map(f)))
            .map_err(err)?;
        if text {
            chart
                .configure_mesh()
                .x_desc("step")
                .y_desc(*name)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.2}"))
                .draw()
                .map_err(err)?;
        }
        let points = curve.records.iter().map(|r| (r.step as f64, f(r)));
        chart
            .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
            .map_err(err)?;
        chart
            .draw_series(points.map(|p| Circle::new(p, 3, BLUE.filled())))
            .map_err(err)?;
    }
    area.present().map_err(err)
}

/// Draws one line per named series on `chart`, each in its own colour,
/// with a legend at `position` when there is text; the pilot plots share it.
pub fn draw_lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: &[(String, Vec<(f64, f64)>)],
    text: bool,
    position: SeriesLabelPosition,
) -> std::result::Result<(), String>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (k, (name, points)) in lines.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let series = chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(err)?;
        if text {
            series
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(position)
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// Validation ECE against the step, one line per method.
fn ece_plot<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    curves: &[(String, Curve)],
    caption: &str,
    text: bool,
) -> std::result::Result<(), String> {
    area.fill(&WHITE).map_err(err)?;
    let steps = curves
        .iter()
        .flat_map(|(_, c)| c.records.iter().map(|r| r.step as f64))
        .fold(1.0, f64::max);
    let y = range(
        curves
            .iter()
            .flat_map(|(_, c)| c.records.iter().map(|r| 100.0 * r.metrics.ece)),
    );
    let y = if text { with_legend_room(y, curves.len()) } else { y };
    let mut builder = ChartBuilder::on(&area);
    builder.margin(12);
    if text {
        builder
            .caption(caption, ("sans-serif", 18))
            .x_label_area_size(36)
            .y_label_area_size(48);
    }
    let mut chart = builder.build_cartesian_2d(0f64..steps, y).map_err(err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("validation ECE (%)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(err)?;
    }
    let lines: Vec<(String, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|(_, c)| {
            let points = c
                .records
                .iter()
                .map(|r| (r.step as f64, 100.0 * r.metrics.ece))
                .collect();
            (c.label.clone(), points)
        })
        .collect();
    draw_lines(&mut chart, &lines, text, SeriesLabelPosition::UpperRight)?;
    area.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::with_legend_room;

    #[test]
    fn the_legend_room_keeps_the_data_below_the_legend() {
        // The data's top, as a fraction of the plot's height from below,
        // worked out by hand: a legend of n lines takes (n + 1) / 20 of the
        // height, at most 60%.
        for (series, top) in [(1, 0.90), (3, 0.80), (6, 0.65), (20, 0.40)] {
            let y = with_legend_room(2.0..12.0, series);
            assert_eq!(y.start, 2.0);
            let got = (12.0 - y.start) / (y.end - y.start);
            assert!(
                (got - top).abs() < 1e-12,
                "{series} series: data up to {got}, not {top}"
            );
        }
    }
}
