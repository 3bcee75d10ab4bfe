//! Stage-2 training state of the Llm stage (paper §3.2 "Stage-2: Unified Generative
//! Modeling"): the three sample kinds packed without padding into rows of up to `max_len`
//! tokens (block-diagonal causal mask, positions restarting per sample), the next-token loss
//! with one shared head over text and visual ids, and [`LlmTrainer`], the optimiser state the
//! stage holds while the shared training driver (`lavit::train::llm`) sends it
//! `TrainForward` → `Backward` → `OptimizerStepWith` messages.
//!
//! - [text]: `[BOS] text [EOS]`, every next token is a target.
//! - [image, text] (understanding): `[BOS] [IMG] vit_proj(features) [/IMG] text [EOS]`; the
//!   image side has no targets (continuous inputs), the text does.
//! - [text, image] (generation): `[BOS] text [IMG] visual ids [/IMG]`, all targets.

use lavit_runtime::checkpoint;
use lavit_runtime::messages::{StepControl, StepReport, TrainBatch, TrainKey, TrainParts};
use lavit_runtime::shape::dims;
use lavit_runtime::stage::{StageError, StageKind, StageResult};
use lavit_runtime::train::{is_no_decay, var_store_state_dict, AdamW, AdamWConfig, LrSchedule};
use serde::Deserialize;
use tch::{Device, Kind, Reduction, Tensor};

use crate::modeling_llama::{ForwardArgs, LlamaForCausalLM};
use crate::stage::LlmStageModel;
use crate::vocab::{UnifiedVocab, IGNORE};

/// Names of the tensors and loss terms a stage-2 [`TrainBatch`] carries to and from the Llm
/// stage (the driver writes the packed rows and `TARGETS`, the stage adds `LOSS` and the
/// per-kind statistics).
pub mod keys {
    use lavit_runtime::messages::TrainKey;
    /// In: packed token ids (R, L), 0 where the input is continuous.
    pub const IDS: TrainKey = TrainKey::new("ids");
    /// In: next-token labels (R, L), `IGNORE` where there is none.
    pub const LABELS: TrainKey = TrainKey::new("labels");
    /// In: positions restarting at 0 per sample (R, L).
    pub const POSITION_IDS: TrainKey = TrainKey::new("position_ids");
    /// In: sample index of each position (R, L) (block-diagonal attention).
    pub const SEGMENTS: TrainKey = TrainKey::new("segments");
    /// In (optional): continuous blocks as (row, start) pairs, their lengths, their features.
    pub const CONT_AT: TrainKey = TrainKey::new("cont_at");
    pub const CONT_LEN: TrainKey = TrainKey::new("cont_len");
    pub const CONT_FEATURES: TrainKey = lavit_runtime::messages::train_keys::CONT_FEATURES;
    /// In (optional, instead of `CONT_FEATURES`): the blocks already through the SelectorMerger
    /// stage's `vit_proj` (ΣT, hidden), with grad.
    pub const CONT_EMBEDS: TrainKey = lavit_runtime::messages::train_keys::CONT_EMBEDS;
    /// In: the step's target count over all its micro-batches (0-d).
    pub const TARGETS: TrainKey = TrainKey::new("targets");
    /// Out: the loss term (summed cross-entropy / targets).
    pub const LOSS: TrainKey = TrainKey::new("loss");
    /// Out: summed loss and target counts of the text and the visual targets (0-d, no grad).
    pub const TEXT_SUM: TrainKey = TrainKey::new("text_sum");
    pub const TEXT_N: TrainKey = TrainKey::new("text_n");
    pub const VISUAL_SUM: TrainKey = TrainKey::new("visual_sum");
    pub const VISUAL_N: TrainKey = TrainKey::new("visual_n");
}

