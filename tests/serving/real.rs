//! The real stages of the fixture through the actors and the server: equal to direct calls,
//! cancellation inside the real loops, reproducible seeds, the binary's SIGTERM drain.

use super::*;

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
