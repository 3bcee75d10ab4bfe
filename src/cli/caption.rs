//! `lavit caption`: image (+ question) → text with the LaVIT LLM, through the pipeline.
//!
//! Each image goes through the Encoder and SelectorMerger stages' understanding path (EVA
//! ViT, token selector, the merger + `vit_proj` of `language_model/visual_weight.bin`) and
//! enters the Llm stage as continuous embeddings between [IMG] and [/IMG]; the question
//! follows. Embeddings computed elsewhere can be given with `--embeds` instead of images
//! (they go straight to the Llm stage).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lavit::pipeline::StageSet;
use lavit_runtime::checkpoint;
use lavit_runtime::messages::CaptionOptions;
use tch::{Kind, Tensor};

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
    /// Device of every stage: cpu, cuda or cuda:N (default: the config's placement, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Precision of the LLM: auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// A serving config whose `[pipeline]` / `[plugins]` sections apply (placement, plugins;
    /// plugins named there are native code loaded into this process, trusted like any shared library).
    #[arg(long)]
    pub config: Option<PathBuf>,
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
    if args.max_new_tokens < 1 || args.min_new_tokens < 0 || args.num_beams < 1 || args.top_k < 0 {
        bail!("--max-new-tokens and --num-beams must be at least 1, --min-new-tokens and --top-k at least 0");
    }
    let opts = CaptionOptions {
        max_new_tokens: args.max_new_tokens as usize,
        min_new_tokens: args.min_new_tokens as usize,
        temperature: if args.sample { args.temperature } else { 0.0 },
        top_k: args.top_k as usize,
        top_p: args.top_p,
        num_beams: args.num_beams as usize,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed.unwrap_or(0),
    };
    let prompt = args.prompt.clone().unwrap_or_default();
    let stages = if args.embeds.is_some() {
        StageSet::Language
    } else {
        StageSet::Understanding
    };
    let dtype = args.dtype.clone();
    let (pipe, rt) = super::one_shot(
        &args.checkpoint,
        args.config.as_deref(),
        args.device.as_deref(),
        stages,
        |c| c.dtype = dtype,
    )?;
    let answers: Vec<(String, String)> = match &args.embeds {
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
            let blocks =
                split(e, sd.get("counts")).with_context(|| format!("{}", path.display()))?;
            blocks
                .into_iter()
                .enumerate()
                .map(|(i, b)| {
                    let text = rt.block_on(pipe.caption_embeds(b, &prompt, opts.clone()))?;
                    Ok((i.to_string(), text))
                })
                .collect::<Result<_>>()?
        }
        None => args
            .images
            .iter()
            .map(|p| {
                let img = super::read_image(p)?;
                let text = rt.block_on(pipe.caption(&img, &prompt, opts.clone()))?;
                Ok((p.display().to_string(), text))
            })
            .collect::<Result<_>>()?,
    };
    for (name, text) in answers {
        println!("{}", serde_json::json!({ "image": name, "text": text }));
    }
    Ok(())
}
