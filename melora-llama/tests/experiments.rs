//! The experiment files (`experiments/<model>/*.json`, short files over a
//! `base.json`) resolve to exactly the settings the full files they
//! replaced resolved to. `fixtures/experiment-configs.json` holds every
//! file's resolved configuration before the change, written once when the
//! files were shortened: `melora train`'s defaults at 02cf0d9 (its
//! `config.json` of an empty settings file) with each full file laid over
//! them, key by key, as that loader did; for four of the files this was
//! checked against the `config.json` that binary wrote itself.
//!
//! Those settings predate the typed `targets` list and the sections
//! (`low_rank`, `melora`, `elbo`, `predict`, `ensemble`): each fixture
//! entry is read by today's loader as an old run folder's `config.json`
//! would be, and every field compared; the moved fields are also compared
//! one by one with the fixture's own keys.
//!
//! The run folders kept in `experiments/results/` (the 600-step study's,
//! the posterior experiment's), written by older binaries, load too, each
//! of their settings found at its place today.

use melora_core::LowRankConfig;
use melora_llama::settings::Loader;
use melora_llama::train::TrainConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where each setting that moved lives now: (old key, new path).
const MOVED: [(&str, &str); 14] = [
    ("rank", "low_rank.rank"),
    ("alpha", "low_rank.alpha"),
    ("dropout", "low_rank.dropout"),
    ("kl", "melora.kl"),
    ("std_init", "melora.std_init"),
    ("optimizer", "elbo.optimizer"),
    ("weight_decay", "elbo.weight_decay"),
    ("grad_clip", "elbo.grad_clip"),
    ("adam_epsilon", "elbo.epsilon"),
    ("eval_samples", "predict.samples"),
    ("eval_batch_size", "predict.batch_size"),
    ("members", "ensemble.members"),
    ("member_seeds", "ensemble.seeds"),
    ("ensemble_average", "ensemble.average"),
];

/// The value at a dotted `path` of `json`.
fn at<'a>(json: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(json, |v, k| &v[k])
}

/// Every setting of an older `config.json` (`old`) has its value in the
/// settings today's loader made of it (`now`): a moved one at its new
/// place, the adapter sections' copies of `low_rank` equal to `low_rank`
/// or to the defaults (a copy no run used).
fn every_old_setting_kept(file: &str, old: &Value, now: &Value) {
    for (key, value) in old.as_object().unwrap() {
        match (key.as_str(), MOVED.iter().find(|(k, _)| k == key)) {
            (_, Some((_, path))) => assert_eq!(at(now, path), value, "{file}: {key} -> {path}"),
            ("targets", None) if value.is_string() => {
                let list: Vec<&str> = value.as_str().unwrap().split(',').map(str::trim).collect();
                assert_eq!(now["targets"], serde_json::json!(list), "{file}: targets");
            }
            ("blob" | "melora", None) => {
                for (k, v) in value.as_object().unwrap() {
                    match k.as_str() {
                        // The copy of `low_rank` the sections once held: the
                        // run's own, or left at the defaults (unused).
                        "low_rank" => {
                            let unset = serde_json::to_value(LowRankConfig::new()).unwrap();
                            assert!(
                                holds(&now["low_rank"], v) || holds(&unset, v),
                                "{file}: {key}.low_rank {v} is neither low_rank {} nor the defaults",
                                now["low_rank"]
                            );
                        }
                        _ => assert!(holds(&now[key][k], v), "{file}: {key}.{k}"),
                    }
                }
            }
            _ => assert!(holds(&now[key], value), "{file}: {key}: {} now, {value} then", now[key]),
        }
    }
}

/// Whether `now` says what `then` says: equal, or for an object, every key
/// of `then` with a value `now` holds (a section may have gained settings).
fn holds(now: &Value, then: &Value) -> bool {
    match (now, then) {
        (Value::Object(now), Value::Object(then)) => then.iter().all(|(k, v)| now.get(k).is_some_and(|n| holds(n, v))),
        _ => now == then,
    }
}

/// Every `config.json` under `dir`.
fn run_configs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            run_configs(&path, out);
        } else if path.file_name().is_some_and(|n| n == "config.json") {
            out.push(path);
        }
    }
}

