//! `lavit serve` (owned by the runtime work).

/// Arguments of `lavit serve`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit serve` is not built yet")
}
