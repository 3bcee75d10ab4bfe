//! placeholder crate root; filled in by the selector stage
