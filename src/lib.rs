//! lavit: LaVIT in Rust.
