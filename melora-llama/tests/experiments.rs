//! The experiment files (`experiments/<model>/*.json`, short files over a
//! `base.json`) resolve to exactly the settings the full files they
//! replaced resolved to. `fixtures/experiment-configs.json` holds every
//! file's resolved configuration before the change, written once when the
//! files were shortened: `melora train`'s defaults at 02cf0d9 (its
//! `config.json` of an empty settings file) with each full file laid over
//! them, key by key, as that loader did; for four of the files this was
//! checked against the `config.json` that binary wrote itself.
//!
//! Those settings predate the typed `targets` list and the adapters' own
//! sections (`low_rank`, `melora`): each fixture entry is read by today's
//! loader as an old run folder's `config.json` would be, and every field
//! compared; the moved fields are also compared one by one with the
//! fixture's own keys.

use melora_llama::train::TrainConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

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
        let config = TrainConfig::load(Some(&root.join(file)), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        let resolved = serde_json::to_value(&config).unwrap();
        let mut old = expected[file].clone();
        for (changed, key, value) in changed_since() {
            if changed == file {
                old[key] = value;
            }
        }
        let old = &old;
        let former = TrainConfig::parse(&old.to_string(), Path::new(file), &[])
            .unwrap_or_else(|e| panic!("{file} (fixture): {e}"));
        assert_eq!(
            resolved,
            serde_json::to_value(&former).unwrap(),
            "{file}: resolved settings changed"
        );
        // The moved settings, against the fixture's keys themselves.
        let targets: Vec<&str> = old["targets"].as_str().unwrap().split(',').collect();
        assert_eq!(resolved["targets"], serde_json::json!(targets), "{file}: targets");
        for key in ["rank", "alpha", "dropout"] {
            assert_eq!(resolved["low_rank"][key], old[key], "{file}: {key}");
        }
        for key in ["kl", "std_init"] {
            assert_eq!(resolved["melora"][key], old[key], "{file}: {key}");
        }
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
