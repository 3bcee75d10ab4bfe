//! `/metrics` in the Prometheus text format, written by the `prometheus` crate: admission
//! (queue depth, in flight, refusals), per-stage gauges, counters and histograms (latency,
//! queue wait, step time, batch size), the Llm's KV blocks in use, HTTP responses by class.
//!
//! The HTTP counters are the crate's own counters; the pipeline's numbers live in the runtime's
//! atomics (`lavit_runtime::inflight`) and are read at scrape time into metric families, the way
//! a Prometheus collector for another system's state works.

use std::sync::atomic::Ordering;

use prometheus::proto::{Bucket, Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

use lavit_runtime::inflight::{Histogram, StageMetrics, BATCH_BUCKETS, LATENCY_BUCKETS};
use lavit_runtime::stage::StageKind;

use super::AppState;

/// The server's own metrics.
pub struct Metrics {
    registry: Registry,
    http: IntCounterVec,
    internal: IntCounterVec,
    blocking: IntCounterVec,
}

/// Response classes of `lavit_http_responses_total`.
pub const CLASSES: [&str; 4] = ["2xx", "429", "4xx", "5xx"];

/// Jobs of `lavit_blocking_jobs_total`: decoding and resizing a request's images, encoding
/// generated images as PNG.
pub const BLOCKING_JOBS: [&str; 2] = ["image_decode", "png_encode"];

/// Kinds of `lavit_internal_errors_total` (failures that are the server's, never the
/// client's: each is a 5xx):
/// - `io`, `libtorch`, `plugin`, `stage`: a stage's forward pass returned an error of that
///   kind ([`lavit_runtime::kinds::FailureKind`]);
/// - `panic`: a stage's forward pass, or the server's own blocking work (image decoding, PNG
///   encoding), panicked and the panic was caught;
/// - `stage_down`: the request reached a stage that had exited (503);
/// - `output`: the pipeline's output could not be turned into a reply;
/// - `metrics`: `/metrics` itself failed.
pub const INTERNAL_KINDS: [&str; 8] = [
    "io",
    "libtorch",
    "plugin",
    "stage",
    "panic",
    "stage_down",
    "output",
    "metrics",
];

/// A counter with one label, registered, every value of `values` present from the start at 0.
fn labelled_counter(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(c.clone()))?;
    for v in values {
        c.with_label_values(&[v]);
    }
    Ok(c)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let http = labelled_counter(
            &registry,
            "lavit_http_responses_total",
            "HTTP responses by class.",
            "class",
            &CLASSES,
        )?;
        let internal = labelled_counter(
            &registry,
            "lavit_internal_errors_total",
            "Requests failed by the server's fault (5xx), by kind.",
            "kind",
            &INTERNAL_KINDS,
        )?;
        let blocking = labelled_counter(
            &registry,
            "lavit_blocking_jobs_total",
            "CPU-bound request work run on the blocking pool, off the async workers, by job.",
            "job",
            &BLOCKING_JOBS,
        )?;
        Ok(Metrics {
            registry,
            http,
            internal,
            blocking,
        })
    }

    /// Count one job of `job` (one of [`BLOCKING_JOBS`]) sent to the blocking pool.
    pub fn blocking_job(&self, job: &str) {
        self.blocking.with_label_values(&[job]).inc();
    }

    /// Count one internal failure of `kind` (one of [`INTERNAL_KINDS`]).
    pub fn internal_error(&self, kind: &str) {
        self.internal.with_label_values(&[kind]).inc();
    }

    /// The value of `lavit_internal_errors_total{kind}`.
    pub fn internal_count(&self, kind: &str) -> u64 {
        self.internal.with_label_values(&[kind]).get()
    }

    /// Count one response of `class` (one of [`CLASSES`]).
    pub fn http_response(&self, class: &str) {
        self.http.with_label_values(&[class]).inc();
    }

    /// The value of `lavit_http_responses_total{class}`.
    pub fn http_count(&self, class: &str) -> u64 {
        self.http.with_label_values(&[class]).get()
    }
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name((*k).into());
            l.set_value((*v).into());
            l
        })
        .collect()
}

fn gauge(v: f64, l: &[(&str, &str)]) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_gauge(g);
    m.set_label(labels(l));
    m
}

fn counter(v: f64, l: &[(&str, &str)]) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_counter(c);
    m.set_label(labels(l));
    m
}

