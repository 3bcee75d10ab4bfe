//! `lavit demo`: trains the whole LaVIT pipeline on Fashion-MNIST on a CPU, then captions and
//! draws through the normal inference code, and writes a report (HTML + PNGs) and a checkpoint
//! folder in the official LaVIT layout.
//!
//! Each stage writes its outputs to `OUT/stages/<name>/` and, last, a `done.json` marker holding
//! its summary and the configuration it ran with; a rerun skips every stage whose marker matches
//! the current configuration, so an interrupted demo resumes where it stopped.

pub mod data;
pub mod eval_data;
pub mod judge;
pub mod machine;
pub mod progress;
pub mod report;
pub mod selection;
pub mod stage0;
pub mod stages;
pub mod synthesis;
pub mod vocab;
mod write_report;
use write_report::write_report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tch::nn;

use data::{FashionMnist, Split};
use judge::{Judge, JudgeConfig};
use lavit_runtime::manifest::{FeatureDecoderManifest, TokenizerManifest};
use stage0::Stage0Config;

/// The demo's data sizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training images per class (from the official training file).
    pub train_per_class: usize,
    /// Held-out images per class (from the official test file; no stage trains on them).
    pub eval_per_class: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train_per_class: 2000,
            eval_per_class: 100,
        }
    }
}

/// Everything `lavit demo` trains and measures, one section per stage.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    pub seed: u64,
    pub data: DataConfig,
    pub judge: JudgeConfig,
    /// Sizes of the tokenizer (EVA ViT, selector, merger, codebook): the checkpoint's
    /// `manifest.json` `tokenizer` section. 28 px images are zero-padded to `img_size` (the
    /// demo uses 28: no padding).
    pub tokenizer: TokenizerManifest,
    /// Sizes of the feature decoder (`manifest.json` `feature_decoder`).
    pub feature_decoder: FeatureDecoderManifest,
    pub stage0: Stage0Config,
    pub stage1: stages::Stage1Config,
    pub stage1b: stages::Stage1bConfig,
    /// Sizes of the LLaMA.
    pub llm: stages::LlmSizes,
    pub stage2: stages::Stage2Config,
    pub eval: stages::EvalConfig,
}

impl lavit_runtime::config::Validate for DemoConfig {}

impl DemoConfig {
    /// `configs/demo.toml` (compiled in, so the binary runs from any folder).
    // why: the text is compiled in and parsed by tests/demo.rs, so it cannot fail at run time.
    #[allow(clippy::expect_used)]
    pub fn full() -> Self {
        Self::parse(include_str!("../../configs/demo.toml"), "configs/demo.toml")
            .expect("configs/demo.toml is valid")
    }

    /// `configs/demo-quick.toml`: the CI-sized run.
    // why: the text is compiled in and parsed by tests/demo.rs, so it cannot fail at run time.
    #[allow(clippy::expect_used)]
    pub fn quick() -> Self {
        Self::parse(
            include_str!("../../configs/demo-quick.toml"),
            "configs/demo-quick.toml",
        )
        .expect("configs/demo-quick.toml is valid")
    }

    pub fn parse(text: &str, what: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{what}: {e}"))
    }

    /// A user's demo config through the one config mechanism
    /// ([`lavit_runtime::config::load_config`]: `LAVIT__SECTION__KEY` overrides).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(lavit_runtime::config::load_config(path)?)
    }
}

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub config: DemoConfig,
    /// Output folder: `stages/`, `report/`, `checkpoint/`.
    pub out: PathBuf,
    /// Folder with the Fashion-MNIST `.gz` IDX files.
    pub data_dir: PathBuf,
    /// Torch intra-op threads of each stage that runs beside another or has small ops (0 = half
    /// the cores, at least one); stage 0 and the evaluation use every core.
    pub threads: usize,
    /// Stop after this stage (`stage1`: the tokenizer only); None: the whole run.
    pub stop_after: Option<String>,
}

