//! `[pipeline]`: which stages to run, where, how many requests at once, in which dtype,
//! from which checkpoint; validated, with the manifest's defaults.

use super::*;

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

    pub(super) fn graph_options(&self) -> GraphOptions {
        GraphOptions {
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            max_consecutive_panics: self.max_consecutive_panics,
            batching: self.batching.clone(),
        }
    }
}
