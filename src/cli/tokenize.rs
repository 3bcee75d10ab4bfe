//! `lavit tokenize --checkpoint DIR IMAGE...`: one JSON line per image with the token count
//! and the visual ids (LLM vocabulary, i.e. with `visual_token_offset`), through the
//! pipeline's tokenizer stages. Deterministic arg-max selection unless `--sample`
//! (Gumbel-softmax from `--seed`, drawn once for the whole batch of images).

use std::path::PathBuf;

use lavit::pipeline::StageSet;

/// Arguments of `lavit tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A config file whose `[plugins]` / `[pipeline]` sections name the plugin backbone /
    /// codebook and placement (the serving config); without it, the built-in parts. The
    /// plugins named there are native code loaded into this process, trusted like any shared library.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Sample keep/drop decisions with Gumbel-softmax (the official behaviour) instead of
    /// the deterministic arg-max.
    #[arg(long)]
    pub sample: bool,
    /// Seed of the Gumbel noise (with --sample).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device of every stage: cpu, cuda, cuda:N (default: the config's placement, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Image files (PNG, JPEG, BMP, GIF).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let images = args
        .images
        .iter()
        .map(|p| super::read_image(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (pipe, rt) = super::one_shot(
        &args.checkpoint,
        args.config.as_deref(),
        args.device.as_deref(),
        StageSet::Tokenizer,
        |c| {
            c.selection = if args.sample { "gumbel" } else { "argmax" }.into();
            c.selection_seed = args.seed;
        },
    )?;
    let ids = rt.block_on(pipe.tokenize(&images))?;
    for (path, ids) in args.images.iter().zip(ids) {
        let line = serde_json::json!({
            "image": path.display().to_string(),
            "count": ids.len(),
            "ids": ids,
        });
        println!("{line}");
    }
    Ok(())
}
