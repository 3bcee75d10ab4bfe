//! Training infrastructure shared by every trainer (stage-1 tokenizer, stage-2 LLM, pixel
//! decoder, demo): AdamW with savable state, learning-rate schedules, atomic checkpoints
//! with exact resume, the NaN/Inf policy, a metrics log with HTML/PNG curves, and a
//! progress bar.
//!
//! The loop every trainer follows (exact resume = N + resume + N steps equal 2N straight):
//! ```ignore
//! let ck = Checkpointer::new(&out_dir.join("checkpoints"), 3)?;
//! let mut opt = AdamW::from_var_store(&vs, |_| true, AdamWConfig::default())?.no_decay(is_no_decay);
//! let mut state = ck.resume(&vs, &mut opt)?.unwrap_or(TrainState { seed, ..Default::default() });
//! let rng = StepRng::new(state.seed);
//! let mut guard = NanGuard::new(5).with_counts(state.consecutive_skips, state.skipped_total);
//! let mut log = MetricsLog::open(&out_dir, state.step)?;
//! let bar = TrainProgress::new("stage-1", total as u64, state.step as u64, 50);
//! while state.step < total {
//!     let step = state.step;
//!     rng.begin_step(step);                       // all randomness of this step
//!     let batch = data.batch(state.epoch, state.data_cursor);
//!     let loss = model.loss(&batch)?;
//!     let lv = loss.double_value(&[]);
//!     match guard.observe(step, lv) {
//!         StepVerdict::Apply => {
//!             opt.zero_grad();
//!             loss.backward();
//!             opt.clip_grad_norm(1.0)?;
//!             opt.step(schedule.lr_at(step))?;
//!         }
//!         StepVerdict::Skip => {}
//!         StepVerdict::Stop => {
//!             let p = ck.save_training(&state, &vs, &opt)?;
//!             return Err(guard.stop_error(step, Some(p)));
//!         }
//!     }
//!     (state.epoch, state.data_cursor) = data.advance(state.epoch, state.data_cursor);
//!     state.step += 1;
//!     (state.consecutive_skips, state.skipped_total) = (guard.consecutive(), guard.skipped_total());
//!     log.log(step, &[("loss", lv), ("lr", schedule.lr_at(step))])?;
//!     bar.step(step as u64, &[("loss", lv)]);
//!     if state.step % save_every == 0 { ck.save_training(&state, &vs, &opt)?; }
//! }
//! log.write_report("stage-1")?;
//! ```

mod adamw;
mod ckpt;
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
pub use guard::{splitmix64, torch_rng_turn, NanGuard, StepRng, StepVerdict};
pub use metrics::{write_line_plot_png, write_plot_png, LinePlot, MetricsLog, Record};
pub use progress::{new_bar, TrainProgress};
pub use schedule::{Decay, LrSchedule};
pub use stage::{
    init_weights, need_train, not_trainable, prefixed, sorted_vars, stage1_adamw, StageOptim,
};

#[cfg(test)]
mod tests;
