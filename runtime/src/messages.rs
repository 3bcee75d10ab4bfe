//! Every message that travels between stage actors, in pipeline order.
//!
//! ```text
//! Images ─► Encoder ─PatchFeatures─► SelectorMerger ─MergedFeatures─► Quantizer ─VisualIds─► reply / Decoder
//!                                          └──────UnderstandingEmbeds──► Llm ─text─► reply
//!                               GeneratePrompt ─► Llm ─GeneratedIds─► Decoder ─Pixels─► reply
//! Images ─► Encoder ─► SelectorMerger ─► Quantizer ─GeneratedIds─► Llm (synthesis: the ids are
//!                                                   prompt parts) ─GeneratedIds─► Decoder
//! ```
//!
//! A message travels in an `inflight::Envelope`: the body, the request's `RequestMeta` (id, tracing span,
//! cancellation, reply channel, admission slot) and the mailbox slot it occupies. Tensors move by
//! ownership (`tch::Tensor` is `Send`, not `Sync`); the *receiving* actor moves them to its own
//! device before use, so a sender never needs to know where the next stage runs.
//!
//! Training messages ([`TrainForward`], [`Backward`], [`OptimizerStep`]) go through the same
//! actors, so the training loops and serving share one graph and one placement.

use std::sync::Arc;

use tch::Tensor;

use crate::kinds::{ExitStatus, StageError, StageKind};
use crate::manifest::{GenerationManifest, SelectionChoice};

// ---------------------------------------------------------------------------------------------
// Inference, in pipeline order.

/// Hop 0: Into the Encoder. `pixels`: (B, 3, H, W) float32, CLIP-normalised, any device (usually
/// CPU, decoded from the request).
pub struct Images {
    pub pixels: Tensor,
}

/// Hop 1: Encoder → SelectorMerger. `features`: (B, N, C) float on the encoder's device, patch
/// features in raster order (EVA `return_all_features` without the cls token).
pub struct PatchFeatures {
    pub features: Tensor,
}

/// Hop 2a: SelectorMerger → Quantizer (tokenize / reconstruct). `decisions`: (B, N) float 0/1,
/// 1 = keep; `merged`: (B, N, C) float, all positions; both on the selector's device.
pub struct MergedFeatures {
    pub decisions: Tensor,
    pub merged: Tensor,
}

/// Hop 2b: SelectorMerger → Llm (caption / VQA). One (T_i, D_llm) float tensor per image: kept
/// merged features through the understanding merger and `vit_proj`; selector's device.
pub struct UnderstandingEmbeds {
    pub embeds: Vec<Tensor>,
}

/// Hop 3: Quantizer → reply (tokenize) or Decoder (reconstruct). Per image, its visual ids (kept
/// positions in raster order, offset into the LLM vocabulary). Plain data: no device.
pub struct VisualIds {
    pub ids: Vec<Vec<i64>>,
}

/// Into the Llm (→ image). The prompt as its parts in order (text, and for a multimodal
/// prompt images as their visual ids); options are in the request's task.
pub struct GeneratePrompt {
    pub prompt: Vec<PromptPart>,
}

/// One part of a prompt the Llm reads, in order. The stage turns a prompt into its input
/// embeddings: text through its tokenizer, ids as they are, images between [IMG] and [/IMG].
#[derive(Debug)]
pub enum PromptPart {
    /// Text (tokenized by the Llm stage, without special tokens).
    Text(String),
    /// Ids of the unified vocabulary as they are (text ids, visual ids, special tokens).
    Ids(Vec<i64>),
    /// An image as its discrete visual ids (with the vocabulary offset), between [IMG] and
    /// [/IMG].
    ImageIds(Vec<i64>),
    /// An image as continuous embeddings (T, hidden) (understanding), between the [IMG] and
    /// [/IMG] embeddings.
    ImageEmbeds(Tensor),
}

/// What the Llm stage is asked for (one request; its sequences run in the stage's batch).
pub enum LlmRequest {
    /// Image tokens, sampled with classifier-free guidance (eq. 7).
    ImageTokens {
        /// The conditional prompt, without the trailing [IMG] (the stage appends it).
        prompt: Vec<PromptPart>,
        /// The unconditional prompt of guidance, without the trailing [IMG]: empty for the
        /// official text → image rule ([IMG] alone).
        uncond: Vec<PromptPart>,
        opts: GenerateOptions,
    },
    /// Text: one answer per prompt (caption / VQA), greedy, sampled or beam search.
    Text {
        prompts: Vec<Vec<PromptPart>>,
        opts: CaptionOptions,
        /// Emit each new piece of prompt 0's answer as it is generated ([`LlmEvent::Token`];
        /// with beams the text comes in one piece at the end).
        stream: bool,
    },
}

