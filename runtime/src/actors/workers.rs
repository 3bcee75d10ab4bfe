//! What the generic stage actor drives: one [`Worker`] per stage trait. A worker holds the
//! requests that reached its stage and advances all of them by one step per call:
//! - the tokenizer stages ([`OneShot`] over [`EncoderStage`], [`SelectorMergerStage`],
//!   [`QuantizerStage`]): a step is one call on the images of every request in it, up to
//!   [`Batching::max_batch`] images, after a short wait for more
//!   ([`Batching::max_wait_ms`]) while other requests are admitted;
//! - the Llm and the Decoder: their own running batches (see their stage traits).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::messages::*;
use crate::stage::*;

/// What a step says about one of its requests.
pub enum Event {
    /// A streamed caption piece (sent to the client at once).
    Token(TokenEvent),
    /// Done here: the input of the next stage on the request's route.
    Forward(Payload),
    /// Done: the request's answer.
    Reply(Output),
    /// This request failed (the others of the step go on).
    Fail(StageError),
}

/// One stage's requests, advanced one step at a time by [`super::StageActor`].
pub trait Worker: Send {
    /// Take a request's input (cheap: checks, no forward pass). An error answers the
    /// request at once.
    fn join(&mut self, key: u64, task: &Task, body: Payload) -> StageResult<()>;
    /// Requests held (waiting for a step, or in the running batch).
    fn held(&self) -> usize;
    /// Whether more requests may join now (else they wait in the mailbox: backpressure).
    fn has_room(&self) -> bool;
    /// When the next step should run: `None` = nothing to do; a past instant = now; a later
    /// one = a batching window. `others` says whether other admitted requests may still come.
    fn due(&self, others: bool) -> Option<Instant>;
    /// Choose the members of the next step (admitting waiting requests as the budget allows).
    fn plan(&mut self) -> Vec<u64>;
    /// One forward over the planned members; `emit` takes one event per finished member and
    /// any streamed pieces. `should_stop` counts one unit of progress for every member and
    /// says whether to give up waiting (a member was cancelled, or a control message waits).
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Event),
    ) -> StageResult<()>;
    /// Forget a request (cancelled or failed): free what it holds.
    fn leave(&mut self, key: u64);
    /// The stage's training hooks.
    fn trainable(&mut self) -> &mut dyn Trainable;
    /// The gauges of a stage that has any (the Llm's KV blocks in use and in the pool).
    fn kv_blocks(&self) -> Option<(usize, usize)> {
        None
    }
    /// Tokens generated so far (the Llm).
    fn tokens(&self) -> u64 {
        0
    }
}

// ---------------------------------------------------------------------------------------------
// The tokenizer stages: one call per step on the images of every request in it.

/// A tokenizer stage seen by [`OneShot`]: how many images a request brings, and one call
/// over several requests' inputs.
pub trait ImageStage: Send {
    /// Images in a request's input; an error refuses the request.
    fn rows(&self, task: &Task, body: &Payload) -> StageResult<i64>;
    /// One forward over the inputs of `batch` (in order, on any device): one event each.
    fn run(&mut self, device: Device, batch: Vec<(&Task, Payload)>) -> StageResult<Vec<Event>>;
    fn trainable(&mut self) -> &mut dyn Trainable;
}

struct Pending {
    key: u64,
    task: Task,
    body: Payload,
    rows: i64,
    arrived: Instant,
}

/// A tokenizer stage under the generic actor: waiting requests are taken in order into one
/// call, up to `max_batch` images (a request with more runs alone).
pub struct OneShot<S: ImageStage> {
    stage: S,
    kind: StageKind,
    device: Device,
    max_batch: i64,
    max_wait: Duration,
    waiting: VecDeque<Pending>,
    planned: Vec<Pending>,
}

impl<S: ImageStage> OneShot<S> {
    pub fn new(stage: S, kind: StageKind, device: Device, batching: &Batching) -> Self {
        OneShot {
            stage,
            kind,
            device,
            max_batch: batching.max_batch.max(1) as i64,
            max_wait: batching.max_wait(),
            waiting: VecDeque::new(),
            planned: Vec::new(),
        }
    }
}

