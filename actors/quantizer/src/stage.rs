//! The Quantizer stage: `encode_task_layer` and the codebook (the built-in l2 VQ, or a plugin
//! codebook), as a [`lavit_runtime::stage::QuantizerStage`]: merged features + keep decisions →
//! visual ids (code id + `visual_token_offset`, kept positions in raster order). It owns the
//! `encode_task_layer.*` and `quantize.*` keys of `tokenizer_encoder`.
//!
//! In stage 1 it trains the task layer and the codebook: the kept merged tokens through
//! `encode_task_layer`, quantised with a straight-through estimator (or, before quantised
//! training starts, l2-normalised), scaled by the keep decisions (so the selector gets the
//! reconstruction's gradient), handed to the Decoder stage, whose feature decoder
//! reconstructs the patch features; the loss term here is the codebook's commitment. After
//! the optimiser step the codebook updates itself with the step's codes (EMA, restarts).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use lavit_plugin_api::{Codebook, PluginResult, QuantizeOut};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::dist::{all_gather_rows, broadcast_named, mean_scalar, ProcessGroup};
use lavit_runtime::layout;
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{train_keys, StepControl, StepReport, TrainBatch, TrainParts};
use lavit_runtime::plugin_host::{check_codebook, TokenizerPlugins};
use lavit_runtime::stage::{QuantizerStage, StageError, StageKind, StageResult, Trainable};
use lavit_runtime::train::{need_train, not_trainable, sorted_vars, StageOptim};
use lavit_runtime::Result;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::{l2norm, EncodeTaskLayer, VectorQuantizer};

/// The codebook of a checkpoint on `device`: the plugin the config names, else the built-in
/// VQ from the `quantize.*` keys of the `tokenizer_encoder` state dict `sd` (`source` names
/// it in errors); its geometry is checked against the manifest.
pub fn load_codebook(
    dir: &Path,
    manifest: &LavitManifest,
    device: Device,
    plugins: &TokenizerPlugins,
    sd: &StateDict,
    source: &str,
) -> Result<Box<dyn Codebook>> {
    let codebook = match plugins.codebook(Some(dir), device)? {
        Some(c) => c,
        None => {
            let t = &manifest.tokenizer;
            let q: StateDict = layout::subset(sd, &["quantize."])
                .into_iter()
                .map(|(k, v)| (k["quantize.".len()..].to_string(), v))
                .collect();
            let mut vq = VectorQuantizer::new(t.n_code, t.code_dim, device);
            vq.load_state_dict(&q, source)?;
            Box::new(vq)
        }
    };
    check_codebook(manifest, codebook.as_ref())?;
    Ok(codebook)
}

/// The Quantizer stage's model.
pub struct QuantizerStageModel {
    /// `encode_task_layer.*`.
    pub vs: nn::VarStore,
    pub encode_task_layer: EncodeTaskLayer,
    pub quantize: Box<dyn Codebook>,
    /// Offset of code ids in the LLM vocabulary.
    pub visual_token_offset: i64,
    training: Option<QuantizerTraining>,
    train: bool,
}

/// What the Quantizer stage holds for stage-1 training: its optimiser (task layer, the
/// codebook's own parameters) and the last step's codes for the codebook's update.
struct QuantizerTraining {
    optim: StageOptim,
    last: Option<(Tensor, Tensor)>,
    /// The run's data-parallel group: the codebook's update sees every rank's codes, and the
    /// commitment loss is weighted by this rank's share of the global batch's tokens.
    pg: Option<Arc<ProcessGroup>>,
}

impl QuantizerTraining {
    /// The data-parallel group when there is more than one rank.
    fn group(&self) -> Option<&ProcessGroup> {
        self.pg.as_deref().filter(|g| g.world_size() > 1)
    }
}

impl QuantizerStageModel {
    /// Random task layer around `codebook` (refused when its geometry does not fit).
    pub fn new(
        manifest: &LavitManifest,
        device: Device,
        codebook: Box<dyn Codebook>,
    ) -> Result<Self> {
        check_codebook(manifest, codebook.as_ref())?;
        let t = &manifest.tokenizer;
        let vs = nn::VarStore::new(device);
        let encode_task_layer = EncodeTaskLayer::new(
            &vs.root() / "encode_task_layer",
            t.encoder_width,
            t.code_dim,
        );
        Ok(Self {
            vs,
            encode_task_layer,
            quantize: codebook,
            visual_token_offset: manifest.llm.visual_token_offset,
            training: None,
            train: false,
        })
    }

