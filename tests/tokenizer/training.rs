//! Stage-1 training: kept ratio, exact resume, config, the actors, bf16.

use super::*;

#[test]
fn stage1_kept_ratio_follows_rho() {
    if !photos_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let kept = |rho: f64, run: &str| {
        let mut cfg = tiny_config(tmp.path(), run);
        cfg.rho = rho;
        cfg.steps = 30;
        cfg.steps_no_quant = 30;
        cfg.lambda = 10.0;
        cfg.lr = 2e-2;
        cfg.warmup_steps = 0;
        mean(&lavit::train::tokenizer::train(&cfg).unwrap().series("kept")[25..])
    };
    let lo = kept(0.15, "lo");
    let hi = kept(0.85, "hi");
    assert!(
        lo < 0.4 && hi > 0.6,
        "kept ratio {lo} for rho 0.15, {hi} for rho 0.85"
    );
}

#[test]
fn stage1_resume_equals_a_straight_run() {
    if !photos_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let small = |run: &str| {
        let mut c = tiny_config(tmp.path(), run);
        c.max_images = 12;
        c.batch_size = 4;
        c.steps = 8;
        c.steps_no_quant = 4;
        c.save_every = 2;
        c
    };
    let straight = lavit::train::tokenizer::train(&small("straight")).unwrap();
    let mut first = small("resumed");
    first.stop_after = Some(3);
    let part = lavit::train::tokenizer::train(&first).unwrap();
    assert_eq!(part.steps, 3);
    assert!(part.export_dir.is_none());
    let resumed = lavit::train::tokenizer::train(&small("resumed")).unwrap();
    assert_eq!(resumed.steps, 8);
    let (a, b) = (straight.series("loss"), resumed.series("loss"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        // Earlier steps' values come back from the metrics log as text.
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{a:?} vs {b:?}");
    }
    let h = |r: &lavit::train::tokenizer::TrainReport| {
        let mut sd = lavit_runtime::train::var_store_state_dict(&r.tokenizer.selector.vs);
        sd.extend(lavit_runtime::train::var_store_state_dict(
            &r.tokenizer.quantizer.vs,
        ));
        let cb = r
            .tokenizer
            .quantizer
            .quantize
            .embed(&Tensor::arange(256, (Kind::Int64, Device::Cpu)))
            .unwrap();
        sd.insert("codebook".into(), cb);
        lavit_runtime::train::hash_state_dict(&sd).unwrap()
    };
    assert_eq!(h(&straight), h(&resumed));
}

/// `lavit train tokenizer` configs take the serving placement keys and the `[plugins]`
/// section; relative plugin paths resolve against the config's folder; unknown keys are
/// refused with the file named.
#[test]
fn train_config_reads_placement_and_plugins() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("train.toml");
    std::fs::write(
        &p,
        "steps = 10\nsteps_no_quant = 2\n[placement]\nencoder = \"cuda:1\"\n\
         [plugins]\nload = [\"libx.so\"]\n[plugins.codebook]\nplugin = \"residual-vq\"\n\
         weights = \"cb.safetensors\"\nconfig = { levels = 3 }\n",
    )
    .unwrap();
    let cfg = lavit::train::tokenizer::TokenizerTrainConfig::from_toml_file(&p).unwrap();
    let placement = cfg.placement.as_ref().unwrap();
    assert_eq!(placement.encoder, "cuda:1");
    assert_eq!(placement.quantizer, "cpu");
    assert_eq!(cfg.plugins.load, [tmp.path().join("libx.so")]);
    let cb = cfg.plugins.codebook.as_ref().unwrap();
    assert_eq!(
        cb.weights.as_deref(),
        Some(tmp.path().join("cb.safetensors").as_path())
    );
    assert_eq!(cb.config["levels"], 3);
    assert!(cfg.plugins.backbone.is_none());
    // The serving placement files work as they are.
    let placement = tmp.path().join("placement.toml");
    std::fs::write(&placement, "[placement]\nquantizer = \"cuda:2\"\n").unwrap();
    std::fs::write(&p, "placement_file = \"placement.toml\"\n").unwrap();
    let placed = lavit::train::tokenizer::TokenizerTrainConfig::from_toml_file(&p).unwrap();
    assert_eq!(placed.placement.unwrap().quantizer, "cuda:2");
    std::fs::write(&p, "placement_file = \"nothing.toml\"\n").unwrap();
    let e = format!(
        "{:#}",
        lavit::train::tokenizer::TokenizerTrainConfig::from_toml_file(&p).unwrap_err()
    );
    assert!(e.contains("nothing.toml"), "{e}");
    std::fs::write(&p, "[plugins]\nlod = []\n").unwrap();
    let e = format!(
        "{:#}",
        lavit::train::tokenizer::TokenizerTrainConfig::from_toml_file(&p).unwrap_err()
    );
    assert!(e.contains("train.toml") && e.contains("lod"), "{e}");
    // A part named without a library to take it from is refused clearly.
    let mut no_lib = cfg.plugins.clone();
    no_lib.load.clear();
    let e = lavit::tokenizer::TokenizerPlugins::load(&no_lib).unwrap_err();
    assert!(
        e.to_string().contains("residual-vq") && e.to_string().contains("plugins.load"),
        "{e}"
    );
}

