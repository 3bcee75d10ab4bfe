//! `AutoencoderKL` (the Stable Diffusion VAE) built from a diffusers `config.json` — LaVIT
//! (ICLR 2024) decodes its U-Net latents with it. Reference:
//! `diffusers/models/autoencoders/autoencoder_kl.py`, `vae.py` (`Encoder`, `Decoder`),
//! `unet_2d_blocks.py` (`DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D`).

use lavit_runtime::layers;
use std::path::Path;

use lavit_runtime::shape::dims;
use lavit_runtime::{checkpoint, Error, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Tensor};

use crate::attention::Attention;
use crate::resnet::{group_norm, Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};

/// The fields of a diffusers `AutoencoderKL` `config.json` this implementation reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: i64,
    /// Image channels out.
    pub out_channels: i64,
    /// `DownEncoderBlock2D` per resolution.
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per resolution.
    pub up_block_types: Vec<String>,
    /// Channels per resolution.
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder block (decoder blocks get one more).
    pub layers_per_block: i64,
    /// Activation (only `silu`).
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: i64,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// Image size the VAE was trained at (informational).
    pub sample_size: i64,
    /// Latents are multiplied by this after encoding (divided before decoding).
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3-style VAEs); null for LaVIT.
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their attention.
    pub mid_block_add_attention: bool,
    /// Run in float32 even when the rest is fp16 (diffusers hint).
    pub force_upcast: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }
}

