//! The run folder: its configuration, log, metrics and checkpoints,
//! written so that a crash loses nothing a resume cannot redo.

use crate::assets::write_atomic;
use crate::error::LlamaError;
use burn::module::ParamId;
use burn::record::{PrecisionSettings, Record};
use melora_core::Metrics;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// The mean posterior std at initialisation (Bayesian runs).
    #[serde(default)]
    pub std_init: Option<f64>,
    /// The mean posterior std where the last fifth of the steps begins
    /// ([`crate::posterior::last_fifth_start`]), for the verdict at the end.
    #[serde(default)]
    pub std_last_fifth: Option<f64>,
    /// The training NLL of the adapter switched off (Bayesian runs with
    /// `objective_examples`): the negative ELBO per example of a point
    /// every run can reach, measured before the first step.
    #[serde(default)]
    pub adapter_off: Option<crate::posterior::AdapterOff>,
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
    /// The standard error of that mean, from the spread of its steps' NLLs
    /// (`None`: fewer than two steps, or a record written without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_nll_se: Option<f64>,
    /// A Bayesian run's posterior: its spread, the KL and its weight, and
    /// the spread of the gold answer's probability across samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posterior: Option<crate::posterior::Diagnostics>,
}

/// Which of a run's checkpoints to read: the one of the best validation
/// accuracy (of the mean weights) or the last step's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpoint {
    /// `checkpoints/best` (written when `select_best` is on).
    Best,
    /// `checkpoints/last`: the end of training once it has finished.
    Last,
}

impl Checkpoint {
    /// `best` or `last`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Best => "best",
            Self::Last => "last",
        }
    }
}

