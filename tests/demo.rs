//! Integration tests: demo (`lavit demo` on Fashion-MNIST).

use std::path::PathBuf;

use lavit::demo::{self, data, stage0, DemoConfig, DemoOptions};
use lavit_plugin_api::{Backbone, PluginResult};
use tch::{nn, nn::Module, Device, Kind, Tensor};

fn data_dir() -> PathBuf {
    PathBuf::from(std::env::var("LAVIT_FASHION_MNIST").unwrap_or(data::DEFAULT_DATA_DIR.into()))
}

#[test]
fn reads_fashion_mnist_idx() {
    let fm = data::FashionMnist::load(&data_dir()).expect("scripts/setup.sh --data installs it");
    assert_eq!(fm.train.len(), 60_000);
    assert_eq!(fm.test.len(), 10_000);
    assert_eq!(fm.test.class_counts(), [1000; 10]);
    // pixels are real photos: not all black, not constant
    let img = fm.train.image(0);
    assert!(img.iter().any(|&p| p > 100) && img.contains(&0));
    let sub = data::balanced_subset(&fm.train, 7, 3);
    assert_eq!(fm.train.select(&sub).class_counts(), [7; 10]);
    assert_eq!(
        sub,
        data::balanced_subset(&fm.train, 7, 3),
        "split is deterministic"
    );
    assert_ne!(sub, data::balanced_subset(&fm.train, 7, 4));
}

#[test]
fn missing_data_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = data::FashionMnist::load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("train-images-idx3-ubyte.gz"), "{err}");
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte.gz"),
        b"\0\0\x08\x01abcd",
    )
    .unwrap();
    let err = data::FashionMnist::load(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("2051"), "{err}");
}

/// A minimal backbone for the stage-0 objective test: a patch-embedding convolution, one
/// token-mixing layer (MLP-Mixer style) and a channel MLP (the demo itself trains the built-in
/// EVA ViT).
struct ConvPatches {
    vs: nn::VarStore,
    proj: nn::Conv2D,
    mix: nn::Linear,
    mlp: nn::Linear,
}

impl ConvPatches {
    fn new() -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = nn::ConvConfig {
            stride: 4,
            ..Default::default()
        };
        let proj = nn::conv2d(vs.root() / "proj", 3, 32, 4, cfg);
        let mix = nn::linear(vs.root() / "mix", 64, 64, Default::default());
        let mlp = nn::linear(vs.root() / "mlp", 32, 32, Default::default());
        Self { vs, proj, mix, mlp }
    }
}

impl Backbone for ConvPatches {
    fn name(&self) -> String {
        "conv-patches".into()
    }
    fn image_size(&self) -> i64 {
        32
    }
    fn patch_size(&self) -> i64 {
        4
    }
    fn width(&self) -> i64 {
        32
    }
    fn forward(&self, images: &Tensor) -> PluginResult<Tensor> {
        let x = self.proj.forward(images).flatten(2, -1); // (B, C, N)
        let mixed = self.mix.forward(&x).relu().transpose(1, 2); // (B, N, C)
        Ok(x.transpose(1, 2) + self.mlp.forward(&mixed))
    }
    fn trainable_parameters(&self) -> Vec<Tensor> {
        self.vs.trainable_variables()
    }
}

#[test]
fn stage0_makes_backbone_features_name_the_class() {
    let fm = data::FashionMnist::load(&data_dir()).unwrap();
    let train = fm.train.select(&data::balanced_subset(&fm.train, 60, 0));
    let held = fm.test.select(&data::balanced_subset(&fm.test, 20, 0));
    tch::manual_seed(0);
    let bb = ConvPatches::new();
    let cfg = stage0::Stage0Config {
        steps: 150,
        batch_size: 32,
        lr: 5e-3,
        ..Default::default()
    };
    let (heads, rows) = stage0::pretrain(&bb, &cfg, &train, 0, None).unwrap();
    let first: f64 = rows[..10].iter().map(|r| r.class_loss).sum::<f64>() / 10.0;
    let last: f64 = rows[rows.len() - 10..]
        .iter()
        .map(|r| r.class_loss)
        .sum::<f64>()
        / 10.0;
    assert!(last < 0.6 * first, "class loss {first:.3} → {last:.3}");
    let acc = stage0::head_accuracy(&bb, &heads, &held).unwrap();
    let train_acc: f64 = rows[rows.len() - 10..]
        .iter()
        .map(|r| r.accuracy)
        .sum::<f64>()
        / 10.0;
    let train_eval = stage0::head_accuracy(&bb, &heads, &train).unwrap();
    assert!(
        acc > 0.5,
        "held-out accuracy {acc:.3} (chance 0.1); training batches {train_acc:.3}, training set {train_eval:.3}, class loss {first:.3} → {last:.3}"
    );
}

