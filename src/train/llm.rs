//! The stage-2 driver (paper §3.2 "Stage-2: Unified Generative Modeling"): the data loop over
//! the three sample kinds, the sample mix, schedule, NaN policy, checkpoints with exact
//! resume, metrics and progress. The official repository released no training code; this
//! follows the paper. Packing, the loss and the optimiser state live with the stage that
//! trains ([`lavit_llm::train`]); callable as a library ([`train_llm`]) and from
//! `lavit train llm --config FILE` ([`run`]).
//!
//! The model lives in the pipeline's Llm stage actor ([`LlmStageModel`], on the device
//! `placement.llm` names) and trains there; `vit_proj`, the projector of [image, text]
//! samples' continuous features, lives in the SelectorMerger stage ([`ProjectorStage`], on
//! `placement.selector_merger`) as it does when serving, and trains there. Each step is
//! `TrainForward` (packed micro-batch → SelectorMerger: features through `vit_proj` → Llm:
//! loss, [`LlmTrainer::forward`]) → `Backward` (one pass across both stages) →
//! `OptimizerStepWith` (learning rate or skip, after the driver's global clipping) messages
//! through [`StageGraph`]; checkpoints come from the stages (`GetTrainState`) and resume
//! into them (`SetTrainState`). The loop is the shared driver's
//! (`lavit_runtime::train::drive`: schedule, NaN policy, data parallelism, checkpoints,
//! metrics, progress); this file keeps the data: the sample mix and the packing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lavit_llm::sentencepiece::SentencePiece;
pub use lavit_llm::train::{
    keys, pack, packed_embeds, packed_loss, packed_mask, LlmTrainConfig, LlmTrainer, Packed, Sample,
};
use lavit_llm::vocab::UnifiedVocab;
use lavit_llm::LlmStageModel;
use lavit_llm::{LlamaConfig, LlamaForCausalLM};
use lavit_runtime::actors::{GraphOptions, StageBuilders, StageGraph};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::dist::ProcessGroup;
use lavit_runtime::fsread;
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::TrainKey;
use lavit_runtime::stage::{LlmStage, Placement, SelectorMergerStage, StageKind};
use lavit_runtime::train::{
    drive, splitmix64, DriverConfig, LrSchedule, Metrics, Step, TrainJob, TrainState,
};
use lavit_selector::ProjectorStage;
use serde::Deserialize;
use tch::nn;
use tch::{Device, Kind, Tensor};

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
    /// The trained variables as the stages hold them at the end: the Llm stage's, and
    /// `vit_proj.*` when the SelectorMerger stage trained it.
    pub weights: StateDict,
}

/// Builds the model to train on the device the placement gives the Llm stage (runs on the
/// stage's own thread).
pub type LlmModelBuilder = Box<dyn FnOnce(Device) -> Result<LlmStageModel> + Send>;

/// Builds `vit_proj` on the device the placement gives the SelectorMerger stage (on the
/// stage's own thread).
pub type ProjectorBuilder = Box<dyn FnOnce(Device) -> Result<ProjectorStage> + Send>;

/// The stages a stage-2 run builds: the LLM, and the projector of continuous image features
/// when [image, text] samples come as features before `vit_proj`.
pub struct Stage2Models {
    pub llm: LlmModelBuilder,
    pub projector: Option<ProjectorBuilder>,
}

impl From<LlmModelBuilder> for Stage2Models {
    /// The LLM alone ([image, text] features already at its hidden size).
    fn from(llm: LlmModelBuilder) -> Self {
        Stage2Models {
            llm,
            projector: None,
        }
    }
}

