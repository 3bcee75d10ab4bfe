//! `lavit train llm` (owned by the llm work).

/// Arguments of `lavit train llm`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit train llm` is not built yet")
}
