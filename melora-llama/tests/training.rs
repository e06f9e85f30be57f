//! Training on the tiny fixture model: each method reduces the training
//! loss; a run killed mid-way and resumed ends exactly where the
//! uninterrupted run ends; Bayesian evaluation depends on the number of
//! samples, LoRA's does not.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use common::train::{adapter_values, config, label_scorer, run_dir};
use common::{answer_examples, parity_examples, tiny_base, with_method_preset};
use melora_core::{AdapterKind, KlSchedule, NoiseDevice, SamplingMode};
use melora_llama::data::Padding;
use melora_llama::data::{LengthNorm, Scoring};
use melora_llama::eval::{predict, EnsembleConfig, PredictOptions};
use melora_llama::model::scoring::Scorer;
use melora_llama::train::{linear_warmup_decay, Method, Progress, TrainData, Trainer};
use melora_llama::weights::peft::load_adapter;

type AD = Autodiff<NdArray<f32>>;
type B = NdArray<f32>;

/// Simulates a crash (`kill -9`) after `at` steps.
struct CrashAt(usize);
impl Progress for CrashAt {
    fn step(&mut self, step: usize, _: usize, _: &str) {
        if step == self.0 {
            panic!("simulated crash at step {step}");
        }
    }
    fn line(&mut self, _: &str) {}
}

#[test]
fn every_method_reduces_the_training_loss() {
    let train = parity_examples(8, 1);
    let validation = parity_examples(8, 2);
    for method in [AdapterKind::Lora, AdapterKind::Blob, AdapterKind::MeLora] {
        let run = run_dir(&format!("{method:?}"));
        let summary = Trainer::new(&config(method, 40), &run)
            .fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &validation,
                    scorer: &label_scorer(),
                },
                &Default::default(),
            )
            .unwrap();
        println!(
            "{method:?}: training NLL {:.4} -> {:.4}",
            summary.first_nll, summary.last_nll
        );
        assert!(
            summary.last_nll < 0.7 * summary.first_nll,
            "{method:?}: {} -> {}",
            summary.first_nll,
            summary.last_nll
        );
        for file in [
            "config.json",
            "log.txt",
            "metrics.jsonl",
            "checkpoints/last/adapter_model.safetensors",
            "checkpoints/best/state.json",
        ] {
            assert!(run.dir.join(file).is_file(), "{method:?}: {file} missing");
        }
        std::fs::remove_dir_all(&run.dir).ok();
    }
}

#[test]
fn a_kl_weight_of_zero_trains_and_reports_the_kl() {
    // Validation accepts a constant KL weight of 0 (maximum likelihood
    // with a Bayesian adapter); the KL is still reported, finite.
    let train = parity_examples(8, 1);
    let validation = parity_examples(8, 2);
    for method in [AdapterKind::Blob, AdapterKind::MeLora] {
        let run = run_dir(&format!("kl0-{method:?}"));
        let mut config = config(method, 6);
        config.kl_schedule = KlSchedule::Constant { weight: 0.0 };
        let summary = Trainer::new(&config, &run).fit(
            tiny_base::<AD>(),
            &TrainData {
                train: &train,
                validation: &validation,
                scorer: &label_scorer(),
            },
            &Default::default(),
        );
        let summary = summary.unwrap_or_else(|e| panic!("{method:?} with KL weight 0: {e}"));
        assert!(summary.last_nll.is_finite());
        let log = std::fs::read_to_string(run.dir.join("log.txt")).unwrap();
        let last_step = log.lines().rfind(|l| l.starts_with("step ")).unwrap();
        let kl: f64 = last_step
            .split(" kl ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(kl.is_finite(), "{method:?}: reported KL {kl}");
        // The posterior's diagnostics: at the start, at the validation, and
        // the verdict at the end.
        assert!(log.contains("posterior at initialisation: std "), "{log}");
        assert!(log.contains("posterior at step 6: std "), "{log}");
        let verdict = log.lines().find(|l| l.starts_with("posterior: ")).unwrap();
        assert!(
            verdict.starts_with("posterior: converged") || verdict.starts_with("posterior: still moving"),
            "{verdict}"
        );
        let metrics = std::fs::read_to_string(run.dir.join("metrics.jsonl")).unwrap();
        let record: melora_llama::train::EvalRecord = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        let posterior = record
            .posterior
            .unwrap_or_else(|| panic!("{method:?}: no posterior diagnostics in {metrics}"));
        assert_eq!(
            (posterior.kl_weight, posterior.gold_std_on),
            (0.0, Some((4, 8))),
            "{method:?}"
        );
        assert!(posterior.kl.is_finite() && posterior.stats.all.mean > 0.0 && posterior.gold_std.unwrap() >= 0.0);
        std::fs::remove_dir_all(&run.dir).ok();
    }
}

#[test]
fn every_method_reduces_the_training_loss_with_answer_scoring() {
    let train = answer_examples(8, 5);
    let test = answer_examples(6, 6);
    let scorer = Scorer::answer(3, LengthNorm::None, 0);
    let device = Default::default();
    for method in Method::ALL {
        let run = run_dir(&format!("answer-{method:?}"));
        let mut config = with_method_preset(
            config(AdapterKind::Lora, 40)
                .with_scoring(Scoring::Answer)
                .with_ensemble(EnsembleConfig::new().with_members(2)),
            method,
        );
        if method.adapter_kind() == AdapterKind::Lora {
            config.train_sampling = SamplingMode::Mean;
        }
        let summary = Trainer::new(&config, &run)
            .fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &test,
                    scorer: &scorer,
                },
                &device,
            )
            .unwrap();
        println!(
            "{method:?} (answer scoring): training NLL {:.4} -> {:.4}",
            summary.first_nll, summary.last_nll
        );
        assert!(
            summary.last_nll < 0.7 * summary.first_nll,
            "{method:?}: {} -> {}",
            summary.first_nll,
            summary.last_nll
        );
        // Evaluation as the method predicts: probabilities that sum to 1.
        let checkpoint = if method == Method::Ens {
            run.member(0).final_checkpoint()
        } else {
            run.final_checkpoint()
        };
        let model = load_adapter(tiny_base::<B>(), &checkpoint.unwrap(), &device).unwrap().0;
        let probs = predict::<B>(&model, &test, &scorer, &config.eval_options(4, 1), &device, |_, _| {}).unwrap();
        assert_eq!(probs.len(), test.len());
        for (row, e) in probs.rows().zip(&test) {
            assert!(
                (row.iter().sum::<f64>() - 1.0).abs() < 1e-6 && row[e.n_choices..].iter().all(|&p| p < 1e-6),
                "{method:?}: {row:?}"
            );
        }
        std::fs::remove_dir_all(&run.dir).ok();
    }
}

