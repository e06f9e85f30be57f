//! Parity with Hugging Face transformers on the tiny-llama fixtures: logits
//! within 1e-4, causal-LM loss within 1e-5 relative, for tied and untied
//! output layers.

mod common;

use burn::backend::NdArray;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use common::{fixture, max_abs_diff, read_npy};
use melora_core::{NoiseSource, Sampler, SamplingMode};
use melora_llama::weights::{build, safetensors::SafetensorsSource, HostTensor, WeightSource};
use melora_llama::{Llama, LlamaConfig};

type B = NdArray<f32>;

fn load(which: &str) -> Llama<B> {
    let dir = fixture(which);
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let mut source = SafetensorsSource::open(&dir).unwrap();
    let (model, report) = build::<B, _>(&config, &mut source, &Default::default()).unwrap();
    assert!(report.unused.is_empty(), "unused tensors: {:?}", report.unused);
    model
}

/// Mean next-token cross-entropy over every position of every sequence.
pub fn causal_lm_loss(logits: Tensor<B, 3>, ids: &[i64], batch: usize, seq: usize) -> f64 {
    let [_, _, vocab] = logits.dims();
    let shifted = logits.slice([0..batch, 0..seq - 1, 0..vocab]);
    let targets: Vec<i64> = (0..batch)
        .flat_map(|b| ids[b * seq + 1..(b + 1) * seq].to_vec())
        .collect();
    let targets = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [batch, seq - 1, 1]), &Default::default());
    let nll: f32 = log_softmax(shifted, 2).gather(2, targets).mean().neg().into_scalar();
    nll as f64
}

fn check(which: &str) {
    let dir = fixture(which);
    let ids = read_npy(dir.join("input_ids.npy"));
    let expected = read_npy(dir.join("logits.npy"));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json")).unwrap()).unwrap();
    let (batch, seq) = (ids.shape[0], ids.shape[1]);
    let model = load(which);
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.i64.clone(), [batch, seq]), &Default::default());
    let mut noise = NoiseSource::seeded(0);
    let logits = model.forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    let values: Vec<f32> = logits.to_data().to_vec().unwrap();
    let diff = max_abs_diff(&values, &expected.f32);
    let loss = causal_lm_loss(logits, &ids.i64, batch, seq);
    let ref_loss = reference["loss"].as_f64().unwrap();
    println!(
        "{which}: max |logit diff| = {diff:.2e}, loss {loss:.7} vs {ref_loss:.7} (rel {:.1e})",
        (loss - ref_loss).abs() / ref_loss
    );
    assert!(diff < 1e-4, "{which}: logits differ by {diff}");
    assert!(
        (loss - ref_loss).abs() / ref_loss < 1e-5,
        "{which}: loss {loss} vs {ref_loss}"
    );
}

#[test]
fn tied_model_matches_transformers() {
    check("tied");
}

#[test]
fn untied_model_matches_transformers() {
    check("untied");
}

#[test]
fn padded_batch_gives_the_unpadded_logits() {
    // Left-pad the first sequence by 3 and right-pad the second by 3: the
    // real tokens' logits must not change.
    let dir = fixture("tied");
    let ids = read_npy(dir.join("input_ids.npy"));
    let seq = ids.shape[1];
    let model = load("tied");
    let device = Default::default();
    let mut noise = NoiseSource::seeded(0);
    let run = |tokens: Vec<i64>, padding: Option<&[Vec<bool>]>, noise: &mut NoiseSource| -> Vec<f32> {
        let n = tokens.len() / 2;
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [2, n]), &device);
        model
            .forward(t, padding, &mut Sampler::new(SamplingMode::Mean, noise))
            .into_data()
            .to_vec()
            .unwrap()
    };
    let plain = run(ids.i64.clone(), None, &mut noise);
    let pad = 3;
    let mut padded = vec![0i64; pad];
    padded.extend(&ids.i64[..seq]);
    padded.extend(&ids.i64[seq..]);
    padded.extend(vec![0i64; pad]);
    let mask = vec![
        (0..seq + pad).map(|j| j >= pad).collect::<Vec<_>>(),
        (0..seq + pad).map(|j| j < seq).collect::<Vec<_>>(),
    ];
    let out = run(padded, Some(&mask), &mut noise);
    let vocab = 256;
    let width = (seq + pad) * vocab;
    let first = &out[pad * vocab..width];
    let second = &out[width..width + seq * vocab];
    assert!(
        max_abs_diff(first, &plain[..seq * vocab]) < 1e-4,
        "left padding changed the logits"
    );
    assert!(
        max_abs_diff(second, &plain[seq * vocab..]) < 1e-4,
        "right padding changed the logits"
    );
    assert!(out.iter().all(|v| v.is_finite()), "padding produced non-finite logits");
}

