//! The LLM as a pipeline stage: a thin adapter from [`LlamaForCausalLM`] and the generation
//! functions of this crate to [`lavit_runtime::stage::LlmStage`] (the actor that runs it lives
//! in `lavit_runtime::actors`; this file knows no actor), and, when built by the stage-2 trainer,
//! the same model trained on the same thread and device ([`crate::train::LlmTrainer`]).
//!
//! [`LlmStageModel::load`] is the one loader of a checkpoint's `language_model/`: strict keys,
//! the unified vocabulary of the manifest checked against the model and the tokenizer.
//!
//! The stage serves every request from one running batch ([`crate::batch::Engine`]): the
//! actor takes a cancelled request out of it before the next step, so it stops within one
//! token. The direct calls ([`LlmStageModel::image_tokens`], [`LlmStageModel::caption`],
//! [`LlmStageModel::captions`]) run one request alone through the same batch.

use std::path::Path;

use lavit_runtime::manifest::{LavitManifest, QuantMode};
use std::collections::HashMap;

use lavit_runtime::messages::{
    CaptionOptions, GenerateOptions, LlmEvent, LlmOutput, LlmRequest, PromptPart, StepControl,
    StepReport, TextAnswer, TokenEvent, TrainBatch, TrainParts,
};
use lavit_runtime::stage::{
    run_alone, Batching, Iterative, LlmStage, ShouldStop, StageError, StageKind, StageResult,
    Trainable,
};
use lavit_runtime::Error;
use tch::{nn, Device, Kind, Tensor};

use crate::batch::{Engine, EngineLimits, Finished};
use crate::generate::{ImageTokenConfig, Sampling, TextConfig};
use crate::hf_tokenizer::{load_text_tokenizer, text_tokenizer_file, TextTokenizer};
use crate::modeling_llama::KvPool;
use crate::train::LlmTrainer;
use crate::vocab::{build_sequence, Segment, UnifiedVocab};
use crate::LlamaForCausalLM;

/// The LLM stage: weights, unified vocabulary, text tokenizer, generation limits.
pub struct LlmStageModel {
    /// The model's variables (stage-2 training steps them; checkpoints save them).
    pub vs: nn::VarStore,
    pub model: LlamaForCausalLM,
    pub vocab: UnifiedVocab,
    /// `tokenizer.model` (SentencePiece) or `tokenizer.json` (the `tokenizers` crate).
    pub tokenizer: Box<dyn TextTokenizer>,
    /// Image-token length limits (manifest `generation.t2i_{min,max}_new_tokens`).
    pub t2i_min_new_tokens: i64,
    pub t2i_max_new_tokens: i64,
    /// Stage-2 training state, when the stage was built to train.
    pub train: Option<LlmTrainer>,
    /// The running batch (continuous batching, [`crate::batch`]).
    engine: Engine,
    running: HashMap<u64, Running>,
}

fn fail(e: impl std::fmt::Display) -> StageError {
    StageError::failed(StageKind::Llm, e)
}

/// A generation error as a stage error: bad options are the caller's (4xx), a stop is a cancel.
fn stage_err(e: lavit_runtime::Error) -> StageError {
    StageError::from_error(StageKind::Llm, e)
}

