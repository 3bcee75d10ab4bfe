//! The hyper-parameters that the official LaVIT code hard-codes, as one typed struct.
//!
//! Defaults are the official LaVIT-7B-v2 sizes (EVA-CLIP ViT-G/14 at 224 px, merger and
//! decoders of 12 blocks × 16 heads, a 16384 × 32 codebook, LLaMA-2-7B with visual ids at
//! 32002). A checkpoint folder may carry a `manifest.json` (sections `tokenizer`,
//! `feature_decoder`, `llm`, `generation`) whose values override them; unknown keys in
//! those sections are refused so a typo never silently falls back to a default.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the token selector turns keep/drop log-probs into a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// keep where log p(keep) > log p(drop): the same image always gives the same tokens.
    #[default]
    Argmax,
    /// Gumbel-softmax hard sampling, as the official code does.
    Gumbel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerManifest {
    pub img_size: i64,
    pub patch_size: i64,
    pub encoder_width: i64,
    pub encoder_depth: i64,
    pub encoder_heads: i64,
    pub encoder_mlp_ratio: f64,
    pub encoder_norm_eps: f64,
    /// Width of the EVA `head` (unused by LaVIT but present in the file).
    pub encoder_head_dim_out: i64,
    pub merger_depth: i64,
    pub merger_heads: i64,
    pub merger_mlp_ratio: f64,
    pub merger_qkv_bias: bool,
    pub merger_norm_eps: f64,
    pub n_code: i64,
    pub code_dim: i64,
    /// `vit_proj` output width (= the LLM hidden size).
    pub llm_hidden: i64,
    pub selection: Selection,
}

impl Default for TokenizerManifest {
    fn default() -> Self {
        Self {
            img_size: 224,
            patch_size: 14,
            encoder_width: 1408,
            encoder_depth: 40,
            encoder_heads: 16,
            encoder_mlp_ratio: 4.3637,
            encoder_norm_eps: 1e-6,
            encoder_head_dim_out: 1024,
            merger_depth: 12,
            merger_heads: 16,
            merger_mlp_ratio: 4.3637,
            merger_qkv_bias: true,
            merger_norm_eps: 1e-5,
            n_code: 16384,
            code_dim: 32,
            llm_hidden: 4096,
            selection: Selection::Argmax,
        }
    }
}

