//! A task from a user's files: which files hold its splits and how their
//! questions become prompts.

use super::files::{read_question_file, Question};
use super::template::Template;
use super::Split;
use crate::error::{LlamaError, Result};
use std::path::{Path, PathBuf};

/// A task from a user's files: a run's `data` section (`melora train
/// --data FILE --validation FILE [--test FILE]`), stored with the run so
/// that `eval --run` and `predict --run` use the same questions and prompts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFiles {
    /// The training questions.
    pub train: PathBuf,
    /// The validation questions (checkpoint selection).
    pub validation: PathBuf,
    /// The test questions (reporting), if any.
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// How questions become prompts.
    #[serde(default)]
    pub template: Template,
}

impl DataFiles {
    /// The file of `split` (an error naming it when the run has none).
    pub fn path(&self, split: Split) -> Result<&Path> {
        match split {
            Split::Train => Ok(&self.train),
            Split::Validation => Ok(&self.validation),
            Split::Test => self.test.as_deref().ok_or_else(|| {
                LlamaError::Config(
                    "this run's data has no test file: give --test FILE (or evaluate --split validation)".into(),
                )
            }),
        }
    }

    /// One file of questions as every split, asked in `template`: what a
    /// model, an adapter or another run is evaluated on (`melora eval
    /// --data FILE`).
    pub fn one_file(file: &Path, template: Template) -> Self {
        Self {
            train: file.to_path_buf(),
            validation: file.to_path_buf(),
            test: Some(file.to_path_buf()),
            template,
        }
    }

    /// The questions of `split`, read and checked.
    pub fn read(&self, split: Split) -> Result<Vec<Question>> {
        read_question_file(self.path(split)?)
    }

    /// Checks the template (the files are read when a split is).
    pub fn check(&self) -> std::result::Result<(), String> {
        self.template.check()
    }
}
