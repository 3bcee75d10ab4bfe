//! `lavit demo`: train the whole LaVIT pipeline on Fashion-MNIST on the CPU, then caption, draw
//! and write a report (see `lavit::demo`).

use std::path::PathBuf;

use lavit::demo::{self, DemoConfig, DemoOptions};

/// Arguments of `lavit demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The CI-sized run (configs/demo-quick.toml): a few minutes instead of ~15.
    #[arg(long)]
    pub quick: bool,
    /// Output folder (report/, checkpoint/, stages/); a rerun resumes finished stages.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// A demo configuration file (default: configs/demo.toml, compiled in).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Folder with Fashion-MNIST's gzipped IDX files.
    #[arg(long, default_value = demo::data::DEFAULT_DATA_DIR)]
    pub data: PathBuf,
    /// Torch CPU threads of each stage that runs beside another or has small ops (0 = half the cores, at least one); stage 0 and the evaluation use every core
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Stop after this stage: `stage1` trains stage 0 and the tokenizer and prints what its
    /// selector keeps on the held-out photos
    #[arg(long, value_parser = ["stage1"])]
    pub stop_after: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = match (&args.config, args.quick) {
        (Some(p), _) => DemoConfig::load(p)?,
        (None, true) => DemoConfig::quick(),
        (None, false) => DemoConfig::full(),
    };
    let summary = demo::run(&DemoOptions {
        config,
        out: args.out.clone(),
        data_dir: args.data,
        threads: args.threads,
        stop_after: args.stop_after,
    })?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    println!(
        "report: {}",
        args.out.join("report").join("index.html").display()
    );
    Ok(())
}
