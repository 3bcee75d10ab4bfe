//! `lavit generate`: text → image tokens (LLM with classifier-free guidance) → feature
//! decoder → diffusion U-Net → VAE → PNG, as the official `LaVITforGeneration.generate_image`,
//! through the pipeline's Llm and Decoder stages.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lavit::pipeline::StageSet;
use lavit::pipeline::{GenerateBudget, GenerateParams};

/// Arguments of `lavit generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The prompt.
    pub prompt: String,
    /// Output PNG (with several images: `NAME-0.png`, `NAME-1.png`, …).
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    /// Denoising steps (default: the checkpoint manifest's `generation.ddim_steps` for
    /// highres, `lowres_ddim_steps` for lowres; official 25 and 50).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Decoder guidance scale (default: the manifest's `decoder_guidance` /
    /// `lowres_decoder_guidance`; official 7.0 highres, 5.0 lowres).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// LLM classifier-free guidance scale (paper eq. 7; default: the manifest's
    /// `generation.llm_guidance`, official v2 4.0).
    #[arg(long)]
    pub llm_guidance: Option<f64>,
    /// Seed of the image tokens and the initial latents.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output width in pixels (default: the decoder's native size).
    #[arg(long)]
    pub width: Option<i64>,
    /// Output height in pixels.
    #[arg(long)]
    pub height: Option<i64>,
    /// Aspect ratio instead of width/height: 1:1, 4:3, 3:2, 16:9, 2:3, 3:4.
    #[arg(long, conflicts_with_all = ["width", "height"])]
    pub ratio: Option<String>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    pub num_images: i64,
    /// `highres` (SDXL-shaped decoder), `lowres` (the original SD-1.5-shaped one), or `auto`:
    /// highres when the folder has `highres_pixel_decoding/`, else lowres.
    #[arg(long, default_value = "auto")]
    pub pixel_decoding: String,
    /// Top-k of the image-token sampling (default: the manifest's `generation.top_k`;
    /// official v2: 50).
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Top-p of the image-token sampling.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Most image tokens (default: the checkpoint manifest's, official 300).
    #[arg(long)]
    pub max_tokens: Option<i64>,
    /// Fewest image tokens (default: the manifest's, official 20).
    #[arg(long)]
    pub min_tokens: Option<i64>,
    /// Device of every stage: cpu, cuda or cuda:N (default: the config's placement, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Precision of the LLM and the U-Net: auto (bf16 on CUDA, f32 on the CPU), f32, bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// A serving config whose `[pipeline]` / `[plugins]` sections apply (the
    /// plugins named there are native code loaded into this process, trusted like any shared library).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if a.num_images < 1 || a.num_images > super::MAX_IMAGES_PER_PROMPT as i64 {
        bail!(
            "--num-images must be in 1..={}",
            super::MAX_IMAGES_PER_PROMPT
        );
    }
    if a.top_k.is_some_and(|k| k < 0) {
        bail!("--top-k must be at least 0");
    }
    if a.max_tokens.is_some_and(|n| n < 1) || a.min_tokens.is_some_and(|n| n < 0) {
        bail!("--max-tokens must be at least 1 and --min-tokens at least 0");
    }
    let (pixel_decoding, dtype) = (a.pixel_decoding.clone(), a.dtype.clone());
    let (pipe, rt) = super::one_shot(
        &a.checkpoint,
        a.config.as_deref(),
        a.device.as_deref(),
        StageSet::Generation,
        |c| {
            c.pixel_decoding = pixel_decoding;
            c.dtype = dtype;
        },
    )?;
    let info = pipe.info().clone();
    let (height, width) = match &a.ratio {
        Some(r) => {
            let sizes = info.aspect_ratio_sizes();
            let (_, hw) = sizes.iter().find(|(n, _)| n == r).with_context(|| {
                format!(
                    "--ratio {r}: one of {:?}",
                    sizes.iter().map(|s| s.0).collect::<Vec<_>>()
                )
            })?;
            *hw
        }
        None => (
            a.height.unwrap_or(info.default_size.1 as i64),
            a.width.unwrap_or(info.default_size.0 as i64),
        ),
    };
    if height <= 0 || width <= 0 {
        bail!("image size {height}×{width}: height and width must be positive");
    }
    // The checkpoint's recommended settings (manifest `generation`), then the flags, through
    // the options builder the server and `lavit eval` use (the same checks and budget as a
    // `[server]` with its default limits).
    let params = GenerateParams {
        n: Some(a.num_images as u64),
        seed: Some(
            a.seed
                .unwrap_or_else(lavit_decoder::pixel_decoder::random_seed),
        ),
        size: Some((width as usize, height as usize)),
        guidance: a.guidance,
        llm_guidance: a.llm_guidance,
        steps: a.steps.map(|s| s as u64),
        top_k: a.top_k.map(|k| k.max(0) as usize),
        temperature: Some(a.temperature),
        top_p: Some(a.top_p),
        max_tokens: a.max_tokens.map(|n| n.max(0) as usize),
        min_tokens: a.min_tokens.map(|n| n.max(0) as usize),
    };
    let opts = info
        .generate_options(&params, &GenerateBudget::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = rt.block_on(pipe.generate_with_ids(&a.prompt, opts))?;
    let paths = lavit::generate::save_rgb_pngs(&out.images, &a.output)?;
    for (p, ids) in paths.iter().zip(&out.ids) {
        println!("{} ({} image tokens)", p.display(), ids.len());
    }
    Ok(())
}
