//! The one training loop. Every trainer (stage 1 tokenizer, stage 1b pixel decoder, stage 2
//! LLM, the demo's) is a [`TrainJob`] — the data and the forward passes of one step — run by
//! [`drive`] over the same stage graph that serves the model. The driver owns everything
//! else:
//!
//! - resume from the newest committed checkpoint (every trained stage's
//!   `Trainable::train_state`, one folder per step, written atomically by rank 0 only);
//! - the learning-rate schedule, the NaN policy ([`NanGuard`]) and the per-step randomness
//!   ([`StepRng`]: everything random in a step is a function of `(seed, step)`);
//! - data parallelism over a c10d [`ProcessGroup`]: trained parameters broadcast from rank 0
//!   before the first step, gradients averaged in ~25 MB buckets after the backward passes,
//!   the NaN guard deciding on the mean loss every rank shares, metrics averaged over ranks,
//!   logs, progress and checkpoints from rank 0, a barrier before returning;
//! - optional global gradient clipping across every trained stage (`grad_clip`), or the
//!   stages' own clipping inside their optimiser step;
//! - the optimiser step of every trained stage, in a fixed order, under [`StepControl`];
//! - metrics (`metrics.jsonl`, HTML/PNG curves) and the progress bar.
//!
//! With world size 1 every collective is the identity, so a one-process run is exactly the
//! loop it always was.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::{Kind, Tensor};

use super::{
    Checkpointer, LrSchedule, MetricsLog, NanGuard, StepRng, StepVerdict, TrainProgress, TrainState,
};
use crate::actors::StageGraph;
use crate::checkpoint::StateDict;
use crate::dist::{self, GradSync, ProcessGroup};
use crate::messages::{StepControl, TrainBatch};
use crate::stage::StageKind;
use crate::{Error, Result};

/// What the driver does around a job.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Name of the run in the progress bar and the report's title.
    pub name: String,
    /// Metrics and `checkpoints/` go here.
    pub out_dir: PathBuf,
    /// The stages whose optimisers step (in this order), whose state the checkpoints hold.
    pub stages: Vec<StageKind>,
    /// Learning rate per step.
    pub schedule: LrSchedule,
    /// Steps of the whole run (the progress bar's length).
    pub steps: i64,
    /// This call stops at this step (≤ `steps`; a later call resumes).
    pub end: i64,
    /// At most this many steps in this call, counted from where it resumed (0: no limit).
    pub run_steps: i64,
    /// A checkpoint every this many steps, and at `end`.
    pub save_every: i64,
    /// Committed checkpoints kept.
    pub keep: usize,
    /// Consecutive non-finite steps before the run stops.
    pub max_nan_steps: usize,
    /// Progress refresh cadence (steps).
    pub log_every: u64,
    /// Seed of the run (`TrainState::seed` of a fresh run).
    pub seed: u64,
    /// Resume from the newest committed checkpoint under `out_dir/checkpoints`.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Clip the global L2 norm of every trained stage's gradients to this (summed in name
    /// order, after averaging over ranks); 0: no clipping by the driver (a stage may clip
    /// its own gradients in its optimiser step).
    pub grad_clip: f64,
    /// The job draws from libtorch's global generator: reseed it from `(seed, step)` before
    /// every step. `false` leaves it alone, so a job that draws nothing from it can run
    /// beside one that does in the same process (the demo trains the LLM while the pixel
    /// decoder, which holds `torch_rng_turn`, draws its noise).
    pub torch_rng: bool,
}

impl DriverConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("training run `{}`: {m}", self.name)));
        if self.stages.is_empty() {
            return bad("no stage to train".into());
        }
        if self.steps < 0 || self.end < 0 || self.end > self.steps {
            return bad(format!(
                "steps {} and stop step {} must satisfy 0 ≤ stop ≤ steps",
                self.steps, self.end
            ));
        }
        if self.run_steps < 0 {
            return bad(format!("run_steps {} must be ≥ 0", self.run_steps));
        }
        if self.save_every < 1 || self.keep < 1 {
            return bad("save_every and keep must be ≥ 1".into());
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return bad(format!("grad_clip {} must be ≥ 0", self.grad_clip));
        }
        self.schedule.validate(&self.name, "schedule")
    }
}

