//! Stage-1 training of LaVIT's dynamic visual tokenizer (`lavit train tokenizer`), which the
//! official repository does not ship. Paper: Jin et al., ICLR 2024, §3.1 and §4 (loss
//! eq. 3); recipe from the authors in LaVIT issues #10 and #29.
//!
//! The encoder is frozen (its patch features are computed once per image). Trained: the
//! token selector, the merger, `encode_task_layer`, the codebook (EMA) and the lowres
//! feature decoder's trunk, with
//!
//! ```text
//! loss = mean(1 − cos(x, x_rec)) + λ · mean_b (ρ − mean_n M_bn)² + β‖l2(z) − sg(z_q)‖²
//! ```
//!
//! where M are Gumbel-softmax keep decisions (hard forward, soft backward; temperature
//! annealed from `tau_start` to `tau_end`). Phases: `steps_no_quant` steps without the
//! codebook (the decoder reads the l2-normalised continuous codes), then the codebook is
//! initialised by spherical k-means on encoder outputs, then end-to-end training with EMA
//! codebook updates and dead-code restarts.
//!
//! Every step's randomness (batch, Gumbel noise) is a function of `(seed, step)`, and the
//! checkpoint holds model, optimiser and codebook state, so resuming after N steps and
//! running N more equals 2N straight steps.
//!
//! The model runs in the stage graph that serves it (`lavit_runtime::actors::StageGraph`,
//! placed by the same placement config), each stage owning only its own weights: features
//! come from the Encoder stage, and every step is a `TrainForward` message through the
//! SelectorMerger, Quantizer and Decoder stages (each adds its outputs and loss terms, see
//! `lavit_runtime::messages::train_keys`; the Decoder stage's lowres feature decoder
//! reconstructs the patch features), a `Backward` on the Decoder stage, and an
//! `OptimizerStep` to each trainable stage. The backbone and
//! the codebook are the built-in EVA-CLIP and l2 VQ or plugins (`[plugins]`). The run is a
//! job of the shared driver (`lavit_runtime::train::drive`): this file keeps the data (the
//! features, the per-step batch indices), the loss sum and the k-means initialisation; the
//! driver owns the loop, the global gradient clipping, the NaN guard, data parallelism,
//! metrics, progress and checkpoints (each stage's `train_state`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_encoder::LaVITImageProcessor;
use lavit_plugin_api::{Backbone, Codebook};
use lavit_quantizer::{EmaConfig, VectorQuantizer};
use lavit_runtime::actors::{GraphOptions, StageGraph};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::dist::ProcessGroup;
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::messages::{TrainBatch, TrainKey};
use lavit_runtime::plugin_host::PluginsConfig;
use lavit_runtime::stage::{Placement, StageKind};
use lavit_runtime::train::{
    drive, load_vars, splitmix64, AdamWConfig, DriverConfig, LrSchedule, Metrics, Step, TrainJob,
};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::tokenizer::{files, resolve_file, TokenizerPlugins, VisualTokenizer};
use lavit_decoder::feature_decoder::{FeatureDecoderConfig, VQDecoder};
use lavit_decoder::stage::DecoderStageModel;
use lavit_encoder::{EncoderStageModel, SharedBackbone};
use lavit_quantizer::{QuantizerStageModel, SharedCodebook};
use lavit_runtime::actors::StageBuilders;
use lavit_runtime::messages::train_keys as keys;
use lavit_runtime::stage::{DecoderStage, EncoderStage, QuantizerStage, SelectorMergerStage};
pub use lavit_runtime::train::init_weights;
use lavit_runtime::train::{prefixed, sorted_vars, stage1_adamw, StageOptim};
use lavit_selector::SelectorMergerStageModel;
pub use lavit_selector::{RatioScope, Stage1Loss};

mod config;
pub use config::TokenizerTrainConfig;

