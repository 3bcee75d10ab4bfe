use super::*;
use lavit::train::llm::{
    pack, packed_embeds, packed_mask, train_llm, LlmModelBuilder, LlmTrainConfig, ProjectorBuilder,
    Sample, Stage2Models, TrainSummary,
};
use lavit_llm::vocab::IGNORE;
use lavit_runtime::stage::Placement;
use lavit_runtime::train::{hash_state_dict, var_store_state_dict};

fn packed_logits(m: &LlamaForCausalLM, samples: &[&Sample]) -> (Tensor, lavit::train::llm::Packed) {
    let (p, used) = pack(samples, &tiny_vocab(), 64, 1);
    assert_eq!(used, samples.len());
    let e = packed_embeds(m, &p);
    let mask = packed_mask(&p.segments).unwrap();
    let args = ForwardArgs {
        position_ids: Some(&p.position_ids),
        mask_4d: Some(&mask),
        ..Default::default()
    };
    (m.forward_embeds(&e, &args, None).unwrap(), p)
}

#[test]
fn packing_does_not_leak_attention_and_masks_image_side() {
    let (_vs, m) = tiny_model(6);
    let _g = tch::no_grad_guard();
    let a = Sample::Text(vec![3, 4, 5, 6]);
    let feats = Tensor::randn([3, 32], (Kind::Float, Device::Cpu));
    let b = Sample::ImageText {
        features: feats,
        text: vec![7, 8],
    };
    let c = Sample::TextImage {
        text: vec![9, 10],
        visual: vec![25, 26, 27],
    };
    let (all, p) = packed_logits(&m, &[&a, &b, &c]);
    let mut start = 0;
    for s in [&a, &b, &c] {
        let (alone, q) = packed_logits(&m, &[s]);
        let n = alone.size()[1];
        let d = max_diff(&all.narrow(1, start, n), &alone);
        assert!(d < 1e-4, "sample at {start} sees other samples: {d}");
        assert_eq!(p.labels.narrow(1, start, n), q.labels);
        start += n;
    }
    // [image, text]: [BOS] [IMG] f f f [/IMG] 7 8 [EOS] → only 7, 8, EOS are targets.
    let (_, q) = packed_logits(&m, &[&b]);
    let labels: Vec<i64> = Vec::try_from(&q.labels.view([-1])).unwrap();
    let v = tiny_vocab();
    assert_eq!(
        labels,
        vec![IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 7, 8, v.eos_id, IGNORE]
    );
}

/// A small structured caption set: each word has a fixed 2-code visual pattern.
pub(crate) fn caption_set() -> Vec<Sample> {
    let mut out = Vec::new();
    let mut z = 12345u64;
    for _ in 0..48 {
        let mut words = Vec::new();
        for _ in 0..3 {
            z = lavit_runtime::train::splitmix64(z);
            words.push(3 + (z % 8) as i64);
        }
        let visual: Vec<i64> = words
            .iter()
            .flat_map(|&w| [22 + (w % 16), 22 + ((w * 5) % 16)])
            .collect();
        out.push(Sample::TextImage {
            text: words.clone(),
            visual,
        });
        out.push(Sample::Text(words));
    }
    out
}

pub(crate) fn cfg(steps: i64, run_steps: i64) -> LlmTrainConfig {
    LlmTrainConfig {
        steps,
        batch_size: 4,
        grad_accum: 2,
        max_len: 48,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 5,
        weight_decay: 0.01,
        clip_grad: 1.0,
        text_ratio: 0.0,
        save_every: 1000,
        keep: 2,
        log_every: 1000,
        run_steps,
        ..Default::default()
    }
}

/// The Llm stage builds the tiny model from `weights` (made on the test thread, so the
/// global generator of parallel tests does not enter).
pub(crate) fn from_weights(weights: lavit_runtime::checkpoint::StateDict) -> LlmModelBuilder {
    Box::new(move |dev| {
        let vs = nn::VarStore::new(dev);
        let cfg = LlamaConfig {
            hidden_size: 32,
            intermediate_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            ..LlamaConfig::tiny(tiny_vocab().vocab_size)
        };
        let model = LlamaForCausalLM::new(vs.root(), &cfg);
        lavit_runtime::checkpoint::load_into(&vs, "", &weights, "test", &Default::default())?;
        let sp = SentencePiece::from_file(&fixture_dir().join("language_model/tokenizer.model"))?;
        let llm = lavit_llm::LlmStageModel::from_parts(
            vs,
            model,
            tiny_vocab(),
            Box::new(sp),
            &Default::default(),
        );
        Ok(llm)
    })
}

