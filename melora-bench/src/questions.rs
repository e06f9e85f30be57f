//! `melora-bench questions`: how long a user's question file of `n`
//! questions takes to read and check (`data::files::read_question_file`), as
//! JSONL, CSV and snappy Parquet: the same seeded questions in each.

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use melora_llama::data::files::{read_question_file, Question};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One format's timing.
#[derive(Debug, serde::Serialize)]
pub struct Timing {
    /// jsonl, csv or parquet.
    pub format: &'static str,
    /// The file's size.
    pub bytes: u64,
    /// The fastest of the rounds, in seconds.
    pub seconds: f64,
    /// Questions per second at that time.
    pub questions_per_second: f64,
}

/// `n` seeded questions: 10 to 40 words, 2 to 5 choices of 1 to 6 words,
/// every other one with an id, a tenth with a context.
fn questions(n: usize, seed: u64) -> Vec<Question> {
    const WORDS: [&str; 16] = [
        "patient",
        "pain",
        "triage",
        "urgent",
        "which",
        "of",
        "the",
        "following",
        "is",
        "dose",
        "fever",
        "chest",
        "hours",
        "after",
        "not",
        "most",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let words = |rng: &mut StdRng, k: usize| -> String {
        (0..k)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    (0..n)
        .map(|i| {
            let k = rng.random_range(10..41);
            let question = words(&mut rng, k);
            let n_choices = rng.random_range(2..6);
            let choices = (0..n_choices)
                .map(|c| {
                    let k = rng.random_range(1..7);
                    format!("{c} {}", words(&mut rng, k))
                })
                .collect();
            let context = (i % 10 == 0).then(|| {
                let k = rng.random_range(20..60);
                words(&mut rng, k)
            });
            Question {
                id: (i % 2 == 0).then(|| format!("q{i}")),
                question,
                context,
                choices,
                answer: rng.random_range(0..n_choices),
            }
        })
        .collect()
}

fn write_jsonl(path: &Path, qs: &[Question]) -> anyhow::Result<()> {
    let mut out = String::new();
    for q in qs {
        let mut v = serde_json::json!({"question": q.question, "choices": q.choices, "answer": q.answer});
        if let Some(id) = &q.id {
            v["id"] = id.clone().into();
        }
        if let Some(c) = &q.context {
            v["context"] = c.clone().into();
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    Ok(std::fs::write(path, out)?)
}

fn write_csv(path: &Path, qs: &[Question]) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["id", "question", "context", "choices", "answer"])?;
    for q in qs {
        let answer = q.answer.to_string();
        let choices = q.choices.join("|");
        w.write_record([
            q.id.as_deref().unwrap_or(""),
            &q.question,
            q.context.as_deref().unwrap_or(""),
            &choices,
            &answer,
        ])?;
    }
    Ok(w.flush()?)
}

fn write_parquet(path: &Path, qs: &[Question]) -> anyhow::Result<()> {
    let mut choices = ListBuilder::new(StringBuilder::new());
    for q in qs {
        for c in &q.choices {
            choices.values().append_value(c);
        }
        choices.append(true);
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "id",
            Arc::new(StringArray::from(qs.iter().map(|q| q.id.clone()).collect::<Vec<_>>())),
        ),
        (
            "question",
            Arc::new(StringArray::from(
                qs.iter().map(|q| q.question.clone()).collect::<Vec<_>>(),
            )),
        ),
        (
            "context",
            Arc::new(StringArray::from(
                qs.iter().map(|q| q.context.clone()).collect::<Vec<_>>(),
            )),
        ),
        ("choices", Arc::new(choices.finish())),
        (
            "answer",
            Arc::new(Int64Array::from(qs.iter().map(|q| q.answer as i64).collect::<Vec<_>>())),
        ),
    ];
    let batch = RecordBatch::try_from_iter(columns)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, batch.schema(), Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

/// Writes the `n` questions in each format under a temporary folder and
/// times reading each back (the fastest of `rounds`), checking that every
/// format reads back to the questions written.
pub fn run(n: usize, rounds: usize) -> anyhow::Result<Vec<Timing>> {
    let qs = questions(n, 0);
    let dir = std::env::temp_dir().join(format!("melora-bench-questions-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut out = Vec::new();
    type Writer = fn(&Path, &[Question]) -> anyhow::Result<()>;
    let formats: [(&str, &str, Writer); 3] = [
        ("jsonl", "q.jsonl", write_jsonl),
        ("csv", "q.csv", write_csv),
        ("parquet", "q.parquet", write_parquet),
    ];
    for (format, name, write) in formats {
        let path = dir.join(name);
        write(&path, &qs)?;
        let mut best = f64::INFINITY;
        for _ in 0..rounds.max(1) {
            let start = Instant::now();
            let read = read_question_file(&path)?;
            best = best.min(start.elapsed().as_secs_f64());
            anyhow::ensure!(
                read == qs,
                "{format}: the questions read back differ from those written"
            );
        }
        out.push(Timing {
            format,
            bytes: std::fs::metadata(&path)?.len(),
            seconds: best,
            questions_per_second: n as f64 / best,
        });
    }
    std::fs::remove_dir_all(&dir).ok();
    Ok(out)
}