/// What an Llm step gives a request.
#[derive(Debug)]
pub enum LlmEvent {
    /// A streamed piece of the answer.
    Token(TokenEvent),
    /// The result (the request has left the stage).
    Done(LlmOutput),
}

/// The result of an [`LlmRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum LlmOutput {
    /// `opts.n` sequences of visual ids (offset into the vocabulary; [IMG]/[/IMG] dropped).
    ImageTokens(Vec<Vec<i64>>),
    /// One answer per prompt, in order.
    Text(Vec<TextAnswer>),
}

/// One generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextAnswer {
    /// Generated ids, without the EOS.
    pub ids: Vec<i64>,
    pub text: String,
    /// Positions the LLM read before generating (visual embeddings, question, special
    /// tokens): the prompt side of a reply's token usage.
    pub prompt_tokens: usize,
}

/// What the Decoder stage is asked for: one image per id sequence.
pub struct DecodeRequest {
    pub ids: Vec<Vec<i64>>,
    pub opts: GenerateOptions,
}

/// Hop 4: Llm → Decoder. `opts.n` sequences of generated visual ids. Plain data: no device.
pub struct GeneratedIds {
    pub ids: Vec<Vec<i64>>,
}

/// Hop 5: Decoder → reply. `images`: (n, 3, H, W) float32 in [0, 1] on the CPU.
pub struct Pixels {
    pub images: Tensor,
}

/// A message body on its way into a stage: one of the hops above. The generic stage actor
/// ([`crate::actors`]) carries any of them; each stage takes the ones its trait reads.
pub enum Payload {
    Images(Images),
    PatchFeatures(PatchFeatures),
    MergedFeatures(MergedFeatures),
    UnderstandingEmbeds(UnderstandingEmbeds),
    GeneratePrompt(GeneratePrompt),
    GeneratedIds(GeneratedIds),
}

impl Payload {
    /// The hop's name (for errors).
    pub fn name(&self) -> &'static str {
        match self {
            Payload::Images(_) => "images",
            Payload::PatchFeatures(_) => "patch features",
            Payload::MergedFeatures(_) => "merged features",
            Payload::UnderstandingEmbeds(_) => "understanding embeddings",
            Payload::GeneratePrompt(_) => "a prompt",
            Payload::GeneratedIds(_) => "visual ids",
        }
    }
}

/// One part of a multimodal synthesis prompt (the official `multimodal_synthesis`: a list of
/// `(image, 'image')` and `(text, 'text')` parts), in order.
#[derive(Clone, Debug, PartialEq)]
pub enum SynthesisPart {
    /// Text, tokenized by the Llm stage without special tokens.
    Text(String),
    /// The request's next image (its images are taken in order): its visual ids, as the
    /// tokenizer stages give them, without [IMG]/[/IMG] around them.
    Image,
}

/// Options of a caption / VQA request.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptionOptions {
    /// Most text tokens to generate.
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = no top-k filter.
    pub top_k: usize,
    /// 1 = no nucleus filter.
    pub top_p: f64,
    pub seed: u64,
    /// EOS is forbidden before this many new tokens.
    pub min_new_tokens: usize,
    /// Beams: more than 1 is beam search (deterministic; the sampling options are ignored,
    /// and the text arrives in one piece at the end instead of token by token).
    pub num_beams: usize,
    /// HF repetition penalty over the generated tokens (1 = off).
    pub repetition_penalty: f64,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        CaptionOptions {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_new_tokens: 0,
            num_beams: 1,
            repetition_penalty: 1.0,
        }
    }
}

/// Options of an image-generation request (LLM sampling + pixel decoding).
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Images to generate (one batch through the LLM and the U-Net).
    pub n: usize,
    pub seed: u64,
    /// LLM classifier-free guidance α.
    pub llm_guidance: f64,
    /// Decoder (U-Net) guidance.
    pub guidance: f64,
    /// Diffusion steps.
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    /// LLM top-k for visual tokens (0 = greedy).
    pub top_k: usize,
    pub temperature: f64,
    /// LLM nucleus filter for visual tokens (1 = off).
    pub top_p: f64,
    /// Image-token length limits; `None`: the checkpoint manifest's.
    pub max_tokens: Option<usize>,
    pub min_tokens: Option<usize>,
}

