//! The stage actors and the graph that wires them.
//!
//! One generic [`StageActor`] runs every stage. Each has its own named OS thread
//! (`lavit-encoder`, `lavit-llm`, …) that builds the stage (loads its weights on the device
//! the [`Placement`] names) and then runs a scheduler loop over its two-lane mailbox
//! ([`inbox::Inbox`]):
//! 1. control messages first (quit, stats, training calls): they overtake queued data;
//! 2. data messages join the stage's running batch ([`workers::Worker`]) while it has room:
//!    requests join between two steps;
//! 3. one step: one forward over every request in the batch — a batch of images for the
//!    tokenizer stages, one decoding step of every running sequence for the Llm, one
//!    denoising step of every running image for the Decoder (continuous batching, as TGI and
//!    vLLM schedule). A request that finishes (or is cancelled) leaves at once and goes on
//!    along its task's route ([`Task::route`]): the topology is that table, and the actor
//!    knows no concrete stage, so any stage can be replaced by another [`crate::stage`]
//!    implementation (tests use [`crate::mock`]).
//!
//! Backpressure: a sender holds one of the receiving stage's [`MailboxSlots`]
//! (`placement.mailbox`) per queued message, released when the stage takes the message into
//! its batch; a stage whose batch is full leaves its mailbox queued, so a full pipeline
//! pushes back to admission, which answers "busy" instead of queueing without bound.
//!
//! # Recovery policy (the one policy, tested in `tests/serving.rs`)
//! An error returned by a step's forward pass, or a panic inside one (caught with
//! `catch_unwind`), fails the requests of that step, with the stage's message; the stage
//! keeps its weights and serves the next step (a tokenizer stage fails only the requests of
//! the call that failed: one call per input shape). A stage that panics
//! `max_consecutive_panics` steps in a row (requests refused as invalid input —
//! [`StageError::Invalid`], a 4xx — are the request's fault: they neither count nor break
//! the row) exits with [`ExitStatus::Panicked`]: the graph reports itself unhealthy
//! ([`StageGraph::healthy`] false), every request that reaches that stage fails as `Closed`,
//! and `lavit serve` drains and exits non-zero so that its supervisor restarts it.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tch::Device;
use tracing::warn;

use crate::inflight::{Envelope, RequestMeta, StageRecord, BATCH_BUCKETS, LATENCY_BUCKETS};
use crate::messages::*;
use crate::stage::*;

mod graph;
pub mod inbox;
pub mod workers;

pub use graph::*;
use inbox::Inbox;
use workers::{Event, Worker};

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// A request inside a stage.
struct Job {
    meta: RequestMeta,
    /// When it was sent to the stage.
    sent: Instant,
    /// When it joined the stage's batch.
    arrived: Instant,
    /// When its first step started.
    started: Option<Instant>,
}

/// The one stage actor: a stage's worker, the requests it holds, its exit state.
pub(crate) struct StageActor {
    kind: StageKind,
    device: Device,
    shared: Arc<Shared>,
    /// `None`: the stage failed to load (everything it receives fails as closed).
    worker: Option<Box<dyn Worker>>,
    jobs: HashMap<u64, Job>,
    exit: Option<ExitStatus>,
    panics_in_a_row: u64,
    steps: u64,
}

impl StageActor {
    pub(crate) fn new(
        kind: StageKind,
        shared: Arc<Shared>,
        worker: Option<Box<dyn Worker>>,
    ) -> Self {
        let mut a = StageActor {
            kind,
            device: shared.devices[kind.index()],
            shared,
            worker,
            jobs: HashMap::new(),
            exit: None,
            panics_in_a_row: 0,
            steps: 0,
        };
        if a.worker.is_none() {
            a.set_exit(ExitStatus::Failure);
        }
        a
    }

    fn inbox(&self) -> &Inbox {
        &self.shared.inboxes[self.kind.index()]
    }

