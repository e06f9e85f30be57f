//! The error type of `melora-llama`.

use std::path::PathBuf;

/// Everything that can go wrong loading, building or running a model.
/// Messages name the file or tensor, what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file or folder could not be written (a read-only or full disk).
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not in the expected format, or is truncated or corrupt.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is not in the weights.
    #[error("missing tensor {name} in {source_name}")]
    Missing {
        /// The tensor's (Hugging Face) name.
        name: String,
        /// Where it was looked up.
        source_name: String,
    },
    /// A tensor has the wrong shape.
    #[error("shape mismatch for {name}: expected {expected:?}, found {found:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// A tensor's element type is not supported.
    #[error("{name}: unsupported tensor type {dtype} (supported: {supported})")]
    Dtype {
        /// The tensor's name.
        name: String,
        /// The type found.
        dtype: String,
        /// The supported types.
        supported: &'static str,
    },
    /// A configuration (of the model, a run, an adapter) is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Data-parallel training: a peer, the all-reduce or the cluster
    /// settings.
    #[error("data-parallel training: {0}")]
    Peers(String),
    /// Training stopped because a loss term was not finite; the last good
    /// checkpoint is kept.
    #[error(
        "training stopped at step {step}: the {what} is {value}; the last good checkpoint is kept in {checkpoint}"
    )]
    Stopped {
        /// The 1-based step that failed.
        step: usize,
        /// The term: `NLL` or `KL`.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The checkpoint kept.
        checkpoint: PathBuf,
    },
    /// Something could not be serialised (JSON, safetensors).
    #[error("cannot serialise {what}: {message}")]
    Serialize {
        /// What was being written.
        what: String,
        /// The serialiser's message.
        message: String,
    },
    /// An external command is missing or failed.
    #[error("{command}: {message}")]
    Command {
        /// The command line.
        command: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// A model, tokenizer or data set the job needs is not available.
    #[error("not available: {0}")]
    Unavailable(String),
    /// Inputs that are each valid do not fit together (a posterior and an
    /// adapter, the members of an ensemble, labels and classes).
    #[error("inputs do not match: {0}")]
    Mismatch(String),
    /// A task's data cannot be used (no examples, an empty continuation).
    #[error("task {task}: {message}")]
    Data {
        /// The task.
        task: String,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A computation gave numbers that cannot be used (a covariance that
    /// is not positive semi-definite, a curvature that overflowed).
    #[error("numerical failure: {0}")]
    Numerical(String),
    /// An adapter error from melora-core.
    #[error(transparent)]
    Core(#[from] melora_core::CoreError),
}

impl LlamaError {
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A write error for `path`.
    pub fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Write {
            path: path.into(),
            source,
        }
    }

    /// A serialisation error while writing `what`.
    pub fn serialize(what: impl Into<String>, error: impl std::fmt::Display) -> Self {
        Self::Serialize {
            what: what.into(),
            message: error.to_string(),
        }
    }

    /// An I/O error for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`LlamaError`].
pub type Result<T> = std::result::Result<T, LlamaError>;