#[test]
fn the_run_folders_kept_in_results_load_with_every_setting() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/results");
    let mut files = Vec::new();
    run_configs(&root, &mut files);
    files.sort();
    let mut runs = 0;
    for path in &files {
        let old: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        // A Laplace posterior's folder keeps its MAP run's settings too.
        let name = path.strip_prefix(&root).unwrap().display().to_string();
        let config: TrainConfig = Loader::file(Some(path))
            .load()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        every_old_setting_kept(&name, &old, &serde_json::to_value(&config).unwrap());
        runs += 1;
    }
    assert!(runs >= 20, "{runs} run folders");
}

/// Settings changed on purpose since the fixture was written: (file, key,
/// value now). The quickstart trains Me-LoRA with the std parameters' own
/// Adam at a peak rate of 0.02 (docs/derivations.md section 7).
fn changed_since() -> Vec<(&'static str, &'static str, Value)> {
    let quickstart = "experiments/smollm2-135m/quickstart.json";
    vec![
        (quickstart, "optimizer", Value::from("StdAdam")),
        (quickstart, "kl_lr", Value::from(0.02)),
    ]
}

#[test]
fn every_experiment_file_resolves_to_its_former_settings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let expected: BTreeMap<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(root.join("melora-llama/tests/fixtures/experiment-configs.json")).unwrap(),
    )
    .unwrap();
    let mut files = Vec::new();
    for dir in ["smollm2-135m", "llama2-7b", "llama2-13b"] {
        for entry in std::fs::read_dir(root.join("experiments").join(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".json") && name != "base.json" && name != "laplace.json" {
                files.push(format!("experiments/{dir}/{name}"));
            }
        }
    }
    files.sort();
    let listed: Vec<&String> = expected.keys().collect();
    assert_eq!(
        files.iter().collect::<Vec<_>>(),
        listed,
        "the experiment files are the ones the fixture lists"
    );
    for file in &files {
        let config: TrainConfig = Loader::file(Some(&root.join(file)))
            .load()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let resolved = serde_json::to_value(&config).unwrap();
        let mut old = expected[file].clone();
        for (changed, key, value) in changed_since() {
            if changed == file {
                old[key] = value;
            }
        }
        let old = &old;
        let text = old.to_string();
        let former: TrainConfig = Loader::text(&text, Path::new(file))
            .load()
            .unwrap_or_else(|e| panic!("{file} (fixture): {e}"));
        assert_eq!(
            resolved,
            serde_json::to_value(&former).unwrap(),
            "{file}: resolved settings changed"
        );
        // The moved settings, against the fixture's keys themselves.
        every_old_setting_kept(file, old, &resolved);
        assert_eq!(
            resolved["low_rank"]["rslora"], false,
            "{file}: rslora was not reachable then"
        );
    }
    assert_eq!(files.len(), 121);
    // The short files are short: a base and what they change.
    for file in files.iter().filter(|f| !f.ends_with("quickstart.json")) {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["base"], "base.json", "{file} names its base");
        assert!(
            json.as_object().unwrap().len() <= 8,
            "{file}: {} keys",
            json.as_object().unwrap().len()
        );
    }
}

/// The 5000-step study's own copies of the SmolLM2 settings files (in the
/// spelling its binary reads) resolve to the settings of the files they
/// were copied from.
#[test]
fn the_studys_copies_resolve_as_the_files_they_copy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
    let mut copies = 0;
    for entry in std::fs::read_dir(root.join("study-5000-configs")).unwrap() {
        let copy = entry.unwrap().path();
        let name = copy.file_name().unwrap().to_owned();
        let read = |path: &Path| -> Value {
            let config: TrainConfig = Loader::file(Some(path))
                .load()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::to_value(config).unwrap()
        };
        if copy.extension().is_some_and(|e| e == "json") && name != "laplace.json" {
            let original = root.join("smollm2-135m").join(&name);
            assert_eq!(read(&copy), read(&original), "{name:?}");
            copies += 1;
        }
    }
    assert_eq!(copies, 38);
}
