//! The `lavit` command line: one module per subcommand.
pub mod caption;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod parity;
pub mod reconstruct;
pub mod serve;
pub mod tokenize;
pub mod train;

/// `lavit completions SHELL`: the completion script for `cmd` on stdout.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) {
    clap_complete::generate(shell, cmd, "lavit", &mut std::io::stdout());
}
