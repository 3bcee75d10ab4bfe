//! The demo's LaVIT stages, each a thin call into the project's own trainer or inference code:
//!
//! - stage 0: the built-in EVA ViT (`lavit_encoder::eva_vit`) pretrained here ([`super::stage0`]);
//! - stage 1: the tokenizer trainer (`lavit::train::tokenizer::train_with_images`);
//! - stage 1b: the pixel-decoder trainer (`lavit::train::decoder::train`), pixel space, no VAE,
//!   conditioned on the trained tokenizer's reconstructed features;
//! - stage 2: the LLM trainer (`lavit::train::llm::train_llm`) on [image, text], [text, image]
//!   and [text] samples;
//! - the checkpoint folder (official LaVIT layout) that `lavit caption`, `lavit generate` and
//!   `lavit serve` load, and the evaluation through the one inference path, a
//!   [`crate::pipeline::Pipeline`] of that folder's five stages.

use std::path::{Path, PathBuf};

use anyhow::Context;
use lavit_encoder::eva_vit::EvaBackbone;
use lavit_encoder::EvaVitConfig;
use lavit_llm::sentencepiece::SentencePiece;
use lavit_llm::vocab::UnifiedVocab;
use lavit_llm::{LlamaConfig, LlamaForCausalLM};
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::{LavitManifest, LlmManifest};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::data::{self, caption, to_model_input, to_pixel_space, Split, TEMPLATES};
use super::vocab;
use crate::generate::FeatureDecoders;
use crate::tokenizer::{files, LoadParts, VisualTokenizer};

mod evaluate;
pub use evaluate::{evaluate, EvalResult};

/// Stage-1 budget (the rest of `TokenizerTrainConfig` keeps the trainer's defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage1Config {
    pub steps: i64,
    pub batch_size: usize,
    /// Steps before the codebook is initialised by k-means and quantisation starts.
    pub steps_no_quant: i64,
    pub lr: f64,
    /// Target kept ratio ρ.
    pub rho: f64,
    /// Its weight λ, where it applies and the per-image floor (see `TokenizerTrainConfig`).
    pub lambda: f64,
    pub ratio_scope: crate::train::tokenizer::RatioScope,
    pub floor: f64,
    /// Weight of the selector's entropy term.
    pub confidence_weight: f64,
    /// Gumbel temperature, annealed from start to end.
    pub tau_start: f64,
    pub tau_end: f64,
}

impl Default for Stage1Config {
    fn default() -> Self {
        let t = crate::train::tokenizer::TokenizerTrainConfig::default();
        Self {
            steps: 300,
            batch_size: 64,
            steps_no_quant: 120,
            lr: 2e-3,
            rho: t.rho,
            lambda: t.lambda,
            ratio_scope: t.ratio_scope,
            floor: t.floor,
            confidence_weight: t.confidence_weight,
            tau_start: t.tau_start,
            tau_end: t.tau_end,
        }
    }
}

/// Stage-1b budget: a pixel-space U-Net.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage1bConfig {
    pub steps: usize,
    pub batch_size: i64,
    pub lr: f64,
    /// `block_out_channels` of the U-Net.
    pub channels: Vec<i64>,
    /// Probability of dropping the condition (so decoder guidance works).
    pub cond_dropout: f64,
    /// What the U-Net predicts: `sample` (x₀), `epsilon` or `v_prediction`. x₀ prediction learns
    /// the data at high noise levels within a CPU budget; ε-prediction needs far more steps
    /// before DDIM samples from pure noise look like clothes.
    pub prediction_type: String,
    /// diffusers `down_block_types` (one per entry of `channels`).
    pub down_block_types: Vec<String>,
    /// diffusers `up_block_types`.
    pub up_block_types: Vec<String>,
    /// diffusers `addition_embed_type`: `text` adds an attention pool of the condition tokens to
    /// the time embedding, so every ResNet block sees what the tokens say globally (cross-
    /// attention alone learns the token→pixel mapping far more slowly).
    pub addition_embed_type: Option<String>,
    /// Heads of that pool.
    pub addition_embed_type_num_heads: i64,
    /// The U-Net's `condition_map`: the patch grid (7 × 7 at 28 px) of decoded condition
    /// tokens is also concatenated to the input, so the decoder knows where each token belongs
    /// (dev run on
    /// the full demo's tokenizer, 300 steps: held-out reconstructions judged right 74 % with
    /// it, 9 % without).
    pub condition_map: bool,
}