impl LlmStageModel {
    /// Load `dir/language_model/` (HF LLaMA + `tokenizer.model`, or `tokenizer.json` when the
    /// folder has no `tokenizer.model`) with `dir/manifest.json`'s
    /// vocabulary layout (official values when absent), strictly, on `device` in `kind`; the
    /// model's rows must equal the unified vocabulary and the tokenizer must fit its text part.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> lavit_runtime::Result<Self> {
        Self::load_quantized(dir, device, kind, QuantMode::None)
    }

    /// [`LlmStageModel::load`] with the LLM's linear layers quantised to `quantize` (the
    /// pipeline's `quantize` setting): a float folder is quantised at load; a folder that
    /// `lavit quantize` wrote (manifest `llm.quantization`) loads as stored whatever
    /// `quantize` is, unless it names another quantisation (refused).
    pub fn load_quantized(
        dir: &Path,
        device: Device,
        kind: Kind,
        quantize: QuantMode,
    ) -> lavit_runtime::Result<Self> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let lm = dir.join("language_model");
        let stored = manifest.llm.quant_mode();
        let (vs, model) =
            LlamaForCausalLM::from_pretrained_quantized(&lm, device, kind, stored, quantize)?;
        manifest.check_context(
            &dir.join("manifest.json").display().to_string(),
            model.config.max_position_embeddings,
        )?;
        let tokenizer = load_text_tokenizer(&lm)?;
        let tokenizer_file = text_tokenizer_file(&lm);
        let vocab = UnifiedVocab::from(&manifest.llm);
        if model.config.vocab_size != vocab.vocab_size {
            return Err(Error::config(
                lm.join("config.json").display().to_string(),
                "vocab_size",
                format!(
                    "{} rows, but the unified vocabulary of the manifest has {}",
                    model.config.vocab_size, vocab.vocab_size
                ),
            ));
        }
        if tokenizer.vocab_size() as i64 > vocab.text_vocab_size {
            return Err(Error::config(
                lm.join(tokenizer_file).display().to_string(),
                "pieces",
                format!(
                    "{} pieces, more than text_vocab_size {}",
                    tokenizer.vocab_size(),
                    vocab.text_vocab_size
                ),
            ));
        }
        Ok(Self::from_parts(
            vs,
            model,
            vocab,
            tokenizer,
            &manifest.generation,
        ))
    }

    /// A stage over a model built elsewhere (e.g. a fresh model to train), with the
    /// manifest's image-token limits.
    pub fn from_parts(
        vs: nn::VarStore,
        model: LlamaForCausalLM,
        vocab: UnifiedVocab,
        tokenizer: Box<dyn TextTokenizer>,
        generation: &lavit_runtime::manifest::GenerationManifest,
    ) -> Self {
        LlmStageModel {
            vs,
            model,
            vocab,
            tokenizer,
            t2i_min_new_tokens: generation.t2i_min_new_tokens,
            t2i_max_new_tokens: generation.t2i_max_new_tokens,
            train: None,
            engine: Engine::new(EngineLimits::unbounded()),
            running: HashMap::new(),
        }
        .with_batching(&Batching::default())
    }

    fn trainer(&mut self) -> StageResult<&mut LlmTrainer> {
        self.train.as_mut().ok_or_else(not_training)
    }

    fn text_config(opts: &CaptionOptions) -> TextConfig {
        TextConfig {
            max_new_tokens: opts.max_new_tokens as i64,
            min_new_tokens: opts.min_new_tokens as i64,
            sampling: Self::sampling(opts.temperature, opts.top_k, opts.top_p),
            num_beams: opts.num_beams as i64,
            repetition_penalty: opts.repetition_penalty,
            seed: Some(opts.seed),
            ..TextConfig::default()
        }
    }

    fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Sampling {
        if temperature <= 0.0 || top_k == 1 {
            Sampling::greedy()
        } else {
            Sampling {
                do_sample: true,
                temperature,
                top_k: top_k as i64,
                top_p,
            }
        }
    }
}

fn not_training() -> StageError {
    StageError::Invalid("this Llm stage was not built for training".into())
}

impl Trainable for LlmStageModel {
    fn train_forward(&mut self, batch: TrainBatch) -> StageResult<TrainBatch> {
        let t = self.train.as_ref().ok_or_else(not_training)?;
        t.forward(self, batch)
    }
    fn optimizer_step(&mut self) -> StageResult<()> {
        Err(StageError::Invalid(
            "the Llm stage steps under the trainer's control (OptimizerStepWith)".into(),
        ))
    }
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        self.trainer()?.step(ctl)
    }
    fn trained_params(&mut self) -> StageResult<Vec<(String, Tensor)>> {
        Ok(self.train.as_ref().ok_or_else(not_training)?.params())
    }
    fn train_state(&mut self) -> StageResult<TrainParts> {
        let t = self.train.as_ref().ok_or_else(not_training)?;
        t.state(self)
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        let mut t = self.train.take().ok_or_else(not_training)?;
        let r = t.load(self, parts);
        self.train = Some(t);
        r
    }
}

/// What the stage remembers of a running request besides its group in the engine.
struct Running {
    /// Image tokens (visual ids kept) or text (decoded).
    image: bool,
    /// Streamed text so far: ids and their text (pieces are its new suffixes).
    stream: Option<(Vec<i64>, String)>,
    /// Beam search with streaming: the text arrives in one piece at the end.
    stream_at_end: bool,
}

impl LlmStageModel {
    /// The sequence a prompt's parts make, as input embeddings (T, H): text through the
    /// tokenizer, ids as they are, images between [IMG] and [/IMG]. A text the tokenizer
    /// cannot split fails this request as invalid input.
    fn prompt_embeds(&self, parts: Vec<PromptPart>, tail: &[i64]) -> StageResult<Tensor> {
        let mut segments: Vec<Segment> = Vec::with_capacity(parts.len() + 1);
        for p in parts {
            segments.push(match p {
                PromptPart::Text(t) if t.is_empty() => continue,
                PromptPart::Text(t) => {
                    Segment::Text(self.tokenizer.try_encode(&t).map_err(stage_err)?)
                }
                PromptPart::Ids(ids) => Segment::Text(ids),
                PromptPart::ImageIds(ids) => Segment::ImageIds(ids),
                PromptPart::ImageEmbeds(e) => Segment::ImageEmbeds(e),
            });
        }
        if !tail.is_empty() {
            segments.push(Segment::Text(tail.to_vec()));
        }
        let ids_ok = segments.iter().all(|s| match s {
            Segment::Text(ids) => ids.iter().all(|&i| (0..self.vocab.vocab_size).contains(&i)),
            _ => true,
        });
        if !ids_ok {
            return Err(StageError::Invalid(format!(
                "a prompt id is outside the vocabulary of {}",
                self.vocab.vocab_size
            )));
        }
        let built = build_sequence(&self.model, &self.vocab, &segments).map_err(stage_err)?;
        Ok(built.embeds)
    }