impl GenerateOptions {
    /// A checkpoint's recommended settings: its manifest's `generation` section, for the
    /// highres decoder (`ddim_steps`, `decoder_guidance`) or the lowres one
    /// (`lowres_ddim_steps`, `lowres_decoder_guidance`), drawing at `native` px; one image,
    /// seed 0, no top-p, the manifest's token limits.
    pub fn recommended(g: &GenerationManifest, lowres: bool, native: usize) -> Self {
        let (steps, guidance) = if lowres {
            (g.lowres_ddim_steps, g.lowres_decoder_guidance)
        } else {
            (g.ddim_steps, g.decoder_guidance)
        };
        GenerateOptions {
            n: 1,
            seed: 0,
            llm_guidance: g.llm_guidance,
            guidance,
            steps: steps.max(1) as usize,
            width: native,
            height: native,
            top_k: g.top_k.max(0) as usize,
            temperature: 1.0,
            top_p: 1.0,
            max_tokens: None,
            min_tokens: None,
        }
    }
}

/// The official LaVIT-7B-v2 settings ([`GenerationManifest::default`]) at its highres
/// decoder's 1024 px.
impl Default for GenerateOptions {
    fn default() -> Self {
        Self::recommended(&GenerationManifest::default(), false, 1024)
    }
}

/// What a request asks for; decides each stage's next hop and the final reply.
#[derive(Clone, Debug)]
pub enum Task {
    /// Images → visual ids (Encoder → SelectorMerger → Quantizer).
    Tokenize,
    /// [`Task::Tokenize`] with the keep/drop decisions taken as `selection` says (`None`:
    /// the SelectorMerger stage's default), returning also the selector's keep decision for
    /// every patch (to show which patches became tokens).
    Select { selection: Option<SelectionChoice> },
    /// Image + question → text (Encoder → SelectorMerger → Llm).
    Caption {
        prompt: String,
        opts: CaptionOptions,
    },
    /// Every image of the batch + the same question → one text each, decoded as one batch
    /// in the Llm (Encoder → SelectorMerger → Llm; not streamed).
    Captions {
        prompt: String,
        opts: CaptionOptions,
    },
    /// Text → image tokens → pixels (Llm → Decoder).
    Generate { opts: GenerateOptions },
    /// Image and text parts → image tokens → pixels (Encoder → SelectorMerger → Quantizer →
    /// Llm → Decoder), as the official `multimodal_synthesis`: the images (the request's
    /// input, one per [`SynthesisPart::Image`], in order) become visual ids in the tokenizer
    /// stages, batched with other work; the Llm reads the parts' ids concatenated, then
    /// [IMG], and guides with [IMG] alone as the unconditional prompt.
    Synthesize {
        parts: Vec<SynthesisPart>,
        opts: GenerateOptions,
    },
    /// Image → tokens → pixels (Encoder → SelectorMerger → Quantizer → Decoder).
    Reconstruct { opts: GenerateOptions },
}

impl Task {
    /// The stages a request of this task visits, in order: the graph's topology is this
    /// table, not code in the actors. A request enters at the stage its input is for (images:
    /// the Encoder; a prompt or image embeddings: the Llm) and leaves after the last.
    pub fn route(&self) -> &'static [StageKind] {
        use StageKind::*;
        match self {
            Task::Tokenize | Task::Select { .. } => &[Encoder, SelectorMerger, Quantizer],
            Task::Caption { .. } | Task::Captions { .. } => &[Encoder, SelectorMerger, Llm],
            Task::Generate { .. } => &[Llm, Decoder],
            Task::Synthesize { .. } => &[Encoder, SelectorMerger, Quantizer, Llm, Decoder],
            Task::Reconstruct { .. } => &[Encoder, SelectorMerger, Quantizer, Decoder],
        }
    }

    /// The stage after `kind` on this task's route (`None`: `kind` is the last, it answers).
    pub fn next_after(&self, kind: StageKind) -> Option<StageKind> {
        let r = self.route();
        let i = r.iter().position(|&k| k == kind)?;
        r.get(i + 1).copied()
    }

    pub fn name(&self) -> &'static str {
        match self {
            Task::Tokenize => "tokenize",
            Task::Select { .. } => "select",
            Task::Caption { .. } => "caption",
            Task::Captions { .. } => "captions",
            Task::Generate { .. } => "generate",
            Task::Synthesize { .. } => "synthesize",
            Task::Reconstruct { .. } => "reconstruct",
        }
    }
}

