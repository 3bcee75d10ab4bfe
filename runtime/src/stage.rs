//! The stage abstraction: what a pipeline stage (Encoder, SelectorMerger, Quantizer, Llm,
//! Decoder) must do, independent of actix. The stage crates (their stage models in
//! `actors/*/src/stage.rs`) implement these traits; [`crate::actors`] runs each one on its own
//! named OS thread pinned to the device that [`Placement`] names.
//!
//! Every call receives tensors already moved to the stage's device (the receiving actor does the
//! move) and returns tensors on that device; the next actor moves them again.
//!
//! The Llm and the Decoder are [`Iterative`]: they hold a running batch and advance every
//! request in it by one step (a token, a denoising step) per call, so requests join and leave
//! between steps (continuous batching); the tokenizer stages take one batch of images per call
//! and the actor concatenates the images of several requests into it.
//!
//! Cancellation: a step receives a [`ShouldStop`] callback; a step that can wait (a test's
//! gate) calls it and gives up when it answers `true`. The actor takes a cancelled request out
//! of the batch before the next step, so it stops within one token or one denoising step.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Tensor};

pub use crate::manifest::SelectionChoice;
use crate::messages::{
    DecodeRequest, LlmEvent, LlmRequest, StepControl, StepReport, TrainBatch, TrainParts,
};

/// The callback a step (or a library decode loop) calls once per token / denoising step. It
/// returns `true` when the loop must stop now (a request was cancelled, its client went away,
/// or the stage must answer a control message). It also counts the call as one unit of
/// progress for every request of the step (`/metrics`, tests).
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
impl<R, E> Iterative<R, E> for Unused {
    fn join(&mut self, _: u64, _: R) -> StageResult<()> {
        self.refuse()
    }
    fn held(&self) -> usize {
        0
    }
    fn plan(&mut self) -> Vec<u64> {
        Vec::new()
    }
    fn step(&mut self, _: ShouldStop, _: &mut dyn FnMut(u64, E)) -> StageResult<()> {
        Ok(())
    }
    fn leave(&mut self, _: u64) {}
}
impl LlmStage for Unused {}
impl DecoderStage for Unused {}

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

/// A stage that holds a running batch and advances every request in it by one step per
/// call (the Llm: one token of every sequence; the Decoder: one denoising step of every
/// image) — continuous batching. The generic actor drives it: a request [`join`]s between two
/// steps (checked then, cheaply), [`plan`] admits waiting requests into the running batch as
/// the stage's budget allows and names the next step's members, [`step`] runs one forward
/// over them and emits what finished (a finished request has left the stage), and a
/// cancelled or failed request [`leave`]s at once.
///
/// [`join`]: Iterative::join
/// [`plan`]: Iterative::plan
/// [`step`]: Iterative::step
/// [`leave`]: Iterative::leave
pub trait Iterative<Req, Ev>: Send {
    /// Take a request (`key`: unique among the requests held). A request that is invalid,
    /// or could never fit the stage's budget, is refused here, before any forward pass.
    fn join(&mut self, key: u64, req: Req) -> StageResult<()>;
    /// Requests held (waiting to be admitted, or running).
    fn held(&self) -> usize;
    /// Whether more requests may join now (else they wait in the stage's mailbox).
    fn has_room(&self) -> bool {
        true
    }
    /// Admit waiting requests as the budget allows; the keys of the next step's members.
    fn plan(&mut self) -> Vec<u64>;
    /// One forward over the planned members. `emit(key, event)` takes what the step gives
    /// a request (a streamed piece, its result); a request whose result is emitted has left.
    /// `should_stop`: see [`ShouldStop`].
    fn step(&mut self, should_stop: ShouldStop, emit: &mut dyn FnMut(u64, Ev)) -> StageResult<()>;
    /// Forget a request (cancelled, or failed with its step), freeing what it holds.
    fn leave(&mut self, key: u64);
}

/// Run one request alone through an [`Iterative`] stage to its end (direct calls, tests):
/// every event it emits, in order. `should_stop` is asked once per step.
pub fn run_alone<R, E, S: Iterative<R, E> + ?Sized>(
    stage: &mut S,
    req: R,
    should_stop: ShouldStop,
) -> StageResult<Vec<E>> {
    const KEY: u64 = u64::MAX;
    stage.join(KEY, req)?;
    let mut events = Vec::new();
    while stage.held() > 0 {
        if stage.plan().is_empty() {
            stage.leave(KEY);
            return Err(StageError::Invalid(
                "the stage cannot admit the request alone".into(),
            ));
        }
        if should_stop() {
            stage.leave(KEY);
            return Err(StageError::Cancelled);
        }
        let r = stage.step(&|| false, &mut |_, e| events.push(e));
        if let Err(e) = r {
            stage.leave(KEY);
            return Err(e);
        }
    }
    Ok(events)
}

