//! Timestep embeddings of the diffusion U-Net, as diffusers builds them
//! (Ho et al. 2020 sinusoidal embedding; reference: `diffusers/models/embeddings.py`:
//! `get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).

use lavit_runtime::layers;
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
        let linear_1 = layers::linear(
            &vs / "linear_1",
            in_channels,
            time_embed_dim,
            Default::default(),
        );
        let linear_2 = layers::linear(
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

/// `AttentionPooling` (diffusers, from DeepFloyd IF): a class token (the mean of the sequence
/// plus a learned `positional_embedding`) attends over itself and the sequence; its output is
/// the pooled vector.
#[derive(Debug)]
pub struct AttentionPooling {
    positional_embedding: Tensor,
    k_proj: nn::Linear,
    q_proj: nn::Linear,
    v_proj: nn::Linear,
    num_heads: i64,
}

impl AttentionPooling {
    pub fn new(vs: nn::Path, num_heads: i64, embed_dim: i64) -> Self {
        let positional_embedding = layers::var(
            &vs,
            "positional_embedding",
            &[1, embed_dim],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (embed_dim as f64).sqrt(),
            },
        );
        let lin = |name: &str| layers::linear(&vs / name, embed_dim, embed_dim, Default::default());
        Self {
            positional_embedding,
            k_proj: lin("k_proj"),
            q_proj: lin("q_proj"),
            v_proj: lin("v_proj"),
            num_heads,
        }
    }

    /// (B, L, W) → (B, W).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, w) = (x.size()[0], x.size()[2]);
        let (nh, hd) = (self.num_heads, w / self.num_heads);
        let kind = x.kind();
        let class_token = x.mean_dim(1, true, kind) + self.positional_embedding.to_kind(kind); // (B, 1, W)
        let x = Tensor::cat(&[&class_token, x], 1); // (B, L+1, W)
        let heads = |t: Tensor| {
            t.view([b, -1, nh, hd]) // (B, T, nh, hd)
                .transpose(1, 2) // (B, nh, T, hd)
        };
        let q = heads(self.q_proj.forward(&class_token)); // (B, nh, 1, hd)
        let k = heads(self.k_proj.forward(&x)); // (B, nh, L+1, hd)
        let v = heads(self.v_proj.forward(&x));
        // scale both sides by hd^(-1/4), as diffusers does
        let scale = 1.0 / (hd as f64).sqrt().sqrt();
        let weight = (q * scale).matmul(&(k * scale).transpose(-1, -2)); // (B, nh, 1, L+1)
        let weight = weight
            .to_kind(Kind::Float)
            .softmax(-1, Kind::Float)
            .to_kind(kind);
        weight
            .matmul(&v) // (B, nh, 1, hd)
            .transpose(1, 2) // (B, 1, nh, hd)
            .reshape([b, w])
    }
}

/// `TextTimeEmbedding`: the `addition_embed_type = "text"` conditioning of diffusers'
/// `UNet2DConditionModel` — `norm1` → attention pooling of the encoder hidden states → `proj`
/// to the time-embedding width → `norm2`; added to the timestep embedding.
#[derive(Debug)]
pub struct TextTimeEmbedding {
    norm1: layers::LayerNorm,
    pool: AttentionPooling,
    proj: nn::Linear,
    norm2: layers::LayerNorm,
}

impl TextTimeEmbedding {
    pub fn new(vs: nn::Path, encoder_dim: i64, time_embed_dim: i64, num_heads: i64) -> Self {
        Self {
            norm1: layers::layer_norm(&vs / "norm1", vec![encoder_dim], Default::default()),
            pool: AttentionPooling::new(&vs / "pool", num_heads, encoder_dim),
            proj: layers::linear(
                &vs / "proj",
                encoder_dim,
                time_embed_dim,
                Default::default(),
            ),
            norm2: layers::layer_norm(&vs / "norm2", vec![time_embed_dim], Default::default()),
        }
    }
}

impl Module for TextTimeEmbedding {
    /// (B, L, encoder_dim) → (B, time_embed_dim).
    fn forward(&self, hidden_states: &Tensor) -> Tensor {
        let h = self.pool.forward(&self.norm1.forward(hidden_states));
        self.norm2.forward(&self.proj.forward(&h))
    }
}
