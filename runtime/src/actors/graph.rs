//! The graph: five [`super::StageActor`]s (one per stage trait, each on its thread and
//! device), the in-flight registry, admission, metrics, and the async entry points.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(feature = "testing")]
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tch::{Device, Tensor};
use tracing::info;

use super::inbox::Inbox;
use super::workers::{DecoderWorker, LlmWorker, OneShot, Worker};
use super::{panic_message, StageActor};
use crate::inflight::{
    Admission, AdmissionTicket, CancelToken, Envelope, InFlight, MailboxSlots, Records,
    RequestMeta, StageMetrics, StageRecord,
};
use crate::messages::*;
use crate::stage::*;

/// A fault to inject into the next step of a stage (chaos testing of the recovery policy;
/// only with the `testing` feature).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The forward pass returns an error.
    Error,
    /// The forward pass panics.
    Panic,
}

/// Knobs of the recovery policy, admission and batching.
#[derive(Clone, Debug)]
pub struct GraphOptions {
    /// Requests inside the stages at once.
    pub max_in_flight: usize,
    /// Requests waiting for a turn beyond those; more are refused at once.
    pub max_queue: usize,
    /// Panics in a row after which a stage exits (`ExitStatus::Panicked`).
    pub max_consecutive_panics: u64,
    /// How the stages batch concurrent requests.
    pub batching: Batching,
}

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions {
            max_in_flight: 4,
            max_queue: 16,
            max_consecutive_panics: 3,
            batching: Batching::default(),
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
    pub(crate) inboxes: [Arc<Inbox>; 5],
    #[cfg(feature = "testing")]
    faults: Mutex<Vec<(StageKind, Fault)>>,
    pub(crate) healthy: AtomicBool,
    next_id: AtomicU64,
    pub(crate) opts: GraphOptions,
}

#[cfg(feature = "testing")]
impl Shared {
    pub(crate) fn take_fault(&self, kind: StageKind) -> Option<Fault> {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let pos = f.iter().position(|(k, _)| *k == kind)?;
        Some(f.remove(pos).1)
    }
}

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

    /// Each builder as one that builds the stage's worker: what the generic actor runs.
    fn workers(self, batching: &Batching) -> [(StageKind, Builder<Box<dyn Worker>>); 5] {
        let (b1, b2, b3) = (batching.clone(), batching.clone(), batching.clone());
        let StageBuilders {
            encoder,
            selector_merger,
            quantizer,
            llm,
            decoder,
        } = self;
        [
            (
                StageKind::Decoder,
                Box::new(move |d| Ok(Box::new(DecoderWorker::new(decoder(d)?)) as Box<dyn Worker>)),
            ),
            (
                StageKind::Llm,
                Box::new(move |d| Ok(Box::new(LlmWorker::new(llm(d)?, d)) as Box<dyn Worker>)),
            ),
            (
                StageKind::Quantizer,
                Box::new(move |d| {
                    let w = OneShot::new(quantizer(d)?, StageKind::Quantizer, d, &b3);
                    Ok(Box::new(w) as Box<dyn Worker>)
                }),
            ),
            (
                StageKind::SelectorMerger,
                Box::new(move |d| {
                    let s = selector_merger(d)?;
                    let w = OneShot::new(s, StageKind::SelectorMerger, d, &b2);
                    Ok(Box::new(w) as Box<dyn Worker>)
                }),
            ),
            (
                StageKind::Encoder,
                Box::new(move |d| {
                    let w = OneShot::new(encoder(d)?, StageKind::Encoder, d, &b1);
                    Ok(Box::new(w) as Box<dyn Worker>)
                }),
            ),
        ]
    }
}

