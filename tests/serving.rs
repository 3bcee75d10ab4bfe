//! Integration tests: the stage actors, the pipeline API and the HTTP server (loopback only,
//! bounded loops, every test stops what it started). Stages are the mock stages of
//! `lavit_runtime::mock` until the real models are wired (see `real_*` tests).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use lavit::pipeline::{Fault, Pipeline, PipelineConfig, StageKind};
use lavit::serve::{self, Limits, RunningServer};
use lavit_runtime::actors::Input;
use lavit_runtime::messages::{
    train_keys, CaptionOptions, DecodeRequest, GenerateOptions, LlmEvent, LlmOutput, LlmRequest,
    Output, PromptPart, Task, TrainBatch,
};
use lavit_runtime::mock::{self, Gate, MockConfig};
use lavit_runtime::stage::*;
use tch::{Device, Kind, Tensor};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn pcfg(in_flight: usize, queue: usize) -> PipelineConfig {
    PipelineConfig {
        max_in_flight: in_flight,
        max_queue: queue,
        ..PipelineConfig::default()
    }
}

/// Deterministic test images (no global RNG: tests run in parallel threads).
fn images(b: i64, seed: i64) -> Tensor {
    let n = b * 3 * 28 * 28;
    (Tensor::arange(n, (Kind::Float, Device::Cpu)) * (0.37 + seed as f64 * 0.011))
        .sin()
        .reshape([b, 3, 28, 28])
}

/// Poll `cond` every 5 ms for at most `secs` seconds.
pub(crate) fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// A caption of `prefix` by an Llm stage alone (a direct call: the request runs through the
/// stage's batch by itself).
fn caption_alone(
    llm: &mut dyn LlmStage,
    prefix: &Tensor,
    prompt: &str,
    opts: &CaptionOptions,
) -> Vec<i64> {
    let mut parts = vec![PromptPart::ImageEmbeds(prefix.shallow_clone())];
    if !prompt.is_empty() {
        parts.push(PromptPart::Text(prompt.into()));
    }
    let req = LlmRequest::Text {
        prompts: vec![parts],
        opts: opts.clone(),
        stream: false,
    };
    match run_alone(llm, req, &|| false).unwrap().pop() {
        Some(LlmEvent::Done(LlmOutput::Text(mut a))) => a.swap_remove(0).ids,
        other => panic!("{other:?}"),
    }
}

/// Image tokens of `prompt` by an Llm stage alone.
fn image_tokens_alone(
    llm: &mut dyn LlmStage,
    prompt: &str,
    opts: &GenerateOptions,
) -> Vec<Vec<i64>> {
    let req = LlmRequest::ImageTokens {
        prompt: vec![PromptPart::Text(prompt.into())],
        uncond: Vec::new(),
        opts: opts.clone(),
    };
    match run_alone(llm, req, &|| false).unwrap().pop() {
        Some(LlmEvent::Done(LlmOutput::ImageTokens(ids))) => ids,
        other => panic!("{other:?}"),
    }
}

/// Pixels of `ids` by a Decoder stage alone.
fn decode_alone(dec: &mut dyn DecoderStage, ids: &[Vec<i64>], opts: &GenerateOptions) -> Tensor {
    let req = DecodeRequest {
        ids: ids.to_vec(),
        opts: opts.clone(),
    };
    run_alone(dec, req, &|| false).unwrap().pop().unwrap()
}

// ------------------------------------------------------------------------------------------
// Actors == direct calls, overlap, cancellation, faults (no HTTP).

#[test]
fn placement_files_parse_and_bad_devices_are_refused() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    for f in [
        "placement-cpu.toml",
        "placement-1gpu.toml",
        "placement-3gpu.toml",
    ] {
        let p = Placement::from_file(&root.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(p.mailbox >= 1);
    }
    let three = Placement::from_file(&root.join("placement-3gpu.toml")).unwrap();
    let parsed = |k| lavit_runtime::device::parse_device(three.device_name(k)).unwrap();
    assert_eq!(parsed(StageKind::Llm), Device::Cuda(1));
    assert_eq!(parsed(StageKind::Decoder), Device::Cuda(2));
    if !tch::Cuda::is_available() {
        // Placed on a GPU this machine lacks: an error naming the stage, never the CPU.
        let e = three.device(StageKind::Llm).unwrap_err().to_string();
        assert!(e.contains("llm") && e.contains("CUDA"), "{e}");
    }
    let err = Placement::from_toml("[placement]\nllm = \"gpu7\"\n", "t.toml").unwrap_err();
    assert!(err.to_string().contains("placement.llm"), "{err}");
    let err = Placement::from_toml("[placement]\nmailbox = 0\n", "t.toml").unwrap_err();
    assert!(err.to_string().contains("mailbox"), "{err}");
    assert!(Placement::from_toml("[placement]\nbogus = 1\n", "t.toml").is_err());
    let cfg = serve::ServeConfig::from_file(&root.join("serve.toml")).unwrap();
    assert!(cfg.server.max_n >= 1);
}

#[test]
fn actors_equal_direct_calls_bit_for_bit() {
    let m = MockConfig::default();
    let pipe = Pipeline::mock(&m, None, &pcfg(4, 8)).unwrap();
    let rt = rt();
    let x = images(3, 1);
    // Direct calls of the same stages.
    let dev = Device::Cpu;
    let mut enc = mock::MockEncoder::new(&m, dev);
    let mut sm = mock::MockSelectorMerger::new(&m, dev);
    let mut q = mock::MockQuantizer::new(&m, dev);
    let mut llm = mock::MockLlm::new(&m, dev, None);
    let mut dec = mock::MockDecoder::new(&m, dev, None);
    let feats = enc.encode(&x).unwrap();
    let (keep, merged) = sm.select_merge(&feats, None).unwrap();
    let direct_ids = q.quantize(&merged, &keep).unwrap();

    let out = rt
        .block_on(
            pipe.graph()
                .run(Task::Tokenize, Input::Images(x.shallow_clone())),
        )
        .unwrap();
    let Output::VisualIds(ids) = out else {
        panic!("{out:?}")
    };
    assert_eq!(ids, direct_ids);
    assert!(
        ids.iter().any(|s| s.len() != ids[0].len()) || ids[0].len() < 16,
        "dynamic lengths"
    );

    let copts = CaptionOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let x0 = x.narrow(0, 0, 1);
    let und = sm.understanding(&enc.encode(&x0).unwrap()).unwrap();
    let direct_caption = caption_alone(&mut llm, &und[0], "what?", &copts);
    let task = Task::Caption {
        prompt: "what?".into(),
        opts: copts,
    };
    let Output::Text { ids, .. } = rt
        .block_on(pipe.graph().run(task, Input::Images(x0)))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(ids, direct_caption);

    let gopts = GenerateOptions {
        n: 2,
        steps: 4,
        seed: 3,
        ..Default::default()
    };
    let toks = image_tokens_alone(&mut llm, "a cat", &gopts);
    let px_direct = decode_alone(&mut dec, &toks, &gopts);
    let out = rt
        .block_on(pipe.graph().run(
            Task::Generate {
                opts: gopts.clone(),
            },
            Input::Prompt("a cat".into()),
        ))
        .unwrap();
    let Output::Pixels { images: px, .. } = out else {
        panic!()
    };
    assert_eq!(px.size(), [2, 3, 16, 16]);
    assert!(
        px.equal(&px_direct),
        "pixels through the actors differ from the direct calls"
    );

    // Reconstruct: quantizer ids straight into the decoder.
    let rec_direct = decode_alone(&mut dec, &direct_ids[..1], &gopts);
    let out = rt
        .block_on(pipe.graph().run(
            Task::Reconstruct { opts: gopts },
            Input::Images(x.narrow(0, 0, 1)),
        ))
        .unwrap();
    let Output::Pixels { images: px, .. } = out else {
        panic!()
    };
    assert!(px.equal(&rec_direct));
    assert_eq!(pipe.graph().admission().admitted(), 0);
}

#[test]
fn requests_overlap_across_stages() {
    let m = MockConfig {
        work: 30,
        ..Default::default()
    };
    let pipe = Arc::new(Pipeline::mock(&m, None, &pcfg(6, 0)).unwrap());
    let rt = rt();
    let n = 6;
    let results = rt.block_on(async {
        let futs = (0..n).map(|i| {
            let p = pipe.clone();
            async move {
                p.graph()
                    .run(Task::Tokenize, Input::Images(images(2, 100 + i)))
                    .await
            }
        });
        futures::future::join_all(futs).await
    });
    // Every result equals the direct computation.
    let mut enc = mock::MockEncoder::new(&m, Device::Cpu);
    let mut sm = mock::MockSelectorMerger::new(&m, Device::Cpu);
    let mut q = mock::MockQuantizer::new(&m, Device::Cpu);
    for (i, r) in results.into_iter().enumerate() {
        let Output::VisualIds(ids) = r.unwrap() else {
            panic!()
        };
        let (k, mm) = sm
            .select_merge(&enc.encode(&images(2, 100 + i as i64)).unwrap(), None)
            .unwrap();
        assert_eq!(ids, q.quantize(&mm, &k).unwrap());
    }
    // Overlap: from the stages' own start/end records, some stage worked on one request while
    // another stage worked on a different request.
    let recs = pipe.graph().records();
    assert_eq!(recs.len(), 3 * n as usize);
    let mut overlaps = 0;
    for a in &recs {
        for b in &recs {
            if a.stage != b.stage && a.request != b.request && a.start < b.end && b.start < a.end {
                overlaps += 1;
            }
        }
    }
    assert!(
        overlaps > 0,
        "no two stages ever worked at the same time: {recs:?}"
    );
    // The encoder batched the images of concurrent requests: some step took more than one.
    let enc = &pipe.graph().shared().metrics[StageKind::Encoder.index()].batch_size;
    let steps = enc.count(lavit_runtime::inflight::BATCH_BUCKETS.len());
    assert!(
        enc.count(0) < steps,
        "every encoder step took one request ({steps} steps)"
    );
    // Each stage runs one step at a time (its own thread): the requests of one step (a batch)
    // share its interval, and two steps never overlap.
    for k in [
        StageKind::Encoder,
        StageKind::SelectorMerger,
        StageKind::Quantizer,
    ] {
        let mut steps: Vec<_> = recs
            .iter()
            .filter(|r| r.stage == k)
            .map(|r| (r.start, r.end))
            .collect();
        steps.sort();
        steps.dedup();
        assert!(
            steps.windows(2).all(|w| w[0].1 <= w[1].0),
            "{k} ran two steps at once: {steps:?}"
        );
    }
}

