//! `lavit demo` (owned by the demo work).

/// Arguments of `lavit demo`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`lavit demo` is not built yet")
}
