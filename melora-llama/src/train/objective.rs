//! The verdict on a Bayesian run's objective: before the first step, the
//! training NLL of the adapter switched off, a negative ELBO per example
//! every run can reach; at the end, the objective's curve from the
//! validation records against it (docs/derivations.md section 7).

use super::{mix, EvalRecord, RunDir, TrainConfig};
use crate::data::{seeded_shuffle, Encoded};
use crate::eval::{predict, PredictOptions};
use crate::model::scoring::Scorer;
use crate::model::Llama;
use crate::posterior::{objective_verdict, AdapterOff, ObjectivePoint, ObjectiveVerdict};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use melora_core::Adapter;

/// The training NLL of `model`'s adapters switched off, on
/// `objective_examples` of the training examples (a seeded sample), with
/// its log line; `None` for a run without the bound. A fresh adapter's `B`
/// is 0, so the model scores as the base model does, whatever its random
/// factor, whose posterior could then have KL 0. An adapter that starts
/// otherwise gets a line that says so, and no point (`Some((None, line))`).
pub(super) fn adapter_off<B: AutodiffBackend>(
    config: &TrainConfig,
    model: &Llama<B>,
    train: &[Encoded],
    scorer: &Scorer,
    device: &B::Device,
) -> crate::Result<Option<(Option<AdapterOff>, String)>> {
    if !config.is_bayesian() || config.objective_examples == 0 || config.objective_unbounded().is_some() {
        return Ok(None);
    }
    let b_is_zero = (model.adapters().iter()).all(|(_, a)| a.lora_b().abs().max().into_scalar().elem::<f64>() == 0.0);
    if !b_is_zero {
        let line = "the adapters start with B != 0: the adapter-off point is not the initialisation, not measured";
        return Ok(Some((None, line.into())));
    }
    // A stream of its own, apart from the steps' and the epochs'.
    let mut sample = seeded_shuffle((0..train.len()).collect(), mix(config.seed, u64::MAX));
    sample.truncate(config.objective_examples);
    let examples: Vec<Encoded> = sample.iter().map(|&i| train[i].clone()).collect();
    let options = PredictOptions::mean(config.predict.batch_size);
    let probs = predict(&model.valid(), &examples, scorer, &options, device, |_, _| {})?;
    let off = AdapterOff::of(&probs.nlls(), train.len());
    let line = format!(
        "the adapter switched off (B = 0, a posterior of KL 0) on {} of the {} training examples: NLL {:.4} (standard error {:.4}), a negative ELBO per example every run can reach",
        off.examples, off.of, off.nll, off.se
    );
    Ok(Some((Some(off), line)))
}

/// The verdict on the objective of a finished Bayesian run, from the
/// validation records in `run` (each one's training NLL plus its KL over
/// the `n_train` training examples).
pub(super) fn verdict(
    config: &TrainConfig,
    run: &RunDir,
    n_train: usize,
    adapter_off: Option<AdapterOff>,
) -> crate::Result<Option<(ObjectiveVerdict, String)>> {
    let curve = objective_curve(&run.records()?, n_train);
    let bound = match (config.objective_unbounded(), adapter_off) {
        (Some(why), _) => Err(why),
        (None, Some(off)) => Ok(off),
        (None, None) => {
            Err("the adapter-off point was not measured (objective_examples = 0, or a run begun without it)")
        }
    };
    Ok(objective_verdict(&curve, bound, n_train))
}

/// The negative ELBO per example at each of a Bayesian run's validation
/// `records`: the training NLL since the previous one plus the KL over
/// `n_train`, whatever weight the KL schedule gave it (records without a
/// posterior are left out).
pub fn objective_curve(records: &[EvalRecord], n_train: usize) -> Vec<ObjectivePoint> {
    (records.iter()).filter_map(|r| objective_point(r, n_train)).collect()
}

/// The negative ELBO per example at one validation `record` (`None`
/// without a posterior).
pub fn objective_point(record: &EvalRecord, n_train: usize) -> Option<ObjectivePoint> {
    let kl = record.posterior.as_ref()?.kl / n_train as f64;
    Some(ObjectivePoint {
        step: record.step,
        value: record.train_nll + kl,
        kl,
        se: record.train_nll_se,
    })
}
