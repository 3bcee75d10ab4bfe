//! The `lavit` command line: one module per subcommand. Every command that runs the models
//! (`tokenize`, `caption`, `generate`, `reconstruct`, `serve`) goes through the one inference
//! path, [`lavit::pipeline::Pipeline`]; the one-shot commands build it with [`one_shot`].
pub mod caption;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod parity;
pub mod quantize;
pub mod reconstruct;
pub mod serve;
pub mod tokenize;
pub mod train;

use std::path::Path;

use anyhow::Context;
use lavit::pipeline::{Pipeline, PipelineConfig, StageSet};
use lavit_runtime::stage::Placement;

/// A pipeline for one command: the stages `stages` of `checkpoint` (each loaded by its own
/// stage loader, the others left out), the `[pipeline]` and `[plugins]` of `config` when
/// given (the serving config; `LAVIT__PIPELINE__*` overrides apply either way), every stage
/// on `device` when given (else the config's placement), and `tweak` for the command's own
/// settings. Returns it with a runtime to wait on its requests.
pub fn one_shot(
    checkpoint: &Path,
    config: Option<&Path>,
    device: Option<&str>,
    stages: StageSet,
    tweak: impl FnOnce(&mut PipelineConfig),
) -> anyhow::Result<(Pipeline, tokio::runtime::Runtime)> {
    let mut cfg = PipelineConfig::load(config)?;
    cfg.checkpoint = Some(checkpoint.to_path_buf());
    cfg.stages = stages;
    if let Some(d) = device {
        cfg.placement = Placement {
            encoder: d.into(),
            selector_merger: d.into(),
            quantizer: d.into(),
            llm: d.into(),
            decoder: d.into(),
            ..cfg.placement
        };
        cfg.placement_file = None;
    }
    tweak(&mut cfg);
    cfg.validate("the command line")?;
    let pipe =
        Pipeline::build(&cfg).with_context(|| format!("loading {}", checkpoint.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok((pipe, rt))
}

/// Most images one prompt may ask for on the command line (`lavit generate --num-images`,
/// `lavit eval --images-per-prompt`): each is a full diffusion run held in memory.
pub const MAX_IMAGES_PER_PROMPT: usize = lavit_runtime::stage::MAX_IMAGES_PER_REQUEST;

/// Read and decode an image file for a command through the same checks the server applies:
/// the capped regular-file reader (never a FIFO or a device), then the one limited decoder
/// ([`lavit_runtime::image_input`]).
pub fn read_image(path: &Path) -> anyhow::Result<image::DynamicImage> {
    let lim = lavit_runtime::image_input::ImageLimits::default();
    Ok(lavit_runtime::image_input::read(path, &lim)?)
}

/// `lavit completions SHELL`: the completion script for `cmd` on stdout.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) {
    clap_complete::generate(shell, cmd, "lavit", &mut std::io::stdout());
}