    fn set_exit(&mut self, status: ExitStatus) {
        if self.exit.is_none() {
            self.exit = Some(status);
            self.shared.exits.insert(self.kind, status);
            if matches!(status, ExitStatus::Panicked | ExitStatus::Failure) {
                self.shared.healthy.store(false, Ordering::SeqCst);
            }
            // an orderly end (told to quit, or its upstream finished) is no warning
            if matches!(status, ExitStatus::Success | ExitStatus::Quit) {
                tracing::info!(stage = %self.kind, ?status, "stage exited");
            } else {
                warn!(stage = %self.kind, ?status, "stage exited");
            }
        }
    }

    /// The scheduler loop, until told to quit.
    pub(crate) fn run(mut self) {
        tracing::info!(stage = %self.kind, device = ?self.device, "stage actor started");
        loop {
            // 1. Control messages overtake queued data.
            while let Some(c) = self.inbox().try_control() {
                if self.control(c) {
                    return self.close();
                }
            }
            // 2. New requests join between two steps, while the batch has room.
            loop {
                let open = self.exit.is_none() && self.worker.is_some();
                if open && !self.worker.as_ref().is_some_and(|w| w.has_room()) {
                    break;
                }
                let Some(env) = self.inbox().try_data() else {
                    break;
                };
                self.accept(env);
            }
            // 3. Cancelled requests leave before the step.
            self.drop_cancelled();
            // 4. One step, or wait for work.
            let others = self.shared.admission.admitted() > self.jobs.len();
            let due = self.worker.as_ref().and_then(|w| w.due(others));
            match due {
                Some(t) if t <= Instant::now() => self.step(),
                deadline => {
                    let room = self.worker.as_ref().is_none_or(|w| w.has_room());
                    self.inbox().wait(deadline, room);
                }
            }
        }
    }

    /// Take a request out of the mailbox into the stage's batch (its mailbox slot frees).
    fn accept(&mut self, env: Envelope) {
        let Envelope {
            mut meta,
            body,
            slot,
            sent,
        } = env;
        drop(slot);
        let kind = self.kind;
        let m = &self.shared.metrics[kind.index()];
        let worker = match (&self.exit, self.worker.as_mut()) {
            (None, Some(w)) => w,
            _ => return meta.finish(Err(StageError::Closed { stage: kind })),
        };
        if meta.cancel.is_cancelled() {
            m.cancelled.fetch_add(1, Ordering::Relaxed);
            return meta.finish(Err(StageError::Cancelled));
        }
        meta.entry.stage.store(kind.index(), Ordering::SeqCst);
        match worker.join(meta.id, &meta.task, body) {
            Ok(()) => {
                m.in_flight.fetch_add(1, Ordering::SeqCst);
                let id = meta.id;
                let job = Job {
                    meta,
                    sent,
                    arrived: Instant::now(),
                    started: None,
                };
                self.jobs.insert(id, job);
            }
            Err(e) => {
                if !matches!(e, StageError::Invalid(_) | StageError::Busy(_)) {
                    m.failures.fetch_add(1, Ordering::Relaxed);
                }
                warn!(stage = %kind, error = %e, "request refused");
                meta.finish(Err(e));
            }
        }
    }

