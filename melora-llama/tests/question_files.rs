//! A user's question files (`data::files`): the same questions as JSONL,
//! CSV (choices in one column or a column each), TSV and Parquet (plain
//! and snappy-compressed, choices a list or ARC's struct) read to the same
//! records; every malformed record is refused naming the file, the line or
//! row, and the field.

mod common;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{Field, Fields};
use melora_llama::data::files::{read_question_file, Question};
use melora_llama::data::own::DataFiles;
use melora_llama::data::{LengthNorm, Scoring, Split};
use melora_llama::task::TaskSetup;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::path::PathBuf;
use std::sync::Arc;

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("melora-qfiles-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn expected() -> Vec<Question> {
    let q = |id: &str, question: &str, context: Option<&str>, choices: &[&str], answer| Question {
        id: Some(id.into()),
        question: question.into(),
        context: context.map(String::from),
        choices: choices.iter().map(|c| c.to_string()).collect(),
        answer,
    };
    vec![
        q(
            "q1",
            "Which gas do plants take in?",
            None,
            &["oxygen", "carbon dioxide", "helium"],
            1,
        ),
        q(
            "q2",
            "Is the patient, \"J. Doe\", urgent?",
            Some("Chest pain, 2 hours."),
            &["yes", "no"],
            0,
        ),
        q("q3", "2 + 2 = ?", None, &["3", "4", "5", "22"], 1),
    ]
}

const JSONL: &str = r#"{"id": "q1", "question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"], "answer": 1}
{"id": "q2", "question": "Is the patient, \"J. Doe\", urgent?", "context": "Chest pain, 2 hours.", "choices": ["yes", "no"], "answer": "A"}

{"id": "q3", "question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1}
"#;

fn parquet(path: &std::path::Path, arc_layout: bool, compression: Compression) {
    let mut choices = ListBuilder::new(StringBuilder::new());
    for q in expected() {
        for c in &q.choices {
            choices.values().append_value(c);
        }
        choices.append(true);
    }
    let choices: ArrayRef = Arc::new(choices.finish());
    let choices: ArrayRef = if arc_layout {
        let field = Field::new("text", choices.data_type().clone(), true);
        Arc::new(StructArray::new(Fields::from(vec![field]), vec![choices], None))
    } else {
        choices
    };
    let e = expected();
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "id",
            Arc::new(StringArray::from(e.iter().map(|q| q.id.clone()).collect::<Vec<_>>())),
        ),
        (
            "question",
            Arc::new(StringArray::from(
                e.iter().map(|q| q.question.clone()).collect::<Vec<_>>(),
            )),
        ),
        (
            "context",
            Arc::new(StringArray::from(
                e.iter().map(|q| q.context.clone()).collect::<Vec<_>>(),
            )),
        ),
        ("choices", choices),
        (
            "answer",
            Arc::new(Int64Array::from(e.iter().map(|q| q.answer as i64).collect::<Vec<_>>())),
        ),
    ];
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder().set_compression(compression).build();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn every_format_reads_to_the_same_questions() {
    let d = dir("same");
    let files = [
        ("q.jsonl", JSONL.to_string()),
        (
            "joined.csv",
            "id,question,context,choices,answer\n\
             q1,Which gas do plants take in?,,oxygen | carbon dioxide | helium,1\n\
             q2,\"Is the patient, \"\"J. Doe\"\", urgent?\",\"Chest pain, 2 hours.\",yes|no,A\n\
             q3,2 + 2 = ?,,3|4|5|22,1\n"
                .to_string(),
        ),
        (
            "letters.csv",
            "question,A,B,C,D,answer,id,context\n\
             Which gas do plants take in?,oxygen,carbon dioxide,helium,,B,q1,\n\
             \"Is the patient, \"\"J. Doe\"\", urgent?\",yes,no,,,0,q2,\"Chest pain, 2 hours.\"\n\
             2 + 2 = ?,3,4,5,22,1,q3,\n"
                .to_string(),
        ),
        (
            "q.tsv",
            "id\tquestion\tcontext\tchoices\tanswer\n\
             q1\tWhich gas do plants take in?\t\toxygen|carbon dioxide|helium\t1\n\
             q2\t\"Is the patient, \"\"J. Doe\"\", urgent?\"\tChest pain, 2 hours.\tyes|no\t0\n\
             q3\t2 + 2 = ?\t\t3|4|5|22\t1\n"
                .to_string(),
        ),
    ];
    for (name, text) in &files {
        std::fs::write(d.join(name), text).unwrap();
    }
    parquet(&d.join("list.parquet"), false, Compression::UNCOMPRESSED);
    parquet(&d.join("arc.parquet"), true, Compression::SNAPPY);
    for name in [
        "q.jsonl",
        "joined.csv",
        "letters.csv",
        "q.tsv",
        "list.parquet",
        "arc.parquet",
    ] {
        assert_eq!(read_question_file(&d.join(name)).unwrap(), expected(), "{name}");
    }
    std::fs::remove_dir_all(&d).ok();
}

