//! Parity rows of the tokenizer stages: the EVA encoder, selector, merger, quantizer,
//! understanding head and both feature decoders, recomputed from the reference `images`
//! and the checkpoint folder with the normal loading code
//! ([`VisualTokenizer::from_checkpoint_with_encoder`]).

use std::path::Path;

use anyhow::{Context, Result};
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_runtime::checkpoint::StateDict;
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::parity::{compare, ParityRow};
use lavit_selector::SelectionMode;
use tch::{Device, Tensor};

use crate::tokenizer::{files, resolve_file, LoadParts, VisualTokenizer};

/// The reference tensors this group computes.
pub const ROWS: &[&str] = &[
    "encoder_features",
    "predictor_log_probs",
    "keep_decisions",
    "merged_features",
    "token_counts",
    "token_ids",
    "quantized_embeddings",
    "understanding_counts",
    "understanding_embeddings",
    "lowres_decoder_out",
    "highres_prompt_embeds",
    "highres_pooled_embeds",
];

/// Recompute this group's reference tensors from the checkpoint folder `dir`.
pub fn rows(dir: &Path, expected: &StateDict) -> Result<Vec<ParityRow>> {
    let Some(images) = expected.get("images") else {
        anyhow::bail!("reference/expected.safetensors has no `images` input");
    };
    let _g = tch::no_grad_guard();
    let device = Device::Cpu;
    let manifest = LavitManifest::for_checkpoint(dir)?;
    let eva_path = resolve_file(dir, files::EVA)?;
    let eva = EvaBackbone::load(
        &eva_path,
        &EvaVitConfig::from_manifest(&manifest.tokenizer),
        device,
        tch::Kind::Float,
    )?;
    let encoder_features = eva.model.forward_all_features(images)?;
    let tok =
        VisualTokenizer::from_checkpoint_with_encoder(dir, device, LoadParts::all(), Box::new(eva))
            .with_context(|| format!("loading the visual tokenizer from {}", dir.display()))?;

    let mode = SelectionMode::Argmax;
    let tr = tok.trace(images, mode)?;
    let tokenized = tok.tokenize_with(images, mode)?;
    let flat_ids: Vec<i64> = tokenized.ids.concat();
    let (quantized, _) = tok.embed_ids(&tokenized.ids)?;
    let (und, und_counts) = tok.encode_features(images, mode)?;
    let lowres = tok.decode_lowres(&tokenized.ids)?;
    let (prompt, pooled) = tok.decode_highres(&tokenized.ids)?;

    let ours: Vec<(&str, Tensor)> = vec![
        ("encoder_features", encoder_features),
        ("predictor_log_probs", tr.log_probs),
        ("keep_decisions", tr.decisions),
        ("merged_features", tr.merged),
        ("token_counts", Tensor::from_slice(&tokenized.counts)),
        ("token_ids", Tensor::from_slice(&flat_ids)),
        ("quantized_embeddings", quantized),
        ("understanding_counts", Tensor::from_slice(&und_counts)),
        ("understanding_embeddings", und),
        ("lowres_decoder_out", lowres),
        ("highres_prompt_embeds", prompt),
        ("highres_pooled_embeds", pooled),
    ];
    Ok(ours
        .into_iter()
        .filter_map(|(name, t)| expected.get(name).map(|r| compare(name, &t, r)))
        .collect())
}
