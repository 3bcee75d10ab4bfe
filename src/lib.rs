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
