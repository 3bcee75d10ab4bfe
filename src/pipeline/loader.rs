//! The real stages of a LaVIT checkpoint folder, each built by its own stage crate's loader
//! on its stage's own thread and device: [`lavit_encoder::EncoderStageModel`],
//! [`lavit_selector::SelectorMergerStageModel`], [`lavit_quantizer::QuantizerStageModel`],
//! [`lavit_llm::LlmStageModel`] and [`lavit_decoder::stage::DecoderStageModel`].
//!
//! `tokenizer_encoder` (selector/merger/projector, task layer, codebook) is read from disk
//! once per pipeline and shared by the stage builders, each of which copies its own keys onto
//! its device; every key of the file must belong to a stage. The backbone and the codebook
//! are the built-in ones or plugins ([`TokenizerPlugins`]), and so is the pixel decoder's
//! denoiser (the folder's U-Net, or `[plugins.denoiser]`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lavit_decoder::pixel_decoder::Resolution;
use lavit_decoder::stage::{resolve_resolution, DecoderGeometry, DecoderStageModel};
use lavit_encoder::EncoderStageModel;
use lavit_llm::LlmStageModel;
use lavit_quantizer::{load_codebook, QuantizerStageModel};
use lavit_runtime::actors::StageBuilders;
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::layout::{check_tokenizer_encoder_keys, files, resolve_file};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::GenerateOptions;
use lavit_runtime::plugin_host::TokenizerPlugins;
use lavit_runtime::stage::*;
use lavit_selector::{SelectionMode, SelectorMergerStageModel};
use tch::{Device, Kind};

use super::{ModelInfo, PipelineConfig};

/// One read of a checkpoint file (CPU tensors) shared by the stage builders of a pipeline.
/// (`tch::Tensor` is `Send` but not `Sync`, hence the mutex; a stage holds it only to take
/// shallow copies, then copies the tensors onto its device.)
#[derive(Clone)]
struct SharedState {
    sd: Arc<Mutex<StateDict>>,
    source: Arc<str>,
}

impl SharedState {
    fn load(path: &Path) -> lavit_runtime::Result<Self> {
        let sd = checkpoint::load_path(path)?;
        let source = path.display().to_string();
        check_tokenizer_encoder_keys(&sd, &source)?;
        Ok(Self {
            sd: Arc::new(Mutex::new(sd)),
            source: source.into(),
        })
    }
    /// Shallow copies of the tensors (no data copied).
    fn get(&self) -> StateDict {
        let sd = self.sd.lock().unwrap_or_else(|e| e.into_inner());
        sd.iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect()
    }
}

/// The precision `dtype` names for a stage on `device` (`auto`: bf16 on CUDA, else f32).
fn kind_for(dtype: &str, device: Device) -> lavit_runtime::Result<Kind> {
    match dtype {
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" => Ok(Kind::Float),
        other => lavit_runtime::device::resolve_dtype(other, device),
    }
}

