//! Isotropic ConvNeXt: Liu et al., "A ConvNet for the 2020s" (CVPR 2022), §4 "isotropic
//! ConvNeXt". Reference Python: facebookresearch/ConvNeXt `models/convnext_isotropic.py`
//! (`ConvNeXtIsotropic`, `Block` from `models/convnext.py`); names are its attribute names
//! (`stem`, `blocks.{i}.dwconv/norm/pwconv1/pwconv2`, `norm`) so its checkpoints load.
//!
//! Differs from EVA (a ViT): a patchify convolution, then depthwise 7×7 convolutions and
//! per-pixel MLPs, no attention. For LaVIT it stops before the global pooling and returns the
//! per-patch features [B, N, C] the token selector reads.

use lavit_plugin_api::weights::{load_var_store, var_store_state_dict};
use lavit_plugin_api::{Backbone, PluginArgs, PluginError, PluginResult};
use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

/// The plugin's `config` table (defaults = `ConvNeXtIsotropic.__init__` defaults).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ConvNeXtConfig {
    /// Square input size in pixels.
    pub image_size: i64,
    /// Patchify stem kernel = stride (`kernel_size=16, stride=16` in the reference).
    pub patch_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Number of blocks.
    pub depth: i64,
    /// Feature width C (`dim`).
    pub dim: i64,
    /// Whether the optimiser trains it (LaVIT freezes its backbone: default false).
    pub trainable: bool,
}

impl Default for ConvNeXtConfig {
    fn default() -> Self {
        ConvNeXtConfig {
            image_size: 224,
            patch_size: 16,
            in_chans: 3,
            depth: 18,
            dim: 384,
            trainable: false,
        }
    }
}

/// `Block`: dwconv 7×7 → LayerNorm (channels last) → Linear 4C → GELU → Linear C, residual.
#[derive(Debug)]
struct Block {
    dwconv: nn::Conv2D,
    norm: nn::LayerNorm,
    pwconv1: nn::Linear,
    pwconv2: nn::Linear,
}

impl Block {
    fn new(vs: nn::Path, dim: i64) -> Self {
        let dw = nn::ConvConfig {
            padding: 3,
            groups: dim,
            ..Default::default()
        };
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        Block {
            dwconv: nn::conv2d(&vs / "dwconv", dim, dim, 7, dw),
            norm: nn::layer_norm(&vs / "norm", vec![dim], ln),
            pwconv1: nn::linear(&vs / "pwconv1", dim, 4 * dim, Default::default()),
            pwconv2: nn::linear(&vs / "pwconv2", 4 * dim, dim, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor) -> PluginResult<Tensor> {
        let h = self.dwconv.forward(x).f_permute([0, 2, 3, 1])?; // (B, H, W, C)
        let h = self
            .pwconv1
            .forward(&self.norm.forward(&h))
            .f_gelu("none")?;
        let h = self.pwconv2.forward(&h).f_permute([0, 3, 1, 2])?; // (B, C, H, W)
        Ok(x.f_add(&h)?)
    }
}

/// `ConvNeXtIsotropic` without the head, as a [`Backbone`].
pub struct ConvNeXt {
    cfg: ConvNeXtConfig,
    vs: nn::VarStore,
    stem: nn::Conv2D,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
}

impl ConvNeXt {
    /// Builds the network on `device` (random init as in the reference, or `weights`).
    pub fn new(
        cfg: ConvNeXtConfig,
        device: tch::Device,
        weights: Option<&std::path::Path>,
    ) -> PluginResult<Self> {
        if cfg.patch_size < 1 || cfg.image_size % cfg.patch_size != 0 || cfg.dim < 1 {
            return Err(PluginError(format!(
                "convnext: image_size must be a multiple of patch_size ≥ 1 and dim ≥ 1, got {cfg:?}"
            )));
        }
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let stem_cfg = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let stem = nn::conv2d(
            &root / "stem",
            cfg.in_chans,
            cfg.dim,
            cfg.patch_size,
            stem_cfg,
        );
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&root / "blocks" / i, cfg.dim))
            .collect();
        let ln = nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        };
        let norm = nn::layer_norm(&root / "norm", vec![cfg.dim], ln);
        if let Some(path) = weights {
            load_var_store(&vs, path)?;
        }
        if !cfg.trainable {
            vs.freeze();
        }
        Ok(ConvNeXt {
            cfg,
            vs,
            stem,
            blocks,
            norm,
        })
    }

    /// The registered factory: parses `args.config` as [`ConvNeXtConfig`].
    pub fn from_args(args: &PluginArgs) -> PluginResult<Self> {
        let cfg: ConvNeXtConfig = serde_json::from_str(&args.config)
            .map_err(|e| PluginError(format!("convnext config: {e}")))?;
        Self::new(cfg, args.device, args.weights.as_deref())
    }
}