impl std::str::FromStr for Checkpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "best" => Ok(Self::Best),
            "last" => Ok(Self::Last),
            _ => Err(format!("unknown checkpoint {s:?}: expected best or last")),
        }
    }
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The records of `text`, a `metrics.jsonl` read from `path`, each with
/// its line. A last line cut short (a crash in the middle of its write, or
/// a run writing it now) is left out; any other line that is not a record
/// is an error naming the file and the line.
pub fn metrics_records<'t>(path: &Path, text: &'t str) -> crate::Result<Vec<(EvalRecord, &'t str)>> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<EvalRecord>(line) {
            Ok(record) => records.push((record, *line)),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err(LlamaError::format(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(records)
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
        RunDir {
            dir: self.dir.join("members").join(k.to_string()),
        }
    }
    /// The checkpoint to evaluate: the best one, else the last.
    pub fn final_checkpoint(&self) -> Option<PathBuf> {
        self.complete_checkpoint(&self.best())
            .or_else(|| self.complete_checkpoint(&self.last()))
    }

    /// The checkpoint `which` names, or [`Self::final_checkpoint`] for
    /// `None`; an error that says why when it is not there.
    pub fn checkpoint(&self, which: Option<Checkpoint>) -> crate::Result<PathBuf> {
        let found = match which {
            None => self.final_checkpoint(),
            Some(Checkpoint::Best) => self.complete_checkpoint(&self.best()),
            Some(Checkpoint::Last) => self.complete_checkpoint(&self.last()),
        };
        found.ok_or_else(|| {
            let why = match which {
                Some(Checkpoint::Best) => {
                    "no best checkpoint (the run was trained with select_best = false, or has not validated yet)"
                }
                _ => "no checkpoint yet",
            };
            LlamaError::Unavailable(format!("{} has {why}", self.dir.display()))
        })
    }

    /// Appends a line to a file of the run.
    pub fn append(&self, path: &Path, line: &str) -> crate::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| LlamaError::write(path, e))?;
        writeln!(f, "{line}").map_err(|e| LlamaError::write(path, e))
    }

    /// The validation records of `metrics.jsonl` (none when it does not
    /// exist yet).
    pub fn records(&self) -> crate::Result<Vec<EvalRecord>> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Vec::new());
        };
        Ok(metrics_records(&path, &text)?.into_iter().map(|(r, _)| r).collect())
    }

    /// Drops the records of `metrics.jsonl` after `step`.
    pub fn truncate_metrics(&self, step: usize) -> crate::Result<()> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let mut kept = String::new();
        for (record, line) in metrics_records(&path, &text)? {
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
    pub fn replace_checkpoint(
        &self,
        target: &Path,
        write: impl FnOnce(&Path) -> crate::Result<()>,
    ) -> crate::Result<()> {
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
            let kept = if target.exists() {
                format!("{} is left as it was", target.display())
            } else {
                "there was none before".into()
            };
            return Err(LlamaError::format(
                target,
                format!("the checkpoint could not be written ({e}); the previous checkpoint: {kept}"),
            ));
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
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| LlamaError::write(&path, e))?;
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

/// An optimiser's per-parameter record written in the order of the
/// parameter ids. Burn keeps it in a hash map whose iteration order is
/// seeded anew in every process, so the same state gave different bytes
/// in `adamw.bin` from one process to the next, and resumed runs were not
/// byte-identical. A map and a
/// sequence of pairs have the same bincode encoding, so files written
/// either way load either way.
pub(super) struct Ordered<M>(pub(super) M);

impl<B, T, M> Record<B> for Ordered<M>
where
    B: burn::tensor::backend::Backend,
    T: Record<B>,
    M: IntoIterator<Item = (ParamId, T)> + FromIterator<(ParamId, T)> + Send,
{
    type Item<S: PrecisionSettings> = Vec<(String, T::Item<S>)>;

    fn into_item<S: PrecisionSettings>(self) -> Self::Item<S> {
        let mut items: Vec<_> = self
            .0
            .into_iter()
            .map(|(id, record)| (id.serialize(), record.into_item()))
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items
    }

    fn from_item<S: PrecisionSettings>(item: Self::Item<S>, device: &B::Device) -> Self {
        Self(
            item.into_iter()
                .map(|(id, item)| (ParamId::deserialize(&id), T::from_item(item, device)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::adaptor::OptimizerAdaptor;
    use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
    use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
    use burn::tensor::{Distribution, Tensor};

    type AD = Autodiff<NdArray<f64>>;

    #[test]
    fn a_named_checkpoint_is_that_one_or_an_error_that_says_why() {
        let dir = std::env::temp_dir().join(format!("melora-checkpoint-{}", std::process::id()));
        let run = RunDir { dir: dir.clone() };
        assert!(run
            .checkpoint(None)
            .unwrap_err()
            .to_string()
            .contains("has no checkpoint yet"));
        std::fs::create_dir_all(run.last()).unwrap();
        std::fs::write(run.last().join("state.json"), "{}").unwrap();
        // No best checkpoint: the default falls back to the last; asking for it fails.
        assert_eq!(run.checkpoint(None).unwrap(), run.last());
        assert_eq!(run.checkpoint(Some(Checkpoint::Last)).unwrap(), run.last());
        assert!(run
            .checkpoint(Some(Checkpoint::Best))
            .unwrap_err()
            .to_string()
            .contains("has no best checkpoint (the run was trained with select_best = false"));
        std::fs::create_dir_all(run.best()).unwrap();
        std::fs::write(run.best().join("state.json"), "{}").unwrap();
        assert_eq!(run.checkpoint(None).unwrap(), run.best());
        assert_eq!(run.checkpoint(Some(Checkpoint::Last)).unwrap(), run.last());
        assert_eq!("last".parse::<Checkpoint>(), Ok(Checkpoint::Last));
        assert!("final"
            .parse::<Checkpoint>()
            .unwrap_err()
            .contains("expected best or last"));
        std::fs::remove_dir_all(&dir).ok();
    }

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
        recorder
            .record(Ordered(adamw.to_record()), dir.join("ordered"))
            .unwrap();
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
