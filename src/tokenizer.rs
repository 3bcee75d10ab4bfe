//! The assembled dynamic visual tokenizer of LaVIT (Jin et al., "Unified Language-Vision
//! Pretraining in LLM with Dynamic Discrete Visual Tokenization", ICLR 2024), reference
//! `LaVIT/models/modeling_visual_tokenzier.py::DynamicVisualTokenizer` and
//! `LaVIT/models/modeling_decoder.py::build_tokenizer_decoder`.
//!
//! ```text
//! images [B,3,S,S] ─ encoder (Box<dyn Backbone>, EVA ViT) ─ patch features [B,N,C]
//!   ─ token_predictor ─ keep decisions [B,N] (arg-max, or Gumbel with a seed)
//!   ─ causal_encoder (TokenMerger) ─ kept tokens in raster order [T,C]
//!   ─ encode_task_layer ─ quantize (Box<dyn Codebook>) ─ code ids [T] (+ visual_token_offset)
//! ids ─ codebook rows ─ VQDecoder / HighresVQDecoder ─ U-Net conditions
//! images ─ … ─ merger from language_model/visual_weight.bin ─ vit_proj ─ LLM embeddings
//! ```
//!
//! Everything the LLM, the pixel decoder, the server and the demo need from images goes
//! through [`VisualTokenizer`]: [`tokenize`](VisualTokenizer::tokenize) (image → ids),
//! [`encode_features`](VisualTokenizer::encode_features) (image → continuous LLM inputs),
//! [`decode_lowres`](VisualTokenizer::decode_lowres) /
//! [`decode_highres`](VisualTokenizer::decode_highres) (ids → U-Net conditions).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lavit_decoder::feature_decoder::{FeatureDecoderConfig, HighresVQDecoder, VQDecoder};
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_encoder::LaVITImageProcessor;
use lavit_plugin_api::{Backbone, Codebook};
use lavit_quantizer::{EncodeTaskLayer, VectorQuantizer};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::{LavitManifest, Selection};
use lavit_runtime::plugin_host::{PluginComponent, PluginHost, PluginsConfig};
use lavit_runtime::{Error, Result};
use lavit_selector::{SelectionMode, TokenMerger, TokenMergerConfig, TokenPredictor};
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// Official file names inside a checkpoint folder (without extension: `.bin` or
/// `.safetensors` are both accepted).
pub mod files {
    pub const EVA: &str = "visual_tokenizer/eva_vitg_psz14";
    pub const TOKENIZER_ENCODER: &str = "visual_tokenizer/tokenizer_encoder";
    pub const LOWRES_DECODER: &str = "visual_tokenizer/tokenizer_decoder";
    pub const HIGHRES_DECODER: &str = "visual_tokenizer/highres_tokenizer_decoder";
    pub const VISUAL_WEIGHT: &str = "language_model/visual_weight";
    /// A plugin backbone's weights (`Backbone::state_dict`, safetensors), written by
    /// `lavit train tokenizer` in place of the EVA file.
    pub const PLUGIN_BACKBONE: &str = "visual_tokenizer/backbone";
    /// A plugin codebook's weights (`Codebook::state_dict`, safetensors), written in place
    /// of `quantize.*` in `tokenizer_encoder`.
    pub const PLUGIN_CODEBOOK: &str = "visual_tokenizer/codebook";
}

/// Where the tokenizer's backbone and codebook come from: the built-in EVA-CLIP and l2 VQ,
/// or the components of a config's `[plugins]` section. Cheap to clone (the loaded plugin
/// host is shared), so each stage thread builds its part on its own device.
///
/// A plugin component without `weights` loads the checkpoint folder's
/// `visual_tokenizer/{backbone,codebook}.safetensors` when the folder has it (what
/// `lavit train tokenizer` exports), so one config serves for training and inference.
#[derive(Clone, Default)]
pub struct TokenizerPlugins {
    host: Option<Arc<PluginHost>>,
    cfg: PluginsConfig,
}

