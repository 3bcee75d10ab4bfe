//! `lavit parity DIR`: recompute every reference tensor of a LaVIT checkpoint folder with the
//! normal loading code and compare it with `DIR/reference/expected.safetensors`.

use std::path::PathBuf;

use anyhow::Result;

/// Arguments of `lavit parity`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A LaVIT checkpoint folder with `reference/expected.safetensors`.
    pub dir: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let report = lavit::parity::run(&args.dir)?;
    for row in &report.rows {
        println!(
            "{:<32} max_abs_err {:>12.3e}  {}{}",
            row.name,
            row.max_abs_err,
            if row.pass { "pass" } else { "FAIL" },
            if row.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", row.note)
            }
        );
    }
    for name in &report.not_computed {
        println!("{name:<32} not computed (no stage computes it yet)  FAIL");
    }
    let failed = report.rows.iter().filter(|r| !r.pass).count() + report.not_computed.len();
    println!(
        "{} passed, {} failed",
        report.rows.len() - report.rows.iter().filter(|r| !r.pass).count(),
        failed
    );
    if failed > 0 {
        anyhow::bail!("{failed} reference tensors did not match");
    }
    Ok(())
}
