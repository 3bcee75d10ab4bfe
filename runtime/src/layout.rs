//! The layout of a LaVIT checkpoint folder (the official LaVIT-7B-v2 release and what
//! `lavit train` / `lavit demo` export): file names, and which key prefixes of
//! `tokenizer_encoder` belong to which stage. Every stage loader finds its files here.

use std::path::{Path, PathBuf};

use crate::checkpoint::StateDict;
use crate::{Error, Result};

/// Official file names inside a checkpoint folder (without extension: `.bin` or
/// `.safetensors` are both accepted).
pub mod files {
    pub const EVA: &str = "visual_tokenizer/eva_vitg_psz14";
    pub const TOKENIZER_ENCODER: &str = "visual_tokenizer/tokenizer_encoder";
    pub const LOWRES_DECODER: &str = "visual_tokenizer/tokenizer_decoder";
    pub const HIGHRES_DECODER: &str = "visual_tokenizer/highres_tokenizer_decoder";
    pub const VISUAL_WEIGHT: &str = "language_model/visual_weight";
    /// A plugin backbone's weights (`Backbone::state_dict`, safetensors), written by
    /// `lavit train tokenizer` in place of the EVA file.
    pub const PLUGIN_BACKBONE: &str = "visual_tokenizer/backbone";
    /// A plugin codebook's weights (`Codebook::state_dict`, safetensors), written in place
    /// of `quantize.*` in `tokenizer_encoder`.
    pub const PLUGIN_CODEBOOK: &str = "visual_tokenizer/codebook";
    /// A plugin denoiser's weights (`Denoiser::state_dict`, safetensors), in a pixel-decoding
    /// folder beside `denoiser.json` (written by `lavit train decoder`).
    pub const PLUGIN_DENOISER: &str = "denoiser";
}

/// `dir/<name>.bin`, else `dir/<name>.safetensors`; an error naming both if neither exists.
pub fn resolve_file(dir: &Path, name: &str) -> Result<PathBuf> {
    for ext in ["bin", "safetensors"] {
        let p = dir.join(format!("{name}.{ext}"));
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::invalid(format!(
        "{}: neither {name}.bin nor {name}.safetensors exists",
        dir.display()
    )))
}

/// Key prefixes of `tokenizer_encoder` the SelectorMerger stage loads (the selector, the
/// merger and the projector of continuous features into the LLM).
pub const SELECTOR_MERGER_PREFIXES: [&str; 3] =
    ["token_predictor.", "causal_encoder.", "vit_proj."];
/// Key prefixes of `tokenizer_encoder` the Quantizer stage loads.
pub const QUANTIZER_PREFIXES: [&str; 2] = ["encode_task_layer.", "quantize."];

/// The keys of `sd` under any of `prefixes` (shallow copies), for one stage's strict load.
pub fn subset(sd: &StateDict, prefixes: &[&str]) -> StateDict {
    sd.iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect()
}

/// Every key of a `tokenizer_encoder` file belongs to one stage: a key no stage loads is
/// refused here (each stage's own load reports its missing keys), so the split load is as
/// strict as one load of the whole file.
pub fn check_tokenizer_encoder_keys(sd: &StateDict, source: &str) -> Result<()> {
    let mut stray: Vec<&str> = sd
        .keys()
        .map(String::as_str)
        .filter(|k| {
            !SELECTOR_MERGER_PREFIXES
                .iter()
                .chain(QUANTIZER_PREFIXES.iter())
                .any(|p| k.starts_with(p))
        })
        .collect();
    if stray.is_empty() {
        return Ok(());
    }
    stray.sort_unstable();
    let n = stray.len();
    stray.truncate(8);
    Err(Error::ckpt(
        source,
        format!(
            "{n} unexpected key(s) that no stage loads: {}{}",
            stray.join(", "),
            if n > 8 { ", …" } else { "" }
        ),
    ))
}
