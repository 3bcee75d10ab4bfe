//! The SelectorMerger stage: the token selector (`token_predictor`), the token merger
//! (`causal_encoder`) and `vit_proj` (the projector of continuous features into the LLM), as
//! a [`lavit_runtime::stage::SelectorMergerStage`]. It owns those weights (the
//! `token_predictor.*`, `causal_encoder.*` and `vit_proj.*` keys of `tokenizer_encoder`) and,
//! when the folder has `language_model/visual_weight`, the merger and projector LaVIT
//! fine-tuned with the LLM, used for understanding (image → text).
//!
//! In stage 1 it trains the selector and the merger: Gumbel keep decisions (hard forward,
//! soft backward) at the batch's seed and temperature, and the two loss terms of
//! [`selector_loss`]: the per-image kept ratio (with a KL anchor on the keep probabilities, so
//! a collapsing image is pulled back) and the confidence term.

use lavit_runtime::layers;
use lavit_runtime::shape::dims;
use std::path::Path;

use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::layout::{self, files, resolve_file};
use lavit_runtime::manifest::{LavitManifest, SelectionChoice};
use lavit_runtime::messages::{train_keys, StepControl, StepReport, TrainBatch, TrainParts};
use lavit_runtime::stage::{SelectorMergerStage, StageKind, StageResult, Trainable};
use lavit_runtime::train::{need_train, not_trainable, sorted_vars, StageOptim};
use lavit_runtime::Result;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::{SelectionMode, TokenMerger, TokenMergerConfig, TokenPredictor};

/// Kept rows of `x` [B, N, C] in raster order → ([T, C], per-image counts).
pub fn gather_kept(x: &Tensor, decisions: &Tensor) -> (Tensor, Vec<i64>) {
    let keep = decisions.gt(0.5); // (B, N)
    let counts: Vec<i64> =
        Vec::<i64>::try_from(keep.sum_dim_intlist(1, false, Kind::Int64)).unwrap_or_default();
    let c = x.size()[2];
    let kept = x.masked_select(&keep.unsqueeze(-1)).reshape([-1, c]); // (T, C)
    (kept, counts)
}

/// The merger and projector LaVIT fine-tuned with the LLM (`visual_weight.bin`).
pub struct UnderstandingHead {
    pub vs: nn::VarStore,
    pub causal_encoder: TokenMerger,
    pub vit_proj: nn::Linear,
}

impl UnderstandingHead {
    /// Random weights at the sizes of `manifest` (names as in `visual_weight.bin`).
    pub fn new(manifest: &LavitManifest, device: Device) -> Self {
        Self::new_in(manifest, device, Kind::Float)
    }

    fn new_in(manifest: &LavitManifest, device: Device, kind: Kind) -> Self {
        let t = &manifest.tokenizer;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let causal_encoder = TokenMerger::new(
            &root / "causal_encoder",
            &TokenMergerConfig::from_manifest(t),
        );
        let vit_proj = layers::linear(
            &root / "vit_proj",
            t.encoder_width,
            t.llm_hidden,
            Default::default(),
        );
        Self {
            vs,
            causal_encoder,
            vit_proj,
        }
    }

    /// `visual_weight.*` (`causal_encoder.*`, `vit_proj.*`) in `kind`, strictly, frozen.
    pub fn load(manifest: &LavitManifest, path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let sd = checkpoint::load_path(path)?;
        let mut head = layers::uninit(|| Self::new_in(manifest, device, kind));
        checkpoint::load_into_owned(
            &head.vs,
            "",
            sd,
            &path.display().to_string(),
            &Default::default(),
        )?;
        head.vs.freeze();
        Ok(head)
    }
}

