//! Stage 2 of LaVIT (paper §3.2 "Stage-2: Unified Generative Modeling"): next-token
//! cross-entropy with one shared head over text and visual ids, on the three sample kinds
//! packed without padding into rows of up to `max_len` tokens. Attention stays inside each
//! sample (block-diagonal causal mask + position ids restarting at 0 per sample). The
//! official repository released no training code; this follows the paper.
//!
//! - [text]: `[BOS] text [EOS]`, every next token is a target.
//! - [image, text] (understanding): `[BOS] [IMG] vit_proj(features) [/IMG] text [EOS]`; the
//!   image side has no targets (continuous inputs), the text does.
//! - [text, image] (generation): `[BOS] text [IMG] visual ids [/IMG]`, all targets.
//!
//! The loop uses `lavit_runtime::train` (AdamW, warm-up + cosine, clipping, atomic
//! checkpoints with exact resume, NaN policy, metrics log, progress bar). Callable as a
//! library ([`train_llm`]) and from `lavit train llm --config FILE` ([`run`]).
//!
//! The model lives in the pipeline's Llm stage actor (the serving adapter
//! `lavit::pipeline::stages::LlmReal`, on the device `placement.llm` names) and trains there:
//! each step is `TrainForward` (packed micro-batch → loss, [`LlmTrainer::forward`]) →
//! `Backward` → `OptimizerStepWith` (learning rate or skip, [`LlmTrainer::step`]) messages
//! through [`StageGraph`]; checkpoints come from the stage (`GetTrainState`) and resume into it
//! (`SetTrainState`). This file keeps the data loop, schedule, NaN policy, metrics and
//! progress on the calling thread.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lavit_llm::actor::LlmStageModel;
use lavit_llm::sentencepiece::SentencePiece;
use lavit_llm::vocab::{UnifiedVocab, IGNORE};
use lavit_llm::{ForwardArgs, LlamaConfig, LlamaForCausalLM};
use lavit_runtime::actors::{GraphOptions, StageBuilders, StageGraph};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{StepControl, StepReport, TrainBatch, TrainParts};
use lavit_runtime::stage::{LlmStage, Placement, StageError, StageKind, StageResult};
use lavit_runtime::train::{
    is_no_decay, splitmix64, var_store_state_dict, AdamW, AdamWConfig, Checkpointer, LrSchedule,
    MetricsLog, NanGuard, StepVerdict, TrainProgress, TrainState,
};
use serde::Deserialize;
use tch::nn::{self, Module};
use tch::{Device, Kind, Reduction, Tensor};

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
        t.insert("ids".into(), self.ids.shallow_clone());
        t.insert("labels".into(), self.labels.shallow_clone());
        t.insert("position_ids".into(), self.position_ids.shallow_clone());
        t.insert("segments".into(), self.segments.shallow_clone());
        if !self.cont.is_empty() {
            let at: Vec<i64> = self.cont.iter().flat_map(|(r, s, _)| [*r, *s]).collect();
            let len: Vec<i64> = self.cont.iter().map(|(_, _, f)| f.size()[0]).collect();
            let feats: Vec<&Tensor> = self.cont.iter().map(|(_, _, f)| f).collect();
            t.insert("cont_at".into(), Tensor::from_slice(&at).view([-1, 2]));
            t.insert("cont_len".into(), Tensor::from_slice(&len));
            t.insert("cont_features".into(), Tensor::cat(&feats, 0));
        }
        b
    }

    /// The micro-batch back from a training message (see [`Packed::to_batch`]).
    pub fn from_batch(b: &TrainBatch) -> StageResult<Packed> {
        let get = |k: &str| {
            b.tensors
                .get(k)
                .map(Tensor::shallow_clone)
                .ok_or_else(|| StageError::Invalid(format!("training batch has no `{k}`")))
        };
        let labels = get("labels")?;
        let mut cont = Vec::new();
        if b.tensors.contains_key("cont_at") {
            let host = |t: Tensor| {
                Vec::<i64>::try_from(&t.to_device(Device::Cpu))
                    .map_err(|e| StageError::Invalid(format!("training batch: {e}")))
            };
            let at = host(get("cont_at")?.view([-1]))?;
            let len = host(get("cont_len")?)?;
            let feats = get("cont_features")?;
            let mut pos = 0;
            for (k, n) in len.into_iter().enumerate() {
                cont.push((at[2 * k], at[2 * k + 1], feats.narrow(0, pos, n)));
                pos += n;
            }
        }
        Ok(Packed {
            ids: get("ids")?,
            n_targets: 0,
            position_ids: get("position_ids")?,
            segments: get("segments")?,
            labels,
            cont,
        })
    }
}