/// What a run returns (the library entry point's "metrics out").
pub struct TrainReport {
    /// Steps completed (including earlier runs resumed from).
    pub steps: i64,
    /// Per-step metrics (loss, rec_loss, cos, kept, usage, perplexity, lr, tau).
    pub records: Vec<(i64, Vec<(String, f64)>)>,
    /// Images that could not be read and were skipped.
    pub skipped_images: usize,
    /// Images used.
    pub images: usize,
    /// The exported checkpoint folder (official layout, safetensors), when the run finished.
    pub export_dir: Option<PathBuf>,
    /// The trained tokenizer (lowres decoder included), ready for `tokenize`.
    pub tokenizer: VisualTokenizer,
}

impl TrainReport {
    /// The values of one metric in step order.
    pub fn series(&self, key: &str) -> Vec<f64> {
        self.records
            .iter()
            .filter_map(|(_, v)| v.iter().find(|(k, _)| k == key).map(|(_, x)| *x))
            .collect()
    }
}

mod data;
use data::parse_device;
pub use data::{batch_indices, load_image_folder};

/// What the stage-1 stages are built from (see [`stage1_builders`]).
pub struct Stage1Spec {
    /// Sizes of every part.
    pub manifest: LavitManifest,
    /// The frozen backbone (runs on the device it was built on).
    pub backbone: Box<dyn Backbone>,
    /// A plugin codebook; `None`: the built-in l2 VQ with EMA updates, built on the
    /// Quantizer stage's device.
    pub codebook: Option<Box<dyn Codebook>>,
    /// The built-in codebook's EMA settings, commitment weight and k-means iterations.
    pub ema: EmaConfig,
    pub beta: f64,
    pub kmeans_iters: usize,
    /// Seed of the initial weights (`init_weights`: each stage's own variables with `seed`,
    /// the feature decoder with `seed ^ 0xdec`).
    pub seed: u64,
    pub loss: Stage1Loss,
    pub adamw: AdamWConfig,
}

/// What a stage-1 stage hands back when it is built: the parts it shares with the trainer
/// (the frozen backbone, exported with the tokenizer; the codebook, which the trainer
/// initialises by k-means between steps). Everything a stage trains stays in the stage and
/// is reached through its messages.
pub enum Stage1Handle {
    Encoder { backbone: SharedBackbone },
    Quantizer { codebook: SharedCodebook },
}

/// The initial weights of the tokenizer stages' variables `part` from `seed`: drawn as one
/// store over every module of `tokenizer_encoder` (`causal_encoder`, `encode_task_layer`,
/// `token_predictor`, `vit_proj`, in name order), so a variable's initial value does not
/// depend on which stage owns it.
fn init_tokenizer_part(part: &nn::VarStore, manifest: &LavitManifest, seed: u64) {
    let t = &manifest.tokenizer;
    let all = nn::VarStore::new(part.device());
    let root = all.root();
    let _ = lavit_selector::TokenPredictor::new(&root / "token_predictor", t.encoder_width);
    let _ = lavit_selector::TokenMerger::new(
        &root / "causal_encoder",
        &lavit_selector::TokenMergerConfig::from_manifest(t),
    );
    let _ = lavit_quantizer::EncodeTaskLayer::new(
        &root / "encode_task_layer",
        t.encoder_width,
        t.code_dim,
    );
    let _ = nn::linear(
        &root / "vit_proj",
        t.encoder_width,
        t.llm_hidden,
        Default::default(),
    );
    init_weights(&all, seed);
    let drawn = all.variables();
    tch::no_grad(|| {
        for (name, mut v) in part.variables() {
            if let Some(d) = drawn.get(&name) {
                v.copy_(d);
            }
        }
    });
}