/// The pipeline's state as metric families (read from the runtime's atomics now).
fn pipeline_families(st: &AppState) -> Vec<MetricFamily> {
    let g = st.pipe.graph();
    let adm = g.admission();
    let sh = g.shared();
    let mut out = Vec::new();
    let flag = |b: bool| b as u8 as f64;
    for (name, help, v) in [
        (
            "lavit_queue_depth",
            "Admitted requests waiting for an in-flight turn.",
            adm.queued() as f64,
        ),
        (
            "lavit_in_flight",
            "Requests inside the stages.",
            adm.in_flight() as f64,
        ),
        (
            "lavit_admitted",
            "Requests admitted (in flight + queued).",
            adm.admitted() as f64,
        ),
        (
            "lavit_max_in_flight",
            "Admission limit: in flight.",
            adm.max_in_flight as f64,
        ),
        (
            "lavit_max_queue",
            "Admission limit: queued.",
            adm.max_queue as f64,
        ),
        (
            "lavit_ready",
            "1 when weights are loaded and warm-up is done.",
            flag(st.ready.load(Ordering::SeqCst)),
        ),
        (
            "lavit_healthy",
            "0 once a stage failed or exited after repeated panics.",
            flag(g.healthy()),
        ),
        (
            "lavit_draining",
            "1 while draining.",
            flag(adm.is_draining()),
        ),
    ] {
        out.push(family(name, help, MetricType::GAUGE, vec![gauge(v, &[])]));
    }
    out.push(family(
        "lavit_rejected_total",
        "Requests refused because admission was full.",
        MetricType::COUNTER,
        vec![counter(adm.rejected() as f64, &[])],
    ));

    type Field = fn(&StageMetrics) -> u64;
    let per_stage: [(&str, MetricType, &str, Field); 5] = [
        (
            "lavit_stage_in_flight",
            MetricType::GAUGE,
            "Requests a stage holds (waiting for a step or in its running batch).",
            |m| m.in_flight.load(Ordering::SeqCst).max(0) as u64,
        ),
        (
            "lavit_stage_processed_total",
            MetricType::COUNTER,
            "Requests a stage finished.",
            |m| m.processed.load(Ordering::Relaxed),
        ),
        (
            "lavit_stage_failures_total",
            MetricType::COUNTER,
            "Forward passes that returned an error.",
            |m| m.failures.load(Ordering::Relaxed),
        ),
        (
            "lavit_stage_panics_total",
            MetricType::COUNTER,
            "Forward passes that panicked (caught).",
            |m| m.panics.load(Ordering::Relaxed),
        ),
        (
            "lavit_stage_cancelled_total",
            MetricType::COUNTER,
            "Requests a stage gave up because they were cancelled.",
            |m| m.cancelled.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, f) in per_stage {
        let metrics = StageKind::ALL
            .iter()
            .map(|k| {
                let v = f(&sh.metrics[k.index()]) as f64;
                let l = [("stage", k.name())];
                if kind == MetricType::GAUGE {
                    gauge(v, &l)
                } else {
                    counter(v, &l)
                }
            })
            .collect();
        out.push(family(name, help, kind, metrics));
    }
    out.push(family(
        "lavit_stage_up",
        "1 while a stage runs, 0 once it exited (failed to load, or panicked too often in a row).",
        MetricType::GAUGE,
        StageKind::ALL
            .iter()
            .map(|k| gauge(flag(g.exit_status(*k).is_none()), &[("stage", k.name())]))
            .collect(),
    ));
    out.push(family(
        "lavit_stage_mailbox_depth",
        "Messages queued in a stage's mailbox (not yet in its running batch).",
        MetricType::GAUGE,
        StageKind::ALL
            .iter()
            .map(|k| gauge(sh.slots[k.index()].depth() as f64, &[("stage", k.name())]))
            .collect(),
    ));
    type Hist = fn(&StageMetrics) -> &Histogram;
    let histograms: [(&str, &str, &[f64], Hist); 4] = [
        (
            "lavit_stage_latency_seconds",
            "Time a request spends in a stage (from joining its batch to leaving it).",
            &LATENCY_BUCKETS,
            |m| &m.latency,
        ),
        (
            "lavit_stage_queue_wait_seconds",
            "Time from a request being sent to a stage to its first step there.",
            &LATENCY_BUCKETS,
            |m| &m.queue_wait,
        ),
        (
            "lavit_stage_step_seconds",
            "Time of one step of a stage (one forward over its running batch).",
            &LATENCY_BUCKETS,
            |m| &m.step_time,
        ),
        (
            "lavit_stage_batch_size",
            "Requests in one step of a stage.",
            &BATCH_BUCKETS,
            |m| &m.batch_size,
        ),
    ];
    for (name, help, bounds, f) in histograms {
        let metrics = StageKind::ALL
            .iter()
            .map(|k| histogram(f(&sh.metrics[k.index()]), bounds, &[("stage", k.name())]))
            .collect();
        out.push(family(name, help, MetricType::HISTOGRAM, metrics));
    }
    let llm = &sh.metrics[StageKind::Llm.index()];
    for (name, help, v) in [
        (
            "lavit_kv_blocks_in_use",
            "KV cache blocks reserved by the Llm's running requests.",
            llm.kv_blocks_used.load(Ordering::Relaxed),
        ),
        (
            "lavit_kv_blocks_total",
            "KV cache blocks in the Llm's pool (pipeline.batching.kv_cache_mib).",
            llm.kv_blocks_total.load(Ordering::Relaxed),
        ),
    ] {
        out.push(family(
            name,
            help,
            MetricType::GAUGE,
            vec![gauge(v as f64, &[])],
        ));
    }
    out.push(family(
        "lavit_llm_tokens_total",
        "Tokens the Llm generated (every sample, caption and beam).",
        MetricType::COUNTER,
        vec![counter(llm.tokens.load(Ordering::Relaxed) as f64, &[])],
    ));
    out
}

/// A runtime histogram (cumulative counts per bound of `bounds`) as a Prometheus one.
fn histogram(hist: &Histogram, bounds: &[f64], l: &[(&str, &str)]) -> Metric {
    let mut h = prometheus::proto::Histogram::default();
    // The runtime's bucket counts are already cumulative; the encoder adds +Inf.
    h.set_bucket(
        bounds
            .iter()
            .enumerate()
            .map(|(i, &le)| {
                let mut b = Bucket::default();
                b.set_upper_bound(le);
                b.set_cumulative_count(hist.count(i));
                b
            })
            .collect(),
    );
    h.set_sample_count(hist.count(bounds.len()));
    h.set_sample_sum(hist.sum());
    let mut metric = Metric::default();
    metric.set_histogram(h);
    metric.set_label(labels(l));
    metric
}

/// The whole `/metrics` page.
pub fn render(st: &AppState) -> Result<String, prometheus::Error> {
    let mut families = st.metrics.registry.gather();
    families.extend(pipeline_families(st));
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut buf = Vec::new();
    TextEncoder::new().encode(&families, &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}
