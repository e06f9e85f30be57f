//! What a run trains ([`Method`]) and the named recipes over its settings
//! ([`Recipe`]).

use super::TrainConfig;
use crate::model::Target;
use burn::config::Config;
use melora_core::{AdapterKind, KlSchedule, OptimizerSplit, SamplingMode};

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
        let config = TrainConfig { method: self, ..config };
        match self {
            Self::Map | Self::Ens => config.with_weight_decay(1e-5),
            Self::Mcd => config.with_eval_samples(3),
            Self::Lora | Self::Blob | Self::MeLora => config,
        }
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
                    optimizer: OptimizerSplit::TwoOptimizers,
                    kl_lr: 0.01,
                    kl_lr_schedule: true,
                    kl_schedule: KlSchedule::BlobCode { gamma: Some(8.0) },
                    lr: 1e-4,
                    weight_decay: 0.0,
                    warmup_ratio: 0.06,
                    adam_epsilon: 1e-6,
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
                optimizer: OptimizerSplit::TwoOptimizers,
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
