//! The library API for embedding LaVIT in a larger system: build a [`Pipeline`] (the stage
//! actors, each on its own thread and device) and call the async [`Pipeline::tokenize`],
//! [`Pipeline::caption`] and [`Pipeline::generate`] from any tokio (or other async) code.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use lavit::pipeline::{Pipeline, PipelineConfig};
//! let pipe = Pipeline::build(&PipelineConfig::from_file("configs/serve.toml".as_ref())?)?;
//! let img = image::open("cat.png")?;
//! let ids = pipe.tokenize(&[img]).await?;
//! # Ok(()) }
//! ```
//!
//! Several requests may be in flight at once: while the LLM decodes one request the encoder
//! already works on the next (pipeline parallelism). Dropping a returned future cancels its
//! request inside the stage loops.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::DynamicImage;
use lavit_runtime::actors::{GraphOptions, Input, StageBuilders, StageGraph};
use lavit_runtime::manifest::{QuantMode, Selection, SelectionChoice, TokenizerManifest};
use lavit_runtime::messages::{CaptionOptions, GenerateOptions, Output, Task, TokenEvent};
#[cfg(feature = "testing")]
use lavit_runtime::mock::{self, MockConfig};
use lavit_runtime::stage::{Placement, StageError};
use serde::Deserialize;
use tch::{Kind, Tensor};

mod config;
mod loader;
pub mod options;
pub use config::{PipelineConfig, StageSet};
pub use loader::builders;
pub use options::{GenerateBudget, GenerateParams, OptionError};

#[cfg(feature = "testing")]
pub use lavit_runtime::actors::Fault;
pub use lavit_runtime::actors::RequestHandle;
pub use lavit_runtime::inflight::AdmissionTicket;
pub use lavit_runtime::messages;
pub use lavit_runtime::stage::{ExitStatus, StageKind};

/// What the request side needs to know about the models.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// Side of the square image the encoder takes.
    pub image_size: i64,
    /// Default output size (width, height) of generated images.
    pub default_size: (usize, usize),
    /// Generated sides must be multiples of this.
    pub size_multiple: usize,
    /// Most diffusion steps the pixel decoder's scheduler takes (its `num_train_timesteps`);
    /// `usize::MAX` when nothing but `server.max_steps` bounds them.
    pub max_steps: usize,
    /// The checkpoint's recommended generation settings (manifest `generation`: LLM
    /// guidance, top-k, decoder guidance and steps of the pixel decoder this pipeline runs),
    /// at the native size: the defaults of `lavit generate` and the server.
    pub generate_defaults: GenerateOptions,
    /// The keep/drop selection the SelectorMerger stage takes when a request names none
    /// ([`PipelineConfig::selection_for`]), and the manifest's `selection_note`.
    pub selection: SelectionChoice,
    pub selection_note: Option<String>,
    /// What bounds and sets up a multimodal synthesis ([`Pipeline::synthesize`]).
    pub synthesis: SynthesisInfo,
}

/// What the request side knows of multimodal synthesis (image and text parts → image).
#[derive(Clone, Debug, PartialEq)]
pub struct SynthesisInfo {
    /// Default LLM guidance of a synthesis (manifest `generation.synthesis_llm_guidance`;
    /// official `multimodal_synthesis`: 5.0).
    pub llm_guidance: f64,
    /// Most visual ids one image part gives: the encoder's patches (`(img_size /
    /// patch_size)²`).
    pub tokens_per_image: usize,
    /// The language model's context (`max_position_embeddings`) when the pipeline runs it.
    pub context: Option<usize>,
    /// Most image tokens generated when a request names none (manifest
    /// `generation.t2i_max_new_tokens`).
    pub max_new_tokens: usize,
}

impl Default for SynthesisInfo {
    fn default() -> Self {
        SynthesisInfo {
            llm_guidance: 5.0,
            tokens_per_image: 256,
            context: None,
            max_new_tokens: 300,
        }
    }
}

/// A synthesis request checked and preprocessed ([`Pipeline::synthesis_request`]), to be
/// started with an admission ticket ([`Pipeline::start_synthesis`]).
pub struct SynthesisRequest {
    task: Task,
    input: Input,
}

