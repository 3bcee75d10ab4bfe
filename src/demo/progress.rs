//! Progress bars (indicatif) that also log through `tracing`, so a run piped to a file still
//! says where it is.

use std::time::Instant;

use indicatif::ProgressBar;
use indicatif::ProgressStyle;

/// A bar for one training or evaluation loop.
pub struct Progress {
    bar: ProgressBar,
    name: String,
    total: u64,
    start: Instant,
    /// Log every this many ticks.
    every: u64,
}

impl Progress {
    pub fn new(name: &str, total: u64) -> Self {
        let bar = lavit_runtime::train::new_bar(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{elapsed_precise}] {bar:30} {pos}/{len} ({eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        tracing::info!(stage = name, total, "start");
        Self {
            bar,
            name: name.to_string(),
            total,
            start: Instant::now(),
            every: (total / 10).max(1),
        }
    }

    /// One step done; `msg` is shown on the bar and logged every tenth of the run.
    pub fn tick(&self, msg: String) {
        self.bar.inc(1);
        let pos = self.bar.position();
        if pos.is_multiple_of(self.every) || pos == self.total {
            tracing::info!(stage = %self.name, step = pos, total = self.total, "{msg}");
        }
        self.bar.set_message(msg);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
        tracing::info!(
            stage = %self.name,
            seconds = format!("{:.1}", self.start.elapsed().as_secs_f64()),
            "done"
        );
    }
}
