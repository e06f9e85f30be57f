//! A run's settings: the method and everything a training run needs.

use crate::assets::Assets;
use crate::data::{LengthNorm, Scoring, Task};
use crate::error::LlamaError;
use crate::eval::{EnsembleConfig, PredictConfig, PredictOptions};
use crate::model::Target;
use crate::task::TaskSetup;
use crate::tokenizer::Tokenizer;
mod legacy;

use burn::config::Config;
use melora_core::{
    AdapterConfig, AdapterKind, BlobLinearConfig, BlobPosteriorConfig, ElboConfig, KlSchedule, LoraLinearConfig,
    LowRankConfig, MeLoraKl, MeLoraLinearConfig, MeLoraPosteriorConfig, NoiseDevice, OptimizerSplit, PriorConfig,
    SamplingMode,
};

/// What a run trains: one of the three adapters, or one of the paper's
/// baselines built on LoRA (docs/method.md section 4).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Method {
    /// LoRA.
    Lora,
    /// MAP: LoRA with weight decay (`--method map` sets 1e-5, BLoB's scripts).
    Map,
    /// MC dropout: LoRA whose adapter dropout stays on at evaluation,
    /// averaged over `eval_samples` passes (`--method mcd` sets 3).
    Mcd,
    /// Deep ensemble: `members` LoRA adapters trained with the MAP recipe
    /// from different seeds, predictions averaged.
    Ens,
    /// BLoB.
    Blob,
    /// Me-LoRA.
    MeLora,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 6] = [
        Method::Lora,
        Method::Map,
        Method::Mcd,
        Method::Ens,
        Method::Blob,
        Method::MeLora,
    ];

    /// The adapter family the method trains.
    pub fn adapter_kind(self) -> AdapterKind {
        match self {
            Self::Lora | Self::Map | Self::Mcd | Self::Ens => AdapterKind::Lora,
            Self::Blob => AdapterKind::Blob,
            Self::MeLora => AdapterKind::MeLora,
        }
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Map => "map",
            Self::Mcd => "mcd",
            Self::Ens => "ens",
            Self::Blob => "blob",
            Self::MeLora => "melora",
        }
    }

    /// `config` set to train this method with the settings `--method NAME`
    /// implies: MAP and ensembles a weight decay of 1e-5 (BLoB's scripts),
    /// MC dropout 3 evaluation passes.
    pub fn preset(self, config: TrainConfig) -> TrainConfig {
        let mut config = TrainConfig { method: self, ..config };
        match self {
            Self::Map | Self::Ens => config.elbo.weight_decay = 1e-5,
            Self::Mcd => config.predict.samples = 3,
            Self::Lora | Self::Blob | Self::MeLora => {}
        }
        config
    }
}

/// A named training recipe (`melora train --recipe NAME`): settings that go
/// together, applied over the configuration file and the typed flags and
/// before the `--set`s. It does not choose the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// BLoB's code as its scripts run it (bayesian-peft,
    /// `scripts/blob/blob-llama-all.sh` with `modelwrappers/blob.py`):
    /// AdamW at 1e-4 (epsilon 1e-6) without weight decay on the NLL for the means; SGD at
    /// 0.01 on the KL for the means and on NLL + KL for the std
    /// parameters, both on a 6% linear warm-up and a linear decay; the KL
    /// weighted as their code does ([`KlSchedule::BlobCode`], gamma 8);
    /// prior std 0.2, `eps` 0.05, Flipout, adapter dropout 0; the last
    /// step's checkpoint; and an adapter on the output projection too
    /// (`lm_head` added to the targets: their `--apply-classhead-lora`).
    BlobOfficial,
    /// What melora's calibration study of 600 steps ran (for comparison):
    /// the two-optimiser split with SGD at a constant 0.01 and the
    /// per-example ELBO's KL weight.
    Study,
}