/// One part of a prompt to draw from, in order (the official `multimodal_synthesis` takes
/// `(image_path, 'image')` and `(text, 'text')` parts).
#[derive(Clone, Debug)]
pub enum Part {
    Text(String),
    Image(DynamicImage),
}

impl SynthesisInfo {
    /// The most positions a prompt of `images` image parts and the texts `texts` can take in
    /// the language model (each image its encoder's patches, each text one token per UTF-8
    /// byte plus one, [IMG]) plus the image tokens it may generate; an error naming the
    /// numbers when that exceeds the context. Checked before any model work.
    pub fn check_prompt(
        &self,
        images: usize,
        texts: &[&str],
        opts: &GenerateOptions,
    ) -> Result<usize, String> {
        let text: usize = texts.iter().map(|t| t.len() + 1).sum();
        let prompt = images
            .saturating_mul(self.tokens_per_image)
            .saturating_add(text)
            .saturating_add(1);
        let new = opts.max_tokens.unwrap_or(self.max_new_tokens);
        match self.context {
            Some(c) if prompt.saturating_add(new) > c => Err(format!(
                "the prompt may take up to {prompt} positions ({images} images × \
                 {} visual tokens, {text} for the text, 1 for [IMG]) and {new} image tokens \
                 follow: more than the language model's context of {c} positions; give fewer \
                 images or less text",
                self.tokens_per_image
            )),
            _ => Ok(prompt),
        }
    }
}

impl ModelInfo {
    /// The official aspect ratios at this decoder's native size: (name, (height, width)).
    pub fn aspect_ratio_sizes(&self) -> Vec<(&'static str, (i64, i64))> {
        lavit_decoder::pixel_decoder::aspect_ratio_sizes(
            self.default_size.1 as i64,
            self.size_multiple as i64,
        )
    }
}

/// A running LaVIT pipeline (five stage actors).
pub struct Pipeline {
    graph: StageGraph,
    info: ModelInfo,
    /// The stages this pipeline runs (the others refuse requests).
    stages: StageSet,
}

/// `pipeline.stages = "mock"` in a build without the mock stages.
fn mock_unavailable(origin: &str) -> lavit_runtime::Error {
    lavit_runtime::Error::config(
        origin,
        "pipeline.stages",
        "\"mock\" needs a build with the `testing` feature (tests, examples and benches have it; \
         `cargo build --features testing` for a binary)",
    )
}

/// Errors of the pipeline API: the pipeline's own ([`StageError`]).
pub type PipelineResult<T> = Result<T, StageError>;

impl Pipeline {
    /// Build from a config: the real stages from `checkpoint`, or the mock stages.
    pub fn build(cfg: &PipelineConfig) -> crate::Result<Self> {
        match cfg.stages {
            #[cfg(feature = "testing")]
            StageSet::Mock => {
                let m = MockConfig {
                    work: cfg.mock_work,
                    ..MockConfig::default()
                };
                Self::mock(&m, None, cfg)
            }
            #[cfg(not(feature = "testing"))]
            StageSet::Mock => Err(mock_unavailable("the pipeline config").into()),
            _ => {
                let (builders, info) = builders(cfg)?;
                let mut pipe =
                    Self::from_builders(builders, info, &cfg.placement, cfg.graph_options())?;
                pipe.stages = cfg.stages.clone();
                Ok(pipe)
            }
        }
    }

    /// Build from explicit stage builders (replace or mock any stage).
    pub fn from_builders(
        builders: StageBuilders,
        info: ModelInfo,
        placement: &Placement,
        opts: GraphOptions,
    ) -> crate::Result<Self> {
        let graph = StageGraph::spawn(builders, placement, opts)?;
        Ok(Pipeline {
            graph,
            info,
            stages: StageSet::Checkpoint,
        })
    }

