//! Example LaVIT backbone plugin: a small ConvNeXt-style convolutional network in place of
//! EVA-CLIP.
//!
//! Built as a dylib (`liblavit_plugin_convnet.so`) it is loaded by the host from the config;
//! built as an rlib, [`ConvNeXt`] can be used and tested directly. See docs/plugins.md.

mod convnext;

pub use convnext::{ConvNeXt, ConvNeXtConfig};

use lavit_plugin_api::{declare_plugin, PluginResult, Registrar};

/// Registers the `convnext` backbone.
pub fn register(r: &mut Registrar) -> PluginResult<()> {
    r.backbone("convnext", ConvNeXt::from_args);
    Ok(())
}

declare_plugin!(name: "lavit-plugin-convnet", register: register);
