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
    /// keep where log p(keep) ≥ log p(drop) (`torch.argmax` over [keep, drop]): the same
    /// image always gives the same tokens.
    #[default]
    Argmax,
    /// Gumbel-softmax hard sampling, as the official code does, with noise from a seed
    /// (the same noise for every image, so an image always gives the same tokens too).
    Gumbel,
}

impl Selection {
    /// `argmax` or `gumbel`, as the manifest, configs and requests spell it.
    pub fn name(self) -> &'static str {
        match self {
            Selection::Argmax => "argmax",
            Selection::Gumbel => "gumbel",
        }
    }

    /// [`Selection::name`] back; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "argmax" => Some(Selection::Argmax),
            "gumbel" => Some(Selection::Gumbel),
            _ => None,
        }
    }
}

/// A selection mode with its seed: the checkpoint manifest's (`tokenizer.selection`,
/// `tokenizer.selection_seed`) unless a command flag, the pipeline config or a request
/// overrides it. The seed only matters for [`Selection::Gumbel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct SelectionChoice {
    pub selection: Selection,
    pub seed: u64,
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
    /// How the checkpoint's keep/drop decisions are taken by default (every front-end: the
    /// library, `lavit tokenize`, `lavit eval`, the server, the playground).
    pub selection: Selection,
    /// Seed of the Gumbel noise when `selection` is `gumbel`.
    pub selection_seed: u64,
    /// Why the checkpoint uses that selection (free text, e.g. what training measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection_note: Option<String>,
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
            selection_seed: 0,
            selection_note: None,
        }
    }
}

impl TokenizerManifest {
    pub fn num_patches(&self) -> i64 {
        (self.img_size / self.patch_size).pow(2)
    }

    /// The checkpoint's default selection and seed.
    pub fn selection_choice(&self) -> SelectionChoice {
        SelectionChoice {
            selection: self.selection,
            seed: self.selection_seed,
        }
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
    /// lavit-rs: the weight-only quantisation the `language_model/` folder stores (written by
    /// `lavit quantize`); absent: float weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationManifest>,
}

mod quant;
pub use quant::{QuantMode, QuantizationManifest, INT4_GROUP_SIZES};

impl LlmManifest {
    /// How the folder stores the LLM's linear layers (`llm.quantization`, checked by
    /// [`LavitManifest::validate`]).
    pub fn quant_mode(&self) -> QuantMode {
        self.quantization
            .as_ref()
            .and_then(|q| QuantMode::parse(&q.mode, q.group_size).ok())
            .unwrap_or_default()
    }
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
            quantization: None,
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
    /// lavit-rs: the LLM guidance of multimodal synthesis (image and text parts → image;
    /// official `multimodal_synthesis`: 5.0).
    pub synthesis_llm_guidance: f64,
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
            synthesis_llm_guidance: 5.0,
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
        // Present in any form (a FIFO or a link to a device included) means read: the
        // reader refuses what is not a regular file rather than silently using defaults.
        let m = if std::fs::symlink_metadata(&p).is_ok() {
            Self::from_json_file(&p)?
        } else {
            Self::official()
        };
        m.validate(&p.display().to_string())?;
        m.check_file_sizes(dir, &p.display().to_string())?;
        Ok(m)
    }

