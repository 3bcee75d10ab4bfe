//! `lavit generate` (owned by the pixel-decoder work).

/// Arguments of `lavit generate`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit generate` is not built yet")
}
