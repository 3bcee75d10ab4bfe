//! `lavit eval`: the evaluations the LaVIT paper reports, on any checkpoint folder, through the
//! library's [`Pipeline`] (the same stage actors `lavit serve` runs):
//!
//! - captioning: BLEU-4 and CIDEr-D against a reference file ([`caption_metrics`], as the COCO
//!   caption evaluation computes them);
//! - visual question answering: VQA accuracy ([`vqa`], the official metric);
//! - text → image: FID between generated and real images over an embedding the user chooses
//!   ([`fid`]; by default the demo judge's CNN features), and, when the prompts carry class
//!   labels and the embedding is a judge, how many generated images the judge labels right.
//!
//! Inputs (JSON lines; image paths relative to the file's folder):
//! - captions: `{"image": "a.png", "captions": ["a dog runs", …]}`
//! - VQA: `{"image": "a.png", "question": "what runs?", "answers": ["dog", …]}`
//! - text → image: `{"prompt": "a dog", "label": 3}` (label optional) and a folder of real
//!   images.
//!
//! Outputs in the chosen folder: `eval.json` (every number and the settings), `index.html`,
//! `predictions.jsonl` (each caption / answer) and `generated.png` (the first generated images).

pub mod caption_metrics;
pub mod fid;
pub mod vqa;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::demo::judge::Judge;
use crate::demo::report;
use crate::pipeline::messages::{CaptionOptions, GenerateOptions};
use crate::pipeline::Pipeline;
use lavit_runtime::fsread;
use lavit_runtime::image_input::{self, ImageLimits};

/// One reference-captioned image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionItem {
    pub image: PathBuf,
    pub captions: Vec<String>,
}

/// One visual question with its human answers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqaItem {
    pub image: PathBuf,
    pub question: String,
    pub answers: Vec<String>,
}

/// One text → image prompt, optionally with the class the image should show.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptItem {
    pub prompt: String,
    #[serde(default)]
    pub label: Option<i64>,
}

/// Reads a JSON-lines file of `T`; image paths are made relative to its folder. Blank lines
/// are skipped; a bad line is an error naming the file, the line and serde's reason (quoting
/// at most 80 characters of it). The file goes through the capped reader: a regular file of
/// at most [`fsread::MAX_JSONL_BYTES`], each line at most [`fsread::MAX_JSONL_LINE_BYTES`]
/// (a longer one is refused by number without being read whole).
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let lines =
        fsread::read_lines_capped(path, fsread::MAX_JSONL_BYTES, fsread::MAX_JSONL_LINE_BYTES)?;
    let mut out = Vec::with_capacity(lines.len());
    for (number, line) in lines {
        let item = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {number}: {}",
                path.display(),
                fsread::excerpt(&line, 80)
            )
        })?;
        out.push(item);
    }
    ensure!(!out.is_empty(), "{}: no entries", path.display());
    Ok(out)
}

/// Loads an image named by a data file (relative paths against `base`) through the one
/// limited decoder (the capped regular-file reader, then the size caps before decoding).
pub fn load_image(base: &Path, rel: &Path, what: &str) -> Result<DynamicImage> {
    let p = if rel.is_absolute() {
        rel.to_path_buf()
    } else {
        base.join(rel)
    };
    image_input::read(&p, &ImageLimits::default()).with_context(|| format!("{what}: image"))
}

/// The embedding FID is computed over.
#[derive(Debug, Clone, PartialEq)]
pub enum Embedding {
    /// The hidden layer of a demo judge CNN (`judge.safetensors`, written by `lavit demo`):
    /// images become 28 × 28 grayscale.
    Judge(PathBuf),
    /// Raw pixels: images become `side × side` grayscale, flattened (a model-free check).
    Pixels { side: u32 },
}

