//! `lavit reconstruct`: image → dynamic visual tokens → feature decoder → U-Net → VAE → PNG
//! (the official detokenizer, `LaVIT/models/image_detokenize.py` `reconstruct_from_token`),
//! through the pipeline's tokenizer and Decoder stages.

use std::path::PathBuf;

use anyhow::Result;
use lavit::pipeline::{GenerateBudget, GenerateParams, StageSet};

/// Arguments of `lavit reconstruct`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images to reconstruct.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output PNG (several images: `NAME-0.png`, …).
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    /// Denoising steps (official detokenizer: 50).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Decoder guidance (official detokenizer: 5.0).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Seed of the initial latents.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output width (default: the decoder's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Output height.
    #[arg(long)]
    pub height: Option<usize>,
    /// `highres`, `lowres` or `auto` (highres when the folder has `highres_pixel_decoding/`).
    #[arg(long, default_value = "auto")]
    pub pixel_decoding: String,
    /// Device of every stage: cpu, cuda or cuda:N (default: the config's placement, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// A serving config whose `[pipeline]` / `[plugins]` sections apply (the
    /// plugins named there are native code loaded into this process, trusted like any shared library).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let images = a
        .images
        .iter()
        .map(|p| super::read_image(p))
        .collect::<Result<Vec<_>>>()?;
    let pixel_decoding = a.pixel_decoding.clone();
    let (pipe, rt) = super::one_shot(
        &a.checkpoint,
        a.config.as_deref(),
        a.device.as_deref(),
        StageSet::Reconstruction,
        |c| c.pixel_decoding = pixel_decoding,
    )?;
    let info = pipe.info().clone();
    let (height, width) = (
        a.height.unwrap_or(info.default_size.1),
        a.width.unwrap_or(info.default_size.0),
    );
    // The one options builder (the same size rule and bounds as `lavit generate`).
    let opts = info
        .generate_options(
            &GenerateParams {
                seed: Some(
                    a.seed
                        .unwrap_or_else(lavit_decoder::pixel_decoder::random_seed),
                ),
                size: Some((width, height)),
                guidance: Some(a.guidance),
                steps: Some(a.steps as u64),
                ..GenerateParams::default()
            },
            &GenerateBudget::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut outs = Vec::new();
    let mut counts = Vec::new();
    for img in &images {
        let g = rt.block_on(pipe.reconstruct_with_ids(img, opts.clone()))?;
        counts.push(g.ids.first().map_or(0, Vec::len));
        outs.extend(g.images);
    }
    let paths = lavit::generate::save_rgb_pngs(&outs, &a.output)?;
    for ((p, src), n) in paths.iter().zip(&a.images).zip(&counts) {
        println!("{} → {} ({n} visual tokens)", src.display(), p.display());
    }
    Ok(())
}