/// The selector's stage-1 loss terms from its log-probs [B, N, 2] and keep decisions
/// M [B, N]: (ratio, confidence).
///
/// With [`RatioScope::Batch`] (the default) the ratio term is the paper's
/// L_ratio = λ (ρ − mean M)² over the whole batch, so each image keeps as many patches as its
/// reconstruction needs and only the batch's mean is held at ρ, plus a per-image floor
/// against collapse: λ · mean_b max(0, ln f − ln q_b), q_b = mean_n p_bn the image's mean
/// keep probability and f = `floor`. The floor is a hinge on the log of the probabilities,
/// not on the sampled decisions: once every patch of an image scores far below "drop", the
/// straight-through Gumbel sample carries no gradient, while −ln q_b does
/// (∂/∂ logit_n ≈ −p_n / (N q_b): the image's most likely patches are pulled up first). It is
/// zero for every image that keeps at least the floor, so it does not push each image, nor
/// each patch, towards ρ.
///
/// With [`RatioScope::Image`] the target holds per image, as DynamicViT computes it:
/// λ · mean_b (ρ − mean_n M_bn)² + λ ρ(1−ρ) · mean_b KL(ρ ‖ q_b) (the KL anchor pulls a
/// collapsing image back as the floor does, and holds every image's mean at ρ).
///
/// confidence = weight · mean_{b,n} H(p_bn), the binary entropy of the keep probability, so
/// that the arg-max and the sampled selection keep about as many patches.
pub fn selector_loss(
    log_probs: &Tensor,
    decisions: &Tensor,
    loss: &Stage1Loss,
) -> (Tensor, Tensor) {
    let rho = loss.rho;
    // ln q_b and ln(1 − q_b) from the log-probs (log-sum-exp: exact and with a gradient even
    // where every p_bn underflows).
    let ln_n = (log_probs.size()[1] as f64).ln();
    let ln_mean = |which: i64| log_probs.select(-1, which).logsumexp([1], false) - ln_n; // (B,)
    let ratio = match loss.ratio_scope {
        RatioScope::Batch => {
            let sampled = (decisions.mean(Kind::Float) - rho).square();
            if loss.floor > 0.0 {
                let floor = (ln_mean(0).neg() + loss.floor.ln())
                    .clamp_min(0.0)
                    .mean(Kind::Float);
                (sampled + floor) * loss.lambda
            } else {
                sampled * loss.lambda
            }
        }
        RatioScope::Image => {
            let kept = decisions.mean_dim(1, false, Kind::Float); // (B,)
            let sampled = (kept - rho).square().mean(Kind::Float);
            // ρ ln(ρ/q) + (1−ρ) ln((1−ρ)/(1−q)); a term whose weight is 0 (ρ = 0 or 1) is
            // left out.
            let part = |w: f64, which: i64| {
                let l = ln_mean(which);
                if w > 0.0 {
                    (l.neg() + w.ln()) * w
                } else {
                    l.zeros_like()
                }
            };
            let kl = part(rho, 0) + part(1.0 - rho, 1); // (B,)
            let anchor = kl.mean(Kind::Float) * (rho * (1.0 - rho));
            (sampled + anchor) * loss.lambda
        }
    };
    let entropy = (log_probs.exp() * log_probs)
        .sum_dim_intlist(-1, false, Kind::Float)
        .neg(); // (B, N)
    let confidence = entropy.mean(Kind::Float) * loss.confidence_weight;
    (ratio, confidence)
}

/// Where the stage-1 ratio target ρ applies (see [`selector_loss`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RatioScope {
    /// The batch's mean kept ratio, plus a per-image floor: token counts follow the image.
    #[default]
    Batch,
    /// Every image's kept ratio (DynamicViT's per-image form).
    Image,
}

/// Stage-1 loss weights the SelectorMerger stage applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage1Loss {
    /// Target kept ratio ρ and its weight λ.
    pub rho: f64,
    pub lambda: f64,
    /// Weight of the selector's mean binary entropy.
    pub confidence_weight: f64,
    /// Where ρ applies.
    pub ratio_scope: RatioScope,
    /// Per-image floor of the mean keep probability ([`RatioScope::Batch`]; 0: none).
    pub floor: f64,
}

/// The SelectorMerger stage's model.
pub struct SelectorMergerStageModel {
    /// `token_predictor.*`, `causal_encoder.*`, `vit_proj.*`.
    pub vs: nn::VarStore,
    pub token_predictor: TokenPredictor,
    pub causal_encoder: TokenMerger,
    pub vit_proj: nn::Linear,
    pub understanding: Option<UnderstandingHead>,
    /// Default selection mode: the manifest's `selection` and `selection_seed`.
    pub selection: SelectionMode,
    training: Option<(StageOptim, Stage1Loss)>,
    train: bool,
}

impl SelectorMergerStageModel {
    /// Random weights at the sizes of `manifest`.
    pub fn new(manifest: &LavitManifest, device: Device) -> Self {
        Self::new_in(manifest, device, Kind::Float)
    }

