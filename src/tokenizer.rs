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
//! [`VisualTokenizer`] is the stage models of the Encoder, SelectorMerger and Quantizer
//! stages (and the feature decoders of the Decoder stage) called in one thread, for parity
//! checks, the demo and tests: every part is loaded by its stage's own loader, and every
//! forward is the stage's own code. Commands and the server run the same stages through
//! [`crate::pipeline::Pipeline`].

use std::path::{Path, PathBuf};

use lavit_decoder::feature_decoder::{FeatureDecoderConfig, HighresVQDecoder, VQDecoder};
use lavit_decoder::stage::embed_visual_ids;
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_encoder::{EncoderStageModel, LaVITImageProcessor};
use lavit_plugin_api::{Backbone, Codebook};
use lavit_quantizer::{load_codebook, QuantizerStageModel, VectorQuantizer};
use lavit_runtime::checkpoint;
use lavit_runtime::layout::check_tokenizer_encoder_keys;
pub use lavit_runtime::layout::{files, resolve_file};
use lavit_runtime::manifest::LavitManifest;
pub use lavit_runtime::plugin_host::{check_geometry, plugins_section, TokenizerPlugins};
use lavit_runtime::{Error, Result};
pub use lavit_selector::stage::{gather_kept, UnderstandingHead};
use lavit_selector::{SelectionMode, SelectorMergerStageModel};
use tch::{nn, Device, Kind, Tensor};

pub use lavit_encoder::load_eva;

/// Which optional parts [`VisualTokenizer::from_checkpoint`] loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadParts {
    /// The understanding merger + `vit_proj` from `language_model/visual_weight.*` (loaded
    /// whenever the folder has it; `true` requires it).
    pub understanding: bool,
    /// `tokenizer_decoder.*` (lowres U-Net condition).
    pub lowres_decoder: bool,
    /// `highres_tokenizer_decoder.*` (highres U-Net condition).
    pub highres_decoder: bool,
    /// The kind of the ViT's, the selector/merger's and the feature decoders' weights
    /// (float32, or bf16 on a GPU); images and features come and go in float32.
    pub kind: Kind,
}

impl LoadParts {
    /// Everything.
    pub fn all() -> Self {
        Self {
            understanding: true,
            lowres_decoder: true,
            highres_decoder: true,
            kind: Kind::Float,
        }
    }
    /// Only what `tokenize` needs.
    pub fn tokenize_only() -> Self {
        Self {
            understanding: false,
            lowres_decoder: false,
            highres_decoder: false,
            kind: Kind::Float,
        }
    }
}

impl Default for LoadParts {
    fn default() -> Self {
        Self::all()
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

/// The dynamic visual tokenizer with its feature decoders: the stage models in one thread.
pub struct VisualTokenizer {
    pub manifest: LavitManifest,
    pub device: Device,
    /// The kind of the ViT's, selector/merger's and feature decoders' weights.
    pub kind: Kind,
    pub processor: LaVITImageProcessor,
    /// The Encoder stage (the built-in EVA ViT or a plugin backbone).
    pub encoder: EncoderStageModel,
    /// The SelectorMerger stage (`token_predictor`, `causal_encoder`, `vit_proj`, and the
    /// understanding head of `visual_weight` when loaded).
    pub selector: SelectorMergerStageModel,
    /// The Quantizer stage (`encode_task_layer`, the codebook).
    pub quantizer: QuantizerStageModel,
    pub lowres_decoder: Option<(nn::VarStore, VQDecoder)>,
    pub highres_decoder: Option<(nn::VarStore, HighresVQDecoder)>,
    /// Default selection mode of `tokenize` (from the manifest; arg-max unless it says
    /// `gumbel`).
    pub selection: SelectionMode,
}

impl VisualTokenizer {
    /// Random weights at the sizes of `manifest` (for training from scratch). Builds the
    /// EVA encoder, the built-in codebook and the lowres feature decoder.
    pub fn new_random(manifest: &LavitManifest, device: Device) -> Result<Self> {
        let t = &manifest.tokenizer;
        let encoder = EvaBackbone::new(&EvaVitConfig::from_manifest(t), device);
        let codebook = VectorQuantizer::new(t.n_code, t.code_dim, device);
        let mut me = Self::with_parts(manifest, device, Box::new(encoder), Box::new(codebook))?;
        let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
        let vs = nn::VarStore::new(device);
        let m = VQDecoder::new(vs.root(), &dcfg);
        me.lowres_decoder = Some((vs, m));
        Ok(me)
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
        let selector = SelectorMergerStageModel::new(manifest, device);
        Ok(Self {
            manifest: manifest.clone(),
            device,
            kind: Kind::Float,
            processor: LaVITImageProcessor::new(manifest.tokenizer.img_size as u32),
            encoder: EncoderStageModel::new(manifest, encoder, device)?,
            selection: selector.selection,
            selector,
            quantizer: QuantizerStageModel::new(manifest, device, quantize)?,
            lowres_decoder: None,
            highres_decoder: None,
        })
    }

    /// Load a LaVIT checkpoint folder (official layout; `manifest.json` optional) with the
    /// stages' strict loaders: `visual_tokenizer/{eva_vitg_psz14, tokenizer_encoder}` always,
    /// the parts in `parts` when asked. Every file may be `.bin` or `.safetensors`.
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
            None => Box::new(load_eva(dir, device, parts.kind)?),
        };
        Self::assemble(dir, device, parts, encoder, plugins)
    }