#[test]
fn kv_cache_generation_matches_the_full_forward() {
    let dir = fixture("untied");
    let ids = read_npy(dir.join("input_ids.npy"));
    let seq = ids.shape[1];
    let model = load("untied");
    let device = Default::default();
    let mut noise = NoiseSource::seeded(0);
    let mut sampler = Sampler::new(SamplingMode::Mean, &mut noise);
    let first: Vec<i64> = ids.i64[..seq].to_vec();
    let full = model.forward(
        Tensor::from_data(TensorData::new(first.clone(), [1, seq]), &device),
        None,
        &mut sampler,
    );
    let full: Vec<f32> = full.into_data().to_vec().unwrap();
    let mut cache = melora_llama::model::cache::KvCache::new(model.n_layers());
    let split = 10;
    let prefix = Tensor::<B, 2, Int>::from_data(TensorData::new(first[..split].to_vec(), [1, split]), &device);
    let mut cached: Vec<f32> = model
        .logits(model.hidden(prefix, None, Some(&mut cache), &mut sampler))
        .into_data()
        .to_vec()
        .unwrap();
    for &token in &first[split..] {
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![token], [1, 1]), &device);
        let step: Vec<f32> = model
            .logits(model.hidden(t, None, Some(&mut cache), &mut sampler))
            .into_data()
            .to_vec()
            .unwrap();
        cached.extend(step);
    }
    assert_eq!(cache.len(), seq);
    assert!(max_abs_diff(&cached, &full) < 1e-4);
}

#[test]
fn shape_mismatch_and_missing_tensor_are_named() {
    let dir = fixture("tied");
    let mut config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    config.intermediate_size = 96;
    let mut source = SafetensorsSource::open(&dir).unwrap();
    let err = build::<B, _>(&config, &mut source, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        "shape mismatch for model.layers.0.mlp.gate_proj.weight: expected [96, 64], found [128, 64]"
    );
    let mut config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    config.tie_word_embeddings = false;
    let err = build::<B, _>(&config, &mut source, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("missing tensor lm_head.weight in "), "{err}");
}

#[test]
fn random_weights_drawn_on_the_device_have_the_right_shapes_and_spread() {
    use melora_llama::model::Proj;
    use melora_llama::weights::RandomSource;
    let mut config = LlamaConfig::from_hf_json(&fixture("tied").join("config.json")).unwrap();
    config.tie_word_embeddings = false;
    let device = Default::default();
    let stats = |t: Tensor<B, 2>| {
        let v: Vec<f32> = t.into_data().to_vec().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (
            mean,
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt(),
        )
    };
    for on_device in [false, true] {
        let source = RandomSource::new(&config, 0);
        let mut source = if on_device { source.on_device() } else { source };
        let (model, report) = build::<B, _>(&config, &mut source, &device).unwrap();
        assert!(report.unused.is_empty());
        let head = &model.lm_head.as_ref().unwrap().weight;
        assert_eq!(head.dims(), [config.hidden_size, config.vocab_size]);
        let Proj::Base(gate) = &model.layers[0].mlp.gate_proj else {
            panic!("no adapter was asked for")
        };
        assert_eq!(gate.weight.dims(), [config.hidden_size, config.intermediate_size]);
        for w in [model.embed_tokens.weight.val(), head.val(), gate.weight.val()] {
            let (mean, std) = stats(w);
            assert!(
                mean.abs() < 2e-3 && (std - 0.02).abs() < 1e-3,
                "on device {on_device}: mean {mean}, std {std}"
            );
        }
        let norm: Vec<f32> = model.norm.gamma.val().into_data().to_vec().unwrap();
        assert!(norm.iter().all(|&g| g == 1.0));
    }
}

