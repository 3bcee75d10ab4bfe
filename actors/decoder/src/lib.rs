//! placeholder crate root; filled in by the decoder stage
