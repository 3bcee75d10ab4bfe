//! EVA-CLIP vision transformer (Fang et al., "EVA-CLIP: Improved Training Techniques for CLIP
//! at Scale", 2023), as LaVIT uses it: the frozen ViT-G/14 whose patch features the dynamic
//! visual tokenizer reads. Reference: `LaVIT/models/modeling_visual_encoder.py`
//! (`EVAVisionTransformer`, `Block`, `Attention`, `Mlp`, `PatchEmbed`).
//!
//! LaVIT builds it with `qkv_bias=True` (separate `q_bias`/`v_bias`, a zero k bias), no layer
//! scale, no relative position bias, no rope, LayerNorm eps 1e-6 computed in float32, exact
//! GELU, and `use_mean_pooling=False` (so `norm` + `head` exist in the file). LaVIT calls
//! `forward(x, return_all_features=True)`: every token after the last block, no final norm.

use lavit_plugin_api::{Backbone, PluginError, PluginResult};
use lavit_runtime::layers;
use lavit_runtime::shape::dims;
use lavit_runtime::{checkpoint, Error, Result, TchContext};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::layers::{linear, mlp_hidden, LayerNorm, Mlp};

/// Hyper-parameters of `EVAVisionTransformer` (defaults: the EVA-CLIP ViT-G/14 LaVIT uses).
#[derive(Debug, Clone, PartialEq)]
pub struct EvaVitConfig {
    /// Square input size in pixels (`image_size`).
    pub img_size: i64,
    /// Patch size of the `patch_embed.proj` convolution.
    pub patch_size: i64,
    /// Input channels.
    pub in_chans: i64,
    /// Feature width (`width`, `embed_dim`).
    pub embed_dim: i64,
    /// Number of transformer blocks (`layers`).
    pub depth: i64,
    /// Attention heads (`width // head_width`).
    pub num_heads: i64,
    /// MLP hidden width = `int(embed_dim * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// LayerNorm epsilon (`partial(LayerNorm, eps=1e-6)`).
    pub norm_eps: f64,
    /// Output width of `head` (`num_classes` = the CLIP embed dim; unused by LaVIT).
    pub num_classes: i64,
}

impl Default for EvaVitConfig {
    fn default() -> Self {
        Self {
            img_size: 224,
            patch_size: 14,
            in_chans: 3,
            embed_dim: 1408,
            depth: 40,
            num_heads: 16,
            mlp_ratio: 4.3637,
            norm_eps: 1e-6,
            num_classes: 1024,
        }
    }
}

impl EvaVitConfig {
    /// The encoder described by a checkpoint's manifest (`tokenizer` section).
    pub fn from_manifest(t: &lavit_runtime::manifest::TokenizerManifest) -> Self {
        Self {
            img_size: t.img_size,
            patch_size: t.patch_size,
            in_chans: 3,
            embed_dim: t.encoder_width,
            depth: t.encoder_depth,
            num_heads: t.encoder_heads,
            mlp_ratio: t.encoder_mlp_ratio,
            norm_eps: t.encoder_norm_eps,
            num_classes: t.encoder_head_dim_out,
        }
    }

    pub fn num_patches(&self) -> i64 {
        (self.img_size / self.patch_size).pow(2)
    }
}

/// `PatchEmbed`: a stride-`patch_size` convolution.
#[derive(Debug)]
pub struct PatchEmbed {
    pub proj: layers::Conv2d,
    img_size: i64,
}

impl PatchEmbed {
    pub fn new(vs: nn::Path, cfg: &EvaVitConfig) -> Self {
        let conv = nn::ConvConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        Self {
            proj: layers::conv2d(
                &vs / "proj",
                cfg.in_chans,
                cfg.embed_dim,
                cfg.patch_size,
                conv,
            ),
            img_size: cfg.img_size,
        }
    }

    /// x [B, 3, H, W] → [B, N, C].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.size4().ctx("patch_embed input must be [B, 3, H, W]")?;
        if h != self.img_size || w != self.img_size {
            return Err(Error::invalid(format!(
                "Input image size ({h}*{w}) doesn't match model ({0}*{0}).",
                self.img_size
            )));
        }
        let y = self.proj.forward(x); // (B, C, H/p, W/p)
        Ok(y.flatten(2, -1).transpose(1, 2)) // (B, N, C)
    }
}

/// `Attention` with `qkv.weight` (no bias) and `q_bias`/`v_bias` (k bias is zero).
#[derive(Debug)]
pub struct Attention {
    pub qkv: nn::Linear,
    pub q_bias: Tensor,
    pub v_bias: Tensor,
    pub proj: nn::Linear,
    num_heads: i64,
    scale: f64,
}

impl Attention {
    pub fn new(vs: nn::Path, dim: i64, num_heads: i64) -> Self {
        let head_dim = dim / num_heads;
        Self {
            qkv: linear(&vs / "qkv", dim, 3 * dim, false),
            q_bias: layers::zeros(&vs, "q_bias", &[dim]),
            v_bias: layers::zeros(&vs, "v_bias", &[dim]),
            proj: linear(&vs / "proj", dim, dim, true),
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, n, _] = dims(x, "attention input [B, N, C]")?;
        // qkv_bias = cat(q_bias, zeros_like(v_bias), v_bias)
        let qkv_bias = Tensor::cat(&[&self.q_bias, &self.v_bias.zeros_like(), &self.v_bias], 0);
        let qkv = x.linear(&self.qkv.ws, Some(&qkv_bias));
        let qkv = qkv
            .reshape([b, n, 3, self.num_heads, -1])
            .permute([2, 0, 3, 1, 4]); // (3, B, nh, N, hs)
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // softmax(q·scale·kᵀ)·v, fused (the official code spells it out as matmul, softmax, matmul)
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            Some(self.scale),
            false,
        ); // (B, nh, N, hs)
        let y = y.transpose(1, 2).reshape([b, n, -1]); // (B, N, C)
        Ok(self.proj.forward(&y))
    }
}

