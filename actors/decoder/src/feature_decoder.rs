//! LaVIT's feature decoders (Jin et al., ICLR 2024, §3.1: reconstruct the ViT features from
//! the quantised tokens; their output conditions the diffusion U-Net). Reference
//! `LaVIT/models/modeling_decoder.py`: `VQDecoder` (`tokenizer_decoder.bin`, the "lowres"
//! SD-1.5 condition through `unet_proj`) and `HighresVQDecoder`
//! (`highres_tokenizer_decoder.bin`, the SDXL condition: `unet_proj_1` ‖ `unet_proj_2` as
//! prompt embeds and `unet_attnpool` as pooled embeds).
//!
//! Both take the quantised embeddings of all images concatenated ([T, in_chans]) plus the
//! per-image token counts, pad them to the longest image with a mask (the official
//! batching), and cross-attend from `num_patches` learned queries.

pub mod attention_pool;
pub mod layers;

use lavit_runtime::{checkpoint, Error, Result};
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

pub use attention_pool::AttentionPool2d;
use layers::{linear, Block, LayerNorm};

/// Hyper-parameters of `VQDecoder` / `HighresVQDecoder` (defaults: LaVIT-7B-v2,
/// `build_tokenizer_decoder`).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDecoderConfig {
    /// Input width (= the codebook dimension).
    pub in_chans: i64,
    /// Transformer width.
    pub embed_dim: i64,
    /// Number of blocks.
    pub depth: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// MLP hidden width = `int(embed_dim * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// Number of learned queries (= ViT patches).
    pub num_patches: i64,
    /// Output of `decode_task_layer` (1408 in the official code).
    pub decoder_out_dim: i64,
    /// `VQDecoder.unet_proj` output (SD-1.5 cross-attention width).
    pub lowres_unet_proj: i64,
    /// `HighresVQDecoder.unet_proj_1` output.
    pub highres_unet_proj_1: i64,
    /// `HighresVQDecoder.unet_proj_2` output and pooled width.
    pub highres_unet_proj_2: i64,
    /// Heads of `unet_attnpool`.
    pub attnpool_heads: i64,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
}

impl Default for FeatureDecoderConfig {
    fn default() -> Self {
        Self {
            in_chans: 32,
            embed_dim: 1408,
            depth: 12,
            num_heads: 16,
            mlp_ratio: 4.3637,
            num_patches: 256,
            decoder_out_dim: 1408,
            lowres_unet_proj: 768,
            highres_unet_proj_1: 768,
            highres_unet_proj_2: 1280,
            attnpool_heads: 16,
            norm_eps: 1e-5,
        }
    }
}

impl FeatureDecoderConfig {
    pub fn from_manifest(f: &lavit_runtime::manifest::FeatureDecoderManifest) -> Self {
        Self {
            in_chans: f.in_chans,
            embed_dim: f.embed_dim,
            depth: f.depth,
            num_heads: f.heads,
            mlp_ratio: f.mlp_ratio,
            num_patches: f.num_patches,
            decoder_out_dim: f.decoder_out_dim,
            lowres_unet_proj: f.lowres_unet_proj,
            highres_unet_proj_1: f.highres_unet_proj_1,
            highres_unet_proj_2: f.highres_unet_proj_2,
            attnpool_heads: f.highres_attnpool_heads,
            norm_eps: 1e-5,
        }
    }
}

