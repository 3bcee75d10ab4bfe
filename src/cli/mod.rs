//! The `lavit` command line: one module per subcommand.
pub mod caption;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod parity;
pub mod reconstruct;
pub mod serve;
pub mod tokenize;
pub mod train;