impl<S: ImageStage> Worker for OneShot<S> {
    fn join(&mut self, key: u64, task: &Task, body: Payload) -> StageResult<()> {
        let rows = self.stage.rows(task, &body)?;
        self.waiting.push_back(Pending {
            key,
            task: task.clone(),
            body,
            rows,
            arrived: Instant::now(),
        });
        Ok(())
    }
    fn held(&self) -> usize {
        self.waiting.len() + self.planned.len()
    }
    fn has_room(&self) -> bool {
        self.waiting.iter().map(|p| p.rows).sum::<i64>() < self.max_batch
    }
    fn due(&self, others: bool) -> Option<Instant> {
        let first = self.waiting.front()?;
        let rows: i64 = self.waiting.iter().map(|p| p.rows).sum();
        if rows >= self.max_batch || !others {
            Some(first.arrived)
        } else {
            Some(first.arrived + self.max_wait)
        }
    }
    fn plan(&mut self) -> Vec<u64> {
        let mut rows = 0;
        while let Some(p) = self.waiting.front() {
            if !self.planned.is_empty() && rows + p.rows > self.max_batch {
                break;
            }
            rows += p.rows;
            if let Some(p) = self.waiting.pop_front() {
                self.planned.push(p);
            }
        }
        self.planned.iter().map(|p| p.key).collect()
    }
    fn step(
        &mut self,
        _should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Event),
    ) -> StageResult<()> {
        let batch = std::mem::take(&mut self.planned);
        let keys: Vec<u64> = batch.iter().map(|p| p.key).collect();
        let tasks: Vec<Task> = batch.iter().map(|p| p.task.clone()).collect();
        let inputs = tasks.iter().zip(batch).map(|(t, p)| (t, p.body)).collect();
        let events = self.stage.run(self.device, inputs)?;
        if events.len() != keys.len() {
            return Err(StageError::failed(
                self.kind,
                format!("{} answers for {} requests", events.len(), keys.len()),
            ));
        }
        for (k, e) in keys.into_iter().zip(events) {
            emit(k, e);
        }
        Ok(())
    }
    fn leave(&mut self, key: u64) {
        self.waiting.retain(|p| p.key != key);
        self.planned.retain(|p| p.key != key);
    }
    fn trainable(&mut self) -> &mut dyn Trainable {
        self.stage.trainable()
    }
}

fn wrong_input(kind: StageKind, body: &Payload) -> StageError {
    StageError::Invalid(format!("the {kind} stage does not take {}", body.name()))
}

/// The batch size of a (B, …) tensor, or an error naming what it is.
fn batch_of(t: &Tensor, what: &str, dims: usize) -> StageResult<i64> {
    let s = t.size();
    if s.len() != dims || s[0] < 1 {
        return Err(StageError::Invalid(format!(
            "{what} must have {dims} dimensions and at least one row, got {s:?}"
        )));
    }
    Ok(s[0])
}

/// Indices of `items` grouped by `key` (first-seen order), so that each group concatenates.
fn groups<T, K: PartialEq>(items: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<usize>> {
    let mut keys: Vec<K> = Vec::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let k = key(it);
        match keys.iter().position(|x| *x == k) {
            Some(g) => out[g].push(i),
            None => {
                keys.push(k);
                out.push(vec![i]);
            }
        }
    }
    out
}

/// Row counts of `parts` (B_i, …) and their concatenation on `device`.
fn cat_rows(parts: &[&Tensor], device: Device) -> (Tensor, Vec<i64>) {
    let rows = parts.iter().map(|t| t.size()[0]).collect();
    let moved: Vec<Tensor> = parts.iter().map(|t| t.to_device(device)).collect();
    (Tensor::cat(&moved, 0), rows)
}

/// `x` (ΣB_i, …) split back into the members' rows.
fn split_rows(x: &Tensor, rows: &[i64]) -> Vec<Tensor> {
    let mut at = 0;
    rows.iter()
        .map(|&n| {
            let t = x.narrow(0, at, n);
            at += n;
            t
        })
        .collect()
}