pub(crate) fn copied(vs: &nn::VarStore) -> lavit_runtime::checkpoint::StateDict {
    var_store_state_dict(vs)
        .into_iter()
        .map(|(k, v)| (k, v.detach().copy()))
        .collect()
}

#[test]
fn training_lowers_text_and_visual_loss() {
    let (vs, _m) = tiny_model(7);
    let data = caption_set();
    let dir = tempfile::tempdir().unwrap();
    let s = train_llm(
        from_weights(copied(&vs)),
        &tiny_vocab(),
        &data,
        &[],
        &cfg(120, 0),
        dir.path(),
        &Placement::default(),
        &std::sync::Arc::new(lavit_runtime::dist::ProcessGroup::single()),
    )
    .unwrap();
    eprintln!("stage-2 tiny run: first {:?} last {:?}", s.first, s.last);
    assert_eq!(s.final_step, 120);
    assert!(
        s.last.1 < 0.8 * s.first.1,
        "text loss {:?} → {:?}",
        s.first,
        s.last
    );
    assert!(
        s.last.2 < 0.8 * s.first.2,
        "visual loss {:?} → {:?}",
        s.first,
        s.last
    );
    assert!(
        dir.path().join("metrics.jsonl").exists()
            || std::fs::read_dir(dir.path()).unwrap().count() > 1
    );
}

fn copy_sd(sd: &lavit_runtime::checkpoint::StateDict) -> lavit_runtime::checkpoint::StateDict {
    sd.iter().map(|(k, v)| (k.clone(), v.copy())).collect()
}

fn scrambled(sd: &lavit_runtime::checkpoint::StateDict) -> lavit_runtime::checkpoint::StateDict {
    sd.iter()
        .map(|(k, t)| (k.clone(), t.full_like(0.5)))
        .collect()
}

/// 16 steps straight, and 8 steps then a fresh call that rebuilds the stages from
/// scrambled weights (`models(true)`, as a new process would) and resumes to 16: both end
/// on the same weights. The straight run writes to `straight_dir`. Returns (straight,
/// resumed).
fn assert_resume_is_exact(
    models: impl Fn(bool) -> Stage2Models,
    data: &[Sample],
    straight_dir: &std::path::Path,
) -> (TrainSummary, TrainSummary) {
    let (v, p) = (tiny_vocab(), Placement::default());
    let one = std::sync::Arc::new(lavit_runtime::dist::ProcessGroup::single());
    let db = tempfile::tempdir().unwrap();
    let run = |scramble: bool, c: LlmTrainConfig, dir: &std::path::Path| {
        train_llm(models(scramble), &v, data, &[], &c, dir, &p, &one).unwrap()
    };
    let straight = run(false, cfg(16, 0), straight_dir);
    assert_eq!(run(false, cfg(16, 8), db.path()).final_step, 8);
    let second = run(true, cfg(16, 0), db.path());
    assert_eq!((second.final_step, second.steps_run), (16, 8));
    assert_eq!(
        hash_state_dict(&straight.weights).unwrap(),
        hash_state_dict(&second.weights).unwrap()
    );
    (straight, second)
}

#[test]
fn resume_is_exact() {
    let (vs0, _m) = tiny_model(8);
    let init = copied(&vs0);
    let models = |scramble: bool| {
        Stage2Models::from(from_weights(if scramble {
            scrambled(&init)
        } else {
            copy_sd(&init)
        }))
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, second) = assert_resume_is_exact(models, &caption_set(), dir.path());
    assert_ne!(
        hash_state_dict(&init).unwrap(),
        hash_state_dict(&second.weights).unwrap(),
        "training changed nothing"
    );
}