impl FeatureDecoderConfig {
    /// Sizes positive and under the caps of [`lavit_runtime::manifest::caps`], heads dividing
    /// widths (`num_heads` | `embed_dim`, `attnpool_heads` | `decoder_out_dim`).
    pub fn validate(&self, origin: &str) -> Result<()> {
        use lavit_runtime::manifest::caps::{MAX_DEPTH, MAX_MLP_RATIO, MAX_PATCHES, MAX_WIDTH};
        let bad = |key: &str, msg: String| Err(Error::config(origin, key, msg));
        for (key, v, max) in [
            ("in_chans", self.in_chans, MAX_WIDTH),
            ("embed_dim", self.embed_dim, MAX_WIDTH),
            ("depth", self.depth, MAX_DEPTH),
            ("heads", self.num_heads, MAX_WIDTH),
            ("num_patches", self.num_patches, MAX_PATCHES),
            ("decoder_out_dim", self.decoder_out_dim, MAX_WIDTH),
            ("lowres_unet_proj", self.lowres_unet_proj, MAX_WIDTH),
            ("highres_unet_proj_1", self.highres_unet_proj_1, MAX_WIDTH),
            ("highres_unet_proj_2", self.highres_unet_proj_2, MAX_WIDTH),
            ("highres_attnpool_heads", self.attnpool_heads, MAX_WIDTH),
        ] {
            if v <= 0 || v > max {
                return bad(key, format!("must be in 1..={max}, got {v}"));
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_ratio <= MAX_MLP_RATIO)
            || self.mlp_hidden() < 1
        {
            return bad("mlp_ratio", format!("{} is not usable", self.mlp_ratio));
        }
        if !(self.norm_eps.is_finite() && (0.0..1.0).contains(&self.norm_eps)) {
            return bad("norm_eps", format!("{} is not in [0, 1)", self.norm_eps));
        }
        if self.embed_dim % self.num_heads != 0 {
            return bad(
                "heads",
                format!(
                    "{} heads do not divide embed_dim {}",
                    self.num_heads, self.embed_dim
                ),
            );
        }
        if self.decoder_out_dim % self.attnpool_heads != 0 {
            return bad(
                "highres_attnpool_heads",
                format!(
                    "{} heads do not divide decoder_out_dim {}",
                    self.attnpool_heads, self.decoder_out_dim
                ),
            );
        }
        Ok(())
    }

    /// MLP hidden width `int(embed_dim * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> i64 {
        (self.embed_dim as f64 * self.mlp_ratio) as i64
    }

    /// The shapes of the tensors that pin down every size of the config (the rest of the
    /// model follows from them), without allocating anything. `highres` selects
    /// `HighresVQDecoder`'s heads, else `VQDecoder`'s.
    pub fn key_shapes(&self, highres: bool) -> Vec<(String, Vec<i64>)> {
        let (d, o, n) = (self.embed_dim, self.decoder_out_dim, self.num_patches);
        let last = self.depth - 1;
        let mut v = vec![
            ("in_proj.weight".to_string(), vec![d, self.in_chans]),
            ("pos_embed".to_string(), vec![1, n, d]),
            ("query_embed".to_string(), vec![1, n, d]),
            (
                format!("blocks.{last}.mlp.fc1.weight"),
                vec![self.mlp_hidden(), d],
            ),
            ("decode_task_layer.2.weight".to_string(), vec![o, d]),
        ];
        if highres {
            v.push((
                "unet_proj_1.weight".into(),
                vec![self.highres_unet_proj_1, o],
            ));
            v.push((
                "unet_proj_2.weight".into(),
                vec![self.highres_unet_proj_2, o],
            ));
            v.push(("unet_attnpool.positional_embedding".into(), vec![n + 1, o]));
            v.push((
                "unet_attnpool.c_proj.weight".into(),
                vec![self.highres_unet_proj_2, o],
            ));
        } else {
            v.push(("unet_proj.weight".into(), vec![self.lowres_unet_proj, o]));
        }
        v
    }

    /// Refuse a config whose sizes are not the checkpoint's (checked before the model is
    /// built, so a hostile size never reaches an allocation), naming the tensor and the
    /// config key it comes from.
    pub fn check_against(
        &self,
        sd: &checkpoint::StateDict,
        highres: bool,
        origin: &str,
    ) -> Result<()> {
        self.validate(origin)?;
        for (k, want) in self.key_shapes(highres) {
            let got = sd.get(&k).map(|t| t.size());
            if got.as_ref() != Some(&want) {
                return Err(Error::config(
                    origin,
                    "feature_decoder",
                    format!(
                        "the sizes imply `{k}` of shape {want:?}, the checkpoint holds {}",
                        got.map_or("no such tensor".to_string(), |g| format!("{g:?}"))
                    ),
                ));
            }
        }
        let deeper = format!("blocks.{}.", self.depth);
        if sd.keys().any(|k| k.starts_with(&deeper)) {
            return Err(Error::config(
                origin,
                "feature_decoder.depth",
                format!("{} blocks, but the checkpoint has more", self.depth),
            ));
        }
        Ok(())
    }
}

