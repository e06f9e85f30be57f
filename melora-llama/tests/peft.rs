//! The PEFT adapter of the fixtures: loads into `LoraLinear`, reproduces
//! PEFT's logits, gradients and one AdamW step; melora's own adapter files
//! round-trip.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use common::{fixture, max_abs_diff, read_npy, read_npz};
use melora_core::{
    AdapterConfig, AnyAdapter, BlobLinearConfig, LowRankConfig, MeLoraLinearConfig, NoiseSource, Sampler, SamplingMode,
};
use melora_llama::model::Target;
use melora_llama::weights::peft::{load_adapter, save_adapter};
use melora_llama::weights::{build, safetensors::SafetensorsSource};
use melora_llama::{Llama, LlamaConfig};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

fn base<Bk: Backend>() -> Llama<Bk> {
    let dir = fixture("tied");
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    build::<Bk, _>(
        &config,
        &mut SafetensorsSource::open(&dir).unwrap(),
        &Default::default(),
    )
    .unwrap()
    .0
}

fn with_peft<Bk: Backend>() -> Llama<Bk> {
    load_adapter(base::<Bk>(), &fixture("tied/lora"), &Default::default())
        .unwrap()
        .0
}

fn loss<Bk: Backend>(model: &Llama<Bk>) -> (Tensor<Bk, 3>, Tensor<Bk, 1>) {
    let ids = read_npy(fixture("tied/input_ids.npy"));
    let (batch, seq) = (ids.shape[0], ids.shape[1]);
    let device = Default::default();
    let tokens = Tensor::<Bk, 2, Int>::from_data(TensorData::new(ids.i64.clone(), [batch, seq]), &device);
    let mut noise = NoiseSource::seeded(0);
    let logits = model.forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise));
    let [_, _, vocab] = logits.dims();
    let targets: Vec<i64> = (0..batch)
        .flat_map(|b| ids.i64[b * seq + 1..(b + 1) * seq].to_vec())
        .collect();
    let targets = Tensor::<Bk, 3, Int>::from_data(TensorData::new(targets, [batch, seq - 1, 1]), &device);
    let nll = log_softmax(logits.clone().slice([0..batch, 0..seq - 1, 0..vocab]), 2)
        .gather(2, targets)
        .mean()
        .neg();
    (logits, nll)
}

/// The fixture's name of a LoRA matrix: `base_model.model.{path}.lora_A.default.weight`.
fn npz_name(path: &str, matrix: &str) -> String {
    format!("base_model.model.{path}.{matrix}.default.weight")
}

#[test]
fn peft_adapter_reproduces_peft_logits_and_loss() {
    let model = with_peft::<B>();
    assert_eq!(model.adapters().len(), 4);
    let (logits, nll) = loss(&model);
    let expected = read_npy(fixture("tied/lora/logits_lora.npy"));
    let diff = max_abs_diff(&logits.into_data().to_vec::<f32>().unwrap(), &expected.f32);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tied/lora/ref.json")).unwrap()).unwrap();
    let (ours, theirs) = (nll.into_scalar() as f64, reference["loss"].as_f64().unwrap());
    println!("LoRA logits max diff {diff:.2e}; loss {ours:.7} vs {theirs:.7}");
    assert!(diff < 1e-4, "logits differ by {diff}");
    assert!((ours - theirs).abs() / theirs < 1e-5);
}