/// What a finished request returns.
#[derive(Debug)]
pub enum Output {
    VisualIds(Vec<Vec<i64>>),
    /// [`Task::Select`]: per image its visual ids and its keep mask over the N patches in
    /// raster order (`ids[i].len()` = the number of `true` in `keep[i]`).
    Selection {
        ids: Vec<Vec<i64>>,
        keep: Vec<Vec<bool>>,
    },
    /// `prompt_tokens`: [`TextAnswer::prompt_tokens`].
    Text {
        ids: Vec<i64>,
        text: String,
        prompt_tokens: Option<usize>,
    },
    /// [`Task::Captions`]: per image, in order, its generated ids and text.
    Texts(Vec<(Vec<i64>, String)>),
    /// (n, 3, H, W) float32 in [0, 1] on the CPU, and the visual ids each image was drawn
    /// from.
    Pixels {
        images: Tensor,
        ids: Vec<Vec<i64>>,
    },
}

/// A streamed caption token (text piece and id), sent as it is generated.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    pub id: i64,
    pub text: String,
}

pub type Reply = tokio::sync::oneshot::Sender<Result<Output, StageError>>;

// ---------------------------------------------------------------------------------------------
// Training, through the same actors.

/// The name of a tensor or loss term in a [`TrainBatch`], declared once as a constant by
/// the stage code that writes or reads it ([`train_keys`] for the stage-1 stages,
/// `lavit_llm::train::keys`, `lavit_decoder::train::keys`): a batch is keyed by these, never
/// by a string made up at the call site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrainKey(&'static str);

