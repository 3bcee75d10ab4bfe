//! The pixel decoder of `lavit_decoder` ([`lavit_decoder::pixel_decoder`], re-exported here)
//! and the assembled tokenizer's feature decoders driving it. Text → image itself runs
//! through [`crate::pipeline::Pipeline`] (commands, the server, the demo's evaluation).

pub use lavit_decoder::pixel_decoder::*;
use lavit_runtime::Result;
use tch::Tensor;

/// The assembled tokenizer's feature decoders drive the pixel decoders.
impl FeatureDecoders for crate::tokenizer::VisualTokenizer {
    fn decode_lowres(&self, ids: &[Vec<i64>]) -> Result<Tensor> {
        crate::tokenizer::VisualTokenizer::decode_lowres(self, ids)
    }
    fn decode_highres(&self, ids: &[Vec<i64>]) -> Result<(Tensor, Tensor)> {
        crate::tokenizer::VisualTokenizer::decode_highres(self, ids)
    }
}
