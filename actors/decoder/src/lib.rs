//! lavit-decoder: tokens back to pixels — the feature decoders, the diffusion U-Net, the VAE
//! and the schedulers.

pub mod feature_decoder;
