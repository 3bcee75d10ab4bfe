//! placeholder crate root; filled in by the llm stage
