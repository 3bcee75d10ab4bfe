//! The stage abstraction: what a pipeline stage (Encoder, SelectorMerger, Quantizer, Llm,
//! Decoder) must do, independent of actix. The stage crates (their stage models in
//! `actors/*/src/stage.rs`) implement these traits; [`crate::actors`] runs each one on its own
//! named OS thread pinned to the device that [`Placement`] names.
//!
//! Every call receives tensors already moved to the stage's device (the receiving actor does the
//! move) and returns tensors on that device; the next actor moves them again.
//!
//! Cancellation: long loops (LLM decoding, the diffusion loop) receive a [`ShouldStop`] callback
//! and call it once per token or step; when it returns `true` they stop and return
//! [`StageError::Cancelled`] (or any error: the actor reports the request as cancelled anyway).

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Tensor};

pub use crate::manifest::SelectionChoice;
use crate::messages::{
    CaptionOptions, GenerateOptions, StepControl, StepReport, TrainBatch, TrainParts,
};

/// The callback a model's decode loop or diffusion loop calls once per token / step. It returns
/// `true` when the loop must stop now (the request was cancelled or its client went away).
/// It also counts the call as one unit of progress for the request (`/metrics`, tests).
pub type ShouldStop<'a> = &'a dyn Fn() -> bool;

pub use crate::kinds::{ExitStatus, FailureKind, StageError, StageKind, StageResult};

/// Training hooks shared by every stage (stage-1/1b/2 run through the same actors).
/// The default says the stage has nothing to train.
pub trait Trainable {
    /// Forward with autograd on this stage's trainable parts. `batch` arrives on the stage's
    /// device; the stage adds its outputs (and auxiliary loss terms) and returns it.
    fn train_forward(&mut self, batch: TrainBatch) -> StageResult<TrainBatch> {
        Ok(batch)
    }
    /// One optimiser step on this stage's parameters (their gradients were filled by the
    /// backward pass that crossed the stages), then zero the gradients.
    fn optimizer_step(&mut self) -> StageResult<()> {
        Ok(())
    }
    /// Switch between training and inference behaviour (dropout, Gumbel sampling).
    fn set_train(&mut self, _train: bool) {}
    /// An optimiser step under the driver's control (learning rate, or skip when
    /// `ctl.apply` is false: the gradients are only zeroed). The default applies
    /// [`optimizer_step`](Self::optimizer_step).
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        if ctl.apply {
            self.optimizer_step()?;
        }
        Ok(StepReport::default())
    }
    /// The stage's training state as named state dicts (`model`, `optimizer`, …) for a
    /// checkpoint; empty when it has none.
    fn train_state(&mut self) -> StageResult<TrainParts> {
        Ok(Vec::new())
    }
    /// The parameters this stage's optimiser updates (shallow handles on the stage's own
    /// tensors), named uniquely across the graph: the training driver averages their
    /// gradients over data-parallel ranks, broadcasts them from rank 0 before the first step
    /// and clips them globally when the job asks. Empty: the stage trains nothing.
    fn trained_params(&mut self) -> StageResult<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// The data-parallel group of the training run (world size 1 when there is none), for a
    /// stage whose own step needs a collective (the codebook's EMA statistics), and whose
    /// state beyond its trained parameters (buffers) must start as rank 0's. Sent to every
    /// rank's stage before the first step.
    fn set_process_group(
        &mut self,
        _pg: std::sync::Arc<crate::dist::ProcessGroup>,
    ) -> StageResult<()> {
        Ok(())
    }
    /// Load a training state saved by [`train_state`](Self::train_state) (exact resume).
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        if parts.is_empty() {
            Ok(())
        } else {
            Err(StageError::Invalid(
                "this stage has no training state to load".into(),
            ))
        }
    }
}

/// A stage that is not part of a graph (e.g. the stages a training run does not use): it
/// builds instantly, holds no weights, and refuses every request.
pub struct Unused(pub StageKind);

