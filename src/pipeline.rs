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

mod loader;
pub mod options;
pub use loader::builders;
pub use options::{GenerateBudget, GenerateParams, OptionError};

#[cfg(feature = "testing")]
pub use lavit_runtime::actors::Fault;
pub use lavit_runtime::actors::RequestHandle;
pub use lavit_runtime::inflight::AdmissionTicket;
pub use lavit_runtime::messages;
pub use lavit_runtime::stage::{ExitStatus, StageKind};

/// Which stage implementations a pipeline runs. Every set but `mock` loads the real models
/// of `checkpoint`, each stage with its own loader; the stages a set leaves out refuse
/// requests (and load nothing), so a one-shot command loads only what its task needs.
#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StageSet {
    /// All five stages.
    #[default]
    Checkpoint,
    /// Only the tokenizer stages (Encoder, SelectorMerger, Quantizer), e.g. a stage-1 export.
    Tokenizer,
    /// The tokenizer stages and the Llm (tokenize, caption / VQA).
    Understanding,
    /// The Llm and the Decoder (text → image).
    Generation,
    /// Only the Llm (captions of image embeddings computed elsewhere).
    Language,
    /// The tokenizer stages and the Decoder (image → tokens → pixels).
    Reconstruction,
    /// The deterministic mock stages of `lavit_runtime::mock` (tests, wiring checks; only in
    /// a build with the `testing` feature, which tests, examples and benches turn on).
    Mock,
}

impl StageSet {
    /// Whether this set runs `kind` (every stage for `mock`).
    pub fn has(&self, kind: StageKind) -> bool {
        use StageKind::*;
        match self {
            StageSet::Checkpoint | StageSet::Mock => true,
            StageSet::Tokenizer => matches!(kind, Encoder | SelectorMerger | Quantizer),
            StageSet::Understanding => kind != Decoder,
            StageSet::Generation => matches!(kind, Llm | Decoder),
            StageSet::Language => kind == Llm,
            StageSet::Reconstruction => kind != Llm,
        }
    }
}

/// How to build a pipeline: where the weights are, where each stage runs, admission limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// A LaVIT checkpoint folder (official layout).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Stage implementations.
    #[serde(default)]
    pub stages: StageSet,
    /// A placement file (`configs/placement-*.toml`); relative to the config file.
    #[serde(default)]
    pub placement_file: Option<PathBuf>,
    /// Inline placement (used when no placement file is named).
    #[serde(default)]
    pub placement: Placement,
    /// Requests inside the stages at once.
    #[serde(default = "d_in_flight")]
    pub max_in_flight: usize,
    /// Requests waiting beyond those; more are refused at once.
    #[serde(default = "d_queue")]
    pub max_queue: usize,
    /// Panics in a row after which a stage is declared dead (see the recovery policy).
    #[serde(default = "d_panics")]
    pub max_consecutive_panics: u64,
    /// Mock stages only: extra matmuls per call (makes them measurably slow).
    #[serde(default)]
    pub mock_work: usize,
    /// Which pixel decoder the Decoder stage runs: `highres` (SDXL-shaped), `lowres`
    /// (SD-1.5-shaped), or `auto` (highres when the folder has `highres_pixel_decoding/`).
    #[serde(default = "d_auto")]
    pub pixel_decoding: String,
    /// Keep/drop decisions of the selector: `manifest` (the checkpoint manifest's
    /// `tokenizer.selection`), `argmax` (deterministic) or `gumbel` (sampled as the official
    /// code does, from `selection_seed`).
    #[serde(default = "d_manifest")]
    pub selection: String,
    /// Seed of the Gumbel noise (default: the manifest's `tokenizer.selection_seed`).
    #[serde(default)]
    pub selection_seed: Option<u64>,
    /// Precision of the LLM and the U-Net: `auto` (bf16 on CUDA, f32 on the CPU), `f32`,
    /// `bf16`, `f16` (the VAE and the tokenizer stay f32, as the official code runs them).
    #[serde(default = "d_auto")]
    pub dtype: String,
    /// Weight-only quantisation of the LLM's linear layers at load: `none`, `int8` (one
    /// scale per output channel) or `int4` (a scale and a zero per `quantize_group_size`
    /// input features). A folder written by `lavit quantize` loads as stored.
    #[serde(default = "d_none")]
    pub quantize: String,
    /// Input features per int4 group: 32, 64 or 128.
    #[serde(default = "d_group")]
    pub quantize_group_size: i64,
    /// How the stages batch concurrent requests (`[pipeline.batching]`: batch sizes, the
    /// tokenizer stages' wait, the Llm's KV cache budget).
    #[serde(default)]
    pub batching: lavit_runtime::stage::Batching,
    /// Plugin libraries and the backbone / codebook the tokenizer stages take from them
    /// (the same section as `lavit train tokenizer`'s `[plugins]`; the file's top-level
    /// `[plugins]` table is read into it).
    #[serde(default)]
    pub plugins: lavit_runtime::plugin_host::PluginsConfig,
}

