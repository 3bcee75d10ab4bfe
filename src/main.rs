//! `lavit`: the command line of lavit-rs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(name = "lavit", version, about = "LaVIT in Rust: dynamic discrete visual tokens in one LLM")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List keys, shapes, dtypes and totals of a checkpoint file or folder.
    Inspect { path: PathBuf },
    /// Write a checkpoint (file, folder or shard index) as one safetensors file, keys unchanged.
    Convert { src: PathBuf, dst: PathBuf },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = match args.command {
        Command::Inspect { path } => cli::inspect::inspect(&path),
        Command::Convert { src, dst } => cli::inspect::convert(&src, &dst),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
