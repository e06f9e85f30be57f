//! The same training in two processes gives the same bits.
//!
//! The test runs itself twice as a child process (`MELORA_DETERMINISM_OUT`
//! set: train 3 steps of every method on the tiny fixture, checkpointing
//! and validating on the way), then compares every file but the logs byte
//! for byte: adapters, optimiser states, training states, metrics. Within
//! one process the runs already agreed (`training.rs`'s resume test);
//! across processes they did not while burn-ndarray's `simd` feature made
//! f32 `recip` (in the backward pass of `log` and `div`) an approximation
//! on the aligned middle of each buffer (Cargo.toml), and the optimiser's
//! record was written in the order of a hash map seeded anew in every
//! process (`adamw.bin`).

mod common;

use burn::backend::{Autodiff, NdArray};
use common::{differing_files, parity_examples, run_files as files, tiny_base};
use melora_core::{AdapterKind, SamplingMode};
use melora_llama::eval::{EnsembleConfig, PredictConfig};
use melora_llama::model::scoring::Scorer;
use melora_llama::train::{Method, RunDir, TrainConfig, TrainData, Trainer};
use std::path::Path;

type AD = Autodiff<NdArray<f32>>;

const CHILD: &str = "MELORA_DETERMINISM_OUT";

/// Every method (an ensemble of two members), and for BLoB and Me-LoRA
/// every training sampling mode.
fn runs() -> Vec<(String, TrainConfig)> {
    let base = TrainConfig::new()
        .with_model("tiny".into())
        .with_rank(4)
        .with_steps(3)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_eval_every(2)
        .with_checkpoint_every(2)
        .with_predict(PredictConfig::new().with_batch_size(4))
        .with_ensemble(EnsembleConfig::new().with_members(2))
        .with_seed(7);
    let mut runs = Vec::new();
    for method in Method::ALL {
        if method.adapter_kind() == AdapterKind::Lora {
            runs.push((
                format!("{method:?}"),
                base.clone().with_method(method).with_train_sampling(SamplingMode::Mean),
            ));
        } else {
            for mode in [SamplingMode::PerBatch, SamplingMode::PerExample, SamplingMode::Flipout] {
                runs.push((
                    format!("{method:?}-{mode:?}"),
                    base.clone().with_method(method).with_train_sampling(mode),
                ));
            }
        }
    }
    runs
}

fn train_into(out: &Path) {
    let train = parity_examples(8, 1);
    let validation = parity_examples(4, 2);
    for (name, config) in runs() {
        let run = RunDir { dir: out.join(name) };
        Trainer::new(&config, &run)
            .fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &validation,
                    scorer: &Scorer::label(vec![10, 11], 0),
                },
                &Default::default(),
            )
            .unwrap();
    }
}

#[test]
fn training_gives_the_same_bits_in_two_processes() {
    if let Some(out) = std::env::var_os(CHILD) {
        train_into(Path::new(&out));
        return;
    }
    let base = std::env::temp_dir().join(format!("melora-determinism-{}", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let mut dirs = Vec::new();
    for k in 0..2 {
        let dir = base.join(k.to_string());
        std::fs::remove_dir_all(&dir).ok();
        let status = std::process::Command::new(&exe)
            .args([
                "--exact",
                "training_gives_the_same_bits_in_two_processes",
                "--test-threads=1",
            ])
            .env(CHILD, &dir)
            .status()
            .unwrap();
        assert!(status.success(), "child {k} failed");
        dirs.push(dir);
    }
    let written = files(&dirs[0]);
    for kind in ["adapter_model.safetensors", "adamw.bin", "state.json", "metrics.jsonl"] {
        assert!(written.iter().any(|p| p.ends_with(kind)), "no {kind} among {written:?}");
    }
    let differ = differing_files(&dirs[0], &dirs[1]);
    println!(
        "{} files compared byte for byte ({} runs: every method, each sampling mode of BLoB and Me-LoRA)",
        written.len(),
        runs().len()
    );
    std::fs::remove_dir_all(&base).ok();
    assert!(differ.is_empty(), "differ between two processes: {differ:?}");
}
