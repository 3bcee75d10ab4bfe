//! `lavit reconstruct`: image → dynamic visual tokens → feature decoder → U-Net → VAE → PNG
//! (the official detokenizer, `LaVIT/models/image_detokenize.py` `reconstruct_from_token`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use lavit::generate::{DecodeOptions, PixelDecoder, Resolution};
use lavit::tokenizer::{LoadParts, VisualTokenizer};
use tch::Kind;

use super::generate::parse_device;

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
    pub seed: Option<i64>,
    /// Output width (default: the decoder's native size).
    #[arg(long)]
    pub width: Option<i64>,
    /// Output height.
    #[arg(long)]
    pub height: Option<i64>,
    /// `highres`, `lowres` or `auto` (highres when the folder has `highres_pixel_decoding/`).
    #[arg(long, default_value = "auto")]
    pub pixel_decoding: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: Args) -> Result<()> {
    let device = parse_device(&a.device)?;
    let res = super::generate::resolve_resolution(&a.pixel_decoding, &a.checkpoint)?;
    let parts = LoadParts {
        understanding: false,
        lowres_decoder: res == Resolution::Lowres,
        highres_decoder: res == Resolution::Highres,
    };
    let tok = VisualTokenizer::from_checkpoint(&a.checkpoint, device, parts)?;
    let mut pixels = PixelDecoder::load(&a.checkpoint, res, device)?;
    if device.is_cuda() {
        pixels.set_unet_kind(Kind::BFloat16);
    }
    let images = tok.load_images(&a.images)?;
    let tokens = tok.tokenize(&images)?;
    if tokens.ids.iter().any(|v| v.is_empty()) {
        bail!("an image gave no visual tokens");
    }
    let opts = DecodeOptions {
        steps: a.steps,
        guidance: a.guidance,
        height: a.height,
        width: a.width,
        seed: a.seed,
        ..Default::default()
    };
    let out = pixels.decode_ids(&tok, &tokens.ids, &opts)?;
    let paths = lavit::generate::save_pngs(&out, &a.output)?;
    for ((p, src), n) in paths.iter().zip(&a.images).zip(&tokens.counts) {
        println!("{} → {} ({n} visual tokens)", src.display(), p.display());
    }
    Ok(())
}
