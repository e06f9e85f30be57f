//! The ELBO training step of docs/method.md section 2, for any Burn module that
//! reports its KL and its mean/std parameter groups ([`Bayesian`]): a
//! researcher's own model trains with it as melora's Llama does.
//!
//! With [`OptimizerSplit::StdAdam`] (the default), AdamW steps the mean
//! parameters and a second Adam the std parameters, both on NLL + KL, each
//! at its own learning rate; with [`OptimizerSplit::TwoOptimizers`] (BLoB's
//! code, the paper's Table 7), AdamW steps the mean parameters on the data
//! NLL, then SGD steps the mean parameters on the weighted KL and the std
//! parameters on NLL + KL; with [`OptimizerSplit::Single`], AdamW steps
//! everything on NLL + KL. A deterministic model (no KL term) takes a plain
//! AdamW step. Burn's optimisers do the updates (AdamW with optional
//! gradient-norm clipping, SGD). docs/derivations.md section 7 says why the
//! default is the one whose posterior reaches the ELBO's optimum.

use crate::adapter::ParamGroups;
use burn::config::Config;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer, Sgd, SgdConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

/// A module with Bayesian adapters: what [`ElboStep`] needs of it.
pub trait Bayesian<B: AutodiffBackend>: AutodiffModule<B> {
    /// The sum of the adapters' KL terms against a prior of standard
    /// deviation `prior_std`, shape `[1]` ([`crate::total_kl`] for a list
    /// of adapters).
    fn kl(&self, prior_std: f64) -> Tensor<B, 1>;

    /// The mean and std parameters of every adapter
    /// ([`crate::Adapter::param_groups`], extended over the adapters).
    fn param_groups(&self) -> ParamGroups;
}

/// Which optimisers update which parameters.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum OptimizerSplit {
    /// AdamW on the NLL for the mean parameters; SGD on the KL for the mean
    /// parameters and on NLL + KL for the std parameters (BLoB's code, the
    /// paper's Table 7).
    TwoOptimizers,
    /// AdamW on NLL + KL for every parameter.
    Single,
    /// AdamW on NLL + KL for the mean parameters at [`Rates::lr`]; Adam
    /// (no weight decay) on NLL + KL for the std parameters at
    /// [`Rates::kl_lr`]. Every parameter follows the ELBO's gradient with a
    /// step of its own scale, so the std parameters reach the optimum in
    /// as many steps as the means.
    StdAdam,
}

/// The learning rates of one step (their schedules are the caller's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// AdamW's: the mean parameters' (every parameter's under
    /// [`OptimizerSplit::Single`] and without a KL term).
    pub lr: f64,
    /// The second optimiser's: SGD's under [`OptimizerSplit::TwoOptimizers`],
    /// the std parameters' Adam under [`OptimizerSplit::StdAdam`]; unused
    /// otherwise.
    pub kl_lr: f64,
}

impl Rates {
    /// AdamW at `lr`, the second optimiser at `kl_lr`.
    pub fn new(lr: f64, kl_lr: f64) -> Self {
        Self { lr, kl_lr }
    }
}

/// The optimiser settings of an [`ElboStep`] (the learning rates are given
/// per step, for schedules: [`Rates`]).
#[derive(Config, Debug)]
pub struct ElboConfig {
    /// AdamW's decoupled weight decay (of the mean parameters; the std
    /// parameters' Adam of [`OptimizerSplit::StdAdam`] has none).
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// Gradient-norm clipping of the Adam steps (`None`: none).
    #[config(default = "None")]
    pub grad_clip: Option<f64>,
    /// The Adam steps' epsilon (Burn's default; BLoB's scripts 1e-6,
    /// PyTorch's default 1e-8).
    #[config(default = 1e-5)]
    pub epsilon: f64,
    /// Which optimisers update which parameters.
    #[config(default = "OptimizerSplit::StdAdam")]
    pub optimizer: OptimizerSplit,
}

/// The KL term of a step: the prior's standard deviation and the weight
/// the KL enters the loss with (`weight * KL`; for the per-example ELBO,
/// one over the number of training examples).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlTerm {
    /// The prior's standard deviation.
    pub prior_std: f64,
    /// The KL's weight in the loss.
    pub weight: f64,
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    /// The NLL given.
    pub nll: f64,
    /// The unweighted KL (0 without a KL term).
    pub kl: f64,
}

