//! `melora predict`'s answers: a table, or JSON.

use anyhow::Result;
use melora_cli::outln;
use melora_llama::data::Item;
use melora_llama::predict::Evaluation;

/// Each question's Bayesian-model-average answer (probabilities,
/// prediction, confidence, uncertainty split) as a Markdown table, or as
/// JSON with `json`; with `answered`, whether each is right.
pub fn print(items: &[Item], evaluation: &Evaluation, answered: bool, json: bool) -> Result<()> {
    let n_choices: Vec<usize> = items.iter().map(Item::n_choices).collect();
    let answers = evaluation.sampled.answers(&n_choices);
    let letter = |i: usize| (b'A' + i as u8) as char;
    if json {
        let rows: Vec<serde_json::Value> = items
            .iter()
            .zip(&answers)
            .map(|(item, a)| {
                let Item::Choice { question, choices, label } = item else { unreachable!("questions are multiple choice") };
                let mut row = serde_json::json!({
                    "question": question, "choices": choices, "probabilities": a.probabilities,
                    "prediction": a.prediction, "confidence": a.confidence,
                    "total": a.uncertainty.total, "aleatoric": a.uncertainty.aleatoric, "epistemic": a.uncertainty.epistemic,
                    "samples": evaluation.row.samples,
                });
                if answered {
                    row["answer"] = serde_json::json!(label);
                    row["right"] = serde_json::json!(*label == a.prediction);
                }
                row
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let right = if answered { " right |" } else { "" };
    outln!("| # | question | prediction | confidence | probabilities | total (nats) | aleatoric | epistemic |{right}")?;
    outln!(
        "|---:|---|---|---:|---|---:|---:|---:|{}",
        if answered { "---|" } else { "" }
    )?;
    for (i, (item, a)) in items.iter().zip(&answers).enumerate() {
        let Item::Choice {
            question,
            choices,
            label,
        } = item
        else {
            unreachable!("questions are multiple choice")
        };
        let short: String = if question.chars().count() > 60 {
            question.chars().take(57).chain("...".chars()).collect()
        } else {
            question.clone()
        };
        let probs: Vec<String> = a
            .probabilities
            .iter()
            .enumerate()
            .map(|(k, p)| format!("{} {p:.3}", letter(k)))
            .collect();
        let mark = if !answered {
            String::new()
        } else if *label == a.prediction {
            " yes |".into()
        } else {
            format!(" no ({}) |", letter(*label))
        };
        outln!(
            "| {} | {} | {}) {} | {:.3} | {} | {:.4} | {:.4} | {:.2e} |{mark}",
            i + 1,
            short.replace('|', "\\|").replace('\n', " "),
            letter(a.prediction),
            choices[a.prediction].replace('|', "\\|"),
            a.confidence,
            probs.join(", "),
            a.uncertainty.total,
            a.uncertainty.aleatoric,
            a.uncertainty.epistemic
        )?;
    }
    Ok(())
}
