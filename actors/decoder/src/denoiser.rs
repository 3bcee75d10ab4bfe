//! The built-in [`Denoiser`]: the diffusers-layout [`UNet2DConditionModel`] with the
//! variable store holding its weights (as EVA is the built-in `Backbone`). The pixel decoder
//! and its trainer hold a `Box<dyn Denoiser>`; a plugin denoiser replaces this one.

use std::path::Path;

use lavit_plugin_api::{Denoiser, DenoiserInput, PluginError, PluginResult};
use lavit_runtime::checkpoint;
use lavit_runtime::Result;
use tch::{nn, Device, Kind, Tensor};

use crate::unet_2d_condition::{AddedCond, UNet2DConditionModel, UNet2DConditionModelConfig};

/// `UNet2DConditionModel` as a [`Denoiser`] (state-dict names = diffusers keys).
#[derive(Debug)]
pub struct UNetDenoiser {
    pub vs: nn::VarStore,
    pub unet: UNet2DConditionModel,
}

impl UNetDenoiser {
    /// A new U-Net of `config` on `device` (random init from libtorch's generator; trainable).
    pub fn new(config: UNet2DConditionModelConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let unet = UNet2DConditionModel::new(vs.root(), config)?;
        Ok(Self { vs, unet })
    }

    /// A diffusers `unet/` folder, loaded strictly in `kind` and frozen
    /// ([`UNet2DConditionModel::from_pretrained`]).
    pub fn from_pretrained(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (vs, unet) = UNet2DConditionModel::from_pretrained(dir, device, kind)?;
        Ok(Self { vs, unet })
    }

    /// The U-Net's config.
    pub fn config(&self) -> &UNet2DConditionModelConfig {
        &self.unet.config
    }
}

fn plugin_err(e: lavit_runtime::Error) -> PluginError {
    PluginError(e.to_string())
}

impl Denoiser for UNetDenoiser {
    fn name(&self) -> String {
        "unet-2d-condition".into()
    }
    fn in_channels(&self) -> i64 {
        self.unet.config.in_channels
    }
    fn cross_attention_dim(&self) -> i64 {
        self.unet.config.cross_attention_dim
    }
    /// diffusers `sample_size` (64, the SD default, when the config has none).
    fn sample_size(&self) -> i64 {
        self.unet.config.sample_size.unwrap_or(64)
    }
    /// Each block but the last halves the resolution.
    fn size_multiple(&self) -> i64 {
        1 << (self.unet.config.block_out_channels.len().max(1) - 1)
    }
    fn forward(&self, x: &DenoiserInput<'_>) -> PluginResult<Tensor> {
        let added = match (x.text_embeds, x.time_ids) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedCond {
                text_embeds,
                time_ids,
            }),
            _ => None,
        };
        self.unet
            .forward(
                x.sample,
                x.timestep,
                x.encoder_hidden_states,
                x.encoder_attention_mask,
                added.as_ref(),
            )
            .map_err(plugin_err)
    }
    /// The variables with `requires_grad`, in name order (none once frozen).
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        lavit_runtime::train::trainable_variables(&self.vs, |_| true)
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }
    /// Strict: every variable present with its shape, nothing unexpected.
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        let sd: checkpoint::StateDict = state
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        checkpoint::load_into(&self.vs, "", &sd, "state dict", &Default::default())
            .map(|_| ())
            .map_err(plugin_err)
    }
}