/// `Block`: pre-norm attention and MLP residuals (no layer scale: `init_values=None`).
#[derive(Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub attn: Attention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn new(vs: nn::Path, cfg: &EvaVitConfig) -> Self {
        let d = cfg.embed_dim;
        Self {
            norm1: LayerNorm::new(&vs / "norm1", d, cfg.norm_eps),
            attn: Attention::new(&vs / "attn", d, cfg.num_heads),
            norm2: LayerNorm::new(&vs / "norm2", d, cfg.norm_eps),
            mlp: Mlp::new(&vs / "mlp", d, mlp_hidden(d, cfg.mlp_ratio)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x + self.attn.forward(&self.norm1.forward(x))?;
        Ok(&x + self.mlp.forward(&self.norm2.forward(&x)))
    }
}

/// `EVAVisionTransformer` as LaVIT builds it.
#[derive(Debug)]
pub struct EVAVisionTransformer {
    pub patch_embed: PatchEmbed,
    pub cls_token: Tensor,
    pub pos_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub head: nn::Linear,
    pub cfg: EvaVitConfig,
}

impl EVAVisionTransformer {
    pub fn new(vs: nn::Path, cfg: &EvaVitConfig) -> Self {
        let d = cfg.embed_dim;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&vs / "blocks" / i, cfg))
            .collect();
        Self {
            patch_embed: PatchEmbed::new(&vs / "patch_embed", cfg),
            cls_token: layers::var(
                &vs,
                "cls_token",
                &[1, 1, d],
                nn::Init::Randn {
                    mean: 0.,
                    stdev: 0.02,
                },
            ),
            pos_embed: layers::var(
                &vs,
                "pos_embed",
                &[1, cfg.num_patches() + 1, d],
                nn::Init::Randn {
                    mean: 0.,
                    stdev: 0.02,
                },
            ),
            blocks,
            norm: LayerNorm::new(&vs / "norm", d, cfg.norm_eps),
            head: linear(&vs / "head", d, cfg.num_classes, true),
            cfg: cfg.clone(),
        }
    }

    /// `forward(x, return_all_features=True)`: images [B, 3, H, W] → [B, 1+N, C], the cls
    /// token first, after the last block and without the final norm.
    pub fn forward_all_features(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.patch_embed.forward(x)?; // (B, N, C)
        let b = x.size()[0];
        let cls = self.cls_token.expand([b, -1, -1], false);
        let mut x = Tensor::cat(&[&cls, &x], 1) + &self.pos_embed; // (B, 1+N, C)
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        Ok(x)
    }

    /// `forward(x)`: the CLIP image embedding `head(norm(x)[:, 0])` (not used by LaVIT).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.forward_all_features(x)?;
        Ok(self.head.forward(&self.norm.forward(&x).select(1, 0)))
    }
}

/// The built-in [`Backbone`]: an [`EVAVisionTransformer`] that owns its weights.
pub struct EvaBackbone {
    pub vs: nn::VarStore,
    pub model: EVAVisionTransformer,
}

impl std::fmt::Debug for EvaBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EvaBackbone({:?})", self.model.cfg)
    }
}

impl EvaBackbone {
    /// Random (untrained) weights on `device`, as the Python module initialises them in shape.
    pub fn new(cfg: &EvaVitConfig, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let model = EVAVisionTransformer::new(vs.root(), cfg);
        Self { vs, model }
    }

    /// Build in `kind` and load `eva_vitg_psz14.bin` (or any file/format the runtime
    /// loader reads), strictly: every key of the file must be a variable of the model and
    /// vice versa. The model takes the file's tensors where they already are `kind`
    /// (views of the file, no copy); it is never drawn at random first.
    pub fn load(path: &Path, cfg: &EvaVitConfig, device: Device, kind: Kind) -> Result<Self> {
        let sd = checkpoint::load_path(path)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = layers::uninit(|| EVAVisionTransformer::new(vs.root(), cfg));
        checkpoint::load_into_owned(
            &vs,
            "",
            sd,
            &path.display().to_string(),
            &Default::default(),
        )?;
        vs.freeze();
        Ok(Self { vs, model })
    }

    /// Patch features [B, N, C] (cls token dropped), as LaVIT's `encoder_features[:, 1:, :]`.
    pub fn patch_features(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.model.forward_all_features(images)?;
        Ok(x.narrow(1, 1, x.size()[1] - 1))
    }
}

impl Backbone for EvaBackbone {
    fn name(&self) -> String {
        format!(
            "eva-vit (width {}, depth {}, {} px / {})",
            self.model.cfg.embed_dim,
            self.model.cfg.depth,
            self.model.cfg.img_size,
            self.model.cfg.patch_size
        )
    }
    fn image_size(&self) -> i64 {
        self.model.cfg.img_size
    }
    fn patch_size(&self) -> i64 {
        self.model.cfg.patch_size
    }
    fn width(&self) -> i64 {
        self.model.cfg.embed_dim
    }
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        let images = images
            .to_device(self.vs.device())
            .to_kind(self.model.cls_token.kind());
        self.patch_features(&images)
            .map_err(|e| PluginError(e.to_string()))
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        self.vs
            .trainable_variables()
            .into_iter()
            .filter(|t| t.requires_grad())
            .collect()
    }
    /// Every variable by name (the layout of `eva_vitg_psz14.bin`), detached copies.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
}
