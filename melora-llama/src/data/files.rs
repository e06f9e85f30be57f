//! A user's own multiple-choice questions, from JSONL, CSV or Parquet files.
//!
//! Every format gives the same record: `question` (a non-empty string),
//! `choices` (two or more strings), `answer` (an index from 0, or a capital
//! letter), and optionally `id` (unique in the file) and `context` (a passage
//! the question is about).
//!
//! - JSONL (`.jsonl`, `.json`): an object per line, as `melora predict
//!   --file` reads.
//! - CSV (`.csv`; `.tsv` tab-separated): a header naming the columns; the
//!   choices either in one `choices` column, separated by `|`, or in columns
//!   named `A`, `B`, `C`, ... (an empty cell ends a row's choices); an
//!   `answer` cell of digits is an index.
//! - Parquet (`.parquet`, a Hugging Face dataset's files): `choices` a list of
//!   strings, or a struct whose `text` field is one (ARC's layout); `answer`
//!   an integer or a string.
//!
//! Each row becomes the JSON object the JSONL reader parses, so the three
//! formats share one parser and one set of checks. A malformed record is an
//! error naming the file, the line (JSONL, CSV) or row (Parquet) and the
//! field; nothing is returned from a partly read file. JSONL and CSV are read
//! as a stream.

use crate::error::{LlamaError, Result};
use arrow_array::{Array, RecordBatch};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// One question from a user's file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Its id, when the file gives one.
    pub id: Option<String>,
    /// The question.
    pub question: String,
    /// A passage the question is about, when the file gives one.
    pub context: Option<String>,
    /// The choices, two or more.
    pub choices: Vec<String>,
    /// The index of the right choice.
    pub answer: usize,
}

/// A file's format, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header.
    Csv,
    /// Tab-separated values with a header.
    Tsv,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format `path`'s extension names.
    pub fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "json" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "tsv" => Ok(Self::Tsv),
            "parquet" => Ok(Self::Parquet),
            _ => Err(LlamaError::format(
                path,
                format!("{ext:?} is not a questions format melora reads (.jsonl, .json, .csv, .tsv, .parquet)"),
            )),
        }
    }
}

/// Reads every question of `path`, checked: see the module's documentation.
pub fn read_question_file(path: &Path) -> Result<Vec<Question>> {
    let mut questions = Vec::new();
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut take = |record: Value, at: String| -> Result<()> {
        let question = parse(&record).map_err(|m| LlamaError::format(path, format!("{at}: {m}")))?;
        if let Some(id) = &question.id {
            if let Some(first) = ids.insert(id.clone(), at.clone()) {
                return Err(LlamaError::format(
                    path,
                    format!("{at}: field \"id\": {id:?} is also the id of {first}"),
                ));
            }
        }
        questions.push(question);
        Ok(())
    };
    match Format::of(path)? {
        Format::Jsonl => jsonl_records(path, &mut take)?,
        Format::Csv => csv_records(path, b',', &mut take)?,
        Format::Tsv => csv_records(path, b'\t', &mut take)?,
        Format::Parquet => parquet_records(path, &mut take)?,
    }
    if questions.is_empty() {
        return Err(LlamaError::format(path, "no questions: the file is empty"));
    }
    Ok(questions)
}

/// A record's fields, checked.
fn parse(record: &Value) -> std::result::Result<Question, String> {
    let object = record.as_object().ok_or("not a JSON object")?;
    let text = |key: &str, required: bool| -> std::result::Result<Option<String>, String> {
        match object.get(key) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(format!("field {key:?} is missing")),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if key == "id" => Ok(Some(n.to_string())),
            Some(other) => Err(format!("field {key:?}: {other} is not a string")),
        }
    };
    let question = text("question", true)?.unwrap_or_default();
    if question.trim().is_empty() {
        return Err("field \"question\" is empty".into());
    }
    let choices: Vec<String> = match object.get("choices") {
        None | Some(Value::Null) => return Err("field \"choices\" is missing".into()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, c)| match c {
                Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                Value::String(_) => Err(format!("field \"choices\": choice {i} is empty")),
                other => Err(format!("field \"choices\": choice {i} ({other}) is not a string")),
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(other) => return Err(format!("field \"choices\": {other} is not a list of strings")),
    };
    if choices.len() < 2 {
        return Err(format!(
            "field \"choices\": {} choice(s); a question needs two or more",
            choices.len()
        ));
    }
    let answer = match object.get("answer") {
        None | Some(Value::Null) => return Err("field \"answer\" is missing".into()),
        Some(Value::Number(n)) => {
            n.as_u64()
                .ok_or_else(|| format!("field \"answer\": {n} is not an index (0, 1, ...)"))? as usize
        }
        Some(Value::String(s)) if s.len() == 1 && s.as_bytes()[0].is_ascii_uppercase() => {
            (s.as_bytes()[0] - b'A') as usize
        }
        Some(other) => {
            return Err(format!(
                "field \"answer\": {other} is neither an index nor a capital letter"
            ))
        }
    };
    if answer >= choices.len() {
        return Err(format!(
            "field \"answer\": {answer} is beyond its {} choices (indices start at 0)",
            choices.len()
        ));
    }
    Ok(Question {
        id: text("id", false)?,
        question,
        context: text("context", false)?,
        choices,
        answer,
    })
}

