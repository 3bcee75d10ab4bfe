//! Training infrastructure shared by every trainer (stage-1 tokenizer, stage-2 LLM, pixel
//! decoder, demo): the one training loop ([`drive`], see [`driver`]) that runs a
//! [`TrainJob`] over the stage graph, AdamW with savable state, learning-rate schedules,
//! atomic checkpoints with exact resume, the NaN/Inf policy, a metrics log with HTML/PNG
//! curves, and a progress bar.
//!
//! A trainer is its data and the forward passes of one step:
//! ```ignore
//! struct MyJob { data: Vec<Tensor> }
//! impl TrainJob for MyJob {
//!     async fn step(&mut self, s: &mut Step<'_>) -> Result<Metrics> {
//!         let mut b = TrainBatch::new(vec![StageKind::Decoder]);
//!         b.tensors.insert(keys::IMAGES, self.data[s.step as usize % self.data.len()].shallow_clone());
//!         let mut out = s.forward(b).await?;
//!         s.backward(StageKind::Decoder, out.take_loss(keys::LOSS, StageKind::Decoder)?).await?;
//!         Ok(vec![])
//!     }
//! }
//! let outcome = drive(&graph, &pg, &DriverConfig { stages: vec![StageKind::Decoder], .. }, &mut job).await?;
//! ```
//! The driver resumes from the newest checkpoint, seeds every step, averages gradients over
//! the data-parallel group, applies the NaN policy, steps each trained stage's optimiser,
//! logs, checkpoints and shows progress; `N + resume + N` steps equal `2N` straight.

mod adamw;
mod ckpt;
pub mod driver;
mod guard;
mod metrics;
mod progress;
mod schedule;
mod stage;

pub use adamw::{is_no_decay, trainable_variables, AdamW, AdamWConfig};
pub use ckpt::{
    hash_state_dict, latest, load, var_store_state_dict, Checkpointer, LoadedCheckpoint,
    TrainState, COMMIT_MARKER,
};
pub use driver::{clip_grad_norm, drive, DriveOutcome, DriverConfig, Metrics, Step, TrainJob};
pub use guard::{splitmix64, torch_rng_turn, NanGuard, StepRng, StepVerdict};
pub use metrics::{write_line_plot_png, write_plot_png, LinePlot, MetricsLog, Record};
pub use progress::{new_bar, TrainProgress};
pub use schedule::{Decay, LrSchedule};
pub use stage::{
    init_weights, load_vars, need_train, not_trainable, prefixed, sorted_vars, stage1_adamw,
    StageOptim,
};

#[cfg(test)]
mod tests;