/// A loss term that is not finite: what [`ElboStep::step`] returns instead
/// of stepping.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("the {what} is {value}")]
pub struct NonFinite {
    /// `NLL` or `KL`.
    pub what: &'static str,
    /// Its value.
    pub value: f64,
}

/// The optimisers and parameter groups of a training run.
pub struct ElboStep<B: AutodiffBackend, M: Bayesian<B>> {
    /// AdamW (mean parameters, or everything in single-optimiser mode).
    pub adamw: OptimizerAdaptor<AdamW, M, B>,
    /// SGD for the KL step ([`OptimizerSplit::TwoOptimizers`]).
    pub sgd: OptimizerAdaptor<Sgd<B::InnerBackend>, M, B>,
    /// Adam for the std parameters ([`OptimizerSplit::StdAdam`]).
    pub std_adam: OptimizerAdaptor<AdamW, M, B>,
    groups: ParamGroups,
    config: ElboConfig,
}

impl<B: AutodiffBackend, M: Bayesian<B>> ElboStep<B, M> {
    /// Optimisers for `model`'s adapters.
    pub fn new(config: ElboConfig, model: &M) -> Self {
        let clip = config.grad_clip.map(|clip| GradientClippingConfig::Norm(clip as f32));
        let epsilon = config.epsilon as f32;
        let adamw = AdamWConfig::new()
            .with_weight_decay(config.weight_decay as f32)
            .with_epsilon(epsilon)
            .with_grad_clipping(clip.clone());
        let std_adam = AdamWConfig::new()
            .with_weight_decay(0.0)
            .with_epsilon(epsilon)
            .with_grad_clipping(clip);
        Self {
            adamw: adamw.init(),
            sgd: SgdConfig::new().init(),
            std_adam: std_adam.init(),
            groups: model.param_groups(),
            config,
        }
    }

    /// One step of `model` on `nll` (the batch's mean NLL, computed by
    /// `model`, shape `[1]`) at learning rates `lr`, plus the KL term when
    /// `kl` is given. A non-finite NLL or KL is returned as [`NonFinite`],
    /// with the model left untouched.
    pub fn step(
        &mut self,
        model: &mut M,
        nll: Tensor<B, 1>,
        lr: Rates,
        kl: Option<KlTerm>,
    ) -> Result<StepValues, NonFinite> {
        let nll_value: f64 = nll.clone().into_scalar().elem();
        self.run::<std::convert::Infallible>(model, nll, nll_value, lr, kl, None)
            .map_err(|e| match e {
                ReducedStepError::NonFinite(bad) => bad,
                ReducedStepError::Reduce(never) => match never {},
            })
    }

    /// One step of one data-parallel peer. `nll` is this peer's part of
    /// the batch NLL, weighted so that the peers' parts sum to the batch's
    /// mean NLL; `nll_total` is that sum (checked and reported); `reduce`
    /// sums data gradients over the peers (an all-reduce). The KL term
    /// depends on the parameters only: every replica computes the same KL
    /// gradient itself, and it is not reduced. With an identity `reduce`
    /// and one peer this is [`Self::step`] (the single-optimiser split then
    /// runs two backward passes instead of one: the same gradient up to
    /// rounding).
    ///
    /// The adapters' parameters are taken to be matrices (rank 2), as
    /// melora's are.
    pub fn step_reduced<E>(
        &mut self,
        model: &mut M,
        nll: Tensor<B, 1>,
        nll_total: f64,
        lr: Rates,
        kl: Option<KlTerm>,
        reduce: &mut dyn FnMut(GradientsParams) -> Result<GradientsParams, E>,
    ) -> Result<StepValues, ReducedStepError<E>> {
        self.run(model, nll, nll_total, lr, kl, Some(reduce))
    }