/// Builders of the stage graph stage 1 trains through: the Encoder, SelectorMerger,
/// Quantizer and Decoder stage models built for training (random weights from `spec.seed`),
/// the Llm unused. Each stage sends its [`Stage1Handle`] on the returned channel when it is
/// built (so after `StageGraph::spawn` returns all four are there).
pub fn stage1_builders(
    spec: Stage1Spec,
) -> (StageBuilders, std::sync::mpsc::Receiver<Stage1Handle>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let Stage1Spec {
        manifest,
        backbone,
        codebook,
        ema,
        beta,
        kmeans_iters,
        seed,
        loss,
        adamw,
    } = spec;
    let (m1, m2, m3, m4) = (
        manifest.clone(),
        manifest.clone(),
        manifest.clone(),
        manifest,
    );
    let (tx1, tx3) = (tx.clone(), tx);
    let (adamw2, adamw3) = (adamw.clone(), adamw.clone());
    let mut b = StageBuilders::unused();
    b.encoder = Box::new(move |dev| {
        let backbone = SharedBackbone::new(backbone);
        let st = EncoderStageModel::new(&m1, Box::new(backbone.clone()), dev)?;
        let _ = tx1.send(Stage1Handle::Encoder { backbone });
        Ok(Box::new(st) as Box<dyn EncoderStage>)
    });
    b.selector_merger = Box::new(move |dev| {
        let st = SelectorMergerStageModel::new(&m2, dev);
        init_tokenizer_part(&st.vs, &m2, seed);
        let opt = stage1_adamw(prefixed("tokenizer.", st.trained_vars()), &adamw)?;
        let optim = StageOptim::new(opt);
        Ok(Box::new(st.with_training(optim, loss)) as Box<dyn SelectorMergerStage>)
    });
    b.quantizer = Box::new(move |dev| {
        let t = &m3.tokenizer;
        let codebook: Box<dyn Codebook> = match codebook {
            Some(c) => c,
            None => {
                let mut vq = VectorQuantizer::new(t.n_code, t.code_dim, dev).with_ema(ema);
                vq.beta = beta;
                vq.kmeans_iters = kmeans_iters;
                Box::new(vq)
            }
        };
        let codebook = SharedCodebook::new(codebook);
        let st = QuantizerStageModel::new(&m3, dev, Box::new(codebook.clone()))?;
        init_tokenizer_part(&st.vs, &m3, seed);
        let mut params = prefixed("tokenizer.", st.trained_vars());
        params.extend(
            codebook
                .trainable_parameters()
                .into_iter()
                .enumerate()
                .map(|(i, p)| (format!("codebook.{i}"), p)),
        );
        let optim = StageOptim::new(stage1_adamw(params, &adamw2)?);
        let _ = tx3.send(Stage1Handle::Quantizer { codebook });
        Ok(Box::new(st.with_training(optim)) as Box<dyn QuantizerStage>)
    });
    b.decoder = Box::new(move |dev| {
        let vs = nn::VarStore::new(dev);
        let decoder = VQDecoder::new(
            vs.root(),
            &FeatureDecoderConfig::from_manifest(&m4.feature_decoder),
        );
        init_weights(&vs, seed ^ 0xdec);
        let params = prefixed(
            "decoder.",
            lavit_runtime::train::trainable_variables(&vs, |n| !n.starts_with("unet_proj")),
        );
        let optim = StageOptim::new(stage1_adamw(params, &adamw3)?);
        Ok(
            Box::new(DecoderStageModel::for_stage1(&m4, vs, decoder, optim))
                as Box<dyn DecoderStage>,
        )
    });
    (b, rx)
}

/// The backbone and codebook stage 1 trains with.
pub struct Stage1Parts {
    /// The frozen vision backbone (EVA-CLIP or a plugin); it runs on the device it was
    /// built on.
    pub backbone: Box<dyn Backbone>,
    /// Whether `backbone` came from a plugin: its weights are exported as
    /// `visual_tokenizer/backbone.safetensors` (the EVA file otherwise).
    pub plugin_backbone: bool,
    /// A plugin codebook (exported as `visual_tokenizer/codebook.safetensors`); `None`: the
    /// built-in l2 VQ (EMA updates, k-means initialisation), exported as `quantize.*`.
    pub codebook: Option<Box<dyn Codebook>>,
}