/// One step of a job: its forward and backward passes through the graph.
pub struct Step<'a> {
    pub graph: &'a StageGraph,
    /// The run's data-parallel group (world size 1 without one).
    pub pg: &'a ProcessGroup,
    /// The step's index (0-based).
    pub step: i64,
    /// The step's learning rate.
    pub lr: f64,
    /// The step's seed (with `DriverConfig::torch_rng`, libtorch's generator was reseeded from
    /// it).
    pub seed: u64,
    /// The run's state; a job advances `epoch` and `data_cursor` here.
    pub state: &'a mut TrainState,
    loss: f64,
    finite: bool,
}

impl Step<'_> {
    /// Forward a training batch along its route.
    pub async fn forward(&self, batch: TrainBatch) -> Result<TrainBatch> {
        self.graph.train_forward(batch).await.map_err(Error::from)
    }

    /// Backward from `loss` on `stage` (the stage whose device holds it), adding its value to
    /// the step's loss. A non-finite loss is not propagated (it would poison the gradients);
    /// the step's loss becomes non-finite and the NaN guard decides.
    pub async fn backward(&mut self, stage: StageKind, loss: Tensor) -> Result<f64> {
        let v = loss
            .f_double_value(&[])
            .map_err(|e| Error::invalid(format!("the step's loss is not a scalar: {e}")))?;
        self.loss += v;
        if !v.is_finite() {
            self.finite = false;
        }
        if self.finite {
            self.graph
                .backward(stage, loss)
                .await
                .map_err(Error::from)?;
        }
        Ok(v)
    }

    /// Count a loss that has no gradient on this rank (e.g. an empty shard) in the step's
    /// loss.
    pub fn add_loss(&mut self, v: f64) {
        self.loss += v;
        if !v.is_finite() {
            self.finite = false;
        }
    }

    /// `rows` of a global batch of `rows × world` rows: this rank's range.
    pub fn shard(&self, rows: usize) -> std::ops::Range<usize> {
        let r = self.pg.rank();
        r * rows..(r + 1) * rows
    }
}

