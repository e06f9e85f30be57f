//! The data-parallel tests' helpers (`tests/parallel.rs`,
//! `tests/parallel_f64.rs`): the tiny fixture's runs and their adapters.
#![allow(dead_code)]

use super::{answer_examples, parity_examples, tiny_base, with_method_preset};
use melora_llama::data::{Encoded, Scoring};
use melora_llama::error::LlamaError;
use melora_llama::eval::PredictConfig;
use melora_llama::model::scoring::Scorer;
use melora_llama::train::{Method, Nodes, Progress, RunDir, TrainConfig, TrainData, TrainSummary, Trainer};
use std::path::{Path, PathBuf};

type AD = burn::backend::Autodiff<burn::backend::NdArray<f32>>;

pub fn out(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("melora-parallel-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

pub fn config(method: Method, scoring: Scoring, batch: usize) -> TrainConfig {
    let config = TrainConfig::new()
        .with_model("tiny".into())
        .with_scoring(scoring)
        .with_rank(4)
        .with_steps(5)
        .with_batch_size(batch)
        .with_lr(1e-2)
        .with_eval_every(3)
        .with_checkpoint_every(2)
        .with_predict(PredictConfig::new().with_batch_size(4))
        .with_seed(5);
    let config = with_method_preset(config, method);
    // Dropout on, so that its per-example masks are part of what must agree.
    config.with_dropout(0.1)
}

pub struct Data {
    pub train: Vec<Encoded>,
    pub validation: Vec<Encoded>,
    pub scorer: Scorer,
}

pub fn data(scoring: Scoring) -> Data {
    match scoring {
        Scoring::Label => Data {
            train: parity_examples(12, 1),
            validation: parity_examples(4, 2),
            scorer: Scorer::label(vec![10, 11], 0),
        },
        Scoring::Answer => Data {
            train: answer_examples(12, 1),
            validation: answer_examples(4, 2),
            scorer: Scorer::answer(3, melora_llama::data::LengthNorm::None, 0),
        },
    }
}

pub fn train(
    config: &TrainConfig,
    data: &Data,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, LlamaError> {
    train_on::<AD>(config, data, dir, resume, progress)
}

pub fn train_on<B: burn::tensor::backend::AutodiffBackend>(
    config: &TrainConfig,
    data: &Data,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<TrainSummary, LlamaError> {
    train_as_node::<B>(config, data, dir, resume, progress, None)
}

/// [`train_on`] as one process (`nodes`) of a run over several.
pub fn train_as_node<B: burn::tensor::backend::AutodiffBackend>(
    config: &TrainConfig,
    data: &Data,
    dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
    nodes: Option<&Nodes>,
) -> Result<TrainSummary, LlamaError> {
    let data = TrainData {
        train: &data.train,
        validation: &data.validation,
        scorer: &data.scorer,
    };
    Trainer::new(config, &RunDir { dir: dir.to_path_buf() })
        .resume(resume)
        .nodes(nodes)
        .progress(progress)
        .fit(tiny_base::<B>(), &data, &Default::default())
}

/// Every tensor of a checkpoint's adapter, by name (f32 or f64 as stored).
pub fn adapter(checkpoint: &Path) -> Vec<(String, Vec<f64>)> {
    let bytes = std::fs::read(checkpoint.join("adapter_model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f64>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The largest difference between two adapters, relative to the largest
/// entry.
pub fn relative_diff(a: &[(String, Vec<f64>)], b: &[(String, Vec<f64>)]) -> f64 {
    assert_eq!(
        a.iter().map(|t| &t.0).collect::<Vec<_>>(),
        b.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    let scale = a.iter().flat_map(|t| t.1.iter()).fold(0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .flat_map(|(x, y)| x.1.iter().zip(&y.1).map(|(p, q)| (p - q).abs()))
        .fold(0f64, f64::max);
    diff / scale
}

/// Step NLLs from a run's log.
pub fn nlls(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("log.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("step ")
                .and_then(|l| l.split(" nll ").nth(1))
                .and_then(|r| r.split(' ').next())
                .and_then(|v| v.parse().ok())
        })
        .collect()
}