#[test]
fn resume_after_a_crash_matches_the_uninterrupted_run() {
    let train = parity_examples(12, 3);
    let validation = parity_examples(4, 4);
    for method in [AdapterKind::MeLora, AdapterKind::Blob] {
        let config = config(method, 20).with_eval_every(4);
        let whole = run_dir(&format!("whole-{method:?}"));
        Trainer::new(&config, &whole)
            .fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &validation,
                    scorer: &label_scorer(),
                },
                &Default::default(),
            )
            .unwrap();

        let crashed = run_dir(&format!("crashed-{method:?}"));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Trainer::new(&config, &crashed).progress(&mut CrashAt(13)).fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &validation,
                    scorer: &label_scorer(),
                },
                &Default::default(),
            )
        }));
        assert!(result.is_err(), "the simulated crash should abort the run");
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(crashed.last().join("state.json")).unwrap()).unwrap();
        assert_eq!(state["step"], 10, "the last checkpoint before the crash is at step 10");
        Trainer::new(&config, &crashed)
            .resume(true)
            .fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &validation,
                    scorer: &label_scorer(),
                },
                &Default::default(),
            )
            .unwrap();

        let (a, b) = (adapter_values(&whole.last()), adapter_values(&crashed.last()));
        assert_eq!(a.len(), b.len());
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert_eq!(
                x, y,
                "{method:?}: {name} differs between the resumed and the uninterrupted run"
            );
        }
        // Every file, byte for byte: the optimiser state, the training
        // state, the best checkpoint, and the validation records (the one
        // at step 12, written before the crash, was dropped and written
        // again: one record per validation).
        let differ = common::differing_files(&whole.dir, &crashed.dir);
        assert!(
            differ.is_empty(),
            "{method:?}: differ between the resumed and the uninterrupted run: {differ:?}"
        );
        let records = std::fs::read_to_string(crashed.metrics()).unwrap();
        assert_eq!(records.lines().count(), 5, "{records}");
        // And the run did move away from its initialisation.
        let fresh = run_dir(&format!("fresh-{method:?}"));
        Trainer::new(&config.clone().with_steps(1), &fresh)
            .fit(
                tiny_base::<AD>(),
                &TrainData {
                    train: &train,
                    validation: &validation,
                    scorer: &label_scorer(),
                },
                &Default::default(),
            )
            .unwrap();
        assert_ne!(adapter_values(&fresh.last()), a);
        for dir in [whole.dir, crashed.dir, fresh.dir] {
            std::fs::remove_dir_all(dir).ok();
        }
    }
}