/// One training sample.
#[derive(Debug)]
pub enum Sample {
    /// [text]: SentencePiece ids (no BOS/EOS; they are added).
    Text(Vec<i64>),
    /// [image, text]: continuous image features (T, C) — `vit_proj` inputs when a projector is
    /// given, else already (T, hidden) — followed by the text ids.
    ImageText { features: Tensor, text: Vec<i64> },
    /// [text, image]: text ids, then the image's unified visual ids (offset included).
    TextImage { text: Vec<i64>, visual: Vec<i64> },
}

/// Stage-2 hyper-parameters (`[train]` of the config file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmTrainConfig {
    /// Optimiser steps.
    pub steps: i64,
    /// Packed rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub grad_accum: usize,
    /// Longest packed row (2048 in the paper).
    pub max_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    pub warmup_steps: i64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip_grad: f64,
    /// Fraction of text-only samples in the mix (0 ≤ r < 1).
    pub text_ratio: f64,
    /// Variable-name prefixes that train (`model.`, `lm_head`, `vit_proj`, or finer ones such
    /// as `model.layers.31.`); everything else is frozen.
    pub train: Vec<String>,
    pub seed: u64,
    /// Checkpoint every this many steps (and at the end).
    pub save_every: i64,
    /// Committed checkpoints kept (≥ 2).
    pub keep: usize,
    /// Autocast (bf16/fp16 mixed precision) on CUDA.
    pub autocast: bool,
    /// Progress-bar log line every this many steps.
    pub log_every: u64,
    /// Stop this call after this many steps (a checkpoint is written), 0 = run to `steps`.
    pub run_steps: i64,
}

impl Default for LlmTrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            max_len: 2048,
            lr: 2e-4,
            min_lr: 2e-5,
            warmup_steps: 100,
            weight_decay: 0.1,
            clip_grad: 1.0,
            text_ratio: 0.0,
            train: vec!["model.".into(), "lm_head".into(), "vit_proj".into()],
            seed: 0,
            save_every: 500,
            keep: 2,
            autocast: false,
            log_every: 50,
            run_steps: 0,
        }
    }
}

impl LlmTrainConfig {
    /// Whether `train` names the variable `name` (a prefix of it).
    pub fn trains(&self, name: &str) -> bool {
        self.train.iter().any(|p| name.starts_with(p.as_str()))
    }

    pub fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        let bad = |k: &str, m: String| Err(lavit_runtime::Error::config(origin, k, m));
        if self.steps < 1 || self.batch_size < 1 || self.grad_accum < 1 || self.max_len < 2 {
            return bad(
                "train.steps/batch_size/grad_accum/max_len",
                format!(
                    "must be ≥ 1 (max_len ≥ 2), got {} / {} / {} / {}",
                    self.steps, self.batch_size, self.grad_accum, self.max_len
                ),
            );
        }
        if !(0.0..1.0).contains(&self.text_ratio) {
            return bad(
                "train.text_ratio",
                format!("must be in [0, 1), got {}", self.text_ratio),
            );
        }
        if self.save_every < 1 || self.keep < 2 {
            return bad(
                "train.save_every/keep",
                format!(
                    "save_every ≥ 1 and keep ≥ 2, got {} / {}",
                    self.save_every, self.keep
                ),
            );
        }
        if self.train.is_empty() {
            return bad("train.train", "names no parameters to train".into());
        }
        LrSchedule::warmup_cosine(self.lr, self.warmup_steps, self.steps, self.min_lr)
            .validate(origin, "train")
    }
}

/// A sample laid out as positions: ids (0 where the input is continuous), which positions
/// are continuous, and the next-token labels.
struct Laid {
    ids: Vec<i64>,
    /// (start, features) of the continuous block, if any.
    cont: Option<(usize, Tensor)>,
    labels: Vec<i64>,
}

