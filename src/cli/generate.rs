//! `lavit generate`: text → image tokens (LLM with classifier-free guidance) → feature
//! decoder → diffusion U-Net → VAE → PNG, as the official `LaVITforGeneration.generate_image`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lavit::generate::{text_to_image, DecodeOptions, PixelDecoder, Resolution, TextToImageOptions};
use lavit::tokenizer::{LoadParts, VisualTokenizer};
use lavit_llm::generate::{ImageTokenConfig, Sampling};
use lavit_llm::sentencepiece::SentencePiece;
use lavit_llm::vocab::UnifiedVocab;
use lavit_llm::LlamaForCausalLM;
use lavit_runtime::manifest::LavitManifest;
use tch::{Device, Kind};

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
    /// Denoising steps (default: 25 highres, 50 lowres, as the official code).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Decoder guidance scale (default: 7.0 highres, 5.0 lowres).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// LLM classifier-free guidance scale (paper eq. 7; official v2 default 4.0).
    #[arg(long, default_value_t = 4.0)]
    pub llm_guidance: f64,
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
    /// Top-k of the image-token sampling (official v2: 50).
    #[arg(long, default_value_t = 50)]
    pub top_k: i64,
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
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `auto` picks highres when the checkpoint folder has `highres_pixel_decoding/` (the official
/// release), else lowres (e.g. a folder written by `lavit demo`); other values are parsed.
pub fn resolve_resolution(arg: &str, checkpoint: &std::path::Path) -> Result<Resolution> {
    if arg == "auto" {
        return Ok(if checkpoint.join("highres_pixel_decoding").is_dir() {
            Resolution::Highres
        } else {
            Resolution::Lowres
        });
    }
    Ok(arg.parse()?)
}

pub fn run(a: Args) -> Result<()> {
    let device = parse_device(&a.device)?;
    let res = resolve_resolution(&a.pixel_decoding, &a.checkpoint)?;
    let manifest = LavitManifest::for_checkpoint(&a.checkpoint)?;
    let lm = a.checkpoint.join("language_model");
    let kind = if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let (_llm_vs, llm) = LlamaForCausalLM::from_pretrained(&lm, device, kind)?;
    let origin = a.checkpoint.join("manifest.json").display().to_string();
    manifest.check_context(&origin, llm.config.max_position_embeddings)?;
    let sp = SentencePiece::from_file(&lm.join("tokenizer.model"))?;
    let vocab = UnifiedVocab::from(&manifest.llm);
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
    let (height, width) = match &a.ratio {
        Some(r) => {
            let sizes = pixels.aspect_ratio_sizes();
            let (_, hw) = sizes.iter().find(|(n, _)| n == r).with_context(|| {
                format!(
                    "--ratio {r}: one of {:?}",
                    sizes.iter().map(|s| s.0).collect::<Vec<_>>()
                )
            })?;
            (Some(hw.0), Some(hw.1))
        }
        None => (a.height, a.width),
    };
    if a.num_images < 1 {
        bail!("--num-images must be at least 1");
    }
    let g = &manifest.generation;
    let opts = TextToImageOptions {
        tokens: ImageTokenConfig {
            cfg_scale: a.llm_guidance,
            max_new_tokens: a.max_tokens.unwrap_or(g.t2i_max_new_tokens),
            min_new_tokens: a.min_tokens.unwrap_or(g.t2i_min_new_tokens),
            sampling: Sampling {
                do_sample: true,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
            },
            num_return_sequences: a.num_images,
            seed: a.seed,
        },
        decode: DecodeOptions {
            steps: a.steps.unwrap_or(match res {
                Resolution::Highres => 25,
                Resolution::Lowres => 50,
            }),
            guidance: a.guidance.unwrap_or(match res {
                Resolution::Highres => 7.0,
                Resolution::Lowres => 5.0,
            }),
            height,
            width,
            seed: a.seed.map(|s| s as i64),
            ..Default::default()
        },
    };
    let out = text_to_image(
        &llm,
        &sp,
        &vocab,
        &tok,
        &pixels,
        std::slice::from_ref(&a.prompt),
        &opts,
    )?;
    let paths = lavit::generate::save_pngs(&out.images, &a.output)?;
    for (p, ids) in paths.iter().zip(&out.token_ids) {
        println!(
            "{} ({} image tokens)",
            p.display(),
            ids.iter().filter(|&&i| vocab.is_visual(i)).count()
        );
    }
    Ok(())
}

/// `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::cuda_if_available()),
        _ => match s.strip_prefix("cuda:") {
            Some(i) => Ok(Device::Cuda(
                i.parse().with_context(|| format!("device `{s}`"))?,
            )),
            None => bail!("device `{s}`: cpu, cuda or cuda:N"),
        },
    }
}
