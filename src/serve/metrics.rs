//! `/metrics` in the Prometheus text format: admission (queue depth, in flight, refusals),
//! per-stage gauges, counters and latency histograms, HTTP responses by class.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use lavit_runtime::inflight::LATENCY_BUCKETS;
use lavit_runtime::stage::StageKind;

use super::AppState;

pub fn render(st: &AppState) -> String {
    let g = st.pipe.graph();
    let adm = g.admission();
    let sh = g.shared();
    let mut o = String::new();
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        "lavit_queue_depth",
        "Admitted requests waiting for an in-flight turn.",
        adm.queued() as f64,
    );
    gauge(
        "lavit_in_flight",
        "Requests inside the stages.",
        adm.in_flight() as f64,
    );
    gauge(
        "lavit_admitted",
        "Requests admitted (in flight + queued).",
        adm.admitted() as f64,
    );
    gauge(
        "lavit_max_in_flight",
        "Admission limit: in flight.",
        adm.max_in_flight as f64,
    );
    gauge(
        "lavit_max_queue",
        "Admission limit: queued.",
        adm.max_queue as f64,
    );
    gauge(
        "lavit_ready",
        "1 when weights are loaded and warm-up is done.",
        st.ready.load(Ordering::SeqCst) as u8 as f64,
    );
    gauge(
        "lavit_healthy",
        "0 once a stage failed or exited after repeated panics.",
        g.healthy() as u8 as f64,
    );
    gauge(
        "lavit_draining",
        "1 while draining.",
        adm.is_draining() as u8 as f64,
    );
    let _ = writeln!(o, "# HELP lavit_rejected_total Requests refused because admission was full.\n# TYPE lavit_rejected_total counter\nlavit_rejected_total {}", adm.rejected());

    let c = &st.counters;
    let _ = writeln!(o, "# HELP lavit_http_responses_total HTTP responses by class.\n# TYPE lavit_http_responses_total counter");
    for (class, v) in [
        ("2xx", &c.ok),
        ("429", &c.too_many),
        ("4xx", &c.client_errors),
        ("5xx", &c.server_errors),
    ] {
        let _ = writeln!(
            o,
            "lavit_http_responses_total{{class=\"{class}\"}} {}",
            v.load(Ordering::SeqCst)
        );
    }

    type Field = fn(&lavit_runtime::inflight::StageMetrics) -> u64;
    let per_stage: [(&str, &str, &str, Field); 5] = [
        (
            "lavit_stage_in_flight",
            "gauge",
            "Requests a stage is computing now.",
            |m| m.in_flight.load(Ordering::SeqCst).max(0) as u64,
        ),
        (
            "lavit_stage_processed_total",
            "counter",
            "Requests a stage finished.",
            |m| m.processed.load(Ordering::Relaxed),
        ),
        (
            "lavit_stage_failures_total",
            "counter",
            "Forward passes that returned an error.",
            |m| m.failures.load(Ordering::Relaxed),
        ),
        (
            "lavit_stage_panics_total",
            "counter",
            "Forward passes that panicked (caught).",
            |m| m.panics.load(Ordering::Relaxed),
        ),
        (
            "lavit_stage_cancelled_total",
            "counter",
            "Requests a stage gave up because they were cancelled.",
            |m| m.cancelled.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, f) in per_stage {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for k in StageKind::ALL {
            let _ = writeln!(o, "{name}{{stage=\"{k}\"}} {}", f(&sh.metrics[k.index()]));
        }
    }
    let _ = writeln!(o, "# HELP lavit_stage_mailbox_depth Messages queued for or being processed by a stage.\n# TYPE lavit_stage_mailbox_depth gauge");
    for k in StageKind::ALL {
        let _ = writeln!(
            o,
            "lavit_stage_mailbox_depth{{stage=\"{k}\"}} {}",
            sh.slots[k.index()].depth()
        );
    }
    let _ = writeln!(o, "# HELP lavit_stage_latency_seconds Time a stage spends on one request.\n# TYPE lavit_stage_latency_seconds histogram");
    for k in StageKind::ALL {
        let m = &sh.metrics[k.index()];
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "lavit_stage_latency_seconds_bucket{{stage=\"{k}\",le=\"{b}\"}} {}",
                m.buckets[i].load(Ordering::Relaxed)
            );
        }
        let total = m.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "lavit_stage_latency_seconds_bucket{{stage=\"{k}\",le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            o,
            "lavit_stage_latency_seconds_sum{{stage=\"{k}\"}} {}",
            m.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "lavit_stage_latency_seconds_count{{stage=\"{k}\"}} {total}"
        );
    }
    o
}
