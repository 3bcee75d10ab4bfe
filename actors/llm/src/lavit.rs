//! The LaVIT language model as one object: the LLaMA of `language_model/`, its SentencePiece
//! tokenizer and the unified vocabulary of the checkpoint's manifest, with the two tasks
//! LaVIT uses it for (official `LaVIT/models/lavit_for_generation.py` and
//! `lavit_for_understanding.py`): text → image tokens and image (+ question) → text.

use std::path::Path;

use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::{Error, Result};
use tch::{nn, Device, Kind, Tensor};

use crate::generate::{generate_image_tokens, generate_text, ImageTokenConfig, TextConfig};
use crate::modeling_llama::LlamaForCausalLM;
use crate::sentencepiece::SentencePiece;
use crate::vocab::{build_sequence, Segment, UnifiedVocab};

/// The loaded language model of a LaVIT checkpoint.
pub struct LavitLlm {
    pub vs: nn::VarStore,
    pub model: LlamaForCausalLM,
    pub tokenizer: SentencePiece,
    pub vocab: UnifiedVocab,
}

impl LavitLlm {
    /// Load `dir/language_model/` (HF LLaMA + `tokenizer.model`) with `dir/manifest.json`'s
    /// vocabulary layout (official values when absent), strictly, on `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let lm = dir.join("language_model");
        let (vs, model) = LlamaForCausalLM::from_pretrained(&lm, device, kind)?;
        manifest.check_context(
            &dir.join("manifest.json").display().to_string(),
            model.config.max_position_embeddings,
        )?;
        let tokenizer = SentencePiece::from_file(&lm.join("tokenizer.model"))?;
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
                lm.join("tokenizer.model").display().to_string(),
                "pieces",
                format!(
                    "{} pieces, more than text_vocab_size {}",
                    tokenizer.vocab_size(),
                    vocab.text_vocab_size
                ),
            ));
        }
        Ok(Self {
            vs,
            model,
            tokenizer,
            vocab,
        })
    }

    /// Text prompts → codebook indices of the generated images (prompt-major,
    /// `num_return_sequences` per prompt; [/IMG] removed). Feed them to the feature decoder.
    pub fn text_to_image_codes(
        &self,
        prompts: &[&str],
        cfg: &ImageTokenConfig,
    ) -> Result<Vec<Vec<i64>>> {
        let ids: Vec<Vec<i64>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        let out = generate_image_tokens(&self.model, &self.vocab, &ids, cfg)?;
        Ok(out.iter().map(|s| self.vocab.codes_of(s)).collect())
    }

    /// Images as continuous embeddings (each (T_i, hidden): `vit_proj` output of the
    /// understanding merger) + an optional question → text, one answer per image.
    /// The LLM input is `[IMG] embeds [/IMG] question`.
    pub fn caption(
        &self,
        image_embeds: &[Tensor],
        prompt: Option<&str>,
        cfg: &TextConfig,
    ) -> Result<Vec<String>> {
        let q = prompt.map(|p| self.tokenizer.encode(p)).unwrap_or_default();
        let prefixes = image_embeds
            .iter()
            .map(|e| {
                let mut segs = vec![Segment::ImageEmbeds(e.shallow_clone())];
                if !q.is_empty() {
                    segs.push(Segment::Text(q.clone()));
                }
                build_sequence(&self.model, &self.vocab, &segs).map(|b| b.embeds)
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = generate_text(&self.model, &self.vocab, &prefixes, cfg)?;
        Ok(ids.iter().map(|s| self.tokenizer.decode(s)).collect())
    }
}