/// A group whose call failed: each of its requests fails with that error (the other
/// groups of the step go on).
fn fail_group(out: &mut [Option<Event>], group: &[usize], r: StageResult<()>) {
    if let Err(e) = r {
        for &i in group {
            out[i] = Some(Event::Fail(e.clone()));
        }
    }
}

/// The keep/drop selection a request asks for (`None`: the stage's default).
fn selection_of(task: &Task) -> Option<SelectionChoice> {
    match task {
        Task::Select { selection } => *selection,
        _ => None,
    }
}

fn take_all<T>(v: Vec<Option<T>>, kind: StageKind) -> StageResult<Vec<T>> {
    v.into_iter()
        .map(|e| e.ok_or_else(|| StageError::failed(kind, "a request of the step got no answer")))
        .collect()
}

impl ImageStage for Box<dyn EncoderStage> {
    fn rows(&self, _: &Task, body: &Payload) -> StageResult<i64> {
        match body {
            Payload::Images(i) => batch_of(&i.pixels, "images", 4),
            other => Err(wrong_input(StageKind::Encoder, other)),
        }
    }
    fn run(&mut self, device: Device, batch: Vec<(&Task, Payload)>) -> StageResult<Vec<Event>> {
        let pixels: Vec<Tensor> = batch
            .into_iter()
            .map(|(_, b)| match b {
                Payload::Images(i) => Ok(i.pixels),
                other => Err(wrong_input(StageKind::Encoder, &other)),
            })
            .collect::<StageResult<_>>()?;
        let mut out: Vec<Option<Event>> = (0..pixels.len()).map(|_| None).collect();
        for g in groups(&pixels, |t| (t.size()[1..].to_vec(), t.kind())) {
            let r = (|| -> StageResult<()> {
                let parts: Vec<&Tensor> = g.iter().map(|&i| &pixels[i]).collect();
                let (x, rows) = cat_rows(&parts, device);
                let features = self.encode(&x)?; // (ΣB, N, C)
                for (&i, features) in g.iter().zip(split_rows(&features, &rows)) {
                    out[i] = Some(Event::Forward(Payload::PatchFeatures(PatchFeatures {
                        features,
                    })));
                }
                Ok(())
            })();
            fail_group(&mut out, &g, r);
        }
        take_all(out, StageKind::Encoder)
    }
    fn trainable(&mut self) -> &mut dyn Trainable {
        &mut **self
    }
}

fn is_understanding(task: &Task) -> bool {
    matches!(task, Task::Caption { .. } | Task::Captions { .. })
}

impl ImageStage for Box<dyn SelectorMergerStage> {
    fn rows(&self, _: &Task, body: &Payload) -> StageResult<i64> {
        match body {
            Payload::PatchFeatures(f) => batch_of(&f.features, "patch features", 3),
            other => Err(wrong_input(StageKind::SelectorMerger, other)),
        }
    }
    fn run(&mut self, device: Device, batch: Vec<(&Task, Payload)>) -> StageResult<Vec<Event>> {
        let (tasks, feats): (Vec<&Task>, Vec<Tensor>) = batch
            .into_iter()
            .map(|(t, b)| match b {
                Payload::PatchFeatures(f) => Ok((t, f.features)),
                other => Err(wrong_input(StageKind::SelectorMerger, &other)),
            })
            .collect::<StageResult<Vec<_>>>()?
            .into_iter()
            .unzip();
        let mut out: Vec<Option<Event>> = (0..feats.len()).map(|_| None).collect();
        // Captions take the understanding path, the rest select and merge: one call per
        // selection choice (a request's own, or the stage's default).
        let items: Vec<(bool, Option<SelectionChoice>, &Tensor)> = tasks
            .iter()
            .map(|t| (is_understanding(t), selection_of(t)))
            .zip(&feats)
            .map(|((u, sel), f)| (u, sel, f))
            .collect();
        for g in groups(&items, |(u, sel, t)| {
            (*u, *sel, t.size()[1..].to_vec(), t.kind())
        }) {
            let r = (|| -> StageResult<()> {
                let parts: Vec<&Tensor> = g.iter().map(|&i| items[i].2).collect();
                let (x, rows) = cat_rows(&parts, device);
                if items[g[0]].0 {
                    let mut embeds = self.understanding(&x)?.into_iter();
                    for (&i, &n) in g.iter().zip(&rows) {
                        let mine: Vec<Tensor> = embeds.by_ref().take(n as usize).collect();
                        if mine.len() != n as usize {
                            return Err(StageError::failed(
                                StageKind::SelectorMerger,
                                "the understanding path returned too few images",
                            ));
                        }
                        out[i] = Some(Event::Forward(Payload::UnderstandingEmbeds(
                            UnderstandingEmbeds { embeds: mine },
                        )));
                    }
                } else {
                    let (decisions, merged) = self.select_merge(&x, items[g[0]].1)?;
                    let d = split_rows(&decisions, &rows);
                    let m = split_rows(&merged, &rows);
                    for ((&i, decisions), merged) in g.iter().zip(d).zip(m) {
                        out[i] = Some(Event::Forward(Payload::MergedFeatures(MergedFeatures {
                            decisions,
                            merged,
                        })));
                    }
                }
                Ok(())
            })();
            fail_group(&mut out, &g, r);
        }
        take_all(out, StageKind::SelectorMerger)
    }
    fn trainable(&mut self) -> &mut dyn Trainable {
        &mut **self
    }
}