#[test]
fn bayesian_evaluation_depends_on_samples_and_lora_does_not() {
    let train = parity_examples(8, 5);
    let test = parity_examples(6, 6);
    for method in [AdapterKind::Lora, AdapterKind::MeLora, AdapterKind::Blob] {
        let run = run_dir(&format!("eval-{method:?}"));
        Trainer::new(&config(method, 10).with_dropout(0.0), &run)
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
        let model = load_adapter(tiny_base::<AD>().valid(), &run.last(), &Default::default())
            .unwrap()
            .0;
        let probs = |samples: usize| -> Vec<f64> {
            let options = PredictOptions {
                samples,
                mode: SamplingMode::PerExample,
                dropout: false,
                batch_size: 3,
                seed: 1,
                padding: Padding::Left,
                noise: NoiseDevice::Host,
            };
            let p = predict::<B>(&model, &test, &label_scorer(), &options, &Default::default(), |_, _| {}).unwrap();
            p.rows().flatten().copied().collect()
        };
        let (one, many) = (probs(1), probs(8));
        let gap = one.iter().zip(&many).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        if method == AdapterKind::Lora {
            assert!(gap < 1e-6, "LoRA: S = 8 differs from S = 1 by {gap}");
        } else {
            assert!(gap > 1e-6, "{method:?}: S = 8 equals S = 1");
        }
        std::fs::remove_dir_all(&run.dir).ok();
    }
    assert_eq!(linear_warmup_decay(0, 100, 10), 0.0);
    assert_eq!(linear_warmup_decay(5, 100, 10), 0.5);
    assert_eq!(linear_warmup_decay(10, 100, 10), 1.0);
    assert!((linear_warmup_decay(55, 100, 10) - 0.5).abs() < 1e-12);
    assert_eq!(linear_warmup_decay(100, 100, 10), 0.0);
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let train = parity_examples(8, 7);
    let run = run_dir("nan");
    Trainer::new(&config(AdapterKind::MeLora, 4), &run)
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
    let good = adapter_values(&run.last());
    // The run continues to 8 steps on a model whose final norm went NaN.
    let mut broken = tiny_base::<AD>();
    broken.norm.gamma = burn::module::Param::from_tensor(broken.norm.gamma.val().mul_scalar(f32::NAN));
    let err = Trainer::new(&config(AdapterKind::MeLora, 8), &run)
        .resume(true)
        .fit(
            broken,
            &TrainData {
                train: &train,
                validation: &[],
                scorer: &label_scorer(),
            },
            &Default::default(),
        )
        .unwrap_err();
    assert!(
        matches!(&err, melora_llama::LlamaError::Stopped { step: 5, what: "NLL", value, checkpoint } if value.is_nan() && *checkpoint == run.last()),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("training stopped at step 5")
            && err.contains("NLL is NaN")
            && err.contains("last good checkpoint"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.last().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 4);
    assert_eq!(
        adapter_values(&run.last()),
        good,
        "the last good checkpoint is untouched"
    );
    std::fs::remove_dir_all(&run.dir).ok();
}

/// A checkpoint that cannot be written (here the disk fills up half-way
/// through it) is an error that names the checkpoint, leaves the previous
/// one whole and removes the half-written folder; a crash between the two
/// renames leaves the previous checkpoint under `.last.old`, which is
/// found, and moved back before the next checkpoint removes anything.
#[test]
fn a_checkpoint_that_cannot_be_written_leaves_the_previous_one_intact() {
    let train = parity_examples(8, 3);
    let config = config(AdapterKind::MeLora, 5);
    let run = run_dir("unwritable");
    Trainer::new(&config, &run)
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
    let before = adapter_values(&run.last());
    let state = std::fs::read(run.last().join("state.json")).unwrap();
    let full = |tmp: &std::path::Path| -> melora_llama::Result<()> {
        std::fs::create_dir_all(tmp).unwrap();
        std::fs::write(tmp.join("adapter_model.safetensors"), b"half of it").unwrap();
        Err(melora_llama::LlamaError::write(
            tmp.join("adamw.bin"),
            std::io::Error::from_raw_os_error(28),
        ))
    };
    let message = run.replace_checkpoint(&run.last(), full).unwrap_err().to_string();
    assert!(
        message.contains("checkpoints/last")
            && message.contains("No space left on device")
            && message.contains("left as it was"),
        "{message}"
    );
    assert_eq!(adapter_values(&run.last()), before);
    assert_eq!(std::fs::read(run.last().join("state.json")).unwrap(), state);
    assert!(
        !run.dir.join("checkpoints/.last.tmp").exists(),
        "the half-written checkpoint is removed"
    );

    // The crash between the renames: only `.last.old` is left.
    let old = run.dir.join("checkpoints/.last.old");
    std::fs::rename(run.last(), &old).unwrap();
    assert_eq!(run.complete_checkpoint(&run.last()), Some(old.clone()));
    // A checkpoint whose write then fails must not lose it either.
    assert!(run.replace_checkpoint(&run.last(), full).is_err());
    assert_eq!(run.complete_checkpoint(&run.last()), Some(run.last()));
    assert_eq!(adapter_values(&run.last()), before);
    // And the run resumes from it to the end.
    Trainer::new(&config.clone().with_steps(8), &run)
        .resume(true)
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
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.last().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 8);
    assert!(!old.exists());
    std::fs::remove_dir_all(&run.dir).ok();
}
