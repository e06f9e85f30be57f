//! An adapter on the output projection (`lm_head`, BLoB's
//! `--apply-classhead-lora`) on the tiny fixtures, tied and untied: it
//! starts as the base model, its mean logits (every position, label
//! scoring, answer scoring) are those of the model with its update merged
//! (which unties a tied output layer and leaves the input embedding
//! alone), its per-example draws differ between examples, it survives a
//! save and a load in PEFT's layout, and training moves it and not the
//! embedding.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use common::{answer_examples, fixture, max_abs_diff, parity_examples};
use melora_core::{
    AdapterConfig, AdapterKind, AnyAdapter, BlobLinearConfig, LoraLinearConfig, LowRankConfig, MeLoraLinearConfig,
    NoiseSource, Sampler, SamplingMode,
};
use melora_llama::data::{LengthNorm, Padding};
use melora_llama::eval::PredictConfig;
use melora_llama::model::scoring::Scorer;
use melora_llama::model::Target;
use melora_llama::posterior::PosteriorStats;
use melora_llama::train::{RunDir, TrainConfig, TrainData, Trainer};
use melora_llama::weights::peft::{load_adapter, save_adapter};
use melora_llama::weights::{build, safetensors::SafetensorsSource, WeightSource};
use melora_llama::{Llama, LlamaConfig};

type B = NdArray<f32>;
type AD = Autodiff<NdArray<f32>>;

fn base<Bk: Backend>(which: &str) -> Llama<Bk> {
    let dir = fixture(which);
    let config = LlamaConfig::from_hf_json(&dir.join("config.json")).unwrap();
    build::<Bk, _>(
        &config,
        &mut SafetensorsSource::open(&dir).unwrap(),
        &Default::default(),
    )
    .unwrap()
    .0
}

fn configs() -> [AdapterConfig; 3] {
    let low_rank = LowRankConfig::new().with_rank(4).with_dropout(0.0);
    [
        AdapterConfig::Lora(LoraLinearConfig::new().with_low_rank(low_rank.clone())),
        AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(low_rank.clone())),
        AdapterConfig::MeLora(MeLoraLinearConfig::new().with_low_rank(low_rank)),
    ]
}

/// Adapters on q_proj, v_proj and lm_head, each with a random non-zero `B`
/// (a fresh one has `B = 0` and changes nothing).
fn adapted(which: &str, config: &AdapterConfig, nonzero: bool) -> Llama<B> {
    let mut noise = NoiseSource::seeded(5);
    base::<B>(which)
        .map_projections(&[Target::Q, Target::V, Target::LmHead], |_, linear| {
            let mut adapter = config.init(linear, &mut noise)?;
            if nonzero {
                let b = match &mut adapter {
                    AnyAdapter::Lora(a) => &mut a.low_rank.lora_b,
                    AnyAdapter::Blob(a) => &mut a.low_rank.lora_b,
                    AnyAdapter::MeLora(a) => &mut a.low_rank.lora_b,
                };
                *b = Param::from_tensor(noise.normal::<B, 2>(b.dims(), &Default::default()).mul_scalar(0.5));
            }
            Ok(adapter)
        })
        .unwrap()
}

fn tokens() -> Tensor<B, 2, Int> {
    let ids = common::read_npy(fixture("tied/input_ids.npy"));
    Tensor::from_data(
        TensorData::new(ids.i64.clone(), [ids.shape[0], ids.shape[1]]),
        &Default::default(),
    )
}

fn logits(model: &Llama<B>, mode: SamplingMode, seed: u64) -> Vec<f32> {
    let mut noise = NoiseSource::seeded(seed);
    model
        .forward(tokens(), None, &mut Sampler::new(mode, &mut noise))
        .into_data()
        .to_vec()
        .unwrap()
}

/// Class scores of `examples` under `scorer`.
fn scores(model: &Llama<B>, scorer: &Scorer, examples: &[melora_llama::data::Encoded], mode: SamplingMode) -> Vec<f32> {
    let indices: Vec<usize> = (0..examples.len()).collect();
    let batch = scorer.batch(examples, &indices, Padding::Left);
    let mut noise = NoiseSource::seeded(3);
    scorer
        .scores(model, &batch, &mut Sampler::new(mode, &mut noise), &Default::default())
        .into_data()
        .to_vec()
        .unwrap()
}

