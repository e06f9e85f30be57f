//! A run's settings read back: older spellings, an adapter's own
//! `low_rank` refused, the official BLoB recipe, presets then overrides.

use super::*;
use crate::eval::EnsembleAverage;
use crate::settings::Loader;
use crate::train::Recipe;
use melora_core::{MeLoraKl, StdInit};
use std::path::Path;

/// The defaults with `overrides`.
fn with(overrides: &[String]) -> crate::Result<TrainConfig> {
    Loader::file(None).overrides(overrides).load()
}

/// A run folder's `config.json` from before the adapters' sections, and
/// the short `--set` keys, read as today's settings.
#[test]
fn older_spellings_are_read_as_todays() {
    let old = r#"{"targets": "q_proj, down_proj", "rank": 4, "alpha": 8.0, "dropout": 0.0, "kl": "Paper", "std_init": "Blob", "method": "MeLora",
        "optimizer": "Single", "weight_decay": 0.01, "grad_clip": 2.0, "adam_epsilon": 1e-8, "eval_samples": 5,
        "eval_batch_size": 2, "members": 2, "member_seeds": [7, 9], "ensemble_average": "Logits",
        "blob": {"low_rank": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "rslora": false}, "init_eps": 0.1}}"#;
    let config: TrainConfig = Loader::text(old, Path::new("config.json")).load().unwrap();
    assert_eq!(config.targets, vec![Target::Q, Target::Down]);
    assert_eq!(
        (
            config.low_rank.rank,
            config.low_rank.alpha,
            config.low_rank.dropout,
            config.low_rank.rslora
        ),
        (4, 8.0, 0.0, false)
    );
    assert_eq!(
        (config.melora.kl, config.melora.std_init, config.blob.init_eps),
        (MeLoraKl::Paper, StdInit::Blob, 0.1)
    );
    let elbo = &config.elbo;
    assert_eq!(
        (elbo.optimizer, elbo.weight_decay, elbo.grad_clip, elbo.epsilon),
        (OptimizerSplit::Single, 0.01, Some(2.0), 1e-8)
    );
    assert_eq!((config.predict.samples, config.predict.batch_size), (5, 2));
    assert_eq!(
        config.ensemble,
        EnsembleConfig::new()
            .with_members(2)
            .with_seeds(Some(vec![7, 9]))
            .with_average(EnsembleAverage::Logits)
    );
    // The adapter is built from the one low-rank section.
    let AdapterConfig::MeLora(adapter) = config.adapter() else {
        panic!("a Me-LoRA adapter")
    };
    assert_eq!(
        (adapter.low_rank.rank, adapter.posterior.kl, adapter.posterior.std_init),
        (4, MeLoraKl::Paper, StdInit::Blob)
    );
    let set = [
        "rank=2",
        "kl=Subspace",
        "targets=v_proj",
        "low_rank.rslora=true",
        "melora.init_eps=0.5",
        "weight_decay=0.02",
        "eval_samples=4",
    ]
    .map(String::from);
    let config = with(&set).unwrap();
    assert_eq!(
        (
            config.low_rank.rank,
            config.low_rank.rslora,
            config.melora.kl,
            config.melora.init_eps
        ),
        (2, true, MeLoraKl::Subspace, 0.5)
    );
    assert_eq!(config.targets, vec![Target::V]);
    assert_eq!((config.elbo.weight_decay, config.predict.samples), (0.02, 4));
}

/// Rank and dropout have one home: an adapter section has no `low_rank`
/// of its own, and an old file's copy that says something else than
/// `low_rank` is refused rather than ignored; so are no targets.
#[test]
fn an_adapters_own_low_rank_and_empty_targets_are_refused() {
    let err = with(&["melora.low_rank.rank=4".into()]).unwrap_err().to_string();
    assert!(err.contains("unknown setting \"low_rank\""), "{err}");
    let old = r#"{"melora": {"low_rank": {"rank": 4, "alpha": 16.0, "dropout": 0.1, "rslora": false}}}"#;
    let err = Loader::<TrainConfig>::text(old, Path::new("config.json"))
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("melora.low_rank is set"),
        "{err}"
    );
    let err = with(&["blob.init_eps=-1".into()]).unwrap_err().to_string();
    assert!(err.contains("blob: ") && err.contains("init_eps"), "{err}");
    let err = with(&["targets=[]".into()]).unwrap_err().to_string();
    assert!(err.contains("no adapter target"), "{err}");
    let err = with(&["targets=[\"x_proj\"]".into()]).unwrap_err().to_string();
    assert!(err.contains("x_proj"), "{err}");
}

/// BLoB's official recipe sets what their scripts set and leaves the
/// method alone; `--set` still wins over it.
#[test]
fn the_official_blob_recipe() {
    let c = "blob-official"
        .parse::<Recipe>()
        .unwrap()
        .apply(Method::Blob.preset(TrainConfig::new()));
    assert_eq!(
        (c.method, c.elbo.optimizer, c.kl_lr, c.kl_lr_schedule),
        (Method::Blob, OptimizerSplit::TwoOptimizers, 0.01, true)
    );
    assert_eq!(c.kl_schedule, KlSchedule::BlobCode { gamma: Some(8.0) });
    assert_eq!(
        (
            c.lr,
            c.elbo.weight_decay,
            c.warmup_ratio,
            c.low_rank.dropout,
            c.elbo.epsilon
        ),
        (1e-4, 0.0, 0.06, 0.0, 1e-6)
    );
    assert_eq!(
        (c.train_sampling, c.select_best, c.prior.std, c.blob.init_eps),
        (SamplingMode::Flipout, false, 0.2, 0.05)
    );
    assert_eq!(c.targets, vec![Target::Q, Target::V, Target::LmHead]);
    let melora: TrainConfig = Loader::file(None)
        .edit(|c| Recipe::BlobOfficial.apply(c))
        .overrides(&["lr=2e-4".into()])
        .load()
        .unwrap();
    assert_eq!(
        (melora.method, melora.lr, melora.kl_lr_schedule),
        (Method::MeLora, 2e-4, true)
    );
    assert!("blob".parse::<Recipe>().is_err());
    // The default recipe: the std parameters' own Adam.
    assert_eq!(TrainConfig::new().elbo.optimizer, OptimizerSplit::StdAdam);
}

/// Presets are functions of a configuration; the typed flags come
/// before the `--set`s, which win.
#[test]
fn presets_then_overrides() {
    let map = Method::Map.preset(TrainConfig::new());
    assert_eq!((map.method, map.elbo.weight_decay), (Method::Map, 1e-5));
    assert_eq!(Method::Mcd.preset(TrainConfig::new()).predict.samples, 3);
    for set in ["weight_decay=0.01", "elbo.weight_decay=0.01"] {
        let config: TrainConfig = Loader::file(None)
            .edit(|c| Method::Ens.preset(c))
            .overrides(&[set.into()])
            .load()
            .unwrap();
        assert_eq!((config.method, config.elbo.weight_decay), (Method::Ens, 0.01));
    }
}