impl Default for Stage1bConfig {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 32,
            lr: 2e-3,
            channels: vec![32, 64],
            cond_dropout: 0.1,
            prediction_type: "sample".into(),
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            addition_embed_type: None,
            addition_embed_type_num_heads: 4,
            condition_map: true,
        }
    }
}

/// The demo LLaMA's sizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmSizes {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
}

impl Default for LlmSizes {
    fn default() -> Self {
        Self {
            hidden_size: 96,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
        }
    }
}

/// Stage-2 budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage2Config {
    pub steps: i64,
    pub batch_size: usize,
    pub max_len: usize,
    pub lr: f64,
    pub warmup_steps: i64,
    /// Fraction of text-only samples in the mix.
    pub text_ratio: f64,
    /// Training images used for stage 2 (0 = all).
    pub max_images: usize,
}

impl Default for Stage2Config {
    fn default() -> Self {
        Self {
            steps: 400,
            batch_size: 4,
            max_len: 256,
            lr: 3e-3,
            warmup_steps: 20,
            text_ratio: 0.05,
            max_images: 0,
        }
    }
}

/// Evaluation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Generated images per class prompt.
    pub images_per_class: i64,
    /// Held-out images per class reconstructed (image → tokens → pixel decoder) and judged.
    pub reconstructions_per_class: usize,
    /// Candidates drawn per generated image; the one stage 0's class head (the demo's
    /// CLIP: trained on the same frozen ViT features) finds most like the prompted class is
    /// kept, as the paper reranks its samples with CLIP. 1 = no reranking.
    pub rerank_candidates: i64,
    /// LLM classifier-free guidance (paper eq. 7).
    pub llm_guidance: f64,
    pub top_k: i64,
    pub temperature: f64,
    /// DDIM steps and decoder guidance of the pixel decoder.
    pub ddim_steps: usize,
    pub decoder_guidance: f64,
    /// Held-out photos drawn from as image-only prompts (multimodal synthesis with the
    /// checkpoint's defaults) and judged.
    pub synthesis_photos: usize,
    /// Of those, the first this many are also drawn from as [photo, "a photo of a <another
    /// class>"] (shown, no target).
    pub synthesis_with_text: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            images_per_class: 10,
            reconstructions_per_class: 10,
            rerank_candidates: 4,
            llm_guidance: 3.0,
            top_k: 20,
            temperature: 1.0,
            ddim_steps: 20,
            decoder_guidance: 1.0,
            synthesis_photos: 100,
            synthesis_with_text: 10,
        }
    }
}

/// The manifest of the demo checkpoint: the configured tokenizer / feature-decoder sizes and
/// the unified vocabulary of the demo's text pieces.
pub fn demo_manifest(
    tokenizer: &lavit_runtime::manifest::TokenizerManifest,
    feature_decoder: &lavit_runtime::manifest::FeatureDecoderManifest,
    eval: &EvalConfig,
) -> LavitManifest {
    let v = vocab::text_vocab_size();
    let mut m = LavitManifest::official();
    m.tokenizer = tokenizer.clone();
    m.feature_decoder = feature_decoder.clone();
    m.llm = LlmManifest {
        text_vocab_size: v,
        image_start_id: v,
        image_end_id: v + 1,
        visual_token_offset: v + 2,
        vocab_size: v + 2 + tokenizer.n_code,
        bos_id: 1,
        eos_id: 2,
        quantization: None,
    };
    m.generation.t2i_prompt = caption(7, 0);
    m.generation.t2i_min_new_tokens = 4;
    m.generation.t2i_max_new_tokens = tokenizer.num_patches();
    m.generation.caption_max_new_tokens = 12;
    // The settings the demo evaluates with travel with its checkpoint: `lavit generate` and
    // `lavit serve` on it default to them.
    m.generation.ddim_steps = eval.ddim_steps as i64;
    m.generation.lowres_ddim_steps = eval.ddim_steps as i64;
    m.generation.lowres_decoder_guidance = eval.decoder_guidance;
    m.generation.llm_guidance = eval.llm_guidance;
    m.generation.top_k = eval.top_k;
    m
}

/// All images of a split as [M, 3, S, S] CLIP-normalised tokenizer inputs.
pub fn model_inputs(split: &Split, size: i64) -> Tensor {
    let idx: Vec<usize> = (0..split.len()).collect();
    to_model_input(&split.batch_unit(&idx), size)
}