impl ImageStage for Box<dyn QuantizerStage> {
    fn rows(&self, _: &Task, body: &Payload) -> StageResult<i64> {
        match body {
            Payload::MergedFeatures(m) => batch_of(&m.merged, "merged features", 3),
            other => Err(wrong_input(StageKind::Quantizer, other)),
        }
    }
    fn run(&mut self, device: Device, batch: Vec<(&Task, Payload)>) -> StageResult<Vec<Event>> {
        let (tasks, inputs): (Vec<&Task>, Vec<MergedFeatures>) = batch
            .into_iter()
            .map(|(t, b)| match b {
                Payload::MergedFeatures(m) => Ok((t, m)),
                other => Err(wrong_input(StageKind::Quantizer, &other)),
            })
            .collect::<StageResult<Vec<_>>>()?
            .into_iter()
            .unzip();
        let mut out: Vec<Option<Event>> = (0..inputs.len()).map(|_| None).collect();
        for g in groups(&inputs, |m| {
            (
                m.merged.size()[1..].to_vec(),
                m.decisions.size()[1..].to_vec(),
            )
        }) {
            let r = (|| -> StageResult<()> {
                let merged: Vec<&Tensor> = g.iter().map(|&i| &inputs[i].merged).collect();
                let decisions: Vec<&Tensor> = g.iter().map(|&i| &inputs[i].decisions).collect();
                let (m, rows) = cat_rows(&merged, device);
                let (d, _) = cat_rows(&decisions, device);
                let mut ids = self.quantize(&m, &d)?.into_iter();
                for (&i, &n) in g.iter().zip(&rows) {
                    let mine: Vec<Vec<i64>> = ids.by_ref().take(n as usize).collect();
                    if mine.len() != n as usize {
                        return Err(StageError::failed(
                            StageKind::Quantizer,
                            "the codebook returned ids for too few images",
                        ));
                    }
                    out[i] = Some(match tasks[i] {
                        Task::Select { .. } => Event::Reply(Output::Selection {
                            ids: mine,
                            keep: keep_masks(&inputs[i].decisions)?,
                        }),
                        t if t.next_after(StageKind::Quantizer).is_some() => {
                            Event::Forward(Payload::GeneratedIds(GeneratedIds { ids: mine }))
                        }
                        _ => Event::Reply(Output::VisualIds(mine)),
                    });
                }
                Ok(())
            })();
            fail_group(&mut out, &g, r);
        }
        take_all(out, StageKind::Quantizer)
    }
    fn trainable(&mut self) -> &mut dyn Trainable {
        &mut **self
    }
}