/// Train the LLM that `models.llm` makes (in the Llm stage, on the device `placement.llm`
/// names) and `vit_proj` with it when `models.projector` makes one and `cfg.train` names it
/// (in the SelectorMerger stage, on `placement.selector_merger`) on `data` mixed with
/// `text_corpus`, data-parallel over `pg` (world size 1: one process). Resumes from
/// `out_dir/checkpoints` when it holds a checkpoint; writes metrics there (rank 0).
#[allow(clippy::too_many_arguments)]
pub fn train_llm(
    models: impl Into<Stage2Models>,
    vocab: &UnifiedVocab,
    data: &[Sample],
    text_corpus: &[Sample],
    cfg: &LlmTrainConfig,
    out_dir: &Path,
    placement: &Placement,
    pg: &Arc<ProcessGroup>,
) -> Result<TrainSummary> {
    cfg.validate("llm training config")?;
    if data.is_empty() && text_corpus.is_empty() {
        bail!("no training samples");
    }
    let models = models.into();
    let project = models.projector.is_some();
    let invalid = |e: anyhow::Error| lavit_runtime::Error::invalid(format!("{e:#}"));
    let mut builders = StageBuilders::unused();
    let tcfg = cfg.clone();
    let build = models.llm;
    builders.llm = Box::new(move |dev| {
        let mut llm = build(dev).map_err(invalid)?;
        llm.train = Some(LlmTrainer::new(&llm, &tcfg)?);
        Ok(Box::new(llm) as Box<dyn LlmStage>)
    });
    if let Some(build) = models.projector {
        let tcfg = cfg.clone();
        builders.selector_merger = Box::new(move |dev| {
            let p = build(dev).map_err(invalid)?;
            let p = p.with_training(tcfg.weight_decay, |n| tcfg.trains(n))?;
            Ok(Box::new(p) as Box<dyn SelectorMergerStage>)
        });
    }
    let graph = StageGraph::spawn(builders, placement, GraphOptions::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(run_job(
        &graph,
        pg,
        vocab,
        data,
        text_corpus,
        cfg,
        out_dir,
        project,
    ));
    drop(graph);
    r
}

const LLM: StageKind = StageKind::Llm;

/// Stage 2 as a job of the shared driver: each step packs `grad_accum` micro-batches of
/// `batch_size × world` rows from the epoch's sample order (the same on every rank); this
/// rank trains on its rows of each.
struct LlmJob<'a> {
    vocab: &'a UnifiedVocab,
    data: &'a [Sample],
    text_corpus: &'a [Sample],
    cfg: &'a LlmTrainConfig,
    order: Vec<(bool, usize)>,
    /// (text loss, visual loss) of every step of this call.
    history: Vec<(f64, f64)>,
    /// Micro-batches go through the SelectorMerger stage's `vit_proj` first.
    project: bool,
}

impl LlmJob<'_> {
    fn order_for(&self, seed: u64, epoch: u64) -> Vec<(bool, usize)> {
        epoch_order(
            self.data.len(),
            self.text_corpus.len(),
            self.cfg.text_ratio,
            seed,
            epoch,
        )
    }
}

