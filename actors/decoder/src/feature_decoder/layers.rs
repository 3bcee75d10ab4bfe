//! The small layers of `modeling_decoder.py` with their PyTorch names: `SelfAttention`,
//! `CrossAttention`, `Block`. The fp32 `LayerNorm`, `linear` and `Mlp` are the tokenizer's
//! (`lavit_encoder::layers`), the same classes in the official code.

pub use lavit_encoder::layers::{linear, LayerNorm, Mlp};
use lavit_runtime::shape::dims;
use lavit_runtime::Result;
use tch::{nn, nn::Module, Tensor};

/// `SelfAttention` over the learned queries.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv: nn::Linear,
    pub proj: nn::Linear,
    num_heads: i64,
    scale: f64,
}

impl SelfAttention {
    pub fn new(vs: nn::Path, dim: i64, num_heads: i64, qkv_bias: bool) -> Self {
        Self {
            qkv: linear(&vs / "qkv", dim, 3 * dim, qkv_bias),
            proj: linear(&vs / "proj", dim, dim, qkv_bias),
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [b, n, c] = dims(x, "[B, N, C]")?;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.num_heads, c / self.num_heads])
            .permute([2, 0, 3, 1, 4]); // (3, B, nh, N, hs)
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = (q.matmul(&k.transpose(-2, -1)) * self.scale).softmax(-1, q.kind());
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]); // (B, N, C)
        Ok(self.proj.forward(&y))
    }
}

/// `CrossAttention` from the queries onto the (padded) code embeddings; padding is masked
/// with the official additive `(1 − mask) · −10000`.
#[derive(Debug)]
pub struct CrossAttention {
    pub query: nn::Linear,
    pub key: nn::Linear,
    pub value: nn::Linear,
    pub proj: nn::Linear,
    num_heads: i64,
    scale: f64,
}

impl CrossAttention {
    pub fn new(vs: nn::Path, dim: i64, num_heads: i64, qkv_bias: bool) -> Self {
        Self {
            query: linear(&vs / "query", dim, dim, qkv_bias),
            key: linear(&vs / "key", dim, dim, qkv_bias),
            value: linear(&vs / "value", dim, dim, qkv_bias),
            proj: linear(&vs / "proj", dim, dim, qkv_bias),
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
        }
    }

    /// x [B, Nx, C], codebook_embeds [B, N, C], codebook_mask [B, N] (1 = real).
    pub fn forward(
        &self,
        x: &Tensor,
        codebook_embeds: &Tensor,
        codebook_mask: &Tensor,
    ) -> Result<Tensor> {
        let [b, n, c] = dims(codebook_embeds, "codebook embeddings [B, N, C]")?;
        let [_, nx, _] = dims(x, "queries [B, Nx, C]")?;
        let h = self.num_heads;
        let q = self
            .query
            .forward(x)
            .reshape([b, nx, h, c / h])
            .permute([0, 2, 1, 3]); // (B, nh, Nx, hs)
        let k = self
            .key
            .forward(codebook_embeds)
            .reshape([b, n, h, c / h])
            .permute([0, 2, 1, 3]); // (B, nh, N, hs)
        let v = self
            .value
            .forward(codebook_embeds)
            .reshape([b, n, h, c / h])
            .permute([0, 2, 1, 3]);
        let attn = q.matmul(&k.transpose(-2, -1)) * self.scale; // (B, nh, Nx, N)
        let extended = (codebook_mask.unsqueeze(1).unsqueeze(1).neg() + 1.0) * -10000.0;
        let attn = (attn + extended).softmax(-1, q.kind());
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, nx, c]); // (B, Nx, C)
        Ok(self.proj.forward(&y))
    }
}

/// Decoder `Block`: self-attention, cross-attention to the codes, MLP (pre-norm).
#[derive(Debug)]
pub struct Block {
    pub norm0: LayerNorm,
    pub self_attn: SelfAttention,
    pub norm1: LayerNorm,
    pub cross_attn: CrossAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn new(vs: nn::Path, dim: i64, heads: i64, hidden: i64, eps: f64) -> Self {
        Self {
            norm0: LayerNorm::new(&vs / "norm0", dim, eps),
            self_attn: SelfAttention::new(&vs / "self_attn", dim, heads, true),
            norm1: LayerNorm::new(&vs / "norm1", dim, eps),
            cross_attn: CrossAttention::new(&vs / "cross_attn", dim, heads, true),
            norm2: LayerNorm::new(&vs / "norm2", dim, eps),
            mlp: Mlp::new(&vs / "mlp", dim, hidden),
        }
    }

    pub fn forward(&self, x: &Tensor, codebook_embeds: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = x + self.self_attn.forward(&self.norm0.forward(x))?;
        let x = &x
            + self
                .cross_attn
                .forward(&self.norm1.forward(&x), codebook_embeds, mask)?;
        Ok(&x + self.mlp.forward(&self.norm2.forward(&x)))
    }
}
