//! Evaluation outputs: a results table (Markdown and JSON), every sample's
//! probabilities (`predictions-<k>.json`), the out-of-distribution
//! detection AUROC (`ood.json`) and a reliability diagram per row (SVG
//! always; PNG too when a TrueType font is found for the labels).

use crate::assets::write_atomic;
use crate::error::{LlamaError, Result};
use crate::eval::SampledProbs;
use crate::posterior::PosteriorStats;
use melora_core::metrics::ReliabilityBin;
use melora_core::{auroc, ClassProbs, Metrics};
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

/// The posterior's spread in an evaluation, and the decomposition of its
/// predictive uncertainty (a deterministic prediction: no spread, all of
/// it aleatoric).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// The mean posterior standard deviation of the adapters' random
    /// matrices (Me-LoRA's `C`, BLoB's `A`); `None` when the weights are not
    /// random (MC dropout).
    pub posterior_std: Option<f64>,
    /// That std over the root mean square of the corresponding means
    /// ([`crate::posterior::StdSummary::relative`]).
    #[serde(default)]
    pub std_relative: Option<f64>,
    /// The mean posterior std at the start of training (a training run's
    /// checkpoint records it).
    #[serde(default)]
    pub std_init: Option<f64>,
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

impl Spread {
    /// The spread of `sampled`, with the model's posterior `stats`
    /// ([`PosteriorStats::of`]; `None` for weights that are not random)
    /// and the mean posterior std the training started from.
    pub fn of(sampled: &SampledProbs, stats: Option<&PosteriorStats>, std_init: Option<f64>) -> Self {
        let (total, aleatoric, epistemic) = sampled.uncertainty();
        Self {
            posterior_std: stats.map(|s| s.all.mean),
            std_relative: stats.map(|s| s.all.relative),
            std_init,
            gold_std: sampled.gold_std(),
            total,
            aleatoric,
            epistemic,
        }
    }
}

/// How well one score tells out-of-distribution examples (positives) from
/// in-distribution ones: the AUROC of each example's total predictive
/// entropy and of its epistemic part (`None` where the prediction has one
/// sample, whose epistemic part is 0 everywhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OodDetection {
    /// The in-distribution task.
    pub in_distribution: String,
    /// The out-of-distribution tasks (pooled when several).
    pub out_of_distribution: Vec<String>,
    /// In-distribution examples.
    pub n_in: usize,
    /// Out-of-distribution examples.
    pub n_out: usize,
    /// The AUROC of the total predictive entropy.
    pub auroc_total: Option<f64>,
    /// The AUROC of the epistemic part (mutual information).
    pub auroc_epistemic: Option<f64>,
}

impl OodDetection {
    /// The detection of `ood` (pooled) against `id`.
    pub fn new(id: (&str, &SampledProbs), ood: &[(&str, &SampledProbs)]) -> Self {
        let inside = id.1.per_example();
        let outside: Vec<_> = ood.iter().flat_map(|(_, p)| p.per_example()).collect();
        let score = |f: fn(&melora_core::Uncertainty) -> f64| {
            let pos: Vec<f64> = outside.iter().map(f).collect();
            let neg: Vec<f64> = inside.iter().map(f).collect();
            auroc(&pos, &neg)
        };
        let sampled = id.1.samples > 1 && ood.iter().all(|(_, p)| p.samples > 1);
        Self {
            in_distribution: id.0.to_string(),
            out_of_distribution: ood.iter().map(|(t, _)| t.to_string()).collect(),
            n_in: inside.len(),
            n_out: outside.len(),
            auroc_total: score(|u| u.total),
            auroc_epistemic: if sampled { score(|u| u.epistemic) } else { None },
        }
    }
}

/// The detection of each out-of-distribution set against `id`, then of
/// all of them pooled (when there are several).
pub fn ood_detection(id: (&str, &SampledProbs), ood: &[(&str, &SampledProbs)]) -> Vec<OodDetection> {
    let mut out: Vec<OodDetection> = ood
        .iter()
        .map(|o| OodDetection::new(id, std::slice::from_ref(o)))
        .collect();
    if ood.len() > 1 {
        out.push(OodDetection::new(id, ood));
    }
    out
}

