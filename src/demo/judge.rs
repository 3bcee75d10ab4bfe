//! The independent judge: a small CNN (two conv–ReLU–max-pool blocks, two linear layers, in the
//! spirit of LeNet-5, LeCun et al. 1998) trained only on the real training images of the split,
//! never on anything a LaVIT stage produced. It labels held-out images (its own accuracy goes
//! into the report) and generated images (text→image accuracy).

use std::path::Path;

use anyhow::Context;
use lavit_runtime::train::{torch_rng_turn, StepRng};
use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};

use super::data::{Split, SplitMix64};
use super::progress::Progress;

/// Judge sizes and training budget.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// Channels of the two conv blocks.
    pub channels: (i64, i64),
    /// Width of the hidden linear layer.
    pub hidden: i64,
    /// Optimiser steps.
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            channels: (16, 32),
            hidden: 128,
            steps: 1200,
            batch_size: 64,
            lr: 2e-3,
        }
    }
}

/// The CNN; input [B, 1, 28, 28] in [0, 1].
pub struct Judge {
    pub vs: nn::VarStore,
    body: nn::Sequential,
    head: nn::Linear,
}

/// Most channels of a judge's conv blocks read from a file.
pub const MAX_JUDGE_CHANNELS: i64 = 1024;
/// Most hidden units of a judge read from a file.
pub const MAX_JUDGE_HIDDEN: i64 = 1 << 16;

/// Dropout rate before the last layer while training.
const DROPOUT: f64 = 0.25;

