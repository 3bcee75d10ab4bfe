//! lavit-plugin-api: the traits a LaVIT plugin implements, shared by the host and by
//! plugin dylibs. The built-in stages implement the same traits (the EVA ViT is a
//! [`Backbone`], the l2-normalised VQ codebook a [`Codebook`]), so a plugin replaces a
//! built-in part without the host knowing the difference.
//!
//! A plugin dylib exports exactly one symbol, [`DECLARATION_SYMBOL`], a `#[repr(C)]`
//! [`PluginDeclaration`] written by [`declare_plugin!`]. It carries the plugin API version,
//! the rustc version and the tch/libtorch versions the plugin was built with; the host
//! (`lavit_runtime::plugin_host`) reads and checks them before it touches anything else.
//! Only then does it call the declaration's `register` function, which hands the host
//! factories for codebooks, backbones and denoisers ([`Registrar`]).
//!
//! Trait objects (`Box<dyn Codebook>`) cross the dylib boundary with the Rust ABI. That is
//! sound only because the host and every plugin are compiled by the same pinned toolchain
//! (`rust-toolchain.toml`) against the same version of this crate and of tch: the three
//! version checks enforce exactly that. A plugin dylib carries its own copy of the Rust
//! standard library, so a panic must never unwind out of plugin code into the host:
//! everything the host can call (the register function, the factories and every trait
//! method) runs inside `catch_unwind` *in the plugin* ([`guard`]) and returns a
//! [`PluginError`] instead.

mod declaration;
pub mod guard;
mod registrar;
pub mod weights;

pub use declaration::{
    PluginDeclaration, StaticStr, VersionMismatch, API_VERSION, DECLARATION_SYMBOL, MAGIC,
    RUSTC_VERSION, TCH_VERSION, TORCH_VERSION,
};
pub use guard::catch_panic;
pub use registrar::{
    BackboneFactory, CodebookFactory, DenoiserFactory, PluginArgs, Registered, Registrar,
};

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

impl PluginError {
    pub fn new(msg: impl Into<String>) -> Self {
        PluginError(msg.into())
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
    /// The backbone's weights by name, in the layout its loader reads back (so a trained
    /// plugin can be saved as safetensors and loaded from the config's `weights` path).
    /// The default (no weights to save) is empty.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
}

/// What a [`Denoiser`] is given for one forward: the pixel decoder's noisy sample, the
/// diffusion timesteps and the condition decoded from the visual tokens. `R` rows: under
/// classifier-free guidance the pixel decoder stacks [negative; positive] rows of every
/// running request into one call, so `R` is any batch size; the rows are independent.
pub struct DenoiserInput<'a> {
    /// Noisy sample `[R, C, h, w]` (`C = in_channels`; VAE latents, or pixels in [-1, 1]
    /// for a pixel-space decoder), in the denoiser's dtype, on its device.
    pub sample: &'a Tensor,
    /// Timesteps `[R]` (float32, in `0..num_train_timesteps` of the scheduler, not
    /// necessarily integers), one per row.
    pub timestep: &'a Tensor,
    /// Condition tokens `[R, L, D]` (`D = cross_attention_dim`): the feature decoder's
    /// output (`VQDecoder` for the lowres decoder, `HighresVQDecoder` prompt embeds for the
    /// highres one), or the training conditioner's. A dropped condition (the negative rows
    /// of guidance, condition dropout in training) is all zeros.
    pub encoder_hidden_states: &'a Tensor,
    /// Lowres decoder: `[R, L]` bool, true at the condition positions to attend to (the
    /// negative rows mark only the unconditional embeddings). `None`: attend to all.
    pub encoder_attention_mask: Option<&'a Tensor>,
    /// Highres decoder (SDXL `text_time` conditioning): pooled embeds `[R, P]` ...
    pub text_embeds: Option<&'a Tensor>,
    /// ... and the six time ids `[R, 6]` (original h, w; crop top, left; target h, w).
    pub time_ids: Option<&'a Tensor>,
}

