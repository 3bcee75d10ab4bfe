//! `UNet2DConditionModel` built from a diffusers `config.json` — the pixel decoder of LaVIT
//! (ICLR 2024): the SD-1.5-shaped `pixel_decoding/unet` (cross-attention with an encoder
//! attention mask) and the SDXL-shaped `highres_pixel_decoding/unet` (`text_time` added
//! conditioning) come from this one config-driven implementation.
//! Reference: `diffusers/models/unets/unet_2d_condition.py`. Variable names are the diffusers
//! state-dict keys, so the official folders load as they are.

use lavit_runtime::layers;
use std::path::Path;

use lavit_runtime::checkpoint::{self, Implied};
use lavit_runtime::{Error, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::attention::mask_to_bias;
use crate::embeddings::{TextTimeEmbedding, TimestepEmbedding, Timesteps};
use crate::resnet::group_norm;
use crate::transformer_2d::Transformer2DModelConfig;
use crate::unet_2d_blocks::{BlockConfig, Context, DownBlock, MidBlock, UpBlock};

/// A config value diffusers accepts either once for all blocks or as one value per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block, or an error naming `key` when the list has the wrong length.
    pub fn expand(&self, n: usize, key: &str, origin: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(Error::config(
                origin,
                key,
                format!("has {} entries, the U-Net has {n} blocks", v.len()),
            )),
        }
    }
}

/// The fields of a diffusers `UNet2DConditionModel` `config.json` this implementation reads.
/// Other fields are ignored when they hold their default (checked in [`Self::validate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionModelConfig {
    /// Channels of the input latents.
    pub in_channels: i64,
    /// Channels of the predicted noise.
    pub out_channels: i64,
    /// Map the input from [0, 1] to [-1, 1] first.
    pub center_input_sample: bool,
    /// Timestep embedding order cos, sin (true) or sin, cos.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding.
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, one per resolution.
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn` (or null for no mid block).
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D`, one per resolution.
    pub up_block_types: Vec<String>,
    /// Channels of each resolution.
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks get one more).
    pub layers_per_block: PerBlock<i64>,
    /// Padding of the downsampling convs.
    pub downsample_padding: i64,
    /// Output divisor of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Output divisor of the down/up blocks' resnets.
    pub resnet_out_scale_factor: f64,
    /// Activation (only `silu`).
    pub act_fn: String,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// GroupNorm epsilon.
    pub norm_eps: f64,
    /// Width of the cross-attention context.
    pub cross_attention_dim: i64,
    /// Transformer blocks per attention, per down block.
    pub transformer_layers_per_block: PerBlock<i64>,
    /// Transformer blocks per attention of the up blocks (default: reversed down values).
    pub reverse_transformer_layers_per_block: Option<Vec<i64>>,
    /// diffusers' historical naming: when `num_attention_heads` is null this is the
    /// number of heads (not the head width).
    pub attention_head_dim: PerBlock<i64>,
    /// Heads per block (overrides `attention_head_dim`).
    pub num_attention_heads: Option<PerBlock<i64>>,
    /// Linear instead of 1×1 conv projections around the transformers.
    pub use_linear_projection: bool,
    /// `null`, `text_time` (SDXL: pooled embeds + time ids) or `text` (an attention pool of
    /// the encoder hidden states added to the time embedding).
    pub addition_embed_type: Option<String>,
    /// Heads of the `text` attention pool.
    pub addition_embed_type_num_heads: i64,
    /// Channels of each sinusoidal time-id embedding (`add_time_proj`).
    pub addition_time_embed_dim: Option<i64>,
    /// Input width of `add_embedding` (pooled width + 6 · addition_time_embed_dim).
    pub projection_class_embeddings_input_dim: Option<i64>,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: i64,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: i64,
    /// Width of the time embedding (default 4 · block_out_channels[0]).
    pub time_embedding_dim: Option<i64>,
    /// Resolution the model was trained at (informational).
    pub sample_size: Option<i64>,
    /// Unsupported when set; kept to refuse such configs by name.
    pub class_embed_type: Option<String>,
    /// Unsupported when set.
    pub encoder_hid_dim_type: Option<String>,
    /// Unsupported when set.
    pub time_cond_proj_dim: Option<i64>,
    /// Only `default`.
    pub resnet_time_scale_shift: String,
    /// Only `positional`.
    pub time_embedding_type: String,
    /// Only false.
    pub only_cross_attention: bool,
    /// Only false.
    pub dual_cross_attention: bool,
    /// Only `default`.
    pub attention_type: String,
    /// Only false.
    pub upcast_attention: bool,
    /// lavit-rs extension (not a diffusers key; diffusers ignores it): the condition tokens
    /// (B, L = g², C), laid out row-major on their g × g patch grid and upsampled (nearest) to
    /// the sample's size, are concatenated to the sample before `conv_in`, which then reads
    /// `in_channels + cross_attention_dim` channels. A small pixel-space decoder learns where
    /// each token belongs this way within a CPU budget; cross-attention alone has to discover
    /// the token↔position correspondence and does not within it. `in_channels` still counts
    /// only the sample (the noise the scheduler draws).
    pub condition_map: bool,
}

