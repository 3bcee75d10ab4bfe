//! The plugin host: loads plugin dylibs named in the config at start-up and builds the
//! codebooks, backbones and denoisers they register.
//!
//! **A plugin is native code loaded into the process**, trusted like any shared library the
//! binary links: its initialisers and factories run with the server's or trainer's
//! privileges, and a declaration with bad pointers crashes the process (the checks below
//! catch a wrong build, not a malicious one). Name only plugins you would link yourself.
//!
//! Loading a plugin (see docs/plugins.md and `lavit_plugin_api`):
//! 0. the path must be a regular file under [`crate::fsread::MAX_PLUGIN_BYTES`] (never a
//!    FIFO, a device or a link loop: checked from its metadata before `dlopen` opens it);
//! 1. `dlopen` the file (libloading);
//! 2. read the one symbol `LAVIT_PLUGIN_DECLARATION` and check, before touching anything
//!    else, its magic, plugin API version, rustc version, tch version and libtorch version
//!    against the host's; a mismatch is refused with both sides named;
//! 3. call its register function, which hands back named factories;
//! 4. leak the library: a plugin is never unloaded (its code backs every object it made).
//!
//! Every call into a plugin is guarded twice: the plugin catches its own panics (the
//! `declare_plugin!` and `Registrar` wrappers run `catch_unwind` with the plugin's std), and
//! the host wraps every object and call in its own `catch_unwind` (which covers plugins
//! linked statically through [`PluginHost::register_static`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lavit_plugin_api::guard::{catch_panic, GuardedBackbone, GuardedCodebook, GuardedDenoiser};
use lavit_plugin_api::{
    Backbone, BackboneFactory, Codebook, CodebookFactory, Denoiser, DenoiserFactory, PluginArgs,
    PluginDeclaration, PluginError, PluginResult, Registered as RegisteredParts, Registrar,
    VersionMismatch, DECLARATION_SYMBOL,
};
use serde::{Deserialize, Serialize};

/// The config's `[plugins]` section (the same in `lavit train tokenizer`, `lavit serve` and
/// `lavit tokenize` configs):
///
/// ```toml
/// [plugins]
/// load = ["target/release/liblavit_plugin_rvq.so"]
/// [plugins.codebook]          # the Quantizer stage's codebook (none: the built-in VQ)
/// plugin = "residual-vq"
/// config = { levels = 2, codes_per_level = 16, code_dim = 16 }
/// [plugins.backbone]          # the Encoder stage's backbone (none: EVA-CLIP)
/// plugin = "convnext"
/// [plugins.denoiser]          # the pixel decoder's denoiser (none: the diffusers U-Net)
/// plugin = "conv-denoiser"
/// ```
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Plugin dylibs to load at start-up, in order (`lib<crate>.so` on Linux). A plugin is
    /// native code loaded into this process, trusted like any shared library: name only
    /// files you would link yourself.
    #[serde(default)]
    pub load: Vec<PathBuf>,
    /// The vision backbone to take from a plugin instead of EVA-CLIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<PluginComponent>,
    /// The codebook to take from a plugin instead of the built-in l2 VQ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codebook: Option<PluginComponent>,
    /// The pixel decoder's denoiser to take from a plugin instead of the built-in
    /// `UNet2DConditionModel` (the Decoder stage and `lavit train decoder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoiser: Option<PluginComponent>,
}

/// A part of a stage taken from a plugin, e.g. the config's `[plugins.codebook]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginComponent {
    /// The name the plugin registered the factory under (`residual-vq`, `convnext`).
    pub plugin: String,
    /// Weights (safetensors) the plugin loads on the stage's device; none: its own init.
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// Plugin-specific settings, handed to the factory as JSON.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

impl PluginsConfig {
    /// Relative plugin and weights paths resolved against `base` (the config file's
    /// folder).
    pub fn resolved(&self, base: &Path) -> Self {
        PluginsConfig {
            load: self.load.iter().map(|p| base.join(p)).collect(),
            backbone: self.backbone.as_ref().map(|c| c.resolved(base)),
            codebook: self.codebook.as_ref().map(|c| c.resolved(base)),
            denoiser: self.denoiser.as_ref().map(|c| c.resolved(base)),
        }
    }

