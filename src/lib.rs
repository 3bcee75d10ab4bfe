//! lavit: LaVIT (ICLR 2024) in Rust on libtorch — a library facade over the stages
//! (`lavit-encoder`, `lavit-selector`, `lavit-quantizer`, `lavit-llm`, `lavit-decoder`),
//! the runtime (`lavit-runtime`) and the plugin API, plus parity and training loops.

pub mod demo;
pub mod eval;
pub mod generate;
pub mod parity;
pub mod pipeline;
pub mod serve;
pub mod tokenizer;
pub mod train;

pub use lavit_runtime as runtime;

/// Errors of the library facade (the pipeline and its configs): the runtime's (a checkpoint, a
/// config key, a device, a plugin), a request's, or an invalid setting. The CLI, the trainers
/// and the demo wrap them with context (anyhow).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] lavit_runtime::Error),
    #[error(transparent)]
    Stage(#[from] lavit_runtime::stage::StageError),
    #[error("{0}")]
    Invalid(String),
}

/// The facade's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
