//! `lavit eval`: captioning (BLEU-4, CIDEr-D), VQA accuracy and text→image FID of a checkpoint
//! folder, through the library pipeline (see `lavit::eval`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lavit::eval::{self, Embedding, EvalOptions};
use lavit::pipeline::messages::CaptionOptions;
use lavit::pipeline::{GenerateBudget, GenerateParams, Pipeline, PipelineConfig};
use lavit_runtime::manifest::LavitManifest;

/// Arguments of `lavit eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A folder holding any of `captions.jsonl`, `vqa.jsonl`, `prompts.jsonl`, `images/` (the
    /// real images for FID) and `judge.safetensors` — what `lavit demo` writes to
    /// `OUT/eval-data`. The flags below override its files.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Captioning references, JSON lines `{"image": PATH, "captions": [..]}`.
    #[arg(long)]
    pub captions: Option<PathBuf>,
    /// Questions, JSON lines `{"image": PATH, "question": .., "answers": [..]}`.
    #[arg(long)]
    pub vqa: Option<PathBuf>,
    /// Text→image prompts, JSON lines `{"prompt": .., "label": N}` (label optional).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Folder of real images FID compares the generated ones with.
    #[arg(long)]
    pub real_images: Option<PathBuf>,
    /// FID embedding: `judge` (a demo judge `judge.safetensors` from the data folder or the
    /// checkpoint folder), `judge:FILE`, `pixels` or `pixels:SIDE` (grayscale pixels).
    #[arg(long, default_value = "judge")]
    pub embedding: String,
    /// Which evaluations to run: any of captions, vqa, t2i (comma-separated) or all.
    #[arg(long, default_value = "all")]
    pub tasks: String,
    /// Output folder: eval.json, index.html, predictions.jsonl, generated.png.
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// At most this many entries of each file.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Text given after each image when captioning (LaVIT captions with none).
    #[arg(long, default_value = "")]
    pub caption_prompt: String,
    /// VQA prompt; `{}` is replaced by the question.
    #[arg(long, default_value = "{}")]
    pub vqa_template: String,
    /// Most text tokens per caption / answer (default: the manifest's).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Images generated per prompt (1 to 64, as `lavit generate --num-images`).
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: usize,
    /// LLM classifier-free guidance of the image tokens (default: the checkpoint's
    /// `generation.llm_guidance`, as `lavit generate` and the server use).
    #[arg(long)]
    pub llm_guidance: Option<f64>,
    /// Top-k / temperature of the image-token sampling (top-k default: the checkpoint's).
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Diffusion steps and decoder guidance (default: the manifest's).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Seed of the first prompt (prompt i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep/drop decisions of the tokenizer: `manifest` (the checkpoint's
    /// `tokenizer.selection`), `argmax` or `gumbel`. Default: the config's
    /// `pipeline.selection`, else `manifest`.
    #[arg(long, value_parser = ["manifest", "argmax", "gumbel"])]
    pub selection: Option<String>,
    /// Seed of the Gumbel selection noise. Default: the config's `pipeline.selection_seed`,
    /// else the manifest's `tokenizer.selection_seed`.
    #[arg(long)]
    pub selection_seed: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// A pipeline config (configs/serve.toml's `[pipeline]`: placement of the stages on
    /// devices; its `[plugins]`: the plugins named there are native code loaded into this process, trusted like any shared library); its checkpoint is replaced by
    /// --checkpoint.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `dir/name` when it exists.
fn in_data(data: Option<&Path>, name: &str) -> Option<PathBuf> {
    data.map(|d| d.join(name)).filter(|p| p.exists())
}

pub fn run(a: Args) -> Result<()> {
    // Checked before anything is loaded: each image is a diffusion run held in memory.
    let most = super::MAX_IMAGES_PER_PROMPT;
    if !(1..=most).contains(&a.images_per_prompt) {
        bail!(
            "--images-per-prompt = {}: must be in 1..={most}",
            a.images_per_prompt
        );
    }
    if let Some(d) = &a.data {
        if !d.is_dir() {
            bail!("--data {}: not a folder", d.display());
        }
    }
    let tasks: Vec<&str> = a.tasks.split(',').map(str::trim).collect();
    for t in &tasks {
        if !["all", "captions", "vqa", "t2i"].contains(t) {
            bail!("--tasks: unknown task `{t}` (captions, vqa, t2i or all)");
        }
    }
    let wants = |t: &str| tasks.contains(&"all") || tasks.contains(&t);
    let data = a.data.as_deref();
    let pick = |flag: &Option<PathBuf>, name: &str, task: &str| {
        if wants(task) {
            flag.clone().or_else(|| in_data(data, name))
        } else {
            None
        }
    };
    let captions = pick(&a.captions, "captions.jsonl", "captions");
    let vqa = pick(&a.vqa, "vqa.jsonl", "vqa");
    let prompts = pick(&a.prompts, "prompts.jsonl", "t2i");
    let real_images = a.real_images.clone().or_else(|| in_data(data, "images"));
    let embedding = match &prompts {
        Some(p) => {
            let mut search: Vec<&Path> = Vec::new();
            if let Some(d) = data {
                search.push(d);
            }
            if let Some(parent) = p.parent() {
                search.push(parent);
            }
            search.push(&a.checkpoint);
            Some(Embedding::parse(&a.embedding, &search)?)
        }
        None => None,
    };
    let manifest = LavitManifest::for_checkpoint(&a.checkpoint)?;
    let g = &manifest.generation;
    let mut cfg = match &a.config {
        Some(p) => PipelineConfig::from_file(p)?,
        None => PipelineConfig::default(),
    };
    cfg.checkpoint = Some(a.checkpoint.clone());
    if let Some(s) = &a.selection {
        cfg.selection = s.clone();
    }
    if let Some(seed) = a.selection_seed {
        cfg.selection_seed = Some(seed);
    }
    let pipe = Pipeline::build(&cfg)
        .with_context(|| format!("building the pipeline on {}", a.checkpoint.display()))?;
    // The checkpoint's recommended settings (manifest `generation`), then the flags, through
    // the options builder `lavit generate` and the server use.
    let generate = pipe
        .info()
        .generate_options(
            &GenerateParams {
                n: Some(a.images_per_prompt as u64),
                seed: Some(a.seed),
                llm_guidance: a.llm_guidance,
                guidance: a.guidance,
                steps: a.steps.map(|s| s as u64),
                top_k: a.top_k,
                temperature: Some(a.temperature),
                ..GenerateParams::default()
            },
            &GenerateBudget::default(),
        )
        .context("generation options")?;
    let opts = EvalOptions {
        checkpoint: a.checkpoint.clone(),
        captions,
        vqa,
        prompts,
        real_images,
        embedding,
        out: a.out.clone(),
        limit: a.limit,
        caption_prompt: a.caption_prompt,
        vqa_template: a.vqa_template,
        caption: CaptionOptions {
            max_new_tokens: a
                .max_new_tokens
                .unwrap_or(g.caption_max_new_tokens.max(1) as usize),
            ..CaptionOptions::default()
        },
        generate,
        concurrency: a.concurrency,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(eval::evaluate(&pipe, &opts))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("report: {}", a.out.join("index.html").display());
    Ok(())
}