    /// No plugin to load and no part taken from one.
    pub fn is_empty(&self) -> bool {
        self.load.is_empty()
            && self.backbone.is_none()
            && self.codebook.is_none()
            && self.denoiser.is_none()
    }
}

impl PluginComponent {
    /// A relative `weights` path resolved against `base` (the config file's folder).
    pub fn resolved(&self, base: &Path) -> Self {
        PluginComponent {
            weights: self.weights.as_ref().map(|w| base.join(w)),
            ..self.clone()
        }
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Why a plugin could not be loaded or used. Every variant names the plugin (file or name).
#[derive(Debug, thiserror::Error)]
pub enum PluginHostError {
    #[error("plugin {path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("plugin {path}: cannot load: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: libloading::Error,
    },
    #[error("plugin {path}: no `LAVIT_PLUGIN_DECLARATION` symbol (not built with declare_plugin!?): {source}")]
    NoDeclaration {
        path: PathBuf,
        #[source]
        source: libloading::Error,
    },
    #[error("plugin {path} refused: {mismatch}; rebuild the plugin with this host's lavit-plugin-api and toolchain")]
    Version {
        path: PathBuf,
        mismatch: VersionMismatch,
    },
    #[error("plugin {plugin}: register failed: {error}")]
    Register { plugin: String, error: PluginError },
    #[error("{kind} `{name}` is registered by both plugin {first} and plugin {second}")]
    Duplicate {
        kind: &'static str,
        name: String,
        first: String,
        second: String,
    },
    #[error("no plugin registers a {kind} named `{name}` (loaded: {available})")]
    Unknown {
        kind: &'static str,
        name: String,
        available: String,
    },
    #[error("plugin {plugin}, {kind} `{name}`: {error}")]
    Build {
        plugin: String,
        kind: &'static str,
        name: String,
        error: PluginError,
    },
}

impl From<PluginHostError> for crate::Error {
    fn from(e: PluginHostError) -> Self {
        crate::Error::Invalid(e.to_string())
    }
}

/// What the host knows about one loaded plugin.
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    /// The declaration's name and version.
    pub name: String,
    pub version: String,
    /// The dylib (None for a statically linked plugin).
    pub path: Option<PathBuf>,
    /// Names of the codebooks, backbones and denoisers it registered.
    pub codebooks: Vec<String>,
    pub backbones: Vec<String>,
    pub denoisers: Vec<String>,
}

struct Registered<F> {
    plugin: String,
    factory: F,
}

/// Loaded plugins and the factories they registered, by name.
#[derive(Default)]
pub struct PluginHost {
    plugins: Vec<LoadedPlugin>,
    codebooks: BTreeMap<String, Registered<CodebookFactory>>,
    backbones: BTreeMap<String, Registered<BackboneFactory>>,
    denoisers: BTreeMap<String, Registered<DenoiserFactory>>,
}

impl PluginHost {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every plugin the config names (start-up); the first failure stops.
    pub fn from_config(cfg: &PluginsConfig) -> Result<Self, PluginHostError> {
        let mut host = Self::new();
        for path in &cfg.load {
            host.load(path)?;
        }
        Ok(host)
    }