/// The noise-prediction network of the diffusion pixel decoder (the role the diffusers
/// `UNet2DConditionModel` plays): given a noisy sample, its timesteps and the condition,
/// predict what the scheduler's `prediction_type` names — the noise ε (`epsilon`, the
/// default), the velocity (`v_prediction`) or the clean sample (`sample`). The pixel
/// decoder's scheduler, classifier-free guidance, VAE and `lavit train decoder` are the
/// host's; a denoiser is only this network.
pub trait Denoiser: Send {
    /// A short name for logs and errors.
    fn name(&self) -> String;
    /// Channels C of the sample it denoises (and of its prediction): the VAE's latent
    /// channels, or 3 for a pixel-space decoder.
    fn in_channels(&self) -> i64;
    /// Width D of the condition tokens it reads.
    fn cross_attention_dim(&self) -> i64;
    /// Side of the square sample it was built for, in sample cells (latent cells, or
    /// pixels without a VAE): the decoder's native output is this × the VAE's scale.
    fn sample_size(&self) -> i64;
    /// Sample sides must be multiples of this (2^downsamplings of a U-Net, the patch
    /// size of a DiT). The default is 1.
    fn size_multiple(&self) -> i64 {
        1
    }
    /// The prediction `[R, C, h, w]` for [`DenoiserInput`] (same shape as `sample`).
    fn forward(&self, input: &DenoiserInput<'_>) -> PluginResult<Tensor>;
    /// The parameters `lavit train decoder` optimises, by name (the names of
    /// [`Denoiser::state_dict`]): they key the optimiser state in checkpoints, the
    /// no-weight-decay rule (`bias`, norms) and the data-parallel gradient averaging.
    /// Empty for a frozen denoiser (it cannot be trained).
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// The weights by name, in the layout its loader reads back (`weights = ...`): saved in
    /// training checkpoints (`model`, and the EMA copy `ema`) and exported as
    /// `denoiser.safetensors`.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>>;
    /// Restores what [`Denoiser::state_dict`] returned, onto the denoiser's own device and
    /// dtype: training resumes with it and the EMA copy is updated through it. The default
    /// refuses (such a denoiser can serve but not train).
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        Err(PluginError(format!(
            "denoiser `{}` does not implement load_state_dict, so its state ({} tensors) cannot be \
             restored (it cannot be trained)",
            self.name(),
            state.len()
        )))
    }
}

/// A boxed denoiser is a denoiser.
impl<D: Denoiser + ?Sized> Denoiser for Box<D> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn in_channels(&self) -> i64 {
        (**self).in_channels()
    }
    fn cross_attention_dim(&self) -> i64 {
        (**self).cross_attention_dim()
    }
    fn sample_size(&self) -> i64 {
        (**self).sample_size()
    }
    fn size_multiple(&self) -> i64 {
        (**self).size_multiple()
    }
    fn forward(&self, input: &DenoiserInput<'_>) -> PluginResult<Tensor> {
        (**self).forward(input)
    }
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        (**self).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        (**self).state_dict()
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        (**self).load_state_dict(state)
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
    /// The codebook's weights by name, in the layout its loader reads back (see
    /// [`Backbone::state_dict`]), including any training state that is not a parameter
    /// (EMA buffers, counters) so a training run resumes exactly. The default is empty.
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }
    /// Restores what [`Codebook::state_dict`] returned (a training checkpoint, or an
    /// exported codebook), onto the codebook's own device. The default refuses: a codebook
    /// that cannot load its state cannot resume training.
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        Err(PluginError(format!(
            "codebook `{}` does not implement load_state_dict, so its state ({} tensors) cannot be \
             restored (training with it cannot resume)",
            self.name(),
            state.len()
        )))
    }
    /// Data-dependent initialisation before quantised training starts (k-means on encoder
    /// outputs, SoundStream's first-batch init): `z` [T, D] are samples of what the codebook
    /// will quantise; `seed` makes it reproducible. The default does nothing.
    fn init_from_samples(&mut self, _z: &Tensor, _seed: u64) -> PluginResult<()> {
        Ok(())
    }
}

/// A boxed codebook is a codebook (so wrappers such as [`guard::GuardedCodebook`] and
/// generic stage code take `Box<dyn Codebook>` from a plugin as is).
impl<C: Codebook + ?Sized> Codebook for Box<C> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn num_codes(&self) -> i64 {
        (**self).num_codes()
    }
    fn code_dim(&self) -> i64 {
        (**self).code_dim()
    }
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        (**self).quantize(z)
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        (**self).embed(ids)
    }
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        (**self).quantize_train(z)
    }
    fn update(&mut self, z: &Tensor, ids: &Tensor) -> PluginResult<()> {
        (**self).update(z, ids)
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        (**self).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        (**self).state_dict()
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        (**self).load_state_dict(state)
    }
    fn init_from_samples(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        (**self).init_from_samples(z, seed)
    }
}

/// A boxed backbone is a backbone.
impl<B: Backbone + ?Sized> Backbone for Box<B> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn image_size(&self) -> i64 {
        (**self).image_size()
    }
    fn patch_size(&self) -> i64 {
        (**self).patch_size()
    }
    fn width(&self) -> i64 {
        (**self).width()
    }
    fn num_patches(&self) -> i64 {
        (**self).num_patches()
    }
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        (**self).forward(images)
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        (**self).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        (**self).state_dict()
    }
}
