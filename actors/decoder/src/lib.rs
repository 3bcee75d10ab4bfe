//! lavit-decoder: tokens back to pixels — the feature decoders, the diffusion U-Net, the VAE
//! and the schedulers (LaVIT, ICLR 2024, pixel decoding; diffusers-compatible names).

pub mod attention;
pub mod embeddings;
pub mod feature_decoder;
pub mod resnet;
pub mod schedulers;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;

pub use schedulers::{DDIMScheduler, EulerDiscreteScheduler, Scheduler, SchedulerConfig};
pub use unet_2d_condition::{AddedCond, UNet2DConditionModel, UNet2DConditionModelConfig};
pub use vae::{AutoencoderKL, AutoencoderKLConfig};
