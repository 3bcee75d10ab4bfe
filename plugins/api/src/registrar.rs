//! How a plugin hands its constructors to the host.

use std::path::PathBuf;

use crate::guard::{catch_panic, GuardedBackbone, GuardedCodebook, GuardedDenoiser};
use crate::{Backbone, Codebook, Denoiser, PluginResult};

/// What a factory gets from the host config's component entry.
#[derive(Debug, Clone)]
pub struct PluginArgs {
    /// The component's `config` table as JSON text (`{}` when the config gives none); the
    /// plugin parses it into its own config struct.
    pub config: String,
    /// The device of the stage that will run the component; weights go there.
    pub device: tch::Device,
    /// Weights to load (a safetensors file), or `None` for the plugin's own initialisation.
    pub weights: Option<PathBuf>,
}

/// Builds a codebook from the host's arguments (panic-safe: see [`Registrar::codebook`]).
pub type CodebookFactory =
    Box<dyn Fn(&PluginArgs) -> PluginResult<Box<dyn Codebook>> + Send + Sync>;
/// Builds a backbone from the host's arguments.
pub type BackboneFactory =
    Box<dyn Fn(&PluginArgs) -> PluginResult<Box<dyn Backbone>> + Send + Sync>;

/// Builds a denoiser from the host's arguments.
pub type DenoiserFactory =
    Box<dyn Fn(&PluginArgs) -> PluginResult<Box<dyn Denoiser>> + Send + Sync>;

/// The factories a plugin registered, by kind, in registration order.
#[derive(Default)]
pub struct Registered {
    pub codebooks: Vec<(String, CodebookFactory)>,
    pub backbones: Vec<(String, BackboneFactory)>,
    pub denoisers: Vec<(String, DenoiserFactory)>,
}

/// Collects the factories a plugin's register function declares. The host creates it,
/// passes it to the plugin, and takes the factories back with [`Registrar::into_parts`].
#[derive(Default)]
pub struct Registrar {
    codebooks: Vec<(String, CodebookFactory)>,
    backbones: Vec<(String, BackboneFactory)>,
    denoisers: Vec<(String, DenoiserFactory)>,
}

impl Registrar {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a codebook constructor under `name` (what the host config's
    /// `plugin = "..."` names). The factory and every method of the codebook it returns run
    /// inside `catch_unwind` in the plugin: panics come back as errors.
    pub fn codebook<C, F>(&mut self, name: &str, factory: F)
    where
        C: Codebook + 'static,
        F: Fn(&PluginArgs) -> PluginResult<C> + Send + Sync + 'static,
    {
        let what = format!("codebook factory `{name}`");
        let guarded = move |args: &PluginArgs| -> PluginResult<Box<dyn Codebook>> {
            let codebook = catch_panic(&what, || factory(args))?;
            Ok(Box::new(GuardedCodebook::new(codebook)?))
        };
        self.codebooks.push((name.to_string(), Box::new(guarded)));
    }

    /// Registers a backbone constructor under `name` (see [`Registrar::codebook`]).
    pub fn backbone<B, F>(&mut self, name: &str, factory: F)
    where
        B: Backbone + 'static,
        F: Fn(&PluginArgs) -> PluginResult<B> + Send + Sync + 'static,
    {
        let what = format!("backbone factory `{name}`");
        let guarded = move |args: &PluginArgs| -> PluginResult<Box<dyn Backbone>> {
            let backbone = catch_panic(&what, || factory(args))?;
            Ok(Box::new(GuardedBackbone::new(backbone)?))
        };
        self.backbones.push((name.to_string(), Box::new(guarded)));
    }

    /// Registers a pixel-decoder denoiser constructor under `name` (see
    /// [`Registrar::codebook`]).
    pub fn denoiser<D, F>(&mut self, name: &str, factory: F)
    where
        D: Denoiser + 'static,
        F: Fn(&PluginArgs) -> PluginResult<D> + Send + Sync + 'static,
    {
        let what = format!("denoiser factory `{name}`");
        let guarded = move |args: &PluginArgs| -> PluginResult<Box<dyn Denoiser>> {
            let denoiser = catch_panic(&what, || factory(args))?;
            Ok(Box::new(GuardedDenoiser::new(denoiser)?))
        };
        self.denoisers.push((name.to_string(), Box::new(guarded)));
    }

    /// The registered factories by kind, in registration order.
    pub fn into_parts(self) -> Registered {
        Registered {
            codebooks: self.codebooks,
            backbones: self.backbones,
            denoisers: self.denoisers,
        }
    }
}
