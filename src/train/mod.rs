//! Training loops, one module per stage; they drive the same stages as inference.

pub mod decoder;
pub mod llm;
pub mod tokenizer;