    /// Loads one plugin dylib (see the module doc for the order of checks). Loading a file
    /// that is already loaded returns the earlier entry.
    pub fn load(&mut self, path: &Path) -> Result<&LoadedPlugin, PluginHostError> {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if let Some(i) = self
            .plugins
            .iter()
            .position(|p| p.path.as_deref() == Some(canonical.as_path()))
        {
            tracing::debug!(path = %canonical.display(), "plugin already loaded");
            return Ok(&self.plugins[i]);
        }
        // A regular file of a plugin's size, from its metadata, before dlopen opens it.
        // Errors name the path as configured (the file checked may be a link's target).
        let meta = crate::fsread::check_regular(&canonical).map_err(|e| PluginHostError::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        if meta.len() > crate::fsread::MAX_PLUGIN_BYTES {
            return Err(PluginHostError::File {
                path: path.to_path_buf(),
                msg: format!(
                    "{} bytes, over the {}-byte cap for a plugin library",
                    meta.len(),
                    crate::fsread::MAX_PLUGIN_BYTES
                ),
            });
        }
        // SAFETY: loading a library runs its initialisers; plugins are trusted code named
        // by the operator's config (the same trust as the host binary).
        let lib = unsafe { libloading::Library::new(&canonical) }.map_err(|source| {
            PluginHostError::Open {
                path: canonical.clone(),
                source,
            }
        })?;
        // SAFETY: the symbol is a `static PluginDeclaration`; `check` reads only its frozen
        // C prefix until every version matched.
        let decl: &'static PluginDeclaration = unsafe {
            let sym = lib
                .get::<*const PluginDeclaration>(DECLARATION_SYMBOL)
                .map_err(|source| PluginHostError::NoDeclaration {
                    path: canonical.clone(),
                    source,
                })?;
            let ptr: *const PluginDeclaration = *sym;
            (*ptr).check().map_err(|mismatch| {
                tracing::warn!(path = %canonical.display(), %mismatch, "plugin refused");
                PluginHostError::Version {
                    path: canonical.clone(),
                    mismatch,
                }
            })?;
            // Never unloaded: the declaration, factories and every object they build point
            // into the library's code.
            std::mem::forget(lib);
            &*ptr
        };
        self.register(decl, Some(canonical))
    }

    /// Registers a plugin linked into the host (its crate used as an rlib): the same path
    /// as a dylib after the version checks, which a static plugin passes by construction.
    pub fn register_static(
        &mut self,
        name: &str,
        version: &str,
        register: fn(&mut Registrar) -> PluginResult<()>,
    ) -> Result<&LoadedPlugin, PluginHostError> {
        let name: &'static str = Box::leak(name.to_string().into_boxed_str());
        let version: &'static str = Box::leak(version.to_string().into_boxed_str());
        let decl: &'static PluginDeclaration =
            Box::leak(Box::new(PluginDeclaration::new(name, version, register)));
        self.register(decl, None)
    }

