//! lavit-plugin-api: the traits a LaVIT plugin implements, shared by the host and by
//! plugin dylibs. The built-in stages implement the same traits (the EVA ViT is a
//! [`Backbone`], the l2-normalised VQ codebook a [`Codebook`]), so a plugin replaces a
//! built-in part without the host knowing the difference.
//!
//! Versioning, the declaration symbol and the `declare_plugin!` macro are added by the
//! plugins work (issue 7).

use tch::Tensor;

/// An error crossing the plugin boundary (plain data: no trait objects, no backtraces).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PluginError(pub String);

pub type PluginResult<T> = std::result::Result<T, PluginError>;

impl From<tch::TchError> for PluginError {
    fn from(e: tch::TchError) -> Self {
        PluginError(e.to_string())
    }
}

/// A vision backbone: normalised images → patch features (the role EVA-CLIP plays).
pub trait Backbone: Send {
    /// A short name for logs and errors.
    fn name(&self) -> String;
    /// Square input size in pixels.
    fn image_size(&self) -> i64;
    fn patch_size(&self) -> i64;
    /// Feature width C.
    fn width(&self) -> i64;
    /// Number of patch features N per image.
    fn num_patches(&self) -> i64 {
        (self.image_size() / self.patch_size()).pow(2)
    }
    /// images [B, 3, H, W] (CLIP-normalised, on the stage's device) → patch features
    /// [B, N, C] in raster order (no cls token).
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor>;
    /// Trainable parameters (empty for a frozen backbone).
    fn trainable_parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }
}

/// Output of [`Codebook::quantize_train`].
pub struct QuantizeOut {
    /// Quantised vectors [T, D] with a straight-through gradient to the input.
    pub quantized: Tensor,
    /// Code ids [T] (int64, in 0..num_codes).
    pub ids: Tensor,
    /// Codebook/commitment loss (a scalar; zero for EMA codebooks that update in `update`).
    pub loss: Tensor,
}

/// A codebook: encoded features → discrete ids → embeddings for the feature decoder.
pub trait Codebook: Send {
    fn name(&self) -> String;
    /// Number of ids (the LLM gets this many visual tokens).
    fn num_codes(&self) -> i64;
    /// Width D of the vectors it quantises (the output of `encode_task_layer`).
    fn code_dim(&self) -> i64;
    /// z [T, D] → ids [T] (int64).
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor>;
    /// ids [T] → embeddings [T, D], what the feature decoder reads.
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor>;
    /// Training forward with a straight-through estimator.
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut>;
    /// Called after each optimiser step with that step's inputs and ids (EMA updates,
    /// dead-code restarts). The default does nothing.
    fn update(&mut self, _z: &Tensor, _ids: &Tensor) -> PluginResult<()> {
        Ok(())
    }
    /// Parameters trained by the optimiser (empty for EMA codebooks).
    fn trainable_parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }
}