fn jsonl_records(path: &Path, take: &mut impl FnMut(Value, String) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let at = format!("line {}", i + 1);
        let line = line.map_err(|e| LlamaError::format(path, format!("{at}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let record =
            serde_json::from_str(&line).map_err(|e| LlamaError::format(path, format!("{at}: not JSON: {e}")))?;
        take(record, at)?;
    }
    Ok(())
}

/// How a CSV header lays out the choices.
enum ChoiceColumns {
    /// One column, choices separated by `|`.
    Joined(usize),
    /// A column per choice (`A`, `B`, ...).
    Letters(Vec<usize>),
}

fn csv_records(path: &Path, delimiter: u8, take: &mut impl FnMut(Value, String) -> Result<()>) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .map_err(|e| LlamaError::format(path, e.to_string()))?;
    let header = reader
        .headers()
        .map_err(|e| LlamaError::format(path, format!("line 1 (the header): {e}")))?
        .clone();
    let column = |name: &str| header.iter().position(|h| h.trim() == name);
    let letters: Vec<usize> = (b'A'..=b'Z')
        .map(|l| column(&(l as char).to_string()))
        .take_while(Option::is_some)
        .flatten()
        .collect();
    let choices = match (column("choices"), letters.len()) {
        (Some(c), _) => ChoiceColumns::Joined(c),
        (None, n) if n >= 2 => ChoiceColumns::Letters(letters),
        _ => {
            return Err(LlamaError::format(
                path,
                "line 1 (the header): no \"choices\" column and no choice columns A, B, ...",
            ))
        }
    };
    let fields: Vec<(&str, usize)> = ["id", "question", "context", "answer"]
        .into_iter()
        .filter_map(|name| column(name).map(|c| (name, c)))
        .collect();
    for row in reader.records() {
        let row = row.map_err(|e| LlamaError::format(path, e.to_string()))?;
        let at = format!("line {}", row.position().map_or(0, |p| p.line()));
        let mut record = Map::new();
        for &(name, c) in &fields {
            let cell = row.get(c).unwrap_or("").trim();
            let value = match name {
                "answer" if !cell.is_empty() && cell.bytes().all(|b| b.is_ascii_digit()) => Value::from(
                    cell.parse::<u64>()
                        .map_err(|e| LlamaError::format(path, format!("{at}: field \"answer\": {e}")))?,
                ),
                _ if cell.is_empty() && name != "question" => Value::Null,
                _ => Value::from(cell),
            };
            record.insert(name.into(), value);
        }
        let cells: Vec<&str> = match &choices {
            ChoiceColumns::Joined(c) => row.get(*c).unwrap_or("").split('|').map(str::trim).collect(),
            ChoiceColumns::Letters(cols) => cols
                .iter()
                .map(|&c| row.get(c).unwrap_or("").trim())
                .take_while(|cell| !cell.is_empty())
                .collect(),
        };
        record.insert("choices".into(), Value::from(cells));
        take(Value::Object(record), at)?;
    }
    Ok(())
}

fn parquet_records(path: &Path, take: &mut impl FnMut(Value, String) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| LlamaError::format(path, format!("not a Parquet file melora can read: {e}")))?;
    let mut row = 0;
    for batch in reader {
        let batch = batch.map_err(|e| LlamaError::format(path, e.to_string()))?;
        for i in 0..batch.num_rows() {
            row += 1;
            let at = format!("row {row}");
            let record = parquet_row(&batch, i).map_err(|m| LlamaError::format(path, format!("{at}: {m}")))?;
            take(record, at)?;
        }
    }
    Ok(())
}

/// Row `i` of a batch as the JSON object of the fields melora reads.
fn parquet_row(batch: &RecordBatch, i: usize) -> std::result::Result<Value, String> {
    let mut record = Map::new();
    for name in ["id", "question", "context", "choices", "answer"] {
        let Some(column) = batch.column_by_name(name) else {
            continue;
        };
        let value = cell(column.as_ref(), i).map_err(|m| format!("field {name:?}: {m}"))?;
        // ARC's layout: `choices` is `{text: [...], label: [...]}`.
        let value = match value {
            Value::Object(mut fields) if name == "choices" => fields.remove("text").unwrap_or(Value::Null),
            other => other,
        };
        record.insert(name.into(), value);
    }
    Ok(Value::Object(record))
}