#[test]
fn cancellation_stops_the_diffusion_loop_within_one_step() {
    let m = MockConfig::default();
    let pipe = Pipeline::mock(&m, None, &pcfg(2, 0)).unwrap();
    let rt = rt();
    rt.block_on(async {
        let g = pipe.graph();
        let ticket = g.admit().unwrap();
        let opts = GenerateOptions {
            steps: 10_000_000,
            ..Default::default()
        };
        let mut h = g
            .start(ticket, Task::Generate { opts }, Input::Prompt("x".into()))
            .await
            .unwrap();
        let entry = loop {
            if let Some(e) = g.in_flight().into_iter().find(|e| e.id == h.id) {
                if e.progress.load(std::sync::atomic::Ordering::SeqCst) > 20 {
                    break e;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert!(g.cancel(h.id));
        let p0 = entry.progress.load(std::sync::atomic::Ordering::SeqCst);
        let r = tokio::time::timeout(Duration::from_secs(10), h.wait())
            .await
            .expect("cancel hung");
        assert_eq!(r.unwrap_err(), StageError::Cancelled);
        let p1 = entry.progress.load(std::sync::atomic::Ordering::SeqCst);
        assert!(p1 <= p0 + 1, "ran {} steps after the cancel", p1 - p0);
        assert_eq!(g.admission().admitted(), 0, "the slot was not freed");
    });
}

/// Control messages overtake the data queued in a stage's mailbox: with the Llm's step held
/// at a closed gate and requests queued behind it, `stats` is answered at once (the held
/// step gives way), and the requests finish, batched, once the gate opens.
#[test]
fn control_messages_overtake_queued_requests() {
    let gate = Gate::closed();
    // Mailboxes deep enough for the six requests (the held one and five queued).
    let mut cfg = pcfg(8, 0);
    cfg.placement.mailbox = 8;
    let pipe = Pipeline::mock(&MockConfig::default(), Some(gate.clone()), &cfg).unwrap();
    let rt = rt();
    let g = pipe.graph();
    let gen = |i: u64| Task::Generate {
        opts: GenerateOptions {
            steps: 2,
            seed: i,
            ..Default::default()
        },
    };
    rt.block_on(async {
        let t0 = Instant::now();
        let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: stages {:?}",
                g.in_flight()
                    .iter()
                    .map(|e| e.current_stage())
                    .collect::<Vec<_>>()
            );
            !ok()
        };
        // The first reaches the Llm, whose step waits at the gate (it has ticked once)...
        let mut handles = vec![g
            .start(g.admit().unwrap(), gen(0), Input::Prompt("p0".into()))
            .await
            .unwrap()];
        let stepping = || {
            g.in_flight().iter().any(|e| {
                e.current_stage() == Some(StageKind::Llm)
                    && e.progress.load(std::sync::atomic::Ordering::SeqCst) > 0
            })
        };
        while wait_for("the first request never reached the Llm's step", &stepping) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // ... and the others queue behind that step in its mailbox.
        for i in 1..6 {
            handles.push(
                g.start(g.admit().unwrap(), gen(i), Input::Prompt(format!("p{i}")))
                    .await
                    .unwrap(),
            );
        }
        let llm_slots = &g.shared().slots[StageKind::Llm.index()];
        while wait_for("nothing queued at the Llm", &|| llm_slots.depth() >= 1) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let s = tokio::time::timeout(Duration::from_secs(5), g.stats(StageKind::Llm))
            .await
            .expect("stats waited behind the held step")
            .unwrap();
        assert!(s.held >= 1 && s.queued >= 1, "{s:?}");
        gate.open();
        for mut h in handles {
            let out = tokio::time::timeout(Duration::from_secs(20), h.wait())
                .await
                .expect("a request hung")
                .unwrap();
            assert!(matches!(out, Output::Pixels { .. }));
        }
        // They advanced together: some Llm step held several of them.
        let llm = &g.shared().metrics[StageKind::Llm.index()].batch_size;
        assert!(llm.count(0) < llm.count(lavit_runtime::inflight::BATCH_BUCKETS.len()));
    });
}

/// The Decoder denoises the images of concurrent requests in shared U-Net calls (different
/// seeds, step counts and guidance; one joining later), and each gets the pixels it gets
/// alone (the fixture's highres decoder, float32).
#[test]
fn decoder_batches_denoising_steps_and_each_request_gets_what_it_gets_alone() {
    let dir = crate::common::fixture_dir();
    let cfg = PipelineConfig {
        checkpoint: Some(dir.clone()),
        ..Default::default()
    };
    let (b, info) = lavit::pipeline::builders(&cfg).unwrap();
    let mut dec = (b.decoder)(Device::Cpu).unwrap();
    let m = lavit_runtime::manifest::LavitManifest::for_checkpoint(&dir).unwrap();
    let (off, k) = (m.llm.visual_token_offset, m.tokenizer.n_code);
    let (w, h) = info.default_size;
    let req = |i: i64| {
        let ids: Vec<Vec<i64>> = (0..1 + i % 2)
            .map(|s| {
                (0..5 + 3 * i + s)
                    .map(|j| off + (j * 7 + i * 31 + s) % k)
                    .collect()
            })
            .collect();
        DecodeRequest {
            ids,
            opts: GenerateOptions {
                seed: 10 + i as u64,
                steps: [3, 5, 3, 4][i as usize],
                guidance: [2.0, 1.0, 7.0, 2.0][i as usize],
                width: w,
                height: h,
                ..Default::default()
            },
        }
    };
    let alone: Vec<Tensor> = (0..4)
        .map(|i| {
            run_alone(&mut *dec, req(i), &|| false)
                .unwrap()
                .pop()
                .unwrap()
        })
        .collect();
    let mut got: Vec<Option<Tensor>> = (0..4).map(|_| None).collect();
    dec.join(0, req(0)).unwrap();
    dec.join(1, req(1)).unwrap();
    let mut most = 0;
    let mut steps = 0;
    while dec.held() > 0 {
        if steps == 1 {
            dec.join(2, req(2)).unwrap();
            dec.join(3, req(3)).unwrap();
        }
        most = most.max(dec.plan().len());
        dec.step(&|| false, &mut |key, px| got[key as usize] = Some(px))
            .unwrap();
        steps += 1;
        assert!(steps < 100);
    }
    assert_eq!(most, 4, "the four requests never shared a step");
    for (i, (a, b)) in alone.iter().zip(&got).enumerate() {
        let b = b.as_ref().unwrap();
        assert_eq!(a.size(), b.size());
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-4, "request {i}: batched differs from alone by {d}");
    }
}

#[test]
fn stage_errors_and_panics_fail_one_request_and_the_stage_recovers() {
    let m = MockConfig::default();
    let pipe = Pipeline::mock(&m, None, &pcfg(2, 2)).unwrap();
    let rt = rt();
    let g = pipe.graph();
    let gen = || Task::Generate {
        opts: GenerateOptions {
            steps: 2,
            ..Default::default()
        },
    };
    g.inject_fault(StageKind::Llm, Fault::Error);
    let e = rt
        .block_on(g.run(gen(), Input::Prompt("a".into())))
        .unwrap_err();
    assert!(
        matches!(
            e,
            StageError::Failed {
                stage: StageKind::Llm,
                ..
            }
        ),
        "{e}"
    );
    g.inject_fault(StageKind::Decoder, Fault::Panic);
    let e = rt
        .block_on(g.run(gen(), Input::Prompt("a".into())))
        .unwrap_err();
    assert!(
        matches!(
            e,
            StageError::Panicked {
                stage: StageKind::Decoder,
                ..
            }
        ),
        "{e}"
    );
    // Recovered: the next requests succeed, and the graph is healthy.
    assert!(rt.block_on(g.run(gen(), Input::Prompt("a".into()))).is_ok());
    assert!(rt
        .block_on(g.run(Task::Tokenize, Input::Images(images(1, 5))))
        .is_ok());
    assert!(g.healthy());
    // Three panics in a row: the stage exits, the graph is unhealthy, requests fail as closed.
    for _ in 0..3 {
        g.inject_fault(StageKind::Quantizer, Fault::Panic);
        let e = rt
            .block_on(g.run(Task::Tokenize, Input::Images(images(1, 5))))
            .unwrap_err();
        assert!(matches!(e, StageError::Panicked { .. }), "{e}");
    }
    assert!(!g.healthy());
    assert_eq!(
        g.exit_status(StageKind::Quantizer),
        Some(ExitStatus::Panicked)
    );
    let e = rt
        .block_on(g.run(Task::Tokenize, Input::Images(images(1, 5))))
        .unwrap_err();
    assert_eq!(
        e,
        StageError::Closed {
            stage: StageKind::Quantizer
        }
    );
    assert_eq!(g.admission().admitted(), 0);
}