/// Keep decisions (B, N) → per image a keep flag per patch.
fn keep_masks(decisions: &Tensor) -> StageResult<Vec<Vec<bool>>> {
    let d = decisions
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float);
    let n = d.size().last().copied().unwrap_or(0);
    let flat = Vec::<f32>::try_from(d.reshape([-1]))
        .map_err(|e| StageError::failed(StageKind::Quantizer, e))?;
    Ok(flat
        .chunks(n.max(1) as usize)
        .map(|row| row.iter().map(|&v| v > 0.5).collect())
        .collect())
}

// ---------------------------------------------------------------------------------------------
// The Llm and the Decoder: their own running batches ([`Iterative`]).

/// What a request's answer is made of, remembered from its task.
enum LlmShape {
    /// Image tokens → the Decoder.
    ImageTokens,
    /// One streamed caption.
    Caption,
    /// A caption per image.
    Captions,
}

/// The Llm stage under the generic actor.
pub struct LlmWorker {
    stage: Box<dyn LlmStage>,
    device: Device,
    shapes: std::collections::HashMap<u64, LlmShape>,
}

impl LlmWorker {
    pub fn new(stage: Box<dyn LlmStage>, device: Device) -> Self {
        LlmWorker {
            stage,
            device,
            shapes: Default::default(),
        }
    }
}

/// An image's embeddings, then the question (when there is one).
fn caption_prompt(embeds: Tensor, question: &str) -> Vec<PromptPart> {
    let mut p = vec![PromptPart::ImageEmbeds(embeds)];
    if !question.is_empty() {
        p.push(PromptPart::Text(question.to_string()));
    }
    p
}

/// The Llm's prompt of a synthesis: text parts as text, each image part as the next image's
/// visual ids as they are (the official `tokenize_image(…, add_special=False)`: no [IMG] /
/// [/IMG] around them).
fn synthesis_prompt(parts: &[SynthesisPart], ids: Vec<Vec<i64>>) -> StageResult<Vec<PromptPart>> {
    let images = parts
        .iter()
        .filter(|p| matches!(p, SynthesisPart::Image))
        .count();
    if images != ids.len() {
        return Err(StageError::Invalid(format!(
            "a synthesis prompt with {images} image parts got visual ids of {} images",
            ids.len()
        )));
    }
    let mut ids = ids.into_iter();
    Ok(parts
        .iter()
        .map(|p| match p {
            SynthesisPart::Text(t) => PromptPart::Text(t.clone()),
            SynthesisPart::Image => PromptPart::Ids(ids.next().unwrap_or_default()),
        })
        .collect())
}