    /// The mock stages (optionally holding the LLM and decoder loops at a gate).
    #[cfg(feature = "testing")]
    pub fn mock(
        m: &MockConfig,
        gate: Option<mock::Gate>,
        cfg: &PipelineConfig,
    ) -> crate::Result<Self> {
        let info = ModelInfo {
            image_size: m.image_size,
            default_size: (m.pixel_size as usize, m.pixel_size as usize),
            // The mock decoder draws any size; sides in multiples of 8, as a real decoder's.
            size_multiple: 8,
            max_steps: usize::MAX,
            generate_defaults: GenerateOptions {
                width: m.pixel_size as usize,
                height: m.pixel_size as usize,
                ..GenerateOptions::default()
            },
            selection: SelectionChoice::default(),
            selection_note: None,
            synthesis: SynthesisInfo {
                tokens_per_image: (m.image_size / m.patch.max(1)).pow(2) as usize,
                ..SynthesisInfo::default()
            },
        };
        Self::from_builders(
            mock::builders(m, gate),
            info,
            &cfg.placement,
            cfg.graph_options(),
        )
    }

    pub fn graph(&self) -> &StageGraph {
        &self.graph
    }
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// Only the tokenizer stages run (`stages = "tokenizer"`): tokenize works, caption and
    /// generate are refused.
    pub fn tokenizer_only(&self) -> bool {
        self.stages == StageSet::Tokenizer
    }

    /// The stages this pipeline runs.
    pub fn stages(&self) -> &StageSet {
        &self.stages
    }

    /// Images → CLIP-normalised (B, 3, S, S) float tensor (bicubic resize to the encoder size).
    pub fn preprocess(&self, images: &[DynamicImage]) -> Tensor {
        preprocess(images, self.info.image_size)
    }

    /// Images → visual token ids (one sequence per image, dynamic length).
    pub async fn tokenize(&self, images: &[DynamicImage]) -> PipelineResult<Vec<Vec<i64>>> {
        if images.is_empty() {
            return Err(StageError::Invalid("no images to tokenize".into()));
        }
        let pixels = self.preprocess(images);
        let mut handle = self
            .start_tokenize(self.admit()?, pixels, None, false)
            .await?;
        match handle.wait().await? {
            Output::VisualIds(ids) => Ok(ids),
            other => Err(unexpected(other)),
        }
    }

    /// Image (+ question) → text.
    pub async fn caption(
        &self,
        image: &DynamicImage,
        prompt: &str,
        opts: CaptionOptions,
    ) -> PipelineResult<String> {
        match self
            .caption_stream(image, prompt, opts)
            .await?
            .wait()
            .await?
        {
            Output::Text { text, .. } => Ok(text),
            other => Err(unexpected(other)),
        }
    }

    /// Images (CLIP-normalised, (B, 3, S, S): [`Pipeline::preprocess`]) + one question → one
    /// text per image, decoded as one batch in the Llm stage.
    pub async fn captions(
        &self,
        images: Tensor,
        prompt: &str,
        opts: CaptionOptions,
    ) -> PipelineResult<Vec<String>> {
        let task = Task::Captions {
            prompt: prompt.to_string(),
            opts,
        };
        match self.run(task, Input::Images(images)).await? {
            Output::Texts(t) => Ok(t.into_iter().map(|(_, text)| text).collect()),
            other => Err(unexpected(other)),
        }
    }

    /// Continuous image embeddings computed elsewhere ((T, hidden): what the understanding
    /// merger and `vit_proj` give) (+ question) → text, straight through the Llm stage.
    pub async fn caption_embeds(
        &self,
        embeds: Tensor,
        prompt: &str,
        opts: CaptionOptions,
    ) -> PipelineResult<String> {
        let task = Task::Caption {
            prompt: prompt.to_string(),
            opts,
        };
        match self.run(task, Input::Embeds(vec![embeds])).await? {
            Output::Text { text, .. } => Ok(text),
            other => Err(unexpected(other)),
        }
    }

    /// Text → `opts.n` images (RGB, 8-bit).
    pub async fn generate(
        &self,
        prompt: &str,
        opts: GenerateOptions,
    ) -> PipelineResult<Vec<image::RgbImage>> {
        Ok(self.generate_with_ids(prompt, opts).await?.images)
    }

    /// Text → `opts.n` images with the visual ids each was drawn from.
    pub async fn generate_with_ids(
        &self,
        prompt: &str,
        opts: GenerateOptions,
    ) -> PipelineResult<Generated> {
        let mut handle = self
            .start_generate(self.admit()?, prompt.to_string(), opts)
            .await?;
        Generated::from_output(handle.wait().await?)
    }

