//! lavit-quantizer: LaVIT's quantizer — `encode_task_layer` (features → code space) and the
//! l2-normalised `VectorQuantizer` (reference `LaVIT/models/modeling_visual_tokenzier.py`),
//! the built-in [`lavit_plugin_api::Codebook`], with the training additions the official
//! repository does not ship: straight-through quantisation, EMA codebook updates with
//! dead-code restarts, and k-means initialisation; [`stage`] is the Quantizer stage of the
//! pipeline.

pub mod encode_task_layer;
pub mod kmeans;
pub mod stage;
pub mod vector_quantizer;

pub use encode_task_layer::EncodeTaskLayer;
pub use kmeans::spherical_kmeans;
pub use stage::{load_codebook, QuantizerStageModel, SharedCodebook};
pub use vector_quantizer::{l2norm, EmaConfig, VectorQuantizer};