/// One cell of an Arrow column as JSON: strings, integers, lists and
/// structs of them.
fn cell(column: &dyn Array, i: usize) -> std::result::Result<Value, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{
        Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
    };
    use arrow_array::ArrowPrimitiveType;
    if column.is_null(i) {
        return Ok(Value::Null);
    }
    fn int<T: ArrowPrimitiveType>(column: &dyn Array, i: usize) -> Value
    where
        T::Native: Into<Value>,
    {
        column.as_primitive::<T>().value(i).into()
    }
    let dt = column.data_type();
    use arrow_schema::DataType as D;
    Ok(match dt {
        D::Utf8 => column.as_string::<i32>().value(i).into(),
        D::LargeUtf8 => column.as_string::<i64>().value(i).into(),
        D::Utf8View => column.as_string_view().value(i).into(),
        D::Int8 => int::<Int8Type>(column, i),
        D::Int16 => int::<Int16Type>(column, i),
        D::Int32 => int::<Int32Type>(column, i),
        D::Int64 => int::<Int64Type>(column, i),
        D::UInt8 => int::<UInt8Type>(column, i),
        D::UInt16 => int::<UInt16Type>(column, i),
        D::UInt32 => int::<UInt32Type>(column, i),
        D::UInt64 => int::<UInt64Type>(column, i),
        D::List(_) => list(column.as_list::<i32>().value(i).as_ref())?,
        D::LargeList(_) => list(column.as_list::<i64>().value(i).as_ref())?,
        D::Struct(fields) => {
            let s = column.as_struct();
            let mut out = Map::new();
            for (f, child) in fields.iter().zip(s.columns()) {
                out.insert(f.name().clone(), cell(child.as_ref(), i)?);
            }
            Value::Object(out)
        }
        other => return Err(format!("a column of type {other}, which melora does not read")),
    })
}

fn list(values: &dyn Array) -> std::result::Result<Value, String> {
    (0..values.len())
        .map(|j| cell(values, j))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// What a question file holds: what a user checks before training on it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FileStats {
    /// Questions.
    pub questions: usize,
    /// Questions with a context passage.
    pub with_context: usize,
    /// How many questions have each number of choices, `(choices, count)`
    /// by number of choices.
    pub choice_counts: Vec<(usize, usize)>,
    /// How often each answer index is the right one (`answers[0]`: A).
    pub answers: Vec<usize>,
    /// The accuracy of always answering the commonest index.
    pub majority_accuracy: f64,
    /// The expected accuracy of a uniform guess (the mean of 1 / choices).
    pub chance_accuracy: f64,
    /// Token lengths of the question (with its context), with a tokenizer.
    pub question_tokens: Option<Lengths>,
    /// Token lengths of each choice as a continuation (`" " + choice`).
    pub choice_tokens: Option<Lengths>,
}

/// A distribution of lengths.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Lengths {
    /// The shortest.
    pub min: usize,
    /// The median (the lower of the middle two).
    pub median: usize,
    /// The 95th percentile (nearest rank).
    pub p95: usize,
    /// The longest.
    pub max: usize,
}

impl Lengths {
    fn of(mut values: Vec<usize>) -> Option<Self> {
        values.sort_unstable();
        let rank = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Some(Self {
            min: *values.first()?,
            median: values[(values.len() - 1) / 2],
            p95: rank(0.95),
            max: *values.last()?,
        })
    }
}

/// The counts of [`FileStats`]; token lengths with `tokenizer`.
pub fn stats(questions: &[Question], tokenizer: Option<&crate::Tokenizer>) -> Result<FileStats> {
    let n = questions.len().max(1) as f64;
    let mut choice_counts = std::collections::BTreeMap::new();
    let mut answers = vec![0usize; questions.iter().map(|q| q.choices.len()).max().unwrap_or(0)];
    for q in questions {
        *choice_counts.entry(q.choices.len()).or_insert(0) += 1;
        answers[q.answer] += 1;
    }
    let (question_tokens, choice_tokens) = match tokenizer {
        Some(t) => {
            let mut question_lengths = Vec::with_capacity(questions.len());
            let mut choice_lengths = Vec::new();
            for q in questions {
                let text = match &q.context {
                    Some(c) => format!("{c}\n{}", q.question),
                    None => q.question.clone(),
                };
                question_lengths.push(t.encode_plain(&text)?.len());
                for c in &q.choices {
                    choice_lengths.push(t.encode_plain(&format!(" {c}"))?.len());
                }
            }
            (Lengths::of(question_lengths), Lengths::of(choice_lengths))
        }
        None => (None, None),
    };
    Ok(FileStats {
        questions: questions.len(),
        with_context: questions.iter().filter(|q| q.context.is_some()).count(),
        choice_counts: choice_counts.into_iter().collect(),
        majority_accuracy: answers.iter().copied().max().unwrap_or(0) as f64 / n,
        answers,
        chance_accuracy: questions.iter().map(|q| 1.0 / q.choices.len() as f64).sum::<f64>() / n,
        question_tokens,
        choice_tokens,
    })
}
