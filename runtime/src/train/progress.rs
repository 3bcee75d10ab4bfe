//! A progress bar for long jobs (indicatif on stderr, hidden when stderr is not a
//! terminal) that also logs through `tracing` every `log_every` steps, so CI logs and
//! files see the progress too.

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// One set of bars per process: jobs that run side by side (the demo trains two stages at
/// once) each get their own line instead of overwriting one another.
fn progress_bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// A bar over `total` steps on [`progress_bars`].
pub fn new_bar(total: u64) -> ProgressBar {
    progress_bars().add(ProgressBar::new(total))
}

pub struct TrainProgress {
    bar: ProgressBar,
    log_every: u64,
    what: String,
}

impl TrainProgress {
    /// A bar over `total` steps starting at `start` (after a resume).
    pub fn new(what: &str, total: u64, start: u64, log_every: u64) -> Self {
        let bar = new_bar(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(what.to_string());
        bar.set_position(start);
        Self {
            bar,
            log_every: log_every.max(1),
            what: what.to_string(),
        }
    }

    /// Mark `step` done with its metrics: updates the bar, and every `log_every` steps (and
    /// at the last) logs them with `tracing::info!`.
    pub fn step(&self, step: u64, metrics: &[(&str, f64)]) {
        let msg = metrics
            .iter()
            .map(|(k, v)| format!("{k}={v:.4}"))
            .collect::<Vec<_>>()
            .join(" ");
        self.bar.set_position(step + 1);
        self.bar.set_message(msg.clone());
        let total = self.bar.length().unwrap_or(0);
        if (step + 1).is_multiple_of(self.log_every) || step + 1 == total {
            self.bar.suspend(|| {
                tracing::info!(job = %self.what, step = step + 1, total, "{msg}");
            });
        }
    }

    /// Print something without tearing the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        self.bar.println(msg);
    }

    pub fn finish(&self) {
        self.bar.finish();
    }

    pub fn bar(&self) -> &ProgressBar {
        &self.bar
    }
}
