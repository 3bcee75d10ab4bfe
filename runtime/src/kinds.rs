//! The vocabulary every other runtime module shares: the five stage kinds, how a stage
//! actor ended, and why a request failed. It depends on nothing else in the runtime except
//! the crate's error type, so `messages`, `stage`, `inflight` and `actors` layer on top of it
//! without import circles: `kinds` ← `messages` ← `stage` ← `inflight` ← `actors`.

use std::fmt;

/// The five stages, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StageKind {
    /// EVA ViT: images → patch features.
    Encoder,
    /// Token selector + token merger: patch features → decisions + merged features.
    SelectorMerger,
    /// `encode_task_layer` + codebook: merged features → visual ids.
    Quantizer,
    /// The LLM: text/visual prefix → text ids (captions) or visual ids (generation).
    Llm,
    /// Feature decoder + U-Net + VAE: visual ids → pixels.
    Decoder,
}

impl StageKind {
    pub const ALL: [StageKind; 5] = [
        StageKind::Encoder,
        StageKind::SelectorMerger,
        StageKind::Quantizer,
        StageKind::Llm,
        StageKind::Decoder,
    ];
    /// The name used for threads, metrics labels and placement keys.
    pub fn name(self) -> &'static str {
        match self {
            StageKind::Encoder => "encoder",
            StageKind::SelectorMerger => "selector_merger",
            StageKind::Quantizer => "quantizer",
            StageKind::Llm => "llm",
            StageKind::Decoder => "decoder",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for StageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a stage actor ended (quickwit-style).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Its upstream closed and it finished every message it had.
    Success,
    /// It was told to quit.
    Quit,
    /// Its downstream mailbox was closed, so it could not forward work.
    DownstreamClosed,
    /// It failed (its weights did not load, or the recovery policy gave up on it).
    Failure,
    /// It panicked more often in a row than the recovery policy allows.
    Panicked,
}

/// Why a request failed inside the pipeline.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum StageError {
    /// The request was cancelled (client gone, caller dropped the future, explicit cancel).
    #[error("request cancelled")]
    Cancelled,
    /// The request is invalid for this stage (a shape, a length, an option); a 4xx.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A forward pass returned an error (an internal failure: a 5xx, counted by `kind`).
    #[error("stage {stage} failed: {msg}")]
    Failed {
        stage: StageKind,
        kind: FailureKind,
        msg: String,
    },
    /// A forward pass panicked; the panic was caught.
    #[error("stage {stage} panicked: {msg}")]
    Panicked { stage: StageKind, msg: String },
    /// A stage is gone (quit, failed to load, or exited after too many panics).
    #[error("stage {stage} is not running")]
    Closed { stage: StageKind },
    /// The pipeline is full (bounded admission).
    #[error("busy: {0}")]
    Busy(String),
    /// The pipeline is draining (shutting down) and takes no new work.
    #[error("draining: not accepting new requests")]
    Draining,
}

/// What an internal failure came from (the `kind` label of the server's
/// `lavit_internal_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Reading or writing a file.
    Io,
    /// A libtorch operation (a `f_*` call returned an error).
    Libtorch,
    /// A backbone or codebook behind the plugin API returned an error.
    Plugin,
    /// Anything else a stage reported.
    Stage,
}

impl FailureKind {
    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Io => "io",
            FailureKind::Libtorch => "libtorch",
            FailureKind::Plugin => "plugin",
            FailureKind::Stage => "stage",
        }
    }
}

impl StageError {
    /// A stage failure of no more specific kind.
    pub fn failed(stage: StageKind, e: impl fmt::Display) -> Self {
        Self::failed_as(stage, FailureKind::Stage, e)
    }

    pub fn failed_as(stage: StageKind, kind: FailureKind, e: impl fmt::Display) -> Self {
        StageError::Failed {
            stage,
            kind,
            msg: e.to_string(),
        }
    }

    /// A runtime error met by `stage` while serving a request: invalid input stays a client
    /// error, a cancellation stays one, everything else is an internal failure of its kind.
    pub fn from_error(stage: StageKind, e: crate::Error) -> Self {
        let kind = match &e {
            crate::Error::Invalid(m) => return StageError::Invalid(m.clone()),
            crate::Error::Cancelled => return StageError::Cancelled,
            crate::Error::Io { .. } => FailureKind::Io,
            crate::Error::Torch { .. } => FailureKind::Libtorch,
            crate::Error::Plugin { .. } => FailureKind::Plugin,
            _ => FailureKind::Stage,
        };
        Self::failed_as(stage, kind, e)
    }
}

impl From<crate::Error> for StageError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Invalid(m) => StageError::Invalid(m),
            crate::Error::Cancelled => StageError::Cancelled,
            other => StageError::Invalid(other.to_string()),
        }
    }
}

/// A stage's error where a driver or the library reports it (its message, as an invalid
/// request or run).
impl From<StageError> for crate::Error {
    fn from(e: StageError) -> Self {
        crate::Error::invalid(e.to_string())
    }
}

pub type StageResult<T> = std::result::Result<T, StageError>;
