//! The stage actors and the graph that wires them.
//!
//! Each stage is an actix actor on a `SyncArbiter` with exactly one worker: its own named OS
//! thread (`lavit-encoder`, `lavit-llm`, …) that builds the stage (loads its weights on the
//! device from the [`Placement`]) and then only ever runs that stage, so a forward pass never
//! blocks an async arbiter. Stages are spawned downstream-first: the Decoder, then the Llm and the
//! Quantizer (given the Decoder's mailbox), the SelectorMerger (given the Quantizer's and the
//! Llm's), the Encoder (given the SelectorMerger's). Any stage can therefore be replaced by
//! another [`crate::stage`] implementation (tests use [`crate::mock`]).
//!
//! Backpressure: every mailbox is bounded by [`MailboxSlots`] (`placement.mailbox`); an upstream
//! stage that finds its downstream full blocks on its own thread until a slot frees, and the
//! async entry point waits likewise, so a full pipeline pushes back to admission, which answers
//! "busy" instead of queueing without bound.
//!
//! # Recovery policy (the one policy, tested in `tests/serving.rs`)
//! An error returned by a forward pass, or a panic inside one (caught with `catch_unwind`), fails
//! only the request that stage was working on, with the stage's message; the stage keeps its
//! weights and serves the next request. A stage that panics `max_consecutive_panics` times in a
//! row (requests refused as invalid input — [`StageError::Invalid`], a 4xx — are the request's
//! fault: they neither count nor break the row) exits with [`ExitStatus::Panicked`]: the graph reports itself unhealthy
//! ([`StageGraph::healthy`] false), every request that reaches that stage fails as `Closed`, and
//! `lavit serve` drains and exits non-zero so that its supervisor restarts it.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;
use tch::{Device, Tensor};
use tracing::{info, warn};

use crate::inflight::{
    Admission, AdmissionTicket, CancelToken, Envelope, InFlight, MailboxSlots, Records,
    RequestMeta, StageMetrics, StageRecord,
};
use crate::messages::*;
use crate::stage::*;

/// A fault to inject into the next call of a stage (chaos testing of the recovery policy;
/// only with the `testing` feature).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The forward pass returns an error.
    Error,
    /// The forward pass panics.
    Panic,
}

/// Knobs of the recovery policy and admission.
#[derive(Clone, Debug)]
pub struct GraphOptions {
    /// Requests inside the stages at once.
    pub max_in_flight: usize,
    /// Requests waiting for a turn beyond those; more are refused at once.
    pub max_queue: usize,
    /// Panics in a row after which a stage exits (`ExitStatus::Panicked`).
    pub max_consecutive_panics: u64,
}

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions {
            max_in_flight: 4,
            max_queue: 16,
            max_consecutive_panics: 3,
        }
    }
}

/// State shared by the graph handle and all stage actors.
pub struct Shared {
    pub registry: Arc<DashMap<u64, Arc<InFlight>>>,
    pub admission: Arc<Admission>,
    pub metrics: [StageMetrics; 5],
    pub records: Records,
    pub exits: ExitBoard,
    pub slots: [MailboxSlots; 5],
    pub devices: [Device; 5],
    #[cfg(feature = "testing")]
    faults: Mutex<Vec<(StageKind, Fault)>>,
    healthy: AtomicBool,
    next_id: AtomicU64,
    opts: GraphOptions,
}

#[cfg(feature = "testing")]
impl Shared {
    fn take_fault(&self, kind: StageKind) -> Option<Fault> {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let pos = f.iter().position(|(k, _)| *k == kind)?;
        Some(f.remove(pos).1)
    }
}

