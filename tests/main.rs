//! The one integration-test binary (each libtorch link is slow): one module per area.

mod common;

mod checkpoint;
mod cli;
mod config;
mod demo;
mod dist;
mod eval;
mod fuzz;
mod hostile;
mod llm;
mod pixel;
mod plugins;
mod serving;
mod tokenizer;