/// Pack samples greedily into rows of at most `max_len` positions (a sample that does not fit
/// starts a new row), `rows` rows at most. Returns the batch and how many samples it used.
pub fn pack(samples: &[&Sample], v: &UnifiedVocab, max_len: usize, rows: usize) -> (Packed, usize) {
    let mut out: Vec<Vec<(Laid, usize)>> = vec![Vec::new()];
    let mut used = 0;
    let mut len = 0;
    for s in samples {
        let l = lay_out(s, v, max_len);
        if len + l.ids.len() > max_len && len > 0 {
            if out.len() == rows {
                break;
            }
            out.push(Vec::new());
            len = 0;
        }
        let n = l.ids.len();
        out.last_mut().unwrap().push((l, len));
        len += n;
        used += 1;
    }
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
pub fn packed_mask(segments: &Tensor) -> Tensor {
    let (_, l) = segments.size2().expect("segments are (B, L)");
    let dev = segments.device();
    let same = segments.unsqueeze(2).eq_tensor(&segments.unsqueeze(1)); // (B, L, L)
    let i = Tensor::arange(l, (Kind::Int64, dev));
    let causal = i.view([1, l]).le_tensor(&i.view([l, 1])); // (L, L): j ≤ i
    let real = segments.ge(0).unsqueeze(2); // (B, L, 1)
    let diag = Tensor::eye(l, (Kind::Bool, dev));
    same.logical_and(&causal)
        .logical_and(&real)
        .logical_or(&diag)
        .unsqueeze(1)
}

/// Input embeddings of a packed batch: token embeddings with the continuous blocks
/// (through `vit_proj` when given) written in.
pub fn packed_embeds(
    model: &LlamaForCausalLM,
    vit_proj: Option<&nn::Linear>,
    p: &Packed,
) -> Tensor {
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
        let f = f.to_device(dev);
        let f = match vit_proj {
            Some(l) => l.forward(&f.to_kind(l.ws.kind())),
            None => f,
        };
        vals.push(f.to_kind(e.kind()));
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
    vit_proj: Option<&nn::Linear>,
    vocab: &UnifiedVocab,
    p: &Packed,
) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let dev = model.device();
    let embeds = packed_embeds(model, vit_proj, p);
    let seg = p.segments.to_device(dev);
    let pos = p.position_ids.to_device(dev);
    let mask = packed_mask(&seg);
    let args = ForwardArgs {
        position_ids: Some(&pos),
        mask_4d: Some(&mask),
        ..Default::default()
    };
    let logits = model
        .forward_embeds(&embeds, &args, None)
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
    (ce.sum(Kind::Float), ts, tn, vs, vn)
}

/// The sample order of an epoch: multimodal samples plus `text_ratio` text-only ones
/// (cycled through the text corpus), shuffled with a seed of (run seed, epoch).
fn epoch_order(
    n_mm: usize,
    n_text: usize,
    ratio: f64,
    seed: u64,
    epoch: u64,
) -> Vec<(bool, usize)> {
    let k = if n_text == 0 {
        0
    } else if n_mm == 0 {
        n_text
    } else {
        ((ratio / (1.0 - ratio)) * n_mm as f64).round() as usize
    };
    let mut order: Vec<(bool, usize)> = (0..n_mm).map(|i| (false, i)).collect();
    order.extend((0..k).map(|j| (true, (epoch as usize * k + j) % n_text.max(1))));
    let mut z = splitmix64(seed ^ splitmix64(epoch.wrapping_add(0x5eed)));
    for i in (1..order.len()).rev() {
        z = splitmix64(z);
        order.swap(i, (z % (i as u64 + 1)) as usize);
    }
    order
}