impl AutoencoderKLConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = lavit_runtime::fsread::read_config(path)?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::config(path.display().to_string(), "(json)", e.to_string()))?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::config(
                origin,
                "block_out_channels",
                "needs one down and one up block type per entry".to_string(),
            ));
        }
        if self.act_fn != "silu" {
            return Err(Error::config(
                origin,
                "act_fn",
                format!("`{}`: only silu", self.act_fn),
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
            .or(self
                .up_block_types
                .iter()
                .find(|t| *t != "UpDecoderBlock2D"))
        {
            return Err(Error::config(
                origin,
                "down_block_types",
                format!("unsupported block `{t}`"),
            ));
        }
        use lavit_runtime::manifest::caps::{MAX_DEPTH, MAX_WIDTH};
        // A VAE halves the resolution per block: more than 12 blocks is no image model.
        if n > 12 {
            return Err(Error::config(
                origin,
                "block_out_channels",
                format!("{n} blocks, at most 12"),
            ));
        }
        for (key, v, max) in [
            ("in_channels", self.in_channels, MAX_WIDTH),
            ("out_channels", self.out_channels, MAX_WIDTH),
            ("latent_channels", self.latent_channels, MAX_WIDTH),
            ("layers_per_block", self.layers_per_block, MAX_DEPTH),
            ("norm_num_groups", self.norm_num_groups, MAX_WIDTH),
        ] {
            if v <= 0 || v > max {
                return Err(Error::config(
                    origin,
                    key,
                    format!("must be in 1..={max}, got {v}"),
                ));
            }
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c <= 0 || c > MAX_WIDTH)
        {
            return Err(Error::config(
                origin,
                "block_out_channels",
                format!("{c}: each must be in 1..={MAX_WIDTH}"),
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0)
            || self.shift_factor.is_some_and(|s| !s.is_finite())
        {
            return Err(Error::config(
                origin,
                "scaling_factor",
                format!(
                    "must be finite and non-zero (shift_factor finite), got {} / {:?}",
                    self.scaling_factor, self.shift_factor
                ),
            ));
        }
        if self
            .block_out_channels
            .iter()
            .any(|c| c % self.norm_num_groups != 0)
        {
            return Err(Error::config(
                origin,
                "norm_num_groups",
                format!(
                    "{} does not divide {:?}",
                    self.norm_num_groups, self.block_out_channels
                ),
            ));
        }
        Ok(())
    }

    /// What this config implies about the checkpoint's tensors, for
    /// [`checkpoint::check_implied`] before the model is built.
    pub fn implied(&self) -> Vec<(&'static str, String, checkpoint::Implied)> {
        use checkpoint::Implied::{Leading, NoneUnder, Shape};
        let boc = &self.block_out_channels;
        let (n, l) = (boc.len(), self.layers_per_block);
        let last = boc[n - 1];
        let mut v = vec![
            (
                "in_channels",
                "encoder.conv_in.weight".to_string(),
                Shape(vec![boc[0], self.in_channels, 3, 3]),
            ),
            (
                "out_channels",
                "decoder.conv_out.weight".to_string(),
                Shape(vec![self.out_channels, boc[0], 3, 3]),
            ),
            (
                "latent_channels",
                "encoder.conv_out.weight".to_string(),
                Shape(vec![2 * self.latent_channels, last, 3, 3]),
            ),
            (
                "latent_channels",
                "decoder.conv_in.weight".to_string(),
                Shape(vec![last, self.latent_channels, 3, 3]),
            ),
            (
                "block_out_channels",
                format!("encoder.down_blocks.{n}."),
                NoneUnder,
            ),
            (
                "block_out_channels",
                format!("decoder.up_blocks.{n}."),
                NoneUnder,
            ),
        ];
        for i in 0..n {
            let e = format!("encoder.down_blocks.{i}.resnets");
            v.push((
                "layers_per_block",
                format!("{e}.{}.conv1.weight", l - 1),
                Leading(vec![boc[i]]),
            ));
            v.push(("layers_per_block", format!("{e}.{l}."), NoneUnder));
            let d = format!("decoder.up_blocks.{i}.resnets");
            v.push((
                "layers_per_block",
                format!("{d}.{l}.conv1.weight"),
                Leading(vec![boc[n - 1 - i]]),
            ));
            v.push(("layers_per_block", format!("{d}.{}.", l + 1), NoneUnder));
        }
        v
    }

    /// Spatial downscaling between pixels and latents (8 for SD).
    pub fn downscale(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, single-head self-attention with a
/// GroupNorm in front and a residual, resnet.
#[derive(Debug)]
struct VaeMidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<(layers::GroupNorm, Attention)>,
}

impl VaeMidBlock {
    fn new(vs: nn::Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        let rc = ResnetBlock2DConfig {
            out_channels: Some(channels),
            temb_channels: None,
            groups,
            groups_out: None,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };
        let resnets = vec![
            ResnetBlock2D::new(&vs / "resnets" / 0, channels, rc),
            ResnetBlock2D::new(&vs / "resnets" / 1, channels, rc),
        ];
        let attention = add_attention.then(|| {
            let a = &vs / "attentions" / 0;
            (
                group_norm(&a / "group_norm", groups, channels, 1e-6),
                Attention::new(a, channels, None, 1, channels, true),
            )
        });
        Self { resnets, attention }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(xs, None);
        if let Some((norm, attn)) = &self.attention {
            let [b, c, hh, ww] = dims(&h, "(B, C, H, W)")?;
            let seq = norm.forward(&h).view([b, c, hh * ww]).transpose(1, 2); // (B, HW, C)
            let out = attn.forward(&seq, None, None)?;
            h = out.transpose(1, 2).reshape([b, c, hh, ww]) + h; // (B, C, H, W)
        }
        Ok(self.resnets[1].forward(&h, None))
    }
}

fn vae_resnet(vs: nn::Path, inc: i64, out: i64, groups: i64) -> ResnetBlock2D {
    ResnetBlock2D::new(
        vs,
        inc,
        ResnetBlock2DConfig {
            out_channels: Some(out),
            temb_channels: None,
            groups,
            groups_out: None,
            eps: 1e-6,
            output_scale_factor: 1.0,
        },
    )
}

/// `block_out_channels` is empty (`AutoencoderKLConfig::validate` refuses that first).
fn empty_block_out_channels() -> Error {
    Error::config(
        "AutoencoderKL config",
        "block_out_channels",
        "needs at least one entry",
    )
}

/// The VAE encoder (`encoder.*`): image → 2·latent moments.
#[derive(Debug)]
pub struct Encoder {
    conv_in: layers::Conv2d,
    down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: VaeMidBlock,
    conv_norm_out: layers::GroupNorm,
    conv_out: layers::Conv2d,
}

impl Encoder {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let Some(&last) = boc.last() else {
            return Err(empty_block_out_channels());
        };
        let pad1 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = layers::conv2d(&vs / "conv_in", cfg.in_channels, boc[0], 3, pad1);
        let mut down_blocks = Vec::new();
        let mut out = boc[0];
        for i in 0..boc.len() {
            let inc = out;
            out = boc[i];
            let b = &vs / "down_blocks" / i;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    vae_resnet(
                        &b / "resnets" / j,
                        if j == 0 { inc } else { out },
                        out,
                        cfg.norm_num_groups,
                    )
                })
                .collect();
            let down = (i != boc.len() - 1)
                .then(|| Downsample2D::new(&b / "downsamplers" / 0, out, out, 0));
            down_blocks.push((resnets, down));
        }
        let mid_block = VaeMidBlock::new(
            &vs / "mid_block",
            last,
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
        );
        let conv_norm_out = group_norm(&vs / "conv_norm_out", cfg.norm_num_groups, last, 1e-6);
        let conv_out = layers::conv2d(&vs / "conv_out", last, 2 * cfg.latent_channels, 3, pad1);
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs);
        for (resnets, down) in &self.down_blocks {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(d) = down {
                h = d.forward(&h);
            }
        }
        let h = self.mid_block.forward(&h)?;
        Ok(self
            .conv_out
            .forward(&crate::resnet::silu_fresh(self.conv_norm_out.forward(&h))))
    }
}