impl TrainJob for LlmJob<'_> {
    async fn start(&mut self, _: &StageGraph, state: &TrainState) -> lavit_runtime::Result<()> {
        self.order = self.order_for(state.seed, state.epoch);
        Ok(())
    }

    async fn step(&mut self, s: &mut Step<'_>) -> lavit_runtime::Result<Metrics> {
        // A step draws nothing from libtorch's generator (LLaMA has no dropout; the data
        // order is a function of (seed, epoch)).
        let cfg = self.cfg;
        let world = s.pg.world_size();
        let rows = cfg.batch_size;
        // Pack the global micro-batches of this step (host only), advancing the cursor.
        let mut micro = Vec::new();
        for _ in 0..cfg.grad_accum {
            if s.state.data_cursor as usize >= self.order.len() {
                s.state.epoch += 1;
                s.state.data_cursor = 0;
                self.order = self.order_for(s.state.seed, s.state.epoch);
            }
            let rest: Vec<&Sample> = self.order[s.state.data_cursor as usize..]
                .iter()
                .map(|&(is_text, i)| {
                    if is_text {
                        &self.text_corpus[i]
                    } else {
                        &self.data[i]
                    }
                })
                .collect();
            let (p, used) = pack(&rest, self.vocab, cfg.max_len, rows * world);
            s.state.data_cursor += used as u64;
            micro.push(p);
        }
        // Every rank's loss is its rows' token losses over (global targets / world): the
        // ranks' mean is then the global batch's per-target mean.
        let total: i64 = micro.iter().map(|p| p.n_targets).sum::<i64>().max(1);
        let per_rank = total as f64 / world as f64;
        let share = s.shard(rows);
        let (mut ts, mut tn, mut vsum, mut vn) = (0.0, 0.0, 0.0, 0.0);
        for p in &micro {
            let p = if world > 1 {
                p.rows(share.start as i64..share.end as i64)
            } else {
                p.rows(0..p.len())
            };
            if p.is_empty() {
                s.add_loss(0.0);
                continue;
            }
            let mut batch = p.to_batch();
            if self.project && !p.cont.is_empty() {
                batch.route = vec![StageKind::SelectorMerger, LLM];
            }
            batch
                .tensors
                .insert(keys::TARGETS, Tensor::from(per_rank as f32));
            let mut out = s.forward(batch).await?;
            let stat = |k: TrainKey| out.tensors.get(&k).map_or(0.0, |t| t.double_value(&[]));
            ts += stat(keys::TEXT_SUM);
            tn += stat(keys::TEXT_N);
            vsum += stat(keys::VISUAL_SUM);
            vn += stat(keys::VISUAL_N);
            let loss = out.take_loss(keys::LOSS, LLM)?;
            s.backward(LLM, loss).await?;
        }
        let text_loss = if tn > 0.0 { ts / tn } else { f64::NAN };
        let vis_loss = if vn > 0.0 { vsum / vn } else { f64::NAN };
        self.history.push((text_loss, vis_loss));
        let mut m: Metrics = vec![("targets", total as f64)];
        if tn > 0.0 {
            m.push(("loss_text", text_loss));
        }
        if vn > 0.0 {
            m.push(("loss_visual", vis_loss));
        }
        Ok(m)
    }
}

