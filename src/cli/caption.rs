//! `lavit caption`: image (+ question) → text with the LaVIT LLM (owned by the llm work).
//!
//! Each image goes through the visual tokenizer's understanding path (EVA ViT, token
//! selector, the merger + `vit_proj` of `language_model/visual_weight.bin`) and enters the
//! LLM as continuous embeddings between [IMG] and [/IMG]; the question follows. Embeddings
//! computed elsewhere can be given with `--embeds` instead of images.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lavit::tokenizer::{LoadParts, VisualTokenizer};
use lavit_llm::generate::{Sampling, TextConfig};
use lavit_llm::LavitLlm;
use lavit_runtime::checkpoint;
use tch::{Device, Kind, Tensor};

/// Arguments of `lavit caption`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout: language_model/, visual_tokenizer/, …).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image files (PNG, JPEG, …), one answer line each.
    #[arg(required_unless_present = "embeds", conflicts_with = "embeds")]
    pub images: Vec<PathBuf>,
    /// Continuous image embeddings instead of images: a safetensors file with `embeds`
    /// (T, hidden) and optionally `counts` (B,) splitting the rows into B images.
    #[arg(long)]
    pub embeds: Option<PathBuf>,
    /// A question (VQA); without it the model captions.
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: i64,
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: i64,
    /// Beam search with this many beams (1 = greedy or sampling).
    #[arg(long, default_value_t = 1)]
    pub num_beams: i64,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    pub sample: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn parse_device(s: &str) -> Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("--device `{s}`: expected cpu, cuda or cuda:N"),
        },
    })
}

pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        _ => bail!("--dtype `{s}`: expected f32, bf16 or f16"),
    })
}

/// Split `embeds` (T, H) by `counts` into per-image blocks.
fn split(embeds: &Tensor, counts: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let Some(c) = counts else {
        return Ok(vec![embeds.shallow_clone()]);
    };
    let c: Vec<i64> = Vec::try_from(&c.to_kind(Kind::Int64).view([-1]))?;
    if c.iter().any(|&n| n <= 0) || c.iter().sum::<i64>() != embeds.size()[0] {
        bail!(
            "counts {c:?} do not split the {} embedding rows",
            embeds.size()[0]
        );
    }
    let mut start = 0;
    Ok(c.iter()
        .map(|&n| {
            let t = embeds.narrow(0, start, n);
            start += n;
            t
        })
        .collect())
}

pub fn run(args: Args) -> Result<()> {
    let device = parse_device(&args.device)?;
    let kind = parse_dtype(&args.dtype)?;
    let cfg = TextConfig {
        max_new_tokens: args.max_new_tokens,
        min_new_tokens: args.min_new_tokens,
        sampling: Sampling {
            do_sample: args.sample,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        num_beams: args.num_beams,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..Default::default()
    };
    let images = match &args.embeds {
        Some(path) => {
            let sd = checkpoint::load_path(path)?;
            let e = sd
                .get("embeds")
                .with_context(|| format!("{}: no `embeds` tensor", path.display()))?;
            if e.dim() != 2 {
                bail!(
                    "{}: `embeds` must be (T, hidden), got {:?}",
                    path.display(),
                    e.size()
                );
            }
            split(e, sd.get("counts")).with_context(|| format!("{}", path.display()))?
        }
        None => {
            let parts = LoadParts {
                understanding: true,
                lowres_decoder: false,
                highres_decoder: false,
            };
            let vt = VisualTokenizer::from_checkpoint(&args.checkpoint, device, parts)?;
            let pixels = vt.load_images(&args.images)?;
            let (kept, counts) = vt.encode_features(&pixels, vt.selection)?;
            split(&kept, Some(&Tensor::from_slice(&counts)))?
        }
    };
    let llm = LavitLlm::load(&args.checkpoint, device, kind)?;
    let hidden = llm.model.config.hidden_size;
    if let Some(bad) = images.iter().find(|e| e.size()[1] != hidden) {
        bail!(
            "image embeddings are {} wide, the LLM is {hidden}",
            bad.size()[1]
        );
    }
    let names: Vec<String> = if args.images.is_empty() {
        (0..images.len()).map(|i| i.to_string()).collect()
    } else {
        args.images
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    };
    for (name, text) in names
        .iter()
        .zip(llm.caption(&images, args.prompt.as_deref(), &cfg)?)
    {
        println!("{}", serde_json::json!({ "image": name, "text": text }));
    }
    Ok(())
}
