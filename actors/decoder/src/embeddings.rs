//! Timestep embeddings of the diffusion U-Net, as diffusers builds them
//! (Ho et al. 2020 sinusoidal embedding; reference: `diffusers/models/embeddings.py`:
//! `get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).

use tch::{nn, nn::Module, Kind, Tensor};

/// Sinusoidal embedding of 1-D `timesteps` (fractional allowed) into `dim` channels.
/// Computed in float32 as diffusers does.
pub fn get_timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    // exponent = -ln(10000) * arange(half) / (half - shift)
    let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()))
        / (half as f64 - downscale_freq_shift);
    let freqs = exponent.exp();
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0); // (N, half)
    let (first, second) = if flip_sin_to_cos {
        (emb.cos(), emb.sin())
    } else {
        (emb.sin(), emb.cos())
    };
    let emb = Tensor::cat(&[first, second], -1); // (N, 2*half)
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `Timesteps`: the parameter-free sinusoidal projection.
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub num_channels: i64,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        get_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
        )
    }
}

/// `TimestepEmbedding`: `linear_1` → SiLU → `linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(vs: nn::Path, in_channels: i64, time_embed_dim: i64) -> Self {
        let linear_1 = nn::linear(
            &vs / "linear_1",
            in_channels,
            time_embed_dim,
            Default::default(),
        );
        let linear_2 = nn::linear(
            &vs / "linear_2",
            time_embed_dim,
            time_embed_dim,
            Default::default(),
        );
        Self { linear_1, linear_2 }
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}