    fn new_in(manifest: &LavitManifest, device: Device, kind: Kind) -> Self {
        let t = &manifest.tokenizer;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let c = t.encoder_width;
        let token_predictor = TokenPredictor::new(&root / "token_predictor", c);
        let causal_encoder = TokenMerger::new(
            &root / "causal_encoder",
            &TokenMergerConfig::from_manifest(t),
        );
        let vit_proj = layers::linear(&root / "vit_proj", c, t.llm_hidden, Default::default());
        Self {
            vs,
            token_predictor,
            causal_encoder,
            vit_proj,
            understanding: None,
            selection: SelectionMode::from(t.selection_choice()),
            training: None,
            train: false,
        }
    }

    /// This stage's keys of a `tokenizer_encoder` state dict (`source` names it in errors),
    /// strictly and frozen, plus `language_model/visual_weight` when `dir` has it, with
    /// its weights in `kind` (features come and go in float32 either way).
    pub fn load_state(
        dir: &Path,
        manifest: &LavitManifest,
        device: Device,
        kind: Kind,
        sd: &StateDict,
        source: &str,
    ) -> Result<Self> {
        let mut me = layers::uninit(|| Self::new_in(manifest, device, kind));
        let mine = layout::subset(sd, &layout::SELECTOR_MERGER_PREFIXES);
        checkpoint::load_into_owned(&me.vs, "", mine, source, &Default::default())?;
        me.vs.freeze();
        if let Ok(path) = resolve_file(dir, files::VISUAL_WEIGHT) {
            me.understanding = Some(UnderstandingHead::load(manifest, &path, device, kind)?);
        }
        Ok(me)
    }

    /// Train the selector and the merger with `optim` (built over [`Self::trained_vars`])
    /// and `loss`.
    pub fn with_training(mut self, optim: StageOptim, loss: Stage1Loss) -> Self {
        self.training = Some((optim, loss));
        self
    }

    /// The variables stage 1 trains: `token_predictor.*` and `causal_encoder.*` (`vit_proj`
    /// is trained with the LLM in stage 2).
    pub fn trained_vars(&self) -> Vec<(String, Tensor)> {
        lavit_runtime::train::trainable_variables(&self.vs, |n| {
            n.starts_with("token_predictor") || n.starts_with("causal_encoder")
        })
    }

    /// Selector on patch features at inference: (log-probs [B, N, 2], decisions [B, N]),
    /// each image's decisions a function of its own features (and the Gumbel seed) only
    /// ([`SelectionMode::decide`]).
    pub fn select(&self, features: &Tensor, mode: SelectionMode) -> Result<(Tensor, Tensor)> {
        let log_probs = self.log_probs(features)?;
        let decisions = mode.decide(&log_probs);
        Ok((log_probs, decisions))
    }

    /// Stage-1 training: the selector on rows `row0..` of a larger batch, Gumbel noise as
    /// the whole batch draws it for those rows ([`SelectionMode::decide_from_row`]).
    pub fn select_from_row(
        &self,
        features: &Tensor,
        mode: SelectionMode,
        row0: i64,
    ) -> Result<(Tensor, Tensor)> {
        let log_probs = self.log_probs(features)?;
        let decisions = mode.decide_from_row(&log_probs, row0);
        Ok((log_probs, decisions))
    }

    /// `token_predictor(features, ones)`: log-probs [B, N, 2] (index 0 = keep).
    fn log_probs(&self, features: &Tensor) -> Result<Tensor> {
        let [b, n, _] = dims(features, "patch features [B, N, C]")?;
        let features = features.to_kind(self.kind());
        let policy = Tensor::ones([b, n, 1], (features.kind(), features.device()));
        self.token_predictor.forward(&features, &policy)
    }

    /// The merger on patch features and decisions: merged features [B, N, C], float32
    /// whatever the weights' kind.
    pub fn merge(&self, features: &Tensor, decisions: &Tensor) -> Result<Tensor> {
        Ok(self
            .causal_encoder
            .forward(&features.to_kind(self.kind()), decisions)?
            .to_kind(Kind::Float))
    }

    /// The understanding path: kept merged features through the projector → one
    /// (T_i, llm_hidden) tensor per image (the `visual_weight` merger and projector when
    /// loaded, else this stage's own), float32 whatever the weights' kind.
    pub fn understanding_embeds(
        &self,
        features: &Tensor,
        decisions: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let features = features.to_kind(self.kind());
        let (merger, proj) = match &self.understanding {
            Some(u) => (&u.causal_encoder, &u.vit_proj),
            None => (&self.causal_encoder, &self.vit_proj),
        };
        let updated = proj
            .forward(&merger.forward(&features, decisions)?)
            .to_kind(Kind::Float); // (B, N, H)
        let (kept, counts) = gather_kept(&updated, decisions); // (T, H)
        let mut out = Vec::with_capacity(counts.len());
        let mut pos = 0;
        for n in counts {
            out.push(kept.narrow(0, pos, n)); // (T_i, H)
            pos += n;
        }
        Ok(out)
    }
}