    /// This stage's keys of a `tokenizer_encoder` state dict, strictly and frozen, around
    /// `codebook` ([`load_codebook`]).
    pub fn load_state(
        manifest: &LavitManifest,
        device: Device,
        codebook: Box<dyn Codebook>,
        sd: &StateDict,
        source: &str,
    ) -> Result<Self> {
        let mut me = lavit_runtime::layers::uninit(|| Self::new(manifest, device, codebook))?;
        let mine = layout::subset(sd, &["encode_task_layer."]);
        checkpoint::load_into_owned(&me.vs, "", mine, source, &Default::default())?;
        me.vs.freeze();
        Ok(me)
    }

    /// Train the task layer and the codebook with `optim` (built over [`Self::trained_vars`]
    /// and the codebook's own parameters).
    pub fn with_training(mut self, optim: StageOptim) -> Self {
        self.training = Some(QuantizerTraining {
            optim,
            last: None,
            pg: None,
        });
        self
    }

    /// The variables stage 1 trains here besides the codebook's: `encode_task_layer.*`.
    pub fn trained_vars(&self) -> Vec<(String, Tensor)> {
        lavit_runtime::train::trainable_variables(&self.vs, |n| n.starts_with("encode_task_layer"))
    }

    /// Kept merged tokens [T, C] → code ids [T] (no offset).
    pub fn code_ids(&self, kept: &Tensor) -> Result<Tensor> {
        let z = self.encode_task_layer.forward(kept);
        self.quantize
            .quantize(&z)
            .map_err(|e| lavit_runtime::Error::Plugin {
                part: "codebook",
                name: self.quantize.name(),
                msg: e.to_string(),
            })
    }
}

/// Kept positions of decisions [B, N] → (gather index [B, L], mask [B, L]), L ≥ 1.
fn kept_index(dec: &Tensor) -> StageResult<(Tensor, Tensor)> {
    let b = dec.size()[0];
    let rows: Vec<f32> = Vec::try_from(dec.detach().to_kind(Kind::Float).reshape([-1]))
        .map_err(|e| StageError::failed(StageKind::Quantizer, e))?;
    let n = if b > 0 { rows.len() / b as usize } else { 0 };
    let keep: Vec<Vec<i64>> = rows
        .chunks(n.max(1))
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.5)
                .map(|(i, _)| i as i64)
                .collect()
        })
        .collect();
    let l = keep.iter().map(|v| v.len()).max().unwrap_or(0).max(1);
    let mut idx = Vec::new();
    let mut mask = Vec::new();
    for v in &keep {
        for j in 0..l {
            idx.push(*v.get(j).unwrap_or(&0));
            mask.push(if j < v.len() { 1f32 } else { 0. });
        }
    }
    let b = keep.len() as i64;
    Ok((
        Tensor::from_slice(&idx)
            .reshape([b, l as i64])
            .to_device(dec.device()),
        Tensor::from_slice(&mask)
            .reshape([b, l as i64])
            .to_device(dec.device()),
    ))
}

