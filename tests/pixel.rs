//! Integration tests: pixel.