impl Unused {
    fn refuse<T>(&self) -> StageResult<T> {
        Err(StageError::Invalid(format!(
            "this pipeline has no {} stage (its stage set leaves it out)",
            self.0
        )))
    }
}
impl Trainable for Unused {}
impl EncoderStage for Unused {
    fn encode(&mut self, _: &Tensor) -> StageResult<Tensor> {
        self.refuse()
    }
}
impl SelectorMergerStage for Unused {
    fn select_merge(
        &mut self,
        _: &Tensor,
        _: Option<SelectionChoice>,
    ) -> StageResult<(Tensor, Tensor)> {
        self.refuse()
    }
    fn understanding(&mut self, _: &Tensor) -> StageResult<Vec<Tensor>> {
        self.refuse()
    }
}
impl QuantizerStage for Unused {
    fn quantize(&mut self, _: &Tensor, _: &Tensor) -> StageResult<Vec<Vec<i64>>> {
        self.refuse()
    }
}
impl LlmStage for Unused {
    fn caption(
        &mut self,
        _: &Tensor,
        _: &str,
        _: &CaptionOptions,
        _: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>> {
        self.refuse()
    }
    fn decode_text(&mut self, _: &[i64]) -> StageResult<String> {
        self.refuse()
    }
    fn image_tokens(
        &mut self,
        _: &str,
        _: &GenerateOptions,
        _: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        self.refuse()
    }
}
impl DecoderStage for Unused {
    fn decode(
        &mut self,
        _: &[Vec<i64>],
        _: &GenerateOptions,
        _: ShouldStop,
    ) -> StageResult<Tensor> {
        self.refuse()
    }
}

/// EVA ViT: images → patch features.
pub trait EncoderStage: Trainable + Send {
    /// `images` (B, 3, H, W) float, CLIP-normalised → (B, N, C) patch features in raster order (no cls token).
    fn encode(&mut self, images: &Tensor) -> StageResult<Tensor>;
}

/// Token selector + merger.
pub trait SelectorMergerStage: Trainable + Send {
    /// (B, N, C) patch features → (decisions (B, N) float 0/1 with 1 = keep,
    /// merged (B, N, C) at all positions), the decisions taken as `selection` says (a
    /// request's choice), or as the stage's default (the checkpoint manifest's, unless the
    /// pipeline config overrides it) when `None`.
    fn select_merge(
        &mut self,
        patch_features: &Tensor,
        selection: Option<SelectionChoice>,
    ) -> StageResult<(Tensor, Tensor)>;
    /// (B, N, C) → one (T_i, D_llm) tensor per image: the kept merged features through the
    /// understanding merger and `vit_proj` (continuous LLM input for captioning).
    fn understanding(&mut self, patch_features: &Tensor) -> StageResult<Vec<Tensor>>;
}

/// `encode_task_layer` + codebook.
pub trait QuantizerStage: Trainable + Send {
    /// merged (B, N, C) and decisions (B, N) → per image the visual ids of its kept positions in
    /// raster order, offset into the LLM vocabulary.
    fn quantize(&mut self, merged: &Tensor, decisions: &Tensor) -> StageResult<Vec<Vec<i64>>>;
}

/// The LLM.
pub trait LlmStage: Trainable + Send {
    /// Caption / VQA: `prefix` (T, D) continuous visual embeddings, then the question `prompt`.
    /// Calls `on_token(id, text_piece)` once per generated text id; a `false` answer stops the
    /// loop (cancel).
    fn caption(
        &mut self,
        prefix: &Tensor,
        prompt: &str,
        opts: &CaptionOptions,
        on_token: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>>;
    /// [`LlmStage::caption`] for several images with one question, not streamed: one id list
    /// per prefix, in order. The default captions them one by one; a stage that can decode
    /// them as one batch overrides it. `should_stop` is asked once per token.
    fn captions(
        &mut self,
        prefixes: &[Tensor],
        prompt: &str,
        opts: &CaptionOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let mut out = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            out.push(self.caption(p, prompt, opts, &mut |_, _| !should_stop())?);
            if should_stop() {
                return Err(StageError::Cancelled);
            }
        }
        Ok(out)
    }
    /// Text ids → text.
    fn decode_text(&mut self, ids: &[i64]) -> StageResult<String>;
    /// How many positions the LLM reads before generating a caption of `prefix` and `prompt`
    /// (visual embeddings, question tokens and the special tokens around them): the prompt
    /// side of a reply's token usage. `None`: this stage does not say.
    fn caption_prompt_len(&mut self, _prefix: &Tensor, _prompt: &str) -> Option<usize> {
        None
    }
    /// Text → `opts.n` sequences of visual ids (between [IMG] and [/IMG], offset removed or not
    /// as the decoder expects), classifier-free guidance batched.
    fn image_tokens(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>>;
}

/// Feature decoder + U-Net + VAE.
pub trait DecoderStage: Trainable + Send {
    /// Visual ids (one sequence per image) → pixels (n, 3, H, W) float in [0, 1].
    fn decode(
        &mut self,
        ids: &[Vec<i64>],
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Tensor>;
}

/// Which device each stage runs on, and how deep each stage's mailbox is.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// `cpu`, `cuda:N` or `mps` for the EVA encoder.
    #[serde(default = "cpu")]
    pub encoder: String,
    /// Device of the token selector and merger.
    #[serde(default = "cpu")]
    pub selector_merger: String,
    /// Device of the quantizer.
    #[serde(default = "cpu")]
    pub quantizer: String,
    /// Device of the LLM.
    #[serde(default = "cpu")]
    pub llm: String,
    /// Device of the feature decoder, U-Net and VAE.
    #[serde(default = "cpu")]
    pub decoder: String,
    /// Messages each stage's mailbox holds before upstream blocks (backpressure).
    #[serde(default = "default_mailbox")]
    pub mailbox: usize,
}

fn cpu() -> String {
    "cpu".into()
}
fn default_mailbox() -> usize {
    2
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            encoder: cpu(),
            selector_merger: cpu(),
            quantizer: cpu(),
            llm: cpu(),
            decoder: cpu(),
            mailbox: default_mailbox(),
        }
    }
}