/// Stage 0's output file.
pub fn stage0_eva(dir: &Path) -> PathBuf {
    dir.join("eva_vitg_psz14.safetensors")
}

/// Stage 0's class head (kept to rerank generated images, as the paper reranks with CLIP).
pub fn stage0_heads(dir: &Path) -> PathBuf {
    dir.join("stage0_heads.safetensors")
}

/// Builds the tiny EVA ViT, pretrains it (stage 0) and saves it under its official name.
pub fn run_stage0(
    manifest: &LavitManifest,
    cfg: &super::stage0::Stage0Config,
    train: &Split,
    eval: &Split,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let eva = {
        // draw the initial weights on the torch RNG turn (stages may run side by side)
        let _turn = lavit_runtime::train::torch_rng_turn(seed);
        EvaBackbone::new(
            &EvaVitConfig::from_manifest(&manifest.tokenizer),
            Device::Cpu,
        )
    };
    let (heads, rows) = super::stage0::pretrain(&eva, cfg, train, seed, Some(dir))?;
    let acc = tch::no_grad(|| super::stage0::head_accuracy(&eva, &heads, eval))?;
    super::save_vs(&eva.vs, &stage0_eva(dir))?;
    super::save_vs(&heads.vs, &stage0_heads(dir))?;
    Ok((acc, rows.iter().map(|r| r.loss).collect()))
}

/// Named loss curves (metric name, value per step).
pub type Curves = Vec<(String, Vec<f64>)>;

/// Stage 1: the project's tokenizer trainer on the frozen stage-0 encoder; returns the
/// exported folder (official layout) and the loss per step.
pub fn run_stage1(
    manifest: &LavitManifest,
    cfg: &Stage1Config,
    eva_file: &Path,
    train: &Split,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<(PathBuf, Curves)> {
    use crate::train::tokenizer::{train_with_images, Stage1Parts, TokenizerTrainConfig};
    let eva = EvaBackbone::load(
        eva_file,
        &EvaVitConfig::from_manifest(&manifest.tokenizer),
        Device::Cpu,
        Kind::Float,
    )?;
    let tcfg = TokenizerTrainConfig {
        out_dir: dir.to_path_buf(),
        seed,
        batch_size: cfg.batch_size,
        steps: cfg.steps,
        steps_no_quant: cfg.steps_no_quant,
        lr: cfg.lr,
        rho: cfg.rho,
        lambda: cfg.lambda,
        ratio_scope: cfg.ratio_scope,
        floor: cfg.floor,
        confidence_weight: cfg.confidence_weight,
        tau_start: cfg.tau_start,
        tau_end: cfg.tau_end,
        save_every: cfg.steps,
        ..Default::default()
    };
    let images = model_inputs(train, manifest.tokenizer.img_size);
    let parts = Stage1Parts::builtin(Box::new(eva));
    let one = std::sync::Arc::new(lavit_runtime::dist::ProcessGroup::single());
    let report = train_with_images(&tcfg, manifest, parts, &images, 0, &one)?;
    let export = report
        .export_dir
        .clone()
        .context("the tokenizer trainer exported no folder")?;
    let curves = ["loss", "rec_loss", "kept"]
        .iter()
        .map(|k| (k.to_string(), report.series(k)))
        .collect();
    Ok((export, curves))
}

/// The trained tokenizer's feature decoders for the pixel decoder (a view, so the demo does
/// not add trait impls to other modules' types).
pub struct TokenizerDecoders<'a>(pub &'a VisualTokenizer);

impl FeatureDecoders for TokenizerDecoders<'_> {
    fn decode_lowres(&self, ids: &[Vec<i64>]) -> lavit_runtime::Result<Tensor> {
        self.0.decode_lowres(ids)
    }
    fn decode_highres(&self, ids: &[Vec<i64>]) -> lavit_runtime::Result<(Tensor, Tensor)> {
        self.0.decode_highres(ids)
    }
}

/// The stage-1b condition: image → tokens → the lowres feature decoder's reconstruction.
pub struct TokenizerConditioner<'a> {
    pub tok: &'a VisualTokenizer,
}

