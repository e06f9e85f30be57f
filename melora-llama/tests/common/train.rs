//! The settings, scorer and run folders of the tiny-model training tests.

use melora_core::AdapterKind;
use melora_llama::eval::PredictConfig;
use melora_llama::model::scoring::Scorer;
use melora_llama::train::{RunDir, TrainConfig};
use melora_llama::weights::{safetensors::SafetensorsSource, WeightSource};
use std::path::Path;

/// The two label tokens the tiny model chooses between.
pub const LABELS: [u32; 2] = [17, 42];

/// Label scoring over [`LABELS`].
pub fn label_scorer() -> Scorer {
    Scorer::label(LABELS.to_vec(), 0)
}

/// A short run of `method` on the tiny model: rank 4, batch 4, fast rates,
/// no validation, a checkpoint every 5 steps.
pub fn config(method: AdapterKind, steps: usize) -> TrainConfig {
    TrainConfig::new()
        .with_model("tiny".into())
        .with_method(method.into())
        .with_rank(4)
        .with_steps(steps)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_kl_lr(1e-3)
        .with_eval_every(0)
        .with_checkpoint_every(5)
        .with_predict(PredictConfig::new().with_batch_size(4))
        .with_seed(7)
}

/// An empty run folder of this process, named `name`.
pub fn run_dir(name: &str) -> RunDir {
    let dir = std::env::temp_dir().join(format!("melora-train-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    RunDir { dir }
}

/// Every tensor of the adapter saved in checkpoint folder `dir`.
pub fn adapter_values(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut source = SafetensorsSource::single(&dir.join("adapter_model.safetensors")).unwrap();
    source
        .names()
        .into_iter()
        .map(|n| (n.clone(), source.load(&n).unwrap().unwrap().values))
        .collect()
}
