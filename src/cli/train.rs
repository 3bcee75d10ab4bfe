//! `lavit train <stage>`: one subcommand per training stage; each stage's loop lives in
//! `src/train/<stage>.rs` (owned by that stage's work).

#[derive(clap::Subcommand, Debug)]
pub enum Command {}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {}
}
