//! placeholder crate root; filled in by the quantizer stage