/// Pad concatenated tokens [T, C] into [B, L, C] (L = the largest count, at least 1) with
/// a mask [B, L] (1 = real token), as the official `forward` does.
pub fn pad_tokens(x: &Tensor, token_counts: &[i64]) -> Result<(Tensor, Tensor)> {
    let total: i64 = token_counts.iter().sum();
    let (t, c) = x
        .size2()
        .map_err(|_| Error::invalid(format!("tokens must be [T, C], got {:?}", x.size())))?;
    if total != t || token_counts.iter().any(|&n| n < 0) {
        return Err(Error::invalid(format!(
            "token counts {token_counts:?} do not add up to the {t} tokens given"
        )));
    }
    let l = token_counts.iter().copied().max().unwrap_or(0).max(1);
    let opts = (x.kind(), x.device());
    let mut rows = Vec::with_capacity(token_counts.len());
    let mut masks = Vec::with_capacity(token_counts.len());
    let mut off = 0;
    for &n in token_counts {
        let real = x.narrow(0, off, n);
        rows.push(Tensor::cat(&[real, Tensor::zeros([l - n, c], opts)], 0));
        masks.push(Tensor::cat(
            &[Tensor::ones([n], opts), Tensor::zeros([l - n], opts)],
            0,
        ));
        off += n;
    }
    Ok((Tensor::stack(&rows, 0), Tensor::stack(&masks, 0)))
}

/// The trunk both decoders share: in_proj, pos/query embeds, blocks, norm,
/// decode_task_layer (`decode_task_layer.0`, `.2`).
#[derive(Debug)]
pub struct DecoderTrunk {
    pub in_proj: nn::Linear,
    pub pos_embed: Tensor,
    pub query_embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: LayerNorm,
    pub decode_task_layer_0: nn::Linear,
    pub decode_task_layer_2: nn::Linear,
}

impl DecoderTrunk {
    fn new(vs: &nn::Path, cfg: &FeatureDecoderConfig) -> Self {
        let d = cfg.embed_dim;
        let hidden = cfg.mlp_hidden();
        let init = nn::Init::Randn {
            mean: 0.,
            stdev: 0.02,
        };
        let dtl = vs / "decode_task_layer";
        Self {
            in_proj: linear(vs / "in_proj", cfg.in_chans, d, true),
            pos_embed: lavit_runtime::layers::var(vs, "pos_embed", &[1, cfg.num_patches, d], init),
            query_embed: lavit_runtime::layers::var(
                vs,
                "query_embed",
                &[1, cfg.num_patches, d],
                init,
            ),
            blocks: (0..cfg.depth)
                .map(|i| Block::new(vs / "blocks" / i, d, cfg.num_heads, hidden, cfg.norm_eps))
                .collect(),
            norm: LayerNorm::new(vs / "norm", d, cfg.norm_eps),
            decode_task_layer_0: linear(&dtl / 0, d, d, true),
            decode_task_layer_2: linear(&dtl / 2, d, cfg.decoder_out_dim, true),
        }
    }

    /// Padded in_proj'd tokens [B, L, D] + mask [B, L] → decoded features
    /// [B, num_patches, decoder_out_dim].
    fn forward_padded(&self, x_pad: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x_pad.size3().map_err(|e| Error::invalid(e.to_string()))?;
        let n = self.pos_embed.size()[1];
        if l > n {
            return Err(Error::invalid(format!(
                "an image has {l} tokens, more than the decoder's {n} positions"
            )));
        }
        let x_pad = x_pad + self.pos_embed.narrow(1, 0, l);
        let mut q = self.query_embed.expand([b, -1, -1], false);
        for blk in &self.blocks {
            q = blk.forward(&q, &x_pad, mask)?;
        }
        let q = self.norm.forward(&q);
        Ok(self
            .decode_task_layer_2
            .forward(&self.decode_task_layer_0.forward(&q).tanh()))
    }

    /// Tokens [T, in_chans] of all images + counts → decoded features (official order:
    /// in_proj first, then pad with zeros).
    pub fn decode(&self, x: &Tensor, token_counts: &[i64]) -> Result<Tensor> {
        let x = self.in_proj.forward(x);
        let (x_pad, mask) = pad_tokens(&x, token_counts)?;
        self.forward_padded(&x_pad, &mask)
    }

    /// Already padded codes [B, L, in_chans] with mask [B, L] (for training batches).
    pub fn decode_padded(&self, codes: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self.in_proj.forward(codes) * mask.unsqueeze(-1).to_kind(codes.kind());
        self.forward_padded(&x, mask)
    }
}

/// Read a decoder checkpoint and check `cfg` against it before anything is built.
fn read_checked(
    path: &Path,
    cfg: &FeatureDecoderConfig,
    highres: bool,
) -> Result<checkpoint::StateDict> {
    cfg.validate("feature decoder config")?;
    let sd = checkpoint::load_path(path)?;
    cfg.check_against(
        &sd,
        highres,
        &format!(
            "feature decoder config (checked against {})",
            path.display()
        ),
    )?;
    Ok(sd)
}