impl Stage1Parts {
    /// A built-in backbone (EVA-CLIP) and the built-in codebook.
    pub fn builtin(backbone: Box<dyn Backbone>) -> Self {
        Stage1Parts {
            backbone,
            plugin_backbone: false,
            codebook: None,
        }
    }
}

/// What the stage-1 stages are built from for `cfg` (the trainer's settings of the stages'
/// losses, optimisers and the built-in codebook).
pub fn stage1_spec(
    cfg: &TokenizerTrainConfig,
    manifest: &LavitManifest,
    backbone: Box<dyn Backbone>,
    codebook: Option<Box<dyn Codebook>>,
) -> Stage1Spec {
    Stage1Spec {
        manifest: manifest.clone(),
        backbone,
        codebook,
        ema: EmaConfig {
            decay: cfg.ema_decay,
            eps: 1e-5,
            dead_threshold: cfg.dead_threshold,
            seed: cfg.seed,
        },
        beta: cfg.beta,
        kmeans_iters: cfg.kmeans_iters,
        seed: cfg.seed,
        loss: Stage1Loss {
            rho: cfg.rho,
            lambda: cfg.lambda,
            confidence_weight: cfg.confidence_weight,
            ratio_scope: cfg.ratio_scope,
            floor: cfg.floor,
        },
        adamw: AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    }
}

/// The trainer's handles on the parts it shares with the stages (the frozen backbone for
/// the export, the codebook for its k-means initialisation between steps and the trained
/// tokenizer).
struct Handles {
    backbone: SharedBackbone,
    codebook: SharedCodebook,
}

impl Handles {
    fn collect(rx: &std::sync::mpsc::Receiver<Stage1Handle>) -> Result<Self> {
        let (mut backbone, mut codebook) = (None, None);
        for h in rx.try_iter() {
            match h {
                Stage1Handle::Encoder { backbone: b } => backbone = Some(b),
                Stage1Handle::Quantizer { codebook: c } => codebook = Some(c),
            }
        }
        match (backbone, codebook) {
            (Some(backbone), Some(codebook)) => Ok(Handles { backbone, codebook }),
            _ => bail!("the stage-1 stages handed back incomplete state"),
        }
    }
}

/// One training forward through the SelectorMerger, Quantizer and Decoder stages; `rows`:
/// this batch's rows in the step's global batch (data parallel).
async fn forward(
    s: &Step<'_>,
    feats: &Tensor,
    tau: f64,
    quantize: bool,
    rows: Option<(i64, i64)>,
) -> lavit_runtime::Result<TrainBatch> {
    let mut b = TrainBatch::new(vec![
        StageKind::SelectorMerger,
        StageKind::Quantizer,
        StageKind::Decoder,
    ]);
    b.tensors
        .insert(keys::PATCH_FEATURES, feats.shallow_clone());
    b.tensors
        .insert(keys::GUMBEL_SEED, Tensor::from(s.seed as i64));
    b.tensors.insert(keys::TAU, Tensor::from(tau));
    b.tensors
        .insert(keys::QUANTIZE, Tensor::from(quantize as i64));
    if let Some((offset, global)) = rows {
        b.set_rows(offset, global);
    }
    s.forward(b).await
}

fn missing(what: &str) -> lavit_runtime::Error {
    lavit_runtime::Error::invalid(format!("the stage-1 stages returned no `{what}`"))
}

fn out_tensor(b: &mut TrainBatch, name: TrainKey) -> lavit_runtime::Result<Tensor> {
    b.tensors.remove(&name).ok_or_else(|| missing(name.name()))
}

/// Stage 1 as a job of the shared driver: every step draws `batch_size × world` images (by
/// index, from the run seed and the step), this rank sends its share through the
/// SelectorMerger, Quantizer and Decoder stages and back-propagates the summed loss.
struct TokenizerJob<'a> {
    cfg: &'a TokenizerTrainConfig,
    /// Every image's patch features (the frozen encoder's, computed once).
    feats: Tensor,
    codebook: SharedCodebook,
}