    fn image_config(&self, opts: &GenerateOptions) -> ImageTokenConfig {
        ImageTokenConfig {
            cfg_scale: opts.llm_guidance,
            max_new_tokens: opts
                .max_tokens
                .map_or(self.t2i_max_new_tokens, |n| n as i64),
            min_new_tokens: opts
                .min_tokens
                .map_or(self.t2i_min_new_tokens, |n| n as i64),
            sampling: Self::sampling(opts.temperature, opts.top_k, opts.top_p),
            num_return_sequences: opts.n as i64,
            seed: Some(opts.seed),
        }
    }

    /// Text → `opts.n` sequences of visual ids, alone through the stage's batch (direct
    /// calls; `should_stop` is asked once per token).
    pub fn image_tokens(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let req = LlmRequest::ImageTokens {
            prompt: vec![PromptPart::Text(prompt.to_string())],
            uncond: Vec::new(),
            opts: opts.clone(),
        };
        match run_alone(self, req, should_stop)?.pop() {
            Some(LlmEvent::Done(LlmOutput::ImageTokens(ids))) => Ok(ids),
            _ => Err(fail("no image tokens")),
        }
    }

    /// Caption / VQA of `prefix` (T, D) continuous visual embeddings and the question
    /// `prompt`, alone through the stage's batch. Calls `on_token(id, text_piece)` once per
    /// generated text id; a `false` answer stops it (cancel). The ids, without the EOS.
    pub fn caption(
        &mut self,
        prefix: &Tensor,
        prompt: &str,
        opts: &CaptionOptions,
        on_token: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>> {
        let req = LlmRequest::Text {
            prompts: vec![caption_parts(prefix, prompt)],
            opts: opts.clone(),
            stream: true,
        };
        const KEY: u64 = u64::MAX;
        self.join(KEY, req)?;
        let mut result = None;
        let mut stop = false;
        while self.held() > 0 && !stop {
            self.plan();
            let r = self.step(&|| false, &mut |_, ev| match ev {
                LlmEvent::Token(t) => stop |= !on_token(t.id, &t.text),
                LlmEvent::Done(out) => result = Some(out),
            });
            if let Err(e) = r {
                self.leave(KEY);
                return Err(e);
            }
        }
        if stop {
            self.leave(KEY);
            return Err(StageError::Cancelled);
        }
        match result {
            Some(LlmOutput::Text(mut a)) if !a.is_empty() => Ok(a.swap_remove(0).ids),
            _ => Err(fail("no caption")),
        }
    }

    /// [`LlmStageModel::caption`] for several images with one question, not streamed, as
    /// one request: one id list per prefix, in order. `should_stop` is asked once per token.
    pub fn captions(
        &mut self,
        prefixes: &[Tensor],
        prompt: &str,
        opts: &CaptionOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let req = LlmRequest::Text {
            prompts: prefixes.iter().map(|p| caption_parts(p, prompt)).collect(),
            opts: opts.clone(),
            stream: false,
        };
        match run_alone(self, req, should_stop)?.pop() {
            Some(LlmEvent::Done(LlmOutput::Text(a))) => Ok(a.into_iter().map(|a| a.ids).collect()),
            _ => Err(fail("no captions")),
        }
    }

    /// Text ids → text.
    pub fn decode_text(&self, ids: &[i64]) -> StageResult<String> {
        Ok(self.tokenizer.decode(ids))
    }

    /// The stage's running batch within `batching`'s budget (sequences, prefill chunk, KV
    /// pool of `kv_cache_mib` MiB in blocks of `kv_block_size` positions).
    pub fn with_batching(mut self, batching: &Batching) -> Self {
        let per_position = KvPool::bytes_per_position(&self.model.config, self.model.kind());
        self.engine = Engine::new(EngineLimits::from_batching(batching, per_position));
        self
    }
}

/// An image's embeddings, then the question when there is one.
fn caption_parts(prefix: &Tensor, prompt: &str) -> Vec<PromptPart> {
    let mut p = vec![PromptPart::ImageEmbeds(prefix.shallow_clone())];
    if !prompt.is_empty() {
        p.push(PromptPart::Text(prompt.to_string()));
    }
    p
}

/// Requests waiting to be admitted beyond which new ones stay in the stage's mailbox.
const WAITING_ROOM: usize = 8;

impl Iterative<LlmRequest, LlmEvent> for LlmStageModel {
    fn join(&mut self, key: u64, req: LlmRequest) -> StageResult<()> {
        let _g = tch::no_grad_guard();
        let (group, running) = match req {
            LlmRequest::ImageTokens {
                prompt,
                uncond,
                opts,
            } => {
                let cfg = self.image_config(&opts);
                cfg.validate().map_err(stage_err)?;
                let img = [self.vocab.image_start_id];
                let cond = self.prompt_embeds(prompt, &img)?;
                let uncond = self.prompt_embeds(uncond, &img)?;
                let g = cfg.group(&self.model, &cond, &uncond).map_err(stage_err)?;
                let r = Running {
                    image: true,
                    stream: None,
                    stream_at_end: false,
                };
                (g, r)
            }
            LlmRequest::Text {
                prompts,
                opts,
                stream,
            } => {
                if prompts.is_empty() {
                    return Err(StageError::Invalid("no prompt to answer".into()));
                }
                let cfg = Self::text_config(&opts);
                cfg.validate().map_err(stage_err)?;
                let seqs = prompts
                    .into_iter()
                    .map(|p| self.prompt_embeds(p, &[]))
                    .collect::<StageResult<Vec<_>>>()?;
                let stream = stream && seqs.len() == 1;
                let g = cfg.group(&self.model, &seqs, stream).map_err(stage_err)?;
                let r = Running {
                    image: false,
                    stream: (stream && cfg.num_beams == 1).then(|| (Vec::new(), String::new())),
                    stream_at_end: stream && cfg.num_beams > 1,
                };
                (g, r)
            }
        };
        self.engine.add(key, group).map_err(stage_err)?;
        self.running.insert(key, running);
        Ok(())
    }

