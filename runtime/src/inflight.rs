//! Request bookkeeping shared by every stage actor: cancellation tokens, the in-flight registry
//! (dashmap), bounded admission (N in flight + Q queued, the rest refused at once), per-stage
//! mailbox slots (backpressure), per-stage metrics and start/end records.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::kinds::{StageError, StageKind};
use crate::messages::{Output, Payload, Reply, Task, TokenEvent};

// ---------------------------------------------------------------------------------------------
// Envelopes.

/// A body in flight with its request metadata and the mailbox slot it holds (released when the
/// receiving stage takes it out of its mailbox into its own batch: a full mailbox makes the
/// sender wait, that is the backpressure).
pub struct Envelope {
    pub meta: RequestMeta,
    pub body: Payload,
    pub(crate) slot: Option<SlotPermit>,
    /// When it was sent (its queue wait starts).
    pub(crate) sent: Instant,
}

// ---------------------------------------------------------------------------------------------
// Cancellation.

/// A cheap, clonable cancellation flag with a wake-up for async waiters.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    flag: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }
    /// Resolves once [`cancel`](Self::cancel) was called.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-flight registry.

/// What the registry knows about a live request.
pub struct InFlight {
    pub id: u64,
    pub task: &'static str,
    /// Index of the stage working on it now ([`StageKind::index`]); `usize::MAX` = not started.
    pub stage: AtomicUsize,
    /// Tokens generated + diffusion steps done so far (one unit per [`crate::stage::ShouldStop`] call).
    pub progress: AtomicU64,
    pub cancel: CancelToken,
    pub started: Instant,
}

impl InFlight {
    pub fn current_stage(&self) -> Option<StageKind> {
        StageKind::ALL
            .get(self.stage.load(Ordering::SeqCst))
            .copied()
    }
}

/// Everything about one request that travels with its messages through the stages.
/// Dropping it without a reply answers the caller with `Cancelled` (if cancelled) or
/// `Closed { stage }`, so a caller never hangs; it also frees the admission slot.
pub struct RequestMeta {
    pub id: u64,
    pub task: Task,
    pub span: tracing::Span,
    pub cancel: CancelToken,
    pub entry: Arc<InFlight>,
    /// Streamed caption tokens (bounded: capacity ≥ max_new_tokens + 1).
    pub tokens: Option<tokio::sync::mpsc::Sender<TokenEvent>>,
    pub(crate) reply: Option<Reply>,
    pub(crate) admission: Option<AdmissionTicket>,
    pub(crate) registry: Arc<DashMap<u64, Arc<InFlight>>>,
}

impl RequestMeta {
    /// Answer the caller (first answer wins). The request leaves the registry and frees its
    /// admission slot first, so a caller that sees the answer also sees the slot free.
    pub fn finish(&mut self, result: Result<Output, StageError>) {
        self.registry.remove(&self.id);
        self.admission.take();
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
    /// One unit of progress; `true` when the request must stop.
    pub fn tick(&self) -> bool {
        self.entry.progress.fetch_add(1, Ordering::SeqCst);
        self.cancel.is_cancelled()
    }
}

impl Drop for RequestMeta {
    fn drop(&mut self) {
        if self.reply.is_some() {
            let err = if self.cancel.is_cancelled() {
                StageError::Cancelled
            } else {
                StageError::Closed {
                    stage: self.entry.current_stage().unwrap_or(StageKind::Encoder),
                }
            };
            self.finish(Err(err));
        }
        self.registry.remove(&self.id);
        self.admission.take();
    }
}

// ---------------------------------------------------------------------------------------------
// Admission.

/// Bounded admission: at most `max_in_flight` requests inside the stages and `max_queue` more
/// waiting for a turn; any request beyond that is refused immediately (`StageError::Busy`).
pub struct Admission {
    pub max_in_flight: usize,
    pub max_queue: usize,
    tickets: AtomicUsize,
    in_flight: Arc<Semaphore>,
    draining: AtomicBool,
    rejected: AtomicU64,
    idle: Notify,
}

impl Admission {
    pub fn new(max_in_flight: usize, max_queue: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_in_flight: max_in_flight.max(1),
            max_queue,
            tickets: AtomicUsize::new(0),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            draining: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            idle: Notify::new(),
        })
    }

    /// Take a ticket now or fail at once (`Busy` when N + Q are taken, `Draining`).
    pub fn try_admit(self: &Arc<Self>) -> Result<AdmissionTicket, StageError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(StageError::Draining);
        }
        let cap = self.max_in_flight + self.max_queue;
        let mut cur = self.tickets.load(Ordering::SeqCst);
        loop {
            if cur >= cap {
                self.rejected.fetch_add(1, Ordering::SeqCst);
                return Err(StageError::Busy(format!(
                    "{} requests in flight and {} queued (the limits)",
                    self.max_in_flight, self.max_queue
                )));
            }
            match self
                .tickets
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        Ok(AdmissionTicket {
            adm: self.clone(),
            permit: None,
        })
    }

    /// Requests admitted (in flight or queued).
    pub fn admitted(&self) -> usize {
        self.tickets.load(Ordering::SeqCst)
    }
    /// Requests holding an in-flight turn.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }
    /// Requests waiting for a turn.
    pub fn queued(&self) -> usize {
        self.admitted().saturating_sub(self.in_flight())
    }
    /// Requests refused as busy so far.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::SeqCst)
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Refuse new requests from now on and wait until every admitted one has finished, at most
    /// `timeout`. Returns `true` if everything finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            if self.admitted() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.admitted() == 0;
            }
        }
    }
}