    fn register(
        &mut self,
        decl: &'static PluginDeclaration,
        path: Option<PathBuf>,
    ) -> Result<&LoadedPlugin, PluginHostError> {
        // SAFETY: the declaration passed `check` (or was built by this host).
        let (name, version) = unsafe { (decl.name.read(), decl.version.read()) };
        let mut registrar = Registrar::new();
        catch_panic("register", || (decl.register)(&mut registrar)).map_err(|error| {
            PluginHostError::Register {
                plugin: name.clone(),
                error,
            }
        })?;
        let RegisteredParts {
            codebooks,
            backbones,
            denoisers,
        } = registrar.into_parts();
        // Check every name before inserting any, so a refused plugin leaves no trace.
        let duplicate = |kind, n: &String, first: &String| PluginHostError::Duplicate {
            kind,
            name: n.clone(),
            first: first.clone(),
            second: name.clone(),
        };
        for (n, _) in &codebooks {
            if let Some(r) = self.codebooks.get(n) {
                return Err(duplicate("codebook", n, &r.plugin));
            }
        }
        for (n, _) in &backbones {
            if let Some(r) = self.backbones.get(n) {
                return Err(duplicate("backbone", n, &r.plugin));
            }
        }
        for (n, _) in &denoisers {
            if let Some(r) = self.denoisers.get(n) {
                return Err(duplicate("denoiser", n, &r.plugin));
            }
        }
        let info = LoadedPlugin {
            name: name.clone(),
            version,
            path,
            codebooks: codebooks.iter().map(|c| c.0.clone()).collect(),
            backbones: backbones.iter().map(|b| b.0.clone()).collect(),
            denoisers: denoisers.iter().map(|d| d.0.clone()).collect(),
        };
        for (n, factory) in codebooks {
            let plugin = name.clone();
            self.codebooks.insert(n, Registered { plugin, factory });
        }
        for (n, factory) in backbones {
            let plugin = name.clone();
            self.backbones.insert(n, Registered { plugin, factory });
        }
        for (n, factory) in denoisers {
            let plugin = name.clone();
            self.denoisers.insert(n, Registered { plugin, factory });
        }
        tracing::info!(
            plugin = %info.name,
            version = %info.version,
            path = %info.path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "(static)".into()),
            codebooks = ?info.codebooks,
            backbones = ?info.backbones,
            denoisers = ?info.denoisers,
            "loaded plugin"
        );
        let index = self.plugins.len();
        self.plugins.push(info);
        Ok(&self.plugins[index])
    }

    /// The plugins loaded so far, in load order.
    pub fn plugins(&self) -> &[LoadedPlugin] {
        &self.plugins
    }

    /// Builds the codebook `component.plugin` on `device` (weights loaded by the plugin).
    pub fn codebook(
        &self,
        component: &PluginComponent,
        device: tch::Device,
    ) -> Result<Box<dyn Codebook>, PluginHostError> {
        let entry =
            self.codebooks
                .get(&component.plugin)
                .ok_or_else(|| PluginHostError::Unknown {
                    kind: "codebook",
                    name: component.plugin.clone(),
                    available: names(self.codebooks.keys()),
                })?;
        let built = build(&entry.factory, component, device)
            .and_then(GuardedCodebook::new)
            .map_err(|error| PluginHostError::Build {
                plugin: entry.plugin.clone(),
                kind: "codebook",
                name: component.plugin.clone(),
                error,
            })?;
        tracing::info!(plugin = %entry.plugin, codebook = %built.name(), num_codes = built.num_codes(), code_dim = built.code_dim(), ?device, "built plugin codebook");
        Ok(Box::new(built))
    }

    /// Builds the backbone `component.plugin` on `device` (weights loaded by the plugin).
    pub fn backbone(
        &self,
        component: &PluginComponent,
        device: tch::Device,
    ) -> Result<Box<dyn Backbone>, PluginHostError> {
        let entry =
            self.backbones
                .get(&component.plugin)
                .ok_or_else(|| PluginHostError::Unknown {
                    kind: "backbone",
                    name: component.plugin.clone(),
                    available: names(self.backbones.keys()),
                })?;
        let built = build(&entry.factory, component, device)
            .and_then(GuardedBackbone::new)
            .map_err(|error| PluginHostError::Build {
                plugin: entry.plugin.clone(),
                kind: "backbone",
                name: component.plugin.clone(),
                error,
            })?;
        tracing::info!(plugin = %entry.plugin, backbone = %built.name(), image_size = built.image_size(), patch_size = built.patch_size(), width = built.width(), ?device, "built plugin backbone");
        Ok(Box::new(built))
    }

    /// Builds the denoiser `component.plugin` on `device` (weights loaded by the plugin).
    pub fn denoiser(
        &self,
        component: &PluginComponent,
        device: tch::Device,
    ) -> Result<Box<dyn Denoiser>, PluginHostError> {
        let entry =
            self.denoisers
                .get(&component.plugin)
                .ok_or_else(|| PluginHostError::Unknown {
                    kind: "denoiser",
                    name: component.plugin.clone(),
                    available: names(self.denoisers.keys()),
                })?;
        let built = build(&entry.factory, component, device)
            .and_then(GuardedDenoiser::new)
            .map_err(|error| PluginHostError::Build {
                plugin: entry.plugin.clone(),
                kind: "denoiser",
                name: component.plugin.clone(),
                error,
            })?;
        tracing::info!(plugin = %entry.plugin, denoiser = %built.name(), in_channels = built.in_channels(), cross_attention_dim = built.cross_attention_dim(), sample_size = built.sample_size(), ?device, "built plugin denoiser");
        Ok(Box::new(built))
    }
}

