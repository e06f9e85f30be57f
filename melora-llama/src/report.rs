//! Evaluation outputs: a results table (Markdown and JSON) and a reliability
//! diagram (SVG always; PNG too when a TrueType font is found for the labels).

use crate::assets::write_atomic;
use crate::error::{LlamaError, Result};
use melora_core::metrics::ReliabilityBin;
use melora_core::{ClassProbs, Metrics};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One row of a results table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    /// What was evaluated ("zero-shot", "Me-LoRA (S = 10)", ...).
    pub name: String,
    /// The task.
    pub task: String,
    /// The split.
    pub split: String,
    /// Samples in the model average.
    pub samples: usize,
    /// The metrics.
    pub metrics: Metrics,
    /// The reliability diagram's bins.
    pub reliability: Vec<ReliabilityBin>,
    /// How much the samples of a sampled prediction differ (S > 1).
    #[serde(default)]
    pub spread: Option<Spread>,
}

/// The posterior's spread in a sampled evaluation (issue 14, item 4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// The mean posterior standard deviation of the adapters' random
    /// matrices (Me-LoRA's `C`, BLoB's `A`); `None` when the weights are not
    /// random (MC dropout).
    pub posterior_std: Option<f64>,
    /// The mean over examples of the standard deviation across samples of
    /// the gold choice's probability.
    pub gold_std: f64,
    /// Mean entropy of the averaged prediction (total uncertainty).
    pub total: f64,
    /// Mean entropy of the samples (aleatoric).
    pub aleatoric: f64,
    /// Their difference, the mutual information (epistemic).
    pub epistemic: f64,
}

impl ResultRow {
    /// A row from predictions.
    pub fn new(name: &str, task: &str, split: &str, samples: usize, probs: &ClassProbs) -> Self {
        Self {
            name: name.into(),
            task: task.into(),
            split: split.into(),
            samples,
            metrics: probs.metrics(),
            reliability: probs.reliability(melora_core::metrics::ECE_BINS),
            spread: None,
        }
    }
}

/// The Markdown table of `rows` (ACC and ECE in %, NLL, Brier; for
/// sampled predictions the posterior std of the random weights, the std
/// across samples of the gold choice's probability and the epistemic part
/// of the predictive entropy).
pub fn markdown(rows: &[ResultRow]) -> String {
    let mut out = String::from(
        "| model | task | split | n | S | ACC (%) | ECE (%) | NLL | Brier | posterior std | std of p(gold) | epistemic (nats) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let m = &r.metrics;
        let (posterior, gold, epistemic) = match &r.spread {
            Some(s) => (
                s.posterior_std.map_or("-".into(), |v| format!("{v:.4}")),
                format!("{:.4}", s.gold_std),
                format!("{:.4}", s.epistemic),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.4} | {:.4} | {posterior} | {gold} | {epistemic} |\n",
            r.name,
            r.task,
            r.split,
            m.count,
            r.samples,
            100.0 * m.accuracy,
            100.0 * m.ece,
            m.nll,
            m.brier
        ));
    }
    out
}

/// Writes `results.json`, `results.md` and one reliability diagram per row
/// (`reliability-<k>.svg`, and `.png` when a font is available) into `dir`.
/// Returns the diagram files written.
pub fn write_results(dir: &Path, rows: &[ResultRow]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LlamaError::io(dir, e))?;
    let json = serde_json::to_string_pretty(rows).map_err(|e| LlamaError::Config(e.to_string()))?;
    write_atomic(&dir.join("results.json"), json.as_bytes())?;
    write_atomic(&dir.join("results.md"), markdown(rows).as_bytes())?;
    let mut files = Vec::new();
    let text = font_available();
    for (k, row) in rows.iter().enumerate() {
        let stem = format!("reliability-{k}");
        let svg = dir.join(format!("{stem}.svg"));
        reliability_diagram(SVGBackend::new(&svg, (480, 480)).into_drawing_area(), row, text)
            .map_err(|e| LlamaError::format(&svg, e))?;
        files.push(svg);
        if text {
            let png = dir.join(format!("{stem}.png"));
            reliability_diagram(BitMapBackend::new(&png, (480, 480)).into_drawing_area(), row, text)
                .map_err(|e| LlamaError::format(&png, e))?;
            files.push(png);
        }
    }
    Ok(files)
}

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
];

/// Registers a system TrueType font for PNG text, once; whether one was found.
fn font_available() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|path| match std::fs::read(path) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            }
            Err(_) => false,
        })
    })
}

/// Draws the diagram; without a font (`text` false) the caption and axis
/// labels are left out (the bars and the diagonal remain).
fn reliability_diagram<DB: DrawingBackend>(
    area: DrawingArea<DB, plotters::coord::Shift>,
    row: &ResultRow,
    text: bool,
) -> std::result::Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    area.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&area);
    builder.margin(12);
    if text {
        let title = format!("{} on {} {}: ECE {:.2}%", row.name, row.task, row.split, 100.0 * row.metrics.ece);
        builder.caption(title, ("sans-serif", 16)).x_label_area_size(36).y_label_area_size(44);
    }
    let mut chart = builder.build_cartesian_2d(0f64..1f64, 0f64..1f64).map_err(|e| err(&e))?;
    if text {
        chart.configure_mesh().x_desc("confidence").y_desc("accuracy").disable_mesh().draw().map_err(|e| err(&e))?;
    }
    // Bars: the accuracy of each non-empty bin; the gap to the diagonal is the miscalibration.
    chart
        .draw_series(row.reliability.iter().filter(|b| b.count > 0).map(|b| {
            Rectangle::new([(b.lower, 0.0), (b.upper, b.accuracy)], BLUE.mix(0.6).filled())
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(row.reliability.iter().filter(|b| b.count > 0).map(|b| {
            Rectangle::new([(b.lower, b.accuracy.min(b.confidence)), (b.upper, b.accuracy.max(b.confidence))], RED.mix(0.3).filled())
        }))
        .map_err(|e| err(&e))?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.stroke_width(1))).map_err(|e| err(&e))?;
    area.present().map_err(|e| err(&e))?;
    Ok(())
}
