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
use lavit_runtime::messages::{CaptionOptions, GenerateOptions, Output, Task, TokenEvent};
use lavit_runtime::mock::{self, MockConfig};
use lavit_runtime::stage::{Placement, StageError};
use serde::Deserialize;
use tch::{Kind, Tensor};

pub mod stages;

pub use lavit_runtime::actors::{Fault, RequestHandle};
pub use lavit_runtime::messages;
pub use lavit_runtime::stage::{ExitStatus, StageKind};

/// Which stage implementations a pipeline runs.
#[derive(Clone, Debug, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StageSet {
    /// The real models loaded from `checkpoint`.
    #[default]
    Checkpoint,
    /// Only the tokenizer stages (Encoder, SelectorMerger, Quantizer) from `checkpoint`, e.g.
    /// a stage-1 export; the Llm and Decoder stages refuse requests.
    Tokenizer,
    /// The deterministic mock stages of `lavit_runtime::mock` (tests, wiring checks).
    Mock,
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
    /// Plugin libraries and the backbone / codebook the tokenizer stages take from them
    /// (the same section as `lavit train tokenizer`'s `[plugins]`; the file's top-level
    /// `[plugins]` table is read into it).
    #[serde(default)]
    pub plugins: lavit_runtime::plugin_host::PluginsConfig,
}

fn d_in_flight() -> usize {
    4
}
fn d_queue() -> usize {
    16
}
fn d_panics() -> u64 {
    3
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
            plugins: Default::default(),
        }
    }
}

impl PipelineConfig {
    /// Read the `[pipeline]` table of a TOML file (see configs/serve.toml) and its top-level
    /// `[plugins]` table; a relative `placement_file`, `checkpoint` or plugin path is resolved
    /// against the file's folder.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = lavit_runtime::fsread::read_config(path)?;
        let value: toml::Value =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let table = value
            .get("pipeline")
            .cloned()
            .unwrap_or(toml::Value::Table(Default::default()));
        let mut cfg: PipelineConfig = table.try_into().map_err(|e: toml::de::Error| {
            anyhow::anyhow!("{}: [pipeline]: {}", path.display(), e.message())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(p) = value.get("plugins") {
            if !cfg.plugins.is_empty() {
                anyhow::bail!(
                    "{}: give the plugins either as [plugins] or as [pipeline.plugins], not both",
                    path.display()
                );
            }
            cfg.plugins = p.clone().try_into().map_err(|e: toml::de::Error| {
                anyhow::anyhow!("{}: [plugins]: {}", path.display(), e.message())
            })?;
        }
        cfg.plugins = cfg.plugins.resolved(base);
        if let Some(p) = &cfg.placement_file {
            let p = if p.is_relative() {
                base.join(p)
            } else {
                p.clone()
            };
            cfg.placement = Placement::from_file(&p)?;
            cfg.placement_file = Some(p);
        }
        if let Some(c) = &cfg.checkpoint {
            if c.is_relative() && !c.exists() {
                cfg.checkpoint = Some(base.join(c));
            }
        }
        Ok(cfg)
    }

    fn graph_options(&self) -> GraphOptions {
        GraphOptions {
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            max_consecutive_panics: self.max_consecutive_panics,
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
}

/// A running LaVIT pipeline (five stage actors).
pub struct Pipeline {
    graph: StageGraph,
    info: ModelInfo,
    /// Built with `stages = "tokenizer"`: the Llm and Decoder stages refuse requests.
    tokenizer_only: bool,
}

/// Errors of the pipeline API: the pipeline's own ([`StageError`]).
pub type PipelineResult<T> = Result<T, StageError>;

impl Pipeline {
    /// Build from a config: the real stages from `checkpoint`, or the mock stages.
    pub fn build(cfg: &PipelineConfig) -> anyhow::Result<Self> {
        match cfg.stages {
            StageSet::Mock => {
                let m = MockConfig {
                    work: cfg.mock_work,
                    ..MockConfig::default()
                };
                Self::mock(&m, None, cfg)
            }
            StageSet::Checkpoint | StageSet::Tokenizer => {
                let dir = cfg.checkpoint.as_deref().ok_or_else(|| {
                    anyhow::anyhow!("the pipeline config names no checkpoint folder (pipeline.checkpoint or --checkpoint)")
                })?;
                let plugins = crate::tokenizer::TokenizerPlugins::load(&cfg.plugins)?;
                let tokenizer_only = cfg.stages == StageSet::Tokenizer;
                let (builders, info) = stages::builders(dir, &plugins, tokenizer_only)?;
                let mut pipe =
                    Self::from_builders(builders, info, &cfg.placement, cfg.graph_options())?;
                pipe.tokenizer_only = tokenizer_only;
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
    ) -> anyhow::Result<Self> {
        let graph = StageGraph::spawn(builders, placement, opts)?;
        Ok(Pipeline {
            graph,
            info,
            tokenizer_only: false,
        })
    }

    /// The mock stages (optionally holding the LLM and decoder loops at a gate).
    pub fn mock(
        m: &MockConfig,
        gate: Option<mock::Gate>,
        cfg: &PipelineConfig,
    ) -> anyhow::Result<Self> {
        let info = ModelInfo {
            image_size: m.image_size,
            default_size: (m.pixel_size as usize, m.pixel_size as usize),
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
        self.tokenizer_only
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
        match self
            .run(Task::Tokenize, Input::Images(self.preprocess(images)))
            .await?
        {
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
        let task = Task::Caption {
            prompt: prompt.to_string(),
            opts,
        };
        match self
            .run(
                task,
                Input::Images(self.preprocess(std::slice::from_ref(image))),
            )
            .await?
        {
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
        match self
            .run(Task::Generate { opts }, Input::Prompt(prompt.to_string()))
            .await?
        {
            Output::Pixels(px) => to_images(&px),
            other => Err(unexpected(other)),
        }
    }

    /// Image → tokens → pixels.
    pub async fn reconstruct(
        &self,
        image: &DynamicImage,
        opts: GenerateOptions,
    ) -> PipelineResult<Vec<image::RgbImage>> {
        let input = Input::Images(self.preprocess(std::slice::from_ref(image)));
        match self.run(Task::Reconstruct { opts }, input).await? {
            Output::Pixels(px) => to_images(&px),
            other => Err(unexpected(other)),
        }
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
        let ticket = self.graph.admit()?;
        let task = Task::Caption {
            prompt: prompt.to_string(),
            opts,
        };
        self.graph
            .start(
                ticket,
                task,
                Input::Images(self.preprocess(std::slice::from_ref(image))),
            )
            .await
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
