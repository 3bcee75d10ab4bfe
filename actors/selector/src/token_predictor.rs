//! `TokenPredictor` (LaVIT, Jin et al., ICLR 2024, §3.1 "token selector"), reference
//! `LaVIT/models/modeling_visual_tokenzier.py::TokenPredictor`.
//!
//! `in_conv` = LayerNorm(eps 1e-5) → Linear → GELU; the first half of the channels stays
//! local, the second half is averaged over the tokens the policy keeps (a global context);
//! `out_conv` = Linear(C, C/2) → GELU → Linear(C/2, C/4) → GELU → Linear(C/4, 2) →
//! LogSoftmax. Index 0 of the output is log p(keep), index 1 log p(drop).

use lavit_encoder::layers::{gelu, linear, LayerNorm};
use lavit_runtime::shape::dims;
use lavit_runtime::Result;
use tch::{nn, nn::Module, Kind, Tensor};

#[derive(Debug)]
pub struct TokenPredictor {
    /// `in_conv.0`
    pub in_conv_norm: LayerNorm,
    /// `in_conv.1`
    pub in_conv_linear: nn::Linear,
    /// `out_conv.0`, `out_conv.2`, `out_conv.4`
    pub out_conv: [nn::Linear; 3],
}

impl TokenPredictor {
    pub fn new(vs: nn::Path, embed_dim: i64) -> Self {
        let c = embed_dim;
        let i = &vs / "in_conv";
        let o = &vs / "out_conv";
        Self {
            in_conv_norm: LayerNorm::new(&i / 0, c, 1e-5),
            in_conv_linear: linear(&i / 1, c, c, true),
            out_conv: [
                linear(&o / 0, c, c / 2, true),
                linear(&o / 2, c / 2, c / 4, true),
                linear(&o / 4, c / 4, 2, true),
            ],
        }
    }

    /// x [B, N, C] (float32), policy [B, N, 1] → log-probs [B, N, 2] (0 = keep).
    pub fn forward(&self, x: &Tensor, policy: &Tensor) -> Result<Tensor> {
        let x = gelu(&self.in_conv_linear.forward(&self.in_conv_norm.forward(x)));
        let [b, n, c] = dims(&x, "token predictor input [B, N, C]")?;
        let local_x = x.narrow(2, 0, c / 2); // (B, N, C/2)
        let global_x = (x.narrow(2, c / 2, c - c / 2) * policy).sum_dim_intlist(1, true, None)
            / policy.sum_dim_intlist(1, true, None); // (B, 1, C/2)
        let x = Tensor::cat(&[local_x, global_x.expand([b, n, c - c / 2], false)], -1);
        let x = gelu(&self.out_conv[0].forward(&x));
        let x = gelu(&self.out_conv[1].forward(&x));
        Ok(self.out_conv[2].forward(&x).log_softmax(-1, Kind::Float))
    }
}