impl TrainJob for TokenizerJob<'_> {
    async fn step(&mut self, s: &mut Step<'_>) -> lavit_runtime::Result<Metrics> {
        let cfg = self.cfg;
        let step = s.step;
        let m = self.feats.size()[0] as usize;
        let world = s.pg.world_size();
        let global = cfg.batch_size * world;
        let fdev = self.feats.device();
        let tau = cfg.tau_at(step);
        let quantize = step >= cfg.steps_no_quant;
        if quantize && step == cfg.steps_no_quant {
            // Phase 2 starts: data-dependent initialisation of the codebook (k-means for the
            // built-in one) from encoder outputs — the same global batches on every rank.
            let mut zs = Vec::new();
            for j in 0..cfg.kmeans_batches.max(1) {
                let idx = batch_indices(cfg.seed ^ 0xc0de, j as i64, m, global);
                let fb = self
                    .feats
                    .index_select(0, &Tensor::from_slice(&idx).to_device(fdev));
                let mut out = forward(s, &fb, tau, false, None).await?;
                zs.push(out_tensor(&mut out, keys::CODES_Z)?);
            }
            let z = Tensor::cat(&zs, 0);
            self.codebook
                .clone()
                .init_from_samples(&z, cfg.seed)
                .map_err(|e| {
                    lavit_runtime::Error::invalid(format!("codebook initialisation: {e}"))
                })?;
            tracing::info!(step, codes = z.size()[0], "codebook initialised");
        }
        let idx = batch_indices(cfg.seed, step, m, global);
        let mine = &idx[s.shard(cfg.batch_size)];
        let fb = self
            .feats
            .index_select(0, &Tensor::from_slice(mine).to_device(fdev));
        let rows = (world > 1).then(|| (mine.len() as i64 * s.pg.rank() as i64, global as i64));
        let mut out = forward(s, &fb, tau, quantize, rows).await?;
        const D: StageKind = StageKind::Decoder;
        let rec_loss = out.take_loss(keys::LOSS_RECONSTRUCTION, D)?;
        let ldev = rec_loss.device();
        let loss = &rec_loss
            + out.take_loss(keys::LOSS_RATIO, D)?.to_device(ldev)
            + out.take_loss(keys::LOSS_COMMITMENT, D)?.to_device(ldev)
            + out.take_loss(keys::LOSS_CONFIDENCE, D)?.to_device(ldev);
        let rec = rec_loss.double_value(&[]);
        let cos = out_tensor(&mut out, keys::COS)?.double_value(&[]);
        let kept = out_tensor(&mut out, keys::DECISIONS)?
            .mean(Kind::Float)
            .double_value(&[]);
        let ids = out.tensors.remove(&keys::IDS);
        drop(out);
        s.backward(StageKind::Decoder, loss).await?;
        let (usage, ppl) = match &ids {
            Some(ids) => VectorQuantizer::usage(ids, self.codebook.num_codes()),
            None => (0.0, 0.0),
        };
        Ok(vec![
            ("rec_loss", rec),
            ("cos", cos),
            ("kept", kept),
            ("perplexity", ppl),
            ("usage", usage),
            ("tau", tau),
        ])
    }
}

/// The trained variables a stage holds under checkpoint part `part`.
async fn stage_part(g: &StageGraph, kind: StageKind, part: &str) -> Result<StateDict> {
    g.train_state(kind)
        .await?
        .into_iter()
        .find(|(n, _)| n == part)
        .map(|(_, sd)| sd)
        .with_context(|| format!("stage {kind} holds no `{part}`"))
}
/// `lavit train tokenizer` as a library call: images from `cfg.data_dir`, the backbone from
/// `[plugins.backbone]`, else EVA from `cfg.encoder_dir` (or random at the manifest's
/// sizes), the codebook from `[plugins.codebook]`, else the built-in VQ.
pub fn train(cfg: &TokenizerTrainConfig) -> Result<TrainReport> {
    train_in_group(cfg, &Arc::new(ProcessGroup::single()))
}

