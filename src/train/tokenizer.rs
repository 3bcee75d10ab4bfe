//! `lavit train tokenizer` (owned by the tokenizer work).

/// Arguments of `lavit train tokenizer`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit train tokenizer` is not built yet")
}
