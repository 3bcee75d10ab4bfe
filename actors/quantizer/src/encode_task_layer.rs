//! `encode_task_layer = nn.Sequential(Linear(C, C), Tanh(), Linear(C, code_dim))`
//! (reference `LaVIT/models/modeling_visual_tokenzier.py::DynamicVisualTokenizer`).

use lavit_runtime::layers;
use tch::{nn, nn::Module, Tensor};

#[derive(Debug)]
pub struct EncodeTaskLayer {
    /// `encode_task_layer.0`
    pub l0: nn::Linear,
    /// `encode_task_layer.2`
    pub l2: nn::Linear,
}

impl EncodeTaskLayer {
    pub fn new(vs: nn::Path, dim: i64, code_dim: i64) -> Self {
        Self {
            l0: layers::linear(&vs / 0, dim, dim, Default::default()),
            l2: layers::linear(&vs / 2, dim, code_dim, Default::default()),
        }
    }
}

impl Module for EncodeTaskLayer {
    /// [.., C] → [.., code_dim].
    fn forward(&self, x: &Tensor) -> Tensor {
        self.l2.forward(&self.l0.forward(x).tanh())
    }
}
