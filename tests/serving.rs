//! Integration tests: serving.
