//! lavit-encoder: the frozen vision encoder of LaVIT — EVA-CLIP ViT-G/14
//! (`EVAVisionTransformer`, reference `LaVIT/models/modeling_visual_encoder.py`), the image
//! input module (`LaVITImageProcessor`, reference `LaVIT/models/transform.py`) and the
//! small layers shared by the tokenizer's transformer modules.

pub mod eva_vit;
pub mod image_processor;
pub mod layers;

pub use eva_vit::{EVAVisionTransformer, EvaVitConfig};
pub use image_processor::{ImageLimits, LaVITImageProcessor};
