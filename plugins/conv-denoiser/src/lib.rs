//! Example LaVIT denoiser plugin: a small residual convolutional network in place of the
//! pixel decoder's `UNet2DConditionModel`.
//!
//! Built as a dylib (`liblavit_plugin_conv_denoiser.so`) it is loaded by the host from the
//! config's `[plugins]` section and named by `[plugins.denoiser] plugin = "conv-denoiser"`;
//! built as an rlib, [`ConvDenoiser`] can be used and tested directly. See docs/plugins.md.

mod conv_denoiser;

pub use conv_denoiser::{ConvDenoiser, ConvDenoiserConfig};

use lavit_plugin_api::{declare_plugin, PluginResult, Registrar};

/// Registers the `conv-denoiser` denoiser.
pub fn register(r: &mut Registrar) -> PluginResult<()> {
    r.denoiser("conv-denoiser", ConvDenoiser::from_args);
    Ok(())
}

declare_plugin!(name: "lavit-plugin-conv-denoiser", register: register);
