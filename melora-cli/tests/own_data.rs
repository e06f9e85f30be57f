//! Training on one's own questions through the `melora` binary: a
//! generated question file (train, validation, test as JSONL, CSV and
//! Parquet-free CSV here; the formats' equality is `melora-llama`'s
//! `tests/question_files.rs`), 3 steps of LoRA and of Me-LoRA with
//! `melora train --data`, then `melora eval --run` and `melora predict
//! --run` from the run folder alone (its task and files kept in its
//! config.json); `melora eval --data FILE` asks the base model or a run
//! any file; a malformed file stops `melora train` before anything is
//! written.

#[path = "../../melora-llama/tests/common/mod.rs"]
mod common;

use common::fake_data::{tiny_home, TinyHome};
use std::path::Path;
use std::process::{Command, Output};

fn melora(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(args)
        .env("MELORA_HOME", home)
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The task, split and question count of an evaluation's first row.
fn first_row(dir: &Path) -> (String, String, u64) {
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let results: serde_json::Value = serde_json::from_str(&text).unwrap();
    let row = &results[0];
    (
        row["task"].as_str().unwrap_or_default().into(),
        row["split"].as_str().unwrap_or_default().into(),
        row["metrics"]["count"].as_u64().unwrap_or_default(),
    )
}

/// `n` generated questions with 2 to 4 choices, the answer cycling.
fn questions_jsonl(n: usize, offset: usize) -> String {
    (0..n)
        .map(|i| {
            let k = 2 + (i + offset) % 3;
            let choices: Vec<String> = (0..k).map(|c| format!("option {c} of {}", i + offset)).collect();
            serde_json::json!({
                "id": format!("q{}", i + offset),
                "question": format!("Which is right for case {}?", i + offset),
                "choices": choices,
                "answer": (i + offset) % k,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

#[test]
fn a_run_trained_from_files_evaluates_and_predicts_from_its_folder() {
    let TinyHome { root, home, model } = tiny_home("own-data");
    let (train, validation, test) = (root.join("train.jsonl"), root.join("val.jsonl"), root.join("test.csv"));
    std::fs::write(&train, questions_jsonl(24, 0)).unwrap();
    std::fs::write(&validation, questions_jsonl(8, 100)).unwrap();
    let mut csv = String::from("id,question,choices,answer\n");
    for i in 0..6 {
        csv.push_str(&format!("t{i},Which is right for test {i}?,yes|no|maybe,{}\n", i % 3));
    }
    std::fs::write(&test, csv).unwrap();
    let model = format!("model={}", model.display());
    for method in ["lora", "melora"] {
        let run = root.join(method);
        let args = [
            "train",
            "--set",
            &model,
            "--method",
            method,
            "--steps",
            "3",
            "--scoring",
            "answer",
            "--set",
            "batch_size=4",
            "--set",
            "eval_every=3",
            "--set",
            "rank=4",
            "--data",
            train.to_str().unwrap(),
            "--validation",
            validation.to_str().unwrap(),
            "--test",
            test.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--plain",
        ];
        let out = melora(&home, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ok(out, "train");
        assert!(
            stderr.contains("the first of 24 training questions as the model sees it"),
            "{stderr}"
        );
        assert!(
            stderr.contains(r#""Question: Which is right for case 0?\nAnswer:" + " option 0 of 0""#),
            "{stderr}"
        );
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["task"], "files");
        assert!(config["data"]["train"].as_str().unwrap().ends_with("train.jsonl"));
        // The run folder alone: its task and files.
        let eval_dir = root.join(format!("{method}-eval"));
        let table = ok(
            melora(
                &home,
                &[
                    "eval",
                    "--run",
                    run.to_str().unwrap(),
                    "--out",
                    eval_dir.to_str().unwrap(),
                ],
            ),
            "eval",
        );
        println!("{method}:\n{table}");
        assert!(table.contains("files"), "{table}");
        assert_eq!(first_row(&eval_dir), ("files".into(), "test".into(), 6));
        let own = root.join("own.jsonl");
        std::fs::write(&own, questions_jsonl(2, 500)).unwrap();
        let answers = ok(
            melora(
                &home,
                &[
                    "predict",
                    "--run",
                    run.to_str().unwrap(),
                    "--file",
                    own.to_str().unwrap(),
                    "--json",
                ],
            ),
            "predict",
        );
        assert!(
            answers.contains("probabilities") || answers.contains("prediction"),
            "{answers}"
        );
    }
    // Any file, by the base model and by a run in its templates.
    let zero_shot = root.join("zero-shot");
    let model_path = model.trim_start_matches("model=");
    let table = ok(
        melora(
            &home,
            &[
                "eval",
                "--zero-shot",
                "--model",
                model_path,
                "--data",
                test.to_str().unwrap(),
                "--out",
                zero_shot.to_str().unwrap(),
            ],
        ),
        "eval --zero-shot --data",
    );
    assert!(table.contains("zero-shot"), "{table}");
    assert_eq!(first_row(&zero_shot), ("files".into(), "test".into(), 6));
    let other = root.join("other.jsonl");
    std::fs::write(&other, questions_jsonl(5, 700)).unwrap();
    let run = root.join("melora");
    ok(
        melora(
            &home,
            &[
                "eval",
                "--run",
                run.to_str().unwrap(),
                "--data",
                other.to_str().unwrap(),
            ],
        ),
        "eval --run --data",
    );
    assert_eq!(
        first_row(&run.join("eval-files-other")),
        ("files".into(), "test".into(), 5)
    );
    let out = melora(
        &home,
        &[
            "eval",
            "--run",
            run.to_str().unwrap(),
            "--data",
            other.to_str().unwrap(),
            "--task",
            "arc-e",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--data FILE is the task files"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A malformed training file: refused before the run folder exists.
    let bad = root.join("bad.jsonl");
    std::fs::write(
        &bad,
        questions_jsonl(3, 0) + "{\"question\": \"Q?\", \"choices\": [\"a\"], \"answer\": 0}\n",
    )
    .unwrap();
    let run = root.join("bad-run");
    let out = melora(
        &home,
        &[
            "train",
            "--set",
            &model,
            "--steps",
            "3",
            "--data",
            bad.to_str().unwrap(),
            "--validation",
            validation.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--plain",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.jsonl: line 4: field \"choices\": 1 choice(s); a question needs two or more"),
        "{stderr}"
    );
    assert!(
        !run.join("config.json").exists(),
        "nothing is written for a malformed file"
    );
    std::fs::remove_dir_all(&root).ok();
}
