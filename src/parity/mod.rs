//! Parity with the reference implementations: every tensor of `reference/expected.safetensors`
//! is recomputed by one of the stage groups below, with the normal loading code.

pub mod llm;
pub mod pixel;
pub mod tokenizer;

use std::path::Path;

use anyhow::{Context, Result};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::parity::ParityRow;

/// What `lavit parity` reports.
pub struct ParityReport {
    pub rows: Vec<ParityRow>,
    /// Reference tensors no group computed (each counts as a failure).
    pub not_computed: Vec<String>,
}

/// Inputs of the reference (e.g. `images`, `initial_latents`) that are not outputs.
pub const INPUTS: &[&str] = &[
    "images",
    "initial_latents",
    "unet_timestep",
    "unet_lowres_mask",
    "unet_highres_time_ids",
    "mixed_sequence",
    "understanding_inputs_embeds",
];

pub fn run(dir: &Path) -> Result<ParityReport> {
    let expected_path = dir.join("reference/expected.safetensors");
    let expected: StateDict = checkpoint::load_file(&expected_path)
        .with_context(|| format!("reading references from {}", expected_path.display()))?;
    let mut rows = Vec::new();
    rows.extend(tokenizer::rows(dir, &expected)?);
    rows.extend(llm::rows(dir, &expected)?);
    rows.extend(pixel::rows(dir, &expected)?);
    let not_computed = expected
        .keys()
        .filter(|k| !INPUTS.contains(&k.as_str()) && !rows.iter().any(|r| &r.name == *k))
        .cloned()
        .collect();
    Ok(ParityReport { rows, not_computed })
}
