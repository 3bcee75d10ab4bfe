//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` as diffusers builds them (reference:
//! `diffusers/models/resnet.py`, `downsampling.py`, `upsampling.py`).

use lavit_runtime::layers;
use tch::{nn, nn::Module, Tensor};

/// Configuration of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    /// Output channels (`None` = the input channels).
    pub out_channels: Option<i64>,
    /// Width of the time embedding; `None` for the VAE (no `time_emb_proj`).
    pub temb_channels: Option<i64>,
    /// GroupNorm groups of `norm1`.
    pub groups: i64,
    /// GroupNorm groups of `norm2` (`None` = `groups`).
    pub groups_out: Option<i64>,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// The residual sum is divided by this.
    pub output_scale_factor: f64,
}

impl Default for ResnetBlock2DConfig {
    fn default() -> Self {
        Self {
            out_channels: None,
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            output_scale_factor: 1.0,
        }
    }
}

/// GroupNorm → SiLU → conv, twice, with the time embedding added in between.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: layers::GroupNorm,
    conv1: layers::Conv2d,
    time_emb_proj: Option<nn::Linear>,
    norm2: layers::GroupNorm,
    conv2: layers::Conv2d,
    conv_shortcut: Option<layers::Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, in_channels: i64, config: ResnetBlock2DConfig) -> Self {
        let out = config.out_channels.unwrap_or(in_channels);
        let conv3 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let norm1 = group_norm(&vs / "norm1", config.groups, in_channels, config.eps);
        let conv1 = layers::conv2d(&vs / "conv1", in_channels, out, 3, conv3);
        let time_emb_proj = config
            .temb_channels
            .map(|t| layers::linear(&vs / "time_emb_proj", t, out, Default::default()));
        let groups_out = config.groups_out.unwrap_or(config.groups);
        let norm2 = group_norm(&vs / "norm2", groups_out, out, config.eps);
        let conv2 = layers::conv2d(&vs / "conv2", out, out, 3, conv3);
        let conv_shortcut = (in_channels != out).then(|| {
            layers::conv2d(
                &vs / "conv_shortcut",
                in_channels,
                out,
                1,
                Default::default(),
            )
        });
        Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: config.output_scale_factor,
        }
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&silu_fresh(self.norm1.forward(xs)));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1); // (B, C, 1, 1)
        }
        let mut h = self.conv2.forward(&silu_fresh(self.norm2.forward(&h)));
        let out = match (&self.conv_shortcut, h.requires_grad()) {
            (Some(c), _) => c.forward(xs) + h,
            // inference: add into the conv's fresh output instead of a new tensor
            (None, false) => {
                h += xs;
                h
            }
            (None, true) => xs + h,
        };
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// SiLU of a tensor nothing else holds (a norm's fresh output): in place when no gradient
/// flows (inference saves a pass over memory), else as a new tensor (autograd needs the input).
pub fn silu_fresh(mut x: Tensor) -> Tensor {
    if x.requires_grad() {
        x.silu()
    } else {
        let _ = x.silu_();
        x
    }
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> layers::GroupNorm {
    layers::group_norm(
        vs,
        groups,
        channels,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// `Downsample2D` with a stride-2 conv (`downsamplers.0.conv`). With `padding == 0`
/// (the VAE) the input is padded by one on the right and bottom first, as diffusers does.
#[derive(Debug)]
pub struct Downsample2D {
    conv: layers::Conv2d,
    padding: i64,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, out_channels: i64, padding: i64) -> Self {
        let conv = layers::conv2d(
            &vs / "conv",
            channels,
            out_channels,
            3,
            nn::ConvConfig {
                stride: 2,
                padding,
                ..Default::default()
            },
        );
        Self { conv, padding }
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.padding == 0 {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D`: nearest ×2 (or to `size`) then a 3×3 conv (`upsamplers.0.conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: layers::Conv2d,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64, out_channels: i64) -> Self {
        let conv = layers::conv2d(
            &vs / "conv",
            channels,
            out_channels,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        );
        Self { conv }
    }

    /// `size` = the spatial size to reach (the next skip connection's), else ×2.
    pub fn forward(&self, xs: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (h, w) = match size {
            Some(s) => s,
            None => {
                let s = xs.size();
                (s[2] * 2, s[3] * 2)
            }
        };
        let up = xs.upsample_nearest2d([h, w], None, None);
        self.conv.forward(&up)
    }
}
