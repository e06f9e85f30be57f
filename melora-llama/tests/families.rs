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
use melora_llama::model::cache::KvCache;
use melora_llama::model::{attention_mask, Family, Llama, Proj, RopeScaling};
use melora_llama::weights::peft::load_adapter;
use melora_llama::weights::{build, gguf::GgufSource, safetensors::SafetensorsSource};
use melora_llama::LlamaConfig;
use std::path::PathBuf;

fn family(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(name)
}

/// `model`'s logits on the fixture `dir`'s input, as f64.
fn forward<B: Backend>(model: &Llama<B>, dir: &std::path::Path) -> Vec<f64> {
    let ids = read_npy(dir.join("input_ids.npy"));
    let tokens = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.i64.clone(), [ids.shape[0], ids.shape[1]]),
        &model.embed_tokens.weight.device(),
    );
    let mut noise = NoiseSource::seeded(0);
    let out = model.forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    out.into_data().convert::<f64>().to_vec().unwrap()
}

/// A fixture's f32 reference logits (`logits.npy`, `logits_lora.npy`) as f64.
fn reference(dir: &std::path::Path, file: &str) -> Vec<f64> {
    read_npy(dir.join(file)).f32.iter().map(|&v| v as f64).collect()
}

/// The logits of the fixture's model built from `config` and then
/// changed by `edit`, as f64.
fn logits<B: Backend>(name: &str, config: &LlamaConfig, edit: impl Fn(&mut Llama<B>)) -> Vec<f64> {
    let dir = family(name);
    let mut source = SafetensorsSource::open(&dir).unwrap();
    let (mut model, report) = build::<B, _>(config, &mut source, &Default::default()).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    edit(&mut model);
    forward(&model, &dir)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The fixture's configuration as melora reads it.
fn config(name: &str) -> LlamaConfig {
    LlamaConfig::from_hf_json(&family(name).join("config.json")).unwrap()
}

/// Parity in f32 and f64 and the negative control: `off` switches the
/// family's feature off in the built model (as `make.py` does in
/// transformers' for its own control).
fn check(name: &str, off: impl Fn(&mut Llama<NdArray<f64>>)) {
    let dir = family(name);
    let config = config(name);
    let f32_ref = reference(&dir, "logits.npy");
    let f64_ref = read_npy(dir.join("logits_f64.npy")).f64;
    let f32_diff = max_diff(&logits::<NdArray<f32>>(name, &config, |_| ()), &f32_ref);
    let f64_diff = max_diff(&logits::<NdArray<f64>>(name, &config, |_| ()), &f64_ref);
    let control = max_diff(&logits::<NdArray<f64>>(name, &config, off), &f64_ref);
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
    check("llama3", |m| m.rope_scaling = RopeScaling::None);
}

/// Qwen2's query, key and value biases; the control drops them.
#[test]
fn qwen2_biases_match_transformers() {
    let c = config("qwen2");
    assert_eq!((c.family, c.qkv_bias, c.o_bias), (Family::Qwen2, true, false));
    check("qwen2", |m| {
        for layer in &mut m.layers {
            for (name, proj) in layer.projections_mut() {
                if let (true, Proj::Base(linear)) = (name.starts_with("self_attn"), proj) {
                    linear.bias = None;
                }
            }
        }
    });
}

/// A Llama with `attention_bias`: biases on q, k, v and o; the control
/// drops them.
#[test]
fn llama_attention_biases_match_transformers() {
    let c = config("llama-bias");
    assert_eq!((c.family, c.qkv_bias, c.o_bias), (Family::Llama, true, true));
    check("llama-bias", |m| {
        for layer in &mut m.layers {
            for (_, proj) in layer.projections_mut() {
                if let Proj::Base(linear) = proj {
                    linear.bias = None;
                }
            }
        }
    });
}

/// Qwen3's per-head query and key norms, with head_dim (32) unlike hidden /
/// heads (16) and biases on all four attention projections; the control
/// drops the norms.
#[test]
fn qwen3_head_norms_match_transformers() {
    let c = config("qwen3");
    assert_eq!(
        (c.family, c.qk_norm, c.head_dim, c.qkv_bias, c.o_bias),
        (Family::Qwen3, true, 32, true, true)
    );
    check("qwen3", |m| {
        for layer in &mut m.layers {
            layer.self_attn.q_norm = None;
            layer.self_attn.k_norm = None;
        }
    });
}

/// Mistral's sliding window (5 positions of a 16-token input); the control
/// attends to every earlier position.
#[test]
fn mistral_sliding_window_matches_transformers() {
    let c = config("mistral");
    assert_eq!((c.family, c.sliding_window), (Family::Mistral, Some(5)));
    check("mistral", |m| m.sliding_window = None);
}

/// The window holds on the two other paths through the model: generation,
/// one token at a time after a cache (whose keys soon reach past the
/// window), and the laid-out batches of answer scoring and training (a
/// position per token, a caller's mask): both give the full forward's logits.
#[test]
fn the_sliding_window_holds_in_generation_and_laid_out_batches() {
    type B = NdArray<f64>;
    let dir = family("mistral");
    let config = config("mistral");
    let ids = read_npy(dir.join("input_ids.npy"));
    let (batch, seq) = (ids.shape[0], ids.shape[1]);
    let mut source = SafetensorsSource::open(&dir).unwrap();
    let device = Default::default();
    let (model, _) = build::<B, _>(&config, &mut source, &device).unwrap();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.i64.clone(), [batch, seq]), &device);
    let mut noise = NoiseSource::seeded(0);
    let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise);
    let full: Vec<f64> = model
        .forward(tokens.clone(), None, &mut sampler)
        .into_data()
        .convert::<f64>()
        .to_vec()
        .unwrap();
    let vocab = config.vocab_size;
    // Generation: a prefix of 3, then one token at a time.
    let mut cache = KvCache::new(config.num_hidden_layers);
    let mut stepwise = vec![0f64; full.len()];
    let mut start = 0;
    for len in std::iter::once(3).chain(std::iter::repeat_n(1, seq - 3)) {
        let step = tokens.clone().narrow(1, start, len);
        let hidden = model.hidden(step, None, Some(&mut cache), &mut sampler);
        let out: Vec<f64> = model.logits(hidden).into_data().convert::<f64>().to_vec().unwrap();
        for b in 0..batch {
            for j in 0..len {
                let (src, dst) = ((b * len + j) * vocab, (b * seq + start + j) * vocab);
                stepwise[dst..dst + vocab].copy_from_slice(&out[src..src + vocab]);
            }
        }
        start += len;
    }
    let generation = max_diff(&stepwise, &full);
    // Laid out: positions given, the causal mask given, the window added.
    let positions: Vec<usize> = (0..batch).flat_map(|_| 0..seq).collect();
    let mask = attention_mask::<B>(batch, 0, seq, None, None, &device);
    let hidden = model.hidden_laid_out(tokens, &positions, mask, &mut sampler);
    let laid_out = max_diff(
        &model
            .logits(hidden)
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap(),
        &full,
    );
    println!("mistral window: generation with a cache {generation:.2e}, laid-out batch {laid_out:.2e}");
    assert!(generation < 1e-9, "generation differs by {generation}");
    assert!(laid_out < 1e-9, "laid-out batch differs by {laid_out}");
}