impl Trainable for QuantizerStageModel {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        const K: StageKind = StageKind::Quantizer;
        need_train(self.train, K)?;
        let dec = batch.take(train_keys::DECISIONS, K)?;
        let merged = batch.take(train_keys::MERGED, K)?;
        let quantize = batch.get(train_keys::QUANTIZE, K)?.int64_value(&[]) != 0;
        let z = self.encode_task_layer.forward(&merged); // (B, N, D)
        let (idx, mask) = kept_index(&dec)?;
        let d = z.size()[2];
        let z_sel = z.gather(1, &idx.unsqueeze(-1).expand([-1, -1, d], false), false); // (B, L, D)
        let dec_sel = dec.gather(1, &idx, false) * &mask; // (B, L)
        let keep = mask.gt(0.5);
        let z_flat = z_sel.masked_select(&keep.unsqueeze(-1)).reshape([-1, d]); // (T, D)
        let (codes_flat, qloss, ids) = if quantize {
            let q = self
                .quantize
                .quantize_train(&z_flat)
                .map_err(|e| StageError::failed(K, format!("codebook: {e}")))?;
            (q.quantized, q.loss, Some(q.ids))
        } else {
            (
                l2norm(&z_flat),
                Tensor::zeros([], (Kind::Float, z.device())),
                None,
            )
        };
        let codes = z_sel
            .zeros_like()
            .masked_scatter(&keep.unsqueeze(-1), &codes_flat)
            * dec_sel.unsqueeze(-1); // (B, L, D): ST factor carries the selector's gradient
        let t = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        let qloss = match (quantize, t.group()) {
            (true, Some(pg)) => {
                // The loss is a mean over this rank's T_r tokens; the global batch's is over
                // T = Σ T_r. Weighted by T_r · world / T, the ranks' mean of it is that mean.
                let local = z_flat.size()[0] as f64;
                let total = mean_scalar(pg, local).map_err(|e| StageError::failed(K, e))?;
                if total > 0.0 {
                    qloss * (local / total)
                } else {
                    qloss
                }
            }
            _ => qloss,
        };
        let z_flat = z_flat.detach();
        t.last = ids
            .as_ref()
            .map(|i| (z_flat.shallow_clone(), i.shallow_clone()));
        batch.losses.push((train_keys::LOSS_COMMITMENT, qloss));
        batch.tensors.insert(train_keys::CODES, codes);
        batch.tensors.insert(train_keys::CODES_MASK, mask);
        batch.tensors.insert(train_keys::DECISIONS, dec);
        batch.tensors.insert(train_keys::CODES_Z, z_flat);
        if let Some(ids) = ids {
            batch.tensors.insert(train_keys::IDS, ids);
        }
        Ok(batch)
    }
    /// The optimiser step, then the codebook's update with the step's codes (EMA, restarts)
    /// — every rank's codes, in rank order, under data parallelism.
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        let t = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        let report = t.optim.step_with(K, ctl)?;
        let last = t.last.take();
        if !ctl.apply {
            return Ok(report);
        }
        if let Some((z, ids)) = last {
            let (z, ids) = match t.group() {
                Some(pg) => {
                    let fail = |e: lavit_runtime::Error| StageError::failed(K, e);
                    (
                        all_gather_rows(pg, &z).map_err(fail)?,
                        all_gather_rows(pg, &ids).map_err(fail)?,
                    )
                }
                None => (z, ids),
            };
            self.quantize
                .update(&z, &ids)
                .map_err(|e| StageError::failed(K, format!("codebook update: {e}")))?;
        }
        Ok(report)
    }
    fn trained_params(&mut self) -> StageResult<Vec<(String, Tensor)>> {
        let t = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        Ok(t.optim.params())
    }
    /// Keep the group, and start from rank 0's codebook (its EMA statistics are buffers, not
    /// trained parameters, so the driver's broadcast does not reach them).
    fn set_process_group(&mut self, pg: Arc<ProcessGroup>) -> StageResult<()> {
        let t = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        if pg.world_size() > 1 {
            let state = self
                .quantize
                .state_dict()
                .map_err(|e| StageError::failed(K, format!("codebook state: {e}")))?;
            let own: Vec<(String, Tensor)> =
                state.into_iter().map(|(n, v)| (n, v.copy())).collect();
            broadcast_named(&pg, &own).map_err(|e| StageError::failed(K, e))?;
            self.quantize
                .load_state_dict(&own)
                .map_err(|e| StageError::failed(K, format!("codebook state: {e}")))?;
        }
        t.pg = Some(pg);
        Ok(())
    }
    /// `quantizer` (the task layer), its optimiser's state and `codebook` (the codebook's
    /// full state, EMA statistics included).
    fn train_state(&mut self) -> StageResult<TrainParts> {
        let t = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        let mut parts = t.optim.parts(K, PART, &sorted_vars(&self.vs))?;
        let cb: StateDict = self
            .quantize
            .state_dict()
            .map_err(|e| StageError::failed(K, format!("codebook state: {e}")))?
            .into_iter()
            .collect();
        parts.push((CODEBOOK_PART.into(), cb));
        Ok(parts)
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        let t = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        let rest = t.optim.load_parts(K, PART, &sorted_vars(&self.vs), parts)?;
        let mut codebook = false;
        for (p, sd) in rest {
            if p != CODEBOOK_PART {
                return Err(StageError::Invalid(format!(
                    "stage {K}: no training part `{p}`"
                )));
            }
            let cb: Vec<(String, Tensor)> = sd.into_iter().collect();
            self.quantize
                .load_state_dict(&cb)
                .map_err(|e| StageError::Invalid(format!("checkpoint part `{p}`: {e}")))?;
            codebook = true;
        }
        if !codebook {
            return Err(StageError::Invalid(format!(
                "stage {K}: the checkpoint lacks `{CODEBOOK_PART}`"
            )));
        }
        Ok(())
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}