impl Embedding {
    /// `judge` (the `judge.safetensors` beside the prompts file, else in the checkpoint
    /// folder), `judge:FILE`, `pixels` (16 × 16) or `pixels:SIDE`.
    pub fn parse(spec: &str, search: &[&Path]) -> Result<Self> {
        let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
        match kind {
            "judge" if arg.is_empty() => search
                .iter()
                .map(|d| d.join("judge.safetensors"))
                .find(|p| p.is_file())
                .map(Embedding::Judge)
                .with_context(|| {
                    format!(
                        "--embedding judge: no judge.safetensors in {}; name one with judge:FILE, or use pixels",
                        search
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(" or ")
                    )
                }),
            "judge" => Ok(Embedding::Judge(PathBuf::from(arg))),
            "pixels" if arg.is_empty() => Ok(Embedding::Pixels { side: 16 }),
            "pixels" => match arg.parse::<u32>() {
                Ok(s) if (2..=256).contains(&s) => Ok(Embedding::Pixels { side: s }),
                _ => bail!("--embedding pixels:{arg}: the side must be an integer in 2..=256"),
            },
            _ => bail!("--embedding `{spec}`: expected judge, judge:FILE, pixels or pixels:SIDE"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Embedding::Judge(p) => format!("judge CNN features ({})", p.display()),
            Embedding::Pixels { side } => format!("grayscale pixels {side}×{side}"),
        }
    }
}

/// A loaded embedding.
enum Embedder {
    Judge(Judge),
    Pixels(u32),
}

impl Embedder {
    fn load(e: &Embedding) -> Result<Self> {
        Ok(match e {
            Embedding::Judge(p) => Embedder::Judge(Judge::load_file(p)?),
            Embedding::Pixels { side } => Embedder::Pixels(*side),
        })
    }

    fn side(&self) -> u32 {
        match self {
            Embedder::Judge(_) => crate::demo::data::SIDE as u32,
            Embedder::Pixels(s) => *s,
        }
    }

    /// Images → (B, 1, S, S) grayscale in [0, 1].
    fn to_gray(&self, images: &[DynamicImage]) -> Tensor {
        let s = self.side();
        let v: Vec<f32> = images
            .iter()
            .flat_map(|im| {
                im.resize_exact(s, s, image::imageops::FilterType::Triangle)
                    .to_luma8()
                    .into_raw()
            })
            .map(|p| p as f32 / 255.0)
            .collect();
        Tensor::from_slice(&v).view([images.len() as i64, 1, s as i64, s as i64])
    }

    /// Images → embeddings [B, D].
    fn embed(&self, images: &[DynamicImage]) -> Tensor {
        let x = self.to_gray(images);
        match self {
            Embedder::Judge(j) => j.features(&x),
            Embedder::Pixels(_) => x.flatten(1, -1),
        }
    }

    /// Judge labels of images (a judge embedding only).
    fn labels(&self, images: &[DynamicImage]) -> Result<Option<Vec<usize>>> {
        match self {
            Embedder::Judge(j) => j.predict(&self.to_gray(images)).map(Some),
            Embedder::Pixels(_) => Ok(None),
        }
    }
}

/// What `lavit eval` runs.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Checkpoint folder (what the pipeline loads; also recorded).
    pub checkpoint: PathBuf,
    pub captions: Option<PathBuf>,
    pub vqa: Option<PathBuf>,
    pub prompts: Option<PathBuf>,
    /// Real images for FID (every PNG / JPEG in the folder).
    pub real_images: Option<PathBuf>,
    pub embedding: Option<Embedding>,
    /// Output folder.
    pub out: PathBuf,
    /// Evaluate at most this many entries of each file.
    pub limit: Option<usize>,
    /// Text prompt given with each image when captioning ("" = none, the LaVIT default).
    pub caption_prompt: String,
    /// VQA prompt; `{}` is replaced by the question.
    pub vqa_template: String,
    pub caption: CaptionOptions,
    pub generate: GenerateOptions,
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// Captioning scores.
#[derive(Debug, Clone, Serialize)]
pub struct CaptionScores {
    pub images: usize,
    /// BLEU-1..4 (corpus, COCO "closest" reference length).
    pub bleu: Vec<f64>,
    pub bleu4: f64,
    pub cider_d: f64,
}

/// VQA scores.
#[derive(Debug, Clone, Serialize)]
pub struct VqaScores {
    pub questions: usize,
    pub accuracy: f64,
}

/// Text → image scores.
#[derive(Debug, Clone, Serialize)]
pub struct T2iScores {
    pub prompts: usize,
    pub generated: usize,
    pub real: usize,
    pub embedding: String,
    pub fid: f64,
    /// Generated images the judge labels as the prompt's label (prompts with labels and a
    /// judge embedding only).
    pub label_accuracy: Option<f64>,
}

/// Everything `lavit eval` measured (`eval.json`).
#[derive(Debug, Clone, Serialize, Default)]
pub struct EvalReport {
    pub checkpoint: PathBuf,
    pub captions: Option<CaptionScores>,
    pub vqa: Option<VqaScores>,
    pub text_to_image: Option<T2iScores>,
    pub seconds: f64,
    /// The settings the numbers were made with.
    pub settings: serde_json::Value,
}

/// One line of `predictions.jsonl`.
#[derive(Serialize)]
struct Prediction<'a> {
    task: &'a str,
    image: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    question: Option<&'a str>,
    output: &'a str,
    /// The tokenised output and references (captions) or the accuracy (VQA).
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<f64>,
}