/// An exported model's `config.json` says the rope scaling it was built
/// with, and reads back to the same configuration.
#[test]
fn the_exported_config_keeps_the_rope_scaling() {
    let config = config("llama3");
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
    let (model, report) = build::<NdArray<f32>, _>(&config, &mut source, &Default::default()).unwrap();
    assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
    let diff = max_diff(&forward(&model, &dir), &reference(&dir, "logits.npy"));
    println!("llama3 from GGUF with rope_freqs: max |logit diff| {diff:.2e}");
    assert!(diff < 1e-4, "GGUF logits differ by {diff}");
    // Its configuration has no Hugging Face spelling: export refuses it.
    let err = melora_llama::weights::export::hf_config(&config, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_freqs"), "{err}");
    std::fs::remove_file(&path).ok();
}

/// Qwen2 and Qwen3 as llama.cpp's converter writes them (`qwen2` / `qwen3`
/// architectures, Q/K rows not permuted, biases as `attn_q.bias`, head norms
/// as `attn_q_norm.weight`, the head width as `attention.key_length`), and
/// the biased Llama as a `llama` GGUF (its Q/K biases permuted with the
/// rows, `conversion/llama.py`): read back to the same features and
/// transformers' logits.
#[test]
fn biased_and_qwen_families_as_gguf_match_transformers() {
    for name in ["qwen2", "qwen3", "llama-bias"] {
        let dir = family(name);
        let path = std::env::temp_dir().join(format!("melora-{name}-{}.gguf", std::process::id()));
        std::fs::write(&path, folder_as_gguf(&dir, |_| Quant::F32, Vec::new())).unwrap();
        let mut source = GgufSource::open(&path).unwrap();
        let gguf_config = source.config().unwrap();
        let hf = config(name);
        assert_eq!(
            (
                gguf_config.family,
                gguf_config.qkv_bias,
                gguf_config.o_bias,
                gguf_config.qk_norm,
                gguf_config.head_dim
            ),
            (hf.family, hf.qkv_bias, hf.o_bias, hf.qk_norm, hf.head_dim),
            "{name}"
        );
        let (model, report) = build::<NdArray<f32>, _>(&gguf_config, &mut source, &Default::default()).unwrap();
        assert!(report.unused.is_empty(), "unused: {:?}", report.unused);
        let diff = max_diff(&forward(&model, &dir), &reference(&dir, "logits.npy"));
        println!("{name} from GGUF: max |logit diff| {diff:.2e}");
        assert!(diff < 1e-4, "{name}: GGUF logits differ by {diff}");
        std::fs::remove_file(&path).ok();
    }
}

/// A LoRA adapter PEFT wrote for each family (on q, k, v and o: in Qwen2
/// and Qwen3 on the biased projections) loads and gives PEFT's logits.
#[test]
fn peft_adapters_of_every_family_give_peft_logits() {
    for name in ["llama3", "llama-bias", "qwen2", "qwen3", "mistral"] {
        let dir = family(name);
        let config = config(name);
        let device = Default::default();
        let (base, _) =
            build::<NdArray<f32>, _>(&config, &mut SafetensorsSource::open(&dir).unwrap(), &device).unwrap();
        let (model, _) = load_adapter(base, &dir.join("lora"), &device).unwrap();
        assert_eq!(model.adapters().len(), 4 * config.num_hidden_layers, "{name}");
        let diff = max_diff(&forward(&model, &dir), &reference(&dir, "logits_lora.npy"));
        println!("{name} with PEFT's LoRA: max |logit diff| {diff:.2e}");
        assert!(diff < 1e-4, "{name}: adapted logits differ by {diff}");
    }
}
