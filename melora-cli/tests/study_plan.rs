//! A study file's checks and the plan of phases it gives
//! (`melora_cli::study::spec`): the order, the arguments of each command,
//! and what is skipped once done.

use melora_cli::study::spec::{Phase, PhaseKind, Study};
use melora_llama::data::Task;
use std::path::{Path, PathBuf};

/// A two-task study whose settings files exist in a temporary folder.
fn study(dir: &Path) -> Study {
    std::fs::create_dir_all(dir).unwrap();
    for name in [
        "arc-e-map.json",
        "arc-e-blob.json",
        "wg-s-map.json",
        "wg-s-blob.json",
        "laplace.json",
    ] {
        std::fs::write(dir.join(name), "{}").unwrap();
    }
    let text = format!(
        r#"{{
          "description": "test", "runs": "r", "results": "o", "configs": {:?},
          "train": ["--steps", "10"], "eval": ["--batch-size", "8"], "zero_shot": ["--scoring", "answer"],
          "seeds": [0, 1], "checkpoints": ["best", "last"],
          "tasks": [
            {{"task": "arc-e", "split": "test", "max_examples": 100,
              "ood": {{"tasks": ["arc-c", "mmlu-chem"], "checkpoint": "best", "seeds": [0]}}}},
            {{"task": "wg-s", "split": "test", "seeds": [0]}}
          ],
          "methods": [
            {{"key": "map", "label": "MAP", "train": {{"config": "map"}}, "ood_seeds": [0, 1]}},
            {{"key": "ens", "label": "ENS", "ensemble_of": "map"}},
            {{"key": "lap", "label": "LAP", "laplace": {{"of": "map", "config": "laplace.json"}}, "eval": ["--samples", "10"]}},
            {{"key": "blob", "label": "BLoB", "train": {{"config": "blob", "args": ["--recipe", "blob-official"]}}}}
          ],
          "compare": {{"focus": ["blob"], "baseline": "map"}}
        }}"#,
        dir.display()
    );
    let study: Study = serde_json::from_str(&text).unwrap();
    study.check().unwrap();
    study
}

