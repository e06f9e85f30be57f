//! `melora export` and `melora predict`'s library parts: a merged adapter
//! computes what the adapter computes with its mean weights; the Hugging
//! Face folder written from it loads back to the same logits; non-finite
//! weights are refused; questions files and per-question answers.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Param};
use burn::tensor::{Int, Tensor, TensorData};
use common::{max_abs_diff, parity_examples, tiny_base};
use melora_core::{AdapterKind, AnyAdapter, NoiseDevice, NoiseSource, Sampler, SamplingMode};
use melora_llama::data::{read_questions, Item, Padding};
use melora_llama::eval::SampledProbs;
use melora_llama::model::scoring::Scorer;
use melora_llama::model::Proj;
use melora_llama::train::{Stepper, TrainConfig};
use melora_llama::weights::export::save_hf;
use melora_llama::{Llama, Pretrained};

type B = NdArray<f32>;
type AD = Autodiff<B>;

/// The tiny model with a `kind` adapter trained three steps (so that no
/// part of it is at its initial value).
fn trained(kind: AdapterKind) -> Llama<B> {
    let device = Default::default();
    let config = TrainConfig::new()
        .with_method(kind.into())
        .with_rank(4)
        .with_steps(3)
        .with_lr(5e-2)
        .with_noise(NoiseDevice::Host)
        .with_seed(3);
    let mut model = tiny_base::<AD>()
        .with_adapters(&config.adapter(), &config.targets, &mut NoiseSource::seeded(3))
        .unwrap();
    let examples = parity_examples(8, 1);
    let scorer = Scorer::label(vec![10, 11], 0);
    let mut stepper = Stepper::new(&config, &model, examples.len());
    for step in 0..3 {
        let batch = scorer.batch(&examples, &[step, step + 1, step + 2, step + 3], Padding::Left);
        stepper.step(&mut model, &batch, &scorer, step, &device).unwrap();
    }
    model.valid()
}

fn logits(model: &Llama<B>) -> Vec<f32> {
    let ids: Vec<i64> = (0..2 * 9).map(|i| (i * 37 % 250 + 3) as i64).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [2, 9]), &Default::default());
    let mut noise = NoiseSource::seeded(0);
    model
        .forward(tokens, None, &mut Sampler::new(SamplingMode::Mean, &mut noise))
        .into_data()
        .to_vec()
        .unwrap()
}

#[test]
fn a_merged_adapter_is_the_adapter_at_its_mean_and_its_folder_loads_back() {
    for kind in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let model = trained(kind);
        let adapted = logits(&model);
        let merged = model.merged().unwrap();
        assert!(merged
            .layers
            .iter()
            .all(|l| l.projections().iter().all(|(_, p)| matches!(p, Proj::Base(_)))));
        let diff = max_abs_diff(&logits(&merged), &adapted);
        assert!(diff < 1e-4, "{kind:?}: merged logits differ by {diff}");
        // Differs from the base: the adapter did something.
        assert!(
            max_abs_diff(&logits(&tiny_base::<B>()), &adapted) > 1e-4,
            "{kind:?}: the adapter changed nothing"
        );

        let dir = std::env::temp_dir().join(format!("melora-export-{kind:?}-{}", std::process::id()));
        let config = melora_llama::LlamaConfig::from_hf_json(&common::fixture("tied").join("config.json")).unwrap();
        save_hf(&merged, &config, None, &dir).unwrap();
        let (reloaded, _, report) = Pretrained::open(dir.to_str().unwrap(), &melora_llama::assets::Assets::from_env())
            .unwrap()
            .build::<B>(&Default::default())
            .unwrap();
        assert!(report.unused.is_empty(), "{:?}", report.unused);
        assert_eq!(
            logits(&reloaded),
            logits(&merged),
            "{kind:?}: the exported folder computes other logits"
        );
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            (json["model_type"].as_str(), json["tie_word_embeddings"].as_bool()),
            (Some("llama"), Some(true))
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn a_non_finite_merge_is_refused_naming_the_projection() {
    let mut model = trained(AdapterKind::Lora);
    if let Proj::Adapted(AnyAdapter::Lora(lora)) = &mut model.layers[1].self_attn.v_proj {
        let shape = lora.low_rank.lora_b.val().dims();
        lora.low_rank.lora_b = Param::from_tensor(Tensor::full(shape, f32::NAN, &Default::default()));
    } else {
        panic!("a LoRA adapter on v_proj");
    }
    let err = model.merged().unwrap_err().to_string();
    assert!(err.contains("model.layers.1.self_attn.v_proj"), "{err}");
}

#[test]
fn questions_files_and_answers() {
    let dir = std::env::temp_dir().join(format!("melora-questions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = file("good.jsonl", "{\"question\": \"2 + 2?\", \"choices\": [\"3\", \"4\"], \"answer\": \"B\"}\n\n{\"question\": \"Sky?\", \"choices\": [\"blue\", \"green\", \"red\"], \"answer\": 0}\n");
    let (items, answered) = read_questions(&good).unwrap();
    assert!(answered);
    assert_eq!(
        items[0],
        Item::Choice {
            question: "2 + 2?".into(),
            choices: vec!["3".into(), "4".into()],
            label: 1
        }
    );
    assert_eq!(items[1].n_choices(), 3);
    let (_, answered) = read_questions(&file(
        "none.jsonl",
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"]}\n",
    ))
    .unwrap();
    assert!(!answered);
    for (name, text, want) in [
        ("mixed.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 1}\n{\"question\": \"q\", \"choices\": [\"a\", \"b\"]}\n", "all or none"),
        ("beyond.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n", "line 1: answer 2 is beyond"),
        ("nochoices.jsonl", "{\"question\": \"q\"}\n", "line 1: no \"choices\""),
        ("notjson.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"]}\nnot json\n", "line 2: not JSON"),
        ("empty.jsonl", "\n", "no questions"),
    ] {
        let err = read_questions(&file(name, text)).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();

    // Two questions of 2 and 3 choices in a 3-class layout, two samples each.
    let sampled = SampledProbs {
        probs: vec![0.9, 0.1, 0.0, 0.5, 0.5, 0.0, 0.2, 0.3, 0.5, 0.2, 0.3, 0.5],
        samples: 2,
        classes: 3,
        labels: vec![0, 2],
    };
    let answers = sampled.answers(&[2, 3]);
    assert_eq!(answers[0].probabilities.len(), 2);
    assert!(
        (answers[0].probabilities[0] - 0.7).abs() < 1e-12
            && answers[0].prediction == 0
            && (answers[0].confidence - 0.7).abs() < 1e-12
    );
    assert_eq!((answers[1].prediction, answers[1].probabilities.len()), (2, 3));
    assert!(answers[0].uncertainty.epistemic > 0.0 && answers[1].uncertainty.epistemic == 0.0);
    assert_eq!(
        answers.iter().map(|a| a.uncertainty).collect::<Vec<_>>(),
        sampled.per_example()
    );
}