impl TokenizerManifest {
    pub fn num_patches(&self) -> i64 {
        (self.img_size / self.patch_size).pow(2)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureDecoderManifest {
    pub depth: i64,
    pub heads: i64,
    pub embed_dim: i64,
    pub mlp_ratio: f64,
    /// Input width (= the codebook dimension).
    pub in_chans: i64,
    pub decoder_out_dim: i64,
    pub lowres_unet_proj: i64,
    pub highres_unet_proj_1: i64,
    pub highres_unet_proj_2: i64,
    pub highres_attnpool_heads: i64,
    pub num_patches: i64,
}

impl Default for FeatureDecoderManifest {
    fn default() -> Self {
        Self {
            depth: 12,
            heads: 16,
            embed_dim: 1408,
            mlp_ratio: 4.3637,
            in_chans: 32,
            decoder_out_dim: 1408,
            lowres_unet_proj: 768,
            highres_unet_proj_1: 768,
            highres_unet_proj_2: 1280,
            highres_attnpool_heads: 16,
            num_patches: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmManifest {
    pub text_vocab_size: i64,
    pub image_start_id: i64,
    pub image_end_id: i64,
    pub visual_token_offset: i64,
    pub vocab_size: i64,
    pub bos_id: i64,
    pub eos_id: i64,
}

impl Default for LlmManifest {
    fn default() -> Self {
        Self {
            text_vocab_size: 32000,
            image_start_id: 32000,
            image_end_id: 32001,
            visual_token_offset: 32002,
            vocab_size: 48386,
            bos_id: 1,
            eos_id: 2,
        }
    }
}

/// Settings the references were computed with (and the official generation defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationManifest {
    pub t2i_prompt: String,
    pub t2i_max_new_tokens: i64,
    pub t2i_min_new_tokens: i64,
    pub cfg_scales: Vec<f64>,
    pub caption_max_new_tokens: i64,
    pub ddim_steps: i64,
    pub decoder_guidance: f64,
    pub lowres_decoder_guidance: f64,
    pub unet_timestep: i64,
    pub ddim_fake_model_output: String,
    pub text_ids_check: String,
    /// lavit-rs: the checkpoint's recommended LLM classifier-free guidance for image tokens
    /// (official v2 code: 4), the default of `lavit generate` and the server.
    pub llm_guidance: f64,
    /// lavit-rs: recommended top-k of image-token sampling (official v2 code: 50).
    pub top_k: i64,
    /// lavit-rs: recommended DDIM steps of the lowres pixel decoder (official: 50; the
    /// highres one uses `ddim_steps`).
    pub lowres_ddim_steps: i64,
}

impl Default for GenerationManifest {
    fn default() -> Self {
        Self {
            t2i_prompt: String::new(),
            t2i_max_new_tokens: 300,
            t2i_min_new_tokens: 20,
            cfg_scales: vec![4.0],
            caption_max_new_tokens: 64,
            ddim_steps: 25,
            decoder_guidance: 7.0,
            lowres_decoder_guidance: 5.0,
            unet_timestep: 701,
            ddim_fake_model_output: String::new(),
            text_ids_check: String::new(),
            llm_guidance: 4.0,
            top_k: 50,
            lowres_ddim_steps: 50,
        }
    }
}

/// Everything the official code hard-codes, with official defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct LavitManifest {
    pub tokenizer: TokenizerManifest,
    pub feature_decoder: FeatureDecoderManifest,
    pub llm: LlmManifest,
    pub generation: GenerationManifest,
}

impl LavitManifest {
    /// The official LaVIT-7B-v2 values.
    pub fn official() -> Self {
        Self::default()
    }

    /// Read `dir/manifest.json` if present (its values override the official ones), else
    /// the official values. The result is validated.
    pub fn for_checkpoint(dir: &Path) -> Result<Self> {
        let p = dir.join("manifest.json");
        let m = if p.is_file() {
            Self::from_json_file(&p)?
        } else {
            Self::official()
        };
        m.validate(&p.display().to_string())?;
        Ok(m)
    }

    pub fn from_json_file(p: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(p.display().to_string(), "-", e.to_string()))?;
        let mut m = Self::official();
        let origin = p.display().to_string();
        macro_rules! section {
            ($name:literal, $field:ident) => {
                if let Some(s) = v.get($name) {
                    m.$field = serde_json::from_value(s.clone())
                        .map_err(|e| Error::config(&origin, $name, e.to_string()))?;
                }
            };
        }
        section!("tokenizer", tokenizer);
        section!("feature_decoder", feature_decoder);
        section!("llm", llm);
        section!("generation", generation);
        Ok(m)
    }

    /// Check sizes are positive and consistent; errors name the key and the bad value.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let pos = |key: &str, v: i64| -> Result<()> {
            if v <= 0 {
                Err(Error::config(
                    origin,
                    key,
                    format!("must be positive, got {v}"),
                ))
            } else {
                Ok(())
            }
        };
        let t = &self.tokenizer;
        pos("tokenizer.img_size", t.img_size)?;
        pos("tokenizer.patch_size", t.patch_size)?;
        pos("tokenizer.encoder_width", t.encoder_width)?;
        pos("tokenizer.encoder_depth", t.encoder_depth)?;
        pos("tokenizer.encoder_heads", t.encoder_heads)?;
        pos("tokenizer.merger_depth", t.merger_depth)?;
        pos("tokenizer.merger_heads", t.merger_heads)?;
        pos("tokenizer.n_code", t.n_code)?;
        pos("tokenizer.code_dim", t.code_dim)?;
        pos("tokenizer.llm_hidden", t.llm_hidden)?;
        if t.img_size % t.patch_size != 0 {
            return Err(Error::config(
                origin,
                "tokenizer.img_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    t.img_size, t.patch_size
                ),
            ));
        }
        if t.encoder_width % t.encoder_heads != 0 {
            return Err(Error::config(
                origin,
                "tokenizer.encoder_heads",
                format!(
                    "width {} is not divisible by {} heads",
                    t.encoder_width, t.encoder_heads
                ),
            ));
        }
        let f = &self.feature_decoder;
        pos("feature_decoder.depth", f.depth)?;
        pos("feature_decoder.heads", f.heads)?;
        pos("feature_decoder.embed_dim", f.embed_dim)?;
        pos("feature_decoder.num_patches", f.num_patches)?;
        let l = &self.llm;
        pos("llm.text_vocab_size", l.text_vocab_size)?;
        pos("llm.vocab_size", l.vocab_size)?;
        if l.visual_token_offset + t.n_code > l.vocab_size {
            return Err(Error::config(
                origin,
                "llm.vocab_size",
                format!(
                    "{} is smaller than visual_token_offset {} + n_code {}",
                    l.vocab_size, l.visual_token_offset, t.n_code
                ),
            ));
        }
        Ok(())
    }
}