impl Default for UNet2DConditionModelConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            resnet_out_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            use_linear_projection: false,
            addition_embed_type: None,
            addition_embed_type_num_heads: 64,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            time_embedding_dim: None,
            sample_size: None,
            class_embed_type: None,
            encoder_hid_dim_type: None,
            time_cond_proj_dim: None,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            only_cross_attention: false,
            dual_cross_attention: false,
            attention_type: "default".into(),
            upcast_attention: false,
            condition_map: false,
        }
    }
}

impl UNet2DConditionModelConfig {
    /// Read a diffusers `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = lavit_runtime::fsread::read_config(path)?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::config(path.display().to_string(), "(json)", e.to_string()))?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Refuse what this implementation does not build, naming the key.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config(origin, key, msg));
        use lavit_runtime::manifest::caps::{MAX_DEPTH, MAX_WIDTH};
        let n = self.block_out_channels.len();
        // Each block halves the resolution: more than 12 is no image model.
        if n == 0
            || n > 12
            || self
                .block_out_channels
                .iter()
                .any(|&c| c <= 0 || c > MAX_WIDTH)
        {
            return bad(
                "block_out_channels",
                format!(
                    "{:?}: need 1 to 12 blocks of 1..={MAX_WIDTH} channels",
                    self.block_out_channels
                ),
            );
        }
        let mut sizes = vec![
            ("in_channels", self.in_channels, MAX_WIDTH),
            ("out_channels", self.out_channels, MAX_WIDTH),
            ("norm_num_groups", self.norm_num_groups, MAX_WIDTH),
            ("cross_attention_dim", self.cross_attention_dim, MAX_WIDTH),
            ("conv_in_kernel", self.conv_in_kernel, 31),
            ("conv_out_kernel", self.conv_out_kernel, 31),
            (
                "addition_embed_type_num_heads",
                self.addition_embed_type_num_heads,
                MAX_WIDTH,
            ),
        ];
        for (key, v) in [
            ("addition_time_embed_dim", self.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim,
            ),
            ("time_embedding_dim", self.time_embedding_dim),
        ] {
            if let Some(v) = v {
                sizes.push((key, v, 4 * MAX_WIDTH));
            }
        }
        for (key, v, max) in sizes {
            if v <= 0 || v > max {
                return bad(key, format!("must be in 1..={max}, got {v}"));
            }
        }
        if !(0..=16).contains(&self.downsample_padding) {
            return bad(
                "downsample_padding",
                format!("must be in 0..=16, got {}", self.downsample_padding),
            );
        }
        for (key, v) in [
            ("norm_eps", self.norm_eps),
            ("freq_shift", self.freq_shift),
            ("mid_block_scale_factor", self.mid_block_scale_factor),
            ("resnet_out_scale_factor", self.resnet_out_scale_factor),
        ] {
            if !v.is_finite()
                || (key.ends_with("factor") && v == 0.0)
                || (key == "norm_eps" && v < 0.0)
            {
                return bad(key, format!("{v} is not a usable value"));
            }
        }
        let per_block_ok = |key: &str, v: &PerBlock<i64>, max: i64| -> Result<()> {
            let vals = match v {
                PerBlock::One(x) => vec![*x],
                PerBlock::Many(xs) => xs.clone(),
            };
            match vals.iter().find(|&&x| x <= 0 || x > max) {
                Some(x) => bad(key, format!("{x}: each must be in 1..={max}")),
                None => Ok(()),
            }
        };
        per_block_ok("layers_per_block", &self.layers_per_block, MAX_DEPTH)?;
        per_block_ok(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
            MAX_DEPTH,
        )?;
        if let Some(r) = &self.reverse_transformer_layers_per_block {
            per_block_ok(
                "reverse_transformer_layers_per_block",
                &PerBlock::Many(r.clone()),
                MAX_DEPTH,
            )?;
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(
                "down_block_types",
                format!(
                    "{} down / {} up block types for {n} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad("down_block_types", format!("unsupported block `{t}`"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad("up_block_types", format!("unsupported block `{t}`"));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return bad("mid_block_type", format!("unsupported block `{m}`"));
            }
        }
        if self.act_fn != "silu" {
            return bad("act_fn", format!("`{}`: only silu", self.act_fn));
        }
        for (key, v) in [
            ("class_embed_type", &self.class_embed_type),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
        ] {
            if let Some(v) = v {
                return bad(key, format!("`{v}` is not supported (only null)"));
            }
        }
        if self.time_cond_proj_dim.is_some() {
            return bad("time_cond_proj_dim", "not supported (only null)".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                return bad(
                    "addition_embed_type",
                    "text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim".into(),
                );
            }
            Some("text_time") => {}
            Some("text")
                if self.addition_embed_type_num_heads <= 0
                    || self.cross_attention_dim % self.addition_embed_type_num_heads != 0 =>
            {
                return bad(
                    "addition_embed_type_num_heads",
                    format!(
                        "{} must divide cross_attention_dim {}",
                        self.addition_embed_type_num_heads, self.cross_attention_dim
                    ),
                );
            }
            Some("text") => {}
            Some(v) => {
                return bad(
                    "addition_embed_type",
                    format!("`{v}`: only null, text or text_time"),
                )
            }
        }
        for (key, v, want) in [
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
            ("attention_type", &self.attention_type, "default"),
        ] {
            if v != want {
                return bad(key, format!("`{v}`: only `{want}`"));
            }
        }
        if self.only_cross_attention || self.dual_cross_attention || self.upcast_attention {
            return bad(
                "only_cross_attention",
                "only_cross_attention / dual_cross_attention / upcast_attention must be false"
                    .into(),
            );
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return bad("conv_in_kernel", "kernels must be odd".into());
        }
        let heads = self.heads(origin)?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h <= 0 || c % h != 0 {
                return bad(
                    "attention_head_dim",
                    format!("block {i}: {c} channels not divisible into {h} heads"),
                );
            }
            if c % self.norm_num_groups != 0 {
                return bad(
                    "norm_num_groups",
                    format!(
                        "block {i}: {c} channels not divisible into {} groups",
                        self.norm_num_groups
                    ),
                );
            }
        }
        self.layers_per_block
            .expand(n, "layers_per_block", origin)?;
        self.transformer_layers_per_block
            .expand(n, "transformer_layers_per_block", origin)?;
        if let Some(r) = &self.reverse_transformer_layers_per_block {
            if r.len() != n {
                return bad(
                    "reverse_transformer_layers_per_block",
                    format!("needs {n} entries"),
                );
            }
        }
        Ok(())
    }

    /// What this config implies about the checkpoint's tensors (widths, kernels, block and
    /// layer counts), for [`checkpoint::check_implied`] before the model is built.
    pub fn implied(&self, origin: &str) -> Result<Vec<(&'static str, String, Implied)>> {
        let n = self.block_out_channels.len();
        let boc = &self.block_out_channels;
        let layers = self
            .layers_per_block
            .expand(n, "layers_per_block", origin)?;
        let tlayers =
            self.transformer_layers_per_block
                .expand(n, "transformer_layers_per_block", origin)?;
        let rev_tlayers = self
            .reverse_transformer_layers_per_block
            .clone()
            .unwrap_or_else(|| tlayers.iter().rev().copied().collect());
        let (kin, kout) = (self.conv_in_kernel, self.conv_out_kernel);
        let mut v = vec![
            (
                "in_channels",
                "conv_in.weight".to_string(),
                Implied::Shape(vec![boc[0], self.conv_in_channels(), kin, kin]),
            ),
            (
                "out_channels",
                "conv_out.weight".to_string(),
                Implied::Shape(vec![self.out_channels, boc[0], kout, kout]),
            ),
            (
                "time_embedding_dim",
                "time_embedding.linear_1.weight".to_string(),
                Implied::Shape(vec![self.time_embed_dim(), boc[0]]),
            ),
            (
                "block_out_channels",
                format!("down_blocks.{n}."),
                Implied::NoneUnder,
            ),
            (
                "block_out_channels",
                format!("up_blocks.{n}."),
                Implied::NoneUnder,
            ),
        ];
        if self.addition_embed_type.as_deref() == Some("text_time") {
            v.push((
                "projection_class_embeddings_input_dim",
                "add_embedding.linear_1.weight".into(),
                Implied::Shape(vec![
                    self.time_embed_dim(),
                    self.projection_class_embeddings_input_dim
                        .unwrap_or_default(),
                ]),
            ));
        }
        for i in 0..n {
            let d = format!("down_blocks.{i}");
            v.push((
                "layers_per_block",
                format!("{d}.resnets.{}.conv1.weight", layers[i] - 1),
                Implied::Leading(vec![boc[i]]),
            ));
            v.push((
                "layers_per_block",
                format!("{d}.resnets.{}.", layers[i]),
                Implied::NoneUnder,
            ));
            if self.down_block_types[i] == "CrossAttnDownBlock2D" {
                let t = format!("{d}.attentions.0.transformer_blocks");
                v.push((
                    "transformer_layers_per_block",
                    format!("{t}.{}.attn2.to_k.weight", tlayers[i] - 1),
                    Implied::Shape(vec![boc[i], self.cross_attention_dim]),
                ));
                v.push((
                    "transformer_layers_per_block",
                    format!("{t}.{}.", tlayers[i]),
                    Implied::NoneUnder,
                ));
            }
            let u = format!("up_blocks.{i}");
            let bi = n - 1 - i;
            v.push((
                "layers_per_block",
                format!("{u}.resnets.{}.conv1.weight", layers[bi]),
                Implied::Leading(vec![boc[bi]]),
            ));
            v.push((
                "layers_per_block",
                format!("{u}.resnets.{}.", layers[bi] + 1),
                Implied::NoneUnder,
            ));
            if self.up_block_types[i] == "CrossAttnUpBlock2D" {
                let t = format!("{u}.attentions.0.transformer_blocks");
                v.push((
                    "reverse_transformer_layers_per_block",
                    format!("{t}.{}.attn2.to_k.weight", rev_tlayers[i] - 1),
                    Implied::Shape(vec![boc[bi], self.cross_attention_dim]),
                ));
                v.push((
                    "reverse_transformer_layers_per_block",
                    format!("{t}.{}.", rev_tlayers[i]),
                    Implied::NoneUnder,
                ));
            }
        }
        Ok(v)
    }

    /// Heads per block: `num_attention_heads`, else (diffusers' naming quirk) `attention_head_dim`.
    fn heads(&self, origin: &str) -> Result<Vec<i64>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads", origin),
            None => self
                .attention_head_dim
                .expand(n, "attention_head_dim", origin),
        }
    }

    /// Input channels of `conv_in`: the sample's, plus the condition map's when
    /// [`condition_map`](Self::condition_map) is set.
    pub fn conv_in_channels(&self) -> i64 {
        self.in_channels
            + if self.condition_map {
                self.cross_attention_dim
            } else {
                0
            }
    }

    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