/// An admitted request's place; dropping it frees the place (and the in-flight turn).
pub struct AdmissionTicket {
    adm: Arc<Admission>,
    permit: Option<OwnedSemaphorePermit>,
}

impl AdmissionTicket {
    /// Wait (in the queue) for an in-flight turn, or until `cancel` fires.
    pub async fn wait_turn(&mut self, cancel: &CancelToken) -> Result<(), StageError> {
        if self.permit.is_some() {
            return Ok(());
        }
        let sem = self.adm.in_flight.clone();
        tokio::select! {
            p = sem.acquire_owned() => {
                self.permit = Some(p.map_err(|_| StageError::Draining)?);
                Ok(())
            }
            _ = cancel.cancelled() => Err(StageError::Cancelled),
        }
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        self.permit.take();
        self.adm.tickets.fetch_sub(1, Ordering::SeqCst);
        self.adm.idle.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------------
// Stage mailboxes (backpressure).

/// A place in a stage's mailbox; released when the stage has finished the message.
pub type SlotPermit = OwnedSemaphorePermit;

/// The bound of one stage's mailbox: a sender must hold a slot to enqueue.
#[derive(Clone)]
pub struct MailboxSlots {
    pub capacity: usize,
    sem: Arc<Semaphore>,
}

impl MailboxSlots {
    pub fn new(capacity: usize) -> Self {
        MailboxSlots {
            capacity,
            sem: Arc::new(Semaphore::new(capacity)),
        }
    }
    /// Messages queued (a message frees its slot when the stage takes it into its batch).
    pub fn depth(&self) -> usize {
        self.capacity - self.sem.available_permits()
    }
    /// Wait for a slot (async callers), or until cancelled.
    pub async fn acquire(&self, cancel: &CancelToken) -> Result<SlotPermit, StageError> {
        tokio::select! {
            p = self.sem.clone().acquire_owned() => p.map_err(|_| StageError::Draining),
            _ = cancel.cancelled() => Err(StageError::Cancelled),
        }
    }
    /// Wait for a slot from a stage thread (blocks it: that is the backpressure), or until
    /// cancelled.
    pub fn acquire_blocking(&self, cancel: &CancelToken) -> Result<SlotPermit, StageError> {
        futures::executor::block_on(self.acquire(cancel))
    }
    /// Wake every waiter with an error and refuse later waits (the stage is gone).
    pub fn close(&self) {
        self.sem.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and records.

/// Upper bounds (seconds) of the latency histogram buckets (stage latency, queue wait, step
/// time).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of the batch-size histogram buckets (requests per step).
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A Prometheus-style histogram in atomics: cumulative counts per upper bound (the bounds
/// are given where it is observed and read: [`LATENCY_BUCKETS`], [`BATCH_BUCKETS`]), then
/// +Inf, and the sum of the observed values in millionths.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 16],
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Count `v` in every bucket of `bounds` (at most 15) that holds it, and in +Inf.
    pub fn observe(&self, bounds: &[f64], v: f64) {
        let n = bounds.len().min(self.buckets.len() - 1);
        for (i, b) in bounds.iter().take(n).enumerate() {
            if v <= *b {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.buckets[n].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }
    /// Cumulative count of bucket `i` of the bounds it is observed with (`bounds.len()`:
    /// +Inf, the number of observations).
    pub fn count(&self, i: usize) -> u64 {
        self.buckets.get(i).map_or(0, |b| b.load(Ordering::Relaxed))
    }
    /// The sum of the observed values.
    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// Counters of one stage.
#[derive(Default)]
pub struct StageMetrics {
    /// Requests the stage holds (waiting for a step or in its running batch).
    pub in_flight: AtomicI64,
    pub processed: AtomicU64,
    pub failures: AtomicU64,
    pub panics: AtomicU64,
    pub cancelled: AtomicU64,
    /// Seconds from a request joining the stage to leaving it ([`LATENCY_BUCKETS`]).
    pub latency: Histogram,
    /// Seconds from a request being sent to the stage to its first step
    /// ([`LATENCY_BUCKETS`]).
    pub queue_wait: Histogram,
    /// Seconds per step ([`LATENCY_BUCKETS`]).
    pub step_time: Histogram,
    /// Requests per step ([`BATCH_BUCKETS`]).
    pub batch_size: Histogram,
    /// KV cache blocks reserved by running requests, and in the pool (the Llm).
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    /// Tokens generated (the Llm: every sample, caption and beam).
    pub tokens: AtomicU64,
}

impl StageMetrics {
    /// One request's time in the stage.
    pub fn observe(&self, d: Duration) {
        self.latency.observe(&LATENCY_BUCKETS, d.as_secs_f64());
    }
}

/// One stage's work on one request: when it started and ended (for overlap checks and
/// tracing-free timelines).
#[derive(Clone, Copy, Debug)]
pub struct StageRecord {
    pub request: u64,
    pub stage: StageKind,
    pub start: Instant,
    pub end: Instant,
    pub ok: bool,
}

/// The last [`Records::CAPACITY`] stage records.
#[derive(Default)]
pub struct Records(Mutex<VecDeque<StageRecord>>);

impl Records {
    pub const CAPACITY: usize = 4096;
    pub fn push(&self, r: StageRecord) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == Self::CAPACITY {
            q.pop_front();
        }
        q.push_back(r);
    }
    pub fn snapshot(&self) -> Vec<StageRecord> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