fn lay_out(s: &Sample, v: &UnifiedVocab, max_len: usize) -> Laid {
    let mut ids = vec![v.bos_id];
    let mut cont = None;
    let first_target; // positions ≥ this are predicted
    match s {
        Sample::Text(t) => {
            ids.extend(t);
            ids.push(v.eos_id);
            first_target = 1;
        }
        Sample::ImageText { features, text } => {
            ids.push(v.image_start_id);
            let n = features.size()[0] as usize;
            cont = Some((ids.len(), features.shallow_clone()));
            ids.extend(std::iter::repeat_n(0, n));
            ids.push(v.image_end_id);
            first_target = ids.len();
            ids.extend(text);
            ids.push(v.eos_id);
        }
        Sample::TextImage { text, visual } => {
            ids.extend(text);
            ids.push(v.image_start_id);
            ids.extend(visual);
            ids.push(v.image_end_id);
            first_target = 1;
        }
    }
    ids.truncate(max_len);
    if let Some((start, f)) = cont.take() {
        if start < ids.len() {
            let n = (f.size()[0] as usize).min(ids.len() - start);
            cont = Some((start, f.narrow(0, 0, n as i64)));
        }
    }
    let labels = (0..ids.len())
        .map(|i| {
            let j = i + 1;
            if j < ids.len() && j >= first_target {
                ids[j]
            } else {
                IGNORE
            }
        })
        .collect();
    Laid { ids, cont, labels }
}

/// A packed micro-batch: (B, L) ids, labels, per-sample positions and segment ids (−1 =
/// padding at the end of a row), and the continuous blocks (row, start, features).
pub struct Packed {
    pub ids: Tensor,
    pub labels: Tensor,
    pub position_ids: Tensor,
    pub segments: Tensor,
    pub cont: Vec<(i64, i64, Tensor)>,
    /// Non-ignored targets.
    pub n_targets: i64,
}

impl Packed {
    /// The micro-batch as a training message for the Llm stage: `ids`, `labels`,
    /// `position_ids`, `segments` (B, L) and, when there are continuous blocks,
    /// `cont_at` (K, 2) [row, start], `cont_len` (K,), `cont_features` (ΣT, C).
    pub fn to_batch(&self) -> TrainBatch {
        let mut b = TrainBatch::new(vec![StageKind::Llm]);
        let t = &mut b.tensors;
        t.insert(keys::IDS, self.ids.shallow_clone());
        t.insert(keys::LABELS, self.labels.shallow_clone());
        t.insert(keys::POSITION_IDS, self.position_ids.shallow_clone());
        t.insert(keys::SEGMENTS, self.segments.shallow_clone());
        if !self.cont.is_empty() {
            let at: Vec<i64> = self.cont.iter().flat_map(|(r, s, _)| [*r, *s]).collect();
            let len: Vec<i64> = self.cont.iter().map(|(_, _, f)| f.size()[0]).collect();
            let feats: Vec<&Tensor> = self.cont.iter().map(|(_, _, f)| f).collect();
            t.insert(keys::CONT_AT, Tensor::from_slice(&at).view([-1, 2]));
            t.insert(keys::CONT_LEN, Tensor::from_slice(&len));
            t.insert(keys::CONT_FEATURES, Tensor::cat(&feats, 0));
        }
        b
    }

    /// Rows `r` of the batch (a data-parallel rank's share of a step's global batch): the
    /// same rows and width, the continuous blocks inside them (rows renumbered), their
    /// targets counted. Rows past the end are left out (the share may be empty).
    pub fn rows(&self, r: std::ops::Range<i64>) -> Packed {
        let b = self.ids.size()[0];
        let start = r.start.clamp(0, b);
        let len = (r.end.clamp(0, b) - start).max(0);
        let n = |t: &Tensor| t.narrow(0, start, len);
        let labels = n(&self.labels);
        let n_targets = labels.ne(IGNORE).sum(Kind::Int64).int64_value(&[]);
        let cont = self
            .cont
            .iter()
            .filter(|(row, _, _)| (start..start + len).contains(row))
            .map(|(row, at, f)| (row - start, *at, f.shallow_clone()))
            .collect();
        Packed {
            ids: n(&self.ids),
            labels,
            position_ids: n(&self.position_ids),
            segments: n(&self.segments),
            cont,
            n_targets,
        }
    }

