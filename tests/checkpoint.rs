//! Integration tests: checkpoint.
