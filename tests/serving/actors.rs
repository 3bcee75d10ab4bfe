//! The stage graph without HTTP: actors against direct calls, overlap, cancellation,
//! control messages, batching, failures and training through the actors.

use super::*;

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
    // Two requests (4 images) per tokenizer step: the 6 requests take at least 3 encoder
    // steps whenever they arrive, so the SelectorMerger works on one step's requests while
    // the Encoder runs the next (with unbounded batches a loaded machine could deliver all six
    // to one step of each stage, and nothing would overlap).
    let cfg = PipelineConfig {
        batching: lavit_runtime::stage::Batching {
            max_batch: 4,
            ..Default::default()
        },
        ..pcfg(6, 0)
    };
    let pipe = Arc::new(Pipeline::mock(&m, None, &cfg).unwrap());
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