impl TrainKey {
    pub const fn new(name: &'static str) -> Self {
        TrainKey(name)
    }
    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for TrainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Names of the tensors and loss terms a stage-1 [`TrainBatch`] carries between the stages
/// (Encoder → SelectorMerger → Quantizer → Decoder).
pub mod train_keys {
    use super::TrainKey;
    /// In (Encoder): images (B, 3, S, S), CLIP-normalised.
    pub const IMAGES: TrainKey = TrainKey::new("images");
    /// Encoder → SelectorMerger → Quantizer → Decoder: patch features (B, N, C), no grad
    /// (frozen); the Decoder's reconstruction target.
    pub const PATCH_FEATURES: TrainKey = TrainKey::new("patch_features");
    /// In (SelectorMerger): the step's Gumbel seed (0-d int64, the u64's bits).
    pub const GUMBEL_SEED: TrainKey = TrainKey::new("gumbel_seed");
    /// In (SelectorMerger): the Gumbel temperature (0-d double).
    pub const TAU: TrainKey = TrainKey::new("tau");
    /// In (Quantizer): 1 = quantise with the codebook, 0 = l2-normalised codes (0-d int64).
    pub const QUANTIZE: TrainKey = TrainKey::new("quantize");
    /// SelectorMerger → Quantizer → out: keep decisions (B, N), hard, with grad.
    pub const DECISIONS: TrainKey = TrainKey::new("decisions");
    /// SelectorMerger → Quantizer: merged features (B, N, C), with grad.
    pub const MERGED: TrainKey = TrainKey::new("merged");
    /// Quantizer → Decoder: the kept tokens' codes, padded per image (B, L, D), scaled by the
    /// keep decisions (the straight-through factor that carries the selector's gradient).
    pub const CODES: TrainKey = TrainKey::new("codes");
    /// Quantizer → Decoder: 1 where `codes` holds a kept token (B, L).
    pub const CODES_MASK: TrainKey = TrainKey::new("codes_mask");
    /// Out (Decoder): mean cosine of reconstruction and features (0-d, no grad).
    pub const COS: TrainKey = TrainKey::new("cos");
    /// Stage 2, in (the SelectorMerger stage's projector, or the Llm stage when no projector
    /// is trained): the continuous blocks' features before `vit_proj` (ΣT, C).
    pub const CONT_FEATURES: TrainKey = TrainKey::new("cont_features");
    /// Stage 2, SelectorMerger → Llm: those blocks through `vit_proj` (ΣT, hidden), with grad.
    pub const CONT_EMBEDS: TrainKey = TrainKey::new("cont_embeds");
    /// Out (Quantizer): the kept tokens' codes before quantisation (T, D), no grad.
    pub const CODES_Z: TrainKey = TrainKey::new("codes_z");
    /// Out (Quantizer, when quantising): code ids (T,).
    pub const IDS: TrainKey = TrainKey::new("ids");
    /// Loss terms: reconstruction (Decoder), kept ratio and confidence (SelectorMerger),
    /// codebook/commitment (Quantizer).
    pub const LOSS_RECONSTRUCTION: TrainKey = TrainKey::new("reconstruction");
    pub const LOSS_RATIO: TrainKey = TrainKey::new("ratio");
    pub const LOSS_CONFIDENCE: TrainKey = TrainKey::new("confidence");
    pub const LOSS_COMMITMENT: TrainKey = TrainKey::new("commitment");
    /// In (optional, data-parallel training): this rank's first row in the step's global
    /// batch and the global batch's row count (0-d int64 each). A stage that draws per-row
    /// randomness (Gumbel noise, diffusion noise and timesteps) draws it for the global batch
    /// and keeps its own rows, so N ranks draw what one rank with the whole batch draws.
    pub const ROW_OFFSET: TrainKey = TrainKey::new("row_offset");
    pub const GLOBAL_ROWS: TrainKey = TrainKey::new("global_rows");
}

/// A training micro-batch as it flows through the stages with autograd on. Each stage adds its
/// outputs under its own keys and may add loss terms; the last stage of the route computes the
/// loss. Tensors carry their autograd graph across threads (libtorch's engine is thread-safe);
/// backward runs once, then every stage gets an [`OptimizerStep`].
pub struct TrainBatch {
    /// Named tensors: `images` (B,3,H,W), `patch_features` (B,N,C, detached: the encoder is
    /// frozen), `decisions` (B,N), `merged` (B,N,C), `quantized` (B,N,D), `reconstruction`
    /// (B,N,C), … on the device of the stage that wrote them.
    pub tensors: std::collections::BTreeMap<TrainKey, Tensor>,
    /// Scalar loss terms added by stages (e.g. `ratio`, `commitment`, `reconstruction`).
    pub losses: Vec<(TrainKey, Tensor)>,
    /// The stages this batch still has to visit, in order.
    pub route: Vec<StageKind>,
}

impl TrainBatch {
    /// Remove a tensor a stage consumes; a clear error naming the stage when it is missing.
    pub fn take(&mut self, key: TrainKey, kind: StageKind) -> Result<Tensor, StageError> {
        self.tensors.remove(&key).ok_or_else(|| {
            StageError::Invalid(format!("stage {kind}: the training batch has no `{key}`"))
        })
    }
    /// Remove the loss term `key` a stage added; a clear error naming the stage when absent.
    pub fn take_loss(&mut self, key: TrainKey, kind: StageKind) -> Result<Tensor, StageError> {
        let i = self
            .losses
            .iter()
            .position(|(k, _)| *k == key)
            .ok_or_else(|| {
                StageError::Invalid(format!("stage {kind}: returned no `{key}` loss"))
            })?;
        Ok(self.losses.swap_remove(i).1)
    }
    /// A tensor (usually a 0-d setting) a stage reads without consuming it.
    pub fn get(&self, key: TrainKey, kind: StageKind) -> Result<&Tensor, StageError> {
        self.tensors.get(&key).ok_or_else(|| {
            StageError::Invalid(format!("stage {kind}: the training batch has no `{key}`"))
        })
    }
    /// This batch's rows in the step's global batch: `(offset, global)` from
    /// [`train_keys::ROW_OFFSET`] and [`train_keys::GLOBAL_ROWS`], or `(0, local)` when the
    /// batch names none (one rank). An error when the rows do not fit.
    pub fn rows(&self, local: i64, kind: StageKind) -> Result<(i64, i64), StageError> {
        let read = |k: TrainKey| -> Result<Option<i64>, StageError> {
            self.tensors
                .get(&k)
                .map(|t| {
                    t.f_int64_value(&[]).map_err(|e| {
                        StageError::Invalid(format!("stage {kind}: training batch `{k}`: {e}"))
                    })
                })
                .transpose()
        };
        let offset = read(train_keys::ROW_OFFSET)?.unwrap_or(0);
        let global = read(train_keys::GLOBAL_ROWS)?.unwrap_or(offset + local);
        if offset < 0 || local < 0 || offset.checked_add(local).is_none_or(|e| e > global) {
            return Err(StageError::Invalid(format!(
                "stage {kind}: rows {offset}..{offset}+{local} do not fit a global batch of {global}"
            )));
        }
        Ok((offset, global))
    }
    /// Name this batch's rows in the step's global batch (see [`rows`](Self::rows)).
    pub fn set_rows(&mut self, offset: i64, global: i64) {
        self.tensors
            .insert(train_keys::ROW_OFFSET, tch::Tensor::from(offset));
        self.tensors
            .insert(train_keys::GLOBAL_ROWS, tch::Tensor::from(global));
    }
    pub fn new(route: Vec<StageKind>) -> Self {
        TrainBatch {
            tensors: Default::default(),
            losses: Vec::new(),
            route,
        }
    }
    /// The sum of all loss terms, on `device` (a scalar).
    pub fn total_loss(&self, device: tch::Device) -> Option<Tensor> {
        self.losses
            .iter()
            .map(|(_, l)| l.to_device(device))
            .reduce(|a, b| a + b)
    }
}

/// Training step 1: forward with grad along `batch.route`; the last stage answers with the
/// batch (losses attached).
pub struct TrainForward {
    pub batch: TrainBatch,
    pub reply: tokio::sync::oneshot::Sender<Result<TrainBatch, StageError>>,
}

/// Training step 2: run backward from `loss` on the stage that owns the loss's device (the
/// autograd graph spans stages). Answered with the loss value.
pub struct Backward {
    pub loss: Tensor,
}

/// Training step 3: each trainable stage steps its optimiser and zeroes its gradients.
pub struct OptimizerStep;

/// What an optimiser step does this time (the driver's schedule and NaN policy decide).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepControl {
    /// Learning rate of this step.
    pub lr: f64,
    /// `false`: skip the update (a non-finite loss), only zero the gradients.
    pub apply: bool,
    /// The optimiser step's index (0-based), e.g. for an EMA warm-up.
    pub step: i64,
}