/// What every stage actor has besides its model: identity, device, counters, exit state.
struct Core {
    kind: StageKind,
    device: Device,
    shared: Arc<Shared>,
    exit: Option<ExitStatus>,
    panics_in_a_row: u64,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

impl Core {
    fn new(kind: StageKind, shared: Arc<Shared>) -> Self {
        Core {
            kind,
            device: shared.devices[kind.index()],
            shared,
            exit: None,
            panics_in_a_row: 0,
        }
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

    /// Run one unit of work for a request with everything around it: refusal when closed or
    /// cancelled, the request's tracing span, fault injection, `catch_unwind`, timing records
    /// and metrics, the recovery policy. `Some` = forward the output; `None` = the request was
    /// answered (with an error).
    fn run<B, T>(
        &mut self,
        env: Envelope<B>,
        work: impl FnOnce(&RequestMeta, B) -> StageResult<T>,
    ) -> Option<(RequestMeta, T)> {
        let Envelope {
            mut meta,
            body,
            slot,
        } = env;
        let kind = self.kind;
        if self.exit.is_some() {
            meta.finish(Err(StageError::Closed { stage: kind }));
            return None;
        }
        if meta.cancel.is_cancelled() {
            self.shared.metrics[kind.index()]
                .cancelled
                .fetch_add(1, Ordering::Relaxed);
            meta.finish(Err(StageError::Cancelled));
            return None;
        }
        meta.entry.stage.store(kind.index(), Ordering::SeqCst);
        let m = &self.shared.metrics[kind.index()];
        m.in_flight.fetch_add(1, Ordering::SeqCst);
        let span = meta.span.clone();
        let _req = span.enter();
        let _stage = tracing::info_span!("stage", stage = kind.name()).entered();
        #[cfg(feature = "testing")]
        let fault = self.shared.take_fault(kind);
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(feature = "testing")]
            match fault {
                Some(Fault::Panic) => panic!("injected panic in stage {kind}"),
                Some(Fault::Error) => {
                    return Err(StageError::failed(kind, "injected error"));
                }
                None => {}
            }
            work(&meta, body)
        }));
        let end = Instant::now();
        drop(slot);
        m.in_flight.fetch_sub(1, Ordering::SeqCst);
        m.observe(end - start);
        self.shared.records.push(StageRecord {
            request: meta.id,
            stage: kind,
            start,
            end,
            ok: matches!(result, Ok(Ok(_))),
        });
        match result {
            Ok(Ok(v)) => {
                self.panics_in_a_row = 0;
                m.processed.fetch_add(1, Ordering::Relaxed);
                if meta.cancel.is_cancelled() {
                    m.cancelled.fetch_add(1, Ordering::Relaxed);
                    meta.finish(Err(StageError::Cancelled));
                    return None;
                }
                Some((meta, v))
            }
            Ok(Err(e)) => {
                // A request the stage refused as invalid input says nothing about the
                // stage's health: it neither counts toward nor resets the panic streak.
                if !matches!(e, StageError::Invalid(_)) {
                    self.panics_in_a_row = 0;
                }
                let e = if meta.cancel.is_cancelled() {
                    m.cancelled.fetch_add(1, Ordering::Relaxed);
                    StageError::Cancelled
                } else {
                    if !matches!(e, StageError::Invalid(_)) {
                        m.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(stage = %kind, error = %e, "request failed");
                    e
                };
                meta.finish(Err(e));
                None
            }
            Err(p) => {
                let msg = panic_message(&*p);
                m.panics.fetch_add(1, Ordering::Relaxed);
                self.panics_in_a_row += 1;
                warn!(stage = %kind, panic = %msg, in_a_row = self.panics_in_a_row, "stage panicked");
                // Policy first, answer second: whoever sees the 500 also sees the health.
                if self.panics_in_a_row >= self.shared.opts.max_consecutive_panics {
                    self.set_exit(ExitStatus::Panicked);
                }
                meta.finish(Err(StageError::Panicked { stage: kind, msg }));
                None
            }
        }
    }

    /// Run a training call with panic capture.
    fn guard<T>(&mut self, f: impl FnOnce() -> StageResult<T>) -> StageResult<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => Err(StageError::Panicked {
                stage: self.kind,
                msg: panic_message(&*p),
            }),
        }
    }
}

/// The mailbox of a downstream stage as an upstream actor sees it: the address plus its bound.
pub struct Mailbox<A: Actor> {
    pub kind: StageKind,
    addr: Addr<A>,
    slots: MailboxSlots,
}

impl<A: Actor> Clone for Mailbox<A> {
    fn clone(&self) -> Self {
        Mailbox {
            kind: self.kind,
            addr: self.addr.clone(),
            slots: self.slots.clone(),
        }
    }
}