impl Recipe {
    /// Every recipe.
    pub const ALL: [Recipe; 2] = [Recipe::BlobOfficial, Recipe::Study];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::BlobOfficial => "blob-official",
            Self::Study => "study",
        }
    }

    /// `config` with this recipe's settings.
    pub fn apply(self, config: TrainConfig) -> TrainConfig {
        match self {
            Self::BlobOfficial => {
                let mut c = TrainConfig {
                    elbo: ElboConfig {
                        optimizer: OptimizerSplit::TwoOptimizers,
                        weight_decay: 0.0,
                        epsilon: 1e-6,
                        ..config.elbo
                    },
                    kl_lr: 0.01,
                    kl_lr_schedule: true,
                    kl_schedule: KlSchedule::BlobCode { gamma: Some(8.0) },
                    lr: 1e-4,
                    warmup_ratio: 0.06,
                    train_sampling: SamplingMode::Flipout,
                    select_best: false,
                    ..config
                };
                c.prior.std = 0.2;
                c.prior.noise = false;
                if !c.targets.contains(&Target::LmHead) {
                    c.targets.push(Target::LmHead);
                }
                c.blob.init_eps = 0.05;
                c.low_rank.dropout = 0.0;
                c
            }
            Self::Study => TrainConfig {
                elbo: ElboConfig {
                    optimizer: OptimizerSplit::TwoOptimizers,
                    ..config.elbo
                },
                kl_lr: 0.01,
                kl_lr_schedule: false,
                kl_schedule: KlSchedule::Constant { weight: 1.0 },
                ..config
            },
        }
    }
}

impl std::str::FromStr for Recipe {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let key = s.to_ascii_lowercase().replace('_', "-");
        Self::ALL
            .into_iter()
            .find(|r| r.name() == key)
            .ok_or_else(|| format!("unknown recipe {s:?}: expected blob-official or study"))
    }
}