/// What a stage reports after its optimiser step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Global gradient norm before clipping, when the stage measured it.
    pub grad_norm: Option<f64>,
}

/// Training step 3 with the driver's control (learning rate, apply or skip).
pub struct OptimizerStepWith(pub StepControl);

/// Named state dicts of a stage's training state (e.g. `model`, `optimizer`, `ema`), as a
/// checkpoint stores them.
pub type TrainParts = Vec<(String, crate::checkpoint::StateDict)>;

/// Ask a stage for its training state (for a checkpoint or an export), on its own thread.
pub struct GetTrainState;

/// Ask a stage for the parameters its optimiser updates (shallow handles), for the
/// driver's gradient averaging, broadcast and global clipping.
pub struct GetTrainedParams;

/// Hand a stage the data-parallel group of the training run it is part of.
pub struct SetProcessGroup(pub std::sync::Arc<crate::dist::ProcessGroup>);

/// Load a training state (a resumed checkpoint) into a stage, on its own thread.
pub struct SetTrainState(pub TrainParts);

/// Switch a stage between training and inference behaviour.
pub struct SetTrain(pub bool);

/// The answer channel of a control message.
pub type Answer<T> = tokio::sync::oneshot::Sender<Result<T, StageError>>;

/// What a stage reports of itself (the `Stats` control message).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageStats {
    /// Requests the stage holds (waiting for a step or in the running batch).
    pub held: usize,
    /// Messages waiting in its mailbox.
    pub queued: usize,
    /// Steps run so far.
    pub steps: u64,
}

/// Control messages: they overtake the data queued in a stage's mailbox (the stage's
/// scheduler loop reads them first, between two steps). Training goes through here too, so
/// training and serving share one graph of the same actors.
pub enum Control {
    /// Stop taking work (exit status `Quit`); what it holds and what is queued fail as closed.
    Quit,
    /// Report [`StageStats`].
    Stats(Answer<StageStats>),
    SetTrain(SetTrain),
    TrainForward(TrainForward),
    Backward(Backward, Answer<f64>),
    OptimizerStep(OptimizerStep, Answer<()>),
    OptimizerStepWith(OptimizerStepWith, Answer<StepReport>),
    GetTrainState(GetTrainState, Answer<TrainParts>),
    GetTrainedParams(GetTrainedParams, Answer<Vec<(String, Tensor)>>),
    SetProcessGroup(SetProcessGroup, Answer<()>),
    SetTrainState(SetTrainState, Answer<()>),
}

/// Shared, cheap clone of the stages' exit statuses (for health and tests).
pub type ExitBoard = Arc<dashmap::DashMap<StageKind, ExitStatus>>;