impl crate::train::decoder::Conditioner for TokenizerConditioner<'_> {
    fn condition(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let _g = tch::no_grad_guard();
        let size = self.tok.manifest.tokenizer.img_size;
        // (B, 3, S, S) in [-1, 1], the three channels equal → (B, 1, S, S) in [0, 1]
        let unit = ((images.mean_dim(1, true, Kind::Float) + 1.0) / 2.0).clamp(0.0, 1.0);
        let x = data::to_model_input(&data::from_pixel_space(&unit, size), size);
        let t = self.tok.tokenize(&x)?;
        Ok(self.tok.decode_lowres(&t.ids)?)
    }
    fn dim(&self) -> i64 {
        self.tok.manifest.feature_decoder.lowres_unet_proj
    }
}

/// Stage 1b: the project's pixel-decoder trainer (pixel space, no VAE) on the training images,
/// conditioned on the stage-1 tokenizer; writes `dir/unet` and `dir/scheduler`.
pub fn run_stage1b(
    tokenizer_dir: &Path,
    cfg: &Stage1bConfig,
    train: &Split,
    seed: u64,
    dir: &Path,
) -> anyhow::Result<Vec<f64>> {
    use crate::train::decoder::{
        self as trainer, tiny_pixel_unet, DecoderTrainConfig, TrainConfig,
    };
    let tok = VisualTokenizer::from_checkpoint(
        tokenizer_dir,
        Device::Cpu,
        LoadParts {
            understanding: false,
            lowres_decoder: true,
            ..LoadParts::tokenize_only()
        },
    )?;
    let size = tok.manifest.tokenizer.img_size;
    let cond = TokenizerConditioner { tok: &tok };
    let mut unet = tiny_pixel_unet(3, tok.manifest.feature_decoder.lowres_unet_proj);
    unet.block_out_channels = cfg.channels.clone();
    unet.down_block_types = cfg.down_block_types.clone();
    unet.up_block_types = cfg.up_block_types.clone();
    unet.addition_embed_type = cfg.addition_embed_type.clone();
    unet.addition_embed_type_num_heads = cfg.addition_embed_type_num_heads;
    unet.condition_map = cfg.condition_map;
    unet.sample_size = Some(size);
    let defaults = DecoderTrainConfig::default();
    let dcfg = DecoderTrainConfig {
        out_dir: dir.to_path_buf(),
        unet,
        vae: None,
        scheduler: lavit_decoder::schedulers::SchedulerConfig {
            prediction_type: cfg.prediction_type.clone(),
            ..defaults.scheduler.clone()
        },
        train: TrainConfig {
            steps: cfg.steps,
            batch_size: cfg.batch_size,
            lr: cfg.lr,
            cond_dropout: cfg.cond_dropout,
            seed,
            save_every: cfg.steps,
            ema_decay: 0.99,
            sample_count: 8,
            ..Default::default()
        },
        ..Default::default()
    };
    let idx: Vec<usize> = (0..train.len()).collect();
    // (M, 3, S, S) in [-1, 1]
    let images = (to_pixel_space(&train.batch_unit(&idx), size) * 2.0 - 1.0).repeat([1, 3, 1, 1]);
    // the trainer holds the torch RNG turn for its whole run (stage 2, training beside it,
    // draws only while building its model, which the demo lets finish first)
    trainer::train(&dcfg, &images, &cond)?;
    let log = lavit_runtime::train::MetricsLog::open(dir, i64::MAX)?;
    Ok(log.series("loss").into_iter().map(|p| p.1).collect())
}

fn llm_config(manifest: &LavitManifest, s: &LlmSizes) -> LlamaConfig {
    LlamaConfig {
        hidden_size: s.hidden_size,
        intermediate_size: s.intermediate_size,
        num_hidden_layers: s.num_hidden_layers,
        num_attention_heads: s.num_attention_heads,
        num_key_value_heads: Some(s.num_key_value_heads),
        max_position_embeddings: 512,
        ..LlamaConfig::tiny(manifest.llm.vocab_size)
    }
}

/// HF `config.json` of the demo LLaMA.
fn llm_config_json(c: &LlamaConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta(),
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": false,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    })
}

