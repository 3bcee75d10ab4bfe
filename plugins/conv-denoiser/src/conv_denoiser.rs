//! A residual conv net as the pixel decoder's noise predictor (no attention, one resolution):
//!
//! ```text
//! t [R] ── sinusoidal(width) ── time_mlp ──┐
//! cond [R, L, D] ── masked mean ── cond_pool ─┴─ emb [R, width]
//! cond [R, L = g², D] ── g×g grid, nearest ↑ to h×w ── cond_map (1×1) ─┐
//! sample [R, C, h, w] ── conv_in (3×3) ───────────────────────────────── + ── h
//! h ── depth × [ h + conv2(silu(norm2(conv1(silu(norm1(h))) + emb_proj(emb)))) ]
//!   ── norm_out ── silu ── conv_out (3×3) ── prediction [R, C, h, w]
//! ```
//!
//! The condition enters twice: pooled (added to the time embedding, as diffusers' `text`
//! added conditioning) and, when its tokens form a square grid, as a spatial map added after
//! `conv_in` (each token over its cell, as the U-Net's `condition_map` option), so the small
//! network learns where each token belongs without attention. Sinusoidal timestep features
//! follow diffusers' `get_timestep_embedding` with `flip_sin_to_cos = true`
//! (cos first, frequencies `exp(-ln(10000)·i/half)`).

use lavit_plugin_api::weights::{load_state_into, load_var_store, var_store_state_dict};
use lavit_plugin_api::{Denoiser, DenoiserInput, PluginArgs, PluginError, PluginResult};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

/// The plugin's `config` table.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConvDenoiserConfig {
    /// Channels C of the sample (3 for a pixel-space decoder, the VAE's latent channels).
    pub in_channels: i64,
    /// Width D of the condition tokens (the feature decoder's output width).
    pub cross_attention_dim: i64,
    /// Native side of the sample (pixels, or latent cells with a VAE).
    pub sample_size: i64,
    /// Channels of the hidden layers.
    pub width: i64,
    /// Residual blocks.
    pub depth: i64,
    /// GroupNorm groups (must divide `width`).
    pub norm_num_groups: i64,
}

impl Default for ConvDenoiserConfig {
    fn default() -> Self {
        ConvDenoiserConfig {
            in_channels: 3,
            cross_attention_dim: 32,
            sample_size: 32,
            width: 64,
            depth: 4,
            norm_num_groups: 8,
        }
    }
}

/// One residual block: GroupNorm → SiLU → conv, + the embedding, GroupNorm → SiLU → conv.
#[derive(Debug)]
struct Block {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    emb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
}

fn conv3(vs: nn::Path, i: i64, o: i64) -> nn::Conv2D {
    let c = nn::ConvConfig {
        padding: 1,
        ..Default::default()
    };
    nn::conv2d(vs, i, o, 3, c)
}

impl Block {
    fn new(vs: nn::Path, w: i64, groups: i64) -> Self {
        let gn = Default::default();
        Block {
            norm1: nn::group_norm(&vs / "norm1", groups, w, gn),
            conv1: conv3(&vs / "conv1", w, w),
            emb_proj: nn::linear(&vs / "emb_proj", w, w, Default::default()),
            norm2: nn::group_norm(&vs / "norm2", groups, w, Default::default()),
            conv2: conv3(&vs / "conv2", w, w),
        }
    }

    /// h [R, W, h, w], emb [R, W] → [R, W, h, w].
    fn forward(&self, h: &Tensor, emb: &Tensor) -> PluginResult<Tensor> {
        let x = self.conv1.forward(&self.norm1.forward(h).f_silu()?);
        let e = self
            .emb_proj
            .forward(emb)
            .f_unsqueeze(-1)?
            .f_unsqueeze(-1)?;
        let x = self
            .conv2
            .forward(&self.norm2.forward(&x.f_add(&e)?).f_silu()?);
        Ok(h.f_add(&x)?)
    }
}