impl<A> Mailbox<A>
where
    A: Actor<Context = SyncContext<A>>,
{
    /// Forward from a stage thread: wait (blocking this thread) for a slot, then enqueue.
    /// Returns `false` when the downstream mailbox is closed (the request is answered).
    fn forward_blocking<B>(&self, mut meta: RequestMeta, body: B) -> bool
    where
        B: Send + 'static,
        A: Handler<Envelope<B>>,
    {
        if !self.addr.connected() {
            meta.finish(Err(StageError::Closed { stage: self.kind }));
            return false;
        }
        match self.slots.acquire_blocking(&meta.cancel) {
            Ok(slot) => {
                self.addr.do_send(Envelope {
                    meta,
                    body,
                    slot: Some(slot),
                });
                true
            }
            Err(e) => {
                meta.finish(Err(e));
                true
            }
        }
    }

    /// Enqueue from async code (the graph's entry point), waiting for a slot.
    async fn forward_async<B>(&self, mut meta: RequestMeta, body: B)
    where
        B: Send + 'static,
        A: Handler<Envelope<B>>,
    {
        if !self.addr.connected() {
            meta.finish(Err(StageError::Closed { stage: self.kind }));
            return;
        }
        match self.slots.acquire(&meta.cancel).await {
            Ok(slot) => self.addr.do_send(Envelope {
                meta,
                body,
                slot: Some(slot),
            }),
            Err(e) => meta.finish(Err(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The five actors.

macro_rules! stage_actor {
    ($name:ident, $trait:ident, $kind:expr, { $($field:ident : $fty:ty),* }) => {
        /// The actor of one stage (see the module docs).
        pub struct $name {
            core: Core,
            stage: Option<Box<dyn $trait>>,
            $($field: $fty,)*
        }
        impl Actor for $name {
            type Context = SyncContext<Self>;
            fn started(&mut self, _ctx: &mut Self::Context) {
                info!(stage = %self.core.kind, device = ?self.core.device, "stage actor started");
            }
            fn stopped(&mut self, _ctx: &mut Self::Context) {
                let status = self.core.exit.unwrap_or(ExitStatus::Success);
                self.core.shared.exits.insert(self.core.kind, status);
            }
        }
        impl Handler<Quit> for $name {
            type Result = ();
            fn handle(&mut self, _: Quit, _: &mut Self::Context) {
                self.core.set_exit(ExitStatus::Quit);
            }
        }
        impl Handler<SetTrain> for $name {
            type Result = ();
            fn handle(&mut self, m: SetTrain, _: &mut Self::Context) {
                if let Some(s) = self.stage.as_mut() {
                    s.set_train(m.0);
                }
            }
        }
        impl Handler<OptimizerStep> for $name {
            type Result = Result<(), StageError>;
            fn handle(&mut self, _: OptimizerStep, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                let stage = self.stage.as_mut().ok_or(StageError::Closed { stage: kind })?;
                self.core.guard(|| stage.optimizer_step())
            }
        }
        impl Handler<OptimizerStepWith> for $name {
            type Result = Result<StepReport, StageError>;
            fn handle(&mut self, m: OptimizerStepWith, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                let stage = self.stage.as_mut().ok_or(StageError::Closed { stage: kind })?;
                self.core.guard(|| stage.optimizer_step_with(&m.0))
            }
        }
        impl Handler<GetTrainState> for $name {
            type Result = Result<TrainParts, StageError>;
            fn handle(&mut self, _: GetTrainState, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                let stage = self.stage.as_mut().ok_or(StageError::Closed { stage: kind })?;
                self.core.guard(|| stage.train_state())
            }
        }
        impl Handler<GetTrainedParams> for $name {
            type Result = Result<Vec<(String, Tensor)>, StageError>;
            fn handle(&mut self, _: GetTrainedParams, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                let stage = self.stage.as_mut().ok_or(StageError::Closed { stage: kind })?;
                self.core.guard(|| stage.trained_params())
            }
        }
        impl Handler<SetProcessGroup> for $name {
            type Result = Result<(), StageError>;
            fn handle(&mut self, m: SetProcessGroup, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                let stage = self.stage.as_mut().ok_or(StageError::Closed { stage: kind })?;
                self.core.guard(|| stage.set_process_group(m.0))
            }
        }
        impl Handler<SetTrainState> for $name {
            type Result = Result<(), StageError>;
            fn handle(&mut self, m: SetTrainState, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                let stage = self.stage.as_mut().ok_or(StageError::Closed { stage: kind })?;
                self.core.guard(|| stage.load_train_state(m.0))
            }
        }
        impl Handler<Backward> for $name {
            type Result = Result<f64, StageError>;
            fn handle(&mut self, m: Backward, _: &mut Self::Context) -> Self::Result {
                let kind = self.core.kind;
                self.core.guard(|| {
                    let v = m.loss.f_double_value(&[]).map_err(|e| StageError::failed(kind, e))?;
                    m.loss.f_backward().map_err(|e| StageError::failed(kind, e))?;
                    Ok(v)
                })
            }
        }
        impl $name {
            /// Forward with grad on this stage, then pass the batch on along its route.
            fn train_step(&mut self, mut m: TrainForward) -> Option<TrainForward> {
                let kind = self.core.kind;
                let device = self.core.device;
                if m.batch.route.first() == Some(&kind) {
                    m.batch.route.remove(0);
                }
                let Some(stage) = self.stage.as_mut() else {
                    let _ = m.reply.send(Err(StageError::Closed { stage: kind }));
                    return None;
                };
                let batch = std::mem::replace(&mut m.batch, TrainBatch::new(Vec::new()));
                let r = self.core.guard(move || {
                    let mut batch = batch;
                    batch.tensors = std::mem::take(&mut batch.tensors)
                        .into_iter()
                        .map(|(k, t)| (k, t.to_device(device)))
                        .collect::<BTreeMap<_, _>>();
                    stage.train_forward(batch)
                });
                match r {
                    Ok(b) if b.route.is_empty() => {
                        let _ = m.reply.send(Ok(b));
                        None
                    }
                    Ok(b) => Some(TrainForward { batch: b, reply: m.reply }),
                    Err(e) => {
                        let _ = m.reply.send(Err(e));
                        None
                    }
                }
            }
        }
    };
}

stage_actor!(DecoderActor, DecoderStage, StageKind::Decoder, {});
stage_actor!(LlmActor, LlmStage, StageKind::Llm, { decoder: Mailbox<DecoderActor> });
stage_actor!(QuantizerActor, QuantizerStage, StageKind::Quantizer, { decoder: Mailbox<DecoderActor> });
stage_actor!(SelectorMergerActor, SelectorMergerStage, StageKind::SelectorMerger, {
    quantizer: Mailbox<QuantizerActor>, llm: Mailbox<LlmActor>
});
stage_actor!(EncoderActor, EncoderStage, StageKind::Encoder, { selector: Mailbox<SelectorMergerActor> });

fn closed<B>(env: Envelope<B>, stage: StageKind) {
    let mut meta = env.meta;
    meta.finish(Err(StageError::Closed { stage }));
}

impl Handler<Envelope<Images>> for EncoderActor {
    type Result = ();
    fn handle(&mut self, env: Envelope<Images>, _: &mut Self::Context) {
        let Some(stage) = self.stage.as_mut() else {
            return closed(env, self.core.kind);
        };
        let dev = self.core.device;
        if let Some((meta, features)) = self
            .core
            .run(env, |_, b| stage.encode(&b.pixels.to_device(dev)))
        {
            if !self
                .selector
                .forward_blocking(meta, PatchFeatures { features })
            {
                self.core.set_exit(ExitStatus::DownstreamClosed);
            }
        }
    }
}

enum SmOut {
    Merged(MergedFeatures),
    Understanding(UnderstandingEmbeds),
}

impl Handler<Envelope<PatchFeatures>> for SelectorMergerActor {
    type Result = ();
    fn handle(&mut self, env: Envelope<PatchFeatures>, _: &mut Self::Context) {
        let Some(stage) = self.stage.as_mut() else {
            return closed(env, self.core.kind);
        };
        let dev = self.core.device;
        let out = self.core.run(env, |meta, b| {
            let x = b.features.to_device(dev);
            match meta.task {
                Task::Caption { .. } | Task::Captions { .. } => {
                    Ok(SmOut::Understanding(UnderstandingEmbeds {
                        embeds: stage.understanding(&x)?,
                    }))
                }
                Task::Select { selection } => {
                    let (decisions, merged) = stage.select_merge(&x, selection)?;
                    Ok(SmOut::Merged(MergedFeatures { decisions, merged }))
                }
                _ => {
                    let (decisions, merged) = stage.select_merge(&x, None)?;
                    Ok(SmOut::Merged(MergedFeatures { decisions, merged }))
                }
            }
        });
        let ok = match out {
            None => true,
            Some((meta, SmOut::Merged(m))) => self.quantizer.forward_blocking(meta, m),
            Some((meta, SmOut::Understanding(u))) => self.llm.forward_blocking(meta, u),
        };
        if !ok {
            self.core.set_exit(ExitStatus::DownstreamClosed);
        }
    }
}

impl Handler<Envelope<MergedFeatures>> for QuantizerActor {
    type Result = ();
    fn handle(&mut self, env: Envelope<MergedFeatures>, _: &mut Self::Context) {
        let Some(stage) = self.stage.as_mut() else {
            return closed(env, self.core.kind);
        };
        let dev = self.core.device;
        let out = self.core.run(env, |meta, b| {
            let ids = stage.quantize(&b.merged.to_device(dev), &b.decisions.to_device(dev))?;
            let keep = match meta.task {
                Task::Select { .. } => Some(keep_masks(&b.decisions)?),
                _ => None,
            };
            Ok((ids, keep))
        });
        if let Some((mut meta, (ids, keep))) = out {
            match (&meta.task, keep) {
                (Task::Reconstruct { .. }, _) => {
                    if !self.decoder.forward_blocking(meta, GeneratedIds { ids }) {
                        self.core.set_exit(ExitStatus::DownstreamClosed);
                    }
                }
                (_, Some(keep)) => meta.finish(Ok(Output::Selection { ids, keep })),
                (_, None) => meta.finish(Ok(Output::VisualIds(ids))),
            }
        }
    }
}

/// Keep decisions (B, N) → per image a keep flag per patch.
fn keep_masks(decisions: &Tensor) -> StageResult<Vec<Vec<bool>>> {
    let d = decisions
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float);
    let n = d.size().last().copied().unwrap_or(0);
    let flat = Vec::<f32>::try_from(d.reshape([-1]))
        .map_err(|e| StageError::failed(StageKind::Quantizer, e))?;
    Ok(flat
        .chunks(n.max(1) as usize)
        .map(|row| row.iter().map(|&v| v > 0.5).collect())
        .collect())
}

impl Handler<Envelope<UnderstandingEmbeds>> for LlmActor {
    type Result = ();
    fn handle(&mut self, env: Envelope<UnderstandingEmbeds>, _: &mut Self::Context) {
        let Some(stage) = self.stage.as_mut() else {
            return closed(env, self.core.kind);
        };
        let dev = self.core.device;
        let out = self.core.run(env, |meta, b| {
            if let Task::Captions { prompt, opts } = &meta.task {
                let prefixes: Vec<Tensor> = b.embeds.iter().map(|e| e.to_device(dev)).collect();
                let stop = || meta.tick();
                let all = stage.captions(&prefixes, prompt, opts, &stop)?;
                if meta.cancel.is_cancelled() {
                    return Err(StageError::Cancelled);
                }
                let mut texts = Vec::with_capacity(all.len());
                for ids in all {
                    let text = stage.decode_text(&ids)?;
                    texts.push((ids, text));
                }
                return Ok(Output::Texts(texts));
            }
            let Task::Caption { prompt, opts } = &meta.task else {
                return Err(StageError::Invalid(
                    "understanding embeds without a caption task".into(),
                ));
            };
            let prefix = b
                .embeds
                .into_iter()
                .next()
                .ok_or_else(|| StageError::Invalid("no image in the caption request".into()))?
                .to_device(dev);
            let mut on_token = |id: i64, piece: &str| {
                if let Some(tx) = &meta.tokens {
                    let _ = tx.try_send(TokenEvent {
                        id,
                        text: piece.to_string(),
                    });
                }
                !meta.tick()
            };
            let ids = stage.caption(&prefix, prompt, opts, &mut on_token)?;
            if meta.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            let text = stage.decode_text(&ids)?;
            let prompt_tokens = stage.caption_prompt_len(&prefix, prompt);
            Ok(Output::Text {
                ids,
                text,
                prompt_tokens,
            })
        });
        if let Some((mut meta, output)) = out {
            meta.finish(Ok(output));
        }
    }
}

impl Handler<Envelope<GeneratePrompt>> for LlmActor {
    type Result = ();
    fn handle(&mut self, env: Envelope<GeneratePrompt>, _: &mut Self::Context) {
        let Some(stage) = self.stage.as_mut() else {
            return closed(env, self.core.kind);
        };
        let out = self.core.run(env, |meta, b| {
            let Task::Generate { opts } = &meta.task else {
                return Err(StageError::Invalid(
                    "a prompt without a generate task".into(),
                ));
            };
            let stop = || meta.tick();
            let ids = stage.image_tokens(&b.prompt, opts, &stop)?;
            if meta.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            Ok(ids)
        });
        if let Some((meta, ids)) = out {
            if !self.decoder.forward_blocking(meta, GeneratedIds { ids }) {
                self.core.set_exit(ExitStatus::DownstreamClosed);
            }
        }
    }
}

impl Handler<Envelope<GeneratedIds>> for DecoderActor {
    type Result = ();
    fn handle(&mut self, env: Envelope<GeneratedIds>, _: &mut Self::Context) {
        let Some(stage) = self.stage.as_mut() else {
            return closed(env, self.core.kind);
        };
        let out = self.core.run(env, |meta, b| {
            let (Task::Generate { opts } | Task::Reconstruct { opts }) = &meta.task else {
                return Err(StageError::Invalid(
                    "visual ids without a pixel task".into(),
                ));
            };
            let stop = || meta.tick();
            let px = stage.decode(&b.ids, opts, &stop)?;
            if meta.cancel.is_cancelled() {
                return Err(StageError::Cancelled);
            }
            Ok((px.to_device(Device::Cpu), b.ids))
        });
        if let Some((mut meta, (images, ids))) = out {
            meta.finish(Ok(Output::Pixels { images, ids }));
        }
    }
}

// Training forward routing: each actor forwards to the next stage named in the batch's route.
impl Handler<TrainForward> for DecoderActor {
    type Result = ();
    fn handle(&mut self, m: TrainForward, _: &mut Self::Context) {
        if let Some(m) = self.train_step(m) {
            let _ = m.reply.send(Err(StageError::Invalid(format!(
                "training route goes past the decoder: {:?}",
                m.batch.route
            ))));
        }
    }
}
impl Handler<TrainForward> for LlmActor {
    type Result = ();
    fn handle(&mut self, m: TrainForward, _: &mut Self::Context) {
        if let Some(m) = self.train_step(m) {
            route_train(m, None, None, Some(&self.decoder));
        }
    }
}
impl Handler<TrainForward> for QuantizerActor {
    type Result = ();
    fn handle(&mut self, m: TrainForward, _: &mut Self::Context) {
        if let Some(m) = self.train_step(m) {
            route_train(m, None, None, Some(&self.decoder));
        }
    }
}
impl Handler<TrainForward> for SelectorMergerActor {
    type Result = ();
    fn handle(&mut self, m: TrainForward, _: &mut Self::Context) {
        if let Some(m) = self.train_step(m) {
            route_train(m, Some(&self.quantizer), Some(&self.llm), None);
        }
    }
}
impl Handler<TrainForward> for EncoderActor {
    type Result = ();
    fn handle(&mut self, m: TrainForward, _: &mut Self::Context) {
        if let Some(m) = self.train_step(m) {
            match m.batch.route.first() {
                Some(StageKind::SelectorMerger) => self.selector.addr.do_send(m),
                other => {
                    let _ = m.reply.send(Err(StageError::Invalid(format!(
                        "the encoder cannot pass a training batch to {other:?}"
                    ))));
                }
            }
        }
    }
}

fn route_train(
    m: TrainForward,
    quantizer: Option<&Mailbox<QuantizerActor>>,
    llm: Option<&Mailbox<LlmActor>>,
    decoder: Option<&Mailbox<DecoderActor>>,
) {
    match (m.batch.route.first(), quantizer, llm, decoder) {
        (Some(StageKind::Quantizer), Some(q), _, _) => q.addr.do_send(m),
        (Some(StageKind::Llm), _, Some(l), _) => l.addr.do_send(m),
        (Some(StageKind::Decoder), _, _, Some(d)) => d.addr.do_send(m),
        (other, ..) => {
            let _ = m.reply.send(Err(StageError::Invalid(format!(
                "no edge to {other:?} in the stage graph"
            ))));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The graph.

/// Builds a stage on its own thread, on its device.
pub type Builder<S> = Box<dyn FnOnce(Device) -> crate::Result<S> + Send>;

/// One builder per stage (so weights load in parallel, on the stage's own thread and device).
pub struct StageBuilders {
    pub encoder: Builder<Box<dyn EncoderStage>>,
    pub selector_merger: Builder<Box<dyn SelectorMergerStage>>,
    pub quantizer: Builder<Box<dyn QuantizerStage>>,
    pub llm: Builder<Box<dyn LlmStage>>,
    pub decoder: Builder<Box<dyn DecoderStage>>,
}

impl StageBuilders {
    /// Every stage [`Unused`]: start from this and set the stages a graph runs (e.g. a
    /// training run of one stage).
    pub fn unused() -> Self {
        StageBuilders {
            encoder: Box::new(|_| Ok(Box::new(Unused(StageKind::Encoder)) as Box<_>)),
            selector_merger: Box::new(
                |_| Ok(Box::new(Unused(StageKind::SelectorMerger)) as Box<_>),
            ),
            quantizer: Box::new(|_| Ok(Box::new(Unused(StageKind::Quantizer)) as Box<_>)),
            llm: Box::new(|_| Ok(Box::new(Unused(StageKind::Llm)) as Box<_>)),
            decoder: Box::new(|_| Ok(Box::new(Unused(StageKind::Decoder)) as Box<_>)),
        }
    }
}

/// The input of a request.
pub enum Input {
    /// (B, 3, H, W) CLIP-normalised images (tokenize, caption uses the first, reconstruct).
    Images(Tensor),
    /// A text prompt (generate).
    Prompt(String),
    /// Continuous image embeddings computed elsewhere, one (T_i, hidden) tensor per image
    /// (caption: straight into the Llm stage; the first image is captioned).
    Embeds(Vec<Tensor>),
}

/// A request started in the graph: await [`RequestHandle::wait`]; dropping the handle cancels
/// the request.
pub struct RequestHandle {
    pub id: u64,
    pub cancel: CancelToken,
    /// Streamed caption tokens (caption requests only).
    pub tokens: Option<tokio::sync::mpsc::Receiver<TokenEvent>>,
    rx: Option<tokio::sync::oneshot::Receiver<Result<Output, StageError>>>,
}

impl RequestHandle {
    /// The request's result.
    pub async fn wait(&mut self) -> Result<Output, StageError> {
        let rx = self.rx.take().ok_or(StageError::Cancelled)?;
        rx.await.unwrap_or(Err(StageError::Cancelled))
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.cancel.cancel();
        }
    }
}

/// `addrs.<the stage's mailbox>.addr.send(m).await` for a stage known only at run time.
macro_rules! send_to {
    ($addrs:expr, $stage:expr, $m:expr) => {
        match $stage {
            StageKind::Encoder => $addrs.encoder.addr.send($m).await,
            StageKind::SelectorMerger => $addrs.selector.addr.send($m).await,
            StageKind::Quantizer => $addrs.quantizer.addr.send($m).await,
            StageKind::Llm => $addrs.llm.addr.send($m).await,
            StageKind::Decoder => $addrs.decoder.addr.send($m).await,
        }
    };
}

struct Addrs {
    encoder: Mailbox<EncoderActor>,
    selector: Mailbox<SelectorMergerActor>,
    quantizer: Mailbox<QuantizerActor>,
    llm: Mailbox<LlmActor>,
    decoder: Mailbox<DecoderActor>,
}

/// The running stage graph: five actors, the registry, admission and metrics.
pub struct StageGraph {
    shared: Arc<Shared>,
    addrs: Option<Addrs>,
    system: Option<actix::System>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn spawn_stage<A, S>(
    kind: StageKind,
    shared: &Arc<Shared>,
    builder: Builder<S>,
    ready: std::sync::mpsc::Sender<(StageKind, crate::Result<()>)>,
    make: impl Fn(Core, Option<S>) -> A + Send + Sync + 'static,
) -> Mailbox<A>
where
    A: Actor<Context = SyncContext<A>>,
    S: 'static,
{
    let builder = Mutex::new(Some(builder));
    let sh = shared.clone();
    let device = shared.devices[kind.index()];
    let factory = move || {
        let core = Core::new(kind, sh.clone());
        let b = builder.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stage = match b {
            Some(b) => {
                let r = catch_unwind(AssertUnwindSafe(|| b(device)))
                    .unwrap_or_else(|p| Err(crate::Error::invalid(panic_message(&*p))));
                match r {
                    Ok(s) => {
                        let _ = ready.send((kind, Ok(())));
                        Some(s)
                    }
                    Err(e) => {
                        let _ = ready.send((kind, Err(e)));
                        None
                    }
                }
            }
            None => None,
        };
        let mut actor_core = core;
        if stage.is_none() {
            actor_core.set_exit(ExitStatus::Failure);
        }
        make(actor_core, stage)
    };
    let addr = SyncArbiter::start_with_thread_builder(
        1,
        move || std::thread::Builder::new().name(format!("lavit-{}", kind.name())),
        factory,
    );
    Mailbox {
        kind,
        addr,
        slots: shared.slots[kind.index()].clone(),
    }
}

impl StageGraph {
    /// Spawn the five stages downstream-first, each on its own named thread and its placement
    /// device, and wait until every stage has built (loaded its weights). Fails with the first
    /// stage's error if one cannot be built.
    pub fn spawn(
        builders: StageBuilders,
        placement: &Placement,
        opts: GraphOptions,
    ) -> crate::Result<StageGraph> {
        let mut devices = [Device::Cpu; 5];
        for k in StageKind::ALL {
            devices[k.index()] = placement.device(k)?;
        }
        let shared = Arc::new(Shared {
            registry: Arc::new(DashMap::new()),
            admission: Admission::new(opts.max_in_flight, opts.max_queue),
            metrics: Default::default(),
            records: Records::default(),
            exits: Arc::new(DashMap::new()),
            slots: StageKind::ALL.map(|_| MailboxSlots::new(placement.mailbox)),
            devices,
            #[cfg(feature = "testing")]
            faults: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            opts,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lavit-actors".into())
            .spawn(move || {
                let sys = actix::System::new();
                sys.block_on(async move {
                    let StageBuilders {
                        encoder,
                        selector_merger,
                        quantizer,
                        llm,
                        decoder,
                    } = builders;
                    // Downstream first: each stage is given the mailboxes of the next ones.
                    let d = spawn_stage(
                        StageKind::Decoder,
                        &sh,
                        decoder,
                        ready_tx.clone(),
                        |core, stage| DecoderActor { core, stage },
                    );
                    let d2 = d.clone();
                    let l = spawn_stage(
                        StageKind::Llm,
                        &sh,
                        llm,
                        ready_tx.clone(),
                        move |core, stage| LlmActor {
                            core,
                            stage,
                            decoder: d2.clone(),
                        },
                    );
                    let d3 = d.clone();
                    let q = spawn_stage(
                        StageKind::Quantizer,
                        &sh,
                        quantizer,
                        ready_tx.clone(),
                        move |core, stage| QuantizerActor {
                            core,
                            stage,
                            decoder: d3.clone(),
                        },
                    );
                    let (q2, l2) = (q.clone(), l.clone());
                    let s = spawn_stage(
                        StageKind::SelectorMerger,
                        &sh,
                        selector_merger,
                        ready_tx.clone(),
                        move |core, stage| SelectorMergerActor {
                            core,
                            stage,
                            quantizer: q2.clone(),
                            llm: l2.clone(),
                        },
                    );
                    let s2 = s.clone();
                    let e = spawn_stage(
                        StageKind::Encoder,
                        &sh,
                        encoder,
                        ready_tx,
                        move |core, stage| EncoderActor {
                            core,
                            stage,
                            selector: s2.clone(),
                        },
                    );
                    let _ = addr_tx.send((
                        Addrs {
                            encoder: e,
                            selector: s,
                            quantizer: q,
                            llm: l,
                            decoder: d,
                        },
                        actix::System::current(),
                    ));
                });
                let _ = sys.run();
            })
            .map_err(|e| crate::Error::invalid(format!("cannot spawn the actor thread: {e}")))?;
        let (addrs, system) = addr_rx
            .recv()
            .map_err(|_| crate::Error::invalid("the actor system did not start"))?;
        let mut graph = StageGraph {
            shared,
            addrs: Some(addrs),
            system: Some(system),
            thread: Some(thread),
        };
        let mut first_err = None;
        for _ in 0..5 {
            match ready_rx.recv() {
                Ok((kind, Ok(()))) => info!(stage = %kind, "stage ready"),
                Ok((kind, Err(e))) => {
                    first_err.get_or_insert(crate::Error::invalid(format!(
                        "stage {kind} failed to load: {e}"
                    )));
                }
                Err(_) => {
                    first_err
                        .get_or_insert(crate::Error::invalid("a stage thread died while loading"));
                    break;
                }
            }
        }
        if let Some(e) = first_err {
            graph.shutdown();
            return Err(e);
        }
        Ok(graph)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    pub fn admission(&self) -> &Arc<Admission> {
        &self.shared.admission
    }
    /// Requests now in the pipeline (registry view).
    pub fn in_flight(&self) -> Vec<Arc<InFlight>> {
        self.shared
            .registry
            .iter()
            .map(|e| e.value().clone())
            .collect()
    }
    /// Cancel a request by id; `false` if it is not in flight.
    pub fn cancel(&self, id: u64) -> bool {
        match self.shared.registry.get(&id) {
            Some(e) => {
                e.cancel.cancel();
                true
            }
            None => false,
        }
    }
    /// Per-stage start/end records of recent work.
    pub fn records(&self) -> Vec<StageRecord> {
        self.shared.records.snapshot()
    }
    /// False once a stage failed to load or exited after repeated panics.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }
    pub fn exit_status(&self, kind: StageKind) -> Option<ExitStatus> {
        self.shared.exits.get(&kind).map(|e| *e)
    }
    /// The next call of `stage` fails with `fault` (chaos testing of the recovery policy;
    /// only with the `testing` feature).
    #[cfg(feature = "testing")]
    pub fn inject_fault(&self, stage: StageKind, fault: Fault) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((stage, fault));
    }

    /// Take an admission ticket now, or fail at once (`Busy` / `Draining`).
    pub fn admit(&self) -> Result<AdmissionTicket, StageError> {
        self.shared.admission.try_admit()
    }

    /// Start an admitted request: wait in the queue for an in-flight turn, then hand the input
    /// to the first stage of the task's route.
    pub async fn start(
        &self,
        mut ticket: AdmissionTicket,
        task: Task,
        input: Input,
    ) -> Result<RequestHandle, StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        let cancel = CancelToken::new();
        let entry = Arc::new(InFlight {
            id,
            task: task.name(),
            stage: usize::MAX.into(),
            progress: 0.into(),
            cancel: cancel.clone(),
            started: Instant::now(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (tokens_tx, tokens_rx) = match &task {
            Task::Caption { opts, .. } => {
                let (a, b) = tokio::sync::mpsc::channel(opts.max_new_tokens + 1);
                (Some(a), Some(b))
            }
            _ => (None, None),
        };
        let handle = RequestHandle {
            id,
            cancel: cancel.clone(),
            tokens: tokens_rx,
            rx: Some(rx),
        };
        ticket.wait_turn(&cancel).await?;
        self.shared.registry.insert(id, entry.clone());
        let span = tracing::info_span!("request", id, task = task.name());
        let meta = RequestMeta {
            id,
            task: task.clone(),
            span,
            cancel,
            entry,
            tokens: tokens_tx,
            reply: Some(tx),
            admission: Some(ticket),
            registry: self.shared.registry.clone(),
        };
        match (task, input) {
            (Task::Generate { .. }, Input::Prompt(prompt)) => {
                addrs
                    .llm
                    .forward_async(meta, GeneratePrompt { prompt })
                    .await
            }
            (Task::Caption { .. } | Task::Captions { .. }, Input::Embeds(embeds)) => {
                addrs
                    .llm
                    .forward_async(meta, UnderstandingEmbeds { embeds })
                    .await
            }
            (Task::Generate { .. }, _) => {
                let mut meta = meta;
                meta.finish(Err(StageError::Invalid(
                    "generate takes a text prompt".into(),
                )));
            }
            (_, Input::Images(pixels)) => {
                addrs.encoder.forward_async(meta, Images { pixels }).await
            }
            (_, Input::Embeds(_)) => {
                let mut meta = meta;
                meta.finish(Err(StageError::Invalid(
                    "only a caption takes image embeddings".into(),
                )));
            }
            (_, Input::Prompt(_)) => {
                let mut meta = meta;
                meta.finish(Err(StageError::Invalid("this task takes images".into())));
            }
        }
        Ok(handle)
    }

    /// Admit, start and wait: the one-call form.
    pub async fn run(&self, task: Task, input: Input) -> Result<Output, StageError> {
        let ticket = self.admit()?;
        let mut h = self.start(ticket, task, input).await?;
        h.wait().await
    }

    // --- training through the same actors ---

    /// Forward a training batch with grad along `batch.route` (starting at its first stage).
    pub async fn train_forward(&self, batch: TrainBatch) -> Result<TrainBatch, StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let m = TrainForward { batch, reply: tx };
        match m.batch.route.first() {
            Some(StageKind::Encoder) => addrs.encoder.addr.do_send(m),
            Some(StageKind::SelectorMerger) => addrs.selector.addr.do_send(m),
            Some(StageKind::Quantizer) => addrs.quantizer.addr.do_send(m),
            Some(StageKind::Llm) => addrs.llm.addr.do_send(m),
            Some(StageKind::Decoder) => addrs.decoder.addr.do_send(m),
            None => return Err(StageError::Invalid("empty training route".into())),
        }
        rx.await.unwrap_or(Err(StageError::Closed {
            stage: StageKind::Encoder,
        }))
    }

    /// Backward from `loss` on `stage`'s thread (the autograd graph spans the stages).
    pub async fn backward(&self, stage: StageKind, loss: Tensor) -> Result<f64, StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let m = Backward { loss };
        let r = send_to!(addrs, stage, m);
        r.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// One optimiser step on every stage in `stages` (each on its own thread).
    pub async fn optimizer_step(&self, stages: &[StageKind]) -> Result<(), StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        for &stage in stages {
            let r = send_to!(addrs, stage, OptimizerStep);
            r.unwrap_or(Err(StageError::Closed { stage }))?;
        }
        Ok(())
    }

    /// One optimiser step on `stage` under the driver's control (learning rate, skip).
    pub async fn optimizer_step_with(
        &self,
        stage: StageKind,
        ctl: StepControl,
    ) -> Result<StepReport, StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let m = OptimizerStepWith(ctl);
        let r = send_to!(addrs, stage, m);
        r.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// `stage`'s training state (named state dicts) for a checkpoint or an export.
    pub async fn train_state(&self, stage: StageKind) -> Result<TrainParts, StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let r = send_to!(addrs, stage, GetTrainState);
        r.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// The parameters `stage` trains (shallow handles, see `Trainable::trained_params`).
    pub async fn trained_params(
        &self,
        stage: StageKind,
    ) -> Result<Vec<(String, Tensor)>, StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let r = send_to!(addrs, stage, GetTrainedParams);
        r.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// Hand `stage` the training run's data-parallel group (answered once it holds it).
    pub async fn set_process_group(
        &self,
        stage: StageKind,
        pg: Arc<crate::dist::ProcessGroup>,
    ) -> Result<(), StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let r = send_to!(addrs, stage, SetProcessGroup(pg));
        r.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// Load a training state (a resumed checkpoint) into `stage`.
    pub async fn load_train_state(
        &self,
        stage: StageKind,
        parts: TrainParts,
    ) -> Result<(), StageError> {
        let addrs = self.addrs.as_ref().ok_or(StageError::Draining)?;
        let m = SetTrainState(parts);
        let r = send_to!(addrs, stage, m);
        r.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// Switch every stage between training and inference behaviour.
    pub fn set_train(&self, train: bool) {
        if let Some(a) = &self.addrs {
            a.encoder.addr.do_send(SetTrain(train));
            a.selector.addr.do_send(SetTrain(train));
            a.quantizer.addr.do_send(SetTrain(train));
            a.llm.addr.do_send(SetTrain(train));
            a.decoder.addr.do_send(SetTrain(train));
        }
    }

    /// Refuse new requests, wait for the admitted ones (at most `timeout`); `true` if all
    /// finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.shared.admission.drain(timeout).await
    }

    /// Tell every stage to quit (upstream first), close the mailboxes and stop the actor system.
    pub fn shutdown(&mut self) {
        if let Some(a) = self.addrs.take() {
            a.encoder.addr.do_send(Quit);
            a.selector.addr.do_send(Quit);
            a.quantizer.addr.do_send(Quit);
            a.llm.addr.do_send(Quit);
            a.decoder.addr.do_send(Quit);
        }
        if let Some(s) = self.system.take() {
            s.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StageGraph {
    fn drop(&mut self) {
        self.shutdown();
    }
}