impl std::fmt::Debug for TokenizerPlugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerPlugins")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl TokenizerPlugins {
    /// The built-in parts only.
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads the plugins `cfg` names (start-up) and remembers which parts they replace.
    pub fn load(cfg: &PluginsConfig) -> Result<Self> {
        if cfg.load.is_empty() {
            if let Some(c) = cfg.backbone.as_ref().or(cfg.codebook.as_ref()) {
                return Err(Error::invalid(format!(
                    "[plugins] takes part `{}` from a plugin but `plugins.load` names no plugin library",
                    c.plugin
                )));
            }
            return Ok(Self::none());
        }
        let host = PluginHost::from_config(cfg)?;
        Ok(Self {
            host: Some(Arc::new(host)),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &PluginsConfig {
        &self.cfg
    }

    /// `c` with `weights` defaulting to `checkpoint/<file>.safetensors` when that exists.
    fn component(c: &PluginComponent, checkpoint: Option<&Path>, file: &str) -> PluginComponent {
        let mut c = c.clone();
        if c.weights.is_none() {
            c.weights = checkpoint
                .map(|d| d.join(format!("{file}.safetensors")))
                .filter(|p| p.is_file());
        }
        c
    }

    fn host(&self) -> Result<&PluginHost> {
        self.host
            .as_deref()
            .ok_or_else(|| Error::invalid("no plugins are loaded"))
    }

    /// The plugin backbone on `device` (None: the config keeps EVA-CLIP).
    pub fn backbone(
        &self,
        checkpoint: Option<&Path>,
        device: Device,
    ) -> Result<Option<Box<dyn Backbone>>> {
        let Some(c) = &self.cfg.backbone else {
            return Ok(None);
        };
        let c = Self::component(c, checkpoint, files::PLUGIN_BACKBONE);
        Ok(Some(self.host()?.backbone(&c, device)?))
    }

    /// The plugin codebook on `device` (None: the config keeps the built-in VQ).
    pub fn codebook(
        &self,
        checkpoint: Option<&Path>,
        device: Device,
    ) -> Result<Option<Box<dyn Codebook>>> {
        let Some(c) = &self.cfg.codebook else {
            return Ok(None);
        };
        let c = Self::component(c, checkpoint, files::PLUGIN_CODEBOOK);
        Ok(Some(self.host()?.codebook(&c, device)?))
    }
}

/// The top-level `[plugins]` table of a TOML config file (serving, training or a file of
/// its own), paths resolved against the file's folder; empty when the file has none.
pub fn plugins_section(path: &Path) -> Result<PluginsConfig> {
    let text = lavit_runtime::fsread::read_config(path)?;
    let value: toml::Value = toml::from_str(&text)
        .map_err(|e| Error::config(path.display().to_string(), "plugins", e.to_string()))?;
    let cfg: PluginsConfig = match value.get("plugins") {
        Some(p) => p.clone().try_into().map_err(|e: toml::de::Error| {
            Error::config(path.display().to_string(), "plugins", e.message())
        })?,
        None => PluginsConfig::default(),
    };
    Ok(cfg.resolved(path.parent().unwrap_or(Path::new("."))))
}

/// Checks that a backbone and a codebook fit the tokenizer sizes of `manifest`: the
/// backbone's image size, patch size and width against what the selector, merger and image
/// processor are built for, the codebook's width against `encode_task_layer`'s output and
/// its size against the LLM's visual vocabulary. The error names both sides of every
/// mismatch.
pub fn check_geometry(
    manifest: &LavitManifest,
    encoder: &dyn Backbone,
    codebook: &dyn Codebook,
) -> Result<()> {
    let t = &manifest.tokenizer;
    let (b, c) = (encoder.name(), codebook.name());
    let mut problems = Vec::new();
    let checks = [
        (
            format!("backbone `{b}` image_size"),
            encoder.image_size(),
            "tokenizer.img_size (the image processor's size)",
            t.img_size,
        ),
        (
            format!("backbone `{b}` patch_size"),
            encoder.patch_size(),
            "tokenizer.patch_size (the selector's patch grid)",
            t.patch_size,
        ),
        (
            format!("backbone `{b}` width"),
            encoder.width(),
            "tokenizer.encoder_width (the token selector's and merger's input width)",
            t.encoder_width,
        ),
        (
            format!("codebook `{c}` code_dim"),
            codebook.code_dim(),
            "tokenizer.code_dim (encode_task_layer's output width)",
            t.code_dim,
        ),
        (
            format!("codebook `{c}` num_codes"),
            codebook.num_codes(),
            "tokenizer.n_code (the LLM's visual vocabulary)",
            t.n_code,
        ),
    ];
    for (part, got, side, want) in checks {
        if got != want {
            problems.push(format!("{part} is {got}, but {side} is {want}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "the tokenizer's parts do not fit together: {}",
            problems.join("; ")
        )))
    }
}

/// `dir/<name>.bin`, else `dir/<name>.safetensors`; an error naming both if neither exists.
pub fn resolve_file(dir: &Path, name: &str) -> Result<PathBuf> {
    for ext in ["bin", "safetensors"] {
        let p = dir.join(format!("{name}.{ext}"));
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::invalid(format!(
        "{}: neither {name}.bin nor {name}.safetensors exists",
        dir.display()
    )))
}

fn selection_mode(s: Selection) -> SelectionMode {
    match s {
        Selection::Argmax => SelectionMode::Argmax,
        Selection::Gumbel => SelectionMode::Gumbel { seed: 0, tau: 1.0 },
    }
}

/// Which optional parts [`VisualTokenizer::from_checkpoint`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadParts {
    /// The understanding merger + `vit_proj` from `language_model/visual_weight.*`.
    pub understanding: bool,
    /// `tokenizer_decoder.*` (lowres U-Net condition).
    pub lowres_decoder: bool,
    /// `highres_tokenizer_decoder.*` (highres U-Net condition).
    pub highres_decoder: bool,
}

impl LoadParts {
    /// Everything.
    pub fn all() -> Self {
        Self {
            understanding: true,
            lowres_decoder: true,
            highres_decoder: true,
        }
    }
    /// Only what `tokenize` needs.
    pub fn tokenize_only() -> Self {
        Self {
            understanding: false,
            lowres_decoder: false,
            highres_decoder: false,
        }
    }
}

impl Default for LoadParts {
    fn default() -> Self {
        Self::all()
    }
}

/// The merger and projector LaVIT fine-tuned with the LLM (`visual_weight.bin`).
pub struct UnderstandingHead {
    pub vs: nn::VarStore,
    pub causal_encoder: TokenMerger,
    pub vit_proj: nn::Linear,
}

impl UnderstandingHead {
    /// Random weights at the sizes of `manifest` (names as in `visual_weight.bin`).
    pub fn new(manifest: &LavitManifest, device: Device) -> Self {
        let t = &manifest.tokenizer;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let causal_encoder = TokenMerger::new(
            &root / "causal_encoder",
            &TokenMergerConfig::from_manifest(t),
        );
        let vit_proj = nn::linear(
            &root / "vit_proj",
            t.encoder_width,
            t.llm_hidden,
            Default::default(),
        );
        Self {
            vs,
            causal_encoder,
            vit_proj,
        }
    }
}

/// Intermediate results of one tokenizer forward (for parity, training and debugging).
pub struct TokenizerTrace {
    /// Patch features [B, N, C] (no cls token).
    pub features: Tensor,
    /// Selector log-probs [B, N, 2] (0 = keep).
    pub log_probs: Tensor,
    /// Keep decisions [B, N] in {0, 1}.
    pub decisions: Tensor,
    /// Merger output for every position [B, N, C].
    pub merged: Tensor,
}

/// Result of [`VisualTokenizer::tokenize`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tokenized {
    /// Number of visual tokens of each image.
    pub counts: Vec<i64>,
    /// LLM ids of each image (code id + `visual_token_offset`), raster order.
    pub ids: Vec<Vec<i64>>,
}