/// Stage 1 through the stage actors equals the same stage adapters called directly on this
/// thread (no actors, no messages): the loss sequence is bit for bit the same, so the
/// actor transport (threads, mailboxes, device moves) changes nothing. Both use the built-in
/// EVA and codebook, with the k-means initialisation and EMA updates inside the run.
#[test]
fn stage1_through_the_actors_equals_direct_stage_calls() {
    use lavit::train::tokenizer::{
        batch_indices, init_weights, load_image_folder, stage1_builders, stage1_spec, train,
        Stage1Handle,
    };
    use lavit_plugin_api::Codebook;
    use lavit_runtime::messages::train_keys as k;
    use lavit_runtime::messages::TrainBatch;
    use lavit_runtime::train::{LrSchedule, StepRng};

    let tmp = tempfile::tempdir().unwrap();
    crate::common::write_images(&tmp.path().join("images"), 8);
    let mut cfg = tiny_config(tmp.path(), "actors");
    cfg.data_dir = tmp.path().join("images");
    cfg.batch_size = 4;
    cfg.steps = 7;
    cfg.steps_no_quant = 3;
    cfg.kmeans_batches = 2;
    cfg.grad_clip = 0.5;
    let through_actors = train(&cfg).unwrap().series("loss");

    // The same run, the stages called directly.
    let m = LavitManifest::from_json_file(cfg.manifest.as_ref().unwrap()).unwrap();
    let mut eva = EvaBackbone::new(&EvaVitConfig::from_manifest(&m.tokenizer), Device::Cpu);
    init_weights(&eva.vs, cfg.seed ^ 0xe7a);
    eva.vs.freeze();
    let (builders, rx) = stage1_builders(stage1_spec(&cfg, &m, Box::new(eva), None));
    let mut enc = (builders.encoder)(Device::Cpu).unwrap();
    let mut sm = (builders.selector_merger)(Device::Cpu).unwrap();
    let mut q = (builders.quantizer)(Device::Cpu).unwrap();
    let mut d = (builders.decoder)(Device::Cpu).unwrap();
    let mut codebook = None;
    for h in rx.try_iter() {
        if let Stage1Handle::Quantizer { codebook: c } = h {
            codebook = Some(c);
        }
    }
    // Every trained parameter, in name order (the order the driver sums the global norm in).
    let mut params = Vec::new();
    params.extend(sm.trained_params().unwrap());
    params.extend(q.trained_params().unwrap());
    params.extend(d.trained_params().unwrap());
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut codebook = codebook.unwrap();
    enc.set_train(true);
    sm.set_train(true);
    q.set_train(true);
    d.set_train(true);
    let (images, _) = load_image_folder(&cfg.data_dir, m.tokenizer.img_size, 0).unwrap();
    let mut b = TrainBatch::new(vec![]);
    b.tensors.insert(k::IMAGES, images);
    let feats = enc.train_forward(b).unwrap().tensors[&k::PATCH_FEATURES].shallow_clone();
    let n = feats.size()[0] as usize;
    let forward = |sm: &mut Box<dyn lavit_runtime::stage::SelectorMergerStage>,
                   q: &mut Box<dyn lavit_runtime::stage::QuantizerStage>,
                   d: &mut Box<dyn lavit_runtime::stage::DecoderStage>,
                   idx: Vec<i64>,
                   seed: u64,
                   tau: f64,
                   quantize: bool| {
        let mut b = TrainBatch::new(vec![]);
        let x = feats.index_select(0, &Tensor::from_slice(&idx));
        b.tensors.insert(k::PATCH_FEATURES, x);
        b.tensors.insert(k::GUMBEL_SEED, Tensor::from(seed as i64));
        b.tensors.insert(k::TAU, Tensor::from(tau));
        b.tensors.insert(k::QUANTIZE, Tensor::from(quantize as i64));
        d.train_forward(q.train_forward(sm.train_forward(b).unwrap()).unwrap())
            .unwrap()
    };
    let schedule = LrSchedule::warmup_cosine(cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr);
    let rng = StepRng::new(cfg.seed);
    let mut direct = Vec::new();
    for step in 0..cfg.steps {
        let seed = rng.begin_step(step);
        let (tau, lr) = (cfg.tau_at(step), schedule.lr_at(step));
        if step == cfg.steps_no_quant {
            let z: Vec<Tensor> = (0..cfg.kmeans_batches as i64)
                .map(|j| {
                    let idx = batch_indices(cfg.seed ^ 0xc0de, j, n, cfg.batch_size);
                    forward(&mut sm, &mut q, &mut d, idx, seed, tau, false).tensors[&k::CODES_Z]
                        .shallow_clone()
                })
                .collect();
            codebook
                .init_from_samples(&Tensor::cat(&z, 0), cfg.seed)
                .unwrap();
        }
        let idx = batch_indices(cfg.seed, step, n, cfg.batch_size);
        let out = forward(
            &mut sm,
            &mut q,
            &mut d,
            idx,
            seed,
            tau,
            step >= cfg.steps_no_quant,
        );
        let term = |name: lavit_runtime::messages::TrainKey| {
            out.losses
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
                .shallow_clone()
        };
        let loss = term(k::LOSS_RECONSTRUCTION)
            + term(k::LOSS_RATIO)
            + term(k::LOSS_COMMITMENT)
            + term(k::LOSS_CONFIDENCE);
        direct.push(loss.double_value(&[]));
        loss.backward();
        // Global clipping over the stages' parameters, in name order.
        let sq: f64 = params
            .iter()
            .filter(|(_, p)| p.grad().defined())
            .map(|(_, p)| {
                p.grad()
                    .contiguous()
                    .to_kind(Kind::Double)
                    .square()
                    .sum(Kind::Double)
                    .double_value(&[])
            })
            .sum();
        let coef = cfg.grad_clip / (sq.sqrt() + 1e-6);
        if coef < 1.0 {
            tch::no_grad(|| {
                for (_, p) in &params {
                    let _ = p.grad().f_mul_scalar_(coef).unwrap();
                }
            });
        }
        let ctl = lavit_runtime::messages::StepControl {
            lr,
            apply: true,
            step,
        };
        sm.optimizer_step_with(&ctl).unwrap();
        q.optimizer_step_with(&ctl).unwrap();
        d.optimizer_step_with(&ctl).unwrap();
    }
    assert_eq!(through_actors.len(), direct.len());
    for (s, (a, d)) in through_actors.iter().zip(&direct).enumerate() {
        // The trainer's values come straight from the run (not the metrics file).
        assert_eq!(
            a.to_bits(),
            d.to_bits(),
            "step {s}: {through_actors:?} vs {direct:?}"
        );
    }
}