/// Builders for the real stages of `cfg.checkpoint` in `cfg.stages` (the others are
/// [`Unused`]), with the plugins `cfg.plugins` names; each loads its weights on its own
/// thread and device.
pub fn builders(cfg: &PipelineConfig) -> crate::Result<(StageBuilders, ModelInfo)> {
    let dir = cfg.checkpoint.as_deref().ok_or_else(|| {
        crate::Error::Invalid(
            "the pipeline config names no checkpoint folder (pipeline.checkpoint or --checkpoint)"
                .into(),
        )
    })?;
    let set = &cfg.stages;
    let m = LavitManifest::for_checkpoint(dir)?;
    let plugins = TokenizerPlugins::load(&cfg.plugins)?;
    let tokenizer = set.has(StageKind::Encoder);
    if tokenizer && plugins.config().backbone.is_none() {
        resolve_file(dir, files::EVA)?;
    }
    let needs_codebook = tokenizer || set.has(StageKind::Decoder);
    // Read once, shared by the SelectorMerger, Quantizer and Decoder builders.
    let enc_state = if needs_codebook {
        Some(SharedState::load(&resolve_file(
            dir,
            files::TOKENIZER_ENCODER,
        )?)?)
    } else {
        None
    };
    let resolution = resolve_resolution(&cfg.pixel_decoding, dir)?;
    let geometry = if set.has(StageKind::Decoder) {
        DecoderGeometry::read(dir, resolution)?
    } else {
        DecoderGeometry {
            native: m.tokenizer.img_size,
            multiple: 1,
            max_steps: i64::MAX,
        }
    };
    let g = &m.generation;
    let lowres = resolution == Resolution::Lowres;
    let native = geometry.native as usize;
    let info = ModelInfo {
        image_size: m.tokenizer.img_size,
        default_size: (native, native),
        size_multiple: geometry.multiple as usize,
        max_steps: usize::try_from(geometry.max_steps).unwrap_or(usize::MAX),
        generate_defaults: GenerateOptions::recommended(g, lowres, native),
        selection: cfg.selection_for(&m.tokenizer),
        selection_note: m.tokenizer.selection_note.clone(),
        synthesis: super::SynthesisInfo {
            llm_guidance: g.synthesis_llm_guidance,
            tokens_per_image: m.tokenizer.num_patches().max(0) as usize,
            context: if set.has(StageKind::Llm) {
                let c = lavit_llm::config::LlamaConfig::from_json_file(
                    &dir.join("language_model").join("config.json"),
                )?;
                Some(c.max_position_embeddings.max(0) as usize)
            } else {
                None
            },
            max_new_tokens: g.t2i_max_new_tokens.max(0) as usize,
        },
    };
    let d: PathBuf = dir.to_path_buf();
    let dtype = cfg.dtype.clone();
    let mut b = StageBuilders::unused();
    if let (true, Some(s)) = (tokenizer, enc_state.clone()) {
        let (d1, p1, dt) = (d.clone(), plugins.clone(), dtype.clone());
        b.encoder = Box::new(move |dev| {
            let kind = kind_for(&dt, dev)?;
            Ok(Box::new(EncoderStageModel::load(&d1, dev, kind, &p1)?) as Box<dyn EncoderStage>)
        });
        let (d2, m2, s2, dt2) = (d.clone(), m.clone(), s.clone(), dtype.clone());
        let selection = SelectionMode::from(info.selection);
        b.selector_merger = Box::new(move |dev| {
            let sd = s2.get();
            let mut st = SelectorMergerStageModel::load_state(
                &d2,
                &m2,
                dev,
                kind_for(&dt2, dev)?,
                &sd,
                &s2.source,
            )?;
            st.selection = selection;
            Ok(Box::new(st) as Box<dyn SelectorMergerStage>)
        });
        let (d3, m3, p3) = (d.clone(), m.clone(), plugins.clone());
        b.quantizer = Box::new(move |dev| {
            let sd = s.get();
            let codebook = load_codebook(&d3, &m3, dev, &p3, &sd, &s.source)?;
            let st = QuantizerStageModel::load_state(&m3, dev, codebook, &sd, &s.source)?;
            Ok(Box::new(st) as Box<dyn QuantizerStage>)
        });
    }
    if set.has(StageKind::Llm) {
        let (d4, dt, batching) = (d.clone(), dtype.clone(), cfg.batching.clone());
        let quantize = cfg.quant_mode();
        b.llm = Box::new(move |dev| {
            let kind = kind_for(&dt, dev)?;
            let st =
                LlmStageModel::load_quantized(&d4, dev, kind, quantize)?.with_batching(&batching);
            Ok(Box::new(st) as Box<dyn LlmStage>)
        });
    }
    if let (true, Some(s)) = (set.has(StageKind::Decoder), enc_state) {
        let (d5, m5, p5, batching) = (d, m, plugins, cfg.batching.clone());
        b.decoder = Box::new(move |dev| {
            let sd = s.get();
            let codebook = load_codebook(&d5, &m5, dev, &p5, &sd, &s.source)?;
            let kind = kind_for(&dtype, dev)?;
            let denoiser = p5.denoiser(Some(&d5.join(resolution.folder())), dev)?;
            let st = DecoderStageModel::load(&d5, dev, codebook, denoiser, resolution, kind)?
                .with_batching(&batching);
            Ok(Box::new(st) as Box<dyn DecoderStage>)
        });
    }
    Ok((b, info))
}