/// Stage 2: the project's LLM trainer on [image, text], [text, image] and [text] samples
/// built from the stage-1 tokenizer; writes the `language_model/` folder into `dir`.
///
/// The model's initial weights are drawn from `seed` on the torch RNG turn; `built` (if any)
/// is told once they are, so a stage that draws from libtorch's generator all the time (the
/// pixel decoder) can then start beside it.
pub fn run_stage2(
    tokenizer_dir: &Path,
    sizes: &LlmSizes,
    cfg: &Stage2Config,
    train: &Split,
    seed: u64,
    dir: &Path,
    built: Option<std::sync::mpsc::Sender<()>>,
) -> anyhow::Result<Curves> {
    use crate::train::llm::{train_llm, LlmTrainConfig, Sample};
    let tok =
        VisualTokenizer::from_checkpoint(tokenizer_dir, Device::Cpu, LoadParts::tokenize_only())?;
    let manifest = tok.manifest.clone();
    let size = manifest.tokenizer.img_size;
    let sp = SentencePiece::from_bytes(&vocab::tokenizer_model())
        .map_err(|e| anyhow::anyhow!("demo tokenizer.model: {e}"))?;
    let uv = UnifiedVocab::from(&manifest.llm);
    let n = if cfg.max_images == 0 {
        train.len()
    } else {
        cfg.max_images.min(train.len())
    };
    // The initial weights are drawn first, each on its torch RNG turn, so that stage 1b (which
    // holds the turn for its whole run) can start while the cache below is computed: the
    // cache draws nothing from libtorch (the Gumbel selection has its own seeded noise). The
    // stage actors' builders then copy these values in, the same numbers as drawing there.
    let lcfg = llm_config(&manifest, sizes);
    let (width, hidden) = (manifest.tokenizer.encoder_width, lcfg.hidden_size);
    let llm_init = {
        let _turn = lavit_runtime::train::torch_rng_turn(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = LlamaForCausalLM::new(vs.root(), &lcfg);
        vs
    };
    // vit_proj: libtorch's default initialisation drawn from its own seed
    let proj_init = {
        let _turn = lavit_runtime::train::torch_rng_turn(seed ^ 0x7072_6f6a);
        lavit_selector::ProjectorStage::new(width, hidden, Device::Cpu).vs
    };
    if let Some(tx) = built {
        // the demo's receiver may have given up waiting (its own stage failed): nothing to do
        let _ = tx.send(());
    }
    // Cache the frozen tokenizer's outputs once: continuous kept features (the understanding
    // input before `vit_proj`) and the discrete ids (the generation target).
    let mut samples = Vec::with_capacity(2 * n);
    let idx: Vec<usize> = (0..n).collect();
    let bar = super::progress::Progress::new("stage2 cache", n.div_ceil(256) as u64);
    for (ci, chunk) in idx.chunks(256).enumerate() {
        let x = to_model_input(&train.batch_unit(chunk), size);
        let (kept, counts, ids) = tch::no_grad(|| -> anyhow::Result<_> {
            let trace = tok.trace(&x, tok.selection)?;
            let (kept, counts) = VisualTokenizer::gather_kept(&trace.merged, &trace.decisions);
            let t = tok.tokenize_with(&x, tok.selection)?;
            Ok((kept, counts, t.ids))
        })?;
        let mut at = 0;
        for (j, &i) in chunk.iter().enumerate() {
            let label = train.labels[i] as usize;
            let t = ci * 256 + j;
            let feats = kept.narrow(0, at, counts[j]).copy();
            at += counts[j];
            samples.push(Sample::ImageText {
                features: feats,
                text: sp.encode(&caption(label, t)),
            });
            // one generation sample in ten has no prompt: the unconditional stream of CFG;
            // the others are prompts as users write them (plurals, label names, capitals,
            // article mistakes) over the training templates
            let text = if t % 10 == 9 {
                Vec::new()
            } else {
                sp.encode(&data::training_prompt(label, t as u64))
            };
            samples.push(Sample::TextImage {
                text,
                visual: ids[j].clone(),
            });
        }
        bar.tick(String::new());
    }
    bar.finish();
    let corpus: Vec<Sample> = (0..10)
        .flat_map(|c| (0..TEMPLATES.len()).map(move |t| (c, t)))
        .map(|(c, t)| Sample::Text(sp.encode(&caption(c, t))))
        .chain(
            (0..10)
                .flat_map(|c| (0..16u64).map(move |v| (c, v)))
                .map(|(c, v)| Sample::Text(sp.encode(&data::training_prompt(c, v)))),
        )
        .collect();

    // The model is built (and trained) on the Llm stage actor's thread and device.
    let (c2, m2, sp2) = (lcfg.clone(), manifest.clone(), sp.clone());
    let build: crate::train::llm::LlmModelBuilder = Box::new(move |device| {
        let mut vs = nn::VarStore::new(device);
        let model = lavit_runtime::layers::uninit(|| LlamaForCausalLM::new(vs.root(), &c2));
        vs.copy(&llm_init)?;
        Ok(lavit_llm::LlmStageModel::from_parts(
            vs,
            model,
            UnifiedVocab::from(&m2.llm),
            Box::new(sp2),
            &m2.generation,
        ))
    });
    // vit_proj is built (and trained) on the SelectorMerger stage's thread and device.
    let projector: crate::train::llm::ProjectorBuilder = Box::new(move |device| {
        let mut p = lavit_runtime::layers::uninit(|| {
            lavit_selector::ProjectorStage::new(width, hidden, device)
        });
        p.vs.copy(&proj_init)?;
        Ok(p)
    });
    let tcfg = LlmTrainConfig {
        steps: cfg.steps,
        batch_size: cfg.batch_size,
        max_len: cfg.max_len,
        lr: cfg.lr,
        min_lr: cfg.lr / 10.0,
        warmup_steps: cfg.warmup_steps,
        text_ratio: cfg.text_ratio,
        seed,
        save_every: cfg.steps,
        log_every: (cfg.steps as u64 / 20).max(1),
        ..Default::default()
    };
    let run_dir = dir.join("run");
    let summary = train_llm(
        crate::train::llm::Stage2Models {
            llm: build,
            projector: Some(projector),
        },
        &uv,
        &samples,
        &corpus,
        &tcfg,
        &run_dir,
        &lavit_runtime::stage::Placement::default(),
        &std::sync::Arc::new(lavit_runtime::dist::ProcessGroup::single()),
    )?;

    // language_model/: HF LLaMA + tokenizer.model + visual_weight (merger + vit_proj)
    let lm = dir.join("language_model");
    std::fs::create_dir_all(&lm)?;
    let all: StateDict = summary
        .weights
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    let (proj, llm): (StateDict, StateDict) = all
        .into_iter()
        .partition(|(k, _)| k.starts_with("vit_proj."));
    checkpoint::save_safetensors(&lm.join("model.safetensors"), &llm, None)?;
    checkpoint::atomic_write(
        &lm.join("config.json"),
        serde_json::to_string_pretty(&llm_config_json(&lcfg))?.as_bytes(),
    )?;
    checkpoint::atomic_write(&lm.join("tokenizer.model"), &vocab::tokenizer_model())?;
    let enc = checkpoint::load_path(&crate::tokenizer::resolve_file(
        tokenizer_dir,
        files::TOKENIZER_ENCODER,
    )?)?;
    let mut visual: StateDict = checkpoint::sub_dict(&enc, "causal_encoder")
        .into_iter()
        .map(|(k, v)| (format!("causal_encoder.{k}"), v))
        .collect();
    visual.extend(proj);
    checkpoint::save_safetensors(
        &dir.join(format!("{}.safetensors", files::VISUAL_WEIGHT)),
        &visual,
        None,
    )?;
    let log = lavit_runtime::train::MetricsLog::open(&run_dir, i64::MAX)?;
    Ok(["loss", "text_loss", "visual_loss"]
        .iter()
        .map(|k| {
            (
                k.to_string(),
                log.series(k).into_iter().map(|p| p.1).collect(),
            )
        })
        .collect())
}

/// Copies a folder tree (files only).
pub fn copy_tree(src: &Path, dst: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), &to)
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Assembles the checkpoint folder in the official layout from the stages' outputs.
pub fn assemble_checkpoint(
    manifest: &LavitManifest,
    tokenizer_dir: &Path,
    stage1b_dir: &Path,
    stage2_dir: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    copy_tree(
        &tokenizer_dir.join("visual_tokenizer"),
        &out.join("visual_tokenizer"),
    )?;
    copy_tree(
        &stage2_dir.join("language_model"),
        &out.join("language_model"),
    )?;
    copy_tree(&stage1b_dir.join("unet"), &out.join("pixel_decoding/unet"))?;
    copy_tree(
        &stage1b_dir.join("scheduler"),
        &out.join("pixel_decoding/scheduler"),
    )?;
    checkpoint::atomic_write(
        &out.join("manifest.json"),
        serde_json::to_string_pretty(manifest)?.as_bytes(),
    )?;
    Ok(())
}
