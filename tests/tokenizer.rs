//! Integration tests: tokenizer.