    /// A prompt of text and image parts, in order → `opts.n` images with the visual ids each
    /// was drawn from, as the official `multimodal_synthesis`: each image becomes its visual
    /// ids in the tokenizer stages (batched with other work) and is placed in the prompt
    /// without [IMG]/[/IMG]; each text is tokenized on its own; the Llm generates after
    /// [IMG] with classifier-free guidance against [IMG] alone (`opts.llm_guidance`; the
    /// checkpoint's default is [`SynthesisInfo::llm_guidance`]). A prompt of text parts
    /// only runs as text → image.
    pub async fn synthesize(
        &self,
        parts: &[Part],
        opts: GenerateOptions,
    ) -> PipelineResult<Generated> {
        let request = self.synthesis_request(parts, opts)?;
        let mut handle = self.start_synthesis(self.admit()?, request).await?;
        Generated::from_output(handle.wait().await?)
    }

    /// Start an admitted synthesis request ([`Pipeline::synthesis_request`]): `opts.n`
    /// images (`Output::Pixels`).
    pub async fn start_synthesis(
        &self,
        ticket: AdmissionTicket,
        request: SynthesisRequest,
    ) -> PipelineResult<RequestHandle> {
        self.graph.start(ticket, request.task, request.input).await
    }

    /// A synthesis request ready to start ([`Pipeline::start_synthesis`], for callers that
    /// admit it themselves), after the prompt's bounds ([`SynthesisInfo::check_prompt`]);
    /// preprocesses the images (CPU work: a server runs it off its async workers).
    pub fn synthesis_request(
        &self,
        parts: &[Part],
        opts: GenerateOptions,
    ) -> PipelineResult<SynthesisRequest> {
        let texts: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Image(_) => None,
            })
            .collect();
        let images: Vec<DynamicImage> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Image(im) => Some(im.clone()),
                Part::Text(_) => None,
            })
            .collect();
        if images.is_empty() && texts.iter().all(|t| t.trim().is_empty()) {
            return Err(StageError::Invalid(
                "the prompt has neither an image nor any text".into(),
            ));
        }
        self.info
            .synthesis
            .check_prompt(images.len(), &texts, &opts)
            .map_err(StageError::Invalid)?;
        if images.is_empty() {
            let prompt = texts
                .into_iter()
                .map(|t| messages::PromptPart::Text(t.to_string()))
                .collect();
            return Ok(SynthesisRequest {
                task: Task::Generate { opts },
                input: Input::Parts(prompt),
            });
        }
        let parts = parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => messages::SynthesisPart::Text(t.clone()),
                Part::Image(_) => messages::SynthesisPart::Image,
            })
            .collect();
        Ok(SynthesisRequest {
            task: Task::Synthesize { parts, opts },
            input: Input::Images(self.preprocess(&images)),
        })
    }

    /// Image → tokens → pixels.
    pub async fn reconstruct(
        &self,
        image: &DynamicImage,
        opts: GenerateOptions,
    ) -> PipelineResult<Vec<image::RgbImage>> {
        Ok(self.reconstruct_with_ids(image, opts).await?.images)
    }

    /// Image → tokens → pixels, with the image's visual ids.
    pub async fn reconstruct_with_ids(
        &self,
        image: &DynamicImage,
        opts: GenerateOptions,
    ) -> PipelineResult<Generated> {
        let input = Input::Images(self.preprocess(std::slice::from_ref(image)));
        Generated::from_output(self.run(Task::Reconstruct { opts }, input).await?)
    }

    /// Low-level: admit, start and wait for any task.
    pub async fn run(&self, task: Task, input: Input) -> PipelineResult<Output> {
        self.graph.run(task, input).await
    }

    /// Low-level: start a caption and get its token stream (`handle.tokens`) and result.
    pub async fn caption_stream(
        &self,
        image: &DynamicImage,
        prompt: &str,
        opts: CaptionOptions,
    ) -> PipelineResult<RequestHandle> {
        let pixels = self.preprocess(std::slice::from_ref(image));
        self.start_caption(self.admit()?, pixels, prompt.to_string(), opts)
            .await
    }

    /// Take an admission ticket now, or fail at once (`Busy` when `max_in_flight` +
    /// `max_queue` requests are held, `Draining`). A front-end admits before it does a
    /// request's own costly work (decoding its images), then starts it with the ticket.
    pub fn admit(&self) -> PipelineResult<AdmissionTicket> {
        self.graph.admit()
    }

    /// Start an admitted text → image request: `opts.n` images (`Output::Pixels`).
    pub async fn start_generate(
        &self,
        ticket: AdmissionTicket,
        prompt: String,
        opts: GenerateOptions,
    ) -> PipelineResult<RequestHandle> {
        self.graph
            .start(ticket, Task::Generate { opts }, Input::Prompt(prompt))
            .await
    }

    /// Start an admitted caption / question on one preprocessed image ((1, 3, S, S):
    /// [`Pipeline::preprocess`]): its tokens stream on `handle.tokens` as they are decoded,
    /// and the result is `Output::Text`.
    pub async fn start_caption(
        &self,
        ticket: AdmissionTicket,
        pixels: Tensor,
        prompt: String,
        opts: CaptionOptions,
    ) -> PipelineResult<RequestHandle> {
        let task = Task::Caption { prompt, opts };
        self.graph.start(ticket, task, Input::Images(pixels)).await
    }

    /// Start an admitted tokenize request on preprocessed images: `Output::VisualIds`, or,
    /// with `keep_mask` or an explicit `selection`, `Output::Selection` (ids and the
    /// selector's keep decisions, taken with that selection instead of the served default).
    pub async fn start_tokenize(
        &self,
        ticket: AdmissionTicket,
        pixels: Tensor,
        selection: Option<SelectionChoice>,
        keep_mask: bool,
    ) -> PipelineResult<RequestHandle> {
        let task = if keep_mask || selection.is_some() {
            Task::Select { selection }
        } else {
            Task::Tokenize
        };
        self.graph.start(ticket, task, Input::Images(pixels)).await
    }
}