/// The SDXL `text_time` added conditioning: pooled embeddings and six time ids
/// (original size, crop top-left, target size).
pub struct AddedCond<'a> {
    /// (B, pooled_dim).
    pub text_embeds: &'a Tensor,
    /// (B, 6).
    pub time_ids: &'a Tensor,
}

/// The added conditioning of the time embedding (`add_embedding`).
#[derive(Debug)]
enum AddEmbedding {
    /// SDXL: sinusoidal time ids (`add_time_proj`) next to the pooled embeds → MLP.
    TextTime {
        add_time_proj: Timesteps,
        add_embedding: TimestepEmbedding,
    },
    /// An attention pool of the encoder hidden states.
    Text(Box<TextTimeEmbedding>),
}

/// The conditional diffusion U-Net.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNet2DConditionModelConfig,
    conv_in: layers::Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: layers::GroupNorm,
    conv_out: layers::Conv2d,
}

impl UNet2DConditionModel {
    /// Build the variables under `vs` (names = diffusers state-dict keys). The config must
    /// have passed [`UNet2DConditionModelConfig::validate`].
    pub fn new(vs: nn::Path, config: UNet2DConditionModelConfig) -> Result<Self> {
        config.validate("UNet2DConditionModel config")?;
        let origin = "UNet2DConditionModel config";
        let n = config.block_out_channels.len();
        let boc = &config.block_out_channels;
        let heads = config.heads(origin)?;
        let layers = config
            .layers_per_block
            .expand(n, "layers_per_block", origin)?;
        let tlayers = config.transformer_layers_per_block.expand(
            n,
            "transformer_layers_per_block",
            origin,
        )?;
        let rev_tlayers = config
            .reverse_transformer_layers_per_block
            .clone()
            .unwrap_or_else(|| tlayers.iter().rev().copied().collect());
        let temb = config.time_embed_dim();

        let conv_in = layers::conv2d(
            &vs / "conv_in",
            config.conv_in_channels(),
            boc[0],
            config.conv_in_kernel,
            nn::ConvConfig {
                padding: (config.conv_in_kernel - 1) / 2,
                ..Default::default()
            },
        );
        let time_proj = Timesteps {
            num_channels: boc[0],
            flip_sin_to_cos: config.flip_sin_to_cos,
            downscale_freq_shift: config.freq_shift,
        };
        let time_embedding = TimestepEmbedding::new(&vs / "time_embedding", boc[0], temb);
        let add_embedding = match config.addition_embed_type.as_deref() {
            Some("text_time") => {
                let dim = config.addition_time_embed_dim.unwrap_or_default();
                let input = config
                    .projection_class_embeddings_input_dim
                    .unwrap_or_default();
                Some(AddEmbedding::TextTime {
                    add_time_proj: Timesteps {
                        num_channels: dim,
                        flip_sin_to_cos: config.flip_sin_to_cos,
                        downscale_freq_shift: config.freq_shift,
                    },
                    add_embedding: TimestepEmbedding::new(&vs / "add_embedding", input, temb),
                })
            }
            Some(_) => Some(AddEmbedding::Text(Box::new(TextTimeEmbedding::new(
                &vs / "add_embedding",
                config.cross_attention_dim,
                temb,
                config.addition_embed_type_num_heads,
            )))),
            None => None,
        };

        let transformer = |cross: bool, i: usize, layers: i64| {
            cross.then(|| Transformer2DModelConfig {
                num_attention_heads: heads[i],
                attention_head_dim: boc[i] / heads[i],
                num_layers: layers,
                cross_attention_dim: config.cross_attention_dim,
                norm_num_groups: config.norm_num_groups,
                use_linear_projection: config.use_linear_projection,
            })
        };
        let block =
            |num_layers: i64, t: Option<Transformer2DModelConfig>, scale: f64| BlockConfig {
                num_layers,
                temb_channels: temb,
                resnet_groups: config.norm_num_groups,
                resnet_eps: config.norm_eps,
                output_scale_factor: scale,
                transformer: t,
            };

        let mut down_blocks = Vec::new();
        let mut output_channel = boc[0];
        for (i, ty) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = boc[i];
            let is_final = i == n - 1;
            let t = transformer(ty == "CrossAttnDownBlock2D", i, tlayers[i]);
            down_blocks.push(DownBlock::new(
                &vs / "down_blocks" / i,
                input_channel,
                output_channel,
                block(layers[i], t, config.resnet_out_scale_factor),
                !is_final,
                config.downsample_padding,
            ));
        }