fn bar(what: &str, total: usize) -> indicatif::ProgressBar {
    let b = lavit_runtime::train::new_bar(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_prefix(what.to_string());
    b
}

fn limited<T>(mut v: Vec<T>, limit: Option<usize>) -> Vec<T> {
    if let Some(n) = limit {
        v.truncate(n);
    }
    v
}

/// Captions (or answers) for `(image, prompt)` pairs, `concurrency` requests at a time, in
/// order.
async fn run_captions(
    pipe: &Pipeline,
    work: Vec<(DynamicImage, String)>,
    opts: &CaptionOptions,
    concurrency: usize,
    what: &str,
) -> Result<Vec<String>> {
    let b = bar(what, work.len());
    let out: Vec<Result<String>> = futures::stream::iter(work.into_iter().enumerate())
        .map(|(i, (img, prompt))| {
            let b = &b;
            async move {
                let r = pipe
                    .caption(&img, &prompt, opts.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("{what} {i}: {e}"));
                b.inc(1);
                r
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    b.finish_and_clear();
    out.into_iter().collect()
}

/// Runs every evaluation `opts` names on a built pipeline and writes the result files.
pub async fn evaluate(pipe: &Pipeline, opts: &EvalOptions) -> Result<EvalReport> {
    ensure!(
        opts.captions.is_some() || opts.vqa.is_some() || opts.prompts.is_some(),
        "nothing to evaluate: give a captions, VQA or prompts file (or a --data folder holding captions.jsonl, vqa.jsonl or prompts.jsonl)"
    );
    let start = Instant::now();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut report = EvalReport {
        checkpoint: opts.checkpoint.clone(),
        settings: serde_json::json!({
            "caption_prompt": opts.caption_prompt,
            "vqa_template": opts.vqa_template,
            "caption": format!("{:?}", opts.caption),
            "generate": format!("{:?}", opts.generate),
            "limit": opts.limit,
            "selection": pipe.info().selection,
        }),
        ..Default::default()
    };
    let mut predictions = String::new();
    let mut html = report::Html::default();
    html.p(&format!("Checkpoint: {}", opts.checkpoint.display()));

    if let Some(path) = &opts.captions {
        let items: Vec<CaptionItem> = limited(read_jsonl(path)?, opts.limit);
        let base = path.parent().unwrap_or(Path::new("."));
        let mut work = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let what = format!("{} line {}", path.display(), i + 1);
            ensure!(!it.captions.is_empty(), "{what}: `captions` is empty");
            work.push((
                load_image(base, &it.image, &what)?,
                opts.caption_prompt.clone(),
            ));
        }
        let outs = run_captions(pipe, work, &opts.caption, opts.concurrency, "captions").await?;
        let scored: Vec<(String, Vec<String>)> = items
            .iter()
            .zip(&outs)
            .map(|(it, o)| {
                let refs = it
                    .captions
                    .iter()
                    .map(|c| caption_metrics::ptb_tokenize(c))
                    .collect();
                (caption_metrics::ptb_tokenize(o), refs)
            })
            .collect();
        let bleu = caption_metrics::corpus_bleu(&scored, 4);
        let (cider, _) = caption_metrics::cider_d(&scored);
        let mut rows = vec![vec![
            "image".to_string(),
            "caption".into(),
            "references".into(),
        ]];
        for ((it, o), (tok, _)) in items.iter().zip(&outs).zip(&scored) {
            predictions.push_str(&serde_json::to_string(&Prediction {
                task: "caption",
                image: it.image.display().to_string(),
                question: None,
                output: o,
                tokens: Some(tok),
                accuracy: None,
            })?);
            predictions.push('\n');
            if rows.len() <= 20 {
                rows.push(vec![
                    it.image.display().to_string(),
                    o.clone(),
                    it.captions.join(" | "),
                ]);
            }
        }
        let s = CaptionScores {
            images: items.len(),
            bleu4: bleu.bleu[3],
            bleu: bleu.bleu,
            cider_d: cider,
        };
        tracing::info!(
            "captions: {} images, BLEU-4 {:.4}, CIDEr-D {:.4}",
            s.images,
            s.bleu4,
            s.cider_d
        );
        html.h2("Captioning");
        html.table(&[
            vec![
                "images".into(),
                "BLEU-1".into(),
                "BLEU-4".into(),
                "CIDEr-D".into(),
            ],
            vec![
                s.images.to_string(),
                format!("{:.4}", s.bleu[0]),
                format!("{:.4}", s.bleu4),
                format!("{:.4}", s.cider_d),
            ],
        ]);
        html.table(&rows);
        report.captions = Some(s);
    }

    if let Some(path) = &opts.vqa {
        let items: Vec<VqaItem> = limited(read_jsonl(path)?, opts.limit);
        let base = path.parent().unwrap_or(Path::new("."));
        let mut work = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            let what = format!("{} line {}", path.display(), i + 1);
            ensure!(!it.answers.is_empty(), "{what}: `answers` is empty");
            let prompt = opts.vqa_template.replace("{}", &it.question);
            work.push((load_image(base, &it.image, &what)?, prompt));
        }
        let outs = run_captions(pipe, work, &opts.caption, opts.concurrency, "vqa").await?;
        let mut total = 0.0;
        let mut rows = vec![vec![
            "image".to_string(),
            "question".into(),
            "answer".into(),
            "humans".into(),
            "accuracy".into(),
        ]];
        for (it, o) in items.iter().zip(&outs) {
            let acc = vqa::vqa_accuracy(o, &it.answers);
            total += acc;
            predictions.push_str(&serde_json::to_string(&Prediction {
                task: "vqa",
                image: it.image.display().to_string(),
                question: Some(&it.question),
                output: o,
                tokens: None,
                accuracy: Some(acc),
            })?);
            predictions.push('\n');
            if rows.len() <= 20 {
                rows.push(vec![
                    it.image.display().to_string(),
                    it.question.clone(),
                    o.clone(),
                    it.answers.join(" | "),
                    format!("{acc:.2}"),
                ]);
            }
        }
        let s = VqaScores {
            questions: items.len(),
            accuracy: total / items.len() as f64,
        };
        tracing::info!(
            "VQA: {} questions, accuracy {:.2} %",
            s.questions,
            s.accuracy * 100.0
        );
        html.h2("Visual question answering");
        html.p(&format!(
            "{} questions, VQA accuracy {:.2} %",
            s.questions,
            s.accuracy * 100.0
        ));
        html.table(&rows);
        report.vqa = Some(s);
    }

    if let Some(path) = &opts.prompts {
        let s = text_to_image(pipe, opts, path, &mut html).await?;
        report.text_to_image = Some(s);
    }

    report.seconds = start.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&report)?;
    lavit_runtime::checkpoint::atomic_write(&opts.out.join("eval.json"), json.as_bytes())?;
    lavit_runtime::checkpoint::atomic_write(
        &opts.out.join("predictions.jsonl"),
        predictions.as_bytes(),
    )?;
    html.h2("Settings");
    html.raw(&format!(
        "<pre>{}</pre>",
        report::esc(&serde_json::to_string_pretty(&report.settings)?)
    ));
    html.write(&opts.out.join("index.html"), "lavit eval")?;
    Ok(report)
}

/// Every PNG / JPEG / BMP file of a folder (not its subfolders), sorted by name; a FIFO or
/// a device with such a name is refused by name ([`fsread::walk_files`]).
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fsread::walk_files(dir, 0, |p| {
        fsread::has_extension(p, &["png", "jpg", "jpeg", "bmp"])
    })
    .with_context(|| format!("real images folder {}", dir.display()))
}