/// Calls a factory (host-side `catch_unwind` around the plugin's own).
fn build<T>(
    factory: &(dyn Fn(&PluginArgs) -> PluginResult<T> + Send + Sync),
    component: &PluginComponent,
    device: tch::Device,
) -> PluginResult<T> {
    if let Some(w) = &component.weights {
        // The plugin reads its weights itself: refuse a FIFO, a device or a link loop here.
        crate::fsread::check_regular(w).map_err(|e| PluginError(e.to_string()))?;
    }
    let args = PluginArgs {
        config: component.config.to_string(),
        device,
        weights: component.weights.clone(),
    };
    catch_panic("factory", || factory(&args))
}

fn names<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = keys.map(|s| s.as_str()).collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// The tokenizer and pixel-decoder parts a config takes from plugins.

/// Where the tokenizer's backbone and codebook and the pixel decoder's denoiser come from:
/// the built-in EVA-CLIP, l2 VQ and `UNet2DConditionModel`, or the components of a config's
/// `[plugins]` section. Cheap to clone (the loaded plugin
/// host is shared), so each stage thread builds its part on its own device.
///
/// A plugin component without `weights` loads the checkpoint folder's
/// `visual_tokenizer/{backbone,codebook}.safetensors` when the folder has it (what
/// `lavit train tokenizer` exports), so one config serves for training and inference.
#[derive(Clone, Default)]
pub struct TokenizerPlugins {
    host: Option<std::sync::Arc<PluginHost>>,
    cfg: PluginsConfig,
}

