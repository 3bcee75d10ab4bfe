//! `lavit train decoder` (owned by the pixel-decoder work).

/// Arguments of `lavit train decoder`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit train decoder` is not built yet")
}