/// Moves `sd` into `vs` (a model built in [`lavit_runtime::layers::uninit`]), strictly.
fn load_strict(vs: &nn::VarStore, path: &Path, sd: checkpoint::StateDict) -> Result<()> {
    checkpoint::load_into_owned(vs, "", sd, &path.display().to_string(), &Default::default())?;
    Ok(())
}

/// `VQDecoder` ("lowres"): decoded features through `unet_proj`.
#[derive(Debug)]
pub struct VQDecoder {
    pub trunk: DecoderTrunk,
    pub unet_proj: nn::Linear,
    pub cfg: FeatureDecoderConfig,
}

impl VQDecoder {
    pub fn new(vs: nn::Path, cfg: &FeatureDecoderConfig) -> Self {
        Self {
            trunk: DecoderTrunk::new(&vs, cfg),
            unet_proj: linear(
                &vs / "unet_proj",
                cfg.decoder_out_dim,
                cfg.lowres_unet_proj,
                true,
            ),
            cfg: cfg.clone(),
        }
    }

    /// Build on `device` in `kind` and load `tokenizer_decoder.bin` strictly → (weights,
    /// model).
    pub fn load(
        path: &Path,
        cfg: &FeatureDecoderConfig,
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self)> {
        let sd = read_checked(path, cfg, false)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let m = lavit_runtime::layers::uninit(|| Self::new(vs.root(), cfg));
        load_strict(&vs, path, sd)?;
        Ok((vs, m))
    }

    /// `forward(x, token_num)`: codes [T, in_chans] of all images + per-image counts →
    /// U-Net condition [B, num_patches, lowres_unet_proj] (float32; computed in the
    /// weights' kind).
    pub fn forward(&self, x: &Tensor, token_counts: &[i64]) -> Result<Tensor> {
        let x = x.to_kind(self.unet_proj.ws.kind());
        let out = self
            .unet_proj
            .forward(&self.trunk.decode(&x, token_counts)?);
        Ok(out.to_kind(Kind::Float))
    }
}

/// `HighresVQDecoder`: (prompt embeds [B, N, proj_1 + proj_2], pooled [B, proj_2]).
#[derive(Debug)]
pub struct HighresVQDecoder {
    pub trunk: DecoderTrunk,
    pub unet_proj_1: nn::Linear,
    pub unet_proj_2: nn::Linear,
    pub unet_attnpool: AttentionPool2d,
    pub cfg: FeatureDecoderConfig,
}

impl HighresVQDecoder {
    pub fn new(vs: nn::Path, cfg: &FeatureDecoderConfig) -> Self {
        let o = cfg.decoder_out_dim;
        Self {
            trunk: DecoderTrunk::new(&vs, cfg),
            unet_proj_1: linear(&vs / "unet_proj_1", o, cfg.highres_unet_proj_1, true),
            unet_proj_2: linear(&vs / "unet_proj_2", o, cfg.highres_unet_proj_2, true),
            unet_attnpool: AttentionPool2d::new(
                &vs / "unet_attnpool",
                cfg.num_patches,
                o,
                cfg.attnpool_heads,
                cfg.highres_unet_proj_2,
            ),
            cfg: cfg.clone(),
        }
    }

    /// Build on `device` in `kind` and load `highres_tokenizer_decoder.bin` strictly.
    pub fn load(
        path: &Path,
        cfg: &FeatureDecoderConfig,
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self)> {
        let sd = read_checked(path, cfg, true)?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let m = lavit_runtime::layers::uninit(|| Self::new(vs.root(), cfg));
        load_strict(&vs, path, sd)?;
        Ok((vs, m))
    }

    /// codes [T, in_chans] + per-image counts → (prompt_embeds, pooled_prompt_embeds),
    /// float32 (computed in the weights' kind).
    pub fn forward(&self, x: &Tensor, token_counts: &[i64]) -> Result<(Tensor, Tensor)> {
        let x = x.to_kind(self.unet_proj_1.ws.kind());
        let rec = self.trunk.decode(&x, token_counts)?;
        let prompt = Tensor::cat(
            &[
                self.unet_proj_1.forward(&rec),
                self.unet_proj_2.forward(&rec),
            ],
            -1,
        );
        let pooled = self.unet_attnpool.forward(&rec)?;
        Ok((prompt.to_kind(Kind::Float), pooled.to_kind(Kind::Float)))
    }
}