/// The numbers the demo measured (also written to `report/metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DemoSummary {
    /// The judge's accuracy on real held-out images.
    pub judge_accuracy: f64,
    /// Stage 0's class head on frozen features of held-out images.
    pub stage0_accuracy: f64,
    /// Held-out captions that name the right class.
    pub caption_accuracy: f64,
    /// Generated images the judge labels as the prompted class.
    pub t2i_accuracy: f64,
    /// The same over every candidate before reranking (`lavit generate`'s defaults).
    #[serde(default)]
    pub t2i_accuracy_unranked: f64,
    /// Text → image with held-out phrasings of the prompts, `lavit generate`'s defaults.
    #[serde(default)]
    pub t2i_held_out_accuracy: f64,
    /// Reconstructions of held-out images the judge labels as the original's class.
    #[serde(default)]
    pub reconstruction_accuracy: f64,
    /// Multimodal synthesis: held-out photos as image-only prompts (the checkpoint's
    /// defaults) whose drawing the judge labels as the photo's class, and the
    /// [photo, other class's text] examples.
    #[serde(default)]
    pub synthesis: synthesis::SynthesisFigures,
    /// Kept tokens / patches on held-out images.
    pub mean_kept_ratio: f64,
    /// Mean kept-token count per class.
    pub mean_tokens_per_class: Vec<f64>,
    /// What the selector keeps on the held-out photos, and where: the checkpoint's default
    /// selection through the pipeline (as `lavit serve` answers `/v1/tokenize`).
    #[serde(default)]
    pub selection: selection::SelectionFigures,
    /// The same for the arg-max and the sampled (Gumbel) selection, measured after stage 1.
    #[serde(default)]
    pub selection_modes: selection::ModeFigures,
    /// The checkpoint folder `lavit caption/generate/serve` load.
    pub checkpoint: PathBuf,
    /// Seconds per stage, in the order they finished (0 for a stage skipped as already done);
    /// stages that ran side by side overlap.
    pub seconds: Vec<(String, f64)>,
    /// The whole run, wall clock.
    #[serde(default)]
    pub wall_seconds: f64,
    /// The CPU, thread counts and libtorch build the run used.
    #[serde(default)]
    pub machine: machine::MachineInfo,
}

/// The resumable stage runner.
pub struct Stages {
    root: PathBuf,
    /// (stage, seconds) in the order the stages finished; shared by stages that run side by
    /// side.
    seconds: std::sync::Mutex<Vec<(String, f64)>>,
}

#[derive(Serialize, Deserialize)]
struct DoneMarker<T> {
    config: serde_json::Value,
    seconds: f64,
    summary: T,
}

impl Stages {
    pub fn new(out: &Path) -> Self {
        Self {
            root: out.join("stages"),
            seconds: Default::default(),
        }
    }

    /// (stage, seconds; 0 = resumed) in the order the stages finished.
    pub fn seconds(&self) -> Vec<(String, f64)> {
        self.seconds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record(&self, name: &str, seconds: f64) {
        self.seconds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.to_string(), seconds));
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Runs `f(dir)` unless `dir/done.json` holds a summary made with the same `config`; a
    /// stage that started but never finished is wiped and rerun.
    pub fn run<C: Serialize, T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        config: &C,
        f: impl FnOnce(&Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let dir = self.dir(name);
        let marker = dir.join("done.json");
        let config = serde_json::to_value(config)?;
        if let Ok(text) = lavit_runtime::fsread::read_config(&marker) {
            match serde_json::from_str::<DoneMarker<T>>(&text) {
                Ok(m) if m.config == config => {
                    tracing::info!(stage = name, "already done ({:.0} s), skipped", m.seconds);
                    self.record(name, 0.0);
                    return Ok(m.summary);
                }
                _ => tracing::info!(stage = name, "configuration changed, rerunning"),
            }
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| anyhow::anyhow!("clearing {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let start = Instant::now();
        let summary = f(&dir).map_err(|e| e.context(format!("demo stage `{name}`")))?;
        let seconds = start.elapsed().as_secs_f64();
        let m = DoneMarker {
            config,
            seconds,
            summary,
        };
        lavit_runtime::checkpoint::atomic_write(
            &marker,
            serde_json::to_string_pretty(&m)?.as_bytes(),
        )?;
        tracing::info!(stage = name, "finished in {seconds:.1} s");
        self.record(name, seconds);
        Ok(m.summary)
    }
}

/// Saves every variable of `vs` (keys as tch names them) as safetensors, atomically.
pub fn save_vs(vs: &nn::VarStore, path: &Path) -> anyhow::Result<()> {
    save_vs_filtered(vs, path, |_| true)
}

/// Saves the variables of `vs` whose name passes `keep`.
pub fn save_vs_filtered(
    vs: &nn::VarStore,
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let sd: lavit_runtime::checkpoint::StateDict = vs
        .variables()
        .into_iter()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k, v.detach()))
        .collect();
    lavit_runtime::checkpoint::save_safetensors(path, &sd, None)?;
    Ok(())
}