impl std::fmt::Debug for TokenizerPlugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerPlugins")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl TokenizerPlugins {
    /// The built-in parts only.
    pub fn none() -> Self {
        Self::default()
    }

    /// Loads the plugins `cfg` names (start-up) and remembers which parts they replace.
    pub fn load(cfg: &PluginsConfig) -> crate::Result<Self> {
        if cfg.load.is_empty() {
            if let Some(c) = cfg
                .backbone
                .as_ref()
                .or(cfg.codebook.as_ref())
                .or(cfg.denoiser.as_ref())
            {
                return Err(crate::Error::invalid(format!(
                    "[plugins] takes part `{}` from a plugin but `plugins.load` names no plugin library",
                    c.plugin
                )));
            }
            return Ok(Self::none());
        }
        let host = PluginHost::from_config(cfg)?;
        Ok(Self {
            host: Some(std::sync::Arc::new(host)),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &PluginsConfig {
        &self.cfg
    }

    /// `c` with `weights` defaulting to `checkpoint/<file>.safetensors` when that exists.
    fn component(c: &PluginComponent, checkpoint: Option<&Path>, file: &str) -> PluginComponent {
        let mut c = c.clone();
        if c.weights.is_none() {
            c.weights = checkpoint
                .map(|d| d.join(format!("{file}.safetensors")))
                .filter(|p| p.is_file());
        }
        c
    }

    fn host(&self) -> crate::Result<&PluginHost> {
        self.host
            .as_deref()
            .ok_or_else(|| crate::Error::invalid("no plugins are loaded"))
    }

    /// The plugin backbone on `device` (None: the config keeps EVA-CLIP).
    pub fn backbone(
        &self,
        checkpoint: Option<&Path>,
        device: tch::Device,
    ) -> crate::Result<Option<Box<dyn Backbone>>> {
        let Some(c) = &self.cfg.backbone else {
            return Ok(None);
        };
        let c = Self::component(c, checkpoint, crate::layout::files::PLUGIN_BACKBONE);
        Ok(Some(self.host()?.backbone(&c, device)?))
    }

    /// The plugin codebook on `device` (None: the config keeps the built-in VQ).
    pub fn codebook(
        &self,
        checkpoint: Option<&Path>,
        device: tch::Device,
    ) -> crate::Result<Option<Box<dyn Codebook>>> {
        let Some(c) = &self.cfg.codebook else {
            return Ok(None);
        };
        let c = Self::component(c, checkpoint, crate::layout::files::PLUGIN_CODEBOOK);
        Ok(Some(self.host()?.codebook(&c, device)?))
    }

    /// The plugin denoiser on `device` (None: the config keeps the built-in U-Net).
    /// `pixel_folder` is the pixel-decoding folder (e.g. `checkpoint/pixel_decoding`): its
    /// `denoiser.safetensors` are the weights when the component names none, and its
    /// `denoiser.json` (written by `lavit train decoder`) must name the same plugin; its
    /// `config` is used when the component gives none.
    pub fn denoiser(
        &self,
        pixel_folder: Option<&Path>,
        device: tch::Device,
    ) -> crate::Result<Option<Box<dyn Denoiser>>> {
        let manifest = match pixel_folder {
            Some(dir) => DenoiserManifest::read(dir)?,
            None => None,
        };
        let Some(c) = &self.cfg.denoiser else {
            if let (Some(m), Some(dir)) = (&manifest, pixel_folder) {
                return Err(crate::Error::invalid(format!(
                    "{}: this pixel decoder's denoiser is the plugin `{}` ({}); name it in \
                     [plugins.denoiser] and load its library in [plugins] load",
                    dir.display(),
                    m.plugin,
                    DENOISER_MANIFEST
                )));
            }
            return Ok(None);
        };
        let mut c = Self::component(c, pixel_folder, crate::layout::files::PLUGIN_DENOISER);
        if let (Some(m), Some(dir)) = (&manifest, pixel_folder) {
            if m.plugin != c.plugin {
                return Err(crate::Error::invalid(format!(
                    "[plugins.denoiser] names `{}`, but {} names `{}`",
                    c.plugin,
                    dir.join(DENOISER_MANIFEST).display(),
                    m.plugin
                )));
            }
            if c.config.as_object().is_some_and(|o| o.is_empty()) {
                c.config = m.config.clone();
            }
        }
        Ok(Some(self.host()?.denoiser(&c, device)?))
    }
}

/// The file beside a plugin denoiser's weights that names it (in a pixel-decoding folder).
pub const DENOISER_MANIFEST: &str = "denoiser.json";

/// `denoiser.json`: which plugin denoiser a pixel-decoding folder holds, the config it was
/// built with, and its geometry (what the request side checks sizes against without
/// loading it). Written by `lavit train decoder` beside `denoiser.safetensors`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserManifest {
    /// The name the plugin registered the denoiser under.
    pub plugin: String,
    /// The component's `config`, as built.
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// [`Denoiser::in_channels`].
    pub in_channels: i64,
    /// [`Denoiser::cross_attention_dim`].
    pub cross_attention_dim: i64,
    /// [`Denoiser::sample_size`].
    pub sample_size: i64,
    /// [`Denoiser::size_multiple`].
    pub size_multiple: i64,
}

impl DenoiserManifest {
    /// What `denoiser` built from `component` is.
    pub fn describe(component: &PluginComponent, denoiser: &dyn Denoiser) -> Self {
        DenoiserManifest {
            plugin: component.plugin.clone(),
            config: component.config.clone(),
            in_channels: denoiser.in_channels(),
            cross_attention_dim: denoiser.cross_attention_dim(),
            sample_size: denoiser.sample_size(),
            size_multiple: denoiser.size_multiple(),
        }
    }

    /// `dir/denoiser.json`, or `None` when the folder has none (a built-in U-Net folder).
    /// Sizes out of range are refused naming the file and key.
    pub fn read(dir: &Path) -> crate::Result<Option<Self>> {
        let path = dir.join(DENOISER_MANIFEST);
        if !path.exists() {
            return Ok(None);
        }
        let origin = path.display().to_string();
        let text = crate::fsread::read_config(&path)?;
        let m: Self = serde_json::from_str(&text)
            .map_err(|e| crate::Error::config(&origin, "(json)", e.to_string()))?;
        for (key, v) in [
            ("in_channels", m.in_channels),
            ("cross_attention_dim", m.cross_attention_dim),
            ("sample_size", m.sample_size),
            ("size_multiple", m.size_multiple),
        ] {
            if !(1..=1 << 14).contains(&v) {
                return Err(crate::Error::config(
                    &origin,
                    key,
                    format!("must be in 1..=16384, got {v}"),
                ));
            }
        }
        Ok(Some(m))
    }
}

/// The top-level `[plugins]` table of a TOML config file (serving, training or a file of
/// its own), paths resolved against the file's folder; empty when the file has none.
pub fn plugins_section(path: &Path) -> crate::Result<PluginsConfig> {
    let text = crate::fsread::read_config(path)?;
    let value: toml::Value = toml::from_str(&text)
        .map_err(|e| crate::Error::config(path.display().to_string(), "plugins", e.to_string()))?;
    let cfg: PluginsConfig = match value.get("plugins") {
        Some(p) => p.clone().try_into().map_err(|e: toml::de::Error| {
            crate::Error::config(path.display().to_string(), "plugins", e.message())
        })?,
        None => PluginsConfig::default(),
    };
    Ok(cfg.resolved(path.parent().unwrap_or(Path::new("."))))
}

/// Checks that a backbone and a codebook fit the tokenizer sizes of `manifest`: the
/// backbone's image size, patch size and width against what the selector, merger and image
/// processor are built for, the codebook's width against `encode_task_layer`'s output and
/// its size against the LLM's visual vocabulary. The error names both sides of every
/// mismatch. Each stage checks its own part ([`check_backbone`], [`check_codebook`]).
pub fn check_geometry(
    manifest: &crate::manifest::LavitManifest,
    encoder: &dyn Backbone,
    codebook: &dyn Codebook,
) -> crate::Result<()> {
    let mut problems = backbone_problems(manifest, encoder);
    problems.extend(codebook_problems(manifest, codebook));
    geometry_result(problems)
}

/// The backbone half of [`check_geometry`] (the Encoder stage's part).
pub fn check_backbone(
    manifest: &crate::manifest::LavitManifest,
    encoder: &dyn Backbone,
) -> crate::Result<()> {
    geometry_result(backbone_problems(manifest, encoder))
}

/// The codebook half of [`check_geometry`] (the Quantizer stage's part).
pub fn check_codebook(
    manifest: &crate::manifest::LavitManifest,
    codebook: &dyn Codebook,
) -> crate::Result<()> {
    geometry_result(codebook_problems(manifest, codebook))
}

fn geometry_result(problems: Vec<String>) -> crate::Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::invalid(format!(
            "the tokenizer's parts do not fit together: {}",
            problems.join("; ")
        )))
    }
}