/// The dynamic visual tokenizer with its feature decoders.
pub struct VisualTokenizer {
    pub manifest: LavitManifest,
    pub device: Device,
    pub processor: LaVITImageProcessor,
    /// The frozen vision encoder (the built-in EVA ViT or a plugin).
    pub encoder: Box<dyn Backbone>,
    /// Weights of `token_predictor`, `causal_encoder`, `encode_task_layer`, `vit_proj`.
    pub vs: nn::VarStore,
    pub token_predictor: TokenPredictor,
    pub causal_encoder: TokenMerger,
    pub encode_task_layer: EncodeTaskLayer,
    pub vit_proj: nn::Linear,
    /// The codebook (the built-in l2 VQ or a plugin).
    pub quantize: Box<dyn Codebook>,
    pub understanding: Option<UnderstandingHead>,
    pub lowres_decoder: Option<(nn::VarStore, VQDecoder)>,
    pub highres_decoder: Option<(nn::VarStore, HighresVQDecoder)>,
    /// Default selection mode of `tokenize` (from the manifest; arg-max unless it says
    /// `gumbel`).
    pub selection: SelectionMode,
}

impl VisualTokenizer {
    /// Random weights at the sizes of `manifest` (for training from scratch). Builds the
    /// EVA encoder, the built-in codebook and both feature decoders.
    pub fn new_random(manifest: &LavitManifest, device: Device) -> Self {
        let t = &manifest.tokenizer;
        let encoder = EvaBackbone::new(&EvaVitConfig::from_manifest(t), device);
        let codebook = VectorQuantizer::new(t.n_code, t.code_dim, device);
        let mut me = Self::with_parts(manifest, device, Box::new(encoder), Box::new(codebook))
            .expect("the built-in parts are built from the manifest's sizes");
        let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
        let vs = nn::VarStore::new(device);
        let m = VQDecoder::new(vs.root(), &dcfg);
        me.lowres_decoder = Some((vs, m));
        me
    }