impl Placement {
    /// Read a placement file: a TOML table `[placement]` (or the keys at top level).
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let text = crate::fsread::read_config(path)?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parse placement TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> crate::Result<Self> {
        let value: toml::Value = toml::from_str(text)
            .map_err(|e| crate::Error::config(origin, "placement", e.to_string()))?;
        let table = value.get("placement").cloned().unwrap_or(value);
        let p: Placement = table
            .try_into()
            .map_err(|e: toml::de::Error| crate::Error::config(origin, "placement", e.message()))?;
        p.validate(origin)?;
        Ok(p)
    }

    /// Check every stage's device name (syntax only: the devices are checked against the
    /// machine when the graph is spawned, [`Placement::device`]) and the mailbox size.
    pub fn validate(&self, origin: &str) -> crate::Result<()> {
        for kind in StageKind::ALL {
            crate::device::parse_device(self.device_name(kind)).map_err(|e| {
                crate::Error::config(origin, format!("placement.{kind}"), e.to_string())
            })?;
        }
        if self.mailbox == 0 || self.mailbox > 1024 {
            return Err(crate::Error::config(
                origin,
                "placement.mailbox",
                format!("{} is out of range 1..=1024", self.mailbox),
            ));
        }
        Ok(())
    }

    pub fn device_name(&self, kind: StageKind) -> &str {
        match kind {
            StageKind::Encoder => &self.encoder,
            StageKind::SelectorMerger => &self.selector_merger,
            StageKind::Quantizer => &self.quantizer,
            StageKind::Llm => &self.llm,
            StageKind::Decoder => &self.decoder,
        }
    }

    /// The device of a stage, checked against this machine: asking for CUDA (or MPS) where
    /// libtorch sees none is an error, never a silent CPU run.
    pub fn device(&self, kind: StageKind) -> crate::Result<Device> {
        crate::device::resolve_device(self.device_name(kind))
            .map_err(|e| crate::Error::config("placement", kind.name(), e.to_string()))
    }
}