const K: StageKind = StageKind::Quantizer;
/// Checkpoint parts of this stage: the task layer's variables and the codebook's state.
const PART: &str = "quantizer";
const CODEBOOK_PART: &str = "codebook";

impl QuantizerStage for QuantizerStageModel {
    fn quantize(&mut self, merged: &Tensor, decisions: &Tensor) -> StageResult<Vec<Vec<i64>>> {
        let _g = tch::no_grad_guard();
        let (kept, counts) = gather_kept(merged, decisions);
        let ids = self
            .code_ids(&kept)
            .map_err(|e| StageError::from_error(StageKind::Quantizer, e))?;
        let off = self.visual_token_offset;
        let flat = Vec::<i64>::try_from(&ids.to_device(Device::Cpu))
            .map_err(|e| StageError::failed(StageKind::Quantizer, e))?;
        let mut out = Vec::with_capacity(counts.len());
        let mut pos = 0usize;
        for n in counts {
            let n = n as usize;
            let ids = flat.get(pos..pos + n).ok_or_else(|| {
                StageError::failed(StageKind::Quantizer, "the codebook returned too few ids")
            })?;
            out.push(ids.iter().map(|i| i + off).collect());
            pos += n;
        }
        Ok(out)
    }
}

/// Kept rows of `x` [B, N, C] in raster order → ([T, C], per-image counts) (the same rule
/// as the selector's `gather_kept`; this crate does not depend on the selector's).
fn gather_kept(x: &Tensor, decisions: &Tensor) -> (Tensor, Vec<i64>) {
    let keep = decisions.gt(0.5); // (B, N)
    let counts: Vec<i64> =
        Vec::<i64>::try_from(keep.sum_dim_intlist(1, false, Kind::Int64)).unwrap_or_default();
    let c = x.size()[2];
    let kept = x.masked_select(&keep.unsqueeze(-1)).reshape([-1, c]); // (T, C)
    (kept, counts)
}

fn lock<T: ?Sized>(m: &Mutex<Box<T>>) -> MutexGuard<'_, Box<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A codebook shared between the Quantizer stage that runs it and the training driver that
/// saves, restores and initialises it between steps (each call locks it).
#[derive(Clone)]
pub struct SharedCodebook(pub Arc<Mutex<Box<dyn Codebook>>>);

impl SharedCodebook {
    pub fn new(c: Box<dyn Codebook>) -> Self {
        SharedCodebook(Arc::new(Mutex::new(c)))
    }
}

impl Codebook for SharedCodebook {
    fn name(&self) -> String {
        lock(&self.0).name()
    }
    fn num_codes(&self) -> i64 {
        lock(&self.0).num_codes()
    }
    fn code_dim(&self) -> i64 {
        lock(&self.0).code_dim()
    }
    fn quantize(&self, z: &Tensor) -> PluginResult<Tensor> {
        lock(&self.0).quantize(z)
    }
    fn embed(&self, ids: &Tensor) -> PluginResult<Tensor> {
        lock(&self.0).embed(ids)
    }
    fn quantize_train(&mut self, z: &Tensor) -> PluginResult<QuantizeOut> {
        lock(&self.0).quantize_train(z)
    }
    fn update(&mut self, z: &Tensor, ids: &Tensor) -> PluginResult<()> {
        lock(&self.0).update(z, ids)
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        lock(&self.0).trainable_parameters()
    }
    fn state_dict(&self) -> PluginResult<Vec<(String, Tensor)>> {
        lock(&self.0).state_dict()
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> PluginResult<()> {
        lock(&self.0).load_state_dict(state)
    }
    fn init_from_samples(&mut self, z: &Tensor, seed: u64) -> PluginResult<()> {
        lock(&self.0).init_from_samples(z, seed)
    }
}