#[test]
fn tokenizer_stages_load_in_bf16_and_agree_with_the_reference() {
    use lavit_runtime::stage::SelectorMergerStage;
    let dir = fixture_dir();
    let exp = checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let manifest = LavitManifest::for_checkpoint(&dir).unwrap();
    let enc_path = dir.join("visual_tokenizer/tokenizer_encoder.bin");
    let sd = checkpoint::load_path(&enc_path).unwrap();
    let dcfg = FeatureDecoderConfig::from_manifest(&manifest.feature_decoder);
    let features = exp["encoder_features"].narrow(1, 1, 64);
    // float32 must meet the reference closely, so the bf16 bound below measures bf16.
    for (kind, tol) in [(Kind::Float, 1e-4), (Kind::BFloat16, 5e-2)] {
        let plugins = lavit::tokenizer::TokenizerPlugins::none();
        let enc =
            lavit_encoder::EncoderStageModel::load(&dir, Device::Cpu, kind, &plugins).unwrap();
        let f = enc.patch_features(&exp["images"]).unwrap();
        assert_eq!(f.kind(), Kind::Float, "features leave the stage in float32");
        assert!(
            rel_err(&f, &features) < tol,
            "{kind:?} encoder: {}",
            rel_err(&f, &features)
        );

        let mut sel = lavit_selector::SelectorMergerStageModel::load_state(
            &dir,
            &manifest,
            Device::Cpu,
            kind,
            &sd,
            "tokenizer_encoder",
        )
        .unwrap();
        assert!(sel.vs.variables().values().all(|t| t.kind() == kind));
        let (decisions, merged) = sel.select_merge(&features, None).unwrap();
        let agree = decisions
            .to_kind(Kind::Float)
            .eq_tensor(&exp["keep_decisions"])
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(agree >= 0.95, "{kind:?}: decisions agree on {agree}");
        let keep = exp["keep_decisions"].gt(0.5).unsqueeze(-1);
        let (ours, theirs) = (
            merged.masked_select(&keep),
            exp["merged_features"].masked_select(&keep),
        );
        assert!(
            rel_err(&ours, &theirs) < tol,
            "{kind:?} merger: {}",
            rel_err(&ours, &theirs)
        );

        let (_vs, dec) = VQDecoder::load(
            &dir.join("visual_tokenizer/tokenizer_decoder.bin"),
            &dcfg,
            Device::Cpu,
            kind,
        )
        .unwrap();
        let counts = Vec::<i64>::try_from(&exp["token_counts"]).unwrap();
        let out = dec.forward(&exp["quantized_embeddings"], &counts).unwrap();
        let want = &exp["lowres_decoder_out"];
        assert!(
            rel_err(&out, want) < tol,
            "{kind:?} decoder: {}",
            rel_err(&out, want)
        );

        // The library's tokenizer in that kind: the same selection, the understanding path.
        let parts = LoadParts {
            kind,
            ..LoadParts::all()
        };
        let tok = VisualTokenizer::from_checkpoint(&dir, Device::Cpu, parts).unwrap();
        let tr = tok.trace(&exp["images"], SelectionMode::Argmax).unwrap();
        assert_eq!(tr.merged.kind(), Kind::Float);
        let agree = tr
            .decisions
            .to_kind(Kind::Float)
            .eq_tensor(&exp["keep_decisions"])
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(
            agree >= 0.95,
            "{kind:?} tokenizer: decisions agree on {agree}"
        );
        if kind == Kind::Float {
            assert_eq!(agree, 1.0, "float32 selects exactly as the reference");
        }
        let (emb, _) = tok
            .encode_features(&exp["images"], SelectionMode::Argmax)
            .unwrap();
        // (a flipped bf16 decision changes which rows exist: compare when none flipped)
        if agree == 1.0 {
            let want = &exp["understanding_embeddings"];
            assert!(
                rel_err(&emb, want) < tol,
                "{kind:?} understanding: {}",
                rel_err(&emb, want)
            );
        }
    }
}