impl Backbone for ConvNeXt {
    fn name(&self) -> String {
        format!(
            "convnext-isotropic(d={}, C={}, p={})",
            self.cfg.depth, self.cfg.dim, self.cfg.patch_size
        )
    }
    fn image_size(&self) -> i64 {
        self.cfg.image_size
    }
    fn patch_size(&self) -> i64 {
        self.cfg.patch_size
    }
    fn width(&self) -> i64 {
        self.cfg.dim
    }

    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        let s = self.cfg.image_size;
        let size = images.size();
        if size.len() != 4 || size[1] != self.cfg.in_chans || size[2] != s || size[3] != s {
            return Err(PluginError(format!(
                "convnext: expected images [B, {}, {s}, {s}], got {size:?}",
                self.cfg.in_chans
            )));
        }
        let images = images.f_to_device(self.vs.device())?;
        let mut x = self.stem.forward(&images); // (B, C, H/p, W/p)
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let x = x.f_flatten(2, 3)?.f_transpose(1, 2)?; // (B, N, C), raster order
        Ok(self.norm.forward(&x))
    }

    fn trainable_parameters(&self) -> Vec<Tensor> {
        if self.cfg.trainable {
            self.vs.trainable_variables()
        } else {
            Vec::new() // frozen (`VarStore::freeze` turned requires_grad off)
        }
    }

    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(var_store_state_dict(&self.vs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn small() -> ConvNeXtConfig {
        ConvNeXtConfig {
            image_size: 32,
            patch_size: 8,
            depth: 2,
            dim: 16,
            ..Default::default()
        }
    }

    #[test]
    fn patch_features_have_the_declared_geometry() {
        let net = ConvNeXt::new(small(), Device::Cpu, None).unwrap();
        assert_eq!(net.num_patches(), 16);
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        let y = net.forward(&x).unwrap();
        assert_eq!(y.size(), [2, 16, 16]);
        // Raster order: with depth 0 (stem + norm) a feature row sees only its own patch,
        // so changing the bottom-right patch's pixels changes the last row only.
        let local = ConvNeXt::new(
            ConvNeXtConfig {
                depth: 0,
                ..small()
            },
            Device::Cpu,
            None,
        )
        .unwrap();
        let x2 = x.copy();
        let _ = x2.narrow(2, 24, 8).narrow(3, 24, 8).fill_(5.0);
        let (a, b) = (local.forward(&x).unwrap(), local.forward(&x2).unwrap());
        assert!(a
            .narrow(1, 0, 15)
            .allclose(&b.narrow(1, 0, 15), 1e-5, 1e-5, false));
        assert!(!a
            .narrow(1, 15, 1)
            .allclose(&b.narrow(1, 15, 1), 1e-5, 1e-5, false));
        assert!(net
            .forward(&Tensor::zeros([1, 3, 16, 16], (Kind::Float, Device::Cpu)))
            .is_err());
        assert!(net.trainable_parameters().is_empty());
        let trainable = ConvNeXtConfig {
            trainable: true,
            ..small()
        };
        assert!(!ConvNeXt::new(trainable, Device::Cpu, None)
            .unwrap()
            .trainable_parameters()
            .is_empty());
    }
}
