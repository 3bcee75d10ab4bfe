//! The down, mid and up blocks of `UNet2DConditionModel` (reference:
//! `diffusers/models/unets/unet_2d_blocks.py`: `DownBlock2D`, `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D`, `CrossAttnUpBlock2D`). A block with an empty
//! `attentions` list is the plain variant.

use lavit_runtime::{Error, Result};
use tch::{nn, nn::Module, Tensor};

use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use crate::transformer_2d::{Transformer2DModel, Transformer2DModelConfig};

/// What the blocks of one U-Net share.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    /// Resnets per block (up blocks get one more).
    pub num_layers: i64,
    /// Time-embedding width.
    pub temb_channels: i64,
    /// GroupNorm groups.
    pub resnet_groups: i64,
    /// GroupNorm epsilon.
    pub resnet_eps: f64,
    /// Resnet output divisor.
    pub output_scale_factor: f64,
    /// The transformers of this block, or `None` for a plain block.
    pub transformer: Option<Transformer2DModelConfig>,
}

impl BlockConfig {
    fn resnet(&self, out_channels: i64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            out_channels: Some(out_channels),
            temb_channels: Some(self.temb_channels),
            groups: self.resnet_groups,
            groups_out: None,
            eps: self.resnet_eps,
            output_scale_factor: self.output_scale_factor,
        }
    }
}

/// The conditioning every cross-attention layer reads.
pub struct Context<'a> {
    /// (B, Lk, cross_dim).
    pub hidden_states: &'a Tensor,
    /// Additive bias (B, 1, 1, Lk) made from the encoder attention mask.
    pub bias: Option<&'a Tensor>,
}

/// `DownBlock2D` / `CrossAttnDownBlock2D`.
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        config: BlockConfig,
        add_downsample: bool,
        downsample_padding: i64,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..config.num_layers {
            let inc = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::new(
                &vs / "resnets" / i,
                inc,
                config.resnet(out_channels),
            ));
            if let Some(t) = config.transformer {
                attentions.push(Transformer2DModel::new(
                    &vs / "attentions" / i,
                    out_channels,
                    t,
                ));
            }
        }
        let downsampler = add_downsample.then(|| {
            Downsample2D::new(
                &vs / "downsamplers" / 0,
                out_channels,
                out_channels,
                downsample_padding,
            )
        });
        Self {
            resnets,
            attentions,
            downsampler,
        }
    }

    /// Returns the block output and the skip states it contributes.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        ctx: &Context<'_>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = xs.shallow_clone();
        let mut states = Vec::new();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, ctx.hidden_states, ctx.bias)?;
            }
            states.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h);
            states.push(h.shallow_clone());
        }
        Ok((h, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// `config.num_layers` = the number of (transformer, resnet) pairs (1 in diffusers);
    /// `config.transformer` must be set (this block always has transformers).
    pub fn new(vs: nn::Path, channels: i64, config: BlockConfig) -> Result<Self> {
        let Some(t) = config.transformer else {
            return Err(Error::invalid(
                "UNetMidBlock2DCrossAttn: the block config has no transformer",
            ));
        };
        let mut resnets = vec![ResnetBlock2D::new(
            &vs / "resnets" / 0,
            channels,
            config.resnet(channels),
        )];
        let mut attentions = Vec::new();
        for i in 0..config.num_layers {
            attentions.push(Transformer2DModel::new(&vs / "attentions" / i, channels, t));
            resnets.push(ResnetBlock2D::new(
                &vs / "resnets" / (i + 1),
                channels,
                config.resnet(channels),
            ));
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, ctx: &Context<'_>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(xs, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, ctx.hidden_states, ctx.bias)?;
            h = resnet.forward(&h, Some(temb));
        }
        Ok(h)
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `config.num_layers` is the resnet count of this up block (`layers_per_block + 1`).
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        prev_output_channel: i64,
        out_channels: i64,
        config: BlockConfig,
        add_upsample: bool,
    ) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..config.num_layers {
            let res_skip = if i == config.num_layers - 1 {
                in_channels
            } else {
                out_channels
            };
            let resnet_in = if i == 0 {
                prev_output_channel
            } else {
                out_channels
            };
            resnets.push(ResnetBlock2D::new(
                &vs / "resnets" / i,
                resnet_in + res_skip,
                config.resnet(out_channels),
            ));
            if let Some(t) = config.transformer {
                attentions.push(Transformer2DModel::new(
                    &vs / "attentions" / i,
                    out_channels,
                    t,
                ));
            }
        }
        let upsampler = add_upsample
            .then(|| Upsample2D::new(&vs / "upsamplers" / 0, out_channels, out_channels));
        Self {
            resnets,
            attentions,
            upsampler,
        }
    }

    /// Number of skip states this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are consumed from the end (the last pushed first), as diffusers does;
    /// `upsample_size` is the spatial size of the next block's skips.
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        ctx: &Context<'_>,
        upsample_size: Option<(i64, i64)>,
    ) -> Result<Tensor> {
        let mut h = xs.shallow_clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = &skips[skips.len() - 1 - i];
            h = Tensor::cat(&[&h, skip], 1); // (B, C + C_skip, H, W)
            h = resnet.forward(&h, Some(temb));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, ctx.hidden_states, ctx.bias)?;
            }
        }
        Ok(match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => h,
        })
    }
}
