//! Per-step reproducibility and the NaN/Inf policy.
//!
//! tch exposes no way to read libtorch's generator state, so randomness is made a
//! function of the step instead: [`StepRng::begin_step`] reseeds libtorch's global
//! generator from `(seed, step)` before each step and hands out a `u64` for Rust-side
//! randomness. Saving the seed and the step is then saving the RNG state, and resume is
//! exact.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::Error;

/// libtorch has one CPU generator per process. Jobs that run side by side in one process
/// (the demo trains the pixel decoder and the LLM at once) take turns on it: a job seeds it and
/// draws from it only while it holds the turn, so its numbers do not depend on how the threads
/// interleave. Returns the turn (held until dropped) after `tch::manual_seed(seed)`.
pub fn torch_rng_turn(seed: u64) -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    // a job that panicked while holding the turn leaves nothing half-written behind
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    tch::manual_seed(seed as i64);
    turn
}

/// Seeds derived from a run seed and the step number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRng {
    pub seed: u64,
}

impl StepRng {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The seed of `step` (SplitMix64 of seed and step: well mixed, never the same for
    /// two steps of one run).
    pub fn seed_for(&self, step: i64) -> u64 {
        splitmix64(self.seed ^ splitmix64(step as u64))
    }

    /// Reseed libtorch's global generator (CPU and CUDA) for `step`; returns the step's
    /// seed for Rust-side generators (data shuffles, masks drawn in Rust).
    pub fn begin_step(&self, step: i64) -> u64 {
        let s = self.seed_for(step);
        tch::manual_seed((s >> 1) as i64);
        s
    }
}

/// SplitMix64 (Steele et al. 2014): one round of the mixer.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What to do with the current step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepVerdict {
    /// The loss is finite: backward, clip, step.
    Apply,
    /// The loss is NaN/Inf: skip this step (parameters unchanged); counted.
    Skip,
    /// `max_consecutive` non-finite values in a row: skip, save a checkpoint, and return
    /// [`NanGuard::stop_error`].
    Stop,
}

/// The NaN/Inf policy: a non-finite loss (or gradient norm) skips the step; `max_consecutive`
/// skips in a row give [`StepVerdict::Stop`]: the run saves a checkpoint and returns
/// [`NanGuard::stop_error`] ([`Error::NonFiniteLoss`], naming the step and the checkpoint).
#[derive(Debug, Clone)]
pub struct NanGuard {
    pub max_consecutive: usize,
    consecutive: usize,
    skipped_total: u64,
}

impl NanGuard {
    pub fn new(max_consecutive: usize) -> Self {
        Self {
            max_consecutive: max_consecutive.max(1),
            consecutive: 0,
            skipped_total: 0,
        }
    }

    /// Restore the counters (from a checkpoint's state).
    pub fn with_counts(mut self, consecutive: usize, skipped_total: u64) -> Self {
        self.consecutive = consecutive;
        self.skipped_total = skipped_total;
        self
    }

    /// Judge a loss (or gradient norm) value at `step`.
    pub fn observe(&mut self, step: i64, value: f64) -> StepVerdict {
        if value.is_finite() {
            self.consecutive = 0;
            return StepVerdict::Apply;
        }
        self.consecutive += 1;
        self.skipped_total += 1;
        tracing::warn!(
            step,
            value,
            consecutive = self.consecutive,
            "non-finite loss: step skipped"
        );
        if self.consecutive >= self.max_consecutive {
            return StepVerdict::Stop;
        }
        StepVerdict::Skip
    }

    /// Steps skipped so far.
    pub fn skipped_total(&self) -> u64 {
        self.skipped_total
    }

    /// Non-finite values in a row right now.
    pub fn consecutive(&self) -> usize {
        self.consecutive
    }

    /// The stop error, naming the step and (when saved) the checkpoint.
    pub fn stop_error(&self, step: i64, checkpoint: Option<std::path::PathBuf>) -> Error {
        Error::NonFiniteLoss {
            step,
            consecutive: self.consecutive,
            skipped_total: self.skipped_total,
            checkpoint,
        }
    }
}