    /// Selector, merger, task layer and projector with random weights around a given
    /// encoder and codebook (no decoders, no understanding head). Refuses parts whose
    /// geometry does not fit the manifest ([`check_geometry`]).
    pub fn with_parts(
        manifest: &LavitManifest,
        device: Device,
        encoder: Box<dyn Backbone>,
        quantize: Box<dyn Codebook>,
    ) -> Result<Self> {
        check_geometry(manifest, encoder.as_ref(), quantize.as_ref())?;
        let t = &manifest.tokenizer;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let c = t.encoder_width;
        let token_predictor = TokenPredictor::new(&root / "token_predictor", c);
        let causal_encoder = TokenMerger::new(
            &root / "causal_encoder",
            &TokenMergerConfig::from_manifest(t),
        );
        let encode_task_layer = EncodeTaskLayer::new(&root / "encode_task_layer", c, t.code_dim);
        let vit_proj = nn::linear(&root / "vit_proj", c, t.llm_hidden, Default::default());
        Ok(Self {
            manifest: manifest.clone(),
            device,
            processor: LaVITImageProcessor::new(t.img_size as u32),
            encoder,
            vs,
            token_predictor,
            causal_encoder,
            encode_task_layer,
            vit_proj,
            quantize,
            understanding: None,
            lowres_decoder: None,
            highres_decoder: None,
            selection: selection_mode(t.selection),
        })
    }

    /// Load a LaVIT checkpoint folder (official layout; `manifest.json` optional) with the
    /// strict loader: `visual_tokenizer/{eva_vitg_psz14, tokenizer_encoder}` always, the
    /// parts in `parts` when asked. Every file may be `.bin` or `.safetensors`.
    pub fn from_checkpoint(dir: &Path, device: Device, parts: LoadParts) -> Result<Self> {
        Self::load(dir, device, parts, &TokenizerPlugins::none())
    }

    /// As [`from_checkpoint`](Self::from_checkpoint) with the backbone and codebook the
    /// config's `[plugins]` section names (each part not named is the built-in one).
    pub fn load(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        plugins: &TokenizerPlugins,
    ) -> Result<Self> {
        let encoder = match plugins.backbone(Some(dir), device)? {
            Some(b) => b,
            None => Box::new(Self::load_eva(dir, device)?),
        };
        let codebook = plugins.codebook(Some(dir), device)?;
        Self::from_checkpoint_with(dir, device, parts, encoder, codebook)
    }

