//! Parity with transformers for the model families beyond Llama 2's shape
//! (`fixtures/families/`, written by its `make.py`): each tiny random
//! model's logits in f32 (within 1e-4) and in f64 (within 1e-5 of
//! transformers' float64 logits: transformers computes the rotary angles in
//! float32 whatever the model's dtype, `LlamaRotaryEmbedding.forward` in
//! `modeling_llama.py`, which leaves about 3e-6 in its float64 logits), and
//! each fixture's negative control: the
//! logits with the family's feature switched off differ by far more than
//! the tolerance, so the test cannot pass with the feature ignored.

mod common;

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use common::gguf_writer::{folder_as_gguf, Quant};
use common::read_npy;
use melora_core::{NoiseSource, Sampler, SamplingMode};
use melora_llama::model::RopeScaling;
use melora_llama::weights::{build, gguf::GgufSource, safetensors::SafetensorsSource};
use melora_llama::LlamaConfig;
use std::path::PathBuf;

fn family(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

/// The logits of the fixture's model built from `config`, as f64.
fn logits<B: Backend>(name: &str, config: &LlamaConfig) -> Vec<f64> {
    let dir = family(name);
    let ids = read_npy(dir.join("input_ids.npy"));
    let mut source = SafetensorsSource::open(&dir).unwrap();
    let device = Default::default();
    let (model, report) = build::<B, _>(config, &mut source, &device).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(ids.i64.clone(), [ids.shape[0], ids.shape[1]]), &device);
    let mut noise = NoiseSource::seeded(0);
    let out = model.forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    out.into_data().convert::<f64>().to_vec().unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Parity in f32 and f64 and the negative control, with `off` the
/// configuration without the family's feature.
fn check(name: &str, off: impl Fn(LlamaConfig) -> LlamaConfig) {
    let dir = family(name);
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let f32_ref: Vec<f64> = read_npy(dir.join("logits.npy")).f32.iter().map(|&v| v as f64).collect();
    let f64_ref = read_npy(dir.join("logits_f64.npy")).f64;
    let f32_diff = max_diff(&logits::<NdArray<f32>>(name, &config), &f32_ref);
    let f64_diff = max_diff(&logits::<NdArray<f64>>(name, &config), &f64_ref);
    let control = max_diff(&logits::<NdArray<f64>>(name, &off(config)), &f64_ref);
    println!(
        "{name}: max |logit diff| f32 {f32_diff:.2e}, f64 {f64_diff:.2e}; negative control (feature off) {control:.3}"
    );
    assert!(f32_diff < 1e-4, "{name}: f32 logits differ by {f32_diff}");
    assert!(f64_diff < 1e-5, "{name}: f64 logits differ by {f64_diff}");
    assert!(
        control > 1e-2,
        "{name}: switching the feature off changes the logits by only {control}"
    );
}

/// Llama 3.1's rope scaling (`rope_parameters.rope_type = llama3`).
#[test]
fn llama3_rope_scaling_matches_transformers() {
    check("llama3", |c| c.with_rope_scaling(RopeScaling::None));
}

/// An exported model's `config.json` says the rope scaling it was built
/// with, and reads back to the same configuration.
#[test]
fn the_exported_config_keeps_the_rope_scaling() {
    let config = LlamaConfig::from_hf_json(&family("llama3").join("config.json")).unwrap();
    let json = melora_llama::weights::export::hf_config(&config, None).unwrap();
    assert_eq!(json["rope_scaling"]["rope_type"], "llama3");
    let path = std::env::temp_dir().join(format!("melora-llama3-config-{}.json", std::process::id()));
    std::fs::write(&path, json.to_string()).unwrap();
    assert_eq!(LlamaConfig::from_hf_json(&path).unwrap(), config);
    std::fs::remove_file(&path).ok();
}

/// The Llama 3 model as a GGUF stores it: llama.cpp's converter writes the
/// scaling as a divisor per frequency (`rope_freqs.weight`,
/// `convert_hf_to_gguf.py`, `LlamaModel.generate_extra_tensors`), computed
/// here as it does; melora reads it with the configuration and gives
/// transformers' logits.
#[test]
fn llama3_as_gguf_with_rope_freqs_matches_transformers() {
    let dir = family("llama3");
    let hf = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = hf.rope_scaling
    else {
        panic!("a llama3 fixture")
    };
    let original = original_max_position_embeddings as f32;
    let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
    let half = hf.head_dim / 2;
    let factors: Vec<f32> = (0..half)
        .map(|i| {
            let freq = 1.0 / (hf.rope_theta as f32).powf(2.0 * i as f32 / hf.head_dim as f32);
            let wavelength = 2.0 * std::f32::consts::PI / freq;
            if wavelength < original / high {
                1.0
            } else if wavelength > original / low {
                factor
            } else {
                let smooth = (original / wavelength - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    let extra = vec![("rope_freqs.weight".to_string(), vec![half], factors, Quant::F32)];
    let path = std::env::temp_dir().join(format!("melora-llama3-{}.gguf", std::process::id()));
    std::fs::write(&path, folder_as_gguf(&dir, |_| Quant::F32, extra)).unwrap();
    let mut source = GgufSource::open(&path).unwrap();
    let config = source.config().unwrap();
    assert!(matches!(config.rope_scaling, RopeScaling::Factors { .. }));
    let ids = read_npy(dir.join("input_ids.npy"));
    let device = Default::default();
    let (model, report) = build::<NdArray<f32>, _>(&config, &mut source, &device).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    let tokens = Tensor::from_data(TensorData::new(ids.i64.clone(), [ids.shape[0], ids.shape[1]]), &device);
    let mut noise = NoiseSource::seeded(0);
    let out = model.forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    let values: Vec<f64> = out.into_data().convert::<f64>().to_vec().unwrap();
    let expected: Vec<f64> = read_npy(dir.join("logits.npy")).f32.iter().map(|&v| v as f64).collect();
    let diff = max_diff(&values, &expected);
    println!("llama3 from GGUF with rope_freqs: max |logit diff| {diff:.2e}");
    assert!(diff < 1e-4, "GGUF logits differ by {diff}");
    // Its configuration has no Hugging Face spelling: export refuses it.
    let err = melora_llama::weights::export::hf_config(&config, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_freqs"), "{err}");
    std::fs::remove_file(&path).ok();
}
