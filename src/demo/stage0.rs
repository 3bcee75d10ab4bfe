//! Stage 0: give the vision backbone meaningful features, because no pretrained EVA-CLIP can be
//! downloaded here. The backbone (any [`Backbone`]; the demo uses the built-in EVA ViT at a tiny
//! size) is trained on the real training images with two heads that are thrown away afterwards:
//!
//! - a class head on the mean-pooled, layer-normalised patch features (cross-entropy against the
//!   Fashion-MNIST label — the role CLIP's image–text alignment plays for EVA-CLIP: features that
//!   name what is in the image), and
//! - a per-patch pixel head (a linear map from each patch feature to that patch's pixels, MSE), so
//!   the features also say what the image looks like, which the pixel decoder needs.
//!
//! Then the backbone is frozen, as EVA-CLIP is in the paper.

use lavit_plugin_api::Backbone;
use lavit_runtime::train::{AdamW, AdamWConfig, MetricsLog};
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::data::{to_model_input, to_pixel_space, Split};
use super::judge::{cosine_lr, Order};
use super::progress::Progress;

/// Budget and loss weights of stage 0.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stage0Config {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Weight of the per-patch pixel loss next to the class loss.
    pub pixel_weight: f64,
    /// How the class head pools the patch features (see [`Pool`]).
    pub pool: Pool,
}

/// How stage 0's class head summarises the patch features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// A learned score per patch, softmax over the patches, the weighted mean (attention
    /// pooling, as CLIP's image embedding is a pooled summary rather than every patch's
    /// average): the class evidence may sit on the garment's patches alone, so the
    /// background's features stay about the background.
    #[default]
    Attention,
    /// The plain mean of all patches: every patch, background included, is pushed to carry
    /// the class.
    Mean,
}

impl Default for Stage0Config {
    fn default() -> Self {
        Self {
            steps: 600,
            batch_size: 64,
            lr: 2e-3,
            weight_decay: 0.05,
            pixel_weight: 4.0,
            pool: Pool::Attention,
        }
    }
}

/// One logged step.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Stage0Row {
    pub step: usize,
    pub loss: f64,
    pub class_loss: f64,
    pub pixel_loss: f64,
    pub accuracy: f64,
}

/// The throw-away heads.
pub struct Heads {
    pub vs: nn::VarStore,
    norm: nn::LayerNorm,
    /// Attention pooling's per-patch score.
    score: nn::Linear,
    class: nn::Linear,
    pixel: nn::Linear,
    pool: Pool,
}

impl Heads {
    pub fn new(width: i64, patch: i64, pool: Pool) -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root();
        Self {
            norm: nn::layer_norm(&p / "norm", vec![width], Default::default()),
            score: nn::linear(&p / "score", width, 1, Default::default()),
            class: nn::linear(&p / "class", width, 10, Default::default()),
            pixel: nn::linear(&p / "pixel", width, patch * patch, Default::default()),
            pool,
            vs,
        }
    }

    /// Reads heads saved with [`super::save_vs`].
    pub fn load(
        width: i64,
        patch: i64,
        pool: Pool,
        path: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let mut h = Self::new(width, patch, pool);
        super::load_vs(&mut h.vs, path)?;
        Ok(h)
    }

    /// Class logits [B, 10] from patch features [B, N, C].
    pub fn class_logits(&self, feats: &Tensor) -> Tensor {
        let pooled = match self.pool {
            Pool::Mean => self.norm.forward(&feats.mean_dim(1, false, Kind::Float)),
            Pool::Attention => {
                let x = self.norm.forward(feats); // (B, N, C)
                let w = self.score.forward(&x).softmax(1, Kind::Float); // (B, N, 1)
                (x * w).sum_dim_intlist(1, false, Kind::Float) // (B, C)
            }
        };
        self.class.forward(&pooled)
    }
}

/// Patch pixels of padded images [B, 1, S, S] → [B, N, p*p] in raster order.
fn patch_pixels(x: &Tensor, patch: i64) -> Tensor {
    let (b, s) = (x.size()[0], x.size()[2]);
    let g = s / patch;
    x.view([b, g, patch, g, patch]) // (B, gy, py, gx, px)
        .permute([0, 1, 3, 2, 4]) // (B, gy, gx, py, px)
        .reshape([b, g * g, patch * patch])
}