#[test]
fn judge_learns_from_real_images_only() {
    let fm = data::FashionMnist::load(&data_dir()).unwrap();
    let train = fm.train.select(&data::balanced_subset(&fm.train, 100, 0));
    let held = fm.test.select(&data::balanced_subset(&fm.test, 20, 0));
    let cfg = demo::judge::JudgeConfig {
        steps: 120,
        ..DemoConfig::quick().judge
    };
    let mut j = demo::judge::Judge::new(&cfg, 0);
    j.train(&cfg, &train, 0).unwrap();
    let acc = j.accuracy(&held).unwrap();
    assert!(acc > 0.5, "judge held-out accuracy {acc:.3} (chance 0.1)");

    // The judge trains beside another stage in the demo: its training (dropout included)
    // depends on its seed alone, not on what else draws from libtorch's generator meanwhile.
    let cfg = demo::judge::JudgeConfig { steps: 20, ..cfg };
    let start = demo::judge::Judge::new(&cfg, 3);
    let trained = |seed: u64, global: i64| {
        let mut j = demo::judge::Judge::new(&cfg, 3);
        j.vs.copy(&start.vs).unwrap();
        tch::manual_seed(global);
        j.train(&cfg, &train, seed).unwrap();
        j.vs.variables()["fc1.weight"].copy()
    };
    let (a, b, c) = (trained(3, 1), trained(3, 2), trained(4, 1));
    assert!(a.equal(&b), "same seed, different judge");
    assert!(!a.equal(&c), "the seed changes nothing");
}

#[test]
fn finished_stages_are_skipped_and_changed_ones_rerun() {
    let out = tempfile::tempdir().unwrap();
    let runs = std::cell::Cell::new(0);
    let stage = |st: &mut demo::Stages, key: u32| {
        st.run("s", &key, |dir| {
            runs.set(runs.get() + 1);
            std::fs::write(dir.join("out.txt"), "x")?;
            Ok(key * 2)
        })
        .unwrap()
    };
    let mut st = demo::Stages::new(out.path());
    assert_eq!(stage(&mut st, 3), 6);
    assert_eq!(stage(&mut st, 3), 6);
    assert_eq!(
        runs.get(),
        1,
        "a finished stage with the same config is skipped"
    );
    assert_eq!(stage(&mut st, 4), 8);
    assert_eq!(runs.get(), 2, "a changed config reruns the stage");
    // a stage that failed leaves no marker and reruns
    let st2 = demo::Stages::new(out.path());
    assert!(st2
        .run("t", &1, |_| -> anyhow::Result<u32> {
            anyhow::bail!("boom")
        })
        .is_err());
    assert_eq!(st2.run("t", &1, |_| Ok(5u32)).unwrap(), 5);
    // the full and quick configurations parse
    let _ = (DemoConfig::full(), DemoConfig::quick());
    let _ = DemoOptions {
        config: DemoConfig::quick(),
        out: out.path().into(),
        data_dir: data_dir(),
        threads: 0,
        stop_after: None,
    };
}