/// A trainable mock stage pair for the training path through the actors: a linear
/// "selector/merger" and a "decoder" head that reconstructs the patch features.
struct TrainSm {
    w: Tensor,
    lr: f64,
}
impl Trainable for TrainSm {
    fn train_forward(&mut self, mut b: TrainBatch) -> StageResult<TrainBatch> {
        let x = b.tensors[&train_keys::PATCH_FEATURES].shallow_clone();
        b.tensors.insert(train_keys::MERGED, x.matmul(&self.w));
        Ok(b)
    }
    fn optimizer_step(&mut self) -> StageResult<()> {
        tch::no_grad(|| {
            let g = self.w.grad();
            let _ = self.w.f_sub_(&(g * self.lr)).unwrap();
        });
        self.w.zero_grad();
        Ok(())
    }
}
impl SelectorMergerStage for TrainSm {
    fn select_merge(
        &mut self,
        _: &Tensor,
        _: Option<lavit_runtime::manifest::SelectionChoice>,
    ) -> StageResult<(Tensor, Tensor)> {
        Err(StageError::Invalid("training-only stage".into()))
    }
    fn understanding(&mut self, _: &Tensor) -> StageResult<Vec<Tensor>> {
        Err(StageError::Invalid("training-only stage".into()))
    }
}
struct TrainDec {
    w: Tensor,
    lr: f64,
}
impl Trainable for TrainDec {
    fn train_forward(&mut self, mut b: TrainBatch) -> StageResult<TrainBatch> {
        let rec = b.tensors[&train_keys::MERGED].matmul(&self.w);
        let target = &b.tensors[&train_keys::PATCH_FEATURES];
        let loss = (-Tensor::cosine_similarity(&rec, target, -1, 1e-8) + 1.0).mean(Kind::Float);
        b.losses.push((train_keys::LOSS_RECONSTRUCTION, loss));
        Ok(b)
    }
    fn optimizer_step(&mut self) -> StageResult<()> {
        tch::no_grad(|| {
            let g = self.w.grad();
            let _ = self.w.f_sub_(&(g * self.lr)).unwrap();
        });
        self.w.zero_grad();
        Ok(())
    }
}
impl Iterative<DecodeRequest, Tensor> for TrainDec {
    fn join(&mut self, _: u64, _: DecodeRequest) -> StageResult<()> {
        Err(StageError::Invalid("training-only stage".into()))
    }
    fn held(&self) -> usize {
        0
    }
    fn plan(&mut self) -> Vec<u64> {
        Vec::new()
    }
    fn step(&mut self, _: ShouldStop, _: &mut dyn FnMut(u64, Tensor)) -> StageResult<()> {
        Ok(())
    }
    fn leave(&mut self, _: u64) {}
}
impl DecoderStage for TrainDec {}

#[test]
fn training_steps_through_the_actor_graph_lower_the_loss() {
    let m = MockConfig::default();
    let mut b = mock::builders(&m, None);
    b.selector_merger = Box::new(|d| {
        tch::manual_seed(11);
        let w = (Tensor::randn([32, 8], (Kind::Float, d)) * 0.3).set_requires_grad(true);
        Ok(Box::new(TrainSm { w, lr: 0.5 }) as Box<dyn SelectorMergerStage>)
    });
    b.decoder = Box::new(|d| {
        tch::manual_seed(12);
        let w = (Tensor::randn([8, 32], (Kind::Float, d)) * 0.3).set_requires_grad(true);
        Ok(Box::new(TrainDec { w, lr: 0.5 }) as Box<dyn DecoderStage>)
    });
    let info = lavit::pipeline::ModelInfo {
        image_size: 28,
        default_size: (16, 16),
        size_multiple: 1,
        max_steps: usize::MAX,
        generate_defaults: Default::default(),
        selection: Default::default(),
        selection_note: None,
        synthesis: Default::default(),
    };
    let pipe = Pipeline::from_builders(b, info, &Placement::default(), Default::default()).unwrap();
    let g = pipe.graph();
    let rt = rt();
    let mut enc = mock::MockEncoder::new(&m, Device::Cpu);
    let feats = enc.encode(&images(4, 9)).unwrap(); // frozen encoder features, (4, 16, 32)
    let mut losses = Vec::new();
    rt.block_on(async {
        g.set_train(true);
        for _ in 0..30 {
            let mut batch = TrainBatch::new(vec![
                StageKind::SelectorMerger,
                StageKind::Quantizer,
                StageKind::Decoder,
            ]);
            batch
                .tensors
                .insert(train_keys::PATCH_FEATURES, feats.shallow_clone());
            let out = g.train_forward(batch).await.unwrap();
            let loss = out.total_loss(Device::Cpu).unwrap();
            losses.push(g.backward(StageKind::Decoder, loss).await.unwrap());
            g.optimizer_step(&[StageKind::SelectorMerger, StageKind::Decoder])
                .await
                .unwrap();
        }
    });
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(
        losses[29] < 0.7 * losses[0],
        "loss did not fall: {losses:?}"
    );
}

// ------------------------------------------------------------------------------------------
// HTTP.

fn limits() -> Limits {
    Limits {
        bind: "127.0.0.1:0".into(),
        warmup: true,
        max_steps: 100_000_000,
        // The long-running requests of the cancellation tests are far over the default budget.
        max_request_cost: 1e12,
        drain_timeout_s: 10,
        ..Limits::default()
    }
}

fn server(in_flight: usize, queue: usize, gate: Option<Gate>, lim: Limits) -> RunningServer {
    let pipe =
        Arc::new(Pipeline::mock(&MockConfig::default(), gate, &pcfg(in_flight, queue)).unwrap());
    serve::spawn(pipe, lim).unwrap()
}

fn ready(s: &RunningServer) {
    rt().block_on(serve::mark_ready(s)).unwrap();
}

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) body: String,
}

pub(crate) fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Resp {
    // Status 0 = no HTTP answer (connection refused or closed).
    let Ok(mut s) = TcpStream::connect(addr) else {
        return Resp {
            status: 0,
            body: String::new(),
        };
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if h
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(b)
    } else {
        b.to_string()
    };
    Resp { status, body }
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        b = rest[n..].trim_start_matches("\r\n");
    }
    out
}

pub(crate) fn post(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    request(addr, "POST", path, body.to_string().as_bytes(), &[])
}

fn png_b64(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
}

fn chat_body(img: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "lavit", "stream": stream, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{img}")}}]}]})
}

#[test]
fn http_endpoints_work_and_streaming_matches() {
    let s = server(2, 4, None, limits());
    assert_eq!(
        request(s.addr, "GET", "/ready", b"", &[]).status,
        503,
        "ready before warm-up"
    );
    ready(&s);
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    assert_eq!(request(s.addr, "GET", "/ready", b"", &[]).status, 200);
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a red cat", "n": 2, "steps": 3, "seed": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let png = base64::engine::general_purpose::STANDARD
        .decode(data[0]["b64_json"].as_str().unwrap())
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));

    let img = png_b64(40, 30);
    let r = post(
        s.addr,
        "/v1/tokenize",
        &serde_json::json!({"images": [img.clone(), png_b64(28, 28)]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);

    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, true));
    assert_eq!(r.status, 200);
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", r.body);
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed.trim(), full);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_stage_latency_seconds_bucket{stage=\"llm\",le=\"+Inf\"}"),
        "{m}"
    );
    assert!(m.contains("lavit_http_responses_total{class=\"2xx\"}"));
    assert!(m.contains("lavit_queue_depth 0"));
    // Continuous batching: per-stage batch size, queue wait and step time, KV blocks.
    for family in [
        "lavit_stage_batch_size_bucket{stage=\"encoder\",le=\"1\"}",
        "lavit_stage_queue_wait_seconds_bucket{stage=\"llm\",le=\"+Inf\"}",
        "lavit_stage_step_seconds_sum{stage=\"decoder\"}",
        "lavit_kv_blocks_in_use 0",
        "lavit_kv_blocks_total",
    ] {
        assert!(m.contains(family), "{family}: {m}");
    }
    s.stop();
}

#[test]
fn admission_refuses_exactly_the_overflow_with_429() {
    let (n, q, extra) = (2, 3, 4);
    let gate = Gate::closed();
    let lim = Limits {
        warmup: false,
        ..limits()
    };
    let s = server(n, q, Some(gate.clone()), lim);
    ready(&s);
    let addr = s.addr;
    let threads: Vec<_> = (0..n + q + extra)
        .map(|i| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/images/generations",
                    &serde_json::json!({"prompt": format!("p{i}"), "steps": 2}),
                )
                .status
            })
        })
        .collect();
    let adm = s.state.pipe.graph().admission().clone();
    assert!(wait_until(20, || adm.rejected() == extra as u64
        && adm.admitted() == n + q));
    // While held: the queue and in-flight gauges say so.
    let m = request(addr, "GET", "/metrics", b"", &[]).body;
    assert!(m.contains(&format!("lavit_queue_depth {q}")), "{m}");
    assert!(m.contains(&format!("lavit_in_flight {n}")), "{m}");
    gate.open();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == 429).count(),
        extra,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|&&c| c == 200).count(),
        n + q,
        "{codes:?}"
    );
    let m = request(addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains(&format!(
            "lavit_http_responses_total{{class=\"429\"}} {extra}"
        )),
        "{m}"
    );
    assert!(m.contains(&format!("lavit_rejected_total {extra}")));
    s.stop();
}

