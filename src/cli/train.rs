//! `lavit train <stage>`: one subcommand per training stage; each stage's loop lives in
//! `src/train/<stage>.rs`.

use lavit::train;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Stage 1: token selector, merger, codebook and feature decoder on a frozen encoder.
    Tokenizer(train::tokenizer::Args),
    /// Stage 2: unified next-token pretraining of the LLM (and merger / projector).
    Llm(train::llm::Args),
    /// Stage 1b: the diffusion pixel decoder conditioned on reconstructed features.
    Decoder(train::decoder::Args),
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Tokenizer(a) => train::tokenizer::run(a),
        Command::Llm(a) => train::llm::run(a),
        Command::Decoder(a) => train::decoder::run(a),
    }
}