#[test]
fn demo_vocabulary_loads_as_sentencepiece_one_token_per_word() {
    use lavit::demo::vocab;
    use lavit_llm::sentencepiece::SentencePiece;
    let sp = SentencePiece::from_bytes(&vocab::tokenizer_model()).expect("valid ModelProto");
    assert_eq!(sp.vocab_size() as i64, vocab::text_vocab_size());
    assert_eq!((sp.bos_id(), sp.eos_id()), (1, 2));
    for c in 0..10 {
        for t in 0..data::TEMPLATES.len() {
            let text = data::caption(c, t);
            let ids = sp.encode(&text);
            assert_eq!(
                ids.len(),
                text.split_whitespace().count(),
                "{text}: {ids:?}"
            );
            assert_eq!(sp.decode(&ids), text);
        }
    }
    // text outside the captions still encodes (character pieces) and round-trips
    let other = "Draw 2 red hats!";
    let ids = sp.encode(other);
    assert!(!ids.contains(&0), "{ids:?}");
    assert_eq!(sp.decode(&ids), other);
}

/// The CI-sized demo end to end: every stage trains on real Fashion-MNIST images; the
/// judge, the stage-0 features, the captions, the reconstructions and the generated images
/// are judged right well above chance (10 %); the report is written, and the checkpoint
/// folder it leaves is served by `lavit serve`'s HTTP stack.
#[test]
fn quick_demo_learns_and_its_checkpoint_is_served() {
    use base64::Engine;
    let out = tempfile::tempdir().unwrap();
    let s = demo::run(&DemoOptions {
        config: DemoConfig::quick(),
        out: out.path().into(),
        data_dir: data_dir(),
        threads: 0,
        stop_after: None,
    })
    .expect("the quick demo runs");
    let msg = format!("{s:?}");
    // every stage ran, and stage 1b overlapped stage 2 + the judge
    let names: Vec<&str> = s.seconds.iter().map(|(n, _)| n.as_str()).collect();
    for n in ["stage0", "stage1", "stage1b", "stage2", "judge", "eval"] {
        assert!(names.contains(&n), "{n} missing: {msg}");
    }
    let busy: f64 = s.seconds.iter().map(|(_, t)| t).sum();
    assert!(s.wall_seconds > 0.0 && s.wall_seconds < busy, "{msg}");
    assert!(s.judge_accuracy >= 0.7, "{msg}");
    assert!(s.stage0_accuracy >= 0.6, "{msg}");
    assert!(s.caption_accuracy >= 0.5, "{msg}");
    // generated images (50 prompts, best of 2) and reconstructions: at least twice chance
    assert!(s.t2i_accuracy >= 0.2, "{msg}");
    assert!(s.reconstruction_accuracy >= 0.2, "{msg}");
    assert!(
        (0.2..0.5).contains(&s.mean_kept_ratio),
        "ρ target 1/3: {msg}"
    );
    // dynamic length: the kept-token count differs between classes
    let (lo, hi) = s
        .mean_tokens_per_class
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(hi - lo > 0.2 && lo > 0.0, "{msg}");
    // no class collapses: every class keeps between ρN/3 and 2ρN tokens on average (a
    // sandal covers a third of the photo a pullover covers: the counts follow the garment)
    let q = DemoConfig::quick();
    let rho_n = q.stage1.rho * q.tokenizer.num_patches() as f64;
    for (c, &m) in s.mean_tokens_per_class.iter().enumerate() {
        assert!(
            (rho_n / 3.0..=2.0 * rho_n).contains(&m),
            "class {} keeps {m:.2} tokens on average, outside [{:.1}, {:.1}]: {msg}",
            data::CLASS_NAMES[c],
            rho_n / 3.0,
            2.0 * rho_n
        );
    }
    // the selector selects: the checkpoint's default selection through the pipeline (as
    // /v1/tokenize answers) keeps masks of the image's own, on the garment, more of them on a
    // larger garment; a constant or near-constant mask fails every line
    let sel = &s.selection;
    assert_eq!(sel.images, 300, "{msg}");
    assert!(sel.distinct_masks >= sel.images / 2, "{sel:?}");
    assert!(sel.own_mask_share >= 0.4, "{sel:?}");
    assert!(
        sel.garment_share >= sel.garment_share_chance + 0.2,
        "kept patches on the garment {:.3}, chance {:.3}: {sel:?}",
        sel.garment_share,
        sel.garment_share_chance
    );
    assert!(sel.spearman_kept_garment >= 0.2, "{sel:?}");
    // the arg-max and the sampled selection keep about as many patches (the manifest's
    // default is the arg-max)
    let modes = &s.selection_modes;
    let ratio = modes.argmax.mean_kept / modes.gumbel.mean_kept.max(1e-9);
    assert!((0.8..=1.25).contains(&ratio), "{modes:?}");
    // the machine and libtorch build are recorded
    assert!(
        s.machine.cores >= 1 && s.machine.torch_threads_alone >= 1,
        "{msg}"
    );
    assert!(s.machine.libtorch_version.starts_with('2'), "{msg}");
    let metrics = std::fs::read_to_string(out.path().join("report/metrics.json")).unwrap();
    assert!(metrics.contains("\"libtorch_version\""), "{metrics}");
    for f in [
        "index.html",
        "generated.png",
        "reconstructions.png",
        "metrics.json",
    ] {
        assert!(out.path().join("report").join(f).is_file(), "{f}");
    }

    // Continuous batching on a trained checkpoint: 16 seeded requests give alone what they
    // give batched (scores within 1e-4 in float32; the differing sequences, near-ties, are
    // printed with the share of identical ones).
    let llm = lavit_llm::LlmStageModel::load(&s.checkpoint, Device::Cpu, Kind::Float).unwrap();
    let eq = crate::llm::batched_against_alone(&llm, 24);
    assert!(eq.max_score_diff < 1e-4, "{eq:?}");
    assert!(eq.sequences >= 20, "{eq:?}");
    drop(llm);

    // `lavit serve` on the demo checkpoint: caption a held-out photo, draw a prompt.
    let pipe = lavit::pipeline::Pipeline::build(&lavit::pipeline::PipelineConfig {
        checkpoint: Some(s.checkpoint.clone()),
        ..Default::default()
    })
    .expect("the demo checkpoint loads as a pipeline");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // `lavit eval` on the held-out files the demo wrote, with the demo's generation settings
    let ev_data = out.path().join("eval-data");
    let ev = q.eval.clone();
    let opts = lavit::eval::EvalOptions {
        checkpoint: s.checkpoint.clone(),
        captions: Some(ev_data.join("captions.jsonl")),
        vqa: Some(ev_data.join("vqa.jsonl")),
        prompts: Some(ev_data.join("prompts.jsonl")),
        real_images: Some(ev_data.join("images")),
        embedding: Some(lavit::eval::Embedding::parse("judge", &[&ev_data]).unwrap()),
        out: out.path().join("eval"),
        limit: Some(30),
        caption_prompt: String::new(),
        vqa_template: "{}".into(),
        caption: lavit::pipeline::messages::CaptionOptions {
            max_new_tokens: 12,
            ..Default::default()
        },
        generate: lavit::pipeline::messages::GenerateOptions {
            n: 1,
            seed: 0,
            llm_guidance: ev.llm_guidance,
            guidance: ev.decoder_guidance,
            steps: ev.ddim_steps,
            width: q.tokenizer.img_size as usize,
            height: q.tokenizer.img_size as usize,
            top_k: ev.top_k as usize,
            temperature: ev.temperature,
            ..Default::default()
        },
        concurrency: 4,
    };
    let r = rt.block_on(lavit::eval::evaluate(&pipe, &opts)).unwrap();
    let msg = format!("{r:?}");
    let c = r.captions.as_ref().unwrap();
    // captions name the class in one of the reference templates well above chance
    assert!(c.images == 30 && c.bleu4 > 0.3 && c.cider_d > 0.5, "{msg}");
    let t = r.text_to_image.as_ref().unwrap();
    assert!(t.generated == 30 && t.fid.is_finite(), "{msg}");
    assert!(t.label_accuracy.unwrap() >= 0.2, "{msg}");
    assert!(r.vqa.as_ref().unwrap().questions == 30, "{msg}");
    assert!(out.path().join("eval/index.html").is_file());

    let server = lavit::serve::spawn(
        std::sync::Arc::new(pipe),
        lavit::serve::Limits {
            bind: "127.0.0.1:0".into(),
            warmup: true,
            ..Default::default()
        },
    )
    .unwrap();
    rt.block_on(lavit::serve::mark_ready(&server)).unwrap();
    let fm = data::FashionMnist::load(&data_dir()).unwrap();
    let mut named = 0;
    for i in 0..5 {
        let img = image::GrayImage::from_raw(28, 28, fm.test.image(i).to_vec()).unwrap();
        let mut png = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageLuma8(img)
            .to_rgb8()
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(png.into_inner());
        let body = serde_json::json!({"model": "lavit", "max_tokens": 12, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}}]}]});
        let r = crate::serving::post(server.addr, "/v1/chat/completions", &body);
        let (status, text) = (r.status, r.body);
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let caption = v["choices"][0]["message"]["content"].as_str().unwrap();
        named += data::class_of_caption(caption).is_some() as usize;
    }
    assert!(
        named >= 4,
        "served captions name a clothing class ({named}/5)"
    );
    let r = crate::serving::post(
        server.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": data::caption(1, 0), "n": 2, "seed": 3, "steps": 10}),
    );
    let (status, text) = (r.status, r.body);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        let png = base64::engine::general_purpose::STANDARD
            .decode(d["b64_json"].as_str().unwrap())
            .unwrap();
        let img = image::load_from_memory(&png).unwrap();
        let side = DemoConfig::quick().tokenizer.img_size as u32;
        assert_eq!((img.width(), img.height()), (side, side));
    }
}

