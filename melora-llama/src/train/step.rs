//! One training step of a run: scores, NLL, the learning-rate and
//! KL-weight schedules, then the ELBO update of [`melora_core::ElboStep`].

use super::parallel::Peer;
use super::TrainConfig;
use crate::model::classify::cross_entropy;
use crate::model::scoring::{ScoreBatch, Scorer};
use crate::model::{Llama, Proj};
use burn::module::{Param, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use melora_core::{Adapter, ElboStep, KlTerm, NonFinite, OptimizerSplit, Rates, ReducedStepError, RowNoise, Sampler};

/// HF's `get_linear_schedule_with_warmup`: the learning-rate factor at
/// 0-based `step` of `total`, rising linearly over `warmup` steps, then
/// falling linearly to 0 (a pure function of the step: resumes exactly).
pub fn linear_warmup_decay(step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    ((total - step.min(total)) as f64 / (total - warmup).max(1) as f64).max(0.0)
}

/// A 64-bit mix of a seed and a counter (SplitMix64).
pub fn mix(seed: u64, counter: u64) -> u64 {
    let mut z = seed
        .wrapping_add(counter.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn stable_id(path: &str, name: &str) -> ParamId {
    // FNV-1a of "path.name": the same adapter parameter gets the same id in
    // every process, so optimiser states saved with a checkpoint map back.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes().chain(std::iter::once(b'.')).chain(name.bytes()) {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    ParamId::from(h)
}

fn renamed<B: burn::tensor::backend::Backend>(
    p: Param<burn::tensor::Tensor<B, 2>>,
    path: &str,
    name: &str,
) -> Param<burn::tensor::Tensor<B, 2>> {
    Param::initialized(stable_id(path, name), p.val().detach().require_grad())
}

/// Gives every adapter parameter an id derived from its module path.
pub fn stable_adapter_ids<B: burn::tensor::backend::Backend>(mut model: Llama<B>) -> Llama<B> {
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, slot) in layer.projections_mut() {
            let path = format!("model.layers.{i}.{name}");
            if let Proj::Adapted(adapter) = slot {
                for (name, param) in adapter.named_params_mut() {
                    *param = renamed(param.clone(), &path, name);
                }
            }
        }
    }
    if let Some(head) = &mut model.head_adapter {
        for (name, param) in head.named_params_mut() {
            *param = renamed(param.clone(), "lm_head", name);
        }
    }
    model
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The batch's mean NLL.
    pub nll: f64,
    /// The KL term (unweighted; 0 for LoRA).
    pub kl: f64,
    /// The weight the KL entered the loss with (0 for LoRA).
    pub kl_weight: f64,
    /// The AdamW learning rate used.
    pub lr: f64,
}

/// The optimisers of a run and the Llama side of a step (scores, NLL, the
/// learning-rate and KL-weight schedules); [`Stepper::step`] is one
/// training step (shared by `fit` and the benchmarks), its update
/// [`melora_core::ElboStep`].
pub struct Stepper<B: AutodiffBackend> {
    /// The optimisers and parameter groups.
    pub elbo: ElboStep<B, Llama<B>>,
    /// The run's settings (schedules, sampling, noise, seed).
    pub config: TrainConfig,
    /// Training examples `N` (the KL enters as `weight * KL / N`).
    pub n_train: usize,
}

impl<B: AutodiffBackend> Stepper<B> {
    /// Optimisers for `model`'s adapters as `config` says, for a training
    /// set of `n_train` examples.
    pub fn new(config: &TrainConfig, model: &Llama<B>, n_train: usize) -> Self {
        Self {
            elbo: ElboStep::new(config.elbo.clone(), model),
            config: config.clone(),
            n_train,
        }
    }

    /// One step at 0-based `step` on `batch`; all randomness (prior noise,
    /// sampling, dropout) is drawn from a generator seeded by `(seed, step)`,
    /// each example's own noise from its own stream ([`RowNoise`]).
    /// A non-finite NLL or KL is returned as [`NonFinite`], with the model
    /// left untouched.
    pub fn step(
        &mut self,
        model: &mut Llama<B>,
        batch: &ScoreBatch,
        scorer: &Scorer,
        step: usize,
        device: &B::Device,
    ) -> std::result::Result<StepOutcome, NonFinite> {
        let (nll, lr, kl) = self.forward(model, batch, scorer, step, 0, device);
        let values = self.elbo.step(model, nll, lr, kl)?;
        Ok(StepOutcome {
            nll: values.nll,
            kl: values.kl,
            kl_weight: kl.map_or(0.0, |k| k.weight),
            lr: lr.lr,
        })
    }

    /// One data-parallel peer's step at `step`: `rows` is the peer's share
    /// of the batch (rows `first..first + rows` of a batch of `batch_size`,
    /// padded as the whole batch), its NLL weighted by its share; the NLL
    /// and the data gradients are summed over the peers. The step every
    /// peer takes is the one a single device takes on the whole batch (up to
    /// the order of the gradient sums). A non-finite NLL or KL, which every
    /// peer sees alike, is the inner error; a failed all-reduce the outer.
    #[allow(clippy::too_many_arguments)]
    pub fn step_peer(
        &mut self,
        model: &mut Llama<B>,
        rows: &ScoreBatch,
        first: usize,
        batch_size: usize,
        scorer: &Scorer,
        step: usize,
        peer: &Peer,
        device: &B::Device,
    ) -> crate::Result<std::result::Result<StepOutcome, NonFinite>> {
        let (nll, lr, kl) = self.forward(model, rows, scorer, step, first, device);
        let nll = nll.mul_scalar(rows.labels().len() as f64 / batch_size as f64);
        let part: f64 = nll.clone().into_scalar().elem();
        let total = peer.sum::<B::InnerBackend>(&[part], device)?[0];
        let ids = melora_core::Bayesian::param_groups(model).all();
        let mut reduce = |grads| peer.sum_grads::<B>(grads, &ids);
        let kl_weight = kl.map_or(0.0, |k| k.weight);
        match self.elbo.step_reduced(model, nll, total, lr, kl, &mut reduce) {
            Ok(values) => Ok(Ok(StepOutcome {
                nll: values.nll,
                kl: values.kl,
                kl_weight,
                lr: lr.lr,
            })),
            Err(ReducedStepError::NonFinite(bad)) => Ok(Err(bad)),
            Err(ReducedStepError::Reduce(e)) => Err(e),
        }
    }

    /// The NLL of `batch` (rows from `first` of the step's batch), the
    /// learning rates and the KL term of step `step`.
    fn forward(
        &self,
        model: &Llama<B>,
        batch: &ScoreBatch,
        scorer: &Scorer,
        step: usize,
        first: usize,
        device: &B::Device,
    ) -> (Tensor<B, 1>, Rates, Option<KlTerm>) {
        let (config, n_train) = (&self.config, self.n_train);
        let seed = mix(config.seed, step as u64);
        let mut noise = config.noise.source::<B>(seed, device);
        let prior_std = config.prior.draw_std::<B>(&mut noise, device);
        let mut sampler = Sampler::new(config.train_sampling, &mut noise)
            .with_dropout(true)
            .with_rows(RowNoise::new(seed, first));
        let nll = cross_entropy(scorer.scores(model, batch, &mut sampler, device), batch.labels());
        let warmup = (config.warmup_ratio * config.steps as f64).round() as usize;
        let factor = linear_warmup_decay(step, config.steps, warmup);
        // The std parameters' Adam decays with AdamW; BLoB's SGD does when
        // `kl_lr_schedule` says so (BLoB's code: its `scheduler2`).
        let kl_factor = if config.elbo.optimizer == OptimizerSplit::StdAdam || config.kl_lr_schedule {
            factor
        } else {
            1.0
        };
        let lr = Rates::new(config.lr * factor, config.kl_lr * kl_factor);
        let weight = config.kl_schedule.weight(step, n_train, config.batch_size);
        let kl = config.is_bayesian().then_some(KlTerm { prior_std, weight });
        (nll, lr, kl)
    }
}