    /// Rows in the batch.
    pub fn len(&self) -> i64 {
        self.ids.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The micro-batch back from a training message (see [`Packed::to_batch`]).
    pub fn from_batch(b: &TrainBatch) -> StageResult<Packed> {
        let get = |k: TrainKey| {
            b.tensors
                .get(&k)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| StageError::Invalid(format!("training batch has no `{k}`")))
        };
        let labels = get(keys::LABELS)?;
        let mut cont = Vec::new();
        if b.tensors.contains_key(&keys::CONT_AT) {
            let host = |t: Tensor| {
                Vec::<i64>::try_from(&t.to_device(Device::Cpu))
                    .map_err(|e| StageError::Invalid(format!("training batch: {e}")))
            };
            let at = host(get(keys::CONT_AT)?.view([-1]))?;
            let len = host(get(keys::CONT_LEN)?)?;
            // projected by the SelectorMerger stage when it trains `vit_proj`, else as given
            let feats = get(keys::CONT_EMBEDS).or_else(|_| get(keys::CONT_FEATURES))?;
            let mut pos = 0;
            for (k, n) in len.into_iter().enumerate() {
                cont.push((at[2 * k], at[2 * k + 1], feats.narrow(0, pos, n)));
                pos += n;
            }
        }
        Ok(Packed {
            ids: get(keys::IDS)?,
            n_targets: 0,
            position_ids: get(keys::POSITION_IDS)?,
            segments: get(keys::SEGMENTS)?,
            labels,
            cont,
        })
    }
}

/// Pack samples greedily into rows of at most `max_len` positions (a sample that does not fit
/// starts a new row), `rows` rows at most. Returns the batch and how many samples it used.
pub fn pack(samples: &[&Sample], v: &UnifiedVocab, max_len: usize, rows: usize) -> (Packed, usize) {
    // The finished rows, and the row being filled (its samples with their start).
    let mut out: Vec<Vec<(Laid, usize)>> = Vec::new();
    let mut row: Vec<(Laid, usize)> = Vec::new();
    let mut used = 0;
    let mut len = 0;
    for s in samples {
        let l = lay_out(s, v, max_len);
        if len + l.ids.len() > max_len && len > 0 {
            if out.len() + 1 == rows {
                break;
            }
            out.push(std::mem::take(&mut row));
            len = 0;
        }
        let n = l.ids.len();
        row.push((l, len));
        len += n;
        used += 1;
    }
    out.push(row);
    let width = out
        .iter()
        .map(|r| r.iter().map(|(l, _)| l.ids.len()).sum::<usize>())
        .max()
        .unwrap_or(1)
        .max(1);
    let b = out.len();
    let mut ids = vec![0i64; b * width];
    let mut labels = vec![IGNORE; b * width];
    let mut pos = vec![0i64; b * width];
    let mut seg = vec![-1i64; b * width];
    let mut cont = Vec::new();
    for (r, row) in out.into_iter().enumerate() {
        for (k, (l, start)) in row.into_iter().enumerate() {
            for (i, (&id, &lab)) in l.ids.iter().zip(&l.labels).enumerate() {
                let p = r * width + start + i;
                ids[p] = id;
                labels[p] = lab;
                pos[p] = i as i64;
                seg[p] = k as i64;
            }
            if let Some((s, f)) = l.cont {
                cont.push((r as i64, (start + s) as i64, f));
            }
        }
    }
    let n_targets = labels.iter().filter(|&&l| l != IGNORE).count() as i64;
    let shape = [b as i64, width as i64];
    (
        Packed {
            ids: Tensor::from_slice(&ids).view(shape),
            labels: Tensor::from_slice(&labels).view(shape),
            position_ids: Tensor::from_slice(&pos).view(shape),
            segments: Tensor::from_slice(&seg).view(shape),
            cont,
            n_targets,
        },
        used,
    )
}