    fn run<E>(
        &mut self,
        model: &mut M,
        nll: Tensor<B, 1>,
        nll_value: f64,
        lr: Rates,
        kl: Option<KlTerm>,
        mut reduce: Option<&mut dyn FnMut(GradientsParams) -> Result<GradientsParams, E>>,
    ) -> Result<StepValues, ReducedStepError<E>> {
        if !nll_value.is_finite() {
            return Err(ReducedStepError::NonFinite(NonFinite {
                what: "NLL",
                value: nll_value,
            }));
        }
        let parallel = reduce.is_some();
        let mut reduced = |grads: GradientsParams| match reduce.as_deref_mut() {
            Some(f) => f(grads).map_err(ReducedStepError::Reduce),
            None => Ok(grads),
        };
        let current = model.clone();
        let Some(term) = kl else {
            let grads = reduced(GradientsParams::from_grads(nll.backward(), &current))?;
            *model = self.adamw.step(lr.lr, current, grads);
            return Ok(StepValues {
                nll: nll_value,
                kl: 0.0,
            });
        };
        // The KL itself is reported (dividing the weighted one by the
        // weight would give 0/0 under a weight of 0).
        let kl = current.kl(term.prior_std);
        let kl_value = kl.clone().into_scalar().elem::<f64>();
        let kl = kl.mul_scalar(term.weight);
        if !kl_value.is_finite() {
            return Err(ReducedStepError::NonFinite(NonFinite {
                what: "KL",
                value: kl_value,
            }));
        }
        let groups = &self.groups;
        *model = match self.config.optimizer {
            OptimizerSplit::Single if !parallel => {
                let grads = GradientsParams::from_grads(nll.add(kl).backward(), &current);
                self.adamw.step(lr.lr, current, grads)
            }
            OptimizerSplit::Single => {
                let data = reduced(GradientsParams::from_grads(nll.backward(), &current))?;
                let mut grads = GradientsParams::from_grads(kl.backward(), &current);
                add_into::<B>(&mut grads, data, &groups.all());
                self.adamw.step(lr.lr, current, grads)
            }
            OptimizerSplit::StdAdam => {
                let (mean, std) = if parallel {
                    let mut nll_grads = nll.backward();
                    let mut kl_grads = kl.backward();
                    let mut mean = GradientsParams::from_params(&mut kl_grads, &current, &groups.mean);
                    let mut std = GradientsParams::from_params(&mut kl_grads, &current, &groups.std);
                    add_into::<B>(
                        &mut mean,
                        reduced(GradientsParams::from_params(&mut nll_grads, &current, &groups.mean))?,
                        &groups.mean,
                    );
                    add_into::<B>(
                        &mut std,
                        reduced(GradientsParams::from_params(&mut nll_grads, &current, &groups.std))?,
                        &groups.std,
                    );
                    (mean, std)
                } else {
                    let mut grads = nll.add(kl).backward();
                    (
                        GradientsParams::from_params(&mut grads, &current, &groups.mean),
                        GradientsParams::from_params(&mut grads, &current, &groups.std),
                    )
                };
                let updated = self.adamw.step(lr.lr, current, mean);
                self.std_adam.step(lr.kl_lr, updated, std)
            }
            OptimizerSplit::TwoOptimizers => {
                let mut nll_grads = nll.backward();
                let mut kl_grads = kl.backward();
                let mean = reduced(GradientsParams::from_params(&mut nll_grads, &current, &groups.mean))?;
                let std_nll = reduced(GradientsParams::from_params(&mut nll_grads, &current, &groups.std))?;
                let mut sgd_grads = GradientsParams::from_params(&mut kl_grads, &current, &groups.all());
                add_into::<B>(&mut sgd_grads, std_nll, &groups.std);
                let updated = self.adamw.step(lr.lr, current, mean);
                self.sgd.step(lr.kl_lr, updated, sgd_grads)
            }
        };
        Ok(StepValues {
            nll: nll_value,
            kl: kl_value,
        })
    }
}

/// Adds the gradients of `ids` in `extra` into `grads` (a gradient only one
/// of them has is taken as it is).
fn add_into<B: AutodiffBackend>(grads: &mut GradientsParams, mut extra: GradientsParams, ids: &[ParamId]) {
    for id in ids {
        if let Some(g) = extra.remove::<B::InnerBackend, 2>(*id) {
            let total = match grads.remove::<B::InnerBackend, 2>(*id) {
                Some(k) => g.add(k),
                None => g,
            };
            grads.register(*id, total);
        }
    }
}

/// What stopped a data-parallel step ([`ElboStep::step_reduced`]).
#[derive(Debug, thiserror::Error)]
pub enum ReducedStepError<E> {
    /// A loss term is not finite (on every peer: the NLL checked is the sum).
    #[error(transparent)]
    NonFinite(NonFinite),
    /// The gradient reduction failed.
    #[error("the gradient reduction failed")]
    Reduce(E),
}