    /// The checkpoint's EVA encoder (`visual_tokenizer/eva_vitg_psz14.*`).
    pub fn load_eva(dir: &Path, device: Device) -> Result<EvaBackbone> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let eva_path = resolve_file(dir, files::EVA)?;
        let eva_cfg = EvaVitConfig::from_manifest(&manifest.tokenizer);
        EvaBackbone::load(&eva_path, &eva_cfg, device)
    }

    /// As [`from_checkpoint`](Self::from_checkpoint) around an encoder the caller built
    /// (a plugin backbone, or an [`EvaBackbone`] it also uses directly).
    pub fn from_checkpoint_with_encoder(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        encoder: Box<dyn Backbone>,
    ) -> Result<Self> {
        Self::from_checkpoint_with(dir, device, parts, encoder, None)
    }

    /// As [`from_checkpoint_with_encoder`](Self::from_checkpoint_with_encoder) with a
    /// codebook the caller built (`None`: the built-in VQ from `tokenizer_encoder`'s
    /// `quantize.*`; a given codebook ignores those keys).
    pub fn from_checkpoint_with(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        encoder: Box<dyn Backbone>,
        codebook: Option<Box<dyn Codebook>>,
    ) -> Result<Self> {
        let enc_path = resolve_file(dir, files::TOKENIZER_ENCODER)?;
        let sd = checkpoint::load_path(&enc_path)?;
        let src = enc_path.display().to_string();
        Self::from_checkpoint_with_state(dir, device, parts, encoder, codebook, sd, &src)
    }

    /// As [`load`](Self::load) with the `tokenizer_encoder` state dict already read (see
    /// [`from_checkpoint_with_state`](Self::from_checkpoint_with_state)).
    pub fn load_with_state(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        plugins: &TokenizerPlugins,
        sd: StateDict,
        source: &str,
    ) -> Result<Self> {
        let encoder = match plugins.backbone(Some(dir), device)? {
            Some(b) => b,
            None => Box::new(Self::load_eva(dir, device)?),
        };
        let codebook = plugins.codebook(Some(dir), device)?;
        Self::from_checkpoint_with_state(dir, device, parts, encoder, codebook, sd, source)
    }

    /// As [`from_checkpoint_with_encoder`](Self::from_checkpoint_with_encoder) with the
    /// `tokenizer_encoder` state dict already read (`source` names it in errors), so several
    /// stages of one pipeline share one read of the file; its tensors are copied onto `device`.
    pub fn from_checkpoint_with_state(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        encoder: Box<dyn Backbone>,
        codebook: Option<Box<dyn Codebook>>,
        sd: StateDict,
        source: &str,
    ) -> Result<Self> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let t = &manifest.tokenizer;
        let src = source.to_string();
        let (q, rest): (StateDict, StateDict) = sd
            .into_iter()
            .partition(|(k, _)| k.starts_with("quantize."));
        let codebook = match codebook {
            Some(c) => c,
            None => {
                let q: StateDict = q
                    .into_iter()
                    .map(|(k, v)| (k["quantize.".len()..].to_string(), v))
                    .collect();
                let mut vq = VectorQuantizer::new(t.n_code, t.code_dim, device);
                vq.load_state_dict(&q, &src)?;
                Box::new(vq)
            }
        };
        let mut me = Self::with_parts(&manifest, device, encoder, codebook)?;
        checkpoint::load_into(&me.vs, "", &rest, &src, &Default::default())?;
        me.vs.freeze();
        if parts.understanding {
            me.load_understanding(&resolve_file(dir, files::VISUAL_WEIGHT)?)?;
        }
        let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
        if parts.lowres_decoder {
            let (mut vs, m) =
                VQDecoder::load(&resolve_file(dir, files::LOWRES_DECODER)?, &dcfg, device)?;
            vs.freeze();
            me.lowres_decoder = Some((vs, m));
        }
        if parts.highres_decoder {
            let (mut vs, m) =
                HighresVQDecoder::load(&resolve_file(dir, files::HIGHRES_DECODER)?, &dcfg, device)?;
            vs.freeze();
            me.highres_decoder = Some((vs, m));
        }
        tracing::info!(
            dir = %dir.display(),
            encoder = %me.encoder.name(),
            codebook = %me.quantize.name(),
            "visual tokenizer loaded"
        );
        Ok(me)
    }

    /// Load `visual_weight.bin` (`causal_encoder.*`, `vit_proj.*`) as the understanding head.
    pub fn load_understanding(&mut self, path: &Path) -> Result<()> {
        let mut head = UnderstandingHead::new(&self.manifest, self.device);
        let sd = checkpoint::load_path(path)?;
        checkpoint::load_into(
            &head.vs,
            "",
            &sd,
            &path.display().to_string(),
            &Default::default(),
        )?;
        head.vs.freeze();
        self.understanding = Some(head);
        Ok(())
    }

    /// Read and preprocess image files → [B, 3, S, S] on the tokenizer's device.
    pub fn load_images(&self, paths: &[PathBuf]) -> Result<Tensor> {
        let v = paths
            .iter()
            .map(|p| self.processor.load(p))
            .collect::<Result<Vec<_>>>()?;
        if v.is_empty() {
            return Err(Error::invalid("no images given"));
        }
        Ok(Tensor::stack(&v, 0).to_device(self.device))
    }

    /// Encoder patch features [B, N, C] (float32).
    pub fn encoder_features(&self, images: &Tensor) -> Result<Tensor> {
        let s = self.encoder.image_size();
        match images.size().as_slice() {
            [_, 3, h, w] if *h == s && *w == s => {}
            other => {
                return Err(Error::invalid(format!(
                    "images must be [B, 3, {s}, {s}], got {other:?}"
                )))
            }
        }
        let f = self
            .encoder
            .forward(&images.to_device(self.device))
            .map_err(|e| Error::invalid(format!("encoder {}: {e}", self.encoder.name())))?;
        // A backbone built elsewhere (a plugin, another stage's device) may answer on its own
        // device: the selector runs on the tokenizer's.
        Ok(f.to_kind(Kind::Float).to_device(self.device))
    }

    /// Selector on patch features: (log-probs [B, N, 2], decisions [B, N]).
    pub fn select(&self, features: &Tensor, mode: SelectionMode) -> (Tensor, Tensor) {
        let (b, n, _) = features.size3().expect("features [B, N, C]");
        let policy = Tensor::ones([b, n, 1], (Kind::Float, features.device()));
        let log_probs = self.token_predictor.forward(features, &policy);
        let decisions = mode.decide(&log_probs);
        (log_probs, decisions)
    }

    /// The full forward up to the merger (no gradient tracking decisions are made here).
    pub fn trace(&self, images: &Tensor, mode: SelectionMode) -> Result<TokenizerTrace> {
        let features = self.encoder_features(images)?;
        let (log_probs, decisions) = self.select(&features, mode);
        let merged = self.causal_encoder.forward(&features, &decisions);
        Ok(TokenizerTrace {
            features,
            log_probs,
            decisions,
            merged,
        })
    }

    /// Kept rows of `x` [B, N, C] in raster order → ([T, C], per-image counts).
    pub fn gather_kept(x: &Tensor, decisions: &Tensor) -> (Tensor, Vec<i64>) {
        let keep = decisions.gt(0.5); // (B, N)
        let counts: Vec<i64> =
            Vec::<i64>::try_from(keep.sum_dim_intlist(1, false, Kind::Int64)).expect("counts");
        let c = x.size()[2];
        let kept = x.masked_select(&keep.unsqueeze(-1)).reshape([-1, c]); // (T, C)
        (kept, counts)
    }

    /// Raw code ids [T] and counts of a batch of images (`tokenize_image` without offset).
    pub fn codes(
        &self,
        images: &Tensor,
        mode: SelectionMode,
    ) -> Result<(Tensor, Vec<i64>, TokenizerTrace)> {
        let _g = tch::no_grad_guard();
        let tr = self.trace(images, mode)?;
        let (kept, counts) = Self::gather_kept(&tr.merged, &tr.decisions);
        let z = self.encode_task_layer.forward(&kept);
        let ids = self
            .quantize
            .quantize(&z)
            .map_err(|e| Error::invalid(format!("codebook {}: {e}", self.quantize.name())))?;
        Ok((ids, counts, tr))
    }

    /// Images [B, 3, S, S] → per-image counts and LLM ids (with `visual_token_offset`),
    /// in the default selection mode.
    pub fn tokenize(&self, images: &Tensor) -> Result<Tokenized> {
        self.tokenize_with(images, self.selection)
    }

    /// As [`tokenize`](Self::tokenize) with an explicit selection mode.
    pub fn tokenize_with(&self, images: &Tensor, mode: SelectionMode) -> Result<Tokenized> {
        let (ids, counts, _) = self.codes(images, mode)?;
        let off = self.manifest.llm.visual_token_offset;
        let flat: Vec<i64> = Vec::<i64>::try_from(&ids.to_device(Device::Cpu)).expect("ids");
        let mut out = Vec::with_capacity(counts.len());
        let mut pos = 0usize;
        for &n in &counts {
            out.push(
                flat[pos..pos + n as usize]
                    .iter()
                    .map(|i| i + off)
                    .collect(),
            );
            pos += n as usize;
        }
        Ok(Tokenized { counts, ids: out })
    }

    /// The understanding path (`encode_features`): kept merged features through `vit_proj`
    /// → ([T, llm_hidden] for all images concatenated, per-image counts). Uses the
    /// `visual_weight.bin` merger/projector when loaded, else the tokenizer's own.
    pub fn encode_features(
        &self,
        images: &Tensor,
        mode: SelectionMode,
    ) -> Result<(Tensor, Vec<i64>)> {
        let _g = tch::no_grad_guard();
        let features = self.encoder_features(images)?;
        let (_, decisions) = self.select(&features, mode);
        let (merger, proj) = match &self.understanding {
            Some(u) => (&u.causal_encoder, &u.vit_proj),
            None => (&self.causal_encoder, &self.vit_proj),
        };
        let updated = proj.forward(&merger.forward(&features, &decisions)); // (B, N, H)
        let (kept, counts) = Self::gather_kept(&updated, &decisions);
        Ok((kept, counts))
    }

    /// LLM ids (with offset) of several images → (codebook embeddings [T, D], counts).
    /// Ids outside the visual range are refused.
    pub fn embed_ids(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Vec<i64>)> {
        let off = self.manifest.llm.visual_token_offset;
        let k = self.quantize.num_codes();
        let mut flat = Vec::new();
        for (i, v) in ids.iter().enumerate() {
            for &id in v {
                if id < off || id >= off + k {
                    return Err(Error::invalid(format!(
                        "image {i}: id {id} is not a visual id (valid: {off}..{})",
                        off + k
                    )));
                }
                flat.push(id - off);
            }
        }
        let counts = ids.iter().map(|v| v.len() as i64).collect();
        let t = Tensor::from_slice(&flat).to_device(self.device);
        let e = self
            .quantize
            .embed(&t)
            .map_err(|e| Error::invalid(format!("codebook: {e}")))?;
        Ok((e, counts))
    }

    /// Visual ids (with offset) → lowres U-Net condition [B, N, lowres_unet_proj].
    pub fn decode_lowres(&self, ids: &[Vec<i64>]) -> Result<Tensor> {
        let (_, dec) = self
            .lowres_decoder
            .as_ref()
            .ok_or_else(|| Error::invalid("the lowres feature decoder is not loaded"))?;
        let (e, counts) = self.embed_ids(ids)?;
        let _g = tch::no_grad_guard();
        dec.forward(&e, &counts)
    }

    /// Visual ids (with offset) → highres (prompt embeds [B, N, p1 + p2], pooled [B, p2]).
    pub fn decode_highres(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        let (_, dec) = self
            .highres_decoder
            .as_ref()
            .ok_or_else(|| Error::invalid("the highres feature decoder is not loaded"))?;
        let (e, counts) = self.embed_ids(ids)?;
        let _g = tch::no_grad_guard();
        dec.forward(&e, &counts)
    }
}