        let mid_block = config
            .mid_block_type
            .as_ref()
            .map(|_| {
                let t = transformer(true, n - 1, tlayers[n - 1]);
                MidBlock::new(
                    &vs / "mid_block",
                    boc[n - 1],
                    block(1, t, config.mid_block_scale_factor),
                )
            })
            .transpose()?;

        let rev_boc: Vec<i64> = boc.iter().rev().copied().collect();
        let rev_layers: Vec<i64> = layers.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut output_channel = rev_boc[0];
        for (i, ty) in config.up_block_types.iter().enumerate() {
            let is_final = i == n - 1;
            let prev_output_channel = output_channel;
            output_channel = rev_boc[i];
            let input_channel = rev_boc[(i + 1).min(n - 1)];
            let bi = n - 1 - i; // the down block at the same resolution
            let t = transformer(ty == "CrossAttnUpBlock2D", bi, rev_tlayers[i]);
            up_blocks.push(UpBlock::new(
                &vs / "up_blocks" / i,
                input_channel,
                prev_output_channel,
                output_channel,
                block(rev_layers[i] + 1, t, config.resnet_out_scale_factor),
                !is_final,
            ));
        }

        let conv_norm_out = group_norm(
            &vs / "conv_norm_out",
            config.norm_num_groups,
            boc[0],
            config.norm_eps,
        );
        let conv_out = layers::conv2d(
            &vs / "conv_out",
            boc[0],
            config.out_channels,
            config.conv_out_kernel,
            nn::ConvConfig {
                padding: (config.conv_out_kernel - 1) / 2,
                ..Default::default()
            },
        );
        Ok(Self {
            config,
            conv_in,
            time_proj,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Build from a diffusers folder (`config.json` + `diffusion_pytorch_model.{bin,safetensors}`)
    /// in `kind` and load its weights strictly, taking the file's tensors where they
    /// already are `kind` (no copy; nothing drawn first). Returns the var store holding
    /// the weights.
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<(nn::VarStore, Self)> {
        let cfg_path = dir.join("config.json");
        let config = UNet2DConditionModelConfig::from_json_file(&cfg_path)?;
        let sd = checkpoint::load_path(dir)?;
        let origin = cfg_path.display().to_string();
        checkpoint::check_implied(&sd, &config.implied(&origin)?, &origin)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let unet = layers::uninit(|| Self::new(vs.root(), config))?;
        checkpoint::load_into_owned(&vs, "", sd, &dir.display().to_string(), &Default::default())?;
        vs.freeze();
        Ok((vs, unet))
    }

    /// Predicted noise (or v) for `sample` (B, in_channels, H, W) at `timestep` (a scalar or
    /// (B,) tensor), conditioned on `encoder_hidden_states` (B, L, cross_dim) with an optional
    /// 0/1 `encoder_attention_mask` (B, L) and, for `text_time` U-Nets, the added conditions.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        encoder_attention_mask: Option<&Tensor>,
        added: Option<&AddedCond<'_>>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let size = sample.size();
        if size.len() != 4 || size[1] != cfg.in_channels {
            return Err(Error::invalid(format!(
                "U-Net sample must be (B, {}, H, W), got {size:?}",
                cfg.in_channels
            )));
        }
        let b = size[0];
        let ehs = encoder_hidden_states.size();
        if ehs.len() != 3 || ehs[0] != b || ehs[2] != cfg.cross_attention_dim {
            return Err(Error::invalid(format!(
                "encoder_hidden_states must be ({b}, L, {}), got {ehs:?}",
                cfg.cross_attention_dim
            )));
        }
        if let Some(m) = encoder_attention_mask {
            if m.size() != [b, ehs[1]] {
                return Err(Error::invalid(format!(
                    "encoder_attention_mask must be ({b}, {}), got {:?}",
                    ehs[1],
                    m.size()
                )));
            }
        }
        let kind = sample.kind();
        let sample = if cfg.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };

        // 1. time
        let t = if timestep.numel() == 1 {
            timestep.reshape([1]).expand([b], false)
        } else if timestep.size() == [b] {
            timestep.shallow_clone()
        } else {
            return Err(Error::invalid(format!(
                "timestep must have one value or ({b},), got {:?}",
                timestep.size()
            )));
        };
        let t_emb = self.time_proj.forward(&t).to_kind(kind);
        let mut emb = self.time_embedding.forward(&t_emb);
        match &self.add_embedding {
            None => {}
            Some(AddEmbedding::Text(text)) => emb += text.forward(encoder_hidden_states),
            Some(AddEmbedding::TextTime {
                add_time_proj: proj,
                add_embedding: embedding,
            }) => {
                let Some(added) = added else {
                    return Err(Error::invalid(
                    "this U-Net has text_time added conditioning: text_embeds and time_ids are required",
                ));
                };
                let tid = added.time_ids.size();
                if tid.len() != 2 || tid[0] != b {
                    return Err(Error::invalid(format!(
                        "time_ids must be ({b}, k), got {tid:?}"
                    )));
                }
                let time_embeds = proj
                    .forward(&added.time_ids.flatten(0, -1))
                    .reshape([b, -1]); // (B, k·dim)
                let add = Tensor::cat(
                    &[added.text_embeds.to_kind(kind), time_embeds.to_kind(kind)],
                    -1,
                );
                let want = cfg
                    .projection_class_embeddings_input_dim
                    .unwrap_or_default();
                if add.size() != [b, want] {
                    return Err(Error::invalid(format!(
                    "text_embeds + time-id embeddings give {:?}, add_embedding expects ({b}, {want})",
                    add.size()
                )));
                }
                emb += embedding.forward(&add);
            }
        }

        let bias = encoder_attention_mask.map(|m| mask_to_bias(m, kind));
        let ctx = Context {
            hidden_states: encoder_hidden_states,
            bias: bias.as_ref(),
        };

        // 2. pre-process (with the condition map, when the config asks for one), 3. down
        let sample = if cfg.condition_map {
            let (h, w) = (size[2], size[3]);
            Tensor::cat(
                &[
                    sample.shallow_clone(),
                    condition_map(encoder_hidden_states, h, w)?.to_kind(sample.kind()),
                ],
                1,
            )
        } else {
            sample
        };
        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&h, &emb, &ctx)?;
            h = out;
            skips.extend(states);
        }
        // 4. mid
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, &ctx)?;
        }
        // 5. up
        for block in &self.up_blocks {
            let k = block.num_skips();
            let rest = skips.len() - k;
            let own = skips.split_off(rest);
            let upsample_size = skips.last().map(|s| {
                let s = s.size();
                (s[2], s[3])
            });
            h = block.forward(&h, &own, &emb, &ctx, upsample_size)?;
        }
        // 6. post-process
        let h = self.conv_norm_out.forward(&h).silu();
        Ok(self.conv_out.forward(&h))
    }
}