/// Each malformed record: the error names the file, where, and the field.
#[test]
fn malformed_records_are_refused_with_file_line_and_field() {
    let d = dir("bad");
    let good = r#"{"id": "a", "question": "Q?", "choices": ["x", "y"], "answer": 0}"#;
    let cases = [
        (
            "not-json.jsonl",
            format!("{good}\n{{\"question\": \"Q?\",\n"),
            "line 2: not JSON",
        ),
        (
            "no-question.jsonl",
            r#"{"choices": ["x", "y"], "answer": 0}"#.to_string(),
            r#"line 1: field "question" is missing"#,
        ),
        (
            "empty-question.jsonl",
            r#"{"question": "  ", "choices": ["x", "y"], "answer": 0}"#.to_string(),
            r#"line 1: field "question" is empty"#,
        ),
        (
            "no-choices.jsonl",
            r#"{"question": "Q?", "answer": 0}"#.to_string(),
            r#"line 1: field "choices" is missing"#,
        ),
        (
            "one-choice.jsonl",
            format!("{good}\n{}", r#"{"question": "Q?", "choices": ["x"], "answer": 0}"#),
            r#"line 2: field "choices": 1 choice(s); a question needs two or more"#,
        ),
        (
            "no-answer.jsonl",
            r#"{"question": "Q?", "choices": ["x", "y"]}"#.to_string(),
            r#"line 1: field "answer" is missing"#,
        ),
        (
            "answer-range.jsonl",
            r#"{"question": "Q?", "choices": ["x", "y"], "answer": 2}"#.to_string(),
            r#"line 1: field "answer": 2 is beyond its 2 choices"#,
        ),
        (
            "answer-letter.jsonl",
            r#"{"question": "Q?", "choices": ["x", "y"], "answer": "C"}"#.to_string(),
            r#"line 1: field "answer": 2 is beyond its 2 choices"#,
        ),
        (
            "answer-kind.jsonl",
            r#"{"question": "Q?", "choices": ["x", "y"], "answer": -1}"#.to_string(),
            r#"line 1: field "answer": -1 is not an index"#,
        ),
        (
            "duplicate.jsonl",
            format!("{good}\n\n{good}"),
            r#"line 3: field "id": "a" is also the id of line 1"#,
        ),
        ("empty.jsonl", "\n\n".to_string(), "no questions: the file is empty"),
        (
            "empty-choice.csv",
            "question,choices,answer\nQ?,x|,0\n".to_string(),
            r#"line 2: field "choices": choice 1 is empty"#,
        ),
        (
            "csv-answer.csv",
            "question,A,B,answer\nQ?,x,y,0\nR?,x,y,7\n".to_string(),
            r#"line 3: field "answer": 7 is beyond its 2 choices"#,
        ),
        (
            "no-choice-columns.csv",
            "question,answer\nQ?,0\n".to_string(),
            "line 1 (the header): no \"choices\" column",
        ),
        ("wrong.txt", good.to_string(), "is not a questions format melora reads"),
    ];
    for (name, text, expected) in cases {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        let err = read_question_file(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains(expected),
            "{name}: {err}"
        );
    }
    // A Parquet row: where is the row.
    let path = d.join("bad.parquet");
    let batch = RecordBatch::try_from_iter(vec![
        ("question", Arc::new(StringArray::from(vec!["Q?", "R?"])) as ArrayRef),
        ("answer", Arc::new(Int64Array::from(vec![0, 0])) as ArrayRef),
        ("choices", Arc::new(StringArray::from(vec!["x", "y"])) as ArrayRef),
    ])
    .unwrap();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let err = read_question_file(&path).unwrap_err().to_string();
    assert!(
        err.contains(r#"row 1: field "choices": "x" is not a list of strings"#),
        "{err}"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// The same questions as JSONL, CSV and Parquet give the same encoded
/// examples under both scorings (the prompts through the default
/// templates, the labels up to the most choices any file has).
#[test]
fn every_format_gives_the_same_encoded_batches() {
    let d = dir("encoded");
    std::fs::write(d.join("q.jsonl"), JSONL).unwrap();
    std::fs::write(
        d.join("q.csv"),
        "id,question,context,A,B,C,D,answer\n\
         q1,Which gas do plants take in?,,oxygen,carbon dioxide,helium,,1\n\
         q2,\"Is the patient, \"\"J. Doe\"\", urgent?\",\"Chest pain, 2 hours.\",yes,no,,,0\n\
         q3,2 + 2 = ?,,3,4,5,22,1\n",
    )
    .unwrap();
    parquet(&d.join("q.parquet"), false, Compression::SNAPPY);
    let tokenizer = common::fake_data::word_tokenizer(&d);
    for scoring in [Scoring::Label, Scoring::Answer] {
        let encoded = |name: &str| {
            let file = d.join(name);
            let data = DataFiles {
                train: file.clone(),
                validation: file,
                test: None,
                template: Default::default(),
            };
            let setup = TaskSetup::files(data, scoring, LengthNorm::None, 300, tokenizer.clone()).unwrap();
            setup.split(Split::Train, None).unwrap()
        };
        let jsonl = encoded("q.jsonl");
        assert_eq!(jsonl.len(), 3);
        assert_eq!(
            jsonl.iter().map(|e| (e.label, e.n_choices)).collect::<Vec<_>>(),
            [(1, 3), (0, 2), (1, 4)]
        );
        assert_eq!(encoded("q.csv"), jsonl, "{scoring:?}: CSV");
        assert_eq!(encoded("q.parquet"), jsonl, "{scoring:?}: Parquet");
    }
    std::fs::remove_dir_all(&d).ok();
}
