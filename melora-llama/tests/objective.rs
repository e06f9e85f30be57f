//! The verdict on a Bayesian run's objective, on the tiny model: the
//! adapter-off point it measures before the first step is the base model's
//! training NLL, each validation shows the negative ELBO per example
//! beside it, and the end verdict judges the last one against it.

mod common;

use burn::backend::{Autodiff, NdArray};
use common::train::{adapter_values, config, label_scorer, run_dir};
use common::{parity_examples, tiny_base};
use melora_core::AdapterKind;
use melora_llama::eval::{predict, PredictOptions};
use melora_llama::posterior::ObjectiveVerdict;
use melora_llama::train::{TrainData, Trainer};

type AD = Autodiff<NdArray<f32>>;
type B = NdArray<f32>;

#[test]
fn a_bayesian_run_judges_its_objective_against_the_adapter_switched_off() {
    let train = parity_examples(8, 1);
    let validation = parity_examples(4, 2);
    let data = TrainData {
        train: &train,
        validation: &validation,
        scorer: &label_scorer(),
    };
    // The base model's training NLL: what a fresh adapter (B = 0) scores.
    let options = PredictOptions::mean(4);
    let base = predict(
        &tiny_base::<B>(),
        &train,
        &label_scorer(),
        &options,
        &Default::default(),
        |_, _| {},
    );
    let off = base.unwrap().metrics().nll;
    for method in [AdapterKind::Blob, AdapterKind::MeLora] {
        let config = config(method, 8).with_eval_every(4);
        let run = run_dir(&format!("objective-{method:?}"));
        let summary = Trainer::new(&config, &run)
            .fit(tiny_base::<AD>(), &data, &Default::default())
            .unwrap();
        let state = std::fs::read_to_string(run.last().join("state.json")).unwrap();
        let state: melora_llama::train::TrainState = serde_json::from_str(&state).unwrap();
        let measured = state.adapter_off.unwrap();
        assert!(
            (measured.nll - off).abs() < 1e-12,
            "{method:?}: {measured:?} against {off}"
        );
        assert_eq!((measured.se, measured.examples, measured.of), (0.0, 8, 8));
        let log = std::fs::read_to_string(run.dir.join("log.txt")).unwrap();
        assert!(
            log.contains(&format!("on 8 of the 8 training examples: NLL {off:.4}")),
            "{log}"
        );
        // The curve: each validation's training NLL plus its KL over N = 8.
        let metrics = std::fs::read_to_string(run.dir.join("metrics.jsonl")).unwrap();
        let records = melora_llama::train::metrics_records(&run.metrics(), &metrics).unwrap();
        let ends: Vec<f64> = (records.iter())
            .map(|(r, _)| r.train_nll + r.posterior.as_ref().unwrap().kl / 8.0)
            .collect();
        assert_eq!(ends.len(), 2, "{method:?}: validations at steps 4 and 8");
        // Each validation's log line shows the point beside the bound.
        for (end, step) in ends.iter().zip([4, 8]) {
            let shown = format!("posterior at step {step}: ");
            let line = log.lines().find(|l| l.starts_with(&shown)).unwrap();
            assert!(
                line.ends_with(&format!("negative ELBO per example {end:.4} (adapter off {off:.4})")),
                "{line}"
            );
        }
        let (verdict, line) = summary.objective.unwrap_or_else(|| panic!("{method:?}: no verdict"));
        assert_eq!(log.lines().last(), Some(line.as_str()));
        assert!(
            line.contains(&format!("(training NLL + KL / 8) {:.4} at step 8", ends[1])),
            "{line}"
        );
        // Four steps' NLLs give each record a standard error.
        // The bound, on the whole training set, has no sampling error.
        let se = records[1].0.train_nll_se.unwrap();
        let gap = ends[1] - measured.nll;
        let expected = if gap > 2.0 * se {
            ObjectiveVerdict::ShortOfOptimum
        } else if gap < -2.0 * se {
            ObjectiveVerdict::BelowOff
        } else {
            ObjectiveVerdict::LevelWithOff
        };
        assert_eq!(verdict, expected, "{method:?}: {line}");

        // Measuring the bound changes no step; without it the verdict says so.
        let unmeasured = run_dir(&format!("objective-off-{method:?}"));
        let summary = Trainer::new(&config.clone().with_objective_examples(0), &unmeasured)
            .fit(tiny_base::<AD>(), &data, &Default::default())
            .unwrap();
        assert_eq!(
            adapter_values(&run.last()),
            adapter_values(&unmeasured.last()),
            "{method:?}"
        );
        let (verdict, line) = summary.objective.unwrap();
        assert_eq!(verdict, ObjectiveVerdict::NoBound);
        assert!(line.ends_with("was not measured (objective_examples = 0, or a run begun without it)"));
        // On a sample of 4 of the 8: an estimate with its standard error.
        let sampled = run_dir(&format!("objective-sampled-{method:?}"));
        Trainer::new(&config.clone().with_objective_examples(4), &sampled)
            .fit(tiny_base::<AD>(), &data, &Default::default())
            .unwrap();
        let state = std::fs::read_to_string(sampled.last().join("state.json")).unwrap();
        let state: melora_llama::train::TrainState = serde_json::from_str(&state).unwrap();
        let sample = state.adapter_off.unwrap();
        assert_eq!((sample.examples, sample.of), (4, 8));
        assert!(sample.se > 0.0 && sample.nll.is_finite(), "{sample:?}");
        for dir in [&run.dir, &unmeasured.dir, &sampled.dir] {
            std::fs::remove_dir_all(dir).ok();
        }
    }
    // The paper's Me-LoRA term is unbounded below: no bound, none measured.
    let mut config = config(AdapterKind::MeLora, 4);
    config.melora.kl = melora_core::MeLoraKl::Paper;
    let run = run_dir("objective-paper");
    let summary = Trainer::new(&config, &run)
        .fit(tiny_base::<AD>(), &data, &Default::default())
        .unwrap();
    let (verdict, line) = summary.objective.unwrap();
    assert_eq!(verdict, ObjectiveVerdict::NoBound, "{line}");
    assert!(
        line.ends_with("is not a KL (unbounded below): nothing bounds its objective"),
        "{line}"
    );
    let log = std::fs::read_to_string(run.dir.join("log.txt")).unwrap();
    assert!(!log.contains("the adapter switched off (B = 0"), "{log}");
    std::fs::remove_dir_all(&run.dir).ok();
}