/// The Markdown table of out-of-distribution detection results.
pub fn ood_markdown(rows: &[OodDetection]) -> String {
    let mut out = String::from(
        "| in distribution | out of distribution | n in | n out | AUROC, total entropy | AUROC, epistemic |\n|---|---|---:|---:|---:|---:|\n",
    );
    let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.4}", v));
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.in_distribution,
            r.out_of_distribution.join(" + "),
            r.n_in,
            r.n_out,
            cell(r.auroc_total),
            cell(r.auroc_epistemic)
        ));
    }
    out
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

/// The Markdown table of `rows` (ACC and ECE in %, NLL, Brier; the mean
/// posterior std of the random weights at the start of training and now,
/// now relative to the size of their means, the std across samples of the
/// gold choice's probability, and the predictive entropy with its
/// aleatoric and epistemic parts, each a mean over examples).
pub fn markdown(rows: &[ResultRow]) -> String {
    let mut out = String::from(
        "| model | task | split | n | S | ACC (%) | ECE (%) | NLL | Brier | posterior std at init | posterior std | std / rms mean | std of p(gold) | total (nats) | aleatoric (nats) | epistemic (nats) |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let m = &r.metrics;
        let spread = match &r.spread {
            Some(s) => format!(
                "{} | {} | {} | {} | {} | {} | {}",
                s.std_init.map_or("-".into(), small),
                s.posterior_std.map_or("-".into(), small),
                s.std_relative.map_or("-".into(), small),
                small(s.gold_std),
                small(s.total),
                small(s.aleatoric),
                small(s.epistemic)
            ),
            None => "- | - | - | - | - | - | -".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.4} | {:.4} | {spread} |\n",
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

/// Four decimals, or scientific notation for values too small to show in
/// them (an epistemic part of 1e-5 nats is not 0).
fn small(v: f64) -> String {
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else {
        format!("{v:.4}")
    }
}

/// [`write_results`], then every row's sample probabilities
/// (`predictions-<k>.json`, a [`SampledProbs`]) and, when there are
/// out-of-distribution rows, `ood.json` with their table appended to
/// `results.md`.
pub fn write_evaluation(
    dir: &Path,
    rows: &[ResultRow],
    sampled: &[&SampledProbs],
    ood: &[OodDetection],
) -> Result<Vec<PathBuf>> {
    let files = write_results(dir, rows)?;
    for (k, probs) in sampled.iter().enumerate() {
        let text = serde_json::to_string(*probs).map_err(|e| LlamaError::serialize("sample probabilities", e))?;
        write_atomic(&dir.join(format!("predictions-{k}.json")), text.as_bytes())?;
    }
    if !ood.is_empty() {
        write_atomic(&dir.join("ood.json"), to_json(&ood)?.as_bytes())?;
        let table = format!("{}\n{}", markdown(rows), ood_markdown(ood));
        write_atomic(&dir.join("results.md"), table.as_bytes())?;
    }
    Ok(files)
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string_pretty(value).map_err(|e| LlamaError::serialize("a JSON result", e))
}

/// Writes `results.json`, `results.md` and one reliability diagram per row
/// (`reliability-<k>.svg`, and `.png` when a font is available) into `dir`.
/// Returns the diagram files written.
pub fn write_results(dir: &Path, rows: &[ResultRow]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| LlamaError::write(dir, e))?;
    let json = serde_json::to_string_pretty(rows).map_err(|e| LlamaError::serialize("results.json", e))?;
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
pub fn font_available() -> bool {
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

/// `name` + `tail`, the start of `name` elided ("…") as far as needed for
/// `fits` (a run folder's path can be wider than the diagram); the tail
/// (task, split, ECE) is kept whole.
fn fitted_title(name: &str, tail: &str, fits: impl Fn(&str) -> bool) -> String {
    let whole = format!("{name}{tail}");
    if fits(&whole) {
        return whole;
    }
    let starts = name.char_indices().map(|(i, _)| i).skip(1);
    starts
        .map(|i| format!("…{}{tail}", &name[i..]))
        .find(|t| fits(t))
        .unwrap_or_else(|| format!("…{tail}"))
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
        let tail = format!(" on {} {}: ECE {:.2}%", row.task, row.split, 100.0 * row.metrics.ece);
        let font = ("sans-serif", 16).into_font();
        let style = TextStyle::from(font.clone());
        let width = area.dim_in_pixel().0.saturating_sub(24);
        let title = fitted_title(&row.name, &tail, |t| {
            area.estimate_text_size(t, &style).map_or(true, |(w, _)| w <= width)
        });
        builder.caption(title, font).x_label_area_size(36).y_label_area_size(44);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(|e| err(&e))?;
    if text {
        chart
            .configure_mesh()
            .x_desc("confidence")
            .y_desc("accuracy")
            .disable_mesh()
            .draw()
            .map_err(|e| err(&e))?;
    }
    // Bars: the accuracy of each non-empty bin; the gap to the diagonal is the miscalibration.
    chart
        .draw_series(
            row.reliability
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| Rectangle::new([(b.lower, 0.0), (b.upper, b.accuracy)], BLUE.mix(0.6).filled())),
        )
        .map_err(|e| err(&e))?;
    chart
        .draw_series(row.reliability.iter().filter(|b| b.count > 0).map(|b| {
            Rectangle::new(
                [
                    (b.lower, b.accuracy.min(b.confidence)),
                    (b.upper, b.accuracy.max(b.confidence)),
                ],
                RED.mix(0.3).filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.stroke_width(1)))
        .map_err(|e| err(&e))?;
    area.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_title_loses_the_start_of_its_name_not_its_metrics() {
        let fits = |t: &str| t.chars().count() <= 30;
        let tail = " on files test: ECE 3.85%";
        assert_eq!(fitted_title("best", tail, fits), "best on files test: ECE 3.85%");
        assert_eq!(
            fitted_title("runs/x/best", tail, fits),
            "…best on files test: ECE 3.85%"
        );
        assert_eq!(
            fitted_title("runs/x/best", tail, |_| false),
            "… on files test: ECE 3.85%"
        );
        assert_eq!(
            fitted_title("ünïcode/best", tail, fits),
            "…best on files test: ECE 3.85%"
        );
    }

    fn probs(p: &[f64], samples: usize) -> SampledProbs {
        SampledProbs {
            probs: p.to_vec(),
            samples,
            classes: 2,
            labels: vec![0; p.len() / (2 * samples)],
        }
    }

    #[test]
    fn ood_detection_per_task_then_pooled() {
        // In distribution: confident; OOD task a: uncertain (detected), b: as confident (not).
        let id = probs(&[0.99, 0.01, 0.95, 0.05], 1);
        let a = probs(&[0.5, 0.5, 0.6, 0.4], 1);
        let b = probs(&[0.99, 0.01, 0.95, 0.05], 1);
        let rows = ood_detection(("arc-e", &id), &[("a", &a), ("b", &b)]);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].auroc_total, rows[1].auroc_total), (Some(1.0), Some(0.5)));
        // Pooled, 8 pairs: a's two beat both negatives (4); b's copies of the
        // negatives each tie their twin (2 x 1/2) and the less confident
        // one beats the more confident negative (1).
        assert_eq!(
            (rows[2].n_in, rows[2].n_out, rows[2].auroc_total),
            (2, 4, Some(6.0 / 8.0))
        );
        // One sample: no epistemic part to rank by.
        assert!(rows.iter().all(|r| r.auroc_epistemic.is_none()));
        let sampled = ood_detection(
            ("arc-e", &probs(&[0.9, 0.1, 0.9, 0.1], 2)),
            &[("a", &probs(&[0.9, 0.1, 0.1, 0.9], 2))],
        );
        assert_eq!(sampled[0].auroc_epistemic, Some(1.0));
        assert!(ood_markdown(&rows).contains("| arc-e | a + b | 2 | 4 | 0.7500 | - |"));
    }
}
