//! Text → image outside the pipeline, for the demo's batched evaluation: the LLM's image
//! tokens (classifier-free guidance) through the pixel decoder of `lavit_decoder`. Commands
//! and the server go through [`crate::pipeline::Pipeline`]; the pixel decoder itself is
//! [`lavit_decoder::pixel_decoder`] (re-exported here).

pub use lavit_decoder::pixel_decoder::*;
use lavit_runtime::stage::ShouldStop;
use lavit_runtime::{Error, Result};
use tch::Tensor;

/// Settings of text → image (`lavit generate`).
#[derive(Debug, Clone)]
pub struct TextToImageOptions {
    /// LLM image-token generation (guidance = `--llm-guidance`, samples = `--num-images`).
    pub tokens: lavit_llm::generate::ImageTokenConfig,
    /// Pixel decoding (steps, decoder guidance, size, seed).
    pub decode: DecodeOptions,
}

/// What [`text_to_image`] returns.
#[derive(Debug)]
pub struct GeneratedImages {
    /// The LLM's output per image (visual ids, then [/IMG] if it closed the image).
    pub token_ids: Vec<Vec<i64>>,
    /// (B, 3, H, W) in [0, 1], prompt-major: `tokens.num_return_sequences` per prompt.
    pub images: Tensor,
}

/// The official `LaVITforGeneration.generate_image`: prompts (SentencePiece, no BOS) → LLM
/// image tokens with classifier-free guidance → feature decoder → U-Net → VAE.
pub fn text_to_image(
    llm: &lavit_llm::LlamaForCausalLM,
    sp: &lavit_llm::sentencepiece::SentencePiece,
    vocab: &lavit_llm::vocab::UnifiedVocab,
    fd: &dyn FeatureDecoders,
    pixels: &PixelDecoder,
    prompts: &[String],
    opts: &TextToImageOptions,
) -> Result<GeneratedImages> {
    text_to_image_with(llm, sp, vocab, fd, pixels, prompts, opts, &|| false)
}

/// [`text_to_image`] that calls `should_stop` once per LLM token and once per diffusion step,
/// stopping with [`Error::Cancelled`] when it answers `true`.
#[allow(clippy::too_many_arguments)]
pub fn text_to_image_with(
    llm: &lavit_llm::LlamaForCausalLM,
    sp: &lavit_llm::sentencepiece::SentencePiece,
    vocab: &lavit_llm::vocab::UnifiedVocab,
    fd: &dyn FeatureDecoders,
    pixels: &PixelDecoder,
    prompts: &[String],
    opts: &TextToImageOptions,
    should_stop: ShouldStop,
) -> Result<GeneratedImages> {
    if prompts.is_empty() {
        return Err(Error::invalid("no prompt given"));
    }
    let ids: Vec<Vec<i64>> = prompts.iter().map(|p| sp.encode(p)).collect();
    let token_ids = lavit_llm::generate::generate_image_tokens_with(
        llm,
        vocab,
        &ids,
        &opts.tokens,
        should_stop,
    )?;
    let visual: Vec<Vec<i64>> = token_ids
        .iter()
        .map(|g| visual_ids_only(g, vocab.visual_token_offset))
        .collect();
    let images = pixels.decode_ids_with(fd, &visual, &opts.decode, should_stop)?;
    Ok(GeneratedImages { token_ids, images })
}

/// The assembled tokenizer's feature decoders drive the pixel decoders.
impl FeatureDecoders for crate::tokenizer::VisualTokenizer {
    fn decode_lowres(&self, ids: &[Vec<i64>]) -> Result<Tensor> {
        crate::tokenizer::VisualTokenizer::decode_lowres(self, ids)
    }
    fn decode_highres(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        crate::tokenizer::VisualTokenizer::decode_highres(self, ids)
    }
}
