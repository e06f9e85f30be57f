//! The error type of `melora-core`.

/// Everything that can go wrong in `melora-core`: invalid configurations and
/// numerical failures. Messages name the setting, the expected and the found
/// value.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CoreError {
    /// A configuration value is out of its valid range.
    #[error("invalid {name} = {value}: {expected}")]
    InvalidConfig {
        /// The name of the setting.
        name: &'static str,
        /// The value found, as written.
        value: String,
        /// What the value must satisfy.
        expected: &'static str,
    },
    /// A tensor given to build a module has the wrong shape.
    #[error("shape mismatch for {name}: expected {expected:?}, found {found:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },
    /// An adapter was given the wrong number of tensors.
    #[error("an adapter takes the tensors {expected}; {found} were given")]
    TensorCount {
        /// The tensors' names, in order.
        expected: String,
        /// How many were given.
        found: usize,
    },
    /// Merging produced a NaN or an infinite weight.
    #[error("merging the adapter into the base weight produced non-finite values")]
    NonFiniteMerge,
    /// Metric inputs are inconsistent.
    #[error("invalid metric input: {0}")]
    Metric(String),
}

/// `Result` with [`CoreError`].
pub type Result<T> = std::result::Result<T, CoreError>;

pub(crate) fn check(ok: bool, name: &'static str, value: impl std::fmt::Display, expected: &'static str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidConfig {
            name,
            value: value.to_string(),
            expected,
        })
    }
}
