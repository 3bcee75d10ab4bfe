//! `lavit`: the command line of lavit-rs.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(
    name = "lavit",
    version,
    about = "LaVIT in Rust: dynamic discrete visual tokens in one LLM"
)]
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
    /// Write a copy of a checkpoint folder with the LLM's linear layers quantised (int8 or int4).
    Quantize(cli::quantize::Args),
    /// Recompute the reference tensors of a checkpoint folder and compare.
    Parity(cli::parity::Args),
    /// Image(s) → dynamic visual token ids (JSON lines).
    Tokenize(cli::tokenize::Args),
    /// Image (+ question) → text.
    Caption(cli::caption::Args),
    /// Text (and image parts, `--image`) → image tokens → pixels (PNG).
    Generate(cli::generate::Args),
    /// Image → tokens → pixels (PNG).
    Reconstruct(cli::reconstruct::Args),
    /// Train a stage.
    #[command(subcommand)]
    Train(cli::train::Command),
    /// HTTP server.
    Serve(cli::serve::Args),
    /// Train the whole pipeline on real images on the CPU, then caption and draw.
    Demo(cli::demo::Args),
    /// Caption metrics (BLEU-4, CIDEr-D), VQA accuracy and text→image FID of a checkpoint.
    Eval(cli::eval::Args),
    /// Print a shell completion script, e.g. `lavit completions bash > ~/.local/share/bash-completion/completions/lavit`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The matches too: `lavit generate` orders its prompt parts by their positions.
    let matches = Args::command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match args.command {
        Command::Inspect { path } => cli::inspect::inspect(&path),
        Command::Convert { src, dst } => cli::inspect::convert(&src, &dst),
        Command::Quantize(a) => cli::quantize::run(a),
        Command::Parity(a) => cli::parity::run(a),
        Command::Tokenize(a) => cli::tokenize::run(a),
        Command::Caption(a) => cli::caption::run(a),
        Command::Generate(a) => cli::generate::run(a, matches.subcommand_matches("generate")),
        Command::Reconstruct(a) => cli::reconstruct::run(a),
        Command::Train(c) => cli::train::run(c),
        Command::Serve(a) => cli::serve::run(a),
        Command::Demo(a) => cli::demo::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Completions { shell } => {
            cli::completions(shell, &mut Args::command());
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