/// What a step measured (averaged over ranks by the driver, then logged).
pub type Metrics = Vec<(&'static str, f64)>;

/// A training job: the data and the forward passes of a step; the driver does the rest.
pub trait TrainJob {
    /// Once before the first step of this call (after resume, after the broadcast).
    fn start(&mut self, _g: &StageGraph, _state: &TrainState) -> impl Future<Output = Result<()>> {
        async { Ok(()) }
    }
    /// The forward and backward passes of one step (`Step::forward`, `Step::backward`) on
    /// this rank's share of the step's global batch. Returns what to log beside the loss.
    fn step(&mut self, s: &mut Step<'_>) -> impl Future<Output = Result<Metrics>>;
    /// After step `done − 1` was applied (e.g. sample images every k steps; rank 0 only).
    fn after_step(&mut self, _g: &StageGraph, _done: i64) -> impl Future<Output = Result<()>> {
        async { Ok(()) }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct DriveOutcome {
    /// The state at the end (step reached, data cursor, NaN counts).
    pub state: TrainState,
    /// Step this call started at (after resume).
    pub start_step: i64,
    /// The loss of every step of this call (the mean over ranks).
    pub losses: Vec<f64>,
    /// The newest checkpoint this call wrote (rank 0).
    pub checkpoint: Option<PathBuf>,
    /// Every logged record of the run (rank 0; resumed runs include earlier steps).
    pub records: Vec<(i64, Vec<(String, f64)>)>,
    /// Seconds spent in collectives (gradient averaging, metrics) and in the whole loop.
    pub comm_seconds: f64,
    pub loop_seconds: f64,
}

/// Every trained stage's training state, for a checkpoint (part names must be unique).
async fn collect_state(g: &StageGraph, stages: &[StageKind]) -> Result<Vec<(String, StateDict)>> {
    let mut parts: Vec<(String, StateDict)> = Vec::new();
    for &k in stages {
        for (name, sd) in g.train_state(k).await.map_err(Error::from)? {
            if parts.iter().any(|(n, _)| *n == name) {
                return Err(Error::invalid(format!(
                    "stage {k}: training part `{name}` is also another stage's"
                )));
            }
            parts.push((name, sd));
        }
    }
    Ok(parts)
}

async fn save(
    g: &StageGraph,
    stages: &[StageKind],
    ck: &Checkpointer,
    state: &TrainState,
) -> Result<PathBuf> {
    let parts = collect_state(g, stages).await?;
    let named: Vec<(&str, &StateDict)> = parts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    ck.save(state, &named)
}

/// Resume every trained stage from the newest committed checkpoint.
async fn resume(
    g: &StageGraph,
    stages: &[StageKind],
    ck: &Checkpointer,
) -> Result<Option<TrainState>> {
    let Some(path) = ck.latest()? else {
        return Ok(None);
    };
    let mut loaded = super::load(&path)?;
    for &k in stages {
        let names: Vec<String> = g
            .train_state(k)
            .await
            .map_err(Error::from)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut parts = Vec::new();
        for n in names {
            parts.push((n.clone(), loaded.take(&n)?));
        }
        g.load_train_state(k, parts).await.map_err(|e| {
            Error::invalid(format!("resuming {} into stage {k}: {e}", path.display()))
        })?;
    }
    tracing::info!(step = loaded.state.step, path = %path.display(), "resumed");
    Ok(Some(loaded.state))
}

/// The trained parameters of every stage, sorted by name (the order of the global norm).
async fn trained_params(g: &StageGraph, stages: &[StageKind]) -> Result<Vec<(String, Tensor)>> {
    let mut all = Vec::new();
    for &k in stages {
        all.extend(g.trained_params(k).await.map_err(Error::from)?);
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for w in all.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::invalid(format!(
                "two trained stages name a parameter `{}`",
                w[0].0
            )));
        }
    }
    Ok(all)
}

/// Scale every gradient of `params` so that their global L2 norm is at most `max_norm`
/// (torch's `clip_grad_norm_`; the squares summed in `params`' order, in double). Returns
/// the norm before clipping.
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let c = |e: tch::TchError| Error::invalid(format!("gradient clipping: {e}"));
    let mut sq = 0f64;
    for (_, p) in params {
        let g = p.grad();
        if g.defined() {
            // Contiguous first: the sum's order must not depend on the gradient's layout
            // (a resumed run's accumulated gradient may differ from a fresh one's).
            sq += g
                .f_contiguous()
                .and_then(|g| g.f_to_kind(Kind::Double))
                .and_then(|g| g.f_square())
                .and_then(|g| g.f_sum(Kind::Double))
                .and_then(|g| g.f_double_value(&[]))
                .map_err(c)?;
        }
    }
    let norm = sq.sqrt();
    if norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (_, p) in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(coef).map_err(c)?;
                }
            }
        }
    }
    Ok(norm)
}

