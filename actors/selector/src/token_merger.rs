//! `TokenMerger` (LaVIT, Jin et al., ICLR 2024, §3.1 "token merger"), stored as
//! `causal_encoder`; reference `LaVIT/models/modeling_visual_tokenzier.py`
//! (`TokenMerger`, `CausalFuserBlock`, `TokenCausalAttention`, `TokenCrossAttention`).
//!
//! Each block: causal self-attention among the kept tokens (softmax masked by the decision
//! policy, every token also sees itself), cross-attention from every token onto the
//! *dropped* tokens of the `ln_vision`-normalised ViT features, then an MLP. Both softmaxes
//! are the official `softmax_with_policy`: subtract the row max, exp in float32, multiply by
//! the policy, then `(attn + eps/N) / (sum + eps)` with eps = 1e-6.

use lavit_encoder::layers::{linear, mlp_hidden, LayerNorm, Mlp};
use lavit_runtime::shape::dims;
use lavit_runtime::Result;
use tch::{nn, nn::Module, Kind, Tensor};

/// Hyper-parameters of `TokenMerger` (defaults: LaVIT-7B-v2).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMergerConfig {
    /// Width C (= the ViT width).
    pub dim: i64,
    /// Attention heads.
    pub num_heads: i64,
    /// Number of `CausalFuserBlock`s.
    pub depth: i64,
    /// MLP hidden width = `int(dim * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// Bias on qkv/query/key/value/proj.
    pub qkv_bias: bool,
    /// LayerNorm epsilon.
    pub norm_eps: f64,
}

impl Default for TokenMergerConfig {
    fn default() -> Self {
        Self {
            dim: 1408,
            num_heads: 16,
            depth: 12,
            mlp_ratio: 4.3637,
            qkv_bias: true,
            norm_eps: 1e-5,
        }
    }
}

impl TokenMergerConfig {
    pub fn from_manifest(t: &lavit_runtime::manifest::TokenizerManifest) -> Self {
        Self {
            dim: t.encoder_width,
            num_heads: t.merger_heads,
            depth: t.merger_depth,
            mlp_ratio: t.merger_mlp_ratio,
            qkv_bias: t.merger_qkv_bias,
            norm_eps: t.merger_norm_eps,
        }
    }
}

const POLICY_EPS: f64 = 1e-6;

/// The shared tail of both `softmax_with_policy`s. attn [B, H, N, N], policy [B, 1, N|1, N].
fn masked_softmax(attn: &Tensor, attn_policy: &Tensor) -> Tensor {
    let n = attn.size()[3];
    let (max_att, _) = attn.max_dim(-1, true);
    let a = (attn - &max_att).to_kind(Kind::Float).exp() * attn_policy.to_kind(Kind::Float);
    let a = (&a + POLICY_EPS / n as f64) / (a.sum_dim_intlist(-1, true, None) + POLICY_EPS);
    a.to_kind(max_att.kind())
}

/// `TokenCausalAttention`.
#[derive(Debug)]
pub struct TokenCausalAttention {
    pub qkv: nn::Linear,
    pub proj: nn::Linear,
    num_heads: i64,
    scale: f64,
}

impl TokenCausalAttention {
    pub fn new(vs: nn::Path, dim: i64, num_heads: i64, qkv_bias: bool) -> Self {
        Self {
            qkv: linear(&vs / "qkv", dim, 3 * dim, qkv_bias),
            proj: linear(&vs / "proj", dim, dim, qkv_bias),
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
        }
    }

    /// `softmax_with_policy`: keys = kept tokens plus the query itself, causal.
    pub fn softmax_with_policy(attn: &Tensor, policy: &Tensor) -> Result<Tensor> {
        let [b, n] = dims(policy, "policy [B, N]")?;
        let attn_policy = policy.reshape([b, 1, 1, n]);
        let eye = Tensor::eye(n, (attn_policy.kind(), attn_policy.device())).view([1, 1, n, n]);
        let attn_policy: Tensor = &attn_policy + (attn_policy.neg() + 1.0) * eye; // (B, 1, N, N)
        let causal = Tensor::ones([n, n], (attn_policy.kind(), attn_policy.device()))
            .tril(0)
            .view([1, 1, n, n]);
        Ok(masked_softmax(attn, &(attn_policy * causal)))
    }

    /// x [B, N, C], decisions [B, N] (None: plain softmax).
    pub fn forward(&self, x: &Tensor, decisions: Option<&Tensor>) -> Result<Tensor> {
        let [b, n, c] = dims(x, "[B, N, C]")?;
        let qkv = self
            .qkv
            .forward(x)
            .reshape([b, n, 3, self.num_heads, c / self.num_heads])
            .permute([2, 0, 3, 1, 4]); // (3, B, nh, N, hs)
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = q.matmul(&k.transpose(-2, -1)) * self.scale; // (B, nh, N, N)
        let attn = match decisions {
            None => attn.softmax(-1, attn.kind()),
            Some(d) => Self::softmax_with_policy(&attn, d)?,
        };
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]); // (B, N, C)
        Ok(self.proj.forward(&y))
    }
}

