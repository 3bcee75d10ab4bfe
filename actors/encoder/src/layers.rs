//! Layers shared by the LaVIT tokenizer modules, with the PyTorch attribute names:
//! the fp32 `LayerNorm` subclass (`modeling_visual_encoder.py::LayerNorm`) and the
//! two-layer GELU `Mlp` (`fc1`, `fc2`).

use lavit_runtime::layers;
use tch::{nn, nn::Module, Kind, Tensor};

/// `LayerNorm(nn.LayerNorm)` of the official code: normalises in float32 and casts back.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    dim: i64,
}

impl LayerNorm {
    /// Builds `weight` (ones) and `bias` (zeros) under `vs`.
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: layers::ones(&vs, "weight", &[dim]),
            bias: layers::zeros(&vs, "bias", &[dim]),
            eps,
            dim,
        }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let y = x.to_kind(Kind::Float).layer_norm(
            [self.dim],
            Some(&self.weight.to_kind(Kind::Float)),
            Some(&self.bias.to_kind(Kind::Float)),
            self.eps,
            true,
        );
        y.to_kind(kind)
    }
}

/// `nn.Linear` with the PyTorch names (`weight` [out, in], `bias`).
pub fn linear(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    layers::linear(
        vs,
        in_dim,
        out_dim,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// `nn.GELU()` (exact erf form, the PyTorch default).
pub fn gelu(x: &Tensor) -> Tensor {
    x.gelu("none")
}

/// `Mlp`: `fc1` → GELU → `fc2` (dropout 0 in every LaVIT module).
#[derive(Debug)]
pub struct Mlp {
    pub fc1: nn::Linear,
    pub fc2: nn::Linear,
}

impl Mlp {
    pub fn new(vs: nn::Path, dim: i64, hidden: i64) -> Self {
        Self {
            fc1: linear(&vs / "fc1", dim, hidden, true),
            fc2: linear(&vs / "fc2", hidden, dim, true),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.fc2.forward(&gelu(&self.fc1.forward(x)))
    }
}

/// `int(dim * mlp_ratio)` as Python computes it.
pub fn mlp_hidden(dim: i64, mlp_ratio: f64) -> i64 {
    (dim as f64 * mlp_ratio) as i64
}