/// Images of a generate / reconstruct request and the visual ids each was drawn from.
pub struct Generated {
    pub images: Vec<image::RgbImage>,
    pub ids: Vec<Vec<i64>>,
}

impl Generated {
    fn from_output(out: Output) -> PipelineResult<Self> {
        match out {
            Output::Pixels { images, ids } => Ok(Generated {
                images: to_images(&images)?,
                ids,
            }),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(o: Output) -> StageError {
    StageError::Invalid(format!("unexpected pipeline output {o:?}"))
}

/// Streamed caption tokens (re-exported for users of [`Pipeline::caption_stream`]).
pub type Token = TokenEvent;

/// Images → (B, 3, S, S) CLIP-normalised float tensor with the official processor
/// (`LaVITImageProcessor`: PIL bicubic resize, /255, CLIP mean/std).
pub fn preprocess(images: &[DynamicImage], size: i64) -> Tensor {
    let p = lavit_encoder::LaVITImageProcessor::new(size as u32);
    let v: Vec<Tensor> = images
        .iter()
        .map(|im| p.preprocess(&im.to_rgb8()))
        .collect();
    Tensor::stack(&v, 0) // (B, 3, S, S)
}

/// (n, 3, H, W) float in [0, 1] → RGB images.
pub fn to_images(px: &Tensor) -> PipelineResult<Vec<image::RgbImage>> {
    let (n, c, h, w) = px
        .size4()
        .map_err(|e| StageError::Invalid(format!("pixels: {e}")))?;
    if c != 3 {
        return Err(StageError::Invalid(format!(
            "pixels have {c} channels, expected 3"
        )));
    }
    let u8s = (px.to_device(tch::Device::Cpu).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous(); // (n, H, W, 3)
    let flat = Vec::<u8>::try_from(u8s.reshape([-1]))
        .map_err(|e| StageError::Invalid(format!("pixels: {e}")))?;
    let per = (h * w * 3) as usize;
    (0..n as usize)
        .map(|i| {
            image::RgbImage::from_raw(w as u32, h as u32, flat[i * per..(i + 1) * per].to_vec())
                .ok_or_else(|| StageError::Invalid("pixel buffer size".into()))
        })
        .collect()
}

/// A pipeline shared between tasks.
pub type SharedPipeline = Arc<Pipeline>;
