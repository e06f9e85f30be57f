//! Benchmark data on small fixtures written here in the real formats
//! (gzipped request JSONL, Arrow IPC streams): parsing, de-duplication,
//! split sizes, prompts, label tokens, padding, truncation, and clear errors
//! on malformed input.

mod common;

use common::fake_data::{arc_doc, fake_olmo_data, requests, temp_dir, word_tokenizer, write_arrow, write_gz};
use melora_llama::data::readers::{read_mmlu_arrow, read_request_docs};
use melora_llama::data::{collate, encode, label_tokens, load_task, seeded_shuffle, Item, Padding, Split, Task};

#[test]
fn request_files_are_deduplicated_by_document() {
    let dir = temp_dir("dedup");
    let path = dir.join("requests.jsonl.gz");
    let docs: Vec<_> = (0..7).map(|i| arc_doc(i, 4)).collect();
    write_gz(&path, &requests(&docs, 4));
    let read = read_request_docs(&path).unwrap();
    assert_eq!(read.len(), 7);
    assert_eq!(read[3]["id"], "Q3");
}

#[test]
fn every_task_loads_with_the_documented_splits() {
    let root = fake_olmo_data("olmo1");
    let sizes = |task| {
        let d = load_task(task, &root).unwrap();
        (d.train.len(), d.validation.len(), d.test.len())
    };
    assert_eq!(sizes(Task::ArcE), (30, 9, 12));
    assert_eq!(sizes(Task::ArcC), (20, 6, 7));
    assert_eq!(sizes(Task::Obqa), (25, 5, 5));
    assert_eq!(sizes(Task::Boolq), (40, 10, 21), "validation divided 1:2");
    assert_eq!(sizes(Task::WgS), (640, 33, 67));
    assert_eq!(sizes(Task::WgM), (2558, 33, 67));
    assert_eq!(sizes(Task::MmluChem), (5, 8, 20));
    // WG-S is a subset of WG-M; the division of validation is the same for both.
    let (s, m) = (
        load_task(Task::WgS, &root).unwrap(),
        load_task(Task::WgM, &root).unwrap(),
    );
    assert!(s.train.iter().all(|item| m.train.contains(item)));
    assert_eq!(s.validation, m.validation);
    // Validation and test do not overlap and cover the official split.
    let b = load_task(Task::Boolq, &root).unwrap();
    assert!(b.validation.iter().all(|v| !b.test.contains(v)));
    // Deterministic.
    assert_eq!(load_task(Task::Boolq, &root).unwrap(), b);
    // BoolQ passage cut to 1024 characters; question without its '?'.
    let Item::YesNo { passage, question, .. } = &b.train[0] else {
        panic!()
    };
    assert_eq!(passage.chars().count(), 1024);
    assert_eq!(question, "is 0 even");
}

#[test]
fn prompts_render_as_method_md_says() {
    let item = Item::Choice {
        question: "What is 2+2?".into(),
        choices: vec!["3".into(), "4".into()],
        label: 1,
    };
    assert_eq!(
        item.render(),
        "Return the label of the correct answer for the question below.\n\nQuestion: What is 2+2?\nChoices:\nA) 3\nB) 4\nAnswer:"
    );
    let yes_no = Item::YesNo {
        passage: "Sky -- it is blue.".into(),
        question: "is the sky blue".into(),
        label: 0,
    };
    assert_eq!(
        yes_no.render(),
        "Answer the question about the passage below with True or False.\n\nPassage: Sky -- it is blue.\nQuestion: is the sky blue?\nAnswer:"
    );
    let root = fake_olmo_data("olmo2");
    let arc = load_task(Task::ArcE, &root).unwrap();
    assert_eq!(arc.train[0].n_choices(), 3);
    assert!(arc.train[1].render().contains("\nD) choice 3 of 1\nAnswer:"));
    let wg = load_task(Task::WgS, &root).unwrap();
    assert!(wg.train[0].render().contains("\nA) Ann\nB) Bo\nAnswer:"));
}

