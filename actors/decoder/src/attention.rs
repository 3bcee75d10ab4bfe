//! Attention, the GEGLU feed-forward and `BasicTransformerBlock` as diffusers builds them
//! (reference: `diffusers/models/attention_processor.py` `Attention` + `AttnProcessor2_0`,
//! `diffusers/models/attention.py` `BasicTransformerBlock`, `FeedForward`,
//! `diffusers/models/activations.py` `GEGLU`). Attention runs through libtorch's
//! `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).

use lavit_runtime::layers;
use lavit_runtime::shape::dims;
use lavit_runtime::Result;
use tch::{nn, nn::Module, Tensor};

/// Multi-head attention with `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Debug)]
pub struct Attention {
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    dim_head: i64,
}

impl Attention {
    /// `cross_attention_dim = None` for self-attention. `bias` is the q/k/v bias
    /// (`attention_bias`, false in the U-Net, true in the VAE); `to_out.0` always has one.
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        cross_attention_dim: Option<i64>,
        heads: i64,
        dim_head: i64,
        bias: bool,
    ) -> Self {
        let inner = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        let cfg = nn::LinearConfig {
            bias,
            ..Default::default()
        };
        Self {
            to_q: layers::linear(&vs / "to_q", query_dim, inner, cfg),
            to_k: layers::linear(&vs / "to_k", kv_dim, inner, cfg),
            to_v: layers::linear(&vs / "to_v", kv_dim, inner, cfg),
            to_out: layers::linear(&vs / "to_out" / 0, inner, query_dim, Default::default()),
            heads,
            dim_head,
        }
    }

    /// `xs` (B, Lq, query_dim); `context` (B, Lk, kv_dim) or `None` for self-attention;
    /// `bias` an additive attention bias broadcastable to (B, heads, Lq, Lk), e.g. the
    /// (B, 1, 1, Lk) bias made from an encoder attention mask.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let [b, lq, _] = dims(xs, "attention input (B, L, C)")?;
        let ctx = context.unwrap_or(xs);
        let [_, lk, _] = dims(ctx, "attention context (B, Lk, C)")?;
        let split = |t: Tensor, l: i64| t.view([b, l, self.heads, self.dim_head]).transpose(1, 2); // (B, nh, L, hd)
        let q = split(self.to_q.forward(xs), lq);
        let k = split(self.to_k.forward(ctx), lk);
        let v = split(self.to_v.forward(ctx), lk);
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, bias, 0.0, false, None, false); // (B, nh, Lq, hd)
        let y = y
            .transpose(1, 2)
            .reshape([b, lq, self.heads * self.dim_head]); // (B, Lq, inner)
        Ok(self.to_out.forward(&y))
    }
}

/// diffusers' conversion of a 0/1 `encoder_attention_mask` (B, Lk) into an additive bias
/// (B, 1, 1, Lk): `(1 - mask) * -10000`.
pub fn mask_to_bias(mask: &Tensor, kind: tch::Kind) -> Tensor {
    let keep = mask.to_kind(kind);
    ((keep.ones_like() - keep) * -10000.0)
        .unsqueeze(1)
        .unsqueeze(1) // (B, 1, 1, Lk)
}

/// `FeedForward` with the GEGLU activation: `net.0.proj` (dim → 2·inner), `net.2` (inner → dim).
#[derive(Debug)]
pub struct FeedForward {
    proj: nn::Linear,
    out: nn::Linear,
}

impl FeedForward {
    pub fn new(vs: nn::Path, dim: i64, mult: i64) -> Self {
        let inner = dim * mult;
        let proj = layers::linear(&vs / "net" / 0 / "proj", dim, inner * 2, Default::default());
        let out = layers::linear(&vs / "net" / 2, inner, dim, Default::default());
        Self { proj, out }
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let hg = self.proj.forward(xs).chunk(2, -1);
        let h = &hg[0] * hg[1].gelu("none"); // GEGLU: hidden * gelu(gate)
        self.out.forward(&h)
    }
}

/// `BasicTransformerBlock` (layer_norm type): self-attention, cross-attention, GEGLU FF,
/// each pre-normed and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: layers::LayerNorm,
    attn1: Attention,
    norm2: layers::LayerNorm,
    attn2: Attention,
    norm3: layers::LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vs: nn::Path,
        dim: i64,
        heads: i64,
        dim_head: i64,
        cross_attention_dim: i64,
    ) -> Self {
        let ln = |name: &str| {
            layers::layer_norm(
                &vs / name,
                vec![dim],
                nn::LayerNormConfig {
                    eps: 1e-5,
                    ..Default::default()
                },
            )
        };
        Self {
            norm1: ln("norm1"),
            attn1: Attention::new(&vs / "attn1", dim, None, heads, dim_head, false),
            norm2: ln("norm2"),
            attn2: Attention::new(
                &vs / "attn2",
                dim,
                Some(cross_attention_dim),
                heads,
                dim_head,
                false,
            ),
            norm3: ln("norm3"),
            ff: FeedForward::new(&vs / "ff", dim, 4),
        }
    }

    /// `xs` (B, L, dim), `context` (B, Lk, cross_dim), `context_bias` (B, 1, 1, Lk).
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        context_bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let xs = self.attn1.forward(&self.norm1.forward(xs), None, None)? + xs;
        let xs = self
            .attn2
            .forward(&self.norm2.forward(&xs), Some(context), context_bias)?
            + xs;
        Ok(self.ff.forward(&self.norm3.forward(&xs)) + xs)
    }
}
