//! `Transformer2DModel` (continuous input) as diffusers builds it (reference:
//! `diffusers/models/transformers/transformer_2d.py`): GroupNorm, `proj_in` (1×1 conv, or
//! linear with `use_linear_projection`), `transformer_blocks`, `proj_out`, residual.

use lavit_runtime::layers;
use lavit_runtime::shape::dims;
use lavit_runtime::Result;
use tch::{nn, nn::Module, Tensor};

use crate::attention::BasicTransformerBlock;
use crate::resnet::group_norm;

/// Configuration of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DModelConfig {
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Width of one head.
    pub attention_head_dim: i64,
    /// Number of `BasicTransformerBlock`s.
    pub num_layers: i64,
    /// Width of the cross-attention context.
    pub cross_attention_dim: i64,
    /// GroupNorm groups of `norm`.
    pub norm_num_groups: i64,
    /// Linear `proj_in`/`proj_out` instead of 1×1 convs.
    pub use_linear_projection: bool,
}

impl Default for Transformer2DModelConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 16,
            attention_head_dim: 88,
            num_layers: 1,
            cross_attention_dim: 768,
            norm_num_groups: 32,
            use_linear_projection: false,
        }
    }
}

#[derive(Debug)]
enum Proj {
    Conv(layers::Conv2d),
    Linear(nn::Linear),
}

/// Spatial transformer over a (B, C, H, W) feature map.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: layers::GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2DModel {
    pub fn new(vs: nn::Path, in_channels: i64, config: Transformer2DModelConfig) -> Self {
        let inner = config.num_attention_heads * config.attention_head_dim;
        let norm = group_norm(&vs / "norm", config.norm_num_groups, in_channels, 1e-6);
        let proj = |name: &str, i: i64, o: i64| {
            if config.use_linear_projection {
                Proj::Linear(layers::linear(&vs / name, i, o, Default::default()))
            } else {
                Proj::Conv(layers::conv2d(&vs / name, i, o, 1, Default::default()))
            }
        };
        let proj_in = proj("proj_in", in_channels, inner);
        let transformer_blocks = (0..config.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &vs / "transformer_blocks" / i,
                    inner,
                    config.num_attention_heads,
                    config.attention_head_dim,
                    config.cross_attention_dim,
                )
            })
            .collect();
        let proj_out = proj("proj_out", inner, in_channels);
        Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
        }
    }

    /// `xs` (B, C, H, W), `context` (B, Lk, cross_dim), `context_bias` (B, 1, 1, Lk).
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        context_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let [b, c, h, w] = dims(xs, "transformer input (B, C, H, W)")?;
        let normed = self.norm.forward(xs);
        let mut hs = match &self.proj_in {
            Proj::Conv(conv) => {
                let t = conv.forward(&normed);
                let inner = t.size()[1];
                t.permute([0, 2, 3, 1]).reshape([b, h * w, inner]) // (B, HW, inner)
            }
            Proj::Linear(lin) => {
                lin.forward(&normed.permute([0, 2, 3, 1]).reshape([b, h * w, c]))
                // (B, HW, inner)
            }
        };
        for block in &self.transformer_blocks {
            hs = block.forward(&hs, context, context_bias)?;
        }
        let inner = hs.size()[2];
        let out = match &self.proj_out {
            Proj::Conv(conv) => {
                conv.forward(&hs.reshape([b, h, w, inner]).permute([0, 3, 1, 2]))
                // (B, C, H, W)
            }
            Proj::Linear(lin) => lin.forward(&hs).reshape([b, h, w, c]).permute([0, 3, 1, 2]), // (B, C, H, W)
        };
        Ok(out + xs)
    }
}
