//! The experiment files (`experiments/<model>/*.json`, short files over a
//! `base.json`) resolve to exactly the settings the full files they
//! replaced resolved to. `fixtures/experiment-configs.json` holds every
//! file's resolved configuration before the change, written once when the
//! files were shortened: `melora train`'s defaults at 02cf0d9 (its
//! `config.json` of an empty settings file) with each full file laid over
//! them, key by key, as that loader did; for four of the files this was
//! checked against the `config.json` that binary wrote itself.

use melora_llama::train::TrainConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn every_experiment_file_resolves_to_its_former_settings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let expected: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(root.join("melora-llama/tests/fixtures/experiment-configs.json")).unwrap()).unwrap();
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
    assert_eq!(files.iter().collect::<Vec<_>>(), listed, "the experiment files are the ones the fixture lists");
    for file in &files {
        let config = TrainConfig::load(Some(&root.join(file)), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        let resolved = serde_json::to_value(&config).unwrap();
        assert_eq!(&resolved, &expected[file], "{file}: resolved settings changed");
    }
    assert_eq!(files.len(), 121);
    // The short files are short: a base and what they change.
    for file in files.iter().filter(|f| !f.ends_with("quickstart.json")) {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["base"], "base.json", "{file} names its base");
        assert!(json.as_object().unwrap().len() <= 8, "{file}: {} keys", json.as_object().unwrap().len());
    }
}
