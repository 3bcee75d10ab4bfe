//! LaVIT's unified vocabulary and multimodal sequences (paper §3.2; official
//! `LaVIT/models/lavit_for_generation.py`, `lavit_for_understanding.py`): text ids, then
//! [IMG] and [/IMG], then the visual codebook ids at `visual_token_offset`. An image enters
//! either as continuous `vit_proj` embeddings between the [IMG]/[/IMG] embeddings
//! (understanding) or as its discrete ids (generation); batches are left-padded.

use lavit_runtime::manifest::LlmManifest;
use lavit_runtime::{Error, Result};
use tch::{Kind, Tensor};

use crate::modeling_llama::LlamaForCausalLM;

/// Label value ignored by the loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// The id layout of the unified vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnifiedVocab {
    /// Text ids are `0..text_vocab_size`.
    pub text_vocab_size: i64,
    /// [IMG].
    pub image_start_id: i64,
    /// [/IMG].
    pub image_end_id: i64,
    /// Visual code `c` has id `visual_token_offset + c`.
    pub visual_token_offset: i64,
    /// Total rows of the embedding / head.
    pub vocab_size: i64,
    pub bos_id: i64,
    pub eos_id: i64,
}

impl From<&LlmManifest> for UnifiedVocab {
    fn from(m: &LlmManifest) -> Self {
        Self {
            text_vocab_size: m.text_vocab_size,
            image_start_id: m.image_start_id,
            image_end_id: m.image_end_id,
            visual_token_offset: m.visual_token_offset,
            vocab_size: m.vocab_size,
            bos_id: m.bos_id,
            eos_id: m.eos_id,
        }
    }
}

impl Default for UnifiedVocab {
    fn default() -> Self {
        Self::from(&LlmManifest::default())
    }
}

impl UnifiedVocab {
    pub fn is_text(&self, id: i64) -> bool {
        (0..self.text_vocab_size).contains(&id)
    }
    pub fn is_visual(&self, id: i64) -> bool {
        (self.visual_token_offset..self.vocab_size).contains(&id)
    }
    /// Codebook index → unified id.
    pub fn visual_id(&self, code: i64) -> i64 {
        self.visual_token_offset + code
    }
    /// Unified ids → codebook indices (the ids that are visual, in order).
    pub fn codes_of(&self, ids: &[i64]) -> Vec<i64> {
        ids.iter()
            .filter(|&&i| self.is_visual(i))
            .map(|&i| i - self.visual_token_offset)
            .collect()
    }
}

/// One part of a multimodal sequence.
#[derive(Debug)]
pub enum Segment {
    /// Text ids (SentencePiece, no BOS unless you add it).
    Text(Vec<i64>),
    /// An image as its discrete visual ids (already offset), wrapped in [IMG] … [/IMG].
    ImageIds(Vec<i64>),
    /// An image as continuous embeddings (T, H) (`vit_proj` output), wrapped in the
    /// [IMG] … [/IMG] embeddings. It has no targets.
    ImageEmbeds(Tensor),
}

/// A sequence ready for the LLM: input embeddings and next-token labels.
#[derive(Debug)]
pub struct Built {
    /// (T, H) input embeddings.
    pub embeds: Tensor,
    /// Ids where the position holds a token (for discrete parts), IGNORE for continuous ones.
    pub ids: Vec<i64>,
}

/// Embed a list of segments into one (T, H) sequence.
pub fn build_sequence(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    segments: &[Segment],
) -> Result<Built> {
    let dev = model.device();
    let mut parts: Vec<Tensor> = Vec::new();
    let mut ids_all: Vec<i64> = Vec::new();
    let mut ids_run: Vec<i64> = Vec::new();
    let flush = |run: &mut Vec<i64>, parts: &mut Vec<Tensor>| -> Result<()> {
        if !run.is_empty() {
            let t = Tensor::from_slice(run).to_device(dev);
            parts.push(model.f_embed(&t)?);
            run.clear();
        }
        Ok(())
    };
    for s in segments {
        match s {
            Segment::Text(ids) => {
                ids_run.extend(ids);
                ids_all.extend(ids);
            }
            Segment::ImageIds(ids) => {
                if let Some(bad) = ids.iter().find(|&&i| !vocab.is_visual(i)) {
                    return Err(Error::invalid(format!(
                        "image id {bad} is not a visual id ({}..{})",
                        vocab.visual_token_offset, vocab.vocab_size
                    )));
                }
                ids_run.push(vocab.image_start_id);
                ids_run.extend(ids);
                ids_run.push(vocab.image_end_id);
                ids_all.push(vocab.image_start_id);
                ids_all.extend(ids);
                ids_all.push(vocab.image_end_id);
            }
            Segment::ImageEmbeds(e) => {
                let h = model.config.hidden_size;
                if e.dim() != 2 || e.size()[1] != h {
                    return Err(Error::invalid(format!(
                        "image embeddings must be (T, {h}), got {:?}",
                        e.size()
                    )));
                }
                ids_run.push(vocab.image_start_id);
                flush(&mut ids_run, &mut parts)?;
                parts.push(e.to_device(dev).to_kind(model.kind()));
                ids_run.push(vocab.image_end_id);
                ids_all.push(vocab.image_start_id);
                ids_all.extend(std::iter::repeat_n(IGNORE, e.size()[0] as usize));
                ids_all.push(vocab.image_end_id);
            }
        }
    }
    flush(&mut ids_run, &mut parts)?;
    if parts.is_empty() {
        return Err(Error::invalid("empty sequence"));
    }
    Ok(Built {
        embeds: Tensor::cat(&parts, 0),
        ids: ids_all,
    })
}

/// Left-pad (T_i, H) sequences into (B, T, H) and a (B, T) bool mask (true = real).
pub fn left_pad_embeds(seqs: &[Tensor]) -> (Tensor, Tensor) {
    let t = seqs.iter().map(|s| s.size()[0]).max().unwrap_or(0);
    let h = seqs[0].size()[1];
    let (kind, dev) = (seqs[0].kind(), seqs[0].device());
    let mut xs = Vec::new();
    let mut ms = Vec::new();
    for s in seqs {
        let n = s.size()[0];
        let pad = Tensor::zeros([t - n, h], (kind, dev));
        xs.push(Tensor::cat(&[&pad, s], 0));
        let mut m = vec![false; (t - n) as usize];
        m.extend(std::iter::repeat_n(true, n as usize));
        ms.push(Tensor::from_slice(&m).to_device(dev));
    }
    (Tensor::stack(&xs, 0), Tensor::stack(&ms, 0))
}

/// Left-pad id lists into (B, T) ids (padding `pad_id`) and a (B, T) bool mask.
pub fn left_pad_ids(seqs: &[Vec<i64>], pad_id: i64) -> (Tensor, Tensor) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(std::iter::repeat_n(pad_id, t - s.len()));
        ids.extend(s);
        mask.extend(std::iter::repeat_n(false, t - s.len()));
        mask.extend(std::iter::repeat_n(true, s.len()));
    }
    let b = seqs.len() as i64;
    (
        Tensor::from_slice(&ids).view([b, t as i64]),
        Tensor::from_slice(&mask).view([b, t as i64]),
    )
}

/// Whether a (B, T) mask has any padding (one host read; call outside decode loops).
pub fn has_padding(mask: &Tensor) -> bool {
    mask.to_kind(Kind::Bool)
        .logical_not()
        .any()
        .int64_value(&[])
        != 0
}
