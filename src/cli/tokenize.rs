//! `lavit tokenize --checkpoint DIR IMAGE...`: one JSON line per image with the token count
//! and the visual ids (LLM vocabulary, i.e. with `visual_token_offset`). Deterministic
//! arg-max selection unless `--sample` (Gumbel-softmax with `--seed`).

use std::path::PathBuf;

use anyhow::Context;
use lavit::tokenizer::{LoadParts, TokenizerPlugins, VisualTokenizer};
use lavit_selector::SelectionMode;

/// Arguments of `lavit tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A config file whose `[plugins]` section names the plugin backbone / codebook (the
    /// serving or training config); without it, the built-in parts.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Sample keep/drop decisions with Gumbel-softmax (the official behaviour) instead of
    /// the deterministic arg-max.
    #[arg(long)]
    pub sample: bool,
    /// Seed of the Gumbel noise (with --sample).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Image files (PNG, JPEG, BMP, GIF).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    match s {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => Ok(tch::Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(tch::Device::Cuda)
            .ok_or_else(|| anyhow::anyhow!("unknown device `{s}` (use cpu or cuda:N)")),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let plugins = match &args.config {
        Some(path) => TokenizerPlugins::load(&lavit::tokenizer::plugins_section(path)?)?,
        None => TokenizerPlugins::none(),
    };
    let tok = VisualTokenizer::load(
        &args.checkpoint,
        device,
        LoadParts::tokenize_only(),
        &plugins,
    )
    .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let mode = if args.sample {
        SelectionMode::Gumbel {
            seed: args.seed,
            tau: 1.0,
        }
    } else {
        SelectionMode::Argmax
    };
    for (i, path) in args.images.iter().enumerate() {
        let img = tok
            .load_images(std::slice::from_ref(path))
            .with_context(|| format!("reading {}", path.display()))?;
        // Per image, the seed is offset by the image index so a batch is reproducible.
        let m = match mode {
            SelectionMode::Gumbel { seed, tau } => SelectionMode::Gumbel {
                seed: seed.wrapping_add(i as u64),
                tau,
            },
            m => m,
        };
        let out = tok.tokenize_with(&img, m)?;
        let line = serde_json::json!({
            "image": path.display().to_string(),
            "count": out.counts[0],
            "ids": out.ids[0],
        });
        println!("{line}");
    }
    Ok(())
}