impl Worker for LlmWorker {
    fn join(&mut self, key: u64, task: &Task, body: Payload) -> StageResult<()> {
        let dev = self.device;
        let (req, shape) = match (task, body) {
            (Task::Generate { opts }, Payload::GeneratePrompt(p)) => (
                LlmRequest::ImageTokens {
                    prompt: p.prompt,
                    uncond: Vec::new(),
                    opts: opts.clone(),
                },
                LlmShape::ImageTokens,
            ),
            (Task::Synthesize { parts, opts }, Payload::GeneratedIds(g)) => (
                LlmRequest::ImageTokens {
                    prompt: synthesis_prompt(parts, g.ids)?,
                    uncond: Vec::new(),
                    opts: opts.clone(),
                },
                LlmShape::ImageTokens,
            ),
            (Task::Caption { prompt, opts }, Payload::UnderstandingEmbeds(u)) => {
                let first =
                    u.embeds.into_iter().next().ok_or_else(|| {
                        StageError::Invalid("no image in the caption request".into())
                    })?;
                let req = LlmRequest::Text {
                    prompts: vec![caption_prompt(first.to_device(dev), prompt)],
                    opts: opts.clone(),
                    stream: true,
                };
                (req, LlmShape::Caption)
            }
            (Task::Captions { prompt, opts }, Payload::UnderstandingEmbeds(u)) => {
                let prompts = u
                    .embeds
                    .into_iter()
                    .map(|e| caption_prompt(e.to_device(dev), prompt))
                    .collect();
                let req = LlmRequest::Text {
                    prompts,
                    opts: opts.clone(),
                    stream: false,
                };
                (req, LlmShape::Captions)
            }
            (_, other) => return Err(wrong_input(StageKind::Llm, &other)),
        };
        self.stage.join(key, req)?;
        self.shapes.insert(key, shape);
        Ok(())
    }
    fn held(&self) -> usize {
        self.stage.held()
    }
    fn has_room(&self) -> bool {
        self.stage.has_room()
    }
    fn due(&self, _others: bool) -> Option<Instant> {
        (self.stage.held() > 0).then(Instant::now)
    }
    fn plan(&mut self) -> Vec<u64> {
        self.stage.plan()
    }
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Event),
    ) -> StageResult<()> {
        let shapes = &mut self.shapes;
        self.stage.step(should_stop, &mut |key, ev| match ev {
            LlmEvent::Token(t) => emit(key, Event::Token(t)),
            LlmEvent::Done(out) => {
                let ev = match (shapes.remove(&key), out) {
                    (Some(LlmShape::ImageTokens), LlmOutput::ImageTokens(ids)) => {
                        Event::Forward(Payload::GeneratedIds(GeneratedIds { ids }))
                    }
                    (Some(LlmShape::Caption), LlmOutput::Text(mut t)) if !t.is_empty() => {
                        let a = t.swap_remove(0);
                        Event::Reply(Output::Text {
                            ids: a.ids,
                            text: a.text,
                            prompt_tokens: Some(a.prompt_tokens),
                        })
                    }
                    (Some(LlmShape::Captions), LlmOutput::Text(t)) => Event::Reply(Output::Texts(
                        t.into_iter().map(|a| (a.ids, a.text)).collect(),
                    )),
                    _ => Event::Fail(StageError::failed(
                        StageKind::Llm,
                        "the stage answered a request with another kind of output",
                    )),
                };
                emit(key, ev)
            }
        })
    }
    fn leave(&mut self, key: u64) {
        self.shapes.remove(&key);
        self.stage.leave(key);
    }
    fn trainable(&mut self) -> &mut dyn Trainable {
        &mut *self.stage
    }
    fn kv_blocks(&self) -> Option<(usize, usize)> {
        self.stage.kv_blocks()
    }
    fn tokens(&self) -> u64 {
        self.stage.tokens_generated()
    }
}

/// The Decoder stage under the generic actor.
pub struct DecoderWorker {
    stage: Box<dyn DecoderStage>,
    /// The ids each request's images are drawn from (part of its answer).
    ids: std::collections::HashMap<u64, Vec<Vec<i64>>>,
}

impl DecoderWorker {
    pub fn new(stage: Box<dyn DecoderStage>) -> Self {
        DecoderWorker {
            stage,
            ids: Default::default(),
        }
    }
}

impl Worker for DecoderWorker {
    fn join(&mut self, key: u64, task: &Task, body: Payload) -> StageResult<()> {
        match (task, body) {
            (
                Task::Generate { opts }
                | Task::Reconstruct { opts }
                | Task::Synthesize { opts, .. },
                Payload::GeneratedIds(g),
            ) => {
                let req = DecodeRequest {
                    ids: g.ids.clone(),
                    opts: opts.clone(),
                };
                self.stage.join(key, req)?;
                self.ids.insert(key, g.ids);
                Ok(())
            }
            (_, other) => Err(wrong_input(StageKind::Decoder, &other)),
        }
    }
    fn held(&self) -> usize {
        self.stage.held()
    }
    fn has_room(&self) -> bool {
        self.stage.has_room()
    }
    fn due(&self, _others: bool) -> Option<Instant> {
        (self.stage.held() > 0).then(Instant::now)
    }
    fn plan(&mut self) -> Vec<u64> {
        self.stage.plan()
    }
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Event),
    ) -> StageResult<()> {
        let ids = &mut self.ids;
        self.stage.step(should_stop, &mut |key, px| {
            let ids = ids.remove(&key).unwrap_or_default();
            emit(
                key,
                Event::Reply(Output::Pixels {
                    images: px.to_device(Device::Cpu),
                    ids,
                }),
            )
        })
    }
    fn leave(&mut self, key: u64) {
        self.ids.remove(&key);
        self.stage.leave(key);
    }
    fn trainable(&mut self) -> &mut dyn Trainable {
        &mut *self.stage
    }
}
