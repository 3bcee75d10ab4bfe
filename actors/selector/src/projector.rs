//! The SelectorMerger stage as stage 2 (paper §3.2) trains it: only `vit_proj`, the projector
//! of continuous image features into the LLM (the `vit_proj.*` of `visual_weight`), which the
//! official stage 2 fine-tunes together with the LLM. Stage 2 reads cached merged features
//! (the frozen tokenizer's output), so this stage holds no selector and no merger: it turns the
//! batch's `cont_features` (ΣT, C) into `cont_embeds` (ΣT, hidden) with grad, and owns the
//! projector's optimiser state and its checkpoint part. The Llm stage writes them into its
//! input embeddings; one backward crosses both stages.

use lavit_runtime::layers;
use lavit_runtime::messages::{train_keys, StepControl, StepReport, TrainBatch, TrainParts};
use lavit_runtime::stage::{
    SelectionChoice, SelectorMergerStage, StageError, StageKind, StageResult, Trainable,
};
use lavit_runtime::train::{
    is_no_decay, need_train, not_trainable, sorted_vars, AdamW, AdamWConfig, StageOptim,
};
use lavit_runtime::Result;
use tch::{nn, nn::Module, Tensor};

const K: StageKind = StageKind::SelectorMerger;

/// `vit_proj` (C → hidden) as the SelectorMerger stage of a stage-2 run.
pub struct ProjectorStage {
    /// `vit_proj.weight`, `vit_proj.bias`.
    pub vs: nn::VarStore,
    pub vit_proj: nn::Linear,
    optim: Option<StageOptim>,
    train: bool,
}

impl ProjectorStage {
    /// The checkpoint part of the projector's variables (its optimiser's is `projector_optimizer`).
    pub const PART: &'static str = "projector";

    /// A projector from `c` to `hidden` features under `vit_proj.*` of a new var store on
    /// `device` (libtorch's default initialisation; load or initialise it afterwards).
    pub fn new(c: i64, hidden: i64, device: tch::Device) -> Self {
        let vs = nn::VarStore::new(device);
        let vit_proj = layers::linear(vs.root() / "vit_proj", c, hidden, Default::default());
        ProjectorStage {
            vs,
            vit_proj,
            optim: None,
            train: false,
        }
    }

    /// Train the variables `trains` names (`vit_proj.weight`, `vit_proj.bias`) with AdamW
    /// (`weight_decay` on the weight, none on the bias) and freeze the rest; the driver steps
    /// it at its schedule's learning rate and clips globally. When `trains` names none, the
    /// stage projects without grad and has no training state.
    pub fn with_training(
        mut self,
        weight_decay: f64,
        trains: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        for (name, t) in self.vs.variables() {
            if !trains(&name) {
                let _ = t.set_requires_grad(false);
            }
        }
        if !self.vs.variables().keys().any(|n| trains(n)) {
            return Ok(self);
        }
        let opt = AdamW::from_var_store(
            &self.vs,
            trains,
            AdamWConfig {
                weight_decay,
                ..Default::default()
            },
        )?
        .no_decay(is_no_decay);
        self.optim = Some(StageOptim::new(opt));
        Ok(self)
    }

    /// Whether the stage trains anything.
    pub fn trains(&self) -> bool {
        self.optim.is_some()
    }

    /// (in features, hidden).
    pub fn dims(&self) -> (i64, i64) {
        let s = self.vit_proj.ws.size();
        (s[1], s[0])
    }
}

impl Trainable for ProjectorStage {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        need_train(self.train, K)?;
        // A micro-batch without continuous blocks passes through.
        if !batch.tensors.contains_key(&train_keys::CONT_FEATURES) {
            return Ok(batch);
        }
        let f = batch.take(train_keys::CONT_FEATURES, K)?;
        let (c, _) = self.dims();
        match f.size().as_slice() {
            [_, w] if *w == c => {}
            other => {
                return Err(StageError::Invalid(format!(
                    "stage {K}: continuous features must be (T, {c}) for vit_proj, got {other:?}"
                )))
            }
        }
        let x = f
            .f_to_device(self.vs.device())
            .and_then(|x| x.f_to_kind(self.vit_proj.ws.kind()))
            .map_err(|e| StageError::failed(K, e))?;
        batch
            .tensors
            .insert(train_keys::CONT_EMBEDS, self.vit_proj.forward(&x));
        Ok(batch)
    }
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        let optim = self.optim.as_mut().ok_or_else(|| not_trainable(K))?;
        optim.step_with(K, ctl)
    }
    fn trained_params(&mut self) -> StageResult<Vec<(String, Tensor)>> {
        Ok(self
            .optim
            .as_ref()
            .map(StageOptim::params)
            .unwrap_or_default())
    }
    /// `projector` (`vit_proj.*`) and `projector_optimizer`.
    fn train_state(&mut self) -> StageResult<TrainParts> {
        let optim = self.optim.as_ref().ok_or_else(|| not_trainable(K))?;
        optim.parts(K, Self::PART, &sorted_vars(&self.vs))
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        let optim = self.optim.as_ref().ok_or_else(|| not_trainable(K))?;
        optim.load_exact(K, Self::PART, &sorted_vars(&self.vs), parts)
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}

fn projector_only() -> StageError {
    StageError::Invalid(
        "this SelectorMerger stage holds only `vit_proj` for stage-2 training; \
         serve from a checkpoint folder to select and merge"
            .into(),
    )
}

impl SelectorMergerStage for ProjectorStage {
    fn select_merge(
        &mut self,
        _: &Tensor,
        _: Option<SelectionChoice>,
    ) -> StageResult<(Tensor, Tensor)> {
        Err(projector_only())
    }
    fn understanding(&mut self, _: &Tensor) -> StageResult<Vec<Tensor>> {
        Err(projector_only())
    }
}
