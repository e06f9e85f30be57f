//! The same training in two processes gives the same bits (issue 16).
//!
//! The test runs itself twice as a child process (`MELORA_DETERMINISM_OUT`
//! set: train a few steps of each adapter on the tiny fixture and write the
//! adapters there), then compares the files byte for byte. Within one
//! process the runs already agreed (`training.rs`'s resume test); across
//! processes they did not while burn-ndarray's `simd` feature made f32
//! `recip` (in the backward pass of `log` and `div`) an approximation on
//! the aligned middle of each buffer (Cargo.toml). 3 steps of LoRA, BLoB
//! and Me-LoRA, whose KL terms take logs.

mod common;

use burn::backend::{Autodiff, NdArray};
use common::{parity_examples, tiny_base, Quiet};
use melora_core::AdapterKind;
use melora_llama::scoring::Scorer;
use melora_llama::train::{fit, RunDir, TrainConfig};
use std::path::{Path, PathBuf};

type AD = Autodiff<NdArray<f32>>;

const CHILD: &str = "MELORA_DETERMINISM_OUT";

fn train_into(out: &Path) {
    let train = parity_examples(8, 1);
    let validation = parity_examples(4, 2);
    for method in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let config = TrainConfig::new()
            .with_model("tiny".into())
            .with_method(method.into())
            .with_rank(4)
            .with_steps(3)
            .with_batch_size(4)
            .with_lr(1e-2)
            .with_eval_every(0)
            .with_checkpoint_every(3)
            .with_eval_batch_size(4)
            .with_seed(7);
        let run = RunDir { dir: out.join(format!("{method:?}")) };
        fit(&config, &run, false, tiny_base::<AD>(), &train, &validation, &Scorer::label(vec![10, 11], 0), &Default::default(), &mut Quiet).unwrap();
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for method in ["Lora", "Blob", "MeLora"] {
        out.push(dir.join(method).join("checkpoints/last/adapter_model.safetensors"));
    }
    out
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
            .args(["--exact", "training_gives_the_same_bits_in_two_processes", "--test-threads=1"])
            .env(CHILD, &dir)
            .status()
            .unwrap();
        assert!(status.success(), "child {k} failed");
        dirs.push(dir);
    }
    let mut differ = Vec::new();
    for (a, b) in files(&dirs[0]).iter().zip(files(&dirs[1])) {
        if std::fs::read(a).unwrap() != std::fs::read(&b).unwrap() {
            differ.push(a.strip_prefix(&dirs[0]).unwrap().display().to_string());
        }
    }
    std::fs::remove_dir_all(&base).ok();
    assert!(differ.is_empty(), "differ between two processes: {differ:?}");
}
