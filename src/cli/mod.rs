//! The `lavit` command line: one module per subcommand.
pub mod inspect;