/// The stage-1 ratio term pulls back an image whose selector dropped every patch: on such an
/// image the straight-through Gumbel sample carries no gradient (the per-image squared term
/// alone cannot move it), the probability term does.
#[test]
fn ratio_loss_pulls_a_collapsed_image_back() {
    use lavit_selector::SelectionMode;
    use lavit_selector::{selector_loss, RatioScope, Stage1Loss};
    let loss = Stage1Loss {
        rho: 1.0 / 3.0,
        lambda: 2.0,
        confidence_weight: 0.0,
        ratio_scope: RatioScope::Image,
        floor: 0.0,
    };
    let n = 49;
    // keep-minus-drop margins: image 0 keeps with p = ρ, image 1 has collapsed (p ≈ 1e-13)
    let margins = Tensor::from_slice(&[(0.5f32).ln(), -30.0])
        .view([2, 1])
        .repeat([1, n])
        .set_requires_grad(true);
    let grad_of = |new: bool| {
        let lp =
            Tensor::stack(&[&margins, &margins.zeros_like()], -1).log_softmax(-1, tch::Kind::Float);
        let dec = SelectionMode::Gumbel { seed: 3, tau: 1.0 }.decide(&lp);
        let ratio = if new {
            selector_loss(&lp, &dec, &loss).0
        } else {
            (dec.mean_dim(1, false, tch::Kind::Float) - loss.rho)
                .square()
                .mean(tch::Kind::Float)
                * loss.lambda
        };
        let g = Tensor::run_backward(&[ratio], &[&margins], false, false);
        g[0].get(1).mean(tch::Kind::Float).double_value(&[])
    };
    let (new, old) = (grad_of(true), grad_of(false));
    // λ ρ(1−ρ) · ½ · (ρ / N) ≈ 1.5e-3 per patch, towards keeping more
    assert!(new < -1e-3, "collapsed image gradient {new}");
    assert!(
        old.abs() < 0.1 * new.abs(),
        "squared term alone: {old}, with the anchor: {new}"
    );
}