/// Convenience: the model's parameter dtype.
pub fn var_kind(vs: &nn::VarStore) -> Kind {
    vs.trainable_variables()
        .first()
        .or(vs.variables().values().next())
        .map(|t| t.kind())
        .unwrap_or(Kind::Float)
}

/// Condition tokens (B, L, C) with L = g² (row-major on a g × g grid) → a map (B, C, h, w),
/// each token's vector repeated over the pixels of its grid cell (nearest upsampling).
pub fn condition_map(tokens: &Tensor, h: i64, w: i64) -> Result<Tensor> {
    let (b, l, c) = tokens
        .size3()
        .map_err(|e| Error::invalid(format!("condition map: {e}")))?;
    let g = (l as f64).sqrt().round() as i64;
    if g * g != l || g == 0 {
        return Err(Error::invalid(format!(
            "a condition map needs a square number of condition tokens (a g × g grid), got {l}"
        )));
    }
    if h < g || w < g {
        return Err(Error::invalid(format!(
            "a {h}×{w} sample is smaller than the {g}×{g} condition grid"
        )));
    }
    let grid = tokens.reshape([b, g, g, c]).permute([0, 3, 1, 2]);
    Ok(grid.upsample_nearest2d([h, w], None, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A U-Net with no cross-attention block at all, conditioned only through the `text`
    /// attention pool added to the time embedding.
    fn pooled_only(heads: i64) -> UNet2DConditionModelConfig {
        UNet2DConditionModelConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![8, 16],
            down_block_types: vec!["DownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "UpBlock2D".into()],
            mid_block_type: None,
            layers_per_block: PerBlock::One(1),
            norm_num_groups: 4,
            cross_attention_dim: 12,
            addition_embed_type: Some("text".into()),
            addition_embed_type_num_heads: heads,
            ..Default::default()
        }
    }

    #[test]
    fn text_addition_embedding_has_diffusers_names_and_conditions_the_output() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), pooled_only(3)).unwrap();
        let mut names: Vec<String> = vs
            .variables()
            .into_keys()
            .filter(|k| k.starts_with("add_embedding."))
            .collect();
        names.sort();
        // diffusers' TextTimeEmbedding(norm1, pool = AttentionPooling, proj, norm2)
        let want = [
            "add_embedding.norm1.bias",
            "add_embedding.norm1.weight",
            "add_embedding.norm2.bias",
            "add_embedding.norm2.weight",
            "add_embedding.pool.k_proj.bias",
            "add_embedding.pool.k_proj.weight",
            "add_embedding.pool.positional_embedding",
            "add_embedding.pool.q_proj.bias",
            "add_embedding.pool.q_proj.weight",
            "add_embedding.pool.v_proj.bias",
            "add_embedding.pool.v_proj.weight",
            "add_embedding.proj.bias",
            "add_embedding.proj.weight",
        ];
        assert_eq!(names, want);
        assert_eq!(
            vs.variables()["add_embedding.proj.weight"].size(),
            [32, 12] // time_embed_dim = 4 · 8
        );
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[5.0f32, 500.0]);
        let c1 = Tensor::randn([2, 5, 12], (Kind::Float, Device::Cpu));
        let c2 = Tensor::randn([2, 5, 12], (Kind::Float, Device::Cpu));
        let y1 = unet.forward(&x, &t, &c1, None, None).unwrap();
        let y1b = unet.forward(&x, &t, &c1, None, None).unwrap();
        let y2 = unet.forward(&x, &t, &c2, None, None).unwrap();
        assert_eq!(y1.size(), [2, 3, 8, 8]);
        assert!(y1.equal(&y1b));
        // without any cross-attention, only the pool can carry the condition
        let d = (&y1 - &y2).abs().max().double_value(&[]);
        assert!(d > 1e-4, "the condition did not reach the output ({d})");
        // permuting the condition tokens does not change a mean + attention pool
        let perm = Tensor::from_slice(&[4i64, 2, 0, 3, 1]);
        let y1p = unet
            .forward(&x, &t, &c1.index_select(1, &perm), None, None)
            .unwrap();
        let d = (&y1 - &y1p).abs().max().double_value(&[]);
        assert!(d < 1e-5, "pooling depends on token order ({d})");
    }

    #[test]
    fn text_addition_embedding_heads_must_divide_the_width() {
        let e = pooled_only(5).validate("cfg").unwrap_err().to_string();
        assert!(e.contains("addition_embed_type_num_heads"), "{e}");
    }

    #[test]
    fn condition_map_lays_tokens_on_their_grid() {
        // 4 tokens (2 × 2 grid) of width 2, token k = (k, -k)
        let tok =
            Tensor::from_slice(&[0.0f32, 0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0]).view([1, 4, 2]);
        let m = condition_map(&tok, 4, 6).unwrap();
        assert_eq!(m.size(), [1, 2, 4, 6]);
        // row-major: token 1 is the top-right cell, token 2 the bottom-left one
        let at = |c: i64, y: i64, x: i64| m.double_value(&[0, c, y, x]);
        assert_eq!((at(0, 0, 0), at(0, 1, 2)), (0.0, 0.0));
        assert_eq!((at(0, 0, 3), at(0, 1, 5), at(1, 0, 5)), (1.0, 1.0, -1.0));
        assert_eq!((at(0, 2, 0), at(0, 3, 2)), (2.0, 2.0));
        assert_eq!(at(0, 3, 5), 3.0);
        let e = condition_map(&Tensor::zeros([1, 5, 2], (Kind::Float, Device::Cpu)), 4, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("square number") && e.contains("5"), "{e}");
        assert!(condition_map(&tok, 1, 8).is_err());
    }

    #[test]
    fn condition_map_widens_conv_in_and_localises_the_condition() {
        tch::manual_seed(0);
        let cfg = UNet2DConditionModelConfig {
            addition_embed_type: None,
            condition_map: true,
            ..pooled_only(3)
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), cfg.clone()).unwrap();
        assert_eq!(vs.variables()["conv_in.weight"].size(), [8, 3 + 12, 3, 3]);
        // the key round-trips through config.json
        let back: UNet2DConditionModelConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert!(back.condition_map);
        let x = Tensor::randn([1, 3, 16, 16], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[300.0f32]);
        let c1 = Tensor::randn([1, 16, 12], (Kind::Float, Device::Cpu));
        // change only the top-left token: the output changes most near the top-left cell
        let c2 = c1.copy();
        let _ = c2.narrow(1, 0, 1).fill_(3.0);
        let y1 = unet.forward(&x, &t, &c1, None, None).unwrap();
        let y2 = unet.forward(&x, &t, &c2, None, None).unwrap();
        assert_eq!(y1.size(), [1, 3, 16, 16]);
        let d = (&y1 - &y2).abs().sum_dim_intlist(1, false, Kind::Float); // (1, 16, 16)
        let near = d
            .narrow(1, 0, 4)
            .narrow(2, 0, 4)
            .mean(Kind::Float)
            .double_value(&[]);
        let far = d
            .narrow(1, 12, 4)
            .narrow(2, 12, 4)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(near > 1e-4 && near > far, "near {near}, far {far}");
        // a condition that is not a square grid is refused, not a panic
        let odd = Tensor::randn([1, 5, 12], (Kind::Float, Device::Cpu));
        let e = unet
            .forward(&x, &t, &odd, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("square number"), "{e}");
    }
}
