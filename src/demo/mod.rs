//! `lavit demo`: trains the whole LaVIT pipeline on Fashion-MNIST on a CPU, then captions and
//! draws through the normal inference code, and writes a report (HTML + PNGs) and a checkpoint
//! folder in the official LaVIT layout.
//!
//! Each stage writes its outputs to `OUT/stages/<name>/` and, last, a `done.json` marker holding
//! its summary and the configuration it ran with; a rerun skips every stage whose marker matches
//! the current configuration, so an interrupted demo resumes where it stopped.

pub mod data;
pub mod judge;
pub mod progress;
pub mod report;
pub mod stage0;
pub mod vocab;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tch::nn;

use data::{FashionMnist, Split};
use judge::{Judge, JudgeConfig};
use stage0::Stage0Config;

/// The demo's data sizes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training images per class (from the official training file).
    pub train_per_class: usize,
    /// Held-out images per class (from the official test file; no stage trains on them).
    pub eval_per_class: usize,
    /// Side of the tokenizer and pixel-decoder input (28 px images are zero-padded up to it).
    pub image_size: i64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train_per_class: 2000,
            eval_per_class: 100,
            image_size: 32,
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
    pub stage0: Stage0Config,
}

impl DemoConfig {
    /// `configs/demo.toml` (compiled in, so the binary runs from any folder).
    pub fn full() -> Self {
        Self::parse(include_str!("../../configs/demo.toml"), "configs/demo.toml")
            .expect("configs/demo.toml is valid")
    }

    /// `configs/demo-quick.toml`: the CI-sized run.
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

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
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
    /// Torch intra-op threads (0 = libtorch's default).
    pub threads: usize,
}

/// The numbers the demo measured (also written to `report/metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct DemoSummary {
    /// The judge's accuracy on real held-out images.
    pub judge_accuracy: f64,
    /// Stage 0's class head on frozen features of held-out images.
    pub stage0_accuracy: Option<f64>,
    /// Seconds per stage, in run order (0 for a stage skipped as already done).
    pub seconds: Vec<(String, f64)>,
}

/// The resumable stage runner.
pub struct Stages {
    root: PathBuf,
    pub seconds: Vec<(String, f64)>,
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
            seconds: Vec::new(),
        }
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Runs `f(dir)` unless `dir/done.json` holds a summary made with the same `config`; a
    /// stage that started but never finished is wiped and rerun.
    pub fn run<C: Serialize, T: Serialize + DeserializeOwned>(
        &mut self,
        name: &str,
        config: &C,
        f: impl FnOnce(&Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let dir = self.dir(name);
        let marker = dir.join("done.json");
        let config = serde_json::to_value(config)?;
        if let Ok(text) = std::fs::read_to_string(&marker) {
            match serde_json::from_str::<DoneMarker<T>>(&text) {
                Ok(m) if m.config == config => {
                    tracing::info!(stage = name, "already done ({:.0} s), skipped", m.seconds);
                    self.seconds.push((name.to_string(), 0.0));
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
        self.seconds.push((name.to_string(), seconds));
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

/// Runs the demo end to end.
pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoSummary> {
    if opts.threads > 0 {
        tch::set_num_threads(opts.threads as i32);
    }
    let cfg = &opts.config;
    let data = DemoData::load(&opts.data_dir, &cfg.data, cfg.seed)?;
    let mut stages = Stages::new(&opts.out);

    // The independent judge: trained only on real training images.
    let judge_cfg = (&cfg.judge, &cfg.data, cfg.seed);
    let judged = stages.run("judge", &judge_cfg, |dir| {
        let mut j = Judge::new(&cfg.judge);
        let losses = j.train(&cfg.judge, &data.train, cfg.seed);
        j.save(&dir.join("judge.safetensors"))?;
        let accuracy = j.accuracy(&data.eval);
        tracing::info!(
            "judge accuracy on held-out real images: {:.1} %",
            accuracy * 100.0
        );
        Ok(JudgeSummary { accuracy, losses })
    })?;

    let mut summary = DemoSummary {
        judge_accuracy: judged.accuracy,
        ..Default::default()
    };
    summary.seconds = stages.seconds.clone();
    write_report(opts, &data, &summary, &[("judge", &judged.losses)])?;
    Ok(summary)
}

/// Writes `OUT/report/index.html`, its PNGs and `metrics.json`.
fn write_report(
    opts: &DemoOptions,
    data: &DemoData,
    summary: &DemoSummary,
    curves: &[(&str, &Vec<f64>)],
) -> anyhow::Result<()> {
    let dir = opts.out.join("report");
    std::fs::create_dir_all(&dir)?;
    let mut html = report::Html::default();
    html.p(&format!(
        "Fashion-MNIST: {} training images, {} held-out images (never trained on).",
        data.train.len(),
        data.eval.len()
    ));
    html.h2("Results");
    html.table(&[
        vec!["measure".into(), "value".into()],
        vec![
            "judge accuracy on real held-out images".into(),
            format!("{:.1} %", summary.judge_accuracy * 100.0),
        ],
    ]);
    html.h2("Held-out images");
    let idx: Vec<usize> = (0..data.eval.len().min(40)).collect();
    report::write_grid(
        &dir.join("held_out.png"),
        &data.eval.batch_unit(&idx),
        10,
        2,
    )?;
    html.img("held_out.png", "held-out images");
    html.h2("Loss curves");
    for (name, losses) in curves {
        let pts: Vec<(f64, f64)> = losses
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as f64, l))
            .collect();
        let w = (losses.len() / 30).max(1);
        html.raw(&report::svg_lines(
            name,
            "step",
            &[report::Series {
                name: format!("loss (moving average of {w})"),
                points: report::smooth(&pts, w),
            }],
            520.0,
            240.0,
        ));
    }
    html.h2("Timings");
    let mut rows = vec![vec!["stage".to_string(), "seconds".to_string()]];
    rows.extend(
        summary
            .seconds
            .iter()
            .map(|(n, s)| vec![n.clone(), format!("{s:.1}")]),
    );
    html.table(&rows);
    html.write(
        &dir.join("index.html"),
        "lavit demo: LaVIT trained on Fashion-MNIST",
    )?;
    lavit_runtime::checkpoint::atomic_write(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    tracing::info!("report written to {}", dir.join("index.html").display());
    Ok(())
}