#[test]
fn silu_in_f32_is_accurate_and_repeatable() {
    // In an f32-only test binary (the device's default float type is shared
    // by every backend in a process). ndarray's f32 SIMD `recip` once gave
    // SiLU a 5e-5 relative error, on elements that depended on alignment.
    let device = Default::default();
    let x = melora_core::NoiseSource::seeded(5)
        .normal::<B, 1>([4099], &device)
        .mul_scalar(3.0);
    assert_eq!(x.dtype(), burn::tensor::DType::F32);
    let xs: Vec<f32> = x.clone().into_data().to_vec().unwrap();
    let first: Vec<f32> = melora_kernels::silu(x.clone()).into_data().to_vec().unwrap();
    for _ in 0..20 {
        let again: Vec<f32> = melora_kernels::silu(x.clone()).into_data().to_vec().unwrap();
        assert_eq!(again, first);
    }
    for (x, y) in xs.iter().zip(&first) {
        let exact = *x as f64 / (1.0 + (-*x as f64).exp());
        assert!(
            (exact - *y as f64).abs() <= 1e-6 * exact.abs().max(1e-3),
            "silu({x}) = {y}, exactly {exact}"
        );
    }
}

/// Writes the fixture's tensors into `files` shards of the given dtype, with
/// the index file, and returns the folder.
fn resharded(files: usize, dtype: safetensors::Dtype) -> std::path::PathBuf {
    use melora_llama::weights::WeightSource;
    let src = fixture("untied");
    let dir = std::env::temp_dir().join(format!("melora-{}-shards-{files}-{dtype:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut source = SafetensorsSource::open(&src).unwrap();
    let names = source.names();
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(files)).enumerate() {
        let file = format!("model-{:05}-of-{files:05}.safetensors", shard + 1);
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|name| {
                let t = source.load(name).unwrap().unwrap();
                let bytes: Vec<u8> = match dtype {
                    safetensors::Dtype::F16 => t
                        .values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    safetensors::Dtype::BF16 => t
                        .values
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                    _ => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
                (name.clone(), t.shape, bytes)
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::write(dir.join(&file), safetensors::serialize(views, None).unwrap()).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    dir
}

#[test]
fn sharded_f16_and_bf16_folders_load() {
    let ids = read_npy(fixture("untied").join("input_ids.npy"));
    let expected = read_npy(fixture("untied").join("logits.npy"));
    for (dtype, tol) in [
        (safetensors::Dtype::F32, 1e-4),
        (safetensors::Dtype::F16, 2e-2),
        (safetensors::Dtype::BF16, 1.5e-1),
    ] {
        let dir = resharded(3, dtype);
        let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
        let mut source = SafetensorsSource::open(&dir).unwrap();
        let (model, report) = build::<B, _>(&config, &mut source, &Default::default()).unwrap();
        assert!(report.unused.is_empty());
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.i64.clone(), [ids.shape[0], ids.shape[1]]),
            &Default::default(),
        );
        let mut noise = NoiseSource::seeded(0);
        let logits: Vec<f32> = model
            .forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise))
            .into_data()
            .to_vec()
            .unwrap();
        let diff = max_abs_diff(&logits, &expected.f32);
        println!("3 shards of {dtype:?}: max |logit diff| {diff:.2e}");
        assert!(diff < tol, "{dtype:?}: {diff}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// `hidden_at` (the last layer at the read positions only) equals `hidden`
/// at those positions, for the same row in every example (left padding) and
/// for different rows (right padding): values, and the gradients of every
/// adapter parameter with LoRA on all seven projections (o_proj and the MLP
/// of the last layer then see one row per example).
#[test]
fn hidden_at_equals_hidden_at_those_rows() {
    use burn::backend::Autodiff;
    use melora_core::{AdapterConfig, LoraLinearConfig, LowRankConfig};
    use melora_llama::model::Target;
    type AD = Autodiff<B>;
    let device = Default::default();
    let base = common::tiny_base::<AD>();
    let lora = AdapterConfig::Lora(
        LoraLinearConfig::new().with_low_rank(LowRankConfig::new().with_rank(2).with_alpha(4.0).with_dropout(0.0)),
    );
    let targets = Target::parse_list("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj").unwrap();
    let mut noise = NoiseSource::seeded(5);
    let mut model = base.with_adapters(&lora, &targets, &mut noise).unwrap();
    // Non-zero B, so that every adapter parameter has a gradient.
    for layer in model.layers.iter_mut() {
        for (_, proj) in layer.projections_mut() {
            if let melora_llama::model::Proj::Adapted(melora_core::AnyAdapter::Lora(a)) = proj {
                let dims = a.low_rank.lora_b.val().dims();
                a.low_rank.lora_b =
                    burn::module::Param::from_tensor(noise.normal::<AD, 2>(dims, &device).mul_scalar(0.3));
            }
        }
    }
    let (batch, seq) = (3, 9);
    let ids: Vec<i64> = (0..batch * seq).map(|i| (i as i64 * 37 + 11) % 250 + 3).collect();
    let right_padded: Vec<Vec<bool>> = vec![
        (0..seq).map(|j| j < 9).collect(),
        (0..seq).map(|j| j < 6).collect(),
        (0..seq).map(|j| j < 4).collect(),
    ];
    for (padding, rows) in [(None, vec![seq - 1; batch]), (Some(right_padded), vec![8, 5, 3])] {
        let tokens = || Tensor::<AD, 2, Int>::from_data(TensorData::new(ids.clone(), [batch, seq]), &device);
        let mut noise = NoiseSource::seeded(0);
        let full = model.hidden(
            tokens(),
            padding.as_deref(),
            None,
            &mut Sampler::new(SamplingMode::Mean, &mut noise),
        );
        let full = melora_llama::model::pick_rows(full, 1, &rows);
        let at = model.hidden_at(
            tokens(),
            padding.as_deref(),
            &rows,
            &mut Sampler::new(SamplingMode::Mean, &mut noise),
        );
        assert_eq!(at.dims(), full.dims());
        let (a, f): (Vec<f32>, Vec<f32>) = (at.to_data().to_vec().unwrap(), full.to_data().to_vec().unwrap());
        assert!(
            max_abs_diff(&a, &f) < 1e-5,
            "rows {rows:?}: values differ by {}",
            max_abs_diff(&a, &f)
        );
        // A loss reading the rows with different weights per entry.
        let weights = noise.normal::<AD, 3>(at.dims(), &device);
        let (ga, gf) = (
            at.mul(weights.clone()).sum().backward(),
            full.mul(weights).sum().backward(),
        );
        let mut compared = 0;
        for (name, adapter) in model.adapters() {
            let melora_core::AnyAdapter::Lora(a) = adapter else {
                unreachable!()
            };
            for (which, p) in [("A", a.low_rank.lora_a.val()), ("B", a.low_rank.lora_b.val())] {
                let x: Vec<f32> = p.grad(&ga).expect("gradient").into_data().to_vec().unwrap();
                let y: Vec<f32> = p.grad(&gf).expect("gradient").into_data().to_vec().unwrap();
                let scale = y.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                assert!(
                    max_abs_diff(&x, &y) < 1e-4 * scale,
                    "rows {rows:?}: d/d{which} of {name} differs by {}",
                    max_abs_diff(&x, &y)
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 2 * 7 * model.n_layers());
    }
}

/// A source that adds tensors to the fixture's, as another family's
/// checkpoint would hold them.
struct WithExtra {
    inner: SafetensorsSource,
    extra: Vec<&'static str>,
}

impl WeightSource for WithExtra {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn names(&self) -> Vec<String> {
        let mut names = self.inner.names();
        names.extend(self.extra.iter().map(|n| n.to_string()));
        names
    }
    fn load(&mut self, name: &str) -> melora_llama::Result<Option<HostTensor>> {
        match self.extra.contains(&name) {
            true => Ok(Some(HostTensor {
                shape: vec![2],
                values: vec![0.5; 2],
            })),
            false => self.inner.load(name),
        }
    }
}

/// Tensors a Llama has no place for (a Qwen2 bias, a Qwen3 norm, Llama 3's
/// rope frequencies) are refused, naming the source and the tensors; the
/// rotary buffer older checkpoints save is not.
#[test]
fn leftover_tensors_are_refused() {
    let dir = fixture("tied");
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let open = |extra: Vec<&'static str>| WithExtra {
        inner: SafetensorsSource::open(&dir).unwrap(),
        extra,
    };
    for extra in [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.1.self_attn.k_norm.weight",
        "rope_freqs.weight",
    ] {
        let err = build::<B, _>(&config, &mut open(vec![extra]), &Default::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(&dir.display().to_string()) && err.contains(extra) && err.contains("no place for"),
            "{err}"
        );
    }
    let buffer = "model.layers.0.self_attn.rotary_emb.inv_freq";
    let (_, report) = build::<B, _>(&config, &mut open(vec![buffer]), &Default::default()).unwrap();
    assert_eq!(report.unused, vec![buffer.to_string()]);
}