/// Features of width 16 (not the LLM's 32): each caption word has a fixed feature row.
fn image_text_set() -> Vec<Sample> {
    let mut out = Vec::new();
    let mut z = 777u64;
    let row = |w: i64| {
        let v: Vec<f32> = (0..16)
            .map(|k| ((w * 16 + k) as f32 * 0.37).sin())
            .collect();
        Tensor::from_slice(&v).view([1, 16])
    };
    for _ in 0..24 {
        let mut words = Vec::new();
        for _ in 0..3 {
            z = lavit_runtime::train::splitmix64(z);
            words.push(3 + (z % 8) as i64);
        }
        let feats: Vec<Tensor> = words.iter().map(|&w| row(w)).collect();
        out.push(Sample::ImageText {
            features: Tensor::cat(&feats, 0),
            text: words,
        });
    }
    out
}

/// `vit_proj` 16 → 32 from fixed weights (made on the test thread).
fn projector_from(weights: lavit_runtime::checkpoint::StateDict) -> ProjectorBuilder {
    Box::new(move |dev| {
        let p = lavit_selector::ProjectorStage::new(16, 32, dev);
        lavit_runtime::checkpoint::load_into(&p.vs, "", &weights, "test", &Default::default())?;
        Ok(p)
    })
}

fn projector_init() -> lavit_runtime::checkpoint::StateDict {
    let _turn = lavit_runtime::train::torch_rng_turn(91);
    let p = lavit_selector::ProjectorStage::new(16, 32, Device::Cpu);
    copied(&p.vs)
}

#[test]
fn stage2_trains_vit_proj_in_the_selector_merger_stage_and_resumes_exactly() {
    let (vs0, _m) = tiny_model(9);
    let (llm0, proj0) = (copied(&vs0), projector_init());
    let models = |scramble: bool| {
        let sd = |x| if scramble { scrambled(x) } else { copy_sd(x) };
        Stage2Models {
            llm: from_weights(sd(&llm0)),
            projector: Some(projector_from(sd(&proj0))),
        }
    };
    // 8 + 8 steps from scrambled weights of both stages end where 16 straight do.
    let dir = tempfile::tempdir().unwrap();
    let (straight, _) = assert_resume_is_exact(models, &image_text_set(), dir.path());
    // The projector trained in its own stage; the Llm stage holds no vit_proj.
    for k in ["vit_proj.weight", "vit_proj.bias"] {
        let d = max_diff(&straight.weights[k], &proj0[k]);
        assert!(d > 1e-4, "{k} did not train ({d})");
    }
    assert_eq!(
        straight.weights.len(),
        llm0.len() + 2,
        "the LLM's variables and the projector's two"
    );
    let mut ck = lavit_runtime::train::load(straight.checkpoint.as_deref().unwrap()).unwrap();
    let model = ck.take("model").unwrap();
    assert!(model.keys().all(|k| !k.starts_with("vit_proj")));
    let projector = ck.take("projector").unwrap();
    assert_eq!(projector.len(), 2);
    ck.take("projector_optimizer").unwrap();
    ck.take("optimizer").unwrap();
    assert!(
        straight.last.1 < straight.first.1,
        "text loss {:?} → {:?}",
        straight.first,
        straight.last
    );
}

#[test]
fn stage2_refuses_a_train_list_that_matches_nothing() {
    let (vs0, _m) = tiny_model(11);
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(2, 0);
    c.train = vec!["nothing.".into()];
    let err = train_llm(
        Stage2Models {
            llm: from_weights(copied(&vs0)),
            projector: Some(projector_from(projector_init())),
        },
        &tiny_vocab(),
        &image_text_set(),
        &[],
        &c,
        dir.path(),
        &Placement::default(),
        &std::sync::Arc::new(lavit_runtime::dist::ProcessGroup::single()),
    )
    .expect_err("nothing to train");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("train.train") && msg.contains("matches no variable"),
        "{msg}"
    );
}

#[test]
fn stage2_refuses_features_the_llm_cannot_take_without_a_projector() {
    let (vs0, _m) = tiny_model(10);
    let dir = tempfile::tempdir().unwrap();
    let err = train_llm(
        from_weights(copied(&vs0)),
        &tiny_vocab(),
        &image_text_set(),
        &[],
        &cfg(2, 0),
        dir.path(),
        &Placement::default(),
        &std::sync::Arc::new(lavit_runtime::dist::ProcessGroup::single()),
    )
    .expect_err("16-wide features into a 32-wide LLM");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("hidden size is 32") && msg.contains("vit_proj"),
        "{msg}"
    );
}