    /// A lower bound on the parameters each official weight file must hold for these sizes
    /// (the dominant matrices only: attention and MLP of every block), paired
    /// with the file (relative to the checkpoint folder) and the manifest key that sets it.
    pub fn min_params(&self) -> Vec<(&'static str, &'static str, u128)> {
        let block = |w: i64, ratio: f64, cross: bool| -> u128 {
            let w = w.max(0) as u128;
            let hidden = (w as f64 * ratio).max(0.0) as u128;
            let attn = if cross { 8 } else { 4 } * w * w;
            attn + 2 * hidden * w
        };
        let t = &self.tokenizer;
        let f = &self.feature_decoder;
        let enc =
            t.encoder_depth.max(0) as u128 * block(t.encoder_width, t.encoder_mlp_ratio, false);
        // (The codebook is left out: a plugin may replace it.)
        let merger =
            t.merger_depth.max(0) as u128 * block(t.encoder_width, t.merger_mlp_ratio, false);
        let dec = f.depth.max(0) as u128 * block(f.embed_dim, f.mlp_ratio, true)
            + 2 * (f.num_patches.max(0) as u128) * f.embed_dim.max(0) as u128;
        vec![
            (
                "visual_tokenizer/eva_vitg_psz14.bin",
                "tokenizer.encoder_width",
                enc,
            ),
            (
                "visual_tokenizer/tokenizer_encoder.bin",
                "tokenizer.merger_depth",
                merger,
            ),
            (
                "visual_tokenizer/tokenizer_decoder.bin",
                "feature_decoder.embed_dim",
                dec,
            ),
            (
                "visual_tokenizer/highres_tokenizer_decoder.bin",
                "feature_decoder.embed_dim",
                dec,
            ),
        ]
    }