/// Trains `backbone` (its [`Backbone::trainable_parameters`]) with the two heads on `train`;
/// with `metrics_dir`, logs `metrics.jsonl` and writes `metrics.html` / `loss.png` there.
pub fn pretrain(
    backbone: &dyn Backbone,
    cfg: &Stage0Config,
    train: &Split,
    seed: u64,
    metrics_dir: Option<&std::path::Path>,
) -> anyhow::Result<(Heads, Vec<Stage0Row>)> {
    let size = backbone.image_size();
    let patch = backbone.patch_size();
    let heads = {
        let _turn = lavit_runtime::train::torch_rng_turn(seed);
        Heads::new(backbone.width(), patch, cfg.pool)
    };
    let params = backbone.trainable_parameters();
    anyhow::ensure!(
        !params.is_empty(),
        "backbone {} has no trainable parameters",
        backbone.name()
    );
    let named: Vec<(String, Tensor)> = params
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("backbone.{i}"), t.shallow_clone()))
        .chain(
            heads
                .vs
                .variables()
                .into_iter()
                .map(|(k, t)| (format!("heads.{k}"), t)),
        )
        .collect();
    let mut opt = AdamW::new(
        named,
        AdamWConfig {
            beta2: 0.98,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut log = match metrics_dir {
        Some(d) => Some(MetricsLog::open(d, 0)?),
        None => None,
    };
    let mut order = Order::new(train.len(), seed);
    let mut rows = Vec::with_capacity(cfg.steps);
    let bar = Progress::new("stage0 ViT", cfg.steps as u64);
    for step in 0..cfg.steps {
        let idx = order.next_batch(cfg.batch_size);
        let unit = train.batch_unit(&idx);
        let feats = backbone.forward(&to_model_input(&unit, size))?; // (B, N, C)
        let labels = train.batch_labels(&idx);
        let logits = heads.class_logits(&feats);
        let class_loss = logits.cross_entropy_for_logits(&labels);
        let target = patch_pixels(&to_pixel_space(&unit, size), patch);
        let pixel_loss = heads
            .pixel
            .forward(&feats)
            .mse_loss(&target, tch::Reduction::Mean);
        let loss = &class_loss + &pixel_loss * cfg.pixel_weight;
        opt.zero_grad();
        loss.backward();
        opt.clip_grad_norm(1.0)?;
        opt.step(cosine_lr(cfg.lr, step, cfg.steps, cfg.steps / 10))?;
        let acc = logits
            .argmax(-1, false)
            .eq_tensor(&labels)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let row = Stage0Row {
            step,
            loss: loss.double_value(&[]),
            class_loss: class_loss.double_value(&[]),
            pixel_loss: pixel_loss.double_value(&[]),
            accuracy: acc,
        };
        bar.tick(format!("loss {:.3} acc {:.2}", row.loss, row.accuracy));
        if let Some(log) = log.as_mut() {
            log.log(
                step as i64,
                &[
                    ("loss", row.loss),
                    ("class_loss", row.class_loss),
                    ("pixel_loss", row.pixel_loss),
                    ("accuracy", row.accuracy),
                ],
            )?;
        }
        rows.push(row);
    }
    bar.finish();
    if let Some(log) = log.as_ref() {
        log.write_report("stage 0: backbone pretraining")?;
    }
    Ok((heads, rows))
}

/// Linear-probe style check of the frozen features: accuracy of the stage-0 class head on `split`.
pub fn head_accuracy(backbone: &dyn Backbone, heads: &Heads, split: &Split) -> anyhow::Result<f64> {
    let size = backbone.image_size();
    let mut ok = 0usize;
    tch::no_grad(|| -> anyhow::Result<()> {
        let all: Vec<usize> = (0..split.len()).collect();
        for chunk in all.chunks(256) {
            let feats = backbone.forward(&to_model_input(&split.batch_unit(chunk), size))?;
            let pred = heads.class_logits(&feats).argmax(-1, false);
            ok += pred
                .eq_tensor(&split.batch_labels(chunk))
                .sum(Kind::Int64)
                .int64_value(&[]) as usize;
        }
        Ok(())
    })?;
    Ok(ok as f64 / split.len().max(1) as f64)
}