/// [`train`] as one rank of a data-parallel run over `pg`.
pub fn train_in_group(cfg: &TokenizerTrainConfig, pg: &Arc<ProcessGroup>) -> Result<TrainReport> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let on = |kind| -> Result<Device> {
        Ok(match cfg.placement.as_ref() {
            Some(p) => p.device(kind)?,
            None => device,
        })
    };
    let plugins = TokenizerPlugins::load(&cfg.plugins)?;
    let manifest = match (&cfg.encoder_dir, &cfg.manifest) {
        (Some(dir), _) => LavitManifest::for_checkpoint(dir)?,
        (None, Some(p)) => LavitManifest::from_json_file(p)?,
        (None, None) => LavitManifest::official(),
    };
    let enc_device = on(StageKind::Encoder)?;
    // Plugin parts without `weights` initialise from libtorch's generator: seeded with the
    // run seed, a run and its resume (a new process) build the same parts. (Within one
    // process other work may draw from it too: give a plugin backbone `weights` for exact
    // resume there.)
    tch::manual_seed(cfg.seed as i64);
    let plugin_backbone = plugins.backbone(None, enc_device)?;
    let is_plugin = plugin_backbone.is_some();
    let backbone: Box<dyn Backbone> = match (plugin_backbone, &cfg.encoder_dir) {
        (Some(b), _) => b,
        (None, Some(dir)) => {
            let p = resolve_file(dir, files::EVA)?;
            let cfg = EvaVitConfig::from_manifest(&manifest.tokenizer);
            Box::new(EvaBackbone::load(&p, &cfg, enc_device, Kind::Float)?)
        }
        (None, None) => {
            let mut e = EvaBackbone::new(
                &EvaVitConfig::from_manifest(&manifest.tokenizer),
                enc_device,
            );
            init_weights(&e.vs, cfg.seed ^ 0xe7a);
            e.vs.freeze();
            Box::new(e)
        }
    };
    let codebook = plugins.codebook(None, on(StageKind::Quantizer)?)?;
    let (images, skipped) =
        load_image_folder(&cfg.data_dir, manifest.tokenizer.img_size, cfg.max_images)?;
    let parts = Stage1Parts {
        backbone,
        plugin_backbone: is_plugin,
        codebook,
    };
    train_with_images(cfg, &manifest, parts, &images, skipped, pg)
}