impl Judge {
    /// A judge with fresh weights drawn from `seed` (under the torch RNG turn, so a stage
    /// training beside it does not change them).
    pub fn new(cfg: &JudgeConfig, seed: u64) -> Self {
        let _turn = torch_rng_turn(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root();
        let (c1, c2) = cfg.channels;
        let conv = |()| nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let body = nn::seq()
            .add(nn::conv2d(&p / "conv1", 1, c1, 3, conv(())))
            .add_fn(|x| x.relu().max_pool2d_default(2)) // (B, c1, 14, 14)
            .add(nn::conv2d(&p / "conv2", c1, c2, 3, conv(())))
            .add_fn(|x| x.relu().max_pool2d_default(2)) // (B, c2, 7, 7)
            .add_fn(|x| x.flatten(1, -1))
            .add(nn::linear(
                &p / "fc1",
                c2 * 49,
                cfg.hidden,
                Default::default(),
            ))
            .add_fn(|x| x.relu());
        let head = nn::linear(&p / "fc2", cfg.hidden, 10, Default::default());
        Self { vs, body, head }
    }

    /// Logits [B, 10]; with `dropout_seed`, training-time dropout whose mask comes from that
    /// seed (a Rust generator: the judge can train beside another stage without sharing
    /// libtorch's).
    pub fn logits(&self, x: &Tensor, dropout_seed: Option<u64>) -> Tensor {
        let h = self.body.forward(x);
        let h = match dropout_seed {
            Some(seed) => {
                let mut rng = SplitMix64(seed);
                let keep: Vec<f32> = (0..h.numel())
                    .map(|_| {
                        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                        if u >= DROPOUT {
                            (1.0 / (1.0 - DROPOUT)) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_slice(&keep).view(h.size().as_slice());
                h * mask
            }
            None => h,
        };
        self.head.forward(&h)
    }

    /// Trains on `train` (real images only) and returns the loss per step.
    pub fn train(
        &mut self,
        cfg: &JudgeConfig,
        train: &Split,
        seed: u64,
    ) -> anyhow::Result<Vec<f64>> {
        let mut opt = nn::Adam::default()
            .build(&self.vs, cfg.lr)
            .context("judge: building the Adam optimiser")?;
        let dropout = StepRng::new(seed);
        let mut order = Order::new(train.len(), seed);
        let mut losses = Vec::with_capacity(cfg.steps);
        let bar = Progress::new("judge", cfg.steps as u64);
        for step in 0..cfg.steps {
            let lr = cosine_lr(cfg.lr, step, cfg.steps, cfg.steps / 20);
            opt.set_lr(lr);
            let idx = order.next_batch(cfg.batch_size);
            let x = train.batch_unit(&idx);
            // light augmentation: a random 1-px shift keeps the judge from memorising
            let (dx, dy) = ((step % 3) as i64 - 1, ((step / 3) % 3) as i64 - 1);
            let x = x.roll([dx, dy], [2, 3]);
            let loss = self
                .logits(&x, Some(dropout.seed_for(step as i64)))
                .cross_entropy_for_logits(&train.batch_labels(&idx));
            opt.backward_step(&loss);
            let l = loss.double_value(&[]);
            losses.push(l);
            bar.tick(format!("loss {l:.3}"));
        }
        bar.finish();
        Ok(losses)
    }

    /// The hidden layer (after `fc1` and ReLU) of [B, 1, 28, 28] images in [0, 1]: [B, hidden],
    /// the embedding `lavit eval` computes FID over.
    pub fn features(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let parts: Vec<Tensor> = x
                .split(512, 0)
                .iter()
                .map(|c| self.body.forward(c))
                .collect();
            Tensor::cat(&parts, 0)
        })
    }

    /// Predicted classes of [B, 1, 28, 28] images in [0, 1].
    pub fn predict(&self, x: &Tensor) -> anyhow::Result<Vec<usize>> {
        tch::no_grad(|| {
            let mut out = Vec::with_capacity(x.size()[0] as usize);
            for chunk in x.split(512, 0) {
                let p = self.logits(&chunk, None).argmax(-1, false);
                out.extend(
                    Vec::<i64>::try_from(&p)
                        .context("judge: reading the predicted classes")?
                        .into_iter()
                        .map(|v| v as usize),
                );
            }
            Ok(out)
        })
    }

    /// Accuracy on a split.
    pub fn accuracy(&self, split: &Split) -> anyhow::Result<f64> {
        let idx: Vec<usize> = (0..split.len()).collect();
        let pred = self.predict(&split.batch_unit(&idx))?;
        let ok = pred
            .iter()
            .zip(&split.labels)
            .filter(|(p, l)| **p == **l as usize)
            .count();
        Ok(ok as f64 / split.len().max(1) as f64)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        super::save_vs(&self.vs, path)
    }

    /// Loads a judge file whose sizes are read from its tensors (`conv1.weight`
    /// [c1, 1, 3, 3], `conv2.weight` [c2, c1, 3, 3], `fc1.weight` [hidden, c2·49],
    /// `fc2.weight` [10, hidden]). Every size is bounded ([`MAX_JUDGE_CHANNELS`],
    /// [`MAX_JUDGE_HIDDEN`]) and every tensor's whole shape checked against the layout
    /// before the judge is built, so a file cannot make it allocate more than it holds.
    pub fn load_file(path: &Path) -> anyhow::Result<Self> {
        let sd = lavit_runtime::checkpoint::load_path(path)?;
        let shape = |key: &str| -> anyhow::Result<Vec<i64>> {
            sd.get(key).map(|t| t.size()).ok_or_else(|| {
                anyhow::anyhow!("{}: no `{key}` tensor (not a judge file)", path.display())
            })
        };
        let first = |key: &str, cap: i64| -> anyhow::Result<i64> {
            let s = shape(key)?;
            match s.first() {
                Some(&d) if (1..=cap).contains(&d) => Ok(d),
                _ => anyhow::bail!(
                    "{}: `{key}` has shape {s:?}; its first size must be in 1..={cap}",
                    path.display()
                ),
            }
        };
        let c1 = first("conv1.weight", MAX_JUDGE_CHANNELS)?;
        let c2 = first("conv2.weight", MAX_JUDGE_CHANNELS)?;
        let hidden = first("fc1.weight", MAX_JUDGE_HIDDEN)?;
        for (key, want) in [
            ("conv1.weight", vec![c1, 1, 3, 3]),
            ("conv1.bias", vec![c1]),
            ("conv2.weight", vec![c2, c1, 3, 3]),
            ("conv2.bias", vec![c2]),
            ("fc1.weight", vec![hidden, c2 * 49]),
            ("fc1.bias", vec![hidden]),
            ("fc2.weight", vec![10, hidden]),
            ("fc2.bias", vec![10]),
        ] {
            let got = shape(key)?;
            anyhow::ensure!(
                got == want,
                "{}: `{key}` has shape {got:?}, the judge layout needs {want:?}",
                path.display()
            );
        }
        let cfg = JudgeConfig {
            channels: (c1, c2),
            hidden,
            ..Default::default()
        };
        Self::load(&cfg, path)
    }

    pub fn load(cfg: &JudgeConfig, path: &Path) -> anyhow::Result<Self> {
        let mut j = Self::new(cfg, 0);
        super::load_vs(&mut j.vs, path)?;
        Ok(j)
    }
}

/// Epoch-wise shuffled batches over `n` items.
pub struct Order {
    perm: Vec<usize>,
    pos: usize,
    seed: u64,
}

impl Order {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut perm: Vec<usize> = (0..n).collect();
        super::data::shuffle(&mut perm, seed);
        Self { perm, pos: 0, seed }
    }

    pub fn next_batch(&mut self, b: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(b);
        while out.len() < b {
            if self.pos == self.perm.len() {
                self.seed = self.seed.wrapping_add(1);
                super::data::shuffle(&mut self.perm, self.seed);
                self.pos = 0;
            }
            out.push(self.perm[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// Linear warm-up then cosine decay to 10 % of `base`.
pub fn cosine_lr(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// Mean of a float tensor as f64.
pub fn mean_f64(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).mean(Kind::Double).double_value(&[])
}
