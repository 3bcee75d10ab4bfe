//! `AttentionPool2d` of `modeling_decoder.py` (after CLIP's ResNet attention pool): the mean
//! token is prepended, positional embeddings added, one multi-head attention with separate
//! q/k/v projections (`F.multi_head_attention_forward`), output `c_proj`, first token kept.

use lavit_runtime::{Error, Result, TchContext};
use tch::{nn, nn::Module, Tensor};

use super::layers::linear;

#[derive(Debug)]
pub struct AttentionPool2d {
    /// [seq_len + 1, embed_dim]
    pub positional_embedding: Tensor,
    pub k_proj: nn::Linear,
    pub q_proj: nn::Linear,
    pub v_proj: nn::Linear,
    pub c_proj: nn::Linear,
    num_heads: i64,
}

impl AttentionPool2d {
    pub fn new(
        vs: nn::Path,
        seq_len: i64,
        embed_dim: i64,
        num_heads: i64,
        output_dim: i64,
    ) -> Self {
        Self {
            positional_embedding: lavit_runtime::layers::var(
                &vs,
                "positional_embedding",
                &[seq_len + 1, embed_dim],
                nn::Init::Randn {
                    mean: 0.,
                    stdev: (embed_dim as f64).powf(-0.5),
                },
            ),
            k_proj: linear(&vs / "k_proj", embed_dim, embed_dim, true),
            q_proj: linear(&vs / "q_proj", embed_dim, embed_dim, true),
            v_proj: linear(&vs / "v_proj", embed_dim, embed_dim, true),
            c_proj: linear(&vs / "c_proj", embed_dim, output_dim, true),
            num_heads,
        }
    }

    /// x [B, L, E] → pooled [B, output_dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, e) = x.size3().map_err(|_| {
            Error::invalid(format!(
                "attention pool input must be [B, L, E], got {:?}",
                x.size()
            ))
        })?;
        let h = self.num_heads;
        if h <= 0 || e % h != 0 {
            return Err(Error::invalid(format!(
                "attention pool: {h} heads do not divide the width {e}"
            )));
        }
        let x = Tensor::f_cat(
            &[
                x.f_mean_dim(1, true, None).ctx("attention pool")?,
                x.shallow_clone(),
            ],
            1,
        )
        .ctx("attention pool")?; // (B, L+1, E)
        let pos = self.positional_embedding.unsqueeze(0).to_kind(x.kind());
        let x = x.f_add(&pos).ctx("attention pool: positional embedding")?; // (B, L+1, E)
        let l = x.size()[1];
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.f_reshape([b, l, h, e / h])
                .ctx("attention pool")?
                .transpose(1, 2)) // (B, nh, L+1, hd)
        };
        let q = heads(self.q_proj.forward(&x))?;
        let k = heads(self.k_proj.forward(&x))?;
        let v = heads(self.v_proj.forward(&x))?;
        let scale = ((e / h) as f64).powf(-0.5);
        let attn = (q.matmul(&k.transpose(-2, -1)) * scale).softmax(-1, q.kind());
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, l, e]); // (B, L+1, E)
        Ok(self.c_proj.forward(&y.select(1, 0)))
    }
}