fn d_in_flight() -> usize {
    32
}
fn d_queue() -> usize {
    64
}
fn d_panics() -> u64 {
    3
}
fn d_auto() -> String {
    "auto".into()
}
fn d_manifest() -> String {
    "manifest".into()
}
fn d_none() -> String {
    "none".into()
}
fn d_group() -> i64 {
    128
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            checkpoint: None,
            stages: StageSet::Checkpoint,
            placement_file: None,
            placement: Placement::default(),
            max_in_flight: d_in_flight(),
            max_queue: d_queue(),
            max_consecutive_panics: d_panics(),
            mock_work: 0,
            pixel_decoding: d_auto(),
            selection: d_manifest(),
            selection_seed: None,
            dtype: d_auto(),
            quantize: d_none(),
            quantize_group_size: d_group(),
            batching: Default::default(),
            plugins: Default::default(),
        }
    }
}

/// The sections of a command config file the pipeline reads: `[pipeline]` and the top-level
/// `[plugins]`; the serving limits (`[server]`) belong to `lavit serve` and are skipped here.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PipelineFile {
    pipeline: PipelineConfig,
    plugins: Option<lavit_runtime::plugin_host::PluginsConfig>,
    server: Option<serde_json::Value>,
}

impl lavit_runtime::config::Validate for PipelineFile {
    fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        self.pipeline.validate(origin)
    }
}