    /// Refuse sizes that imply more parameters (at 2 bytes each, the smallest dtype read)
    /// than the checkpoint's weight files hold — checked before any model is built from
    /// them, so a hostile width never reaches an allocation. Files absent are not checked.
    pub fn check_file_sizes(&self, dir: &Path, origin: &str) -> Result<()> {
        for (file, key, params) in self.min_params() {
            let p = dir.join(file);
            let Ok(meta) = std::fs::metadata(&p) else {
                continue;
            };
            if params.saturating_mul(2) > meta.len() as u128 {
                return Err(Error::config(
                    origin,
                    key,
                    format!(
                        "the sizes imply at least {params} parameters ({} bytes at 16 bits) in {file}, which holds {} bytes",
                        params.saturating_mul(2),
                        meta.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Read and validate a `manifest.json` (sections absent from it keep the official values).
    pub fn from_json_file(p: &Path) -> Result<Self> {
        let text = crate::fsread::read_config(p)?;
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
        m.validate(&origin)?;
        Ok(m)
    }

    /// Check every size before anything is allocated from it: positive, under the
    /// documented caps ([`caps`]), heads dividing widths, ids inside the vocabulary, sums
    /// computed without wrapping, generation lengths bounded. Errors name the file
    /// (`origin`), the key and the bad value.
    pub fn validate(&self, origin: &str) -> Result<()> {
        use caps::*;
        let bad = |key: &str, msg: String| Err(Error::config(origin, key, msg));
        // v in 1..=max
        let size = |key: &str, v: i64, max: i64| -> Result<()> {
            if v <= 0 || v > max {
                bad(key, format!("must be in 1..={max}, got {v}"))
            } else {
                Ok(())
            }
        };
        // finite and in (lo, hi] (lo exclusive when `open`)
        let real = |key: &str, v: f64, lo: f64, hi: f64, open: bool| -> Result<()> {
            let ok = v.is_finite() && v <= hi && if open { v > lo } else { v >= lo };
            if ok {
                Ok(())
            } else {
                let l = if open { "(" } else { "[" };
                bad(
                    key,
                    format!("must be a finite number in {l}{lo}, {hi}], got {v}"),
                )
            }
        };
        let divides = |key: &str, heads: i64, wkey: &str, width: i64| -> Result<()> {
            if width % heads != 0 {
                bad(key, format!("{heads} heads do not divide {wkey} = {width}"))
            } else {
                Ok(())
            }
        };
        let t = &self.tokenizer;
        size("tokenizer.img_size", t.img_size, MAX_IMG_SIZE)?;
        size("tokenizer.patch_size", t.patch_size, MAX_IMG_SIZE)?;
        size("tokenizer.encoder_width", t.encoder_width, MAX_WIDTH)?;
        size("tokenizer.encoder_depth", t.encoder_depth, MAX_DEPTH)?;
        size("tokenizer.encoder_heads", t.encoder_heads, MAX_WIDTH)?;
        size(
            "tokenizer.encoder_head_dim_out",
            t.encoder_head_dim_out,
            MAX_WIDTH,
        )?;
        size("tokenizer.merger_depth", t.merger_depth, MAX_DEPTH)?;
        size("tokenizer.merger_heads", t.merger_heads, MAX_WIDTH)?;
        size("tokenizer.n_code", t.n_code, MAX_VOCAB)?;
        size("tokenizer.code_dim", t.code_dim, MAX_WIDTH)?;
        size("tokenizer.llm_hidden", t.llm_hidden, MAX_WIDTH)?;
        real(
            "tokenizer.encoder_mlp_ratio",
            t.encoder_mlp_ratio,
            0.0,
            MAX_MLP_RATIO,
            true,
        )?;
        real(
            "tokenizer.merger_mlp_ratio",
            t.merger_mlp_ratio,
            0.0,
            MAX_MLP_RATIO,
            true,
        )?;
        real(
            "tokenizer.encoder_norm_eps",
            t.encoder_norm_eps,
            0.0,
            1.0,
            false,
        )?;
        real(
            "tokenizer.merger_norm_eps",
            t.merger_norm_eps,
            0.0,
            1.0,
            false,
        )?;
        if t.img_size % t.patch_size != 0 {
            return bad(
                "tokenizer.img_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    t.img_size, t.patch_size
                ),
            );
        }
        if t.num_patches() > MAX_PATCHES {
            return bad(
                "tokenizer.patch_size",
                format!(
                    "img_size {} / patch_size {} gives {} patches, over the cap of {MAX_PATCHES}",
                    t.img_size,
                    t.patch_size,
                    t.num_patches()
                ),
            );
        }
        divides(
            "tokenizer.encoder_heads",
            t.encoder_heads,
            "encoder_width",
            t.encoder_width,
        )?;
        divides(
            "tokenizer.merger_heads",
            t.merger_heads,
            "encoder_width",
            t.encoder_width,
        )?;
        for (key, ratio, w) in [
            (
                "tokenizer.encoder_mlp_ratio",
                t.encoder_mlp_ratio,
                t.encoder_width,
            ),
            (
                "tokenizer.merger_mlp_ratio",
                t.merger_mlp_ratio,
                t.encoder_width,
            ),
        ] {
            mlp_hidden(origin, key, w, ratio)?;
        }

        let f = &self.feature_decoder;
        size("feature_decoder.depth", f.depth, MAX_DEPTH)?;
        size("feature_decoder.heads", f.heads, MAX_WIDTH)?;
        size("feature_decoder.embed_dim", f.embed_dim, MAX_WIDTH)?;
        size("feature_decoder.in_chans", f.in_chans, MAX_WIDTH)?;
        size(
            "feature_decoder.decoder_out_dim",
            f.decoder_out_dim,
            MAX_WIDTH,
        )?;
        size(
            "feature_decoder.lowres_unet_proj",
            f.lowres_unet_proj,
            MAX_WIDTH,
        )?;
        size(
            "feature_decoder.highres_unet_proj_1",
            f.highres_unet_proj_1,
            MAX_WIDTH,
        )?;
        size(
            "feature_decoder.highres_unet_proj_2",
            f.highres_unet_proj_2,
            MAX_WIDTH,
        )?;
        size(
            "feature_decoder.highres_attnpool_heads",
            f.highres_attnpool_heads,
            MAX_WIDTH,
        )?;
        size("feature_decoder.num_patches", f.num_patches, MAX_PATCHES)?;
        real(
            "feature_decoder.mlp_ratio",
            f.mlp_ratio,
            0.0,
            MAX_MLP_RATIO,
            true,
        )?;
        mlp_hidden(
            origin,
            "feature_decoder.mlp_ratio",
            f.embed_dim,
            f.mlp_ratio,
        )?;
        divides("feature_decoder.heads", f.heads, "embed_dim", f.embed_dim)?;
        divides(
            "feature_decoder.highres_attnpool_heads",
            f.highres_attnpool_heads,
            "decoder_out_dim",
            f.decoder_out_dim,
        )?;
        if f.in_chans != t.code_dim {
            return bad(
                "feature_decoder.in_chans",
                format!(
                    "{} differs from tokenizer.code_dim {} (the decoders read the codebook vectors)",
                    f.in_chans, t.code_dim
                ),
            );
        }

        let l = &self.llm;
        if let Some(q) = &l.quantization {
            match QuantMode::parse(&q.mode, q.group_size) {
                Ok(QuantMode::None) => {
                    return bad(
                        "llm.quantization.mode",
                        "`none` is not a stored quantisation (leave llm.quantization out)".into(),
                    )
                }
                Ok(QuantMode::Int8) if q.group_size.is_some() => {
                    return bad(
                        "llm.quantization.group_size",
                        "int8 has one scale per output channel, no group size".into(),
                    )
                }
                Ok(_) => {}
                Err((group, msg)) => {
                    let key = if group {
                        "llm.quantization.group_size"
                    } else {
                        "llm.quantization.mode"
                    };
                    return bad(key, msg);
                }
            }
        }
        size("llm.vocab_size", l.vocab_size, MAX_VOCAB)?;
        size("llm.text_vocab_size", l.text_vocab_size, l.vocab_size)?;
        let in_vocab = |key: &str, v: i64| -> Result<()> {
            if !(0..l.vocab_size).contains(&v) {
                bad(
                    key,
                    format!("id {v} is outside the vocabulary 0..{}", l.vocab_size),
                )
            } else {
                Ok(())
            }
        };
        in_vocab("llm.image_start_id", l.image_start_id)?;
        in_vocab("llm.image_end_id", l.image_end_id)?;
        in_vocab("llm.bos_id", l.bos_id)?;
        in_vocab("llm.eos_id", l.eos_id)?;
        in_vocab("llm.visual_token_offset", l.visual_token_offset)?;
        if l.image_start_id == l.image_end_id {
            return bad(
                "llm.image_end_id",
                format!("{} equals image_start_id", l.image_end_id),
            );
        }
        // Checked: both are capped above, but the sum is the one that must fit.
        let visual_end = l.visual_token_offset.checked_add(t.n_code);
        if visual_end.is_none_or(|e| e > l.vocab_size) {
            return bad(
                "llm.vocab_size",
                format!(
                    "{} is smaller than visual_token_offset {} + n_code {}",
                    l.vocab_size, l.visual_token_offset, t.n_code
                ),
            );
        }
        if l.visual_token_offset < l.text_vocab_size {
            return bad(
                "llm.visual_token_offset",
                format!(
                    "{} overlaps the text ids 0..{}",
                    l.visual_token_offset, l.text_vocab_size
                ),
            );
        }
        for (key, id) in [
            ("llm.image_start_id", l.image_start_id),
            ("llm.image_end_id", l.image_end_id),
        ] {
            if (l.visual_token_offset..l.vocab_size).contains(&id) {
                return bad(
                    key,
                    format!(
                        "id {id} lies among the visual ids {}..{}",
                        l.visual_token_offset, l.vocab_size
                    ),
                );
            }
        }

        let g = &self.generation;
        size(
            "generation.t2i_max_new_tokens",
            g.t2i_max_new_tokens,
            MAX_NEW_TOKENS,
        )?;
        size(
            "generation.caption_max_new_tokens",
            g.caption_max_new_tokens,
            MAX_NEW_TOKENS,
        )?;
        if !(0..=g.t2i_max_new_tokens).contains(&g.t2i_min_new_tokens) {
            return bad(
                "generation.t2i_min_new_tokens",
                format!(
                    "must be in 0..=t2i_max_new_tokens ({}), got {}",
                    g.t2i_max_new_tokens, g.t2i_min_new_tokens
                ),
            );
        }
        size("generation.ddim_steps", g.ddim_steps, MAX_STEPS)?;
        if !(0..MAX_TRAIN_TIMESTEPS).contains(&g.unet_timestep) {
            return bad(
                "generation.unet_timestep",
                format!(
                    "must be in 0..{MAX_TRAIN_TIMESTEPS}, got {}",
                    g.unet_timestep
                ),
            );
        }
        if g.cfg_scales.len() > 64 {
            return bad(
                "generation.cfg_scales",
                format!("{} entries, at most 64", g.cfg_scales.len()),
            );
        }
        for &c in &g.cfg_scales {
            real("generation.cfg_scales", c, 0.0, MAX_GUIDANCE, false)?;
        }
        real(
            "generation.decoder_guidance",
            g.decoder_guidance,
            0.0,
            MAX_GUIDANCE,
            false,
        )?;
        real(
            "generation.lowres_decoder_guidance",
            g.lowres_decoder_guidance,
            0.0,
            MAX_GUIDANCE,
            false,
        )?;
        Ok(())
    }

    /// Refuse generation lengths the language model cannot hold: `t2i_max_new_tokens` and
    /// `caption_max_new_tokens` must fit in its context (`max_position_embeddings` of its
    /// `config.json`, named by `config_origin`).
    pub fn check_context(&self, origin: &str, context: i64) -> Result<()> {
        let g = &self.generation;
        for (key, v) in [
            ("generation.t2i_max_new_tokens", g.t2i_max_new_tokens),
            (
                "generation.caption_max_new_tokens",
                g.caption_max_new_tokens,
            ),
        ] {
            if v >= context {
                return Err(Error::config(
                    origin,
                    key,
                    format!(
                        "{v} new tokens do not fit the language model's context of {context} positions (max_position_embeddings)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `int(width * mlp_ratio)` (the MLP hidden width) must be at least 1 and under the cap.
fn mlp_hidden(origin: &str, key: &str, width: i64, ratio: f64) -> Result<()> {
    let h = width as f64 * ratio;
    if !(1.0..=(caps::MAX_WIDTH * caps::MAX_MLP_RATIO as i64) as f64).contains(&h) {
        return Err(Error::config(
            origin,
            key,
            format!("{ratio} × width {width} gives an MLP width of {h}"),
        ));
    }
    Ok(())
}

/// The caps [`LavitManifest::validate`] enforces: far above any published LaVIT
/// (LaVIT-7B-v2: 224 px, width 1408, 40 blocks, vocabulary 48386), far below what would
/// make one tensor's size overflow or a loop run for days.
pub mod caps {
    /// Largest image side, in pixels.
    pub const MAX_IMG_SIZE: i64 = 4096;
    /// Largest width of any layer (hidden sizes, codebook dimension, head counts).
    pub const MAX_WIDTH: i64 = 1 << 16;
    /// Most blocks in one stack.
    pub const MAX_DEPTH: i64 = 1024;
    /// Largest vocabulary or codebook.
    pub const MAX_VOCAB: i64 = 1 << 22;
    /// Most patches (tokens) per image.
    pub const MAX_PATCHES: i64 = 1 << 16;
    /// Largest MLP ratio.
    pub const MAX_MLP_RATIO: f64 = 64.0;
    /// Longest generation, in tokens (also capped by the LLM's context).
    pub const MAX_NEW_TOKENS: i64 = 1 << 16;
    /// Most diffusion sampling steps.
    pub const MAX_STEPS: i64 = 1000;
    /// Most diffusion training timesteps (`num_train_timesteps`).
    pub const MAX_TRAIN_TIMESTEPS: i64 = 100_000;
    /// Largest guidance scale.
    pub const MAX_GUIDANCE: f64 = 1000.0;
}