/// The input of a request.
pub enum Input {
    /// (B, 3, H, W) CLIP-normalised images (tokenize, caption uses the first, reconstruct).
    Images(Tensor),
    /// A text prompt (generate).
    Prompt(String),
    /// A prompt as its parts in order (generate: text parts, each tokenized on its own, as
    /// the official `multimodal_synthesis` tokenizes its text parts).
    Parts(Vec<PromptPart>),
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

/// The running stage graph: five actors, the registry, admission and metrics.
pub struct StageGraph {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    open: AtomicBool,
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
        let workers = builders.workers(&opts.batching);
        let shared = Arc::new(Shared {
            registry: Arc::new(DashMap::new()),
            admission: Admission::new(opts.max_in_flight, opts.max_queue),
            metrics: Default::default(),
            records: Records::default(),
            exits: Arc::new(DashMap::new()),
            slots: StageKind::ALL.map(|_| MailboxSlots::new(placement.mailbox)),
            devices,
            inboxes: StageKind::ALL.map(|_| Arc::new(Inbox::default())),
            #[cfg(feature = "testing")]
            faults: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            opts,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let mut graph = StageGraph {
            shared: shared.clone(),
            threads: Vec::new(),
            open: AtomicBool::new(true),
        };
        let mut first_err = None;
        // Downstream first (the inboxes all exist already, so the order is only the order
        // in which the stages start taking work).
        for (kind, build) in workers {
            let sh = shared.clone();
            let ready = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lavit-{}", kind.name()))
                .spawn(move || {
                    let device = sh.devices[kind.index()];
                    let r = catch_unwind(AssertUnwindSafe(|| build(device)))
                        .unwrap_or_else(|p| Err(crate::Error::invalid(panic_message(&*p))));
                    let worker = match r {
                        Ok(w) => {
                            let _ = ready.send((kind, Ok(())));
                            Some(w)
                        }
                        Err(e) => {
                            let _ = ready.send((kind, Err(e)));
                            None
                        }
                    };
                    drop(ready);
                    StageActor::new(kind, sh, worker).run();
                });
            match spawned {
                Ok(t) => graph.threads.push(t),
                Err(e) => {
                    first_err.get_or_insert(crate::Error::invalid(format!(
                        "cannot spawn the {kind} stage's thread: {e}"
                    )));
                }
            }
        }
        drop(ready_tx);
        for _ in 0..graph.threads.len() {
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
    /// The next step of `stage` fails with `fault` (chaos testing of the recovery policy;
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

    /// Hand a new request's input to the stage its input is for (waiting while that
    /// stage's mailbox is full).
    async fn enter(&self, mut meta: RequestMeta, stage: StageKind, body: Payload) {
        let i = stage.index();
        if !self.open.load(Ordering::SeqCst) || self.shared.inboxes[i].is_closed() {
            return meta.finish(Err(StageError::Closed { stage }));
        }
        match self.shared.slots[i].acquire(&meta.cancel).await {
            Ok(slot) => {
                let env = Envelope {
                    meta,
                    body,
                    slot: Some(slot),
                    sent: Instant::now(),
                };
                if let Err(env) = self.shared.inboxes[i].push_data(env) {
                    let mut meta = env.meta;
                    meta.finish(Err(StageError::Closed { stage }));
                }
            }
            Err(StageError::Cancelled) => meta.finish(Err(StageError::Cancelled)),
            Err(_) => meta.finish(Err(StageError::Closed { stage })),
        }
    }

    /// Start an admitted request: wait in the queue for an in-flight turn, then hand the input
    /// to the first stage of the task's route.
    pub async fn start(
        &self,
        mut ticket: AdmissionTicket,
        task: Task,
        input: Input,
    ) -> Result<RequestHandle, StageError> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(StageError::Draining);
        }
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
        let mut meta = RequestMeta {
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
        let invalid = |m: &str| Err(StageError::Invalid(m.into()));
        let entry: Result<(StageKind, Payload), StageError> = match (task, input) {
            (Task::Generate { .. }, Input::Prompt(prompt)) => Ok((
                StageKind::Llm,
                Payload::GeneratePrompt(GeneratePrompt {
                    prompt: vec![PromptPart::Text(prompt)],
                }),
            )),
            (Task::Generate { .. }, Input::Parts(prompt)) => Ok((
                StageKind::Llm,
                Payload::GeneratePrompt(GeneratePrompt { prompt }),
            )),
            (Task::Synthesize { parts, .. }, Input::Images(pixels)) => {
                let want = parts
                    .iter()
                    .filter(|p| matches!(p, SynthesisPart::Image))
                    .count();
                let got = pixels.size().first().copied().unwrap_or(0);
                if pixels.dim() != 4 || got != want as i64 {
                    Err(StageError::Invalid(format!(
                        "a synthesis prompt with {want} image parts needs {want} images \
                         (B, 3, H, W), got a tensor of shape {:?}",
                        pixels.size()
                    )))
                } else {
                    Ok((StageKind::Encoder, Payload::Images(Images { pixels })))
                }
            }
            (Task::Synthesize { .. }, _) => invalid("a synthesis takes its images as its input"),
            (Task::Caption { .. } | Task::Captions { .. }, Input::Embeds(embeds)) => Ok((
                StageKind::Llm,
                Payload::UnderstandingEmbeds(UnderstandingEmbeds { embeds }),
            )),
            (Task::Generate { .. }, _) => invalid("generate takes a text prompt"),
            (_, Input::Images(pixels)) => {
                Ok((StageKind::Encoder, Payload::Images(Images { pixels })))
            }
            (_, Input::Embeds(_)) => invalid("only a caption takes image embeddings"),
            (_, Input::Prompt(_) | Input::Parts(_)) => invalid("this task takes images"),
        };
        match entry {
            Ok((stage, body)) => self.enter(meta, stage, body).await,
            Err(e) => meta.finish(Err(e)),
        }
        Ok(handle)
    }

    /// Admit, start and wait: the one-call form.
    pub async fn run(&self, task: Task, input: Input) -> Result<Output, StageError> {
        let ticket = self.admit()?;
        let mut h = self.start(ticket, task, input).await?;
        h.wait().await
    }

    /// Send `stage` a control message that answers, and wait for the answer.
    async fn call<T>(
        &self,
        stage: StageKind,
        make: impl FnOnce(Answer<T>) -> Control,
    ) -> Result<T, StageError> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(StageError::Draining);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.inboxes[stage.index()]
            .push_control(make(tx))
            .map_err(|_| StageError::Closed { stage })?;
        rx.await.unwrap_or(Err(StageError::Closed { stage }))
    }

    /// What `stage` holds now, asked between two of its steps (the message overtakes the
    /// data queued in its mailbox).
    pub async fn stats(&self, stage: StageKind) -> Result<StageStats, StageError> {
        self.call(stage, Control::Stats).await
    }

    // --- training through the same actors ---

    /// Forward a training batch with grad along `batch.route` (starting at its first stage).
    pub async fn train_forward(&self, batch: TrainBatch) -> Result<TrainBatch, StageError> {
        if !self.open.load(Ordering::SeqCst) {
            return Err(StageError::Draining);
        }
        let Some(&first) = batch.route.first() else {
            return Err(StageError::Invalid("empty training route".into()));
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let m = TrainForward { batch, reply: tx };
        self.shared.inboxes[first.index()]
            .push_control(Control::TrainForward(m))
            .map_err(|_| StageError::Closed { stage: first })?;
        rx.await.unwrap_or(Err(StageError::Closed { stage: first }))
    }

    /// Backward from `loss` on `stage`'s thread (the autograd graph spans the stages).
    pub async fn backward(&self, stage: StageKind, loss: Tensor) -> Result<f64, StageError> {
        self.call(stage, |tx| Control::Backward(Backward { loss }, tx))
            .await
    }

    /// One optimiser step on every stage in `stages` (each on its own thread).
    pub async fn optimizer_step(&self, stages: &[StageKind]) -> Result<(), StageError> {
        for &stage in stages {
            self.call(stage, |tx| Control::OptimizerStep(OptimizerStep, tx))
                .await?;
        }
        Ok(())
    }

    /// One optimiser step on `stage` under the driver's control (learning rate, skip).
    pub async fn optimizer_step_with(
        &self,
        stage: StageKind,
        ctl: StepControl,
    ) -> Result<StepReport, StageError> {
        self.call(stage, |tx| {
            Control::OptimizerStepWith(OptimizerStepWith(ctl), tx)
        })
        .await
    }

    /// `stage`'s training state (named state dicts) for a checkpoint or an export.
    pub async fn train_state(&self, stage: StageKind) -> Result<TrainParts, StageError> {
        self.call(stage, |tx| Control::GetTrainState(GetTrainState, tx))
            .await
    }

    /// The parameters `stage` trains (shallow handles, see `Trainable::trained_params`).
    pub async fn trained_params(
        &self,
        stage: StageKind,
    ) -> Result<Vec<(String, Tensor)>, StageError> {
        self.call(stage, |tx| Control::GetTrainedParams(GetTrainedParams, tx))
            .await
    }

    /// Hand `stage` the training run's data-parallel group (answered once it holds it).
    pub async fn set_process_group(
        &self,
        stage: StageKind,
        pg: Arc<crate::dist::ProcessGroup>,
    ) -> Result<(), StageError> {
        self.call(stage, |tx| {
            Control::SetProcessGroup(SetProcessGroup(pg), tx)
        })
        .await
    }

    /// Load a training state (a resumed checkpoint) into `stage`.
    pub async fn load_train_state(
        &self,
        stage: StageKind,
        parts: TrainParts,
    ) -> Result<(), StageError> {
        self.call(stage, |tx| Control::SetTrainState(SetTrainState(parts), tx))
            .await
    }

    /// Switch every stage between training and inference behaviour.
    pub fn set_train(&self, train: bool) {
        for inbox in &self.shared.inboxes {
            let _ = inbox.push_control(Control::SetTrain(SetTrain(train)));
        }
    }

    /// Refuse new requests, wait for the admitted ones (at most `timeout`); `true` if all
    /// finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.shared.admission.drain(timeout).await
    }

    /// Tell every stage to quit (upstream first) and wait for their threads: what they held
    /// fails as closed.
    pub fn shutdown(&mut self) {
        self.open.store(false, Ordering::SeqCst);
        for kind in StageKind::ALL {
            let _ = self.shared.inboxes[kind.index()].push_control(Control::Quit);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for StageGraph {
    fn drop(&mut self) {
        self.shutdown();
    }
}