fn embedding(model: &Llama<B>) -> Vec<f32> {
    model.embed_tokens.weight.val().into_data().to_vec().unwrap()
}

#[test]
fn a_fresh_output_adapter_is_the_base_model() {
    for which in ["tied", "untied"] {
        let reference = logits(&base::<B>(which), SamplingMode::Mean, 0);
        for config in configs() {
            let model = adapted(which, &config, false);
            assert!(model.head_adapter.is_some());
            assert_eq!(
                logits(&model, SamplingMode::Mean, 0),
                reference,
                "{which} {:?}",
                config.kind()
            );
        }
    }
}

#[test]
fn mean_scores_are_the_merged_models_and_merging_unties() {
    let label = Scorer::label(vec![10, 11], 0);
    let answer = Scorer::answer(3, LengthNorm::None, 0);
    let (label_examples, answer_examples) = (parity_examples(5, 1), answer_examples(4, 2));
    for which in ["tied", "untied"] {
        for config in configs() {
            let model = adapted(which, &config, true);
            let merged = model.clone().merged().unwrap();
            assert!(
                merged.head_adapter.is_none() && merged.lm_head.is_some(),
                "{which}: the merged output layer is its own"
            );
            assert_eq!(
                embedding(&merged),
                embedding(&base::<B>(which)),
                "{which}: the input embedding stays the base one"
            );
            let what = format!("{which} {:?}", config.kind());
            let (a, m) = (
                logits(&model, SamplingMode::Mean, 0),
                logits(&merged, SamplingMode::Mean, 0),
            );
            assert!(max_abs_diff(&a, &m) < 1e-4, "{what}: logits {}", max_abs_diff(&a, &m));
            assert!(
                max_abs_diff(&a, &logits(&base::<B>(which), SamplingMode::Mean, 0)) > 1e-2,
                "{what}: the update should matter"
            );
            for (scorer, examples) in [(&label, &label_examples), (&answer, &answer_examples)] {
                let (a, m) = (
                    scores(&model, scorer, examples, SamplingMode::Mean),
                    scores(&merged, scorer, examples, SamplingMode::Mean),
                );
                assert!(max_abs_diff(&a, &m) < 1e-4, "{what}: scores {}", max_abs_diff(&a, &m));
            }
        }
    }
}

#[test]
fn an_output_adapter_draws_per_example() {
    // Only lm_head adapted; two copies of one question in a batch.
    let answer = Scorer::answer(3, LengthNorm::None, 0);
    let one = answer_examples(1, 7);
    let examples = vec![one[0].clone(), one[0].clone()];
    for config in &configs()[1..] {
        let mut noise = NoiseSource::seeded(8);
        let model = base::<B>("tied")
            .map_projections(&[Target::LmHead], |_, linear| {
                let mut adapter = config.init(linear, &mut noise)?;
                if let AnyAdapter::Blob(a) = &mut adapter {
                    a.low_rank.lora_b =
                        Param::from_tensor(noise.normal::<B, 2>(a.low_rank.lora_b.dims(), &Default::default()));
                    a.lora_a_std = Param::from_tensor(a.lora_a_std.val().mul_scalar(5.0));
                }
                if let AnyAdapter::MeLora(a) = &mut adapter {
                    a.low_rank.lora_b =
                        Param::from_tensor(noise.normal::<B, 2>(a.low_rank.lora_b.dims(), &Default::default()));
                }
                Ok(adapter)
            })
            .unwrap();
        let sampled = scores(&model, &answer, &examples, SamplingMode::PerExample);
        assert!(
            max_abs_diff(&sampled[..3], &sampled[3..]) > 1e-4,
            "{:?}: one draw for both examples: {sampled:?}",
            config.kind()
        );
        let mean = scores(&model, &answer, &examples, SamplingMode::Mean);
        assert_eq!(mean[..3], mean[3..], "{:?}", config.kind());
    }
}