fn mismatches(checks: Vec<(String, i64, &str, i64)>) -> Vec<String> {
    checks
        .into_iter()
        .filter(|(_, got, _, want)| got != want)
        .map(|(part, got, side, want)| format!("{part} is {got}, but {side} is {want}"))
        .collect()
}

fn backbone_problems(m: &crate::manifest::LavitManifest, encoder: &dyn Backbone) -> Vec<String> {
    let t = &m.tokenizer;
    let b = encoder.name();
    mismatches(vec![
        (
            format!("backbone `{b}` image_size"),
            encoder.image_size(),
            "tokenizer.img_size (the image processor's size)",
            t.img_size,
        ),
        (
            format!("backbone `{b}` patch_size"),
            encoder.patch_size(),
            "tokenizer.patch_size (the selector's patch grid)",
            t.patch_size,
        ),
        (
            format!("backbone `{b}` width"),
            encoder.width(),
            "tokenizer.encoder_width (the token selector's and merger's input width)",
            t.encoder_width,
        ),
    ])
}

fn codebook_problems(m: &crate::manifest::LavitManifest, codebook: &dyn Codebook) -> Vec<String> {
    let t = &m.tokenizer;
    let c = codebook.name();
    mismatches(vec![
        (
            format!("codebook `{c}` code_dim"),
            codebook.code_dim(),
            "tokenizer.code_dim (encode_task_layer's output width)",
            t.code_dim,
        ),
        (
            format!("codebook `{c}` num_codes"),
            codebook.num_codes(),
            "tokenizer.n_code (the LLM's visual vocabulary)",
            t.n_code,
        ),
    ])
}
