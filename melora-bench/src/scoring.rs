//! `melora-bench scoring`: answer scoring against label scoring on the same
//! ARC-Easy questions of the fetched data, in one run: tokens computed per
//! question (padding included) and seconds per question, for a LoRA training
//! step (batch of `batch` questions) and for an evaluation pass (mean
//! weights), rounds alternating between the two scorings.

use crate::backend::{self, Train};
use crate::step::peak_rss_mib;
use anyhow::Result;
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use melora_core::{NoiseSource, Sampler, SamplingMode};
use melora_llama::assets::Assets;
use melora_llama::data::length_batches;
use melora_llama::data::{Encoded, LengthNorm, Padding, Scoring, Split, Task};
use melora_llama::model::scoring::Scorer;
use melora_llama::pretrained::Pretrained;
use melora_llama::task::TaskSetup;
use melora_llama::train::{Method, Stepper, TrainConfig};
use serde::Serialize;
use std::time::Instant;

/// The settings of one comparison.
pub struct ScoringArgs {
    /// Questions (the first of a seeded permutation of the split).
    pub questions: usize,
    /// Questions per training step and per evaluation pass.
    pub batch: usize,
    /// Alternating rounds.
    pub rounds: usize,
}

/// One scoring's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct ScoringRow {
    pub scoring: String,
    pub round: usize,
    /// Real tokens per question (what a forward pass must compute).
    pub tokens_per_question: f64,
    /// Tokens computed per question, padding included.
    pub padded_tokens_per_question: f64,
    pub train_seconds_per_question: f64,
    pub eval_seconds_per_question: f64,
    pub peak_rss_mib: Option<f64>,
}

fn time_it(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Train::sync(&backend::device()).map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
    Ok(start.elapsed().as_secs_f64())
}

/// Runs the comparison on ARC-Easy validation questions with SmolLM2-135M.
pub fn run(args: &ScoringArgs) -> Result<Vec<ScoringRow>> {
    anyhow::ensure!(
        args.questions >= args.batch && args.batch > 0,
        "--questions must be at least --batch (> 0)"
    );
    let assets = Assets::from_env();
    anyhow::ensure!(
        assets.is_complete(),
        "SmolLM2-135M and the data are not fetched: run `melora fetch` first"
    );
    let device = backend::device();
    let (base, tokenizer) = Pretrained::load::<Train>("smollm2-135m", &assets, &device)?;
    let mut prepared = Vec::new();
    for scoring in [Scoring::Label, Scoring::Answer] {
        let setup = TaskSetup::new(Task::ArcE, scoring, LengthNorm::None, 300, tokenizer.clone(), &assets)?;
        let examples = setup.split(Split::Validation, Some(args.questions))?;
        prepared.push((scoring, setup.scorer, examples));
    }
    let config = TrainConfig::new()
        .with_method(Method::Lora)
        .with_train_sampling(SamplingMode::Mean)
        .with_steps(10_000)
        .with_lr(1e-4);
    let model = base.with_adapters(&config.adapter(), &config.targets, &mut NoiseSource::seeded(0))?;
    let mut rows = Vec::new();
    for round in 1..=args.rounds {
        for (scoring, scorer, examples) in &prepared {
            let batches = length_batches(examples, &(0..examples.len()).collect::<Vec<_>>(), args.batch);
            let (real, padded) = batches.iter().fold((0, 0), |(r, p), chunk| {
                let batch = scorer.batch(examples, chunk, Padding::Left);
                (
                    r + chunk.iter().map(|&i| examples[i].tokens()).sum::<usize>(),
                    p + batch.padded_tokens(),
                )
            });
            let mut model = model.clone();
            let mut stepper = Stepper::<Train>::new(&config, &model, 10_000);
            let train = time_it(|| {
                for (i, chunk) in batches.iter().enumerate() {
                    let batch = scorer.batch(examples, chunk, Padding::Left);
                    stepper.step(&mut model, &batch, scorer, i, &device)?;
                }
                Ok(())
            })?;
            let valid = model.valid();
            let eval = time_it(|| evaluate(&valid, examples, scorer, args.batch, &device))?;
            let n = examples.len() as f64;
            let row = ScoringRow {
                scoring: format!("{scoring:?}"),
                round,
                tokens_per_question: real as f64 / n,
                padded_tokens_per_question: padded as f64 / n,
                train_seconds_per_question: train / n,
                eval_seconds_per_question: eval / n,
                peak_rss_mib: peak_rss_mib(),
            };
            eprintln!(
                "round {round} {scoring:?}: {:.1} tokens/question ({:.1} padded), train {:.3} s/question, eval {:.3} s/question",
                row.tokens_per_question, row.padded_tokens_per_question, row.train_seconds_per_question, row.eval_seconds_per_question
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

fn evaluate<B: Backend>(
    model: &melora_llama::Llama<B>,
    examples: &[Encoded],
    scorer: &Scorer,
    batch: usize,
    device: &B::Device,
) -> Result<()> {
    for chunk in length_batches(examples, &(0..examples.len()).collect::<Vec<_>>(), batch) {
        let batch = scorer.batch(examples, &chunk, Padding::Left);
        let mut noise = NoiseSource::seeded(0);
        let scores = scorer.scores(model, &batch, &mut Sampler::new(SamplingMode::Mean, &mut noise), device);
        let _: Vec<f32> = scores
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    Ok(())
}

/// The Markdown table, with answer / label ratios per round.
pub fn markdown(rows: &[ScoringRow]) -> String {
    let mut out = String::from(
        "| round | scoring | tokens / question | padded tokens / question | train s / question | eval s / question | peak RSS MiB |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {} |\n",
            r.round,
            r.scoring,
            r.tokens_per_question,
            r.padded_tokens_per_question,
            r.train_seconds_per_question,
            r.eval_seconds_per_question,
            r.peak_rss_mib.map_or("n/a".into(), |m| format!("{m:.0}"))
        ));
    }
    out.push_str("\n| round | answer / label: train time | answer / label: eval time |\n|---:|---:|---:|\n");
    for pair in rows.chunks(2) {
        if let [label, answer] = pair {
            out.push_str(&format!(
                "| {} | {:.2} | {:.2} |\n",
                label.round,
                answer.train_seconds_per_question / label.train_seconds_per_question,
                answer.eval_seconds_per_question / label.eval_seconds_per_question
            ));
        }
    }
    out
}