/// `TokenCrossAttention`: every token attends to the dropped tokens.
#[derive(Debug)]
pub struct TokenCrossAttention {
    pub query: nn::Linear,
    pub key: nn::Linear,
    pub value: nn::Linear,
    pub proj: nn::Linear,
    num_heads: i64,
    scale: f64,
}

impl TokenCrossAttention {
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

    /// `softmax_with_policy`: keys = dropped tokens (1 − policy).
    pub fn softmax_with_policy(attn: &Tensor, policy: &Tensor) -> Result<Tensor> {
        let [b, n] = dims(policy, "policy [B, N]")?;
        let attn_policy = (policy.neg() + 1.0).reshape([b, 1, 1, n]); // (B, 1, 1, N)
        Ok(masked_softmax(attn, &attn_policy))
    }

    /// x [B, N, C] queries, x_origin [B, N, C] keys/values, decisions [B, N].
    pub fn forward(&self, x: &Tensor, x_origin: &Tensor, decisions: &Tensor) -> Result<Tensor> {
        let [b, n, c] = dims(x, "[B, N, C]")?;
        let h = self.num_heads;
        let heads = |t: Tensor| t.reshape([b, n, h, c / h]).permute([0, 2, 1, 3]); // (B, nh, N, hs)
        let q = heads(self.query.forward(x));
        let k = heads(self.key.forward(x_origin));
        let v = heads(self.value.forward(x_origin));
        let attn = q.matmul(&k.transpose(-2, -1)) * self.scale;
        let attn = Self::softmax_with_policy(&attn, decisions)?;
        let y = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]); // (B, N, C)
        Ok(self.proj.forward(&y))
    }
}

/// `CausalFuserBlock`.
#[derive(Debug)]
pub struct CausalFuserBlock {
    pub norm0: LayerNorm,
    pub token_causal_attn: TokenCausalAttention,
    pub norm1: LayerNorm,
    pub token_cross_attn: TokenCrossAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
}

impl CausalFuserBlock {
    pub fn new(vs: nn::Path, cfg: &TokenMergerConfig) -> Self {
        let d = cfg.dim;
        Self {
            norm0: LayerNorm::new(&vs / "norm0", d, cfg.norm_eps),
            token_causal_attn: TokenCausalAttention::new(
                &vs / "token_causal_attn",
                d,
                cfg.num_heads,
                cfg.qkv_bias,
            ),
            norm1: LayerNorm::new(&vs / "norm1", d, cfg.norm_eps),
            token_cross_attn: TokenCrossAttention::new(
                &vs / "token_cross_attn",
                d,
                cfg.num_heads,
                cfg.qkv_bias,
            ),
            norm2: LayerNorm::new(&vs / "norm2", d, cfg.norm_eps),
            mlp: Mlp::new(&vs / "mlp", d, mlp_hidden(d, cfg.mlp_ratio)),
        }
    }

    pub fn forward(&self, x: &Tensor, x_origin: &Tensor, decisions: &Tensor) -> Result<Tensor> {
        let x = x + self
            .token_causal_attn
            .forward(&self.norm0.forward(x), Some(decisions))?;
        let x = &x
            + self
                .token_cross_attn
                .forward(&self.norm1.forward(&x), x_origin, decisions)?;
        Ok(&x + self.mlp.forward(&self.norm2.forward(&x)))
    }
}

/// `TokenMerger` (`causal_encoder`).
#[derive(Debug)]
pub struct TokenMerger {
    pub blocks: Vec<CausalFuserBlock>,
    pub ln_vision: LayerNorm,
    pub norm: LayerNorm,
}

impl TokenMerger {
    pub fn new(vs: nn::Path, cfg: &TokenMergerConfig) -> Self {
        Self {
            blocks: (0..cfg.depth)
                .map(|i| CausalFuserBlock::new(&vs / "blocks" / i, cfg))
                .collect(),
            ln_vision: LayerNorm::new(&vs / "ln_vision", cfg.dim, cfg.norm_eps),
            norm: LayerNorm::new(&vs / "norm", cfg.dim, cfg.norm_eps),
        }
    }

    /// x [B, N, C] patch features, decisions [B, N] (1 = keep) → [B, N, C] for every
    /// position (the caller keeps the kept ones).
    pub fn forward(&self, x: &Tensor, decisions: &Tensor) -> Result<Tensor> {
        let x_origin = self.ln_vision.forward(x);
        let mut x = x.shallow_clone();
        for blk in &self.blocks {
            x = blk.forward(&x, &x_origin, decisions)?;
        }
        Ok(self.norm.forward(&x))
    }
}
