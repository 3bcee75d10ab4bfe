//! `lavit tokenize` (owned by the tokenizer work).

/// Arguments of `lavit tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit tokenize` is not built yet")
}