/// Run `job` on `g` under `cfg`, data-parallel over `pg`.
pub async fn drive<J: TrainJob>(
    g: &StageGraph,
    pg: &Arc<ProcessGroup>,
    cfg: &DriverConfig,
    job: &mut J,
) -> Result<DriveOutcome> {
    cfg.validate()?;
    let rank0 = pg.is_rank0();
    let ck = Checkpointer::new(checkpoint_dir(&cfg.out_dir), cfg.keep)?;
    let mut state = TrainState {
        seed: cfg.seed,
        ..Default::default()
    };
    if cfg.resume {
        if let Some(s) = resume(g, &cfg.stages, &ck).await? {
            state = s;
        }
    }
    let start_step = state.step;
    let end = if cfg.run_steps > 0 {
        cfg.end.min(start_step.saturating_add(cfg.run_steps))
    } else {
        cfg.end
    };
    // Every rank starts from rank 0's parameters (they match already when every rank built
    // from the same seed or resumed from the same checkpoint; this makes it so).
    let params = trained_params(g, &cfg.stages).await?;
    for &k in &cfg.stages {
        g.set_process_group(k, pg.clone())
            .await
            .map_err(Error::from)?;
    }
    dist::broadcast_named(pg, &params)?;
    let shallow = params
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let grads = GradSync::new(pg, shallow, dist::DEFAULT_BUCKET_BYTES)?;
    job.start(g, &state).await?;

    let rng = StepRng::new(state.seed);
    let mut guard =
        NanGuard::new(cfg.max_nan_steps).with_counts(state.consecutive_skips, state.skipped_total);
    let mut log = if rank0 {
        Some(MetricsLog::open(&cfg.out_dir, state.step)?)
    } else {
        None
    };
    let bar = (rank0 && cfg.progress).then(|| {
        TrainProgress::new(
            &cfg.name,
            cfg.steps.max(0) as u64,
            state.step.max(0) as u64,
            cfg.log_every.max(1),
        )
    });
    let mut losses = Vec::new();
    let mut checkpoint = None;
    let comm_before = pg.stats().seconds;
    let t0 = Instant::now();
    g.set_train(true);
    while state.step < end {
        let step = state.step;
        let seed = if cfg.torch_rng {
            rng.begin_step(step)
        } else {
            rng.seed_for(step)
        };
        let lr = cfg.schedule.lr_at(step);
        let (local, metrics) = {
            let mut s = Step {
                graph: g,
                pg,
                step,
                lr,
                seed,
                state: &mut state,
                loss: 0.0,
                finite: true,
            };
            let metrics = job.step(&mut s).await?;
            let local = if s.finite { s.loss } else { f64::NAN };
            (local, metrics)
        };
        // One collective for the loss and the metrics: their means over ranks.
        let mut vals: Vec<f64> = vec![local];
        vals.extend(metrics.iter().map(|(_, v)| *v));
        let vals = dist::mean_scalars(pg, &vals)?;
        let loss = vals[0];
        let verdict = guard.observe(step, loss);
        if verdict == StepVerdict::Stop {
            let p = if rank0 {
                Some(save(g, &cfg.stages, &ck, &state).await?)
            } else {
                None
            };
            return Err(guard.stop_error(step, p));
        }
        let apply = verdict == StepVerdict::Apply;
        let mut grad_norm = None;
        if apply {
            grads.average(pg)?;
            if cfg.grad_clip > 0.0 {
                grad_norm = Some(clip_grad_norm(&params, cfg.grad_clip)?);
            }
        }
        let ctl = StepControl { lr, apply, step };
        for &k in &cfg.stages {
            let r = g.optimizer_step_with(k, ctl).await.map_err(Error::from)?;
            grad_norm = grad_norm.or(r.grad_norm);
        }
        state.step += 1;
        (state.consecutive_skips, state.skipped_total) =
            (guard.consecutive(), guard.skipped_total());
        losses.push(loss);
        let mut rec: Vec<(&str, f64)> = vec![("loss", loss), ("lr", lr)];
        rec.extend(
            metrics
                .iter()
                .map(|(k, _)| *k)
                .zip(vals[1..].iter().copied()),
        );
        if let Some(n) = grad_norm {
            rec.push(("grad_norm", n));
        }
        if let Some(log) = log.as_mut() {
            log.log(step, &rec)?;
        }
        if let Some(b) = &bar {
            // The loss and the job's first metrics (the learning rate is in the log).
            let shown: Vec<(&str, f64)> = rec
                .iter()
                .filter(|(k, _)| *k != "lr")
                .take(4)
                .copied()
                .collect();
            b.step(step as u64, &shown);
        }
        if rank0 && (state.step % cfg.save_every == 0 || state.step == end) {
            checkpoint = Some(save(g, &cfg.stages, &ck, &state).await?);
        }
        if rank0 {
            job.after_step(g, state.step).await?;
        }
    }
    g.set_train(false);
    let loop_seconds = t0.elapsed().as_secs_f64();
    if let Some(b) = &bar {
        b.finish();
    }
    let records = match log.as_ref() {
        Some(log) => {
            log.write_report(&cfg.name)?;
            log.records()
                .iter()
                .map(|(s, v)| (*s, v.iter().map(|(k, x)| (k.clone(), *x)).collect()))
                .collect()
        }
        None => Vec::new(),
    };
    // Nobody leaves before rank 0 has written the last checkpoint.
    pg.barrier()?;
    Ok(DriveOutcome {
        state,
        start_step,
        losses,
        checkpoint,
        records,
        comm_seconds: pg.stats().seconds - comm_before,
        loop_seconds,
    })
}

/// The driver's checkpoint folder under `out_dir`.
pub fn checkpoint_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}