    /// As [`from_checkpoint`](Self::from_checkpoint) around an encoder the caller built
    /// (a plugin backbone, or an [`EvaBackbone`] it also uses directly).
    pub fn from_checkpoint_with_encoder(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        encoder: Box<dyn Backbone>,
    ) -> Result<Self> {
        Self::assemble(dir, device, parts, encoder, &TokenizerPlugins::none())
    }

    fn assemble(
        dir: &Path,
        device: Device,
        parts: LoadParts,
        encoder: Box<dyn Backbone>,
        plugins: &TokenizerPlugins,
    ) -> Result<Self> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let enc_path = resolve_file(dir, files::TOKENIZER_ENCODER)?;
        let sd = checkpoint::load_path(&enc_path)?;
        let src = enc_path.display().to_string();
        check_tokenizer_encoder_keys(&sd, &src)?;
        if parts.understanding {
            resolve_file(dir, files::VISUAL_WEIGHT)?;
        }
        let codebook = load_codebook(dir, &manifest, device, plugins, &sd, &src)?;
        let selector =
            SelectorMergerStageModel::load_state(dir, &manifest, device, parts.kind, &sd, &src)?;
        let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
        let mut lowres_decoder = None;
        if parts.lowres_decoder {
            let (mut vs, m) = VQDecoder::load(
                &resolve_file(dir, files::LOWRES_DECODER)?,
                &dcfg,
                device,
                parts.kind,
            )?;
            vs.freeze();
            lowres_decoder = Some((vs, m));
        }
        let mut highres_decoder = None;
        if parts.highres_decoder {
            let (mut vs, m) = HighresVQDecoder::load(
                &resolve_file(dir, files::HIGHRES_DECODER)?,
                &dcfg,
                device,
                parts.kind,
            )?;
            vs.freeze();
            highres_decoder = Some((vs, m));
        }
        let me = Self {
            processor: LaVITImageProcessor::new(manifest.tokenizer.img_size as u32),
            encoder: EncoderStageModel::new(&manifest, encoder, device)?,
            selection: selector.selection,
            selector,
            quantizer: QuantizerStageModel::load_state(&manifest, device, codebook, &sd, &src)?,
            lowres_decoder,
            highres_decoder,
            manifest,
            device,
            kind: parts.kind,
        };
        tracing::info!(
            dir = %dir.display(),
            encoder = %me.encoder.backbone.name(),
            codebook = %me.quantizer.quantize.name(),
            "visual tokenizer loaded"
        );
        Ok(me)
    }

    /// Load `visual_weight.bin` (`causal_encoder.*`, `vit_proj.*`) as the understanding head.
    pub fn load_understanding(&mut self, path: &Path) -> Result<()> {
        self.selector.understanding = Some(UnderstandingHead::load(
            &self.manifest,
            path,
            self.device,
            self.kind,
        )?);
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
        self.encoder.patch_features(images)
    }

    /// Selector on patch features: (log-probs [B, N, 2], decisions [B, N]).
    pub fn select(&self, features: &Tensor, mode: SelectionMode) -> Result<(Tensor, Tensor)> {
        self.selector.select(features, mode)
    }

    /// The full forward up to the merger (float32 results; the merger runs in `kind`).
    pub fn trace(&self, images: &Tensor, mode: SelectionMode) -> Result<TokenizerTrace> {
        let features = self.encoder_features(images)?;
        let x = features.to_kind(self.kind);
        let (log_probs, decisions) = self.select(&x, mode)?;
        let merged = self.selector.merge(&x, &decisions)?;
        Ok(TokenizerTrace {
            features,
            log_probs,
            decisions,
            merged,
        })
    }

    /// Kept rows of `x` [B, N, C] in raster order → ([T, C], per-image counts).
    pub fn gather_kept(x: &Tensor, decisions: &Tensor) -> (Tensor, Vec<i64>) {
        gather_kept(x, decisions)
    }

    /// Raw code ids [T] and counts of a batch of images (`tokenize_image` without offset).
    pub fn codes(
        &self,
        images: &Tensor,
        mode: SelectionMode,
    ) -> Result<(Tensor, Vec<i64>, TokenizerTrace)> {
        let _g = tch::no_grad_guard();
        let tr = self.trace(images, mode)?;
        let (kept, counts) = gather_kept(&tr.merged, &tr.decisions);
        let ids = self.quantizer.code_ids(&kept)?;
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
        let flat: Vec<i64> = Vec::<i64>::try_from(&ids.to_device(Device::Cpu))
            .map_err(|e| Error::invalid(format!("code ids: {e}")))?;
        let mut out = Vec::with_capacity(counts.len());
        let mut pos = 0usize;
        for &n in &counts {
            let n = n as usize;
            let part = flat
                .get(pos..pos + n)
                .ok_or_else(|| Error::invalid("the codebook returned too few ids"))?;
            out.push(part.iter().map(|i| i + off).collect());
            pos += n;
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
        let x = self.encoder_features(images)?.to_kind(self.kind);
        let (_, decisions) = self.select(&x, mode)?;
        let per_image = self.selector.understanding_embeds(&x, &decisions)?;
        let counts = per_image.iter().map(|t| t.size()[0]).collect();
        Ok((Tensor::cat(&per_image, 0), counts))
    }

    /// LLM ids (with offset) of several images → (codebook embeddings [T, D], counts).
    /// Ids outside the visual range are refused.
    pub fn embed_ids(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Vec<i64>)> {
        embed_visual_ids(
            self.quantizer.quantize.as_ref(),
            self.manifest.llm.visual_token_offset,
            ids,
            self.device,
        )
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