#[test]
fn labels_padding_and_truncation() {
    let dir = temp_dir("tok");
    let tokenizer = word_tokenizer(&dir);
    assert_eq!(label_tokens(Task::ArcE, &tokenizer).unwrap(), vec![2, 3, 4, 5, 6]);
    assert_eq!(label_tokens(Task::Boolq, &tokenizer).unwrap(), vec![7, 8]);
    let err = tokenizer.single_token("True False").unwrap_err().to_string();
    assert!(err.contains("is not a single token"), "{err}");

    let long = Item::Choice {
        question: "x ".repeat(500),
        choices: vec!["a".into(), "b".into()],
        label: 0,
    };
    let short = Item::Choice {
        question: "y".into(),
        choices: vec!["a".into(), "b".into()],
        label: 1,
    };
    let answer = tokenizer.single_token("Answer:").unwrap();
    let long = encode(&long, &tokenizer, 300).unwrap();
    assert_eq!(long.ids.len(), 300);
    assert_eq!(
        *long.ids.last().unwrap(),
        answer,
        "truncation keeps the answer position"
    );
    let short = encode(&short, &tokenizer, 300).unwrap();
    assert!(short.ids.len() < 20);

    for padding in [Padding::Left, Padding::Right] {
        let batch = collate(&[&long, &short], 1, padding);
        assert_eq!(batch.shape, [2, 300]);
        assert_eq!(batch.labels, vec![0, 1]);
        for row in 0..2 {
            let last = batch.last[row];
            assert_eq!(
                batch.tokens[row * 300 + last],
                answer as i64,
                "{padding:?}: answer position of row {row}"
            );
            assert!(batch.mask[row][last]);
            let real = batch.mask[row].iter().filter(|m| **m).count();
            assert_eq!(real, [&long, &short][row].ids.len());
            for (j, m) in batch.mask[row].iter().enumerate() {
                assert_eq!(
                    *m,
                    batch.tokens[row * 300 + j] != 1,
                    "{padding:?}: mask and pad tokens agree at {row},{j}"
                );
            }
        }
        if padding == Padding::Left {
            assert_eq!(batch.last, vec![299, 299]);
            assert!(!batch.mask[1][0]);
        } else {
            assert_eq!(batch.last[1], short.ids.len() - 1);
            assert!(!batch.mask[1][299]);
        }
    }
    assert_eq!(
        seeded_shuffle((0..10).collect::<Vec<_>>(), 1),
        seeded_shuffle((0..10).collect::<Vec<_>>(), 1)
    );
    assert_ne!(
        seeded_shuffle((0..10).collect::<Vec<_>>(), 1),
        seeded_shuffle((0..10).collect::<Vec<_>>(), 2)
    );
}

#[test]
fn mmlu_arrow_streams_are_read() {
    let dir = temp_dir("arrow");
    let path = dir.join("data.arrow");
    write_arrow(
        &path,
        &[("Q1?", ["a", "b", "c", "d"], 2), ("Q2?", ["e", "f", "g", "h"], 0)],
    );
    let rows = read_mmlu_arrow(&path).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].question.as_str(), rows[0].answer, rows[1].choices[3].as_str()),
        ("Q1?", 2, "h")
    );
    write_arrow(&path, &[("Q?", ["a", "b", "c", "d"], 7)]);
    let err = read_mmlu_arrow(&path).unwrap_err().to_string();
    assert!(err.contains("answer 7 out of range"), "{err}");
    std::fs::write(&path, b"not arrow").unwrap();
    let err = read_mmlu_arrow(&path).unwrap_err().to_string();
    assert!(err.contains("data.arrow") && err.contains("Arrow"), "{err}");
}

#[test]
fn malformed_input_names_the_file_and_line() {
    let dir = temp_dir("bad");
    let path = dir.join("requests.jsonl.gz");
    let mut lines = requests(&[arc_doc(0, 4)], 1);
    lines.push("{not json".into());
    write_gz(&path, &lines);
    let err = read_request_docs(&path).unwrap_err().to_string();
    assert!(
        err.contains("requests.jsonl.gz") && err.contains("line 2: invalid JSON"),
        "{err}"
    );

    // A doc without "choices": the task loader names the field and the line.
    let root = fake_olmo_data("olmo3");
    let arc = root.join("oe_eval_tasks/arc_easy/train_rc_5shot/requests.jsonl.gz");
    let mut doc = arc_doc(0, 4);
    doc.as_object_mut().unwrap().remove("choices");
    write_gz(&arc, &requests(&[arc_doc(1, 4), doc], 1));
    let err = load_task(Task::ArcE, &root).unwrap_err().to_string();
    assert!(
        err.contains("train_rc_5shot/requests.jsonl.gz") && err.contains("line 2") && err.contains("\"choices\""),
        "{err}"
    );

    // A missing folder or file says to run `melora fetch`.
    let err = load_task(Task::Obqa, &dir.join("nowhere")).unwrap_err().to_string();
    assert!(err.contains("melora fetch"), "{err}");
    std::fs::remove_file(root.join("oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz")).unwrap();
    let err = load_task(Task::Obqa, &root).unwrap_err().to_string();
    assert!(
        err.contains("test_rc_5shot/requests.jsonl.gz") && err.contains("melora fetch"),
        "{err}"
    );
    assert_eq!("val".parse::<Split>().unwrap(), Split::Validation);
    assert!("arc-x".parse::<Task>().unwrap_err().contains("arc-e"));
}

/// With the assets fetched: the counts of assets.md and docs/method.md.
#[test]
#[ignore = "needs the fetched model and data: run `melora fetch`, then `cargo test --workspace -- --ignored`"]
fn real_data_has_the_documented_counts() {
    let assets = melora_llama::assets::Assets::from_env();
    assert!(
        assets.olmo_data().is_dir(),
        "{} is absent: run `melora fetch` first",
        assets.olmo_data().display()
    );
    let expected = [
        (Task::ArcE, (2251, 570, 2376)),
        (Task::ArcC, (1119, 299, 1172)),
        (Task::Obqa, (4957, 500, 500)),
        (Task::Boolq, (9427, 1090, 2180)),
        (Task::WgS, (640, 422, 845)),
        (Task::WgM, (2558, 422, 845)),
        (Task::MmluChem, (5, 8, 100)),
        (Task::MmluPhys, (5, 11, 102)),
        (Task::MmluMath, (5, 11, 100)),
    ];
    for (task, sizes) in expected {
        let d = load_task(task, &assets.olmo_data()).unwrap();
        assert_eq!((d.train.len(), d.validation.len(), d.test.len()), sizes, "{task}");
    }
}
