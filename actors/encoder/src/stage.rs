//! The Encoder stage: the frozen vision backbone (EVA-CLIP ViT-G/14, or a plugin backbone)
//! as a [`lavit_runtime::stage::EncoderStage`]: CLIP-normalised images → patch features.
//! It owns the backbone and nothing else. LaVIT's encoder is frozen, so in stage 1 its
//! training forward runs without autograd and its optimiser step has nothing to do.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use lavit_plugin_api::{Backbone, PluginResult};
use lavit_runtime::layout::{files, resolve_file};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{train_keys, TrainBatch};
use lavit_runtime::plugin_host::{check_backbone, TokenizerPlugins};
use lavit_runtime::stage::{EncoderStage, StageError, StageKind, StageResult, Trainable};
use lavit_runtime::train::need_train;
use lavit_runtime::{Error, Result};
use tch::{Device, Kind, Tensor};

use crate::eva_vit::{EvaBackbone, EvaVitConfig};

/// The checkpoint's EVA encoder (`visual_tokenizer/eva_vitg_psz14.*`) at the manifest's
/// sizes, its weights in `kind`.
pub fn load_eva(dir: &Path, device: Device, kind: Kind) -> Result<EvaBackbone> {
    let manifest = LavitManifest::for_checkpoint(dir)?;
    let eva_path = resolve_file(dir, files::EVA)?;
    EvaBackbone::load(
        &eva_path,
        &EvaVitConfig::from_manifest(&manifest.tokenizer),
        device,
        kind,
    )
}

/// The Encoder stage's model: a backbone whose geometry fits the manifest.
pub struct EncoderStageModel {
    pub backbone: Box<dyn Backbone>,
    /// Where the patch features are returned (the backbone may answer elsewhere).
    pub device: Device,
    train: bool,
}

impl EncoderStageModel {
    /// Around a backbone built elsewhere; refuses one whose image size, patch size or width
    /// does not fit `manifest`.
    pub fn new(
        manifest: &LavitManifest,
        backbone: Box<dyn Backbone>,
        device: Device,
    ) -> Result<Self> {
        check_backbone(manifest, backbone.as_ref())?;
        Ok(Self {
            backbone,
            device,
            train: false,
        })
    }

    /// The checkpoint's backbone on `device`: the plugin the config names, else EVA-CLIP
    /// with its weights in `kind` (features leave in float32 either way).
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        plugins: &TokenizerPlugins,
    ) -> Result<Self> {
        let manifest = LavitManifest::for_checkpoint(dir)?;
        let backbone = match plugins.backbone(Some(dir), device)? {
            Some(b) => b,
            None => Box::new(load_eva(dir, device, kind)?),
        };
        Self::new(&manifest, backbone, device)
    }

    /// Patch features [B, N, C] (float32, on this stage's device) of images [B, 3, S, S].
    pub fn patch_features(&self, images: &Tensor) -> Result<Tensor> {
        let s = self.backbone.image_size();
        match images.size().as_slice() {
            [_, 3, h, w] if *h == s && *w == s => {}
            other => {
                return Err(Error::invalid(format!(
                    "images must be [B, 3, {s}, {s}], got {other:?}"
                )))
            }
        }
        let f = self
            .backbone
            .forward(&images.to_device(self.device))
            .map_err(|e| Error::Plugin {
                part: "backbone",
                name: self.backbone.name(),
                msg: e.to_string(),
            })?;
        // A backbone built elsewhere (a plugin, another stage's device) may answer on its own
        // device: the features leave on this stage's.
        Ok(f.to_kind(Kind::Float).to_device(self.device))
    }
}

fn stage_err(e: Error) -> StageError {
    StageError::from_error(StageKind::Encoder, e)
}

impl Trainable for EncoderStageModel {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        need_train(self.train, StageKind::Encoder)?;
        let images = batch.take(train_keys::IMAGES, StageKind::Encoder)?;
        let _g = tch::no_grad_guard();
        let f = self.patch_features(&images).map_err(stage_err)?;
        batch.tensors.insert(train_keys::PATCH_FEATURES, f);
        Ok(batch)
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}

impl EncoderStage for EncoderStageModel {
    fn encode(&mut self, images: &Tensor) -> StageResult<Tensor> {
        let _g = tch::no_grad_guard();
        self.patch_features(images).map_err(stage_err)
    }
}

fn lock<T: ?Sized>(m: &Mutex<Box<T>>) -> MutexGuard<'_, Box<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A backbone shared between the Encoder stage and the training driver (which saves its
/// state); each call locks it.
#[derive(Clone)]
pub struct SharedBackbone(pub Arc<Mutex<Box<dyn Backbone>>>);

impl SharedBackbone {
    pub fn new(b: Box<dyn Backbone>) -> Self {
        SharedBackbone(Arc::new(Mutex::new(b)))
    }
}

impl Backbone for SharedBackbone {
    fn name(&self) -> String {
        lock(&self.0).name()
    }
    fn image_size(&self) -> i64 {
        lock(&self.0).image_size()
    }
    fn patch_size(&self) -> i64 {
        lock(&self.0).patch_size()
    }
    fn width(&self) -> i64 {
        lock(&self.0).width()
    }
    fn num_patches(&self) -> i64 {
        lock(&self.0).num_patches()
    }
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        lock(&self.0).forward(images)
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        lock(&self.0).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        lock(&self.0).state_dict()
    }
}