/// The conv denoiser (see the module doc), its weights in its own `VarStore`.
pub struct ConvDenoiser {
    cfg: ConvDenoiserConfig,
    vs: nn::VarStore,
    time_mlp: (nn::Linear, nn::Linear),
    cond_pool: nn::Linear,
    cond_map: nn::Conv2D,
    conv_in: nn::Conv2D,
    blocks: Vec<Block>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl ConvDenoiser {
    /// Builds the network on `device` (random init from libtorch's generator, or `weights`).
    pub fn new(
        cfg: ConvDenoiserConfig,
        device: tch::Device,
        weights: Option<&std::path::Path>,
    ) -> PluginResult<Self> {
        let ok = cfg.in_channels >= 1
            && cfg.cross_attention_dim >= 1
            && cfg.sample_size >= 1
            && cfg.width >= 2
            && cfg.width % 2 == 0
            && cfg.depth >= 0
            && cfg.norm_num_groups >= 1
            && cfg.width % cfg.norm_num_groups == 0
            && [
                cfg.in_channels,
                cfg.cross_attention_dim,
                cfg.width,
                cfg.sample_size,
            ]
            .iter()
            .all(|&v| v <= 1 << 14)
            && cfg.depth <= 256;
        if !ok {
            return Err(PluginError(format!(
                "conv-denoiser config: sizes must be positive (at most 16384, depth at most 256), \
                 width even and a multiple of norm_num_groups; got {cfg:?}"
            )));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let w = cfg.width;
        let lin = |p: nn::Path, i, o| nn::linear(p, i, o, Default::default());
        let time_mlp = (
            lin(&root / "time_mlp" / 0, w, w),
            lin(&root / "time_mlp" / 2, w, w),
        );
        let cond_pool = lin(&root / "cond_pool", cfg.cross_attention_dim, w);
        let cond_map = nn::conv2d(
            &root / "cond_map",
            cfg.cross_attention_dim,
            w,
            1,
            Default::default(),
        );
        let conv_in = conv3(&root / "conv_in", cfg.in_channels, w);
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&root / "blocks" / i, w, cfg.norm_num_groups))
            .collect();
        let norm_out = nn::group_norm(
            &root / "norm_out",
            cfg.norm_num_groups,
            w,
            Default::default(),
        );
        let conv_out = conv3(&root / "conv_out", w, cfg.in_channels);
        if let Some(path) = weights {
            load_var_store(&vs, path)?;
        }
        Ok(ConvDenoiser {
            cfg,
            vs,
            time_mlp,
            cond_pool,
            cond_map,
            conv_in,
            blocks,
            norm_out,
            conv_out,
        })
    }

    /// The registered factory: parses `args.config` as [`ConvDenoiserConfig`].
    pub fn from_args(args: &PluginArgs) -> PluginResult<Self> {
        let cfg: ConvDenoiserConfig = serde_json::from_str(&args.config)
            .map_err(|e| PluginError(format!("conv-denoiser config: {e}")))?;
        Self::new(cfg, args.device, args.weights.as_deref())
    }

    /// Sinusoidal features of timesteps `t` [R] → [R, width] (cos, then sin).
    fn timestep_features(&self, t: &Tensor) -> PluginResult<Tensor> {
        let half = self.cfg.width / 2;
        let dev = self.vs.device();
        let exponent = Tensor::f_arange(half, (Kind::Float, dev))?
            .f_mul_scalar(-(10000f64.ln()) / half as f64)?;
        let args = t
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(1)?
            .f_mul(&exponent.f_exp()?.f_unsqueeze(0)?)?; // (R, half)
        Ok(Tensor::f_cat(&[args.f_cos()?, args.f_sin()?], 1)?)
    }