async fn text_to_image(
    pipe: &Pipeline,
    opts: &EvalOptions,
    path: &Path,
    html: &mut report::Html,
) -> Result<T2iScores> {
    let items: Vec<PromptItem> = limited(read_jsonl(path)?, opts.limit);
    let real_dir = opts
        .real_images
        .as_deref()
        .context("text → image needs a folder of real images (--real-images)")?;
    let embedding = opts
        .embedding
        .clone()
        .context("text → image needs an embedding (--embedding)")?;
    let embedder = Embedder::load(&embedding)?;
    let real_files = image_files(real_dir)?;
    ensure!(
        real_files.len() >= 2,
        "{}: FID needs at least 2 real images, found {}",
        real_dir.display(),
        real_files.len()
    );
    let mut real = Vec::with_capacity(real_files.len());
    for chunk in real_files.chunks(256) {
        let imgs = chunk
            .iter()
            .map(|p| load_image(Path::new(""), p, &real_dir.display().to_string()))
            .collect::<Result<Vec<_>>>()?;
        real.push(embedder.embed(&imgs));
    }
    let real = Tensor::cat(&real, 0);

    let n = opts.generate.n.max(1);
    let b = bar("text→image", items.len());
    let results: Vec<Result<Vec<image::RgbImage>>> =
        futures::stream::iter(items.iter().enumerate())
            .map(|(i, it)| {
                let mut g = opts.generate.clone();
                g.n = n;
                g.seed = opts.generate.seed.wrapping_add(i as u64);
                let b = &b;
                async move {
                    let r = pipe
                        .generate(&it.prompt, g)
                        .await
                        .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1));
                    b.inc(1);
                    r
                }
            })
            .buffered(opts.concurrency.max(1))
            .collect()
            .await;
    b.finish_and_clear();
    let mut generated: Vec<DynamicImage> = Vec::new();
    let mut labels: Vec<Option<i64>> = Vec::new();
    for (it, r) in items.iter().zip(results) {
        for img in r? {
            generated.push(DynamicImage::ImageRgb8(img));
            labels.push(it.label);
        }
    }
    ensure!(
        generated.len() >= 2,
        "FID needs at least 2 generated images, got {}",
        generated.len()
    );
    let fake = Tensor::cat(
        &generated
            .chunks(256)
            .map(|c| embedder.embed(c))
            .collect::<Vec<_>>(),
        0,
    );
    let fid = fid::fid(&fake, &real)?;
    let label_accuracy = match (
        labels.iter().all(Option::is_some),
        embedder.labels(&generated)?,
    ) {
        (true, Some(pred)) => {
            let ok = pred
                .iter()
                .zip(&labels)
                .filter(|(p, l)| Some(**p as i64) == **l)
                .count();
            Some(ok as f64 / pred.len() as f64)
        }
        _ => None,
    };
    // the first images, as a grid
    let shown: Vec<Tensor> = generated
        .iter()
        .take(40)
        .map(|im| {
            let rgb = im.to_rgb8();
            let (w, h) = rgb.dimensions();
            Tensor::from_slice(&rgb.into_raw())
                .view([h as i64, w as i64, 3])
                .permute([2, 0, 1])
                .to_kind(Kind::Float)
                / 255.0
        })
        .collect();
    let same_size = shown.windows(2).all(|w| w[0].size() == w[1].size());
    if same_size {
        report::write_grid(
            &opts.out.join("generated.png"),
            &Tensor::stack(&shown, 0),
            n.clamp(1, 10),
            3,
        )?;
    }
    let s = T2iScores {
        prompts: items.len(),
        generated: generated.len(),
        real: real_files.len(),
        embedding: embedding.describe(),
        fid,
        label_accuracy,
    };
    tracing::info!(
        "text→image: {} images from {} prompts, FID {:.3} over {}{}",
        s.generated,
        s.prompts,
        s.fid,
        s.embedding,
        s.label_accuracy
            .map(|a| format!(", judged as the prompt's label {:.1} %", a * 100.0))
            .unwrap_or_default()
    );
    html.h2("Text → image");
    let mut rows = vec![
        vec!["prompts".to_string(), s.prompts.to_string()],
        vec!["generated images".into(), s.generated.to_string()],
        vec!["real images".into(), s.real.to_string()],
        vec!["embedding".into(), s.embedding.clone()],
        vec!["FID".into(), format!("{:.3}", s.fid)],
    ];
    if let Some(a) = s.label_accuracy {
        rows.push(vec![
            "judged as the prompt's label".into(),
            format!("{:.1} %", a * 100.0),
        ]);
    }
    html.table(&rows);
    if same_size {
        html.img("generated.png", "generated images");
    }
    Ok(s)
}