#[test]
fn client_disconnect_cancels_and_frees_the_slot() {
    let s = server(
        1,
        0,
        None,
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    let g = s.state.pipe.graph();
    let body = serde_json::json!({"prompt": "long", "steps": 50_000_000}).to_string();
    let mut sock = TcpStream::connect(s.addr).unwrap();
    write!(
        sock,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    assert!(wait_until(20, || g
        .in_flight()
        .iter()
        .any(
            |e| e.progress.load(std::sync::atomic::Ordering::SeqCst) > 10
        )));
    let entry = g.in_flight().pop().unwrap();
    drop(sock); // the client goes away
    assert!(
        wait_until(10, || g.admission().admitted() == 0),
        "slot not freed after disconnect"
    );
    assert!(entry.cancel.is_cancelled());
    let done = entry.progress.load(std::sync::atomic::Ordering::SeqCst);
    assert!(done < 50_000_000);
    assert_eq!(
        g.shared().metrics[StageKind::Decoder.index()]
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The freed slot serves the next request.
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "short", "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    s.stop();
}

#[test]
fn forced_stage_error_and_panic_give_500_then_recovery_or_unhealthy() {
    let s = server(
        2,
        2,
        None,
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    let g = s.state.pipe.graph();
    let gen = || {
        post(
            s.addr,
            "/v1/images/generations",
            &serde_json::json!({"prompt": "x", "steps": 2}),
        )
    };
    g.inject_fault(StageKind::Decoder, Fault::Error);
    let r = gen();
    assert_eq!(r.status, 500);
    assert!(r.body.contains("injected error"), "{}", r.body);
    g.inject_fault(StageKind::Llm, Fault::Panic);
    let r = gen();
    assert_eq!(r.status, 500);
    assert!(r.body.contains("panicked"), "{}", r.body);
    // Recovery: the stage keeps serving, and stays ready.
    assert_eq!(gen().status, 200);
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    assert_eq!(request(s.addr, "GET", "/ready", b"", &[]).status, 200);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(m.contains("lavit_healthy 1"), "{m}");
    assert!(m.contains("lavit_stage_up{stage=\"llm\"} 1"), "{m}");
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"panic\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"stage\"} 1"),
        "{m}"
    );
    // Policy limit: 3 panics in a row → the stage exits, health and readiness fail.
    for _ in 0..3 {
        g.inject_fault(StageKind::Llm, Fault::Panic);
        assert_eq!(gen().status, 500);
    }
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 503);
    let r = request(s.addr, "GET", "/ready", b"", &[]);
    assert_eq!(r.status, 503);
    // /ready says why: unhealthy, and which stage exited how.
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("unhealthy"), "{v}");
    assert_eq!(v["exited"]["llm"], "Panicked", "{v}");
    assert_eq!(gen().status, 503);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_stage_panics_total{stage=\"llm\"} 4"),
        "{m}"
    );
    assert!(m.contains("lavit_healthy 0"), "{m}");
    assert!(m.contains("lavit_stage_up{stage=\"llm\"} 0"), "{m}");
    assert!(m.contains("lavit_stage_up{stage=\"decoder\"} 1"), "{m}");
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"panic\"} 4"),
        "{m}"
    );
    // The request after the death reached a stage that is gone.
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"stage_down\"} 1"),
        "{m}"
    );
    // 5 × 500 (1 error, 4 panics) + 3 × 503 (the request after the death, /health, /ready).
    assert!(
        m.contains("lavit_http_responses_total{class=\"5xx\"} 8"),
        "{m}"
    );
    s.stop();
}

#[test]
fn drain_finishes_in_flight_and_refuses_new() {
    let gate = Gate::closed();
    let s = server(
        2,
        2,
        Some(gate.clone()),
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    let addr = s.addr;
    let inflight: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/images/generations",
                    &serde_json::json!({"prompt": "x", "steps": 3}),
                )
                .status
            })
        })
        .collect();
    let adm = s.state.pipe.graph().admission().clone();
    assert!(wait_until(20, || adm.admitted() == 2));
    let rt = rt();
    let s = Arc::new(s);
    let s2 = s.clone();
    let drain = std::thread::spawn(move || rt.block_on(s2.drain(Duration::from_secs(20))));
    assert!(wait_until(10, || adm.is_draining()));
    let r = post(
        addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "late", "steps": 3}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    gate.open();
    for t in inflight {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert!(
        drain.join().unwrap(),
        "drain did not finish the admitted requests"
    );
    if let Ok(s) = Arc::try_unwrap(s) {
        s.join();
    }
}