/// The LLM: image tokens for a prompt, text for image(s) + question, in one running batch.
pub trait LlmStage: Trainable + Iterative<LlmRequest, LlmEvent> {
    /// KV blocks reserved and in the pool (`/metrics`); `None`: this stage has no pool.
    fn kv_blocks(&self) -> Option<(usize, usize)> {
        None
    }
    /// Tokens generated so far, over every request (`/metrics`).
    fn tokens_generated(&self) -> u64 {
        0
    }
}

/// Feature decoder + U-Net + VAE: visual ids → pixels, the denoising steps of every
/// running image in one U-Net call per latent shape.
pub trait DecoderStage: Trainable + Iterative<DecodeRequest, Tensor> {}

/// How the stages batch the work of concurrent requests (`[pipeline.batching]`): every stage
/// advances all the requests it holds by one step per forward pass (see [`crate::actors`]).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Batching {
    /// Images per step of the Encoder, SelectorMerger and Quantizer (a request with more runs
    /// alone).
    pub max_batch: usize,
    /// Milliseconds a tokenizer stage waits for more images before a step that is not full,
    /// and only while other requests are admitted (a lone request never waits); 0 = never.
    pub max_wait_ms: f64,
    /// Sequences in the Llm's running batch (a request of n images with guidance is 2n, a
    /// caption with k beams k). A request with more is refused, so the default takes the
    /// largest request the front-ends accept ([`MAX_IMAGES_PER_REQUEST`] with guidance).
    pub llm_max_seqs: usize,
    /// Prompt positions the Llm prefills per step; a longer prompt is prefilled in chunks
    /// over several steps, next to the running decodes.
    pub llm_max_prefill_tokens: usize,
    /// The Llm's KV cache in MiB: a pool of blocks allocated by its first step. A request
    /// reserves the blocks of its prompt and its longest answer when it joins the running
    /// batch; while the pool is full it waits, and one that could never fit is refused —
    /// never an out-of-memory.
    pub kv_cache_mib: usize,
    /// Positions per KV block.
    pub kv_block_size: usize,
    /// Images per U-Net call of the Decoder (their guidance rows come on top; a request with
    /// more runs alone).
    pub decoder_max_batch: usize,
}

/// The most images one request may ask for (`lavit generate --num-images`, `lavit eval
/// --images-per-prompt`): the Llm's default running batch takes that many with guidance.
pub const MAX_IMAGES_PER_REQUEST: usize = 64;

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch: 16,
            max_wait_ms: 2.0,
            llm_max_seqs: 2 * MAX_IMAGES_PER_REQUEST,
            llm_max_prefill_tokens: 1024,
            kv_cache_mib: 2048,
            kv_block_size: 16,
            decoder_max_batch: 16,
        }
    }
}

impl Batching {
    /// Range checks, naming `origin` and the key.
    pub fn validate(&self, origin: &str) -> crate::Result<()> {
        let range = |key: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(crate::Error::config(
                    origin,
                    format!("pipeline.batching.{key}"),
                    format!("{v} is out of range {lo}..={hi}"),
                ))
            }
        };
        range("max_batch", self.max_batch, 1, 4096)?;
        range("llm_max_seqs", self.llm_max_seqs, 1, 4096)?;
        range(
            "llm_max_prefill_tokens",
            self.llm_max_prefill_tokens,
            1,
            1 << 20,
        )?;
        range("kv_cache_mib", self.kv_cache_mib, 1, 1 << 20)?;
        range("kv_block_size", self.kv_block_size, 1, 1024)?;
        range("decoder_max_batch", self.decoder_max_batch, 1, 4096)?;
        if !(self.max_wait_ms.is_finite() && (0.0..=1000.0).contains(&self.max_wait_ms)) {
            return Err(crate::Error::config(
                origin,
                "pipeline.batching.max_wait_ms",
                format!("{} is out of range 0..=1000", self.max_wait_ms),
            ));
        }
        Ok(())
    }

    /// [`Batching::max_wait_ms`] as a duration.
    pub fn max_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.max_wait_ms.max(0.0) / 1000.0)
    }
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