/// The stage-1 loop on preprocessed images [M, 3, S, S] (CLIP-normalised) with a frozen
/// backbone and a codebook — what the demo calls after its stage 0 — data-parallel over
/// `pg` (every rank computes the features of every image; each step's global batch is
/// `batch_size × world`; rank 0 writes checkpoints, metrics and the export).
pub fn train_with_images(
    cfg: &TokenizerTrainConfig,
    manifest: &LavitManifest,
    parts: Stage1Parts,
    images: &Tensor,
    skipped_images: usize,
    pg: &Arc<ProcessGroup>,
) -> Result<TrainReport> {
    cfg.validate()?;
    let device = parse_device(&cfg.device)?;
    let t = &manifest.tokenizer;
    let f = &manifest.feature_decoder;
    if f.decoder_out_dim != t.encoder_width {
        bail!(
            "feature_decoder.decoder_out_dim ({}) must equal tokenizer.encoder_width ({}) to reconstruct the encoder features",
            f.decoder_out_dim,
            t.encoder_width
        );
    }
    let m = images.size()[0] as usize;
    let placement = match &cfg.placement {
        Some(p) => p.clone(),
        None => {
            let d = cfg.device.clone();
            Placement {
                encoder: d.clone(),
                selector_merger: d.clone(),
                quantizer: d.clone(),
                llm: d.clone(),
                decoder: d,
                ..Placement::default()
            }
        }
    };
    let Stage1Parts {
        backbone,
        plugin_backbone,
        codebook,
    } = parts;
    let plugin_codebook = codebook.is_some();
    let spec = stage1_spec(cfg, manifest, backbone, codebook);
    // The stage graph (the Llm unused); each stage builds its part on its device.
    let (builders, rx) = stage1_builders(spec);
    let mut graph = StageGraph::spawn(builders, &placement, GraphOptions::default())
        .context("building the stage-1 stage graph")?;
    let h = Handles::collect(&rx)?;
    graph.set_train(true);

    // Frozen encoder: features once, through the Encoder stage.
    let feats_all = {
        let mut v = Vec::new();
        for c in images.split(16, 0) {
            let mut b = TrainBatch::new(vec![StageKind::Encoder]);
            b.tensors.insert(keys::IMAGES, c);
            let mut out = futures::executor::block_on(graph.train_forward(b))?;
            v.push(out_tensor(&mut out, keys::PATCH_FEATURES)?);
        }
        Tensor::cat(&v, 0).to_kind(Kind::Float)
    };
    let trained = vec![
        StageKind::SelectorMerger,
        StageKind::Quantizer,
        StageKind::Decoder,
    ];
    let driver = DriverConfig {
        name: "stage-1 tokenizer".into(),
        out_dir: cfg.out_dir.clone(),
        stages: trained,
        schedule: LrSchedule::warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr),
        steps: cfg.steps,
        end: cfg.stop_after.unwrap_or(cfg.steps).min(cfg.steps),
        run_steps: 0,
        save_every: cfg.save_every,
        keep: cfg.keep_checkpoints,
        max_nan_steps: cfg.max_nan_steps,
        log_every: 20,
        seed: cfg.seed,
        resume: true,
        progress: true,
        grad_clip: cfg.grad_clip,
        torch_rng: true,
    };
    let mut job = TokenizerJob {
        cfg,
        feats: feats_all,
        codebook: h.codebook.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (outcome, sm_vars, q_vars, dec_vars) = rt.block_on(async {
        let outcome = drive(&graph, pg, &driver, &mut job).await?;
        let sm = stage_part(&graph, StageKind::SelectorMerger, "selector_merger").await?;
        let q = stage_part(&graph, StageKind::Quantizer, "quantizer").await?;
        let d = stage_part(&graph, StageKind::Decoder, "decoder").await?;
        anyhow::Ok((outcome, sm, q, d))
    })?;
    graph.set_train(false);
    graph.shutdown();

    // The trained tokenizer on `device`, from the stages' state.
    let mut tok = VisualTokenizer::with_parts(
        manifest,
        device,
        Box::new(h.backbone.clone()),
        Box::new(h.codebook.clone()),
    )?;
    load_vars(
        &sorted_vars(&tok.selector.vs),
        &sm_vars,
        "the stage-1 selector",
    )
    .map_err(anyhow::Error::msg)?;
    load_vars(
        &sorted_vars(&tok.quantizer.vs),
        &q_vars,
        "the stage-1 quantizer",
    )
    .map_err(anyhow::Error::msg)?;
    let dec_vs = nn::VarStore::new(device);
    let decoder = VQDecoder::new(dec_vs.root(), &FeatureDecoderConfig::from_manifest(f));
    load_vars(
        &sorted_vars(&dec_vs),
        &dec_vars,
        "the stage-1 feature decoder",
    )
    .map_err(anyhow::Error::msg)?;
    tok.lowres_decoder = Some((dec_vs, decoder));
    let export_dir = if outcome.state.step >= cfg.steps && pg.is_rank0() {
        let dir = cfg.out_dir.join("export");
        export(&dir, &tok, plugin_backbone, plugin_codebook)?;
        Some(dir)
    } else {
        None
    };
    Ok(TrainReport {
        steps: outcome.state.step,
        records: outcome.records,
        skipped_images,
        images: m,
        export_dir,
        tokenizer: tok,
    })
}
/// Write a checkpoint folder in the official layout (safetensors) that
/// [`VisualTokenizer::from_checkpoint`] loads (with the same `[plugins]` section when parts
/// are plugins): manifest.json, the encoder (EVA file, or `visual_tokenizer/backbone` for a
/// plugin backbone), the tokenizer encoder (with `quantize.embedding.weight` for the built-in
/// codebook; a plugin codebook goes to `visual_tokenizer/codebook`) and the lowres feature
/// decoder.
pub fn export(
    dir: &Path,
    tok: &VisualTokenizer,
    plugin_backbone: bool,
    plugin_codebook: bool,
) -> Result<()> {
    let vt = dir.join("visual_tokenizer");
    std::fs::create_dir_all(&vt).with_context(|| format!("creating {}", vt.display()))?;
    let st = |name: &str| dir.join(format!("{name}.safetensors"));
    let as_dict = |v: Vec<(String, Tensor)>| -> StateDict { v.into_iter().collect() };
    let backbone = as_dict(
        tok.encoder
            .backbone
            .state_dict()
            .map_err(|e| anyhow::anyhow!("backbone state: {e}"))?,
    );
    let codebook = as_dict(
        tok.quantizer
            .quantize
            .state_dict()
            .map_err(|e| anyhow::anyhow!("codebook state: {e}"))?,
    );
    let mut enc: StateDict = sorted_vars(&tok.selector.vs)
        .into_iter()
        .chain(sorted_vars(&tok.quantizer.vs))
        .map(|(k, v)| (k, v.detach()))
        .collect();
    if plugin_codebook {
        checkpoint::save_safetensors(&st(files::PLUGIN_CODEBOOK), &codebook, None)?;
    } else {
        let w = codebook
            .get("embedding.weight")
            .context("the built-in codebook's state has no `embedding.weight`")?;
        enc.insert("quantize.embedding.weight".into(), w.detach());
    }
    let backbone_file = if plugin_backbone {
        files::PLUGIN_BACKBONE
    } else {
        files::EVA
    };
    checkpoint::save_safetensors(&st(backbone_file), &backbone, None)?;
    checkpoint::save_safetensors(&st(files::TOKENIZER_ENCODER), &enc, None)?;
    let (dec_vs, _) = tok
        .lowres_decoder
        .as_ref()
        .context("the tokenizer has no lowres feature decoder to export")?;
    let dec: StateDict = dec_vs.variables().into_iter().collect();
    checkpoint::save_safetensors(&st(files::LOWRES_DECODER), &dec, None)?;
    let json = serde_json::to_vec_pretty(&tok.manifest)?;
    checkpoint::atomic_write(&dir.join("manifest.json"), &json)?;
    Ok(())
}

/// Arguments of `lavit train tokenizer`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training config (TOML, keys of [`TokenizerTrainConfig`]); the plugins named there are native code loaded into this process, trusted like any shared library.
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TokenizerTrainConfig::from_toml_file(&args.config)?;
    let rank = crate::train::join_group()?;
    let mut cfg = cfg;
    if let Some(d) = rank.device {
        cfg.device = d;
        cfg.placement = None;
    }
    let pg = rank.pg;
    let r = train_in_group(&cfg, &pg)?;
    if !pg.is_rank0() {
        return Ok(());
    }
    let loss = r.series("loss");
    println!(
        "{}",
        serde_json::json!({
            "steps": r.steps,
            "images": r.images,
            "skipped_images": r.skipped_images,
            "first_loss": loss.first(),
            "last_loss": loss.last(),
            "last_cos": r.series("cos").last(),
            "last_kept": r.series("kept").last(),
            "last_perplexity": r.series("perplexity").last(),
            "export": r.export_dir,
        })
    );
    Ok(())
}