#[test]
fn an_output_adapter_round_trips_through_peft_files() {
    for which in ["tied", "untied"] {
        for config in configs() {
            let model = adapted(which, &config, true);
            let dir = std::env::temp_dir().join(format!(
                "melora-lm-head-{}-{which}-{:?}",
                std::process::id(),
                config.kind()
            ));
            save_adapter(&model, &config, &dir, which).unwrap();
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
            assert_eq!(
                json["target_modules"],
                serde_json::json!(["q_proj", "v_proj", "lm_head"]),
                "{json}"
            );
            let source = SafetensorsSource::single(&dir.join("adapter_model.safetensors")).unwrap();
            let names = source.names();
            assert!(
                names.contains(&"base_model.model.lm_head.lora_A.weight".to_string()),
                "{names:?}"
            );
            let (loaded, meta) = load_adapter(base::<B>(which), &dir, &Default::default()).unwrap();
            assert_eq!(meta.targets, vec![Target::Q, Target::V, Target::LmHead]);
            assert_eq!(
                logits(&loaded, SamplingMode::Mean, 0),
                logits(&model, SamplingMode::Mean, 0),
                "{which} {:?}",
                config.kind()
            );
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}

#[test]
fn training_moves_the_output_adapter_and_not_the_embedding() {
    let train = parity_examples(8, 1);
    let validation = parity_examples(4, 2);
    let scorer = Scorer::label(vec![10, 11], 0);
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let run = RunDir {
            dir: std::env::temp_dir().join(format!("melora-lm-head-train-{}-{kind:?}", std::process::id())),
        };
        std::fs::remove_dir_all(&run.dir).ok();
        let config = TrainConfig::new()
            .with_model("tiny".into())
            .with_method(kind.into())
            .with_rank(4)
            .with_targets(vec![Target::V, Target::LmHead])
            .with_steps(6)
            .with_batch_size(4)
            .with_lr(1e-2)
            .with_eval_every(0)
            .with_predict(PredictConfig::new().with_batch_size(4))
            .with_seed(3);
        let data = TrainData {
            train: &train,
            validation: &validation,
            scorer: &scorer,
        };
        Trainer::new(&config, &run)
            .fit(base::<AD>("tied"), &data, &Default::default())
            .unwrap();
        let (trained, meta) = load_adapter(base::<B>("tied"), &run.last(), &Default::default()).unwrap();
        assert_eq!(meta.targets, vec![Target::V, Target::LmHead]);
        let head = trained.head_adapter.as_ref().expect("the output adapter is saved");
        use melora_core::Adapter;
        let moved: Vec<f32> = head.lora_b().into_data().to_vec().unwrap();
        assert!(
            moved.iter().any(|v| *v != 0.0),
            "{kind:?}: training left the output adapter's B at 0"
        );
        assert_eq!(embedding(&trained), embedding(&base::<B>("tied")), "{kind:?}");
        if kind != AdapterKind::Lora {
            let stats = PosteriorStats::of(&trained).unwrap();
            assert_eq!(
                stats.targets.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
                ["v_proj", "lm_head"]
            );
        }
        std::fs::remove_dir_all(&run.dir).ok();
    }
}

/// PEFT's own lm_head LoRA (tests/fixtures/lm-head-lora/make.py, transformers
/// 5.25 + PEFT 0.21.2): melora loads its files (the output layer's base
/// weight PEFT saves beside them is checked, not refused) and reproduces
/// its logits, tied and untied.
#[test]
fn peft_lm_head_lora_reproduces_peft_logits() {
    let fixtures = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lm-head-lora");
    for which in ["tied", "untied"] {
        let (model, meta) = load_adapter(base::<B>(which), &fixtures.join(which), &Default::default()).unwrap();
        assert!(meta.targets.contains(&Target::LmHead) && model.head_adapter.is_some());
        let expected = common::read_npy(fixtures.join(which).join("logits_lora.npy"));
        let ours = logits(&model, SamplingMode::Mean, 0);
        let gap = max_abs_diff(&ours, &expected.f32);
        assert!(gap < 1e-4, "{which}: {gap}");
        // Without the output adapter the logits would be far off.
        assert!(
            max_abs_diff(
                &logits(&model.clone().merged().unwrap(), SamplingMode::Mean, 0),
                &expected.f32
            ) < 1e-4
        );
        assert!(
            max_abs_diff(&logits(&base::<B>(which), SamplingMode::Mean, 0), &expected.f32) > 1e-2,
            "{which}: the fixture's update should matter"
        );
    }
    // Another output layer is refused by name.
    let err = load_adapter(base::<B>("untied"), &fixtures.join("tied"), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lm_head.base_layer.weight"), "{err}");
}