    /// Mean of the condition tokens [R, L, D] over the attended positions → [R, D].
    fn pooled(cond: &Tensor, mask: Option<&Tensor>) -> PluginResult<Tensor> {
        match mask {
            None => Ok(cond.f_mean_dim(1, false, Kind::Float)?),
            Some(m) => {
                let m = m.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?; // (R, L, 1)
                let n = m
                    .f_sum_dim_intlist(1, false, Kind::Float)?
                    .f_clamp_min(1.0)?;
                Ok(cond
                    .f_mul(&m)?
                    .f_sum_dim_intlist(1, false, Kind::Float)?
                    .f_div(&n)?)
            }
        }
    }
}

impl Denoiser for ConvDenoiser {
    fn name(&self) -> String {
        format!(
            "conv-denoiser(C={}, W={}, depth={})",
            self.cfg.in_channels, self.cfg.width, self.cfg.depth
        )
    }
    fn in_channels(&self) -> i64 {
        self.cfg.in_channels
    }
    fn cross_attention_dim(&self) -> i64 {
        self.cfg.cross_attention_dim
    }
    fn sample_size(&self) -> i64 {
        self.cfg.sample_size
    }

    fn forward(&self, x: &DenoiserInput<'_>) -> PluginResult<Tensor> {
        let (c, d) = (self.cfg.in_channels, self.cfg.cross_attention_dim);
        let s = x.sample.size();
        if s.len() != 4 || s[1] != c {
            return Err(PluginError(format!(
                "conv-denoiser: sample must be [R, {c}, h, w], got {s:?}"
            )));
        }
        let (r, h, w) = (s[0], s[2], s[3]);
        let e = x.encoder_hidden_states.size();
        if e.len() != 3 || e[0] != r || e[2] != d || e[1] == 0 {
            return Err(PluginError(format!(
                "conv-denoiser: encoder_hidden_states must be [{r}, L ≥ 1, {d}], got {e:?}"
            )));
        }
        if x.timestep.size() != [r] {
            return Err(PluginError(format!(
                "conv-denoiser: timestep must be [{r}], got {:?}",
                x.timestep.size()
            )));
        }
        if let Some(m) = x.encoder_attention_mask {
            if m.size() != [r, e[1]] {
                return Err(PluginError(format!(
                    "conv-denoiser: encoder_attention_mask must be [{r}, {}], got {:?}",
                    e[1],
                    m.size()
                )));
            }
        }
        let cond = x.encoder_hidden_states.f_to_kind(Kind::Float)?;
        let t = self.timestep_features(x.timestep)?;
        let emb = self
            .time_mlp
            .1
            .forward(&self.time_mlp.0.forward(&t).f_silu()?)
            .f_add(
                &self
                    .cond_pool
                    .forward(&Self::pooled(&cond, x.encoder_attention_mask)?),
            )?;
        let mut hid = self.conv_in.forward(&x.sample.f_to_kind(Kind::Float)?);
        // The spatial condition map, when the tokens form a g × g grid that fits the sample.
        let g = (e[1] as f64).sqrt().round() as i64;
        if g * g == e[1] && g <= h && g <= w {
            let grid = cond.f_reshape([r, g, g, d])?.f_permute([0, 3, 1, 2])?; // (R, D, g, g)
            let up = grid.f_upsample_nearest2d([h, w], None, None)?;
            hid = hid.f_add(&self.cond_map.forward(&up))?;
        }
        for block in &self.blocks {
            hid = block.forward(&hid, &emb)?;
        }
        let out = self
            .conv_out
            .forward(&self.norm_out.forward(&hid).f_silu()?);
        Ok(out.f_to_kind(x.sample.kind())?)
    }

    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        var_store_state_dict(&self.vs)
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(var_store_state_dict(&self.vs))
    }

    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        load_state_into(&self.vs, state, "conv-denoiser state dict")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn small() -> ConvDenoiserConfig {
        ConvDenoiserConfig {
            in_channels: 3,
            cross_attention_dim: 8,
            sample_size: 8,
            width: 16,
            depth: 2,
            norm_num_groups: 4,
        }
    }

    fn input<'a>(x: &'a Tensor, t: &'a Tensor, c: &'a Tensor) -> DenoiserInput<'a> {
        DenoiserInput {
            sample: x,
            timestep: t,
            encoder_hidden_states: c,
            encoder_attention_mask: None,
            text_embeds: None,
            time_ids: None,
        }
    }

    #[test]
    fn prediction_has_the_sample_shape_and_depends_on_time_and_condition() {
        tch::manual_seed(0);
        let net = ConvDenoiser::new(small(), Device::Cpu, None).unwrap();
        let x = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[10f32, 500.0]);
        let c = Tensor::randn([2, 4, 8], (Kind::Float, Device::Cpu)); // a 2 × 2 grid
        let y = net.forward(&input(&x, &t, &c)).unwrap();
        assert_eq!(y.size(), [2, 3, 8, 8]);
        let t2 = Tensor::from_slice(&[11f32, 500.0]);
        let y2 = net.forward(&input(&x, &t2, &c)).unwrap();
        let diff =
            |a: &Tensor, b: &Tensor, i: i64| (a.get(i) - b.get(i)).abs().max().double_value(&[]);
        // rows are independent: changing row 0's timestep changes row 0 only
        assert!(diff(&y, &y2, 0) > 0.0);
        assert_eq!(diff(&y, &y2, 1), 0.0);
        let y3 = net.forward(&input(&x, &t, &c.zeros_like())).unwrap();
        assert!(diff(&y, &y3, 0) > 0.0, "the condition must matter");
        // a mask hiding everything but the first token changes the pooled condition
        let mask =
            Tensor::from_slice(&[true, false, false, false, true, true, true, true]).view([2, 4]);
        let masked = DenoiserInput {
            encoder_attention_mask: Some(&mask),
            ..input(&x, &t, &c)
        };
        let y4 = net.forward(&masked).unwrap();
        assert!(diff(&y, &y4, 0) > 0.0);
        assert!(diff(&y, &y4, 1) < 1e-5);
        // bad shapes are errors naming what was expected
        let bad = Tensor::zeros([2, 4, 8, 8], (Kind::Float, Device::Cpu));
        let e = net.forward(&input(&bad, &t, &c)).err().unwrap();
        assert!(e.0.contains("[R, 3, h, w]"), "{e}");
        let e = net
            .forward(&input(
                &x,
                &t,
                &Tensor::zeros([2, 4, 5], (Kind::Float, Device::Cpu)),
            ))
            .err()
            .unwrap();
        assert!(e.0.contains("encoder_hidden_states"), "{e}");
    }

    #[test]
    fn state_dict_round_trips_and_refuses_what_does_not_fit() {
        tch::manual_seed(1);
        let a = ConvDenoiser::new(small(), Device::Cpu, None).unwrap();
        let mut b = ConvDenoiser::new(small(), Device::Cpu, None).unwrap();
        let x = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[3f32]);
        let c = Tensor::randn([1, 3, 8], (Kind::Float, Device::Cpu)); // not a grid: pooled only
        let ya = a.forward(&input(&x, &t, &c)).unwrap();
        assert!(!ya.allclose(&b.forward(&input(&x, &t, &c)).unwrap(), 1e-6, 1e-6, false));
        b.load_state_dict(&a.state_dict().unwrap()).unwrap();
        assert!(ya.equal(&b.forward(&input(&x, &t, &c)).unwrap()));
        assert_eq!(
            a.trainable_parameters().len(),
            a.state_dict().unwrap().len()
        );
        let mut sd = a.state_dict().unwrap();
        sd.pop();
        let e = b.load_state_dict(&sd).err().unwrap();
        assert!(e.0.contains("missing"), "{e}");
        let e = ConvDenoiser::new(
            ConvDenoiserConfig {
                width: 10,
                ..small()
            },
            Device::Cpu,
            None,
        )
        .err()
        .unwrap();
        assert!(e.0.contains("norm_num_groups"), "{e}");
    }
}