#[test]
fn the_plan_runs_seed_by_seed_and_skips_what_is_done() {
    let dir = std::env::temp_dir().join(format!("melora-study-spec-{}", std::process::id()));
    let s = study(&dir.join("configs"));
    let runs = dir.join("runs");
    let plan = s.plan(&runs, &[], &[], &[]);
    let names: Vec<&str> = plan.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "arc-e/zero-shot",
            "arc-e/map-seed0",
            "arc-e/best/map-seed0",
            "arc-e/last/map-seed0",
            "arc-e/best/lap-seed0",
            "arc-e/best/lap-seed0",
            "arc-e/last/lap-seed0",
            "arc-e/last/lap-seed0",
            "arc-e/blob-seed0",
            "arc-e/best/blob-seed0",
            "arc-e/last/blob-seed0",
            "wg-s/zero-shot",
            "wg-s/map-seed0",
            "wg-s/best/map-seed0",
            "wg-s/last/map-seed0",
            "wg-s/best/lap-seed0",
            "wg-s/best/lap-seed0",
            "wg-s/last/lap-seed0",
            "wg-s/last/lap-seed0",
            "wg-s/blob-seed0",
            "wg-s/best/blob-seed0",
            "wg-s/last/blob-seed0",
            "arc-e/map-seed1",
            "arc-e/best/map-seed1",
            "arc-e/last/map-seed1",
            "arc-e/best/lap-seed1",
            "arc-e/best/lap-seed1",
            "arc-e/last/lap-seed1",
            "arc-e/last/lap-seed1",
            "arc-e/blob-seed1",
            "arc-e/best/blob-seed1",
            "arc-e/last/blob-seed1",
        ]
    );
    let text = |p: &Phase| p.args.join(" ");
    let r = runs.display();
    let c = dir.join("configs");
    let c = c.display();
    // The out-of-distribution tasks at the best checkpoint of seed 0 only.
    assert_eq!(
        text(&plan[2]),
        format!("eval --run {r}/arc-e/map-seed0 --checkpoint best --task arc-e --split test --max-examples 100 --ood arc-c,mmlu-chem --batch-size 8 --out {r}/evals/arc-e/best/map-seed0")
    );
    assert_eq!(plan[0].args[..2], ["eval", "--zero-shot"]);
    assert!(text(&plan[0]).contains("--ood arc-c,mmlu-chem --scoring answer"));
    assert_eq!(
        text(&plan[1]),
        format!("train --config {c}/arc-e-map.json --seed 0 --steps 10 --out {r}/arc-e/map-seed0")
    );
    // Laplace on each checkpoint, then its evaluation of the fit (which has no checkpoints of its own).
    assert_eq!(
        (plan[4].kind, plan[4].needs.clone()),
        (PhaseKind::Laplace, Some(runs.join("arc-e/map-seed0/done")))
    );
    assert_eq!(
        text(&plan[6]),
        format!("laplace --run {r}/arc-e/map-seed0 --checkpoint last --config {c}/laplace.json --out {r}/arc-e/map-seed0/laplace-last")
    );
    assert_eq!(
        text(&plan[7]),
        format!("eval --run {r}/arc-e/map-seed0/laplace-last --task arc-e --split test --max-examples 100 --batch-size 8 --samples 10 --out {r}/evals/arc-e/last/lap-seed0")
    );
    assert_eq!(
        plan[7].needs,
        Some(runs.join("arc-e/map-seed0/laplace-last/laplace.json"))
    );
    assert_eq!(
        text(&plan[29]),
        format!(
            "train --config {c}/arc-e-blob.json --seed 1 --steps 10 --recipe blob-official --out {r}/arc-e/blob-seed1"
        )
    );
    assert_eq!(plan[29].keep, PathBuf::from("runs/arc-e/blob-seed1"));
    // Seed 1 is evaluated without the out-of-distribution tasks, but
    // for MAP, whose own seeds say otherwise.
    assert!(!text(&plan[30]).contains("--ood"));
    assert!(text(&plan[23]).contains("--checkpoint best") && text(&plan[23]).contains("--ood arc-c,mmlu-chem"));

    // MAP seed 0 on ARC-E evaluated at both checkpoints (kept from
    // another machine): neither it nor its run is needed unless a
    // Laplace fit needs the run.
    for rel in ["evals/arc-e/best/map-seed0", "evals/arc-e/last/map-seed0"] {
        std::fs::create_dir_all(runs.join(rel)).unwrap();
        std::fs::write(runs.join(rel).join("done"), "").unwrap();
    }
    let names = |p: Vec<Phase>| p.into_iter().map(|p| p.name).collect::<Vec<_>>();
    let only = names(s.plan(&runs, &[Task::ArcE], &["map".to_string()], &[0]));
    assert!(only.is_empty(), "{only:?}");
    let with_lap = names(s.plan(&runs, &[Task::ArcE], &["lap".to_string()], &[0]));
    assert_eq!(with_lap[..2], ["arc-e/map-seed0", "arc-e/best/lap-seed0"]);
    // Its run done: the fits start at once.
    std::fs::create_dir_all(runs.join("arc-e/map-seed0")).unwrap();
    std::fs::write(runs.join("arc-e/map-seed0/done"), "").unwrap();
    let with_lap = names(s.plan(&runs, &[Task::ArcE], &["lap".to_string()], &[0]));
    assert_eq!(
        with_lap,
        [
            "arc-e/best/lap-seed0",
            "arc-e/best/lap-seed0",
            "arc-e/last/lap-seed0",
            "arc-e/last/lap-seed0"
        ]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_bad_study_file_says_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("melora-study-check-{}", std::process::id()));
    let mut s = study(&dir);
    s.methods[1].ensemble_of = Some("lap".into());
    s.methods[3].train.as_mut().unwrap().config = "nope".into();
    s.tasks[0].ood.as_mut().unwrap().seeds = Some(vec![5]);
    s.compare.baseline = "mcd".into();
    let e = s.check().unwrap_err();
    for want in [
        "method ens: lap is not a trained method listed before it",
        "method blob: no settings file",
        "arc-e-nope.json for task arc-e",
        "task arc-e: out-of-distribution seed 5 is not one of the task's seeds",
        "compare: no method mcd",
    ] {
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
    let mut s = study(&dir);
    s.methods[0].ensemble_of = Some("map".into());
    assert!(s
        .check()
        .unwrap_err()
        .contains("method map: give exactly one of train, ensemble_of and laplace"));
    std::fs::remove_dir_all(&dir).ok();
}

/// `melora study-plan | head -1`: the reader closes the pipe before the
/// plan is written, and melora ends with success, printing no panic.
#[test]
fn a_plan_printed_into_a_closed_pipe_ends_quietly() {
    use std::process::{Command, Stdio};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let runs = std::env::temp_dir().join(format!("melora-closed-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&runs).unwrap();
    let plan = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_melora"));
        c.current_dir(&root)
            .args(["study-plan", "--study", "experiments/study-5000.json", "--runs"])
            .arg(&runs);
        c
    };
    // More than a pipe holds (64 KiB on Linux): a write meets the closed
    // pipe whenever the reader closes it.
    let whole = plan().output().unwrap();
    assert!(whole.status.success(), "{}", String::from_utf8_lossy(&whole.stderr));
    assert!(whole.stdout.len() > 65536, "the plan is {} bytes", whole.stdout.len());

    let mut child = plan().stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}, stderr: {stderr}", out.status);
    assert!(stderr.is_empty(), "stderr: {stderr}");
    std::fs::remove_dir_all(&runs).ok();
}