/// Loads a file written by [`save_vs`] into `vs`, strictly.
pub fn load_vs(vs: &mut nn::VarStore, path: &Path) -> anyhow::Result<()> {
    let sd = lavit_runtime::checkpoint::load_path(path)?;
    lavit_runtime::checkpoint::load_into(
        vs,
        "",
        &sd,
        &path.display().to_string(),
        &Default::default(),
    )?;
    Ok(())
}

/// The demo's train and held-out images.
pub struct DemoData {
    pub train: Split,
    pub eval: Split,
}

impl DemoData {
    pub fn load(dir: &Path, cfg: &DataConfig, seed: u64) -> anyhow::Result<Self> {
        let fm = FashionMnist::load(dir)?;
        let train = fm
            .train
            .select(&data::balanced_subset(&fm.train, cfg.train_per_class, seed));
        let eval = fm.test.select(&data::balanced_subset(
            &fm.test,
            cfg.eval_per_class,
            seed ^ 0xE5A1,
        ));
        tracing::info!(
            train = train.len(),
            held_out = eval.len(),
            "Fashion-MNIST loaded from {}",
            dir.display()
        );
        Ok(Self { train, eval })
    }
}

#[derive(Serialize, Deserialize)]
struct JudgeSummary {
    accuracy: f64,
    losses: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct Stage0Summary {
    accuracy: f64,
    losses: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct CurvesSummary {
    /// The stage's exported folder, when it has one.
    export: Option<PathBuf>,
    curves: Vec<(String, Vec<f64>)>,
}

#[derive(Serialize, Deserialize)]
struct Stage1Summary {
    export: PathBuf,
    curves: Vec<(String, Vec<f64>)>,
    /// What the trained selector keeps on the held-out photos, and where.
    selection: selection::ModeFigures,
}

/// Runs the demo end to end.
pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoSummary> {
    // Threads (measured on 2 cores): stage 0 (batches of 128 images × 49 patches) and the
    // evaluation (batched CFG decoding and sampling) run alone on every core — one thread made
    // them 1.6× slower. The other stages' ops are small: one intra-op thread each was as fast
    // as two (stage 1b) or faster (stage 1: 99 s against 124 s), so the pixel decoder trains
    // beside the LLM and then the judge, one thread each.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        (cores / 2).max(1)
    };
    let alone = opts.threads.max(cores) as i32;
    let started = Instant::now();
    let cfg = &opts.config;
    let size = cfg.tokenizer.img_size;
    anyhow::ensure!(
        size >= data::SIDE as i64 && size % cfg.tokenizer.patch_size == 0,
        "tokenizer.img_size {size} must be ≥ 28 and a multiple of patch_size"
    );
    let data = DemoData::load(&opts.data_dir, &cfg.data, cfg.seed)?;
    let manifest = stages::demo_manifest(&cfg.tokenizer, &cfg.feature_decoder, &cfg.eval);
    let st = Stages::new(&opts.out);

    // Stage 0: the EVA ViT learns features that name and draw the image, then is frozen.
    tch::set_num_threads(alone);
    // The default selection is an inference setting: stages 0 and 1 train the same way
    // whatever it is (stage 1 samples, and measures both selections), so it is no part of
    // their keys; stages 1b and 2 tokenize their data with it.
    let trained_tokenizer = lavit_runtime::manifest::TokenizerManifest {
        selection: Default::default(),
        selection_seed: 0,
        selection_note: None,
        ..cfg.tokenizer.clone()
    };
    let selection_key = (&cfg.tokenizer.selection, cfg.tokenizer.selection_seed);
    let key0 = (&cfg.stage0, &trained_tokenizer, &cfg.data, cfg.seed);
    let s0 = st.run("stage0", &key0, |dir| {
        let (accuracy, losses) = stages::run_stage0(
            &manifest,
            &cfg.stage0,
            &data.train,
            &data.eval,
            cfg.seed,
            dir,
        )?;
        tracing::info!(
            "stage 0: class head on frozen features, held-out accuracy {:.1} %",
            accuracy * 100.0
        );
        Ok(Stage0Summary { accuracy, losses })
    })?;
    // every thread started from here on (the stages' actor threads included) takes this
    tch::set_num_threads(threads as i32);
    let eva_file = stages::stage0_eva(&st.dir("stage0"));

    // Stage 1: the dynamic tokenizer on the frozen encoder.
    let key1 = (&key0, &cfg.stage1, &cfg.feature_decoder);
    let s1 = st.run("stage1", &key1, |dir| {
        let (export, curves) = stages::run_stage1(
            &manifest,
            &cfg.stage1,
            &eva_file,
            &data.train,
            cfg.seed,
            dir,
        )?;
        let tok = crate::tokenizer::VisualTokenizer::from_checkpoint(
            &export,
            tch::Device::Cpu,
            crate::tokenizer::LoadParts::tokenize_only(),
        )?;
        let selection = selection::measure(&tok, &data.eval, cfg.seed)?;
        tracing::info!(
            "stage 1 selection on held-out photos (arg-max | Gumbel): kept ratio {:.3} | {:.3}, on the garment {:.3} | {:.3} (chance {:.3}), Spearman(kept, garment) {:.2} | {:.2}, images with a mask of their own {:.3} | {:.3}",
            selection.argmax.mean_kept_ratio,
            selection.gumbel.mean_kept_ratio,
            selection.argmax.garment_share,
            selection.gumbel.garment_share,
            selection.argmax.garment_share_chance,
            selection.argmax.spearman_kept_garment,
            selection.gumbel.spearman_kept_garment,
            selection.argmax.own_mask_share,
            selection.gumbel.own_mask_share,
        );
        Ok(Stage1Summary {
            export,
            curves,
            selection,
        })
    })?;
    let tok_dir = s1.export.clone();
    if opts.stop_after.as_deref() == Some("stage1") {
        return Ok(DemoSummary {
            stage0_accuracy: s0.accuracy,
            selection_modes: s1.selection.clone(),
            seconds: st.seconds(),
            wall_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        });
    }

    // Stage 2 (the LLM on [image, text], [text, image] and [text]) beside stage 1b (the pixel
    // decoder on the tokenizer's reconstructions). Stage 1b draws from libtorch's generator
    // at every step, stage 2 only while drawing its initial weights: stage 1b starts once
    // that is done (or once stage 2 is skipped or failed, which drops the sender).
    let key1b = (&key1, &cfg.stage1b, selection_key);
    let key2 = (&key1, &cfg.llm, &cfg.stage2, selection_key);
    let (built_tx, built_rx) = std::sync::mpsc::channel::<()>();
    let (tok, train) = (&tok_dir, &data.train);
    // the judge's initial weights are drawn now: stage 1b holds the torch RNG turn until it
    // ends, and the judge trains (dropout from a Rust generator) while it runs
    let fresh_judge = Judge::new(&cfg.judge, cfg.seed);
    let (s1b, (s2, judged)) = std::thread::scope(|scope| {
        let llm = scope.spawn(|| {
            let s2 = st.run("stage2", &key2, move |dir| {
                let curves = stages::run_stage2(
                    tok,
                    &cfg.llm,
                    &cfg.stage2,
                    train,
                    cfg.seed,
                    dir,
                    Some(built_tx),
                )?;
                Ok(CurvesSummary {
                    export: Some(dir.to_path_buf()),
                    curves,
                })
            });
            // The independent judge: trained only on real training images, needed by the
            // evaluation alone.
            let judged = st.run("judge", &(&cfg.judge, &cfg.data, cfg.seed), |dir| {
                let mut j = fresh_judge;
                let losses = j.train(&cfg.judge, train, cfg.seed)?;
                j.save(&dir.join("judge.safetensors"))?;
                let accuracy = j.accuracy(&data.eval)?;
                tracing::info!(
                    "judge accuracy on held-out real images: {:.1} %",
                    accuracy * 100.0
                );
                Ok(JudgeSummary { accuracy, losses })
            });
            (s2, judged)
        });
        let _ = built_rx.recv();
        let s1b = st.run("stage1b", &key1b, |dir| {
            let loss = stages::run_stage1b(tok, &cfg.stage1b, train, cfg.seed, dir)?;
            Ok(CurvesSummary {
                export: Some(dir.to_path_buf()),
                curves: vec![("loss".into(), loss)],
            })
        });
        let rest = llm.join().unwrap_or_else(|_| {
            (
                Err(anyhow::anyhow!("demo stage `stage2` panicked")),
                Err(anyhow::anyhow!("demo stage `judge` panicked")),
            )
        });
        (s1b, rest)
    });
    let (s1b, s2, judged) = (s1b?, s2?, judged?);
    tch::set_num_threads(alone);

    // The checkpoint folder, official layout.
    let ckpt = opts.out.join("checkpoint");
    stages::assemble_checkpoint(
        &manifest,
        &tok_dir,
        &st.dir("stage1b"),
        &st.dir("stage2"),
        &ckpt,
    )?;
    tracing::info!("checkpoint folder: {}", ckpt.display());

    // Evaluation through the normal inference code.
    let judge = Judge::load(&cfg.judge, &st.dir("judge").join("judge.safetensors"))?;
    let reranker = stage0::Heads::load(
        cfg.tokenizer.encoder_width,
        cfg.tokenizer.patch_size,
        cfg.stage0.pool,
        &stages::stage0_heads(&st.dir("stage0")),
    )?;
    let key_eval = (&key1b, &key2, &cfg.eval);
    let ev = st.run("eval", &key_eval, |dir| {
        stages::evaluate(
            &ckpt, &cfg.eval, &data.eval, &judge, &reranker, cfg.seed, dir,
        )
    })?;

    // The held-out set in `lavit eval`'s formats (`OUT/eval-data`).
    eval_data::write(
        &data.eval,
        cfg.eval.images_per_class.max(1) as usize,
        Some(&st.dir("judge").join("judge.safetensors")),
        &opts.out.join("eval-data"),
    )?;

    let summary = DemoSummary {
        judge_accuracy: judged.accuracy,
        stage0_accuracy: s0.accuracy,
        caption_accuracy: ev.caption_accuracy,
        t2i_accuracy: ev.t2i_accuracy,
        t2i_accuracy_unranked: ev.t2i_accuracy_unranked,
        t2i_held_out_accuracy: ev.t2i_held_out_accuracy,
        reconstruction_accuracy: ev.reconstruction_accuracy,
        synthesis: ev.synthesis.clone(),
        mean_kept_ratio: ev.mean_kept_ratio,
        selection: ev.selection.clone(),
        selection_modes: s1.selection.clone(),
        mean_tokens_per_class: ev
            .token_counts
            .iter()
            .map(|v| v.iter().sum::<i64>() as f64 / v.len().max(1) as f64)
            .collect(),
        checkpoint: ckpt.clone(),
        seconds: st.seconds(),
        wall_seconds: started.elapsed().as_secs_f64(),
        machine: machine::MachineInfo::detect(alone, threads as i32),
    };
    let curves: Vec<(String, Vec<f64>)> = [
        ("judge".to_string(), judged.losses.clone()),
        ("stage 0 (ViT)".to_string(), s0.losses.clone()),
    ]
    .into_iter()
    .chain(
        s1.curves
            .iter()
            .map(|(k, v)| (format!("stage 1 (tokenizer) {k}"), v.clone())),
    )
    .chain(
        s1b.curves
            .iter()
            .map(|(k, v)| (format!("stage 1b (U-Net) {k}"), v.clone())),
    )
    .chain(
        s2.curves
            .iter()
            .map(|(k, v)| (format!("stage 2 (LLM) {k}"), v.clone())),
    )
    .collect();
    write_report(opts, &data, &summary, &ev, &st.dir("eval"), &curves)?;
    Ok(summary)
}
