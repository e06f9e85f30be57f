//! Benchmark data written in the real formats (gzipped request JSONL as
//! oe_eval writes it, Arrow IPC streams as `datasets` saves MMLU) and a
//! word-level tokenizer, for the tests that need a task without the
//! fetched data.

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use melora_llama::Tokenizer;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A fresh folder `melora-data-<pid>-<name>` in the temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("melora-data-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn write_gz(path: &Path, lines: &[String]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(path).unwrap(), flate2::Compression::fast());
    for line in lines {
        writeln!(gz, "{line}").unwrap();
    }
    gz.finish().unwrap();
}

/// Request lines as oe_eval writes them: one per choice, the doc repeated.
pub fn requests(docs: &[serde_json::Value], choices_per_doc: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for (doc_id, doc) in docs.iter().enumerate() {
        for idx in 0..choices_per_doc {
            lines
                .push(json!({ "request_type": "loglikelihood", "doc": doc, "doc_id": doc_id, "idx": idx }).to_string());
        }
    }
    lines
}

pub fn arc_doc(i: usize, n_choices: usize) -> serde_json::Value {
    let choices: Vec<String> = (0..n_choices).map(|c| format!("choice {c} of {i}")).collect();
    json!({ "id": format!("Q{i}"), "query": format!("Question: What is item {i}?\nAnswer:"), "choices": choices, "gold": i % n_choices })
}

pub fn write_arrow(path: &Path, rows: &[(&str, [&str; 4], i64)]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let questions = StringArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
    let mut choices = ListBuilder::new(StringBuilder::new());
    for r in rows {
        for c in r.1 {
            choices.values().append_value(c);
        }
        choices.append(true);
    }
    let answers = Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>());
    let batch = RecordBatch::try_from_iter(vec![
        ("question", Arc::new(questions) as ArrayRef),
        ("choices", Arc::new(choices.finish()) as ArrayRef),
        ("answer", Arc::new(answers) as ArrayRef),
    ])
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(file, &batch.schema()).unwrap();
    writer.write(&batch).unwrap();
    writer.finish().unwrap();
}

/// A whole fake `olmo_data` folder with every task, at small sizes.
pub fn fake_olmo_data(name: &str) -> PathBuf {
    let root = temp_dir(name).join("olmo_data");
    let tasks = root.join("oe_eval_tasks");
    for (name, sizes) in [
        ("arc_easy", [30, 9, 12]),
        ("arc_challenge", [20, 6, 7]),
        ("openbookqa", [25, 5, 5]),
    ] {
        for (variant, n) in ["train_rc_5shot", "val_rc_5shot", "test_rc_5shot"].iter().zip(sizes) {
            let docs: Vec<_> = (0..n).map(|i| arc_doc(i, if i == 0 { 3 } else { 4 })).collect();
            write_gz(
                &tasks.join(name).join(variant).join("requests.jsonl.gz"),
                &requests(&docs, 4),
            );
        }
    }
    let boolq = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| {
                let passage = "word ".repeat(400);
                json!({ "idx": i, "query": format!("Title {i} -- {passage}\nQuestion: is {i} even?\nAnswer:"), "choices": ["yes", "no"], "gold": i % 2 })
            })
            .collect()
    };
    write_gz(
        &tasks.join("boolq/train_rc_5shot/requests.jsonl.gz"),
        &requests(&boolq(40), 2),
    );
    write_gz(
        &tasks.join("boolq/val_rc_5shot/requests.jsonl.gz"),
        &requests(&boolq(31), 2),
    );
    let wino = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({ "sentence": format!("Ann beat Bo {i} times so _ won."), "option1": "Ann", "option2": "Bo", "answer": if i % 3 == 0 { "2" } else { "1" }, "index": i }))
            .collect()
    };
    write_gz(
        &tasks.join("winogrande/train_rc_5shot/requests.jsonl.gz"),
        &requests(&wino(3000), 2),
    );
    write_gz(
        &tasks.join("winogrande/val_rc_5shot/requests.jsonl.gz"),
        &requests(&wino(100), 2),
    );
    for subject in ["college_chemistry", "college_physics", "college_mathematics"] {
        for (split, n) in [("dev", 5), ("validation", 8), ("test", 20)] {
            let rows: Vec<(&str, [&str; 4], i64)> = (0..n)
                .map(|i| ("Which?", ["w", "x", "y", "z"], (i % 4) as i64))
                .collect();
            write_arrow(
                &root
                    .join("hf_datasets/hails/mmlu_no_train")
                    .join(subject)
                    .join(split)
                    .join("data-00000-of-00001.arrow"),
                &rows,
            );
        }
    }
    root
}

/// A word-level tokenizer (whitespace split) knowing the label words.
pub fn word_tokenizer(dir: &Path) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for (i, w) in [
        "[UNK]",
        "[PAD]",
        "A",
        "B",
        "C",
        "D",
        "E",
        "True",
        "False",
        "Answer:",
        "Question:",
    ]
    .iter()
    .enumerate()
    {
        vocab.insert(w.to_string(), json!(i));
    }
    let config = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "WhitespaceSplit" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, config.to_string()).unwrap();
    Tokenizer::from_file(&path).unwrap()
}

/// A `MELORA_HOME` with every task's data in the real format
/// (`home/data/olmo_data`), and the tied tiny fixture model with a word
/// tokenizer (`model`), under a fresh temporary `root`: what the tests
/// that run the `melora` binary train on.
pub struct TinyHome {
    pub root: PathBuf,
    pub home: PathBuf,
    pub model: PathBuf,
}

pub fn tiny_home(name: &str) -> TinyHome {
    tiny_home_with(name, &super::fixture("tied"))
}

/// [`tiny_home`] with the model of the fixture folder `source` (its
/// `config.json` and `model.safetensors`).
pub fn tiny_home_with(name: &str, source: &std::path::Path) -> TinyHome {
    let data = fake_olmo_data(name);
    let root = data.parent().unwrap().to_path_buf();
    let home = root.join("home");
    std::fs::create_dir_all(home.join("data")).unwrap();
    std::fs::rename(&data, home.join("data/olmo_data")).unwrap();
    let model = root.join("tiny");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), model.join(file)).unwrap();
    }
    word_tokenizer(&model);
    TinyHome { root, home, model }
}