/// The stage-2 run: the driver's loop over the stages that train something (the Llm stage,
/// the projector's when `project`), then the trained weights.
#[allow(clippy::too_many_arguments)]
async fn run_job(
    g: &StageGraph,
    pg: &Arc<ProcessGroup>,
    vocab: &UnifiedVocab,
    data: &[Sample],
    text_corpus: &[Sample],
    cfg: &LlmTrainConfig,
    out_dir: &Path,
    project: bool,
) -> Result<TrainSummary> {
    let built = if project {
        vec![StageKind::SelectorMerger, LLM]
    } else {
        vec![LLM]
    };
    let mut stages = Vec::new();
    for k in built {
        if !g.trained_params(k).await?.is_empty() {
            stages.push(k);
        }
    }
    if stages.is_empty() {
        return Err(lavit_runtime::Error::config(
            "llm training config",
            "train.train",
            format!(
                "{:?} matches no variable of the model{}",
                cfg.train,
                if project { " or of vit_proj" } else { "" }
            ),
        )
        .into());
    }
    let driver = DriverConfig {
        name: "stage-2 llm".into(),
        out_dir: out_dir.to_path_buf(),
        stages: stages.clone(),
        schedule: LrSchedule::warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr),
        steps: cfg.steps,
        end: cfg.steps,
        run_steps: cfg.run_steps.max(0),
        save_every: cfg.save_every,
        keep: cfg.keep,
        max_nan_steps: 5,
        log_every: cfg.log_every,
        seed: cfg.seed,
        resume: true,
        progress: true,
        grad_clip: cfg.clip_grad, // over both stages' parameters, after averaging over ranks
        torch_rng: false, // LLaMA has no dropout; the data order is a function of (seed, epoch)
    };
    let mut job = LlmJob {
        vocab,
        data,
        text_corpus,
        cfg,
        order: Vec::new(),
        history: Vec::new(),
        project,
    };
    let outcome = drive(g, pg, &driver, &mut job).await?;
    let history: Vec<(f64, f64, f64)> = outcome
        .losses
        .iter()
        .zip(&job.history)
        .map(|(l, (t, v))| (*l, *t, *v))
        .collect();
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
    let mut weights = StateDict::new();
    for &k in &stages {
        let part = if k == LLM {
            "model"
        } else {
            ProjectorStage::PART
        };
        if let Some((_, sd)) = g.train_state(k).await?.into_iter().find(|(n, _)| n == part) {
            weights.extend(sd);
        }
    }
    Ok(TrainSummary {
        final_step: outcome.state.step,
        steps_run: outcome.state.step - outcome.start_step,
        first: mean(&history[..k]),
        last: mean(&history[history.len() - k..]),
        skipped: outcome.state.skipped_total,
        checkpoint: outcome.checkpoint,
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

impl lavit_runtime::config::Validate for FileConfig {
    fn validate(&self, origin: &str) -> lavit_runtime::Result<()> {
        self.train.validate(origin)
    }
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
    let fc: FileConfig = lavit_runtime::config::load_config(&args.config)?;
    let base = args.config.parent().unwrap_or(Path::new(".")).to_path_buf();
    let rank = crate::train::join_group()?;
    let device = match rank.device.clone() {
        Some(d) => d,
        None => fc.model.device.clone().unwrap_or_else(|| "cpu".into()),
    };
    lavit_runtime::device::resolve_device(&device)
        .with_context(|| format!("{}: model.device", args.config.display()))?;
    // The Llm stage and the projector beside it (the other stages are unused in stage 2).
    let placement = Placement {
        selector_merger: device.clone(),
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
            fsread::read_lines_capped(&p, fsread::MAX_JSONL_BYTES, fsread::MAX_JSONL_LINE_BYTES)?
                .into_iter()
                .map(|(_, l)| Sample::Text(sp.encode(&l)))
                .collect()
        }
        None => Vec::new(),
    };
    let out_dir = rel(&base, &fc.out_dir);
    tracing::info!(samples = data.len(), text = text_corpus.len(), out = %out_dir.display(), "stage-2 training");
    // The projector is built on the SelectorMerger stage's thread and device.
    let projector: Option<ProjectorBuilder> = fc.model.vit_proj.as_ref().map(|p| {
        let p = rel(&base, p);
        Box::new(move |device| {
            let sd = checkpoint::sub_dict(&checkpoint::load_path(&p)?, "vit_proj");
            let w = sd
                .get("weight")
                .with_context(|| format!("{}: no vit_proj.weight", p.display()))?;
            let proj = match w.size().as_slice() {
                [o, i] => ProjectorStage::new(*i, *o, device),
                other => bail!("{}: vit_proj.weight is {other:?}, not 2-D", p.display()),
            };
            checkpoint::load_into(
                &proj.vs,
                "vit_proj.",
                &sd,
                &p.display().to_string(),
                &Default::default(),
            )?;
            Ok(proj)
        }) as ProjectorBuilder
    });
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
                let base_cfg = serde_json::to_value(LlamaConfigInit::tiny())
                    .context("serialising the tiny LLaMA config")?;
                let base_cfg = base_cfg
                    .as_object()
                    .context("the tiny LLaMA config is not a JSON object")?;
                for (k, x) in base_cfg {
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
        Ok(LlmStageModel::from_parts(
            vs,
            model,
            vocab,
            Box::new(sp),
            &manifest.generation,
        ))
    });
    let s = train_llm(
        Stage2Models {
            llm: build,
            projector,
        },
        &vocab,
        &data,
        &text_corpus,
        &fc.train,
        &out_dir,
        &placement,
        &rank.pg,
    )?;
    if !rank.pg.is_rank0() {
        return Ok(());
    }
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
    // The capped line reader: a regular file, each line at most 1 MiB, never echoed whole.
    let lines =
        fsread::read_lines_capped(path, fsread::MAX_JSONL_BYTES, fsread::MAX_JSONL_LINE_BYTES)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (n, line) in lines {
        let at = || format!("{}:{}", path.display(), n);
        let v: serde_json::Value = serde_json::from_str(&line).with_context(at)?;
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