#[test]
fn malformed_requests_get_4xx_never_5xx() {
    let lim = Limits {
        warmup: false,
        body_limit_bytes: 200_000,
        max_image_pixels: 64 * 64,
        max_image_side: 512,
        max_prompt_chars: 100,
        ..limits()
    };
    let s = server(2, 2, None, lim);
    ready(&s);
    let png = png_b64(32, 32);
    let raw_png = base64::engine::general_purpose::STANDARD
        .decode(&png)
        .unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // A PNG whose header claims 100000 x 100000 pixels (a decompression bomb's header).
    let mut bomb = raw_png.clone();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let big_png = png_b64(100, 100); // 10000 pixels > 64*64
    let img = |s: String| serde_json::json!({ "image": s });
    let chat_img = |s: &str| chat_body(s, false);
    let gen = "/v1/images/generations";
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("empty body", gen, b"".to_vec()),
        ("not JSON", gen, b"{prompt:".to_vec()),
        ("NaN literal", gen, br#"{"prompt":"a","guidance":NaN}"#.to_vec()),
        ("huge number", gen, br#"{"prompt":"a","guidance":1e999}"#.to_vec()),
        ("negative n", gen, br#"{"prompt":"a","n":-1}"#.to_vec()),
        ("zero n", gen, br#"{"prompt":"a","n":0}"#.to_vec()),
        ("huge n", gen, br#"{"prompt":"a","n":100000}"#.to_vec()),
        ("zero steps", gen, br#"{"prompt":"a","steps":0}"#.to_vec()),
        ("negative guidance", gen, br#"{"prompt":"a","guidance":-1}"#.to_vec()),
        ("huge guidance", gen, br#"{"prompt":"a","guidance":1e300}"#.to_vec()),
        ("string guidance", gen, br#"{"prompt":"a","guidance":"NaN"}"#.to_vec()),
        ("missing prompt", gen, br#"{"n":1}"#.to_vec()),
        ("empty prompt", gen, br#"{"prompt":"   "}"#.to_vec()),
        ("long prompt", gen, format!(r#"{{"prompt":"{}"}}"#, "a".repeat(101)).into_bytes()),
        ("bad size", gen, br#"{"prompt":"a","size":"big"}"#.to_vec()),
        ("odd size", gen, br#"{"prompt":"a","size":"7x7"}"#.to_vec()),
        ("huge size", gen, br#"{"prompt":"a","size":"99999x99999"}"#.to_vec()),
        ("url format", gen, br#"{"prompt":"a","response_format":"url"}"#.to_vec()),
        ("body over the cap", gen, format!(r#"{{"prompt":"{}"}}"#, "a".repeat(300_000)).into_bytes()),
        ("bad base64", "/v1/tokenize", img("!!!not base64!!!".into()).to_string().into_bytes()),
        ("wrong magic", "/v1/tokenize", img(b64(b"GIF00000000000000000000")).to_string().into_bytes()),
        ("text as image", "/v1/tokenize", img(b64(b"hello, world, this is not an image")).to_string().into_bytes()),
        ("truncated PNG", "/v1/tokenize", img(b64(&raw_png[..raw_png.len() / 2])).to_string().into_bytes()),
        ("header only PNG", "/v1/tokenize", img(b64(&raw_png[..20])).to_string().into_bytes()),
        ("bomb header", "/v1/tokenize", img(b64(&bomb)).to_string().into_bytes()),
        ("too many pixels", "/v1/tokenize", img(big_png).to_string().into_bytes()),
        ("empty image", "/v1/tokenize", img(String::new()).to_string().into_bytes()),
        ("no image", "/v1/tokenize", b"{}".to_vec()),
        ("empty list", "/v1/tokenize", br#"{"images":[]}"#.to_vec()),
        ("remote url", "/v1/tokenize", img("https://example.com/a.png".into()).to_string().into_bytes()),
        ("chat no messages", "/v1/chat/completions", br#"{"messages":[]}"#.to_vec()),
        ("chat no image", "/v1/chat/completions", br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("chat bad part", "/v1/chat/completions", br#"{"messages":[{"role":"user","content":[{"type":"audio"}]}]}"#.to_vec()),
        ("chat zero tokens", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["max_tokens"] = 0.into();
            v.to_string().into_bytes()
        }),
        ("chat huge tokens", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["max_tokens"] = 10_000_000.into();
            v.to_string().into_bytes()
        }),
        ("chat top_p 2", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["top_p"] = 2.0.into();
            v.to_string().into_bytes()
        }),
        ("chat negative temperature", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["temperature"] = (-0.5).into();
            v.to_string().into_bytes()
        }),
        ("chat truncated image", "/v1/chat/completions", chat_img(&b64(&raw_png[..40])).to_string().into_bytes()),
        ("chat data url not base64", "/v1/chat/completions", br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png,abc"}}]}]}"#.to_vec()),
        ("unknown route", "/v1/nothing", b"{}".to_vec()),
    ];
    for (name, path, body) in &cases {
        let r = request(s.addr, "POST", path, body, &[]);
        assert!(
            (400..500).contains(&r.status),
            "{name}: got {} {}",
            r.status,
            r.body
        );
        if r.status != 413 && r.status != 404 {
            assert!(
                r.body.contains("message"),
                "{name}: no message in {}",
                r.body
            );
        }
    }
    // The server is still fine and nothing leaked.
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    assert_eq!(s.state.pipe.graph().admission().admitted(), 0);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_http_responses_total{class=\"5xx\"} 0"),
        "{m}"
    );
    // Client mistakes are never counted as the server's failures.
    for k in serve::metrics::INTERNAL_KINDS {
        assert!(
            m.contains(&format!("lavit_internal_errors_total{{kind=\"{k}\"}} 0")),
            "{k}: {m}"
        );
    }
    s.stop();
}

/// The LLM stage's processed count and the stage records: both stay at zero while requests
/// are refused before admission.
fn llm_work(s: &RunningServer) -> (u64, usize) {
    let g = s.state.pipe.graph();
    let llm = g.shared().metrics[StageKind::Llm.index()]
        .processed
        .load(std::sync::atomic::Ordering::SeqCst);
    (llm, g.records().len())
}

#[test]
fn cost_budget_and_native_geometry_are_checked_before_the_llm() {
    // The mock decoder's native side is 16: sizes are multiples of 8 up to 32, and a cost
    // unit is one 16x16 diffusion step.
    let s = server(
        2,
        2,
        None,
        Limits {
            warmup: false,
            max_request_cost: 12.0,
            ..limits()
        },
    );
    ready(&s);
    let gen = |body: serde_json::Value| post(s.addr, "/v1/images/generations", &body);
    let refused = [
        // 2 × 7 × 1 = 14 > 12
        (
            serde_json::json!({"prompt": "x", "n": 2, "steps": 7}),
            "max_request_cost",
        ),
        // 1 × 4 × (32×32 / 16²) = 16 > 12
        (
            serde_json::json!({"prompt": "x", "steps": 4, "size": "32x32"}),
            "max_request_cost",
        ),
        // Over twice the native side, though under max_image_side.
        (
            serde_json::json!({"prompt": "x", "steps": 1, "size": "40x16"}),
            "native side is 16",
        ),
        // Not a multiple of 8.
        (
            serde_json::json!({"prompt": "x", "steps": 1, "size": "12x16"}),
            "multiple of 8",
        ),
    ];
    for (body, needle) in &refused {
        let r = gen(body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.body.contains(needle), "{body}: {}", r.body);
    }
    // Nothing reached the stages: no LLM pass, no stage record, no admission.
    assert_eq!(llm_work(&s), (0, 0));
    assert_eq!(s.state.pipe.graph().admission().rejected(), 0);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_stage_processed_total{stage=\"llm\"} 0"),
        "{m}"
    );
    // At the budget exactly: served. 1 × 3 × (32×32 / 16²) = 12.
    let r = gen(serde_json::json!({"prompt": "x", "steps": 3, "size": "32x32"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(llm_work(&s).0, 1);
    s.stop();
}

#[test]
fn request_cost_budget_is_a_validated_config_key() {
    use lavit_runtime::config::Validate;
    let cfg = serve::ServeConfig::default();
    assert_eq!(cfg.server.max_request_cost, 200.0);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let mut c = cfg.clone();
        c.server.max_request_cost = bad;
        let e = c.validate("serve.toml").unwrap_err().to_string();
        assert!(e.contains("server.max_request_cost"), "{e}");
    }
    // configs/serve.toml sets it (the documented default).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("configs/serve.toml")).unwrap();
    assert!(text.contains("max_request_cost = 200.0"), "{text}");
}

#[test]
fn internal_failures_are_500s_counted_by_kind() {
    use lavit::serve::ApiError;
    use lavit_runtime::Error;
    let torch = tch::Tensor::zeros([2], (Kind::Float, Device::Cpu))
        .f_reshape([3])
        .unwrap_err();
    let cases = [
        (
            Error::io("weights.bin", std::io::Error::other("disk gone")),
            "io",
        ),
        (
            Error::Torch {
                context: "attention".into(),
                source: torch,
            },
            "libtorch",
        ),
        (
            Error::Plugin {
                part: "backbone",
                name: "convnet".into(),
                msg: "returned rank 3".into(),
            },
            "plugin",
        ),
        (Error::ckpt("x.bin", "torn"), "stage"),
    ];
    for (e, kind) in cases {
        let a = ApiError::from(StageError::from_error(StageKind::Encoder, e));
        assert_eq!(a.status.as_u16(), 500, "{kind}: {}", a.message);
        assert_eq!(a.internal, Some(kind));
    }
    // A client's mistake found inside a stage stays a 400 and is not counted.
    let a = ApiError::from(StageError::from_error(
        StageKind::Llm,
        Error::invalid("prompt too long for the context"),
    ));
    assert_eq!((a.status.as_u16(), a.internal), (400, None));
    let a = ApiError::from(StageError::Busy("full".into()));
    assert_eq!((a.status.as_u16(), a.internal), (429, None));

    // Over HTTP: an injected stage error is a 500 counted as `stage`; image work ran on the
    // blocking pool.
    let s = server(
        2,
        2,
        None,
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    s.state
        .pipe
        .graph()
        .inject_fault(StageKind::Encoder, Fault::Error);
    let img = png_b64(20, 20);
    let r = post(s.addr, "/v1/tokenize", &serde_json::json!({ "image": img }));
    assert_eq!(r.status, 500, "{}", r.body);
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "x", "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"stage\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("lavit_blocking_jobs_total{job=\"image_decode\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("lavit_blocking_jobs_total{job=\"png_encode\"} 1"),
        "{m}"
    );
    assert_eq!(s.state.metrics.internal_count("stage"), 1);
    s.stop();
}

#[test]
fn api_key_is_required_when_configured() {
    let var = "LAVIT_TEST_SERVING_API_KEY";
    std::env::set_var(var, "sekrit");
    let s = server(
        1,
        1,
        None,
        Limits {
            warmup: false,
            api_key_env: Some(var.into()),
            ..limits()
        },
    );
    ready(&s);
    let body = serde_json::json!({"prompt": "x", "steps": 1}).to_string();
    let gen = "/v1/images/generations";
    assert_eq!(
        request(s.addr, "POST", gen, body.as_bytes(), &[]).status,
        401
    );
    assert_eq!(
        request(
            s.addr,
            "POST",
            gen,
            body.as_bytes(),
            &[("Authorization", "Bearer wrong!")]
        )
        .status,
        401
    );
    assert_eq!(
        request(
            s.addr,
            "POST",
            gen,
            body.as_bytes(),
            &[("Authorization", "Bearer sekrit")]
        )
        .status,
        200
    );
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    s.stop();
}

// ------------------------------------------------------------------------------------------
// Real stages (the fixture's models) through the actors == direct calls.

/// A decoder stage that returns the visual ids it received as a (n, 1, 1, L) float tensor, so
/// the LLM stage's output can be compared exactly through the actor graph.
#[derive(Default)]
struct IdsOut(std::collections::BTreeMap<u64, Vec<Vec<i64>>>);
impl Trainable for IdsOut {}
impl Iterative<DecodeRequest, Tensor> for IdsOut {
    fn join(&mut self, key: u64, req: DecodeRequest) -> StageResult<()> {
        self.0.insert(key, req.ids);
        Ok(())
    }
    fn held(&self) -> usize {
        self.0.len()
    }
    fn plan(&mut self) -> Vec<u64> {
        self.0.keys().copied().collect()
    }
    fn step(&mut self, _: ShouldStop, emit: &mut dyn FnMut(u64, Tensor)) -> StageResult<()> {
        for (key, ids) in std::mem::take(&mut self.0) {
            let l = ids.iter().map(Vec::len).max().unwrap_or(0);
            let flat: Vec<f32> = ids
                .iter()
                .flat_map(|s| (0..l).map(move |j| s.get(j).map_or(-1.0, |&v| v as f32)))
                .collect();
            emit(
                key,
                Tensor::from_slice(&flat).reshape([ids.len() as i64, 1, 1, l as i64]),
            );
        }
        Ok(())
    }
    fn leave(&mut self, key: u64) {
        self.0.remove(&key);
    }
}
impl DecoderStage for IdsOut {}

#[test]
fn real_llm_stage_through_actors_equals_direct_calls() {
    use lavit_llm::LlmStageModel;
    let dir = crate::common::fixture_dir();
    let m = MockConfig {
        llm_hidden: 96,
        ..Default::default()
    };
    let mut b = mock::builders(&m, None);
    let d2 = dir.clone();
    b.llm = Box::new(move |dev| {
        Ok(Box::new(LlmStageModel::load(&d2, dev, tch::Kind::Float)?) as Box<dyn LlmStage>)
    });
    b.decoder = Box::new(|_| Ok(Box::new(IdsOut::default()) as Box<dyn DecoderStage>));
    let info = lavit::pipeline::ModelInfo {
        image_size: 28,
        default_size: (16, 16),
        size_multiple: 1,
        max_steps: usize::MAX,
        generate_defaults: Default::default(),
        selection: Default::default(),
        selection_note: None,
        synthesis: Default::default(),
    };
    let pipe = Pipeline::from_builders(b, info, &Placement::default(), Default::default()).unwrap();
    let mut direct = LlmStageModel::load(&dir, Device::Cpu, tch::Kind::Float).unwrap();
    let rt = rt();
    // Text → image tokens (greedy, CFG 2).
    let opts = GenerateOptions {
        n: 2,
        top_k: 0,
        llm_guidance: 2.0,
        ..Default::default()
    };
    let want = direct
        .image_tokens("a photo of a cat sitting on a chair", &opts, &|| false)
        .unwrap();
    let out = rt
        .block_on(pipe.graph().run(
            Task::Generate { opts },
            Input::Prompt("a photo of a cat sitting on a chair".into()),
        ))
        .unwrap();
    let Output::Pixels { images: t, .. } = out else {
        panic!()
    };
    let got: Vec<Vec<i64>> = Vec::<Vec<f32>>::try_from(t.reshape([2, -1]))
        .unwrap()
        .into_iter()
        .map(|r| {
            r.into_iter()
                .filter(|&v| v >= 0.0)
                .map(|v| v as i64)
                .collect()
        })
        .collect();
    assert_eq!(got, want);
    assert!(want[0].iter().all(|&i| direct.vocab.is_visual(i)) && !want[0].is_empty());
    // Image → text: the mock tokenizer's continuous embeds into the real LLM.
    let x = images(1, 3);
    let mut enc = mock::MockEncoder::new(&m, Device::Cpu);
    let mut sm = mock::MockSelectorMerger::new(&m, Device::Cpu);
    let prefix = sm
        .understanding(&enc.encode(&x).unwrap())
        .unwrap()
        .remove(0);
    let copts = CaptionOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let want = direct
        .caption(&prefix, "describe", &copts, &mut |_, _| true)
        .unwrap();
    let task = Task::Caption {
        prompt: "describe".into(),
        opts: copts.clone(),
    };
    let Output::Text { ids, text, .. } = rt
        .block_on(pipe.graph().run(task, Input::Images(x)))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(ids, want);
    assert_eq!(text, direct.tokenizer.decode(&want));
    // Several images, one question (`Task::Captions`): one batch through the actors, each
    // caption the one the stage gives that image alone.
    let x = images(3, 4);
    let prefixes = sm.understanding(&enc.encode(&x).unwrap()).unwrap();
    assert_eq!(prefixes.len(), 3);
    let task = Task::Captions {
        prompt: "describe".into(),
        opts: copts.clone(),
    };
    let Output::Texts(texts) = rt
        .block_on(pipe.graph().run(task, Input::Images(x)))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(texts.len(), 3);
    for (p, (ids, text)) in prefixes.iter().zip(&texts) {
        let one = direct
            .caption(p, "describe", &copts, &mut |_, _| true)
            .unwrap();
        let eos = direct.vocab.eos_id;
        let strip = |v: &[i64]| {
            v.iter()
                .copied()
                .take_while(|&i| i != eos)
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(ids), strip(&one));
        assert_eq!(*text, direct.tokenizer.decode(ids));
    }
}

/// Kills the child process if the test ends early (a failing assertion), so no server is
/// left running.
pub(crate) struct KillOnDrop(pub std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The address a started `lavit serve` (stdout piped) prints as `listening on
/// http://ADDR`; the thread that read it drains stdout until the process exits.
pub(crate) fn listening_addr(child: &mut KillOnDrop) -> (SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::BufRead;
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.strip_prefix("listening on http://") {
                let _ = tx.send(rest.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("no listening line")
        .parse()
        .unwrap();
    (addr, reader)
}

#[test]
fn lavit_serve_binary_drains_on_sigterm() {
    use std::process::{Command, Stdio};
    let cfg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/serve-mock.toml");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lavit"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(["--bind", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .env_remove("LAVIT_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The server prints `listening on http://127.0.0.1:PORT` on stdout.
    let (addr, reader) = listening_addr(&mut child);
    assert!(wait_until(60, || request(addr, "GET", "/ready", b"", &[])
        .status
        == 200));
    // A long request in flight.
    let long = std::thread::spawn(move || {
        post(
            addr,
            "/v1/images/generations",
            &serde_json::json!({"prompt": "long", "steps": 400_000}),
        )
        .status
    });
    assert!(wait_until(30, || request(
        addr,
        "GET",
        "/metrics",
        b"",
        &[]
    )
    .body
    .contains("lavit_in_flight 1")));
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Draining: new work is refused (503 while the listener is open, or the connection is refused).
    assert!(wait_until(10, || request(addr, "GET", "/ready", b"", &[])
        .status
        != 200));
    let late = post(
        addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "late", "steps": 2}),
    );
    assert!(
        late.status == 503 || late.status == 0,
        "late request got {}",
        late.status
    );
    // The in-flight request finishes, then the process exits cleanly.
    assert_eq!(long.join().unwrap(), 200);
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "lavit serve did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let _ = reader.join();
}

#[test]
fn real_pipeline_from_the_fixture_equals_direct_calls() {
    use lavit::generate::{Condition, DecodeOptions, PixelDecoder, Resolution};
    use lavit::tokenizer::{LoadParts, VisualTokenizer};
    use lavit_llm::LlmStageModel;
    let dir = crate::common::fixture_dir();
    let cfg = PipelineConfig {
        checkpoint: Some(dir.clone()),
        ..pcfg(4, 4)
    };
    let pipe = Pipeline::build(&cfg).unwrap();
    let rt = rt();
    let sd =
        lavit_runtime::checkpoint::load_path(&dir.join("reference/expected.safetensors")).unwrap();
    let images = sd["images"].shallow_clone(); // (3, 3, 112, 112)

    // Tokenize: actors == VisualTokenizer::tokenize.
    let tok = VisualTokenizer::from_checkpoint(&dir, Device::Cpu, LoadParts::all()).unwrap();
    let want = tok.tokenize(&images).unwrap().ids;
    let Output::VisualIds(got) = rt
        .block_on(
            pipe.graph()
                .run(Task::Tokenize, Input::Images(images.shallow_clone())),
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(got, want);
    let flat: Vec<i64> = got.concat();
    assert_eq!(
        flat,
        Vec::<i64>::try_from(&sd["token_ids"]).unwrap(),
        "ids differ from the official reference"
    );

    // Caption: understanding embeds (visual_weight) → LLM, greedy.
    let mut llm = LlmStageModel::load(&dir, Device::Cpu, tch::Kind::Float).unwrap();
    let img0 = images.narrow(0, 0, 1);
    let (prefix, _) = tok.encode_features(&img0, tok.selection).unwrap();
    let copts = CaptionOptions {
        max_new_tokens: 10,
        ..Default::default()
    };
    let want = llm.caption(&prefix, "", &copts, &mut |_, _| true).unwrap();
    let task = Task::Caption {
        prompt: String::new(),
        opts: copts,
    };
    let Output::Text { ids, .. } = rt
        .block_on(pipe.graph().run(task, Input::Images(img0)))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(ids, want);

    // Generate: LLM image tokens → highres feature decoder → U-Net → VAE.
    let (w, h) = pipe.info().default_size;
    let gopts = GenerateOptions {
        n: 2,
        steps: 3,
        width: w,
        height: h,
        top_k: 0,
        llm_guidance: 2.0,
        seed: 5,
        ..Default::default()
    };
    let toks = llm
        .image_tokens("a photo of a cat", &gopts, &|| false)
        .unwrap();
    let (pe, pooled) = tok.decode_highres(&toks).unwrap();
    let px = PixelDecoder::load(&dir, Resolution::Highres, Device::Cpu, Kind::Float).unwrap();
    let dopts = DecodeOptions {
        steps: 3,
        guidance: gopts.guidance,
        height: Some(h as i64),
        width: Some(w as i64),
        seed: Some(5),
        ..Default::default()
    };
    let want = px
        .decode(
            &Condition::Highres {
                prompt_embeds: pe,
                pooled_embeds: pooled,
            },
            &dopts,
        )
        .unwrap();
    let Output::Pixels { images: got, .. } = rt
        .block_on(pipe.graph().run(
            Task::Generate { opts: gopts },
            Input::Prompt("a photo of a cat".into()),
        ))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(got.size(), [2, 3, h as i64, w as i64]);
    assert!(
        got.equal(&want),
        "pixels through the actors differ from the direct calls"
    );
}

// ------------------------------------------------------------------------------------------
// Cancellation inside the real loops, per-request randomness (the fixture's stages).

/// Holds the `n`-th should-stop call of a stage's loop until the test has cancelled the
/// request, so the cancel lands mid-loop deterministically (no timing); counts the calls.
#[derive(Clone)]
struct HoldAt {
    n: Arc<std::sync::atomic::AtomicU64>,
    calls: Arc<std::sync::atomic::AtomicU64>,
    reached: Arc<std::sync::Barrier>,
    released: Arc<std::sync::Barrier>,
}

impl HoldAt {
    fn new() -> Self {
        HoldAt {
            n: Arc::new(0.into()),
            calls: Arc::new(0.into()),
            reached: Arc::new(std::sync::Barrier::new(2)),
            released: Arc::new(std::sync::Barrier::new(2)),
        }
    }
    /// Hold at the `n`-th call from now on (0 = never).
    fn arm(&self, n: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        self.calls.store(0, SeqCst);
        self.n.store(n, SeqCst);
    }
    fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// One loop call: count it, hold at the armed call, then ask the actor's callback.
    fn check(&self, inner: impl FnOnce() -> bool) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let c = self.calls.fetch_add(1, SeqCst) + 1;
        if c == self.n.load(SeqCst) {
            self.reached.wait();
            self.released.wait();
        }
        inner()
    }
}

struct HeldLlm {
    inner: Box<dyn LlmStage>,
    hold: HoldAt,
}
impl Trainable for HeldLlm {}
impl Iterative<LlmRequest, LlmEvent> for HeldLlm {
    fn join(&mut self, key: u64, req: LlmRequest) -> StageResult<()> {
        self.inner.join(key, req)
    }
    fn held(&self) -> usize {
        self.inner.held()
    }
    fn plan(&mut self) -> Vec<u64> {
        self.inner.plan()
    }
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, LlmEvent),
    ) -> StageResult<()> {
        let hold = self.hold.clone();
        self.inner.step(&|| hold.check(should_stop), emit)
    }
    fn leave(&mut self, key: u64) {
        self.inner.leave(key)
    }
}
impl LlmStage for HeldLlm {}

struct HeldDecoder {
    inner: Box<dyn DecoderStage>,
    hold: HoldAt,
}
impl Trainable for HeldDecoder {}
impl Iterative<DecodeRequest, Tensor> for HeldDecoder {
    fn join(&mut self, key: u64, req: DecodeRequest) -> StageResult<()> {
        self.inner.join(key, req)
    }
    fn held(&self) -> usize {
        self.inner.held()
    }
    fn plan(&mut self) -> Vec<u64> {
        self.inner.plan()
    }
    fn step(
        &mut self,
        should_stop: ShouldStop,
        emit: &mut dyn FnMut(u64, Tensor),
    ) -> StageResult<()> {
        let hold = self.hold.clone();
        self.inner.step(&|| hold.check(should_stop), emit)
    }
    fn leave(&mut self, key: u64) {
        self.inner.leave(key)
    }
}
impl DecoderStage for HeldDecoder {}

/// The fixture's real stages, with the LLM and decoder loops holdable.
fn held_fixture_pipeline(in_flight: usize) -> (Pipeline, HoldAt, HoldAt) {
    let dir = crate::common::fixture_dir();
    let (mut b, info) = lavit::pipeline::builders(&PipelineConfig {
        checkpoint: Some(dir.clone()),
        ..Default::default()
    })
    .unwrap();
    let (hl, hd) = (HoldAt::new(), HoldAt::new());
    let (llm, dec) = (b.llm, b.decoder);
    let h = hl.clone();
    b.llm = Box::new(move |dev| {
        Ok(Box::new(HeldLlm {
            inner: llm(dev)?,
            hold: h,
        }) as Box<dyn LlmStage>)
    });
    let h = hd.clone();
    b.decoder = Box::new(move |dev| {
        Ok(Box::new(HeldDecoder {
            inner: dec(dev)?,
            hold: h,
        }) as Box<dyn DecoderStage>)
    });
    let opts = lavit_runtime::actors::GraphOptions {
        max_in_flight: in_flight,
        max_queue: 0,
        ..Default::default()
    };
    let pipe = Pipeline::from_builders(b, info, &Placement::default(), opts).unwrap();
    (pipe, hl, hd)
}

/// Start `task`, wait until `hold` holds its loop at the armed call, cancel, release, and
/// return (the error, progress units counted after the cancel).
fn cancel_while_held(
    pipe: &Pipeline,
    rt: &tokio::runtime::Runtime,
    hold: &HoldAt,
    task: Task,
    input: Input,
) -> (StageError, u64) {
    use std::sync::atomic::Ordering::SeqCst;
    let g = pipe.graph();
    let mut h = rt
        .block_on(g.start(g.admit().unwrap(), task, input))
        .unwrap();
    hold.reached.wait(); // the stage thread is inside its loop, at the armed call
    let entry = g.in_flight().into_iter().find(|e| e.id == h.id).unwrap();
    assert!(g.cancel(h.id));
    let p0 = entry.progress.load(SeqCst);
    hold.released.wait();
    let r = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), h.wait()).await })
        .expect("cancel hung");
    (r.unwrap_err(), entry.progress.load(SeqCst) - p0)
}

#[test]
fn cancellation_reaches_inside_the_real_llm_and_diffusion_loops() {
    let (pipe, hl, hd) = held_fixture_pipeline(2);
    let rt = rt();
    let (w, h) = pipe.info().default_size;
    let gen = |steps| Task::Generate {
        opts: GenerateOptions {
            steps,
            width: w,
            height: h,
            top_k: 0,
            llm_guidance: 2.0,
            ..Default::default()
        },
    };
    // LLM image tokens: held at token 3 of at least 4 (the fixture's t2i_min_new_tokens).
    hl.arm(3);
    hd.arm(0);
    let (e, after) = cancel_while_held(&pipe, &rt, &hl, gen(4), Input::Prompt("a cat".into()));
    assert_eq!(e, StageError::Cancelled);
    assert_eq!(
        after, 1,
        "the loop went on for {after} tokens after the cancel"
    );
    assert_eq!(hl.calls(), 3, "the LLM loop made more calls after stopping");
    assert_eq!(hd.calls(), 0, "a cancelled request reached the decoder");
    assert_eq!(
        pipe.graph().admission().admitted(),
        0,
        "the slot was not freed"
    );

    // Diffusion: held at step 3 of 50.
    hl.arm(0);
    hd.arm(3);
    let (e, after) = cancel_while_held(&pipe, &rt, &hd, gen(50), Input::Prompt("a dog".into()));
    assert_eq!(e, StageError::Cancelled);
    assert_eq!(
        after, 1,
        "the loop went on for {after} steps after the cancel"
    );
    assert_eq!(
        hd.calls(),
        3,
        "the diffusion loop made more calls after stopping"
    );
    assert_eq!(
        pipe.graph().admission().admitted(),
        0,
        "the slot was not freed"
    );

    // Caption (streamed): held at token 2.
    hl.arm(2);
    hd.arm(0);
    let sd = lavit_runtime::checkpoint::load_path(
        &crate::common::fixture_dir().join("reference/expected.safetensors"),
    )
    .unwrap();
    let task = Task::Caption {
        prompt: String::new(),
        opts: CaptionOptions {
            max_new_tokens: 10,
            ..Default::default()
        },
    };
    let (e, after) = cancel_while_held(
        &pipe,
        &rt,
        &hl,
        task,
        Input::Images(sd["images"].narrow(0, 0, 1)),
    );
    assert_eq!(e, StageError::Cancelled);
    assert_eq!(after, 1);
    assert_eq!(hl.calls(), 2);
    assert_eq!(
        pipe.graph().admission().admitted(),
        0,
        "the slot was not freed"
    );

    // The pipeline still serves: a full request after the cancels.
    hl.arm(0);
    hd.arm(0);
    let out = rt.block_on(pipe.graph().run(gen(2), Input::Prompt("a cat".into())));
    assert!(
        matches!(out, Ok(Output::Pixels { images: _, .. })),
        "{out:?}"
    );
}

#[test]
fn seeded_requests_are_reproducible_with_others_in_flight() {
    let dir = crate::common::fixture_dir();
    let pipe = Pipeline::build(&PipelineConfig {
        checkpoint: Some(dir),
        ..pcfg(4, 0)
    })
    .unwrap();
    let rt = rt();
    let (w, h) = pipe.info().default_size;
    // Sampled visual tokens (top-k 50) and seeded initial noise.
    let opts = |seed| GenerateOptions {
        seed,
        steps: 3,
        width: w,
        height: h,
        top_k: 50,
        llm_guidance: 2.0,
        ..Default::default()
    };
    let run = |seed| {
        pipe.graph().run(
            Task::Generate { opts: opts(seed) },
            Input::Prompt("a photo of a cat".into()),
        )
    };
    let Output::Pixels { images: alone, .. } = rt.block_on(run(7)).unwrap() else {
        panic!()
    };
    // Another thread reseeds and draws from libtorch's global generator meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let noise = std::thread::spawn(move || {
        let mut k = 0i64;
        while !s2.load(std::sync::atomic::Ordering::SeqCst) && k < 1_000_000 {
            tch::manual_seed(k);
            let _ = Tensor::randn([64], (Kind::Float, Device::Cpu));
            k += 1;
        }
    });
    let outs =
        rt.block_on(async { futures::future::join_all([run(1), run(7), run(2), run(3)]).await });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    noise.join().unwrap();
    let px: Vec<Tensor> = outs
        .into_iter()
        .map(|o| match o.unwrap() {
            Output::Pixels { images: t, .. } => t,
            o => panic!("{o:?}"),
        })
        .collect();
    // Batched with the others, its rows go through larger matrix products: the same picture
    // up to float rounding (continuous batching; bit-for-bit only alone).
    let diff = (&px[1] - &alone).abs().max().double_value(&[]);
    assert!(
        diff < 1e-4,
        "seed 7 gave another picture with other requests in flight (max diff {diff})"
    );
    assert!(!px[0].equal(&alone), "seeds 1 and 7 gave the same picture");
}

// ------------------------------------------------------------------------------------------
// OpenAI compatibility, the token view endpoint and the playground (scripts/openai-check.py
// drives the same with the official client).

fn json_of(r: &Resp) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

#[test]
fn openai_models_usage_streamed_usage_and_error_objects() {
    let s = server(2, 4, None, limits());
    ready(&s);
    let get = |p: &str| request(s.addr, "GET", p, b"", &[]);
    let v = json_of(&get("/v1/models"));
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "lavit");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["created"].as_u64().unwrap() > 1_600_000_000);
    let r = get("/v1/models/lavit");
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["id"], "lavit");
    let r = get("/v1/models/gpt-4o");
    assert_eq!(r.status, 404);
    let e = &json_of(&r)["error"];
    assert_eq!(
        (&e["type"], &e["param"], &e["code"]),
        (
            &"invalid_request_error".into(),
            &"model".into(),
            &"model_not_found".into()
        ),
        "{e}"
    );

    // Non-streamed usage: the mock LLM reads the image's prefix rows and one token per word.
    let img = png_b64(40, 30);
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, false));
    let v = json_of(&r);
    let u = &v["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&completion), "{v}");
    assert!(prompt > 5, "{v}"); // image rows + "What is in the image?"
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(v["model"], "lavit");
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(reason == "length", completion == 5, "{v}");

    // Streamed with include_usage: a role chunk, the tokens, a finish chunk, the usage chunk
    // with empty choices, [DONE]; every chunk carries `usage` (null but the last).
    let mut body = chat_body(&img, true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0, "{last}");
    assert_eq!(
        last["usage"], v["usage"],
        "streamed usage = non-streamed usage"
    );
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null(), "{c}");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["created"].is_u64() && c["model"] == "lavit", "{c}");
    }
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], reason);
    assert_eq!(chunks.len(), 2 + completion as usize + 1);
    // Without stream_options no usage key at all; stream_options without stream is a 400.
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, true));
    assert!(!r.body.contains("\"usage\""), "{}", r.body);
    let mut body = chat_body(&img, false);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 400);
    assert_eq!(json_of(&r)["error"]["param"], "stream_options");

    // Error objects: the field at fault in `param`, OpenAI's type and code.
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a", "guidance": -1}),
    );
    assert_eq!(r.status, 400);
    let e = &json_of(&r)["error"];
    assert_eq!(e["param"], "guidance", "{e}");
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "invalid_value");
    assert!(e["message"].as_str().unwrap().contains("guidance"));
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a", "model": "dall-e-3"}),
    );
    assert_eq!(r.status, 404);
    let r = post(s.addr, "/v1/chat/completions", &{
        let mut b = chat_body(&img, false);
        b["n"] = 2.into();
        b
    });
    assert_eq!(
        (r.status, &json_of(&r)["error"]["param"]),
        (400, &"n".into())
    );
    let r = get("/v1/nothing");
    assert_eq!(r.status, 404);
    assert_eq!(json_of(&r)["error"]["code"], "not_found");
    // Fault injection is off unless configured.
    let r = post(
        s.addr,
        "/admin/fault",
        &serde_json::json!({"stage": "llm", "fault": "error"}),
    );
    assert_eq!(r.status, 404);
    s.stop();
}

#[test]
fn tokenize_keep_mask_matches_the_token_counts() {
    let s = server(2, 4, None, limits());
    ready(&s);
    let imgs = [png_b64(40, 30), png_b64(28, 28), png_b64(64, 20)];
    let r = post(
        s.addr,
        "/v1/tokenize",
        &serde_json::json!({"images": imgs, "keep_mask": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    let plain = json_of(&post(
        s.addr,
        "/v1/tokenize",
        &serde_json::json!({ "images": imgs }),
    ));
    assert_eq!(
        v["tokens"], plain["tokens"],
        "the mask does not change the ids"
    );
    assert!(plain.get("keep").is_none());
    // Mock: 28 px images, patch 7 → a 4 × 4 grid.
    assert_eq!(v["grid"], serde_json::json!([4, 4]));
    assert_eq!(v["patches"], 16);
    let mut kept_all = Vec::new();
    for i in 0..3 {
        let keep = v["keep"][i].as_array().unwrap();
        assert_eq!(keep.len(), 16);
        assert_eq!(keep[0], 1, "the mock selector always keeps the first patch");
        let kept = keep.iter().filter(|k| k.as_u64() == Some(1)).count();
        assert_eq!(kept as u64, v["counts"][i].as_u64().unwrap());
        assert_eq!(kept, v["tokens"][i].as_array().unwrap().len());
        kept_all.push(kept);
    }
    assert!(
        kept_all.iter().any(|&k| k < 16),
        "some patches dropped: {kept_all:?}"
    );
    s.stop();
}

#[test]
fn api_key_from_the_config_and_its_environment_override() {
    let var = "LAVIT_TEST_SERVING_API_KEY_OVERRIDE";
    std::env::remove_var(var);
    let lim = Limits {
        warmup: false,
        api_key: Some("from-config".into()),
        api_key_env: Some(var.into()),
        ..limits()
    };
    assert_eq!(lim.effective_api_key().as_deref(), Some("from-config"));
    let s = server(1, 1, None, lim.clone());
    ready(&s);
    let auth = |k: &str| format!("Bearer {k}");
    let models = |h: &[(&str, &str)]| request(s.addr, "GET", "/v1/models", b"", h).status;
    assert_eq!(models(&[]), 401);
    assert_eq!(models(&[("Authorization", &auth("nope"))]), 401);
    assert_eq!(models(&[("Authorization", &auth("from-config"))]), 200);
    // Health, metrics and the playground page stay open; the page learns a key is needed.
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    let info = json_of(&request(s.addr, "GET", "/playground/info", b"", &[]));
    assert_eq!(info["api_key_required"], true);
    s.stop();
    std::env::set_var(var, "from-env");
    assert_eq!(lim.effective_api_key().as_deref(), Some("from-env"));
    std::env::set_var(var, "");
    assert_eq!(lim.effective_api_key().as_deref(), Some("from-config"));
    std::env::remove_var(var);
}

#[test]
fn playground_page_and_assets_are_served_from_the_binary() {
    let s = server(1, 1, None, limits());
    let r = request(s.addr, "GET", "/", b"", &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("LaVIT playground"), "{}", r.body);
    assert!(
        !r.body.contains("http://") && !r.body.contains("https://"),
        "no CDN"
    );
    for (p, needle) in [
        ("/static/app.js", "/v1/tokenize"),
        ("/static/style.css", ".token-card"),
    ] {
        let r = request(s.addr, "GET", p, b"", &[]);
        assert_eq!(r.status, 200, "{p}");
        assert!(r.body.contains(needle), "{p}");
    }
    let info = json_of(&request(s.addr, "GET", "/playground/info", b"", &[]));
    assert_eq!(info["model"], "lavit");
    assert_eq!(info["api_key_required"], false);
    s.stop();
    // Off when configured so.
    let s = server(
        1,
        1,
        None,
        Limits {
            playground: false,
            ..limits()
        },
    );
    assert_eq!(request(s.addr, "GET", "/", b"", &[]).status, 404);
    s.stop();
}

#[test]
fn fault_injection_hook_gives_a_500_with_an_error_object() {
    let s = server(
        1,
        1,
        None,
        Limits {
            warmup: false,
            fault_injection: true,
            ..limits()
        },
    );
    ready(&s);
    let r = post(
        s.addr,
        "/admin/fault",
        &serde_json::json!({"stage": "decoder", "fault": "error"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "x", "steps": 1}),
    );
    assert_eq!(r.status, 500);
    let e = &json_of(&r)["error"];
    assert_eq!(
        (&e["type"], &e["code"]),
        (&"server_error".into(), &"internal_error".into())
    );
    let r = post(
        s.addr,
        "/admin/fault",
        &serde_json::json!({"stage": "nowhere", "fault": "error"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        s.state.metrics.http_count("5xx"),
        1,
        "one 500 counted by the prometheus counter"
    );
    s.stop();
}

#[test]
fn generation_options_follow_the_decoder_geometry() {
    use lavit::serve::validate::{generation_options, GenerationRequest};
    // A decoder of native side 64, sides in multiples of 16, a scheduler of 50 steps.
    let info = lavit::pipeline::ModelInfo {
        image_size: 28,
        default_size: (64, 64),
        size_multiple: 16,
        max_steps: 50,
        generate_defaults: Default::default(),
        selection: Default::default(),
        selection_note: None,
        synthesis: Default::default(),
    };
    let lim = Limits::default();
    let check = |body: serde_json::Value| {
        let r: GenerationRequest = serde_json::from_value(body).unwrap();
        generation_options(&r, &lim, &info)
    };
    let o = check(serde_json::json!({"prompt": "x", "size": "128x16", "steps": 50})).unwrap();
    assert_eq!((o.width, o.height, o.steps), (128, 16, 50));
    for (body, needle) in [
        (
            serde_json::json!({"prompt": "x", "steps": 51}),
            "at most 50 steps",
        ),
        (
            serde_json::json!({"prompt": "x", "size": "40x64"}),
            "multiple of 16",
        ),
        (
            serde_json::json!({"prompt": "x", "size": "144x64"}),
            "[16, 128]",
        ),
        // 4 × 50 × (128×128 / 64²) = 800 > 200
        (
            serde_json::json!({"prompt": "x", "n": 4, "steps": 50, "size": "128x128"}),
            "server.max_request_cost = 200",
        ),
    ] {
        let e = check(body.clone()).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{body}");
        assert!(e.message.contains(needle), "{body}: {}", e.message);
    }
    // The fixture's scheduler: 1000 training timesteps.
    let g = lavit_decoder::stage::DecoderGeometry::read(
        &crate::common::fixture_dir(),
        lavit_decoder::pixel_decoder::Resolution::Lowres,
    )
    .unwrap();
    assert_eq!(g.max_steps, 1000);
}

/// Per image the `ids` of `lavit tokenize`'s JSON lines.
fn cli_tokenize(
    dir: &std::path::Path,
    images: &[std::path::PathBuf],
    extra: &[&str],
) -> Vec<Vec<i64>> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(["tokenize", "--checkpoint"])
        .arg(dir)
        .args(extra)
        .args(images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(v["ids"].clone()).unwrap()
        })
        .collect()
}

fn tokens_of(r: &Resp) -> Vec<Vec<i64>> {
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    serde_json::from_value(v["tokens"].clone()).unwrap()
}

/// One answer per front-end: `lavit tokenize` (run as a process), `/v1/tokenize` (the server
/// on 127.0.0.1, also with the keep mask) and the library's `VisualTokenizer::tokenize` give
/// the same ids for the same images and checkpoint, in both manifest modes (the fixture's
/// `argmax`, and a copy whose manifest says `gumbel` with `selection_seed` 3). In Gumbel mode
/// tokenizing [a, b, c] equals tokenizing each alone; the request and the CLI flags override
/// the manifest the same way.
#[test]
fn cli_server_and_library_give_the_same_ids_in_both_manifest_modes() {
    use lavit::pipeline::StageSet;
    use lavit::tokenizer::{LoadParts, VisualTokenizer};
    let fixture = crate::common::fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    crate::common::write_images(&imgs, 3);
    let paths: Vec<std::path::PathBuf> = (0..3)
        .map(|i| imgs.join(format!("img{i:02}.png")))
        .collect();
    let b64: Vec<String> = paths
        .iter()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap()))
        .collect();
    // The fixture's tokenizer with a manifest that samples.
    let gumbel = tmp.path().join("gumbel");
    std::fs::create_dir_all(gumbel.join("visual_tokenizer")).unwrap();
    for f in ["eva_vitg_psz14.bin", "tokenizer_encoder.bin"] {
        let p = std::path::Path::new("visual_tokenizer").join(f);
        std::fs::copy(fixture.join(&p), gumbel.join(&p)).unwrap();
    }
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("manifest.json")).unwrap())
            .unwrap();
    m["tokenizer"]["selection"] = "gumbel".into();
    m["tokenizer"]["selection_seed"] = 3.into();
    m["tokenizer"]["selection_note"] = "a test".into();
    std::fs::write(gumbel.join("manifest.json"), m.to_string()).unwrap();

    let mut per_mode = Vec::new();
    for (dir, mode, seed) in [(&fixture, "argmax", 0), (&gumbel, "gumbel", 3)] {
        let cli = cli_tokenize(dir, &paths, &[]);
        assert_eq!(cli.len(), 3);
        let pipe = Pipeline::build(&PipelineConfig {
            checkpoint: Some(dir.to_path_buf()),
            stages: StageSet::Tokenizer,
            ..pcfg(2, 8)
        })
        .unwrap();
        let s = serve::spawn(Arc::new(pipe), limits()).unwrap();
        ready(&s);
        let r = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64 }),
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            v["selection"],
            serde_json::json!({"selection": mode, "seed": seed})
        );
        let served = tokens_of(&r);
        assert_eq!(
            served, cli,
            "{mode}: the server and `lavit tokenize` differ"
        );
        let masked = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64, "keep_mask": true }),
        );
        assert_eq!(tokens_of(&masked), cli, "{mode}: with the keep mask");
        // Each image alone: the same ids (its Gumbel noise depends on the seed only).
        for (i, one) in b64.iter().enumerate() {
            let r = post(s.addr, "/v1/tokenize", &serde_json::json!({ "image": one }));
            assert_eq!(
                tokens_of(&r),
                vec![cli[i].clone()],
                "{mode}: image {i} alone"
            );
        }
        assert_eq!(
            cli_tokenize(dir, &paths[2..], &[])[0],
            cli[2],
            "{mode}: the CLI on one image"
        );
        // The library.
        let tok =
            VisualTokenizer::from_checkpoint(dir, Device::Cpu, LoadParts::tokenize_only()).unwrap();
        let lib = tok.tokenize(&tok.load_images(&paths).unwrap()).unwrap();
        assert_eq!(lib.ids, cli, "{mode}: the library");
        // Overrides: the request's fields and the CLI's flags, the same way.
        let other = if mode == "argmax" { "gumbel" } else { "argmax" };
        let r = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64, "selection": other, "seed": 5 }),
        );
        let overridden = tokens_of(&r);
        assert_eq!(
            overridden,
            cli_tokenize(dir, &paths, &["--selection", other, "--seed", "5"]),
            "{mode}: overridden to {other}"
        );
        let r = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64, "selection": "sampled" }),
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("selection"), "{}", r.body);
        s.stop();
        per_mode.push((cli, overridden));
    }
    // The manifest's mode is what each front-end used: the gumbel copy's default equals the
    // fixture overridden to gumbel with seed 3 … and differs from arg-max.
    let (argmax, _) = &per_mode[0];
    let (gumbel_ids, _) = &per_mode[1];
    assert_ne!(argmax, gumbel_ids, "Gumbel sampling changed nothing");
    assert_eq!(
        &cli_tokenize(&fixture, &paths, &["--selection", "gumbel", "--seed", "3"]),
        gumbel_ids
    );
}
