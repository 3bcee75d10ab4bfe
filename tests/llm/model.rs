//! The LLaMA against transformers and the fixture: tokenizer, cache, padding, CFG, sampling.

use super::*;

#[test]
fn parity_rows_pass_on_fixture() {
    let dir = fixture_dir();
    let expected =
        lavit_runtime::checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let rows = lavit::parity::llm::rows(&dir, &expected).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "prompt_ids",
        "prompt_text_ids_check",
        "mixed_logits",
        "understanding_logits",
        "t2i_greedy_cfg_2",
        "t2i_greedy_cfg_4",
        "caption_greedy_ids",
    ] {
        assert!(names.contains(&want), "row {want} missing from {names:?}");
    }
    for r in &rows {
        assert!(r.pass, "{}: max err {} {}", r.name, r.max_abs_err, r.note);
    }
}

#[test]
fn sentencepiece_matches_reference_cases() {
    let text = std::fs::read_to_string(repo_path("tests/data/sp_cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut n = 0;
    for (name, m) in v["models"].as_object().unwrap() {
        let sp = SentencePiece::from_file(&repo_path(m["file"].as_str().unwrap())).unwrap();
        for c in m["cases"].as_array().unwrap() {
            let s = c["text"].as_str().unwrap();
            let want: Vec<i64> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(sp.encode(s), want, "{name}: encode {s:?}");
            assert_eq!(
                sp.decode(&want),
                c["decoded"].as_str().unwrap(),
                "{name}: decode {want:?}"
            );
            n += 1;
        }
    }
    assert!(n >= 50, "only {n} cases");
}

#[test]
fn sentencepiece_rejects_garbage() {
    assert!(SentencePiece::from_bytes(b"").is_err());
    assert!(SentencePiece::from_bytes(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tokenizer.model");
    std::fs::write(&p, b"\x0a\x05abc").unwrap();
    let e = SentencePiece::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("tokenizer.model"), "{e}");
}

#[test]
fn official_preset_names_and_shapes() {
    let text = std::fs::read_to_string(crate::common::fixtures_root().join("official-shapes.json"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let files = v["files"].as_object().unwrap();
    let (_, lm) = files
        .iter()
        .find(|(k, _)| k.starts_with("language_model/ "))
        .unwrap();
    let official: BTreeMap<String, Vec<i64>> = lm
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            let s = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            (k.clone(), s)
        })
        .collect();
    let vocab = lavit_runtime::manifest::LlmManifest::default().vocab_size;
    let ours = LlamaForCausalLM::param_shapes(&LlamaConfig::llama2_7b(vocab));
    assert_eq!(ours, official);
    // The formula equals what the builder really creates (GQA, tied and untied).
    for cfg in [
        LlamaConfig::tiny(50),
        LlamaConfig {
            tie_word_embeddings: true,
            num_key_value_heads: Some(1),
            head_dim: Some(24),
            ..LlamaConfig::tiny(50)
        },
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = LlamaForCausalLM::new(vs.root(), &cfg);
        let built: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        assert_eq!(built, LlamaForCausalLM::param_shapes(&cfg));
    }
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    let (_vs, m) = tiny_model(1);
    let _g = tch::no_grad_guard();
    let ids = Tensor::from_slice(&[3i64, 7, 20, 25, 30, 21, 5, 9, 11, 4]).view([1, 10]);
    let full = m.forward_ids(&ids, &ForwardArgs::default(), None).unwrap();
    let mut cache = KvCache::new();
    let mut parts = vec![m
        .forward_ids(
            &ids.narrow(1, 0, 6),
            &ForwardArgs::default(),
            Some(&mut cache),
        )
        .unwrap()];
    parts.push(
        m.forward_ids(
            &ids.narrow(1, 6, 2),
            &ForwardArgs::default(),
            Some(&mut cache),
        )
        .unwrap(),
    );
    for t in 8..10 {
        parts.push(
            m.forward_ids(
                &ids.narrow(1, t, 1),
                &ForwardArgs::default(),
                Some(&mut cache),
            )
            .unwrap(),
        );
    }
    let inc = Tensor::cat(&parts, 1);
    assert!(max_diff(&full, &inc) < 1e-4, "{}", max_diff(&full, &inc));
    assert_eq!(cache.len(), 10);
}

#[test]
fn left_padded_batch_equals_single_streams() {
    let (_vs, m) = tiny_model(2);
    let _g = tch::no_grad_guard();
    let seqs = vec![vec![3i64, 7, 20, 25, 30], vec![9i64, 4]];
    let (ids, mask) = left_pad_ids(&seqs, 0);
    let mut cache = KvCache::new();
    let args = ForwardArgs {
        attention_mask: Some(&mask),
        ..Default::default()
    };
    let batched = m.forward_ids(&ids, &args, Some(&mut cache)).unwrap();
    let step = m
        .forward_ids(
            &Tensor::from_slice(&[6i64, 8]).view([2, 1]),
            &ForwardArgs::default(),
            Some(&mut cache),
        )
        .unwrap();
    for (b, s) in seqs.iter().enumerate() {
        let mut s2 = s.clone();
        s2.push([6, 8][b]);
        let single = m
            .forward_ids(
                &Tensor::from_slice(&s2).view([1, -1]),
                &ForwardArgs::default(),
                None,
            )
            .unwrap();
        let n = s.len() as i64;
        let real = batched.get(b as i64).narrow(0, 5 - n, n);
        assert!(max_diff(&real, &single.get(0).narrow(0, 0, n)) < 1e-4);
        assert!(max_diff(&step.get(b as i64).get(0), &single.get(0).get(n)) < 1e-4);
    }
    // Embedding-level padding helper agrees with the id one.
    let (e, me) = left_pad_embeds(&[
        m.embed(&Tensor::from_slice(&seqs[0])),
        m.embed(&Tensor::from_slice(&seqs[1])),
    ]);
    assert_eq!(e.size(), vec![2, 5, 32]);
    assert!(me.equal(&mask));
}

#[test]
fn batched_cfg_equals_separate_forwards() {
    let (_vs, m) = tiny_model(3);
    let _g = tch::no_grad_guard();
    let v = tiny_vocab();
    let prompts = vec![vec![3i64, 7, 9, 4, 5], vec![11i64, 12]];
    for a in [1.0, 3.0] {
        let cfg = ImageTokenConfig {
            cfg_scale: a,
            max_new_tokens: 8,
            min_new_tokens: 2,
            sampling: Sampling::greedy(),
            num_return_sequences: 1,
            seed: None,
        };
        let got = generate_image_tokens(&m, &v, &prompts, &cfg).unwrap();
        for (p, g) in prompts.iter().zip(&got) {
            assert_eq!(g, &cfg_reference(&m, &v, p, a, 2, 8), "cfg {a}");
        }
    }
}

#[test]
fn suppression_never_emits_forbidden_ids() {
    let (_vs, m) = tiny_model(4);
    let v = tiny_vocab();
    let cfg = ImageTokenConfig {
        cfg_scale: 2.0,
        max_new_tokens: 12,
        min_new_tokens: 5,
        sampling: Sampling {
            do_sample: true,
            temperature: 5.0,
            top_k: 0,
            top_p: 1.0,
        },
        num_return_sequences: 4,
        seed: Some(7),
    };
    let out = generate_image_tokens(&m, &v, &[vec![3, 4], vec![5]], &cfg).unwrap();
    assert_eq!(out.len(), 8);
    for s in &out {
        for (i, &t) in s.iter().enumerate() {
            let last = i + 1 == s.len();
            assert!(
                v.is_visual(t) || (last && t == v.image_end_id && i >= 5),
                "{s:?}"
            );
        }
    }
    // Same seed, same samples.
    assert_eq!(
        out,
        generate_image_tokens(&m, &v, &[vec![3, 4], vec![5]], &cfg).unwrap()
    );
    let prefix = m.embed(&Tensor::from_slice(&[20i64, 25, 26, 21]));
    for num_beams in [1, 3] {
        let tcfg = TextConfig {
            max_new_tokens: 10,
            min_new_tokens: 3,
            sampling: Sampling {
                do_sample: num_beams == 1,
                temperature: 5.0,
                top_k: 0,
                top_p: 1.0,
            },
            num_beams,
            repetition_penalty: 1.3,
            seed: Some(1),
            ..Default::default()
        };
        let out = generate_text(
            &m,
            &v,
            &[prefix.shallow_clone(), prefix.narrow(0, 0, 2)],
            &tcfg,
        )
        .unwrap();
        for s in out {
            assert!(s.len() >= 3, "{s:?}");
            assert!(s.iter().all(|&t| v.is_text(t) && t != v.eos_id), "{s:?}");
        }
    }
}

#[test]
fn batched_captions_equal_single_and_beam_one_is_greedy() {
    let (_vs, m) = tiny_model(5);
    let v = tiny_vocab();
    let a = m.embed(&Tensor::from_slice(&[20i64, 25, 26, 27, 21]));
    let b = m.embed(&Tensor::from_slice(&[20i64, 30, 21]));
    let cfg = TextConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let both = generate_text(&m, &v, &[a.shallow_clone(), b.shallow_clone()], &cfg).unwrap();
    assert_eq!(
        both[0],
        generate_text(&m, &v, &[a.shallow_clone()], &cfg).unwrap()[0]
    );
    assert_eq!(both[1], generate_text(&m, &v, &[b], &cfg).unwrap()[0]);
    let beam1 = TextConfig {
        num_beams: 1,
        ..cfg.clone()
    };
    assert_eq!(
        generate_text(&m, &v, &[a.shallow_clone()], &beam1).unwrap(),
        vec![both[0].clone()]
    );
    let beam3 = TextConfig {
        num_beams: 3,
        ..cfg
    };
    let r1 = generate_text(&m, &v, &[a.shallow_clone()], &beam3).unwrap();
    assert_eq!(r1, generate_text(&m, &v, &[a], &beam3).unwrap());
}

#[test]
fn top_k_and_top_p_keep_the_right_support() {
    let probs = Tensor::from_slice(&[0.05f32, 0.5, 0.15, 0.3]).view([1, 4]);
    let logits = probs.log();
    let finite =
        |t: &Tensor| -> Vec<bool> { Vec::<bool>::try_from(&t.isfinite().view([-1])).unwrap() };
    assert_eq!(
        finite(&top_k_filter(&logits, 2)),
        vec![false, true, false, true]
    );
    assert_eq!(finite(&top_k_filter(&logits, 0)), vec![true; 4]);
    assert_eq!(
        finite(&top_p_filter(&logits, 0.75)),
        vec![false, true, false, true]
    );
    assert_eq!(
        finite(&top_p_filter(&logits, 0.9)),
        vec![false, true, true, true]
    );
    assert_eq!(
        finite(&top_p_filter(&logits, 0.3)),
        vec![false, true, false, false]
    );
    // Sampling never leaves the support.
    let mut rng = SampleRng::new(Some(0));
    let s = Sampling {
        do_sample: true,
        temperature: 1.0,
        top_k: 3,
        top_p: 0.75,
    };
    let many = logits.repeat([500, 1]);
    let picks: Vec<i64> = Vec::try_from(&pick(&many, &s, &mut rng)).unwrap();
    assert!(picks.iter().all(|&i| i == 1 || i == 3));
    assert!(picks.contains(&1) && picks.contains(&3));
    // …and follows the renormalised probabilities (0.5 / 0.8 for id 1), loosely.
    let many = logits.repeat([4000, 1]);
    let picks: Vec<i64> = Vec::try_from(&pick(&many, &s, &mut rng)).unwrap();
    let f1 = picks.iter().filter(|&&i| i == 1).count() as f64 / 4000.0;
    assert!((f1 - 0.625).abs() < 0.04, "frequency of id 1: {f1}");
    // Bad settings are refused.
    assert!(Sampling {
        temperature: f64::NAN,
        ..s.clone()
    }
    .validate()
    .is_err());
    assert!(Sampling { top_p: 0.0, ..s }.validate().is_err());
}

#[test]
fn fixture_model_loads_strictly_and_bad_ids_are_errors() {
    let dir = fixture_dir().join("language_model");
    let (_vs, m) = LlamaForCausalLM::from_pretrained(&dir, Device::Cpu, Kind::Float).unwrap();
    assert!(m
        .f_embed(&Tensor::from_slice(&[m.config.vocab_size]))
        .is_err());
    assert!(m.f_embed(&Tensor::from_slice(&[-1i64])).is_err());
    // bf16 runs and stays close to f32 on the fixture.
    let (_vs16, m16) =
        LlamaForCausalLM::from_pretrained(&dir, Device::Cpu, Kind::BFloat16).unwrap();
    let ids = Tensor::from_slice(&[3i64, 174, 29, 3, 133]).view([1, 5]);
    let a = m.forward_ids(&ids, &ForwardArgs::default(), None).unwrap();
    let b = m16
        .forward_ids(&ids, &ForwardArgs::default(), None)
        .unwrap()
        .to_kind(Kind::Float);
    assert!(max_diff(&a, &b) < 0.1 * a.abs().max().double_value(&[]).max(1.0));
}
