//! placeholder crate root; filled in by the encoder stage