#[test]
fn lora_gradients_and_one_adamw_step_match_pytorch() {
    let model = with_peft::<AD>();
    let (_, nll) = loss(&model);
    let grads = nll.backward();
    let expected = read_npz(fixture("tied/lora/grads.npz"));
    let mut worst: f32 = 0.0;
    for (path, adapter) in model.adapters() {
        let AnyAdapter::Lora(lora) = adapter else {
            panic!("expected LoRA")
        };
        for (matrix, param) in [("lora_A", &lora.low_rank.lora_a), ("lora_B", &lora.low_rank.lora_b)] {
            let ours: Vec<f32> = param.val().grad(&grads).unwrap().into_data().to_vec().unwrap();
            let theirs = &expected[&npz_name(&path, matrix)].f32;
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&ours, theirs);
            worst = worst.max(diff / scale);
            assert!(
                diff <= 1e-4 * scale + 1e-7,
                "{path}.{matrix}: gradient differs by {diff} (max |g| {scale})"
            );
        }
    }
    println!("worst relative gradient difference {worst:.2e}");
    // Base weights get no gradient.
    assert!(model.embed_tokens.weight.val().grad(&grads).is_none());

    // One AdamW step, lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    let grads = GradientsParams::from_grads(grads, &model);
    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<AD, Llama<AD>>();
    let model = optim.step(1e-3, model, grads).valid();
    let after = read_npz(fixture("tied/lora/after_adamw.npz"));
    for (path, adapter) in model.adapters() {
        let AnyAdapter::Lora(lora) = adapter else {
            panic!("expected LoRA")
        };
        for (matrix, param) in [("lora_A", &lora.low_rank.lora_a), ("lora_B", &lora.low_rank.lora_b)] {
            let ours: Vec<f32> = param.val().into_data().to_vec().unwrap();
            let diff = max_abs_diff(&ours, &after[&npz_name(&path, matrix)].f32);
            assert!(diff < 1e-6, "{path}.{matrix} after AdamW differs by {diff}");
        }
    }
}

#[test]
fn blob_and_melora_adapters_round_trip_through_files() {
    let device = Default::default();
    let configs = [
        AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(LowRankConfig::new().with_rank(4))),
        AdapterConfig::MeLora(MeLoraLinearConfig::new().with_low_rank(LowRankConfig::new().with_rank(4))),
    ];
    for config in configs {
        // Fresh adapters with a random, non-zero B so that they matter.
        let mut noise = NoiseSource::seeded(4);
        let model = base::<B>()
            .map_projections(&[Target::Q, Target::V, Target::Down], |_, linear| {
                let mut adapter = config.init(linear, &mut noise)?;
                let b = match &mut adapter {
                    AnyAdapter::Lora(a) => &mut a.low_rank.lora_b,
                    AnyAdapter::Blob(a) => &mut a.low_rank.lora_b,
                    AnyAdapter::MeLora(a) => &mut a.low_rank.lora_b,
                };
                *b = Param::from_tensor(noise.normal::<B, 2>(b.dims(), &Default::default()));
                Ok(adapter)
            })
            .unwrap();
        let dir = std::env::temp_dir().join(format!("melora-adapter-{}-{:?}", std::process::id(), config.kind()));
        save_adapter(&model, &config, &dir, "tiny-llama/tied").unwrap();
        let (loaded, meta) = load_adapter(base::<B>(), &dir, &device).unwrap();
        assert_eq!(meta.targets, vec![Target::Q, Target::V, Target::Down]);
        assert_eq!(loaded.num_trainable(), model.num_trainable());
        for ((p1, a1), (p2, a2)) in model.adapters().iter().zip(loaded.adapters()) {
            assert_eq!(p1, &p2);
            let (d1, d2): (Vec<f32>, Vec<f32>) = (
                a1.delta_weight().into_data().to_vec().unwrap(),
                a2.delta_weight().into_data().to_vec().unwrap(),
            );
            assert_eq!(d1, d2);
            assert!(
                d1.iter().any(|v| *v != 0.0),
                "{p1}: the test adapter should be non-zero"
            );
            use melora_core::Adapter;
            let (k1, k2): (f32, f32) = (a1.kl(0.2).into_scalar(), a2.kl(0.2).into_scalar());
            assert_eq!(k1, k2, "{p1}: KL differs after the round trip");
        }
        // The configuration as written before BLoB's and Me-LoRA's own
        // settings had their section reads the same.
        let path = dir.join("adapter_config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let section = json["melora"].as_object_mut().unwrap().values_mut().next().unwrap();
        let posterior = section.as_object_mut().unwrap().remove("posterior").unwrap();
        for (k, v) in posterior.as_object().unwrap() {
            section[k] = v.clone();
        }
        std::fs::write(&path, json.to_string()).unwrap();
        let (_, older) = load_adapter(base::<B>(), &dir, &device).unwrap();
        assert_eq!(format!("{:?}", older.config), format!("{:?}", meta.config));
        // A missing tensor is named.
        let file = dir.join("adapter_model.safetensors");
        std::fs::remove_file(&file).unwrap();
        let err = load_adapter(base::<B>(), &dir, &device).err().unwrap().to_string();
        assert!(err.contains("adapter_model.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