/// What a run did.
#[derive(Debug, Default)]
pub struct TrainSummary {
    /// Step reached (including resumed steps).
    pub final_step: i64,
    /// Steps run in this call.
    pub steps_run: i64,
    /// Mean (loss, text loss, visual loss) over the first and the last 10% of this call's steps.
    pub first: (f64, f64, f64),
    pub last: (f64, f64, f64),
    pub skipped: u64,
    pub checkpoint: Option<PathBuf>,
    /// The trained variables (model, and `vit_proj.*` when trained with it) as the stage
    /// holds them at the end.
    pub weights: StateDict,
}

/// What the Llm stage trains: the stage's model (`LlmStageModel`, whose `vs` also holds
/// `vit_proj.*` when given) and the projector of continuous image features.
pub struct LlmModelParts {
    pub llm: LlmStageModel,
    pub vit_proj: Option<nn::Linear>,
}

/// Builds the model to train on the device the placement gives the Llm stage (runs on the
/// stage's own thread).
pub type LlmModelBuilder = Box<dyn FnOnce(Device) -> Result<LlmModelParts> + Send>;

/// The stage-2 training state the Llm stage holds: the optimiser over the trained variables,
/// the projector, clipping and autocast.
pub struct LlmTrainer {
    opt: AdamW,
    vit_proj: Option<nn::Linear>,
    clip_grad: f64,
    autocast: bool,
}

fn stage_fail(e: impl std::fmt::Display) -> StageError {
    StageError::failed(StageKind::Llm, e)
}