impl From<AdapterKind> for Method {
    fn from(kind: AdapterKind) -> Self {
        match kind {
            AdapterKind::Lora => Self::Lora,
            AdapterKind::Blob => Self::Blob,
            AdapterKind::MeLora => Self::MeLora,
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let key = s.to_ascii_lowercase().replace(['-', '_'], "");
        Self::ALL.into_iter().find(|m| m.name() == key).ok_or_else(|| {
            format!("unknown method {s:?}: expected lora, map, mcd, ens, blob or melora (Laplace: `melora laplace --run DIR` on a map run)")
        })
    }
}

/// Everything a training run needs; saved as `config.json` in the run folder.
#[derive(Config, Debug)]
pub struct TrainConfig {
    /// A preset (`smollm2-135m`), a Hugging Face folder or a GGUF file.
    #[config(default = "String::from(crate::pretrained::DEFAULT_MODEL)")]
    pub model: String,
    /// The task.
    #[config(default = "Task::ArcE")]
    pub task: Task,
    /// A user's questions (with the task `files`): their files and prompt
    /// templates.
    #[config(default = "None")]
    pub data: Option<crate::data::own::DataFiles>,
    /// How choices are scored: `Label` (the answer-label logits, the
    /// paper's protocol) or `Answer` (each choice's log-likelihood as a
    /// continuation of the question; docs/method.md section 6.1).
    #[config(default = "Scoring::Label")]
    pub scoring: Scoring,
    /// Answer scoring's length normalisation of a choice's log-likelihood.
    #[config(default = "LengthNorm::None")]
    pub length_norm: LengthNorm,
    /// The method.
    #[config(default = "Method::MeLora")]
    pub method: Method,
    /// Adapted projections (`["q_proj", "v_proj"]`).
    #[config(default = "vec![Target::Q, Target::V]")]
    pub targets: Vec<Target>,
    /// What every adapter shares: rank `r`, `alpha` (the update is scaled
    /// by `alpha / r`, or `alpha / sqrt(r)` with `rslora`) and the adapter's
    /// input dropout.
    #[config(default = "LowRankConfig::new()")]
    pub low_rank: LowRankConfig,
    /// BLoB's own settings (`init_eps`, `std_param`), used by `blob` runs
    /// with `low_rank`.
    #[config(default = "BlobPosteriorConfig::new()")]
    pub blob: BlobPosteriorConfig,
    /// Me-LoRA's own settings, used by `melora` runs with `low_rank`: the
    /// KL variant (`kl`), how the mean and std start (`mean_init`,
    /// `init_eps`, `std_init`: `BlobRelative`, BLoB's relative noise, or
    /// `Blob`, its absolute numbers, docs/derivations.md section 1) and the
    /// std's parameterisation (`std_param`).
    #[config(default = "MeLoraPosteriorConfig::new()")]
    pub melora: MeLoraPosteriorConfig,
    /// The prior.
    #[config(default = "PriorConfig::new()")]
    pub prior: PriorConfig,
    /// KL weighting over steps: `Constant` (the KL enters as `weight * KL /
    /// N_train`; 1 is the ELBO), `Blob` (BLoB's cycle, averaging to the
    /// ELBO) or `BlobCode` (the weighting of BLoB's code, on the summed
    /// KL): [`KlSchedule`].
    #[config(default = "KlSchedule::Constant { weight: 1.0 }")]
    pub kl_schedule: KlSchedule,
    /// The optimisers' settings: which optimisers step which parameters
    /// (`optimizer`: `StdAdam`, AdamW for the means at `lr` and Adam for
    /// the std parameters at `kl_lr`, both on NLL + KL; `TwoOptimizers`,
    /// BLoB's code: AdamW on the NLL for the means, SGD at `kl_lr` on the
    /// KL and on the std parameters' NLL; `Single`, AdamW on everything),
    /// AdamW's `weight_decay`, `grad_clip` (an L2 norm, or null) and the
    /// Adam steps' `epsilon` (Burn's default 1e-5; BLoB's scripts 1e-6).
    #[config(default = "ElboConfig::new()")]
    pub elbo: ElboConfig,
    /// Training steps.
    #[config(default = 5000)]
    pub steps: usize,
    /// Examples per step.
    #[config(default = 4)]
    pub batch_size: usize,
    /// AdamW learning rate (peak).
    #[config(default = 1e-4)]
    pub lr: f64,
    /// Fraction of the steps with a linear warm-up (then linear decay to 0).
    #[config(default = 0.02)]
    pub warmup_ratio: f64,
    /// The second optimiser's peak learning rate: the std parameters'
    /// Adam under `StdAdam` (on `lr`'s warm-up and decay), SGD's on the KL
    /// under `TwoOptimizers` (BLoB's scripts: 0.01).
    #[config(default = 0.01)]
    pub kl_lr: f64,
    /// Under `TwoOptimizers`, whether SGD's learning rate follows `lr`'s
    /// warm-up and decay (BLoB's code) or stays at `kl_lr`.
    #[config(default = false)]
    pub kl_lr_schedule: bool,
    /// How the adapters sample during training.
    #[config(default = "SamplingMode::PerExample")]
    pub train_sampling: SamplingMode,
    /// Which generator draws the dropout masks and weight noise: `Auto`
    /// (the seeded host generator on the CPU, the backend's on a GPU),
    /// `Host` (identical draws on every backend) or `Backend`.
    #[config(default = "NoiseDevice::Auto")]
    pub noise: NoiseDevice,
    /// How the run predicts at evaluation: the Bayesian model average's
    /// `samples` (MC dropout's passes) and the examples per forward pass
    /// (`batch_size`).
    #[config(default = "PredictConfig::new()")]
    pub predict: PredictConfig,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    #[config(default = 100)]
    pub eval_every: usize,
    /// Write a checkpoint every this many steps.
    #[config(default = 100)]
    pub checkpoint_every: usize,
    /// Keep the checkpoint of the best validation accuracy (of the mean
    /// weights), the one `eval --run` takes (the paper's rule); `false`:
    /// the last step's (the rule of BLoB's code).
    #[config(default = true)]
    pub select_best: bool,
    /// Use at most this many validation examples (a fixed, seeded subset).
    #[config(default = "None")]
    pub max_validation: Option<usize>,
    /// Bayesian runs: posterior samples per example of the validation
    /// diagnostic (the spread of the gold answer's probability).
    #[config(default = 4)]
    pub posterior_samples: usize,
    /// Bayesian runs: validation examples that diagnostic uses (the first
    /// ones of the validation set; 0: none).
    #[config(default = 100)]
    pub posterior_examples: usize,
    /// Bayesian runs: before the first step, score this many training
    /// examples (a seeded random sample; all of them when there are fewer;
    /// 0: none) with the adapter switched off, the negative ELBO per
    /// example of a point every run can reach, for the verdict on the
    /// objective at the end.
    #[config(default = 512)]
    pub objective_examples: usize,
    /// Longest prompt in tokens.
    #[config(default = 300)]
    pub max_tokens: usize,
    /// Seed of initialisation, data order and noise.
    #[config(default = 0)]
    pub seed: u64,
    /// Deep ensembles: the number of `members`, their `seeds` (default
    /// `seed, seed + 1, ...`) and how their predictions are combined
    /// (`average`).
    #[config(default = "EnsembleConfig::new()")]
    pub ensemble: EnsembleConfig,
    /// Data-parallel peers in this process (one per device; on the CPU
    /// they share it), each computing its share of every batch: the same
    /// steps as one device, up to the order of the gradient sums
    /// (`train::parallel`).
    #[config(default = 1)]
    pub devices: usize,
}

impl TrainConfig {
    /// Checks that every setting is in its range; messages name the setting.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(LlamaError::Config(m));
        match (&self.data, self.task) {
            (Some(data), Task::Files) => data.check().map_err(LlamaError::Config)?,
            (None, Task::Files) => return bad("the task \"files\" needs its data (train and validation files)".into()),
            (Some(_), task) => {
                return bad(format!(
                    "data names question files but the task is {task}: the task of question files is \"files\""
                ))
            }
            (None, _) => {}
        }
        if self.steps == 0 || self.batch_size == 0 || self.predict.batch_size == 0 {
            return bad("steps, batch_size and predict.batch_size must be positive".into());
        }
        if self.devices == 0 || self.devices > self.batch_size {
            return bad(format!(
                "devices = {} must be in 1..=batch_size ({}): every peer takes at least one example of a batch",
                self.devices, self.batch_size
            ));
        }
        // Ranges wide enough for any experiment: a value outside them is a
        // typo or a corrupt file, caught here rather than as a diverged run.
        if !(self.lr > 0.0 && self.lr <= 1.0 && (0.0..=1.0).contains(&self.kl_lr)) {
            return bad(format!(
                "lr = {} must be in (0, 1] and kl_lr = {} in [0, 1]",
                self.lr, self.kl_lr
            ));
        }
        let elbo = &self.elbo;
        if !(0.0..=1.0).contains(&elbo.weight_decay) {
            return bad(format!("elbo.weight_decay = {} must be in [0, 1]", elbo.weight_decay));
        }
        if !(elbo.epsilon > 0.0 && elbo.epsilon <= 1.0) {
            return bad(format!("elbo.epsilon = {} must be in (0, 1]", elbo.epsilon));
        }
        if let Some(clip) = elbo.grad_clip.filter(|c| !(*c > 0.0 && *c <= 1e6)) {
            return bad(format!(
                "elbo.grad_clip = {clip} must be in (0, 1e6] (or null: no clipping)"
            ));
        }
        if !(self.prior.std <= 1e3) {
            return bad(format!("prior.std = {} must be at most 1e3", self.prior.std));
        }
        if let KlSchedule::Constant { weight } = self.kl_schedule {
            if !(weight <= 1e6) {
                return bad(format!("kl_schedule.Constant.weight = {weight} must be at most 1e6"));
            }
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!("warmup_ratio = {} must be in [0, 1)", self.warmup_ratio));
        }
        if self.max_tokens < 8 {
            return bad(format!("max_tokens = {} is too small for a prompt", self.max_tokens));
        }
        if self.targets.is_empty() {
            return bad("targets: no adapter target (expected some of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)".into());
        }
        // Every section, the method's or not: a bad value is a typo
        // whichever adapter the run trains.
        self.low_rank.validate()?;
        let section = |name: &str, e: melora_core::CoreError| LlamaError::Config(format!("{name}: {e}"));
        self.blob.validate().map_err(|e| section("blob", e))?;
        self.melora.validate().map_err(|e| section("melora", e))?;
        self.prior.validate()?;
        self.kl_schedule.validate()?;
        if self.method == Method::Ens {
            let ensemble = &self.ensemble;
            if ensemble.members == 0 {
                return bad("an ensemble needs ensemble.members >= 1".into());
            }
            if let Some(seeds) = &ensemble.seeds {
                if seeds.len() != ensemble.members {
                    return bad(format!(
                        "ensemble.seeds has {} seeds for ensemble.members = {}",
                        seeds.len(),
                        ensemble.members
                    ));
                }
            }
        }
        Ok(())
    }

    /// The same settings with rank `r` (`low_rank.rank`).
    pub fn with_rank(mut self, rank: usize) -> Self {
        self.low_rank.rank = rank;
        self
    }

    /// The same settings with adapter dropout `p` (`low_rank.dropout`).
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.low_rank.dropout = dropout;
        self
    }

    /// The seeds of an ensemble's members.
    pub fn ensemble_seeds(&self) -> Vec<u64> {
        let ensemble = &self.ensemble;
        ensemble
            .seeds
            .clone()
            .unwrap_or_else(|| (0..ensemble.members as u64).map(|k| self.seed + k).collect())
    }

    /// The configuration of ensemble member `k`: a MAP run with its seed.
    pub fn member(&self, k: usize) -> TrainConfig {
        let mut member = self.clone();
        member.method = Method::Map;
        member.seed = self.ensemble_seeds()[k];
        member.ensemble.seeds = None;
        member
    }

    /// The adapter configuration.
    pub fn adapter(&self) -> AdapterConfig {
        let low_rank = self.low_rank.clone();
        match self.method.adapter_kind() {
            AdapterKind::Lora => AdapterConfig::Lora(LoraLinearConfig::new().with_low_rank(low_rank)),
            AdapterKind::Blob => AdapterConfig::Blob(BlobLinearConfig {
                low_rank,
                posterior: self.blob.clone(),
            }),
            AdapterKind::MeLora => AdapterConfig::MeLora(MeLoraLinearConfig {
                low_rank,
                posterior: self.melora.clone(),
            }),
        }
    }

    /// How a run of this configuration predicts at evaluation: MC dropout
    /// keeps dropout on over `predict.samples` passes; BLoB and Me-LoRA average
    /// `predict.samples` per-example draws; LoRA and MAP use the mean weights.
    /// (Ensembles and Laplace have their own predictors.)
    pub fn eval_options(&self, batch_size: usize, seed: u64) -> PredictOptions {
        let mean = PredictOptions {
            seed,
            noise: self.noise,
            ..PredictOptions::mean(batch_size)
        };
        match self.method {
            Method::Mcd => PredictOptions {
                samples: self.predict.samples.max(1),
                dropout: self.low_rank.dropout > 0.0,
                ..mean
            },
            Method::Blob | Method::MeLora if self.predict.samples > 1 => PredictOptions {
                samples: self.predict.samples,
                mode: SamplingMode::PerExample,
                ..mean
            },
            _ => mean,
        }
    }

    /// The set-up of this run's task, scoring and prompt length, read
    /// with `tokenizer` from `assets`.
    pub fn task_setup(&self, tokenizer: Tokenizer, assets: &Assets) -> crate::Result<TaskSetup> {
        if let Some(data) = &self.data {
            return TaskSetup::files(data.clone(), self.scoring, self.length_norm, self.max_tokens, tokenizer);
        }
        TaskSetup::new(
            self.task,
            self.scoring,
            self.length_norm,
            self.max_tokens,
            tokenizer,
            assets,
        )
    }

    /// Whether the method has random weights (and a KL term).
    pub fn is_bayesian(&self) -> bool {
        self.method.adapter_kind() != AdapterKind::Lora
    }

    /// Why the adapter switched off bounds nothing for this run's
    /// objective, if it does not: no posterior has KL 0 under its KL term
    /// (the paper's Me-LoRA term, unbounded below; the paper's prior noise,
    /// which draws another prior at each step).
    pub fn objective_unbounded(&self) -> Option<&'static str> {
        if self.prior.noise {
            Some("with the prior noise (another prior every step) no posterior has KL 0")
        } else if self.method.adapter_kind() == AdapterKind::MeLora && self.melora.kl == MeLoraKl::Paper {
            Some("the paper's Me-LoRA KL term is not a KL (unbounded below): nothing bounds its objective")
        } else {
            None
        }
    }
}

impl crate::settings::Settings for TrainConfig {
    const WHAT: &'static str = "training configuration";

    fn defaults() -> Self {
        Self::new()
    }

    /// Older spellings: `targets` as one comma-separated string, the
    /// settings that moved into sections (`rank` for `low_rank.rank`,
    /// `weight_decay` for `elbo.weight_decay`, `members` for
    /// `ensemble.members`, ...: [`legacy::MOVED`]), and the adapter
    /// sections' former copies of `low_rank`.
    fn respell(json: &mut serde_json::Value) -> Result<(), String> {
        legacy::respell(json)
    }

    fn respell_override(item: &str) -> String {
        legacy::respell_override(item)
    }

    fn validate(&self) -> crate::Result<()> {
        TrainConfig::validate(self)
    }
}

#[cfg(test)]
mod tests;
