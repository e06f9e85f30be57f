//! The LoRA baselines on the tiny fixture: MC dropout with one sample and
//! dropout off is the MAP prediction (and with dropout on it is not); a deep
//! ensemble whose members share a seed predicts exactly as one member (and
//! with different seeds it does not).

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use common::{parity_examples, tiny_base};
use melora_core::ElboConfig;
use melora_llama::eval::{ensemble_probs, predict, predict_ensemble, predict_logits, softmax_rows, PredictOptions};
use melora_llama::eval::{EnsembleAverage, EnsembleConfig, PredictConfig};
use melora_llama::train::{Method, RunDir, TrainConfig, TrainData, Trainer};
use melora_llama::weights::peft::load_adapter;
use melora_llama::Llama;

type AD = Autodiff<NdArray<f32>>;
type B = NdArray<f32>;

const LABELS: [u32; 2] = [17, 42];

fn label_scorer() -> melora_llama::model::scoring::Scorer {
    melora_llama::model::scoring::Scorer::label(LABELS.to_vec(), 0)
}

fn config(method: Method) -> TrainConfig {
    TrainConfig::new()
        .with_model("tiny".into())
        .with_method(method)
        .with_rank(4)
        .with_steps(8)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_elbo(ElboConfig::new().with_weight_decay(1e-5))
        .with_eval_every(0)
        .with_checkpoint_every(4)
        .with_predict(PredictConfig::new().with_batch_size(4))
        .with_seed(5)
}

fn run_dir(name: &str) -> RunDir {
    let dir = std::env::temp_dir().join(format!("melora-baselines-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    RunDir { dir }
}

fn trained(run: &RunDir) -> Llama<B> {
    load_adapter(
        tiny_base::<AD>().valid(),
        &run.final_checkpoint().unwrap(),
        &Default::default(),
    )
    .unwrap()
    .0
}

#[test]
fn mc_dropout_with_one_sample_and_dropout_off_is_map() {
    let train = parity_examples(8, 1);
    let test = parity_examples(6, 2);
    let run = run_dir("mcd");
    Trainer::new(&config(Method::Mcd), &run)
        .fit(
            tiny_base::<AD>(),
            &TrainData {
                train: &train,
                validation: &[],
                scorer: &label_scorer(),
            },
            &Default::default(),
        )
        .unwrap();
    let model = trained(&run);
    let device = Default::default();
    let map = predict(
        &model,
        &test,
        &label_scorer(),
        &PredictOptions::mean(4),
        &device,
        |_, _| {},
    )
    .unwrap();

    // The MCD run's own predictor, with S = 1 and dropout off.
    let off = config(Method::Mcd)
        .with_predict(PredictConfig::new().with_samples(1))
        .with_dropout(0.0)
        .eval_options(4, 0);
    assert_eq!((off.samples, off.dropout), (1, false));
    let mcd = predict(&model, &test, &label_scorer(), &off, &device, |_, _| {}).unwrap();
    assert_eq!(mcd.probs(), map.probs(), "MCD with S = 1 and dropout off must be MAP");

    // The default MCD predictor (S = 3, dropout 0.1 on) is a different one.
    let on = config(Method::Mcd)
        .with_predict(PredictConfig::new().with_samples(3))
        .eval_options(4, 0);
    assert_eq!((on.samples, on.dropout), (3, true));
    let mcd = predict(&model, &test, &label_scorer(), &on, &device, |_, _| {}).unwrap();
    let diff = mcd
        .probs()
        .iter()
        .zip(map.probs())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff > 1e-4, "MC dropout changed nothing (max difference {diff:e})");
}

#[test]
fn an_ensemble_of_identical_seeds_is_its_member() {
    let train = parity_examples(8, 3);
    let test = parity_examples(6, 4);
    let device = Default::default();
    let member_logits = |run: &RunDir, members: usize| -> Vec<Vec<f64>> {
        (0..members)
            .map(|k| predict_logits(&trained(&run.member(k)), &test, &label_scorer(), 4, &device, |_, _| {}))
            .collect()
    };

    let same = run_dir("ens-same");
    let ens = config(Method::Ens).with_ensemble(EnsembleConfig::new().with_members(3).with_seeds(Some(vec![9, 9, 9])));
    Trainer::new(&ens, &same)
        .fit(
            tiny_base::<AD>(),
            &TrainData {
                train: &train,
                validation: &[],
                scorer: &label_scorer(),
            },
            &Default::default(),
        )
        .unwrap();
    let logits = member_logits(&same, 3);
    let member = softmax_rows(&logits[0], 2);
    for average in [EnsembleAverage::Probabilities, EnsembleAverage::Logits] {
        let probs = ensemble_probs(&logits, 2, average);
        let diff = probs
            .iter()
            .zip(&member)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-12,
            "{average:?}: ensemble of identical seeds differs from its member by {diff:e}"
        );
    }
    // The member is a MAP run with the ensemble's seed.
    let member_config: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(same.member(0).config()).unwrap()).unwrap();
    assert_eq!(
        (
            member_config.method,
            member_config.seed,
            member_config.elbo.weight_decay
        ),
        (Method::Map, 9, 1e-5)
    );

    let different = run_dir("ens-different");
    let mut distinct = ens.clone();
    distinct.ensemble.seeds = Some(vec![9, 10, 11]);
    Trainer::new(&distinct, &different)
        .fit(
            tiny_base::<AD>(),
            &TrainData {
                train: &train,
                validation: &[],
                scorer: &label_scorer(),
            },
            &Default::default(),
        )
        .unwrap();
    let logits = member_logits(&different, 3);
    let probs = ensemble_probs(&logits, 2, EnsembleAverage::Probabilities);
    let diff = probs
        .iter()
        .zip(&member)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff > 1e-4,
        "different seeds gave the same ensemble (max difference {diff:e})"
    );
    let by_logits = ensemble_probs(&logits, 2, EnsembleAverage::Logits);
    assert!(
        probs.iter().zip(&by_logits).any(|(a, b)| (a - b).abs() > 1e-9),
        "the two averages coincide"
    );
    // The library's ensemble predictor (members loaded one at a time) gives
    // the same probabilities, and its samples are the members: a spread
    // between different seeds, none between identical ones.
    let members = |run: &RunDir| (0..3).map(|k| Ok(trained(&run.member(k)))).collect::<Vec<_>>();
    let (predicted, sampled) = predict_ensemble(
        members(&different),
        &test,
        &label_scorer(),
        4,
        EnsembleAverage::Probabilities,
        &device,
        |_, _, _| {},
    )
    .unwrap();
    assert_eq!(predicted.probs(), &probs[..]);
    assert_eq!(sampled.samples, 3);
    assert!(sampled.uncertainty().2 > 0.0, "different members, no epistemic part");
    let (_, sampled) = predict_ensemble(
        members(&same),
        &test,
        &label_scorer(),
        4,
        EnsembleAverage::Logits,
        &device,
        |_, _, _| {},
    )
    .unwrap();
    assert!(
        sampled.uncertainty().2.abs() < 1e-12,
        "identical members disagree: {}",
        sampled.uncertainty().2
    );
    std::fs::remove_dir_all(&same.dir).ok();
    std::fs::remove_dir_all(&different.dir).ok();
}
