//! lavit-decoder: tokens back to pixels — the feature decoders, the diffusion U-Net (the
//! built-in [`lavit_plugin_api::Denoiser`], [`UNetDenoiser`]), the VAE
//! and the schedulers (LaVIT, ICLR 2024, pixel decoding; diffusers-compatible names); the
//! assembled [`pixel_decoder`], the Decoder [`stage`] of the pipeline and its training state
//! ([`train`]).

pub mod attention;
pub mod denoiser;
pub mod embeddings;
pub mod feature_decoder;
pub mod pixel_decoder;
pub mod resnet;
pub mod schedulers;
pub mod stage;
pub mod train;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;

pub use denoiser::UNetDenoiser;
pub use schedulers::{DDIMScheduler, EulerDiscreteScheduler, Scheduler, SchedulerConfig};
pub use unet_2d_condition::{AddedCond, UNet2DConditionModel, UNet2DConditionModelConfig};
pub use vae::{AutoencoderKL, AutoencoderKLConfig};
