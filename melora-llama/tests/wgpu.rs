//! The wgpu backend really runs: on any Vulkan device, Mesa's
//! lavapipe on a CPU included, the tiny fixtures' logits equal
//! transformers' reference, and three training steps of each adapter
//! equal ndarray's (host-drawn noise, so both backends draw the same
//! numbers). Built only with `--features wgpu` (`.ci/run` installs lavapipe
//! and runs `cargo test -p melora-llama --features wgpu --test wgpu`).
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::module::AutodiffModule;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use common::{fixture, max_abs_diff, parity_examples, read_npy, tiny_base};
use melora_core::{AdapterKind, NoiseDevice, NoiseSource, Sampler, SamplingMode};
use melora_llama::data::Padding;
use melora_llama::model::scoring::Scorer;
use melora_llama::train::{Stepper, TrainConfig};
use melora_llama::weights::{build, safetensors::SafetensorsSource};
use melora_llama::{Llama, LlamaConfig};

type W = Wgpu<f32, i32>;
type N = NdArray<f32>;

fn logits<B: Backend>(which: &str) -> (Vec<f32>, Vec<f32>) {
    let dir = fixture(which);
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let device = Default::default();
    let model: Llama<B> = build::<B, _>(&config, &mut SafetensorsSource::open(&dir).unwrap(), &device)
        .unwrap()
        .0;
    let ids = read_npy(dir.join("input_ids.npy"));
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.i64.clone(), [ids.shape[0], ids.shape[1]]), &device);
    let mut noise = NoiseSource::seeded(0);
    let out = model.forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    (
        out.into_data().convert::<f32>().to_vec().unwrap(),
        read_npy(dir.join("logits.npy")).f32,
    )
}

#[test]
fn wgpu_logits_match_transformers() {
    for which in ["tied", "untied"] {
        let (got, want) = logits::<W>(which);
        let diff = max_abs_diff(&got, &want);
        println!("wgpu {which}: max |logit - transformers| = {diff:.2e}");
        assert!(diff < 1e-4, "{which}: wgpu logits differ from transformers' by {diff}");
    }
}

/// Three steps of `kind` on backend `B`: each step's NLL and KL, and the
/// adapter's parameters after them (the mean weights' scores on the batch).
fn steps<B: Backend>(kind: AdapterKind) -> (Vec<(f64, f64)>, Vec<f32>) {
    let device = Default::default();
    let config = TrainConfig::new()
        .with_method(kind.into())
        .with_rank(4)
        .with_steps(3)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_kl_lr(1e-3)
        .with_noise(NoiseDevice::Host)
        .with_seed(7);
    let base = tiny_base::<Autodiff<B>>();
    let mut model = base
        .with_adapters(
            &config.adapter(),
            &config.targets,
            &mut NoiseSource::seeded(config.seed),
        )
        .unwrap();
    let examples = parity_examples(8, 3);
    let scorer = Scorer::label(vec![10, 11], 0);
    let mut stepper = Stepper::new(&config, &model, examples.len());
    let mut values = Vec::new();
    for step in 0..3 {
        let batch = scorer.batch(
            &examples,
            &[
                (2 * step) % 8,
                (2 * step + 1) % 8,
                (2 * step + 2) % 8,
                (2 * step + 3) % 8,
            ],
            Padding::Left,
        );
        let outcome = stepper.step(&mut model, &batch, &scorer, step, &device).unwrap();
        values.push((outcome.nll, outcome.kl));
    }
    let valid = model.valid();
    let batch = scorer.batch(&examples, &(0..8).collect::<Vec<_>>(), Padding::Left);
    let mut noise = NoiseSource::seeded(0);
    let scores = scorer.scores(
        &valid,
        &batch,
        &mut Sampler::new(SamplingMode::Mean, &mut noise),
        &device,
    );
    (values, scores.into_data().convert::<f32>().to_vec().unwrap())
}

#[test]
fn a_wgpu_training_step_of_each_adapter_equals_ndarrays() {
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let (gpu, gpu_scores) = steps::<W>(kind);
        let (cpu, cpu_scores) = steps::<N>(kind);
        for (step, ((g_nll, g_kl), (c_nll, c_kl))) in gpu.iter().zip(&cpu).enumerate() {
            println!(
                "{kind:?} step {step}: nll wgpu {g_nll:.6} ndarray {c_nll:.6}, kl wgpu {g_kl:.4} ndarray {c_kl:.4}"
            );
            assert!(
                (g_nll - c_nll).abs() < 1e-4 * c_nll.abs().max(1.0),
                "{kind:?} step {step}: NLL {g_nll} vs {c_nll}"
            );
            assert!(
                (g_kl - c_kl).abs() < 1e-4 * c_kl.abs().max(1.0),
                "{kind:?} step {step}: KL {g_kl} vs {c_kl}"
            );
        }
        let diff = max_abs_diff(&gpu_scores, &cpu_scores);
        println!("{kind:?}: scores after three steps differ by {diff:.2e}");
        assert!(diff < 1e-4, "{kind:?}: the trained adapters' scores differ by {diff}");
    }
}