fn check_features(features: &Tensor, width: i64) -> StageResult<()> {
    match features.size().as_slice() {
        [_, _, c] if *c == width => Ok(()),
        other => Err(lavit_runtime::stage::StageError::Invalid(format!(
            "patch features must be [B, N, {width}], got {other:?}"
        ))),
    }
}

impl Trainable for SelectorMergerStageModel {
    fn train_forward(&mut self, mut batch: TrainBatch) -> StageResult<TrainBatch> {
        const K: StageKind = StageKind::SelectorMerger;
        need_train(self.train, K)?;
        let feats = batch.take(train_keys::PATCH_FEATURES, K)?;
        let seed = batch.get(train_keys::GUMBEL_SEED, K)?.int64_value(&[]) as u64;
        let tau = batch.get(train_keys::TAU, K)?.double_value(&[]);
        // Data parallel: the Gumbel noise of this rank's rows of the global batch.
        let (row0, _) = batch.rows(feats.size()[0], K)?;
        let mode = SelectionMode::Gumbel { seed, tau };
        let (log_probs, dec) = self.select_from_row(&feats, mode, row0)?;
        let merged = self.causal_encoder.forward(&feats, &dec)?; // (B, N, C)
        let (_, loss) = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        let (ratio, confidence) = selector_loss(&log_probs, &dec, loss);
        batch.losses.push((train_keys::LOSS_RATIO, ratio));
        batch.losses.push((train_keys::LOSS_CONFIDENCE, confidence));
        batch.tensors.insert(train_keys::PATCH_FEATURES, feats);
        batch.tensors.insert(train_keys::DECISIONS, dec);
        batch.tensors.insert(train_keys::MERGED, merged);
        Ok(batch)
    }
    fn optimizer_step_with(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        let (optim, _) = self.training.as_mut().ok_or_else(|| not_trainable(K))?;
        optim.step_with(K, ctl)
    }
    fn trained_params(&mut self) -> StageResult<Vec<(String, Tensor)>> {
        let (optim, _) = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        Ok(optim.params())
    }
    /// `selector_merger` (every variable, `vit_proj` included) and its optimiser's state.
    fn train_state(&mut self) -> StageResult<TrainParts> {
        let (optim, _) = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        optim.parts(K, PART, &sorted_vars(&self.vs))
    }
    fn load_train_state(&mut self, parts: TrainParts) -> StageResult<()> {
        let (optim, _) = self.training.as_ref().ok_or_else(|| not_trainable(K))?;
        optim.load_exact(K, PART, &sorted_vars(&self.vs), parts)
    }
    fn set_train(&mut self, train: bool) {
        self.train = train;
    }
}

const K: StageKind = StageKind::SelectorMerger;
/// The checkpoint part of this stage's variables.
const PART: &str = "selector_merger";

impl SelectorMergerStage for SelectorMergerStageModel {
    fn select_merge(
        &mut self,
        features: &Tensor,
        selection: Option<SelectionChoice>,
    ) -> StageResult<(Tensor, Tensor)> {
        check_features(features, self.token_predictor_width())?;
        let _g = tch::no_grad_guard();
        let x = features.to_kind(self.kind());
        let mode = selection.map_or(self.selection, SelectionMode::from);
        let (_, decisions) = self.select(&x, mode)?;
        let merged = self.merge(&x, &decisions)?;
        Ok((decisions, merged))
    }
    fn understanding(&mut self, features: &Tensor) -> StageResult<Vec<Tensor>> {
        check_features(features, self.token_predictor_width())?;
        let _g = tch::no_grad_guard();
        let x = features.to_kind(self.kind());
        let (_, decisions) = self.select(&x, self.selection)?;
        Ok(self.understanding_embeds(&x, &decisions)?)
    }
}

impl SelectorMergerStageModel {
    fn token_predictor_width(&self) -> i64 {
        self.vit_proj.ws.size()[1]
    }

    /// The kind the weights are in (the features are cast to it on the way in; cast once
    /// before [`Self::select`] and [`Self::merge`] of the same features, and theirs is free).
    pub fn kind(&self) -> Kind {
        self.vit_proj.ws.kind()
    }
}
