//! Example LaVIT codebook plugin: residual vector quantisation.
//!
//! Built as a dylib (`liblavit_plugin_rvq.so`) it is loaded by the host from the config;
//! built as an rlib, [`ResidualVq`] can be used and tested directly. See docs/plugins.md.

mod residual_vq;

pub use residual_vq::{ResidualVq, ResidualVqConfig};

use lavit_plugin_api::{declare_plugin, PluginResult, Registrar};

/// Registers the `residual-vq` codebook.
pub fn register(r: &mut Registrar) -> PluginResult<()> {
    r.codebook("residual-vq", ResidualVq::from_args);
    Ok(())
}

declare_plugin!(name: "lavit-plugin-rvq", register: register);
