//! Every model family through the `melora` binary: a few steps of LoRA,
//! BLoB and Me-LoRA with `melora train` on each tiny family fixture
//! (`melora-llama/tests/fixtures/families`: Llama 3's rope scaling, Qwen2's
//! biases, Qwen3's head norms, Mistral's sliding window) on ARC-Easy data in
//! the real format, then `melora export` of the Me-LoRA run: a Hugging Face
//! folder of the family's own `model_type` and class that melora reads
//! back to the same configuration. (That transformers loads the exported
//! folders and agrees is `experiments/export/check_families.py`.)

#[path = "../../melora-llama/tests/common/mod.rs"]
mod common;

use common::fake_data::{tiny_home_with, TinyHome};
use common::with_method_preset;
use melora_llama::data::Scoring;
use melora_llama::eval::PredictConfig;
use melora_llama::train::{Method, TrainConfig};
use melora_llama::weights::{build, safetensors::SafetensorsSource};
use melora_llama::LlamaConfig;
use std::path::Path;
use std::process::Command;

const STEPS: usize = 6;

fn melora(home: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_melora"))
        .args(args)
        .env("MELORA_HOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "melora {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The training NLL of each validation record of a run.
fn train_nlls(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["train_nll"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn every_family_trains_with_each_adapter_and_exports_as_itself() {
    for name in ["llama3", "qwen2", "qwen3", "mistral"] {
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../melora-llama/tests/fixtures/families")
            .join(name);
        let TinyHome { root, home, model } = tiny_home_with(&format!("family-{name}"), &source);
        let model_config = LlamaConfig::from_hf_json(&model.join("config.json")).unwrap();
        for method in [Method::Lora, Method::Blob, Method::MeLora] {
            let config = TrainConfig::new()
                .with_model(model.display().to_string())
                .with_scoring(Scoring::Answer)
                .with_rank(4)
                .with_steps(STEPS)
                .with_batch_size(4)
                .with_lr(1e-2)
                .with_eval_every(3)
                .with_max_validation(Some(6))
                .with_predict(PredictConfig::new().with_batch_size(4))
                .with_seed(1);
            let config = with_method_preset(config, method);
            let run = root.join(format!("{method:?}"));
            let config_path = root.join(format!("{method:?}.json"));
            std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
            melora(
                &home,
                &[
                    "train",
                    "--config",
                    config_path.to_str().unwrap(),
                    "--out",
                    run.to_str().unwrap(),
                    "--plain",
                ],
            );
            let nlls = train_nlls(&run);
            println!("{name} {method:?}: training NLL at each validation {nlls:.3?}");
            assert_eq!(nlls.len(), STEPS / 3, "{name} {method:?}");
            assert!(nlls.iter().all(|v| v.is_finite()), "{name} {method:?}: {nlls:?}");
            assert!(run.join("checkpoints/last/adapter_model.safetensors").is_file());
        }
        // The Me-LoRA run merged and exported.
        let exported = root.join("exported");
        let run = root.join("MeLora");
        melora(
            &home,
            &[
                "export",
                "--run",
                run.to_str().unwrap(),
                "--checkpoint",
                "last",
                "--out",
                exported.to_str().unwrap(),
            ],
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
        let family = model_config.family;
        assert_eq!(json["model_type"], family.model_type(), "{name}");
        assert_eq!(json["architectures"][0], family.architecture(), "{name}");
        let read_back = LlamaConfig::from_hf_json(&exported.join("config.json")).unwrap();
        assert_eq!(read_back, model_config, "{name}: the exported configuration reads back");
        let (_, report) = build::<burn::backend::NdArray<f32>, _>(
            &read_back,
            &mut SafetensorsSource::open(&exported).unwrap(),
            &Default::default(),
        )
        .unwrap();
        assert!(report.unused.is_empty(), "{name}: {:?}", report.unused);
        println!(
            "{name}: exported as {} ({})",
            json["model_type"], json["architectures"][0]
        );
        std::fs::remove_dir_all(&root).ok();
    }
}
