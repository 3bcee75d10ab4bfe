//! `lavit reconstruct` (owned by the pixel-decoder work).

/// Arguments of `lavit reconstruct`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit reconstruct` is not built yet")
}
