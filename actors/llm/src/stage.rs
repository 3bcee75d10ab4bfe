//! The LLM as a pipeline stage: a thin adapter from [`LlamaForCausalLM`] and the generation
//! functions of this crate to [`lavit_runtime::stage::LlmStage`] (the actor that runs it lives
//! in `lavit_runtime::actors`; this file has no actix), and, when built by the stage-2 trainer,
//! the same model trained on the same thread and device ([`crate::train::LlmTrainer`]).
//!
//! [`LlmStageModel::load`] is the one loader of a checkpoint's `language_model/`: strict keys,
//! the unified vocabulary of the manifest checked against the model and the tokenizer.
//!
//! Cancellation: the actor's callbacks go straight into the decode loops
//! ([`generate_text_with`], [`generate_image_tokens_with`]): one check per token, so a
//! cancelled request stops within one token.

use std::path::Path;

use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{
    CaptionOptions, GenerateOptions, StepControl, StepReport, TrainBatch, TrainParts,
};
use lavit_runtime::stage::{LlmStage, ShouldStop, StageError, StageKind, StageResult, Trainable};
use lavit_runtime::Error;
use tch::{nn, Device, Kind, Tensor};

use crate::generate::{
    generate_image_tokens_with, generate_text_with, ImageTokenConfig, Sampling, TextConfig,
};
use crate::hf_tokenizer::{load_text_tokenizer, text_tokenizer_file, TextTokenizer};
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
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let lm = dir.join("language_model");
        let (vs, model) = LlamaForCausalLM::from_pretrained(&lm, device, kind)?;
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
        }
    }

    fn trainer(&mut self) -> StageResult<&mut LlmTrainer> {
        self.train.as_mut().ok_or_else(not_training)
    }

    /// The question's text ids (none for an empty prompt: a plain caption); a text the
    /// tokenizer cannot split fails this request as invalid input.
    fn question_ids(&self, prompt: &str) -> StageResult<Option<Vec<i64>>> {
        if prompt.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.tokenizer.try_encode(prompt).map_err(stage_err)?))
    }

    /// What a caption / VQA request reads before generating: the image's embeddings between
    /// [IMG] and [/IMG], then the question's ids, as embeddings (T, H).
    fn caption_sequence(&self, prefix: &Tensor, question: Option<&[i64]>) -> StageResult<Tensor> {
        let mut segments = vec![Segment::ImageEmbeds(prefix.shallow_clone())];
        if let Some(q) = question {
            segments.push(Segment::Text(q.to_vec()));
        }
        Ok(build_sequence(&self.model, &self.vocab, &segments)
            .map_err(fail)?
            .embeds)
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

impl LlmStage for LlmStageModel {
    fn caption(
        &mut self,
        prefix: &Tensor,
        prompt: &str,
        opts: &CaptionOptions,
        on_token: &mut dyn FnMut(i64, &str) -> bool,
    ) -> StageResult<Vec<i64>> {
        let _g = tch::no_grad_guard();
        let question = self.question_ids(prompt)?;
        let seq = self.caption_sequence(prefix, question.as_deref())?;
        let cfg = Self::text_config(opts);
        // Stream each new id with its text piece as it is generated (one host read per
        // token, the one the loop makes anyway); `on_token` answering `false` stops the loop.
        let eos = self.vocab.eos_id;
        let tok = &self.tokenizer;
        let mut sofar: Vec<i64> = Vec::new();
        let mut prev = String::new();
        let mut stream = |ids: &[i64]| {
            let id = ids[0];
            if id == eos {
                return true;
            }
            sofar.push(id);
            let text = tok.decode(&sofar);
            let piece = text.get(prev.len()..).unwrap_or("").to_string();
            prev = text;
            on_token(id, &piece)
        };
        // Beam search cannot stream (a beam may be overtaken): its text is delivered through
        // the same callback once it is chosen.
        let beams = cfg.num_beams > 1;
        let ids = generate_text_with(
            &self.model,
            &self.vocab,
            &[seq],
            &cfg,
            &|| false,
            if beams { None } else { Some(&mut stream) },
        )
        .map_err(stage_err)?
        .into_iter()
        .next()
        .unwrap_or_default();
        if beams {
            for &id in &ids {
                if !stream(&[id]) {
                    break;
                }
            }
        }
        Ok(ids)
    }

    fn captions(
        &mut self,
        prefixes: &[Tensor],
        prompt: &str,
        opts: &CaptionOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let _g = tch::no_grad_guard();
        let question = self.question_ids(prompt)?;
        let seqs = prefixes
            .iter()
            .map(|p| self.caption_sequence(p, question.as_deref()))
            .collect::<StageResult<Vec<_>>>()?;
        // One left-padded batch through the same loop as `caption`.
        generate_text_with(
            &self.model,
            &self.vocab,
            &seqs,
            &Self::text_config(opts),
            should_stop,
            None,
        )
        .map_err(stage_err)
    }

    fn decode_text(&mut self, ids: &[i64]) -> StageResult<String> {
        Ok(self.tokenizer.decode(ids))
    }

    fn caption_prompt_len(&mut self, prefix: &Tensor, prompt: &str) -> Option<usize> {
        // The same sequence `caption` builds (an embedding lookup, no forward pass).
        let _g = tch::no_grad_guard();
        let question = self.question_ids(prompt).ok()?;
        let seq = self.caption_sequence(prefix, question.as_deref()).ok()?;
        seq.size().first().map(|&l| l as usize)
    }

    fn image_tokens(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        should_stop: ShouldStop,
    ) -> StageResult<Vec<Vec<i64>>> {
        let _g = tch::no_grad_guard();
        let cfg = ImageTokenConfig {
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
        };
        let prompt_ids = self.tokenizer.try_encode(prompt).map_err(stage_err)?;
        let out =
            generate_image_tokens_with(&self.model, &self.vocab, &[prompt_ids], &cfg, should_stop)
                .map_err(stage_err)?;
        // Keep the visual ids ([/IMG] and anything else dropped).
        Ok(out
            .into_iter()
            .map(|s| s.into_iter().filter(|&i| self.vocab.is_visual(i)).collect())
            .collect())
    }
}