impl LlmTrainer {
    /// Freeze what `cfg.train` does not name and build the optimiser over the rest.
    pub fn new(
        llm: &LlmStageModel,
        vit_proj: Option<nn::Linear>,
        cfg: &LlmTrainConfig,
    ) -> Result<Self> {
        let trains = |n: &str| cfg.train.iter().any(|p| n.starts_with(p.as_str()));
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
        if opt.names().next().is_none() {
            bail!("`train` {:?} matches no variable of the model", cfg.train);
        }
        Ok(Self {
            opt,
            vit_proj,
            clip_grad: cfg.clip_grad,
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
            .get("targets")
            .map(Tensor::shallow_clone)
            .ok_or_else(|| StageError::Invalid("training batch has no `targets`".into()))?;
        let run = || packed_loss(&llm.model, self.vit_proj.as_ref(), &llm.vocab, &p);
        let (sum, ts, tn, vs, vn) = if self.autocast && llm.model.device().is_cuda() {
            tch::autocast(true, run)
        } else {
            run()
        };
        let loss = sum / targets.to_device(llm.model.device());
        b.losses.push(("loss".into(), loss));
        for (k, v) in [
            ("text_sum", ts),
            ("text_n", tn),
            ("visual_sum", vs),
            ("visual_n", vn),
        ] {
            b.tensors.insert(k.into(), v);
        }
        Ok(b)
    }

    /// Apply (clip + AdamW at `ctl.lr`) or skip, then zero the gradients.
    pub fn step(&mut self, ctl: &StepControl) -> StageResult<StepReport> {
        let mut report = StepReport::default();
        if ctl.apply {
            if self.clip_grad > 0.0 {
                report.grad_norm = Some(
                    self.opt
                        .clip_grad_norm(self.clip_grad)
                        .map_err(stage_fail)?,
                );
            }
            self.opt.step(ctl.lr).map_err(stage_fail)?;
        }
        self.opt.zero_grad();
        Ok(report)
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

/// Train the LLM that `build` makes (and `vit_proj` with it) on `data` mixed with
/// `text_corpus`, through the Llm stage actor on the device `placement.llm` names. Resumes
/// from `out_dir/checkpoints` when it holds a checkpoint; writes metrics there.
pub fn train_llm(
    build: LlmModelBuilder,
    vocab: &UnifiedVocab,
    data: &[Sample],
    text_corpus: &[Sample],
    cfg: &LlmTrainConfig,
    out_dir: &Path,
    placement: &Placement,
) -> Result<TrainSummary> {
    cfg.validate("llm training config")?;
    if data.is_empty() && text_corpus.is_empty() {
        bail!("no training samples");
    }
    let mut builders = StageBuilders::unused();
    let tcfg = cfg.clone();
    builders.llm = Box::new(move |dev| {
        let parts = build(dev).map_err(|e| lavit_runtime::Error::invalid(format!("{e:#}")))?;
        let train = LlmTrainer::new(&parts.llm, parts.vit_proj, &tcfg)
            .map_err(|e| lavit_runtime::Error::invalid(format!("{e:#}")))?;
        Ok(Box::new(crate::pipeline::stages::LlmReal {
            llm: parts.llm,
            train: Some(train),
        }) as Box<dyn LlmStage>)
    });
    let graph = StageGraph::spawn(builders, placement, GraphOptions::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(drive(&graph, vocab, data, text_corpus, cfg, out_dir));
    drop(graph);
    r
}

/// Save the Llm stage's training state (asked on its thread) as a checkpoint of `state`.
async fn save_from_stage(g: &StageGraph, ck: &Checkpointer, state: &TrainState) -> Result<PathBuf> {
    let parts = g.train_state(StageKind::Llm).await?;
    let named: Vec<(&str, &StateDict)> = parts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Ok(ck.save(state, &named)?)
}

/// The stage-2 loop on the calling thread; every tensor op of the model runs on the stage.
async fn drive(
    g: &StageGraph,
    vocab: &UnifiedVocab,
    data: &[Sample],
    text_corpus: &[Sample],
    cfg: &LlmTrainConfig,
    out_dir: &Path,
) -> Result<TrainSummary> {
    const LLM: StageKind = StageKind::Llm;
    let schedule = LrSchedule::warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr);
    let ck = Checkpointer::new(out_dir.join("checkpoints"), cfg.keep)?;
    let mut state = TrainState {
        seed: cfg.seed,
        ..Default::default()
    };
    if let Some(path) = ck.latest()? {
        let mut loaded = lavit_runtime::train::load(&path)?;
        let parts = vec![
            ("model".to_string(), loaded.take("model")?),
            ("optimizer".to_string(), loaded.take("optimizer")?),
        ];
        g.load_train_state(LLM, parts)
            .await
            .with_context(|| format!("resuming {}", path.display()))?;
        tracing::info!(step = loaded.state.step, path = %path.display(), "resumed");
        state = loaded.state;
    }
    let start_step = state.step;
    let mut guard = NanGuard::new(5).with_counts(state.consecutive_skips, state.skipped_total);
    let mut log = MetricsLog::open(out_dir, state.step)?;
    let bar = TrainProgress::new(
        "stage-2 llm",
        cfg.steps as u64,
        state.step as u64,
        cfg.log_every,
    );
    let mut order = epoch_order(
        data.len(),
        text_corpus.len(),
        cfg.text_ratio,
        state.seed,
        state.epoch,
    );
    let mut history: Vec<(f64, f64, f64)> = Vec::new();
    let mut last_ckpt = None;
    let end = if cfg.run_steps > 0 {
        (start_step + cfg.run_steps).min(cfg.steps)
    } else {
        cfg.steps
    };
    g.set_train(true);
    while state.step < end {
        let step = state.step;
        // A step draws nothing from libtorch's generator (LLaMA has no dropout; the data order
        // is a function of (seed, epoch)), so the global generator is left alone and another
        // job in the process (the demo's pixel decoder) can use it at the same time.
        // Pack the micro-batches of this step (host only), advancing the data cursor.
        let mut micro = Vec::new();
        for _ in 0..cfg.grad_accum {
            if state.data_cursor as usize >= order.len() {
                state.epoch += 1;
                state.data_cursor = 0;
                order = epoch_order(
                    data.len(),
                    text_corpus.len(),
                    cfg.text_ratio,
                    state.seed,
                    state.epoch,
                );
            }
            let rest: Vec<&Sample> = order[state.data_cursor as usize..]
                .iter()
                .map(|&(is_text, i)| if is_text { &text_corpus[i] } else { &data[i] })
                .collect();
            let (p, used) = pack(&rest, vocab, cfg.max_len, cfg.batch_size);
            state.data_cursor += used as u64;
            micro.push(p);
        }
        let total: i64 = micro.iter().map(|p| p.n_targets).sum::<i64>().max(1);
        let (mut lv, mut ts, mut tn, mut vsum, mut vn) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut finite = true;
        for p in &micro {
            // TrainForward → the stage's loss, then Backward on the stage's thread.
            let mut batch = p.to_batch();
            batch
                .tensors
                .insert("targets".into(), Tensor::from(total as f32));
            let out = g.train_forward(batch).await?;
            let stat = |k: &str| out.tensors.get(k).map_or(0.0, |t| t.double_value(&[]));
            let loss = out
                .losses
                .into_iter()
                .find(|(k, _)| k == "loss")
                .map(|(_, l)| l)
                .context("the Llm stage returned no loss")?;
            let l = loss.double_value(&[]);
            finite &= l.is_finite();
            lv += l;
            ts += stat("text_sum");
            tn += stat("text_n");
            vsum += stat("visual_sum");
            vn += stat("visual_n");
            if finite {
                g.backward(LLM, loss).await?;
            }
        }
        let lv = if finite { lv } else { f64::NAN };
        let lr = schedule.lr_at(step);
        let verdict = guard.observe(step, lv);
        if verdict == StepVerdict::Stop {
            let p = save_from_stage(g, &ck, &state).await?;
            return Err(guard.stop_error(step, Some(p)).into());
        }
        let ctl = StepControl {
            lr,
            apply: verdict == StepVerdict::Apply,
            step,
        };
        g.optimizer_step_with(LLM, ctl).await?;
        state.step += 1;
        (state.consecutive_skips, state.skipped_total) =
            (guard.consecutive(), guard.skipped_total());
        let text_loss = if tn > 0.0 { ts / tn } else { f64::NAN };
        let vis_loss = if vn > 0.0 { vsum / vn } else { f64::NAN };
        history.push((lv, text_loss, vis_loss));
        let mut rec = vec![("loss", lv), ("lr", lr), ("targets", total as f64)];
        if tn > 0.0 {
            rec.push(("loss_text", text_loss));
        }
        if vn > 0.0 {
            rec.push(("loss_visual", vis_loss));
        }
        log.log(step, &rec)?;
        bar.step(
            step as u64,
            &[("loss", lv), ("text", text_loss), ("visual", vis_loss)],
        );
        if state.step % cfg.save_every == 0 || state.step == end {
            last_ckpt = Some(save_from_stage(g, &ck, &state).await?);
        }
    }
    g.set_train(false);
    bar.finish();
    log.write_report("stage-2 llm")?;
    let mean = |h: &[(f64, f64, f64)]| {
        let avg = |f: fn(&(f64, f64, f64)) -> f64| {
            let v: Vec<f64> = h.iter().map(f).filter(|x| x.is_finite()).collect();
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        (avg(|x| x.0), avg(|x| x.1), avg(|x| x.2))
    };
    let k = (history.len() / 10).max(1).min(history.len());
    let weights = g
        .train_state(LLM)
        .await?
        .into_iter()
        .find(|(k, _)| k == "model")
        .map(|(_, sd)| sd)
        .unwrap_or_default();
    Ok(TrainSummary {
        final_step: state.step,
        steps_run: state.step - start_step,
        first: mean(&history[..k]),
        last: mean(&history[history.len() - k..]),
        skipped: guard.skipped_total(),
        checkpoint: last_ckpt,
        weights,
    })
}

/// `[model]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// HF LLaMA folder to start from (config.json + weights, e.g. `…/language_model`). Without
    /// it a fresh model of `init` is built.
    pub language_model: Option<PathBuf>,
    /// LaVIT checkpoint folder whose `manifest.json` gives the unified vocabulary (default:
    /// the parent of `language_model`, else the official layout).
    pub lavit_dir: Option<PathBuf>,
    /// A fresh model: HF-style LLaMA config fields (vocab_size comes from the manifest).
    pub init: Option<serde_json::Value>,
    /// `visual_weight.bin`-style file holding `vit_proj.*` (trained with the LLM when
    /// `train` names `vit_proj`).
    pub vit_proj: Option<PathBuf>,
    /// `cpu` (default), `cuda` or `cuda:N`.
    pub device: Option<String>,
}

/// `[data]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// JSON lines: `{"text": …}` ([text]), `{"text": …, "visual_ids": [codes]}` ([text, image]
    /// with codebook indices), `{"text": …, "features": "file.safetensors"}` ([image, text]
    /// with cached features, tensor `features` (T, C)). Paths relative to the JSONL file.
    pub train: PathBuf,
    /// Optional text-only corpus (plain lines), mixed in with `train.text_ratio`.
    pub text_corpus: Option<PathBuf>,
    /// SentencePiece model (default: `language_model/tokenizer.model`).
    pub tokenizer: Option<PathBuf>,
}

/// The config file of `lavit train llm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub out_dir: PathBuf,
    #[serde(default)]
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: LlmTrainConfig,
}

/// Arguments of `lavit train llm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML config ([model], [data], [train], out_dir); paths relative to the file.
    #[arg(long)]
    pub config: PathBuf,
}

fn rel(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let fc: FileConfig =
        toml::from_str(&text).with_context(|| format!("parsing {}", args.config.display()))?;
    fc.train.validate(&args.config.display().to_string())?;
    let base = args.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let device = fc.model.device.clone().unwrap_or_else(|| "cpu".into());
    if let Err(m) = lavit_runtime::stage::parse_device(&device) {
        bail!("{}: model.device: {m}", args.config.display());
    }
    // The Llm stage's placement (the other stages are unused in stage 2).
    let placement = Placement {
        llm: device,
        ..Placement::default()
    };
    let lm_dir = fc.model.language_model.as_ref().map(|p| rel(&base, p));
    let lavit_dir = fc
        .model
        .lavit_dir
        .as_ref()
        .map(|p| rel(&base, p))
        .or_else(|| {
            lm_dir
                .as_ref()
                .and_then(|d| d.parent().map(Path::to_path_buf))
        });
    let manifest = match &lavit_dir {
        Some(d) => LavitManifest::for_checkpoint(d)?,
        None => LavitManifest::official(),
    };
    let vocab = UnifiedVocab::from(&manifest.llm);
    let tok_path = match (&fc.data.tokenizer, &lm_dir) {
        (Some(t), _) => rel(&base, t),
        (None, Some(d)) => d.join("tokenizer.model"),
        (None, None) => bail!("data.tokenizer is required without model.language_model"),
    };
    let sp = SentencePiece::from_file(&tok_path)?;
    let train_path = rel(&base, &fc.data.train);
    let data = read_jsonl(&train_path, &sp, &vocab)?;
    let text_corpus = match &fc.data.text_corpus {
        Some(p) => {
            let p = rel(&base, p);
            std::fs::read_to_string(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| Sample::Text(sp.encode(l)))
                .collect()
        }
        None => Vec::new(),
    };
    let out_dir = rel(&base, &fc.out_dir);
    tracing::info!(samples = data.len(), text = text_corpus.len(), out = %out_dir.display(), "stage-2 training");
    // The model is built on the Llm stage's thread and device.
    let (model_sec, v2) = (fc.model.clone(), vocab);
    let build: LlmModelBuilder = Box::new(move |device| {
        let vocab = v2;
        let vs = nn::VarStore::new(device);
        let model = match &lm_dir {
            Some(d) => {
                let cfg = LlamaConfig::from_json_file(&d.join("config.json"))?;
                let m = LlamaForCausalLM::new(vs.root(), &cfg);
                let sd = checkpoint::load_path(d)?;
                let opts = checkpoint::LoadOptions {
                    allow_unexpected: if cfg.tie_word_embeddings {
                        vec!["lm_head.weight".into()]
                    } else {
                        vec![]
                    },
                    ..Default::default()
                };
                checkpoint::load_into(&vs, "", &sd, &d.display().to_string(), &opts)?;
                m
            }
            None => {
                let mut v = model_sec
                    .init
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({}));
                let base_cfg = serde_json::to_value(LlamaConfigInit::tiny()).expect("serialisable");
                for (k, x) in base_cfg.as_object().unwrap() {
                    v.as_object_mut()
                        .context("model.init must be a table")?
                        .entry(k.clone())
                        .or_insert(x.clone());
                }
                v["vocab_size"] = vocab.vocab_size.into();
                let cfg: LlamaConfig = serde_json::from_value(v).context("model.init")?;
                cfg.validate("model.init")?;
                LlamaForCausalLM::new(vs.root(), &cfg)
            }
        };
        if model.config.vocab_size != vocab.vocab_size {
            bail!(
                "the LLM has {} vocabulary rows but the manifest's unified vocabulary has {}",
                model.config.vocab_size,
                vocab.vocab_size
            );
        }
        let vit_proj = match &model_sec.vit_proj {
            Some(p) => {
                let p = rel(&base, p);
                let sd = checkpoint::sub_dict(&checkpoint::load_path(&p)?, "vit_proj");
                let w = sd
                    .get("weight")
                    .with_context(|| format!("{}: no vit_proj.weight", p.display()))?;
                let (o, i) = (w.size()[0], w.size()[1]);
                let l = nn::linear(vs.root() / "vit_proj", i, o, Default::default());
                checkpoint::load_into(
                    &vs,
                    "vit_proj.",
                    &sd,
                    &p.display().to_string(),
                    &Default::default(),
                )?;
                Some(l)
            }
            None => None,
        };
        Ok(LlmModelParts {
            llm: LlmStageModel::from_parts(vs, model, vocab, sp, &manifest.generation),
            vit_proj,
        })
    });
    let s = train_llm(
        build,
        &vocab,
        &data,
        &text_corpus,
        &fc.train,
        &out_dir,
        &placement,
    )?;
    println!(
        "steps {} → {}: loss {:.4} → {:.4}, text {:.4} → {:.4}, visual {:.4} → {:.4}; skipped {}; checkpoint {}",
        s.final_step - s.steps_run,
        s.final_step,
        s.first.0,
        s.last.0,
        s.first.1,
        s.last.1,
        s.first.2,
        s.last.2,
        s.skipped,
        s.checkpoint.map_or("-".into(), |p| p.display().to_string())
    );
    Ok(())
}