    fn held(&self) -> usize {
        self.engine.len()
    }

    fn has_room(&self) -> bool {
        self.engine.waiting() < WAITING_ROOM
    }

    fn plan(&mut self) -> Vec<u64> {
        self.engine.plan()
    }

    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, LlmEvent),
    ) -> StageResult<()> {
        if should_stop() {
            // A member was cancelled (or a control message waits): the actor takes it out
            // and plans again.
            return Ok(());
        }
        let mut tokens: Vec<(u64, i64)> = Vec::new();
        let finished = self
            .engine
            .step(&self.model, &self.vocab, &mut |k, id| tokens.push((k, id)))
            .map_err(stage_err)?;
        // Stream each new id with its text piece (the suffix the id adds to the text).
        for (key, id) in tokens {
            if let Some((ids, text)) = self.running.get_mut(&key).and_then(|r| r.stream.as_mut()) {
                ids.push(id);
                let now = self.tokenizer.decode(ids);
                let piece = now.get(text.len()..).unwrap_or("").to_string();
                *text = now;
                emit(key, LlmEvent::Token(TokenEvent { id, text: piece }));
            }
        }
        for (key, fin) in finished {
            let Some(r) = self.running.remove(&key) else {
                continue;
            };
            let out = match fin {
                Finished::Image(rows) => LlmOutput::ImageTokens(
                    rows.into_iter()
                        .map(|s| s.into_iter().filter(|&i| self.vocab.is_visual(i)).collect())
                        .collect(),
                ),
                Finished::Text { ids, prompt_lens } => {
                    if r.stream_at_end {
                        // Beam search cannot stream (a beam may be overtaken): its text is
                        // delivered piece by piece once it is chosen.
                        let (mut sofar, mut prev) = (Vec::new(), String::new());
                        for &id in ids.first().map(Vec::as_slice).unwrap_or(&[]) {
                            sofar.push(id);
                            let now = self.tokenizer.decode(&sofar);
                            let piece = now.get(prev.len()..).unwrap_or("").to_string();
                            prev = now;
                            emit(key, LlmEvent::Token(TokenEvent { id, text: piece }));
                        }
                    }
                    let _ = r.image;
                    LlmOutput::Text(
                        ids.into_iter()
                            .zip(prompt_lens)
                            .map(|(ids, n)| TextAnswer {
                                text: self.tokenizer.decode(&ids),
                                ids,
                                prompt_tokens: n,
                            })
                            .collect(),
                    )
                }
            };
            emit(key, LlmEvent::Done(out));
        }
        Ok(())
    }

    fn leave(&mut self, key: u64) {
        self.engine.remove(key);
        self.running.remove(&key);
    }
}

impl LlmStage for LlmStageModel {
    fn kv_blocks(&self) -> Option<(usize, usize)> {
        Some(self.engine.kv_blocks())
    }
    fn tokens_generated(&self) -> u64 {
        self.engine.tokens()
    }
}
