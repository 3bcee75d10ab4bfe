//! The runtime's error type. Every variant names *what* was wrong and *where*
//! (a file, a key, a config field), so a user can act on it without a backtrace.

use std::path::PathBuf;

/// Errors from checkpoint I/O, configuration and tensor operations reached by user input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file that is malformed or unsafe to read.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A pickle that asks for something outside the allow-list (code execution gadgets).
    #[error("{path}: refused pickle global `{global}`: only tensor rebuild, OrderedDict and storage types are allowed")]
    UnsafePickle { path: PathBuf, global: String },
    /// Keys or shapes of a checkpoint do not match the model built from the config.
    #[error("loading {source_name} into {target}:\n{report}")]
    KeyMismatch {
        source_name: String,
        target: String,
        report: String,
    },
    /// A configuration value that is missing, of the wrong type, or out of range.
    #[error("config {origin}: key `{key}`: {msg}")]
    Config {
        origin: String,
        key: String,
        msg: String,
    },
    /// An error raised by libtorch (through a `f_*` call) with the operation it came from.
    #[error("{context}: {source}")]
    Torch {
        context: String,
        #[source]
        source: tch::TchError,
    },
    /// A collective of the data-parallel process group failed (a peer died, timed out, or
    /// the ranks disagree); the job must stop.
    #[error("collective {op} failed: {msg}")]
    Collective { op: String, msg: String },
    /// A backbone or codebook behind the plugin API failed on a request (its error, or an
    /// output of the wrong rank, shape or dtype).
    #[error("plugin API {part} `{name}`: {msg}")]
    Plugin {
        part: &'static str,
        name: String,
        msg: String,
    },
    /// Invalid input (an image, a request field, a tensor shape) with what was expected.
    #[error("{0}")]
    Invalid(String),
    /// A decode or diffusion loop stopped because its `ShouldStop` callback said so (the
    /// request was cancelled).
    #[error("cancelled")]
    Cancelled,
    /// Training stopped: the loss (or gradient norm) was NaN/Inf for `consecutive` steps in
    /// a row, ending at `step`; `checkpoint` is where the run was saved before stopping.
    #[error("training stopped at step {step}: {consecutive} consecutive non-finite losses ({skipped_total} skipped in all){}", checkpoint.as_ref().map(|p| format!("; last state saved in {}", p.display())).unwrap_or_default())]
    NonFiniteLoss {
        step: i64,
        consecutive: usize,
        skipped_total: u64,
        checkpoint: Option<PathBuf>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn ckpt(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn config(
        origin: impl Into<String>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            origin: origin.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// Attach context to a fallible tch call: `t.f_matmul(&w).ctx("attention scores")?`.
pub trait TchContext<T> {
    fn ctx(self, context: impl Into<String>) -> Result<T>;
}

impl<T> TchContext<T> for std::result::Result<T, tch::TchError> {
    fn ctx(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Torch {
            context: context.into(),
            source,
        })
    }
}