/// Every image keeps at least one token, whatever the selector scores.
#[test]
fn selection_keeps_at_least_one_token_per_image() {
    use lavit_selector::{SelectionMode, MIN_KEPT};
    let margins = Tensor::from_slice(&[-30.0f32, -20.0, -25.0, 5.0, -1.0, 3.0]).view([2, 3]);
    let lp =
        Tensor::stack(&[&margins, &margins.zeros_like()], -1).log_softmax(-1, tch::Kind::Float);
    for mode in [
        SelectionMode::Argmax,
        SelectionMode::Gumbel { seed: 1, tau: 1.0 },
    ] {
        let d = mode.decide(&lp);
        let counts = Vec::<f32>::try_from(d.sum_dim_intlist(1, false, tch::Kind::Float)).unwrap();
        assert!(
            counts.iter().all(|&c| c >= MIN_KEPT as f32),
            "{mode:?}: {counts:?}"
        );
        // the collapsed image keeps its best-scoring patch
        assert_eq!(d.get(0).double_value(&[1]), 1.0, "{mode:?}");
    }
    let keep = lavit_selector::keep_at_least(&Tensor::zeros([2, 3], tch::kind::FLOAT_CPU), &lp, 2);
    assert_eq!(
        Vec::<f32>::try_from(keep.view([-1])).unwrap(),
        vec![0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    );
}

/// Multimodal synthesis on a demo run's output folder named by `LAVIT_SYNTHESIS_DEMO` (its
/// `checkpoint/` and `eval-data/`: the held-out photos, their captions' classes and the judge):
/// the first `LAVIT_SYNTHESIS_PHOTOS` (default 100) photos as image-only prompts with the
/// checkpoint's defaults, judged, as the demo's evaluation measures it
/// ([`demo::synthesis::measure`]); the grids go to `LAVIT_SYNTHESIS_OUT` (default a temp
/// folder); `LAVIT_SYNTHESIS_GUIDANCE` replaces the checkpoint's LLM guidance. By hand: `LAVIT_SYNTHESIS_DEMO=demo-out cargo test --test main -- --ignored
/// demo::synthesis_on_a_named_demo_output --nocapture`.
#[test]
#[ignore = "needs a demo output folder in LAVIT_SYNTHESIS_DEMO"]
fn synthesis_on_a_named_demo_output() {
    use lavit::pipeline::{Pipeline, PipelineConfig, StageSet};
    let out =
        PathBuf::from(std::env::var_os("LAVIT_SYNTHESIS_DEMO").expect("a demo output folder"));
    let n: usize = std::env::var("LAVIT_SYNTHESIS_PHOTOS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let data = out.join("eval-data");
    let lines = std::fs::read_to_string(data.join("captions.jsonl")).unwrap();
    let (mut photos, mut labels) = (Vec::new(), Vec::new());
    for line in lines.lines().take(n) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let class = data::class_of_caption(v["captions"][0].as_str().unwrap()).unwrap();
        let img = image::open(data.join(v["image"].as_str().unwrap()))
            .unwrap()
            .to_luma8();
        let px: Vec<f32> = img.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
        photos.push(Tensor::from_slice(&px).view([1, 1, img.height() as i64, img.width() as i64]));
        labels.push(class);
    }
    let judge = demo::judge::Judge::load_file(&data.join("judge.safetensors")).unwrap();
    let pipe = Pipeline::build(&PipelineConfig {
        checkpoint: Some(out.join("checkpoint")),
        stages: StageSet::Checkpoint,
        pixel_decoding: "lowres".into(),
        ..PipelineConfig::default()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = std::env::var_os("LAVIT_SYNTHESIS_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("lavit-synthesis"));
    std::fs::create_dir_all(&report).unwrap();
    let t0 = std::time::Instant::now();
    let guidance = std::env::var("LAVIT_SYNTHESIS_GUIDANCE")
        .ok()
        .and_then(|v| v.parse().ok());
    let photos = Tensor::cat(&photos, 0);
    let f = demo::synthesis::measure(
        &pipe, &rt, &photos, &labels, &judge, 10, 0, guidance, &report,
    )
    .unwrap();
    println!(
        "synthesis: {} photos, llm_guidance {}: image-only judged the photo's class {:.1} %; \
         image + other class's text (photo, text class, judged): {:?}; {:.0} s; grids in {}",
        f.photos,
        f.llm_guidance,
        f.image_only_accuracy * 100.0,
        f.image_text,
        t0.elapsed().as_secs_f64(),
        report.display()
    );
    assert_eq!(f.photos, labels.len());
}
