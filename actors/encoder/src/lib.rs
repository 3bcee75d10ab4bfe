//! lavit-encoder: the frozen vision encoder of LaVIT — EVA-CLIP ViT-G/14
//! (`EVAVisionTransformer`, reference `LaVIT/models/modeling_visual_encoder.py`), the image
//! input module (`LaVITImageProcessor`, reference `LaVIT/models/transform.py`) and the
//! small layers shared by the tokenizer's transformer modules; [`stage`] is the Encoder stage
//! of the pipeline.

pub mod eva_vit;
pub mod image_processor;
pub mod layers;
pub mod stage;

pub use eva_vit::{EVAVisionTransformer, EvaVitConfig};
pub use image_processor::{ImageLimits, LaVITImageProcessor};
pub use stage::{load_eva, EncoderStageModel, SharedBackbone};