/// The default fresh model of `model.init` (a CPU-sized LLaMA).
#[derive(serde::Serialize)]
struct LlamaConfigInit {
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: i64,
    rms_norm_eps: f64,
    max_position_embeddings: i64,
}

impl LlamaConfigInit {
    fn tiny() -> Self {
        let c = LlamaConfig::tiny(1);
        Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.kv_heads(),
            rms_norm_eps: c.rms_norm_eps,
            max_position_embeddings: c.max_position_embeddings,
        }
    }
}

/// Read the training JSONL (see [`DataSection::train`]).
pub fn read_jsonl(path: &Path, sp: &SentencePiece, vocab: &UnifiedVocab) -> Result<Vec<Sample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .with_context(|| format!("{}: no \"text\" string", at()))?;
        let ids = sp.encode(t);
        if let Some(codes) = v.get("visual_ids") {
            let codes: Vec<i64> = serde_json::from_value(codes.clone())
                .with_context(|| format!("{}: visual_ids must be integers", at()))?;
            let n_code = vocab.vocab_size - vocab.visual_token_offset;
            if let Some(bad) = codes.iter().find(|&&c| !(0..n_code).contains(&c)) {
                bail!("{}: visual id {bad} outside the codebook of {n_code}", at());
            }
            out.push(Sample::TextImage {
                text: ids,
                visual: codes.iter().map(|&c| vocab.visual_id(c)).collect(),
            });
        } else if let Some(f) = v.get("features").and_then(|f| f.as_str()) {
            let p = rel(dir, Path::new(f));
            let sd = checkpoint::load_path(&p)?;
            let t = sd
                .get("features")
                .with_context(|| format!("{}: {} has no `features` tensor", at(), p.display()))?;
            if t.dim() != 2 {
                bail!("{}: features must be (T, C), got {:?}", at(), t.size());
            }
            out.push(Sample::ImageText {
                features: t.to_kind(Kind::Float),
                text: ids,
            });
        } else {
            out.push(Sample::Text(ids));
        }
    }
    Ok(out)
}