    /// Answer the cancelled requests and take them out of the batch.
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.meta.cancel.is_cancelled())
            .map(|(&id, _)| id)
            .collect();
        let now = Instant::now();
        for id in gone {
            self.leave(id, Err(StageError::Cancelled), now);
        }
    }

    /// A request leaves this stage with `result` (`Ok(None)`: it was forwarded).
    /// `end`: when its work here ended (the end of its last step).
    fn leave(
        &mut self,
        id: u64,
        result: Result<Option<Output>, StageError>,
        end: Instant,
    ) -> Option<RequestMeta> {
        let job = self.jobs.remove(&id)?;
        if let Some(w) = self.worker.as_mut() {
            // After a panic the worker may be in any state: never let its cleanup take the
            // actor down with it.
            let _ = catch_unwind(AssertUnwindSafe(|| w.leave(id)));
        }
        let kind = self.kind;
        let m = &self.shared.metrics[kind.index()];
        m.in_flight.fetch_sub(1, Ordering::SeqCst);
        let start = job.started.unwrap_or(job.arrived);
        m.observe(end - start);
        self.shared.records.push(StageRecord {
            request: id,
            stage: kind,
            start,
            end,
            ok: result.is_ok(),
        });
        let mut meta = job.meta;
        let cancelled = meta.cancel.is_cancelled();
        match result {
            Ok(out) if !cancelled => {
                m.processed.fetch_add(1, Ordering::Relaxed);
                match out {
                    Some(o) => meta.finish(Ok(o)),
                    None => return Some(meta),
                }
            }
            Ok(_) | Err(StageError::Cancelled) => {
                m.cancelled.fetch_add(1, Ordering::Relaxed);
                meta.finish(Err(StageError::Cancelled));
            }
            Err(e) if cancelled => {
                let _ = e;
                m.cancelled.fetch_add(1, Ordering::Relaxed);
                meta.finish(Err(StageError::Cancelled));
            }
            Err(e) => {
                if !matches!(e, StageError::Invalid(_) | StageError::Panicked { .. }) {
                    m.failures.fetch_add(1, Ordering::Relaxed);
                }
                warn!(stage = %kind, error = %e, "request failed");
                meta.finish(Err(e));
            }
        }
        None
    }

    /// One step of the worker over the members it plans, with everything around it: the
    /// step's tracing span, fault injection, `catch_unwind`, timings and metrics, the
    /// recovery policy.
    fn step(&mut self) {
        let kind = self.kind;
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let members = worker.plan();
        if members.is_empty() {
            return;
        }
        let start = Instant::now();
        let m = &self.shared.metrics[kind.index()];
        for id in &members {
            if let Some(j) = self.jobs.get_mut(id) {
                if j.started.is_none() {
                    j.started = Some(start);
                    m.queue_wait
                        .observe(&LATENCY_BUCKETS, (start - j.sent).as_secs_f64());
                }
            }
        }
        m.batch_size.observe(&BATCH_BUCKETS, members.len() as f64);
        let _span =
            tracing::info_span!("step", stage = kind.name(), batch = members.len()).entered();
        #[cfg(feature = "testing")]
        let fault = self.shared.take_fault(kind);
        let jobs = &self.jobs;
        let inbox = &self.shared.inboxes[kind.index()];
        // One unit of progress for every member; give up waiting when one was cancelled or a
        // control message waits.
        let should_stop = || {
            let mut stop = false;
            for id in &members {
                if let Some(j) = jobs.get(id) {
                    stop |= j.meta.tick();
                }
            }
            stop || inbox.has_control()
        };
        let mut done: Vec<(u64, Event)> = Vec::new();
        let result = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "testing")]
            match fault {
                Some(Fault::Panic) => panic!("injected panic in stage {kind}"),
                Some(Fault::Error) => {
                    return Err(StageError::failed(kind, "injected error"));
                }
                None => {}
            }
            worker.step(&should_stop, &mut |id, ev| match ev {
                Event::Token(t) => {
                    if let Some(tx) = jobs.get(&id).and_then(|j| j.meta.tokens.as_ref()) {
                        let _ = tx.try_send(t);
                    }
                }
                other => done.push((id, other)),
            })
        }));
        self.steps += 1;
        let end = Instant::now();
        let m = &self.shared.metrics[kind.index()];
        m.step_time
            .observe(&LATENCY_BUCKETS, (end - start).as_secs_f64());
        if let Some(w) = self.worker.as_ref() {
            if let Some((used, total)) = w.kv_blocks() {
                m.kv_blocks_used.store(used as u64, Ordering::Relaxed);
                m.kv_blocks_total.store(total as u64, Ordering::Relaxed);
            }
            m.tokens.store(w.tokens(), Ordering::Relaxed);
        }
        match result {
            Ok(Ok(())) => {
                // A step whose every request was refused as invalid input says nothing about
                // the stage's health: it neither counts toward nor resets the panic row.
                let only_invalid = members.iter().all(|id| {
                    done.iter()
                        .any(|(d, ev)| d == id && matches!(ev, Event::Fail(StageError::Invalid(_))))
                });
                if !only_invalid {
                    self.panics_in_a_row = 0;
                }
                for (id, ev) in done {
                    self.settle(id, ev, end);
                }
            }
            Ok(Err(e)) => {
                if !matches!(e, StageError::Invalid(_)) {
                    self.panics_in_a_row = 0;
                }
                warn!(stage = %kind, error = %e, batch = members.len(), "step failed");
                for id in members {
                    self.leave(id, Err(e.clone()), end);
                }
            }
            Err(p) => {
                let msg = panic_message(&*p);
                self.shared.metrics[kind.index()]
                    .panics
                    .fetch_add(1, Ordering::Relaxed);
                self.panics_in_a_row += 1;
                warn!(stage = %kind, panic = %msg, in_a_row = self.panics_in_a_row, "stage panicked");
                // Policy first, answer second: whoever sees the 500 also sees the health.
                if self.panics_in_a_row >= self.shared.opts.max_consecutive_panics {
                    self.set_exit(ExitStatus::Panicked);
                }
                for id in members {
                    let e = StageError::Panicked {
                        stage: kind,
                        msg: msg.clone(),
                    };
                    self.leave(id, Err(e), end);
                }
            }
        }
    }

    /// A member finished its part here: answer it, or hand it to the next stage of its route.
    fn settle(&mut self, id: u64, ev: Event, end: Instant) {
        let kind = self.kind;
        match ev {
            Event::Token(_) => {}
            Event::Reply(out) => {
                self.leave(id, Ok(Some(out)), end);
            }
            Event::Fail(e) => {
                self.leave(id, Err(e), end);
            }
            Event::Forward(body) => {
                let next = self
                    .jobs
                    .get(&id)
                    .and_then(|j| j.meta.task.next_after(kind));
                let Some(next) = next else {
                    let e = StageError::failed(kind, "the request's route ends at this stage");
                    self.leave(id, Err(e), end);
                    return;
                };
                if let Some(meta) = self.leave(id, Ok(None), end) {
                    self.forward(meta, next, body);
                }
            }
        }
    }

    /// Hand a request to `next` (blocking this thread while `next`'s mailbox is full).
    fn forward(&mut self, mut meta: RequestMeta, next: StageKind, body: Payload) {
        let inbox = &self.shared.inboxes[next.index()];
        if inbox.is_closed() {
            meta.finish(Err(StageError::Closed { stage: next }));
            self.set_exit(ExitStatus::DownstreamClosed);
            return;
        }
        match self.shared.slots[next.index()].acquire_blocking(&meta.cancel) {
            Ok(slot) => {
                let env = Envelope {
                    meta,
                    body,
                    slot: Some(slot),
                    sent: Instant::now(),
                };
                if let Err(env) = inbox.push_data(env) {
                    let mut meta = env.meta;
                    meta.finish(Err(StageError::Closed { stage: next }));
                    self.set_exit(ExitStatus::DownstreamClosed);
                }
            }
            Err(StageError::Cancelled) => meta.finish(Err(StageError::Cancelled)),
            Err(_) => meta.finish(Err(StageError::Closed { stage: next })),
        }
    }

    /// Run a call on the stage's training hooks with panic capture.
    fn with_trainable<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Trainable) -> StageResult<T>,
    ) -> StageResult<T> {
        let kind = self.kind;
        let Some(w) = self.worker.as_mut() else {
            return Err(StageError::Closed { stage: kind });
        };
        guard(kind, || f(w.trainable()))
    }

    /// Handle a control message; `true` = quit.
    fn control(&mut self, c: Control) -> bool {
        let kind = self.kind;
        match c {
            Control::Quit => {
                self.set_exit(ExitStatus::Quit);
                return true;
            }
            Control::Stats(tx) => {
                let s = StageStats {
                    held: self.jobs.len(),
                    queued: self.inbox().queued(),
                    steps: self.steps,
                };
                let _ = tx.send(Ok(s));
            }
            Control::SetTrain(SetTrain(on)) => {
                let _ = self.with_trainable(|t| {
                    t.set_train(on);
                    Ok(())
                });
            }
            Control::TrainForward(m) => self.train_step(m),
            Control::Backward(Backward { loss }, tx) => {
                let r = guard(kind, || {
                    let v = loss
                        .f_double_value(&[])
                        .map_err(|e| StageError::failed(kind, e))?;
                    loss.f_backward().map_err(|e| StageError::failed(kind, e))?;
                    Ok(v)
                });
                let _ = tx.send(r);
            }
            Control::OptimizerStep(OptimizerStep, tx) => {
                let _ = tx.send(self.with_trainable(|t| t.optimizer_step()));
            }
            Control::OptimizerStepWith(OptimizerStepWith(ctl), tx) => {
                let _ = tx.send(self.with_trainable(|t| t.optimizer_step_with(&ctl)));
            }
            Control::GetTrainState(GetTrainState, tx) => {
                let _ = tx.send(self.with_trainable(|t| t.train_state()));
            }
            Control::GetTrainedParams(GetTrainedParams, tx) => {
                let _ = tx.send(self.with_trainable(|t| t.trained_params()));
            }
            Control::SetProcessGroup(SetProcessGroup(pg), tx) => {
                let _ = tx.send(self.with_trainable(|t| t.set_process_group(pg)));
            }
            Control::SetTrainState(SetTrainState(parts), tx) => {
                let _ = tx.send(self.with_trainable(|t| t.load_train_state(parts)));
            }
        }
        false
    }

    /// Forward with grad on this stage, then pass the batch on along its route.
    fn train_step(&mut self, mut m: TrainForward) {
        let kind = self.kind;
        let device = self.device;
        if m.batch.route.first() == Some(&kind) {
            m.batch.route.remove(0);
        }
        let batch = std::mem::replace(&mut m.batch, TrainBatch::new(Vec::new()));
        let r = self.with_trainable(move |t| {
            let mut batch = batch;
            batch.tensors = std::mem::take(&mut batch.tensors)
                .into_iter()
                .map(|(k, t)| (k, t.to_device(device)))
                .collect::<BTreeMap<_, _>>();
            t.train_forward(batch)
        });
        match r {
            Ok(b) => match b.route.first().copied() {
                None => {
                    let _ = m.reply.send(Ok(b));
                }
                Some(next) => {
                    let fwd = TrainForward {
                        batch: b,
                        reply: m.reply,
                    };
                    if let Err(c) =
                        self.shared.inboxes[next.index()].push_control(Control::TrainForward(fwd))
                    {
                        if let Control::TrainForward(f) = *c {
                            let _ = f.reply.send(Err(StageError::Closed { stage: next }));
                        }
                    }
                }
            },
            Err(e) => {
                let _ = m.reply.send(Err(e));
            }
        }
    }

    /// Quit: what is held and what is queued fail as closed; senders waiting for a slot are
    /// woken.
    fn close(mut self) {
        let kind = self.kind;
        let (controls, queued) = self.inbox().close();
        self.shared.slots[kind.index()].close();
        for env in queued {
            let mut meta = env.meta;
            meta.finish(Err(StageError::Closed { stage: kind }));
        }
        drop(controls); // their answer channels close: the callers see the stage closed
        let ids: Vec<u64> = self.jobs.keys().copied().collect();
        let now = Instant::now();
        for id in ids {
            self.leave(id, Err(StageError::Closed { stage: kind }), now);
        }
        let status = self.exit.unwrap_or(ExitStatus::Success);
        self.shared.exits.insert(kind, status);
    }
}

/// Run a training call with panic capture.
fn guard<T>(kind: StageKind, f: impl FnOnce() -> StageResult<T>) -> StageResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(StageError::Panicked {
            stage: kind,
            msg: panic_message(&*p),
        }),
    }
}