/// Block-diagonal causal "may attend" mask (B, 1, L, L) from segment ids (B, L): a position
/// sees earlier positions of its own sample only; padding sees itself.
pub fn packed_mask(segments: &Tensor) -> lavit_runtime::Result<Tensor> {
    let [_, l] = dims(segments, "segments are (B, L)")?;
    let dev = segments.device();
    let same = segments.unsqueeze(2).eq_tensor(&segments.unsqueeze(1)); // (B, L, L)
    let i = Tensor::arange(l, (Kind::Int64, dev));
    let causal = i.view([1, l]).le_tensor(&i.view([l, 1])); // (L, L): j ≤ i
    let real = segments.ge(0).unsqueeze(2); // (B, L, 1)
    let diag = Tensor::eye(l, (Kind::Bool, dev));
    Ok(same
        .logical_and(&causal)
        .logical_and(&real)
        .logical_or(&diag)
        .unsqueeze(1))
}

/// Input embeddings of a packed batch: token embeddings with the continuous blocks (already
/// at the hidden size: projected by the SelectorMerger stage) written in.
pub fn packed_embeds(model: &LlamaForCausalLM, p: &Packed) -> Tensor {
    let dev = model.device();
    let e = model.embed(&p.ids.to_device(dev));
    if p.cont.is_empty() {
        return e;
    }
    let mut rows = Vec::new();
    let mut cols = Vec::new();
    let mut vals = Vec::new();
    for (r, s, f) in &p.cont {
        let n = f.size()[0];
        rows.extend(std::iter::repeat_n(*r, n as usize));
        cols.extend(*s..*s + n);
        vals.push(f.to_device(dev).to_kind(e.kind()));
    }
    let idx = [
        Some(Tensor::from_slice(&rows).to_device(dev)),
        Some(Tensor::from_slice(&cols).to_device(dev)),
    ];
    e.index_put(&idx, &Tensor::cat(&vals, 0), false)
}

/// Summed cross-entropy of a packed batch, and (detached) sums and counts split by target
/// kind: (total, text_sum, text_n, visual_sum, visual_n).
pub fn packed_loss(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    p: &Packed,
) -> lavit_runtime::Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let dev = model.device();
    let embeds = packed_embeds(model, p);
    let seg = p.segments.to_device(dev);
    let pos = p.position_ids.to_device(dev);
    let mask = packed_mask(&seg)?;
    let args = ForwardArgs {
        position_ids: Some(&pos),
        mask_4d: Some(&mask),
        ..Default::default()
    };
    let logits = model
        .forward_embeds(&embeds, &args, None)?
        .to_kind(Kind::Float); // (B, L, V)
    let v = logits.size()[2];
    let labels = p.labels.to_device(dev).view([-1]);
    let ce = logits.view([-1, v]).cross_entropy_loss::<Tensor>(
        &labels,
        None,
        Reduction::None,
        IGNORE,
        0.0,
    ); // (B·L,), 0 where ignored
    let text = labels.ge(0).logical_and(&labels.lt(vocab.text_vocab_size));
    let vis = labels.ge(vocab.image_start_id);
    let d = ce.detach();
    let split = |m: &Tensor| {
        (
            (&d * m.to_kind(Kind::Float)).sum(Kind::Float),
            m.sum(Kind::Float),
        )
    };
    let (ts, tn) = split(&text);
    let (vs, vn) = split(&vis);
    Ok((ce.sum(Kind::Float), ts, tn, vs, vn))
}

/// The stage-2 training state the Llm stage holds: the optimiser over its trained variables
/// and autocast. `vit_proj` is the SelectorMerger stage's; the driver clips the gradients of
/// both stages globally.
pub struct LlmTrainer {
    opt: AdamW,
    autocast: bool,
}

fn stage_fail(e: impl std::fmt::Display) -> StageError {
    StageError::failed(StageKind::Llm, e)
}

