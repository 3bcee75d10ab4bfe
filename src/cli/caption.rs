//! `lavit caption` (owned by the llm work).

/// Arguments of `lavit caption`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit caption` is not built yet")
}