/// The VAE decoder (`decoder.*`): latents → image.
#[derive(Debug)]
pub struct Decoder {
    conv_in: layers::Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: layers::GroupNorm,
    conv_out: layers::Conv2d,
}

impl Decoder {
    fn new(vs: nn::Path, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let pad1 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let Some(&last) = boc.last() else {
            return Err(empty_block_out_channels());
        };
        let conv_in = layers::conv2d(&vs / "conv_in", cfg.latent_channels, last, 3, pad1);
        let mid_block = VaeMidBlock::new(
            &vs / "mid_block",
            last,
            cfg.norm_num_groups,
            cfg.mid_block_add_attention,
        );
        let rev: Vec<i64> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out;
            out = ch;
            let b = &vs / "up_blocks" / i;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    vae_resnet(
                        &b / "resnets" / j,
                        if j == 0 { prev } else { out },
                        out,
                        cfg.norm_num_groups,
                    )
                })
                .collect();
            let up = (i != rev.len() - 1).then(|| Upsample2D::new(&b / "upsamplers" / 0, out, out));
            up_blocks.push((resnets, up));
        }
        let conv_norm_out = group_norm(&vs / "conv_norm_out", cfg.norm_num_groups, boc[0], 1e-6);
        let conv_out = layers::conv2d(&vs / "conv_out", boc[0], cfg.out_channels, 3, pad1);
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z);
        let mut h = self.mid_block.forward(&h)?;
        for (resnets, up) in &self.up_blocks {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(u) = up {
                h = u.forward(&h, None);
            }
        }
        Ok(self
            .conv_out
            .forward(&crate::resnet::silu_fresh(self.conv_norm_out.forward(&h))))
    }
}

/// The diagonal Gaussian the encoder returns.
#[derive(Debug)]
pub struct DiagonalGaussian {
    /// (B, latent, h, w).
    pub mean: Tensor,
    /// (B, latent, h, w), clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// `mean + std · ε`.
    pub fn sample(&self) -> Tensor {
        let std = (&self.logvar * 0.5).exp();
        &self.mean + std * self.mean.randn_like()
    }
}

/// `AutoencoderKL`: `encoder`, `quant_conv`, `post_quant_conv`, `decoder`.
#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: AutoencoderKLConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    quant_conv: Option<layers::Conv2d>,
    post_quant_conv: Option<layers::Conv2d>,
}

impl AutoencoderKL {
    pub fn new(vs: nn::Path, config: AutoencoderKLConfig) -> Result<Self> {
        config.validate("AutoencoderKL config")?;
        let l = config.latent_channels;
        let encoder = Encoder::new(&vs / "encoder", &config)?;
        let decoder = Decoder::new(&vs / "decoder", &config)?;
        let quant_conv = config
            .use_quant_conv
            .then(|| layers::conv2d(&vs / "quant_conv", 2 * l, 2 * l, 1, Default::default()));
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| layers::conv2d(&vs / "post_quant_conv", l, l, 1, Default::default()));
        Ok(Self {
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
        })
    }

    /// Build from a diffusers `vae/` folder and load its weights strictly (float32, as the
    /// official code runs it; the file's float32 tensors are taken without a copy).
    pub fn from_pretrained(dir: &Path, device: Device) -> Result<(nn::VarStore, Self)> {
        let cfg_path = dir.join("config.json");
        let config = AutoencoderKLConfig::from_json_file(&cfg_path)?;
        let sd = checkpoint::load_path(dir)?;
        checkpoint::check_implied(&sd, &config.implied(), &cfg_path.display().to_string())?;
        let mut vs = nn::VarStore::new(device);
        let vae = layers::uninit(|| Self::new(vs.root(), config))?;
        checkpoint::load_into_owned(&vs, "", sd, &dir.display().to_string(), &Default::default())?;
        vs.freeze();
        Ok((vs, vae))
    }

    /// Image (B, 3, H, W) in [-1, 1] → latent distribution (unscaled).
    pub fn encode(&self, xs: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(xs)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => h,
        };
        let mv = moments.chunk(2, 1);
        Ok(DiagonalGaussian {
            mean: mv[0].shallow_clone(),
            logvar: mv[1].clamp(-30.0, 20.0),
        })
    }

    /// Latents (unscaled, i.e. already divided by `scaling_factor`) → image in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z),
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }
}
