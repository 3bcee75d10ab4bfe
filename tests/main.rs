//! The one integration-test binary (each libtorch link is slow): one module per area.

// Test support code (helpers in tests/*.rs that are not #[test] functions) may unwrap/expect:
// a failure there is a failed test. Library and binary code deny both (workspace lints).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod checkpoint;
mod cli;
mod config;
mod demo;
mod denoiser;
mod dist;
mod eval;
mod fuzz;
mod fuzz_http;
mod hostile;
mod hostile_http;
mod hostile_inputs;
mod llm;
mod options;
mod pixel;
mod plugins;
mod quant;
mod serving;
mod synthesis;
mod tokenizer;