impl LlmTrainer {
    /// Freeze what `cfg.train` does not name and build the optimiser over the rest (none when
    /// only `vit_proj`, in the SelectorMerger stage, trains; the driver refuses a run in which
    /// no stage trains anything).
    pub fn new(llm: &LlmStageModel, cfg: &LlmTrainConfig) -> lavit_runtime::Result<Self> {
        let trains = |n: &str| cfg.trains(n);
        for (name, t) in llm.vs.variables() {
            if !trains(&name) {
                let _ = t.set_requires_grad(false);
            }
        }
        let opt = AdamW::from_var_store(
            &llm.vs,
            trains,
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?
        .no_decay(|n| is_no_decay(n) || n.contains("embed_tokens"));
        Ok(Self {
            opt,
            autocast: cfg.autocast,
        })
    }

    /// Forward with grad of one packed micro-batch ([`Packed::to_batch`] plus `targets`, a
    /// scalar: the step's target count over all its micro-batches). Adds the loss term
    /// `loss` (= summed cross-entropy / targets) and the detached statistics `text_sum`,
    /// `text_n`, `visual_sum`, `visual_n`.
    pub fn forward(&self, llm: &LlmStageModel, mut b: TrainBatch) -> StageResult<TrainBatch> {
        let p = Packed::from_batch(&b)?;
        let targets = b
            .tensors
            .get(&keys::TARGETS)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| StageError::Invalid("training batch has no `targets`".into()))?;
        let hidden = llm.model.config.hidden_size;
        if let Some((_, _, f)) = p
            .cont
            .iter()
            .find(|(_, _, f)| f.size().get(1) != Some(&hidden))
        {
            return Err(StageError::Invalid(format!(
                "continuous image features are {:?} but the LLM's hidden size is {hidden}: \
                 train with a `vit_proj` (model.vit_proj) to project them",
                f.size()
            )));
        }
        let run = || packed_loss(&llm.model, &llm.vocab, &p);
        let (sum, ts, tn, vs, vn) = if self.autocast && llm.model.device().is_cuda() {
            tch::autocast(true, run)
        } else {
            run()
        }?;
        let loss = sum / targets.to_device(llm.model.device());
        b.losses.push((keys::LOSS, loss));
        for (k, v) in [
            (keys::TEXT_SUM, ts),
            (keys::TEXT_N, tn),
            (keys::VISUAL_SUM, vs),
            (keys::VISUAL_N, vn),
        ] {
            b.tensors.insert(k, v);
        }
        Ok(b)
    }

    /// The parameters the optimiser updates (shallow): the model's that `train` names.
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.opt.params()
    }

    /// Apply (AdamW at `ctl.lr`; the driver clipped) or skip, then zero the gradients.
    pub fn step(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        if ctl.apply {
            self.opt.step(ctl.lr).map_err(stage_fail)?;
        }
        self.opt.zero_grad();
        Ok(StepReport::default())
    }

    /// `model` (every variable of the stage's var store) and `optimizer`, as
    /// `Checkpointer::save_training` writes them.
    pub fn state(&self, llm: &LlmStageModel) -> StageResult<TrainParts> {
        Ok(vec![
            ("model".into(), var_store_state_dict(&llm.vs)),
            (
                "optimizer".into(),
                self.opt.state_dict().map_err(stage_fail)?,
            ),
        ])
    }

    /// Load a saved state strictly (exact resume).
    pub fn load(&mut self, llm: &LlmStageModel, parts: TrainParts) -> StageResult<()> {
        for (name, sd) in parts {
            match name.as_str() {
                "model" => {
                    checkpoint::load_into(
                        &llm.vs,
                        "",
                        &sd,
                        "checkpoint model",
                        &Default::default(),
                    )
                    .map_err(stage_fail)?;
                }
                "optimizer" => self
                    .opt
                    .load_state_dict(&sd, "checkpoint optimizer")
                    .map_err(stage_fail)?,
                other => {
                    return Err(StageError::Invalid(format!(
                        "the Llm stage has no training part `{other}`"
                    )))
                }
            }
        }
        Ok(())
    }
}