impl PipelineConfig {
    /// Read the `[pipeline]` table of a config file (see configs/serve.toml) and its top-level
    /// `[plugins]` table through the one config mechanism
    /// ([`lavit_runtime::config::load_config`]: `LAVIT__PIPELINE__KEY` overrides, unknown keys
    /// and bad values refused with the file and key); relative paths are resolved against the
    /// file's folder.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        Self::load(Some(path))
    }

    /// [`PipelineConfig::from_file`] for an optional file: without one, the defaults with
    /// the `LAVIT__PIPELINE__*` environment overrides.
    pub fn load(path: Option<&Path>) -> crate::Result<Self> {
        let f: PipelineFile = lavit_runtime::config::load_optional_config(path)?;
        let origin = path.unwrap_or(Path::new("./(built-in defaults)"));
        f.pipeline.resolved(f.plugins, origin)
    }

    /// Range checks of the admission limits and the inline placement (a placement file is
    /// checked when it is read, [`PipelineConfig::resolved`]).
    pub fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        use lavit_runtime::Error;
        let range = |key: &str, v: u64, hi: u64| {
            if (1..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::config(
                    origin,
                    format!("pipeline.{key}"),
                    format!("{v} is out of range 1..={hi}"),
                ))
            }
        };
        range("max_in_flight", self.max_in_flight as u64, 4096)?;
        range("max_queue", self.max_queue.max(1) as u64, 1 << 20)?;
        range(
            "max_consecutive_panics",
            self.max_consecutive_panics,
            1 << 20,
        )?;
        if !["auto", "highres", "lowres"].contains(&self.pixel_decoding.as_str()) {
            return Err(Error::config(
                origin,
                "pipeline.pixel_decoding",
                format!(
                    "`{}` is not one of auto, highres, lowres",
                    self.pixel_decoding
                ),
            ));
        }
        if !["manifest", "argmax", "gumbel"].contains(&self.selection.as_str()) {
            return Err(Error::config(
                origin,
                "pipeline.selection",
                format!(
                    "`{}` is not one of manifest, argmax, gumbel",
                    self.selection
                ),
            ));
        }
        if self.dtype != "auto" {
            lavit_runtime::device::parse_dtype(&self.dtype)
                .map_err(|e| Error::config(origin, "pipeline.dtype", e.to_string()))?;
        }
        if let Err((group, msg)) = QuantMode::parse(&self.quantize, Some(self.quantize_group_size))
        {
            let key = if group {
                "pipeline.quantize_group_size"
            } else {
                "pipeline.quantize"
            };
            return Err(Error::config(origin, key, msg));
        }
        if self.stages == StageSet::Mock && !cfg!(feature = "testing") {
            return Err(mock_unavailable(origin));
        }
        if self.mock_work > 1 << 16 {
            return Err(Error::config(
                origin,
                "pipeline.mock_work",
                format!("{} is above 65536", self.mock_work),
            ));
        }
        self.batching.validate(origin)?;
        self.placement.validate(origin)
    }

    /// Resolve what a config file names relative to it (`origin`: the file, or a
    /// pseudo-path for built-in defaults whose folder is the working directory): the top-level
    /// `[plugins]` (refused together with `[pipeline.plugins]`), the placement file (read and
    /// validated), a relative checkpoint folder.
    pub fn resolved(
        mut self,
        plugins: Option<lavit_runtime::plugin_host::PluginsConfig>,
        origin: &Path,
    ) -> crate::Result<Self> {
        let base = origin.parent().unwrap_or(Path::new("."));
        if let Some(p) = plugins {
            if !self.plugins.is_empty() {
                return Err(crate::Error::Invalid(format!(
                    "{}: give the plugins either as [plugins] or as [pipeline.plugins], not both",
                    origin.display()
                )));
            }
            self.plugins = p;
        }
        self.plugins = self.plugins.resolved(base);
        if let Some(p) = &self.placement_file {
            let p = if p.is_relative() {
                base.join(p)
            } else {
                p.clone()
            };
            self.placement = Placement::from_file(&p)?;
            self.placement_file = Some(p);
        }
        if let Some(c) = &self.checkpoint {
            if c.is_relative() && !c.exists() {
                self.checkpoint = Some(base.join(c));
            }
        }
        Ok(self)
    }

    /// The selection the pipeline's SelectorMerger stage takes by default for a checkpoint
    /// whose tokenizer manifest is `t`: the manifest's `selection` and `selection_seed`,
    /// each replaced by this config's `selection` (unless `manifest`) and `selection_seed`
    /// (when given).
    pub fn selection_for(&self, t: &TokenizerManifest) -> SelectionChoice {
        let m = t.selection_choice();
        SelectionChoice {
            selection: Selection::parse(&self.selection).unwrap_or(m.selection),
            seed: self.selection_seed.unwrap_or(m.seed),
        }
    }

    /// The `quantize` setting (none when it does not parse: [`PipelineConfig::validate`]
    /// refuses that first).
    pub fn quant_mode(&self) -> QuantMode {
        QuantMode::parse(&self.quantize, Some(self.quantize_group_size)).unwrap_or_default()
    }

    fn graph_options(&self) -> GraphOptions {
        GraphOptions {
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            max_consecutive_panics: self.max_consecutive_panics,
            batching: self.batching.clone(),
        }
    }
}

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
