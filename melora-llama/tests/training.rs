//! Training on the tiny fixture model: each method reduces the training
//! loss; a run killed mid-way and resumed ends exactly where the
//! uninterrupted run ends; a Bayesian run's objective is judged against
//! the adapter switched off; Bayesian evaluation depends on the number of
//! samples, LoRA's does not.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;
use common::{answer_examples, parity_examples, tiny_base, with_method_preset};
use melora_core::{AdapterKind, KlSchedule, NoiseDevice, SamplingMode};
use melora_llama::data::Padding;
use melora_llama::data::{LengthNorm, Scoring};
use melora_llama::eval::{predict, EnsembleConfig, PredictConfig, PredictOptions};
use melora_llama::model::scoring::Scorer;
use melora_llama::posterior::ObjectiveVerdict;
use melora_llama::train::{linear_warmup_decay, Method, Progress, RunDir, TrainConfig, TrainData, Trainer};
use melora_llama::weights::peft::load_adapter;
use melora_llama::weights::{safetensors::SafetensorsSource, WeightSource};
use std::path::Path;

type AD = Autodiff<NdArray<f32>>;
type B = NdArray<f32>;

const LABELS: [u32; 2] = [17, 42];

fn label_scorer() -> melora_llama::model::scoring::Scorer {
    melora_llama::model::scoring::Scorer::label(LABELS.to_vec(), 0)
}

fn config(method: AdapterKind, steps: usize) -> TrainConfig {
    TrainConfig::new()
        .with_model("tiny".into())
        .with_method(method.into())
        .with_rank(4)
        .with_steps(steps)
        .with_batch_size(4)
        .with_lr(1e-2)
        .with_kl_lr(1e-3)
        .with_eval_every(0)
        .with_checkpoint_every(5)
        .with_predict(PredictConfig::new().with_batch_size(4))
        .with_seed(7)
}

fn run_dir(name: &str) -> RunDir {
    let dir = std::env::temp_dir().join(format!("melora-train-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    RunDir { dir }
}

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
        let expected = if ends[1] - measured.nll > 2.0 * se {
            ObjectiveVerdict::ShortOfOptimum
        } else {
            ObjectiveVerdict::NotAbove
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

fn adapter_values(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut source = SafetensorsSource::single(&dir.join("adapter_model.safetensors")).unwrap();
    source
        .names()
        .into_iter()
        .map(|n| (n.clone(), source.load(&n).unwrap().unwrap().values))
        .collect()
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
