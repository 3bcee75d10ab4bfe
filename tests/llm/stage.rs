//! The Llm stage: fixture references, decode loops, tokenizer.json folders, continuous batching.

use super::*;

#[test]
fn llm_stage_reproduces_the_fixture_references() {
    use lavit_runtime::messages::{CaptionOptions, GenerateOptions};
    let dir = fixture_dir();
    let expected =
        lavit_runtime::checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let mut llm = lavit_llm::LlmStageModel::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let manifest = lavit_runtime::manifest::LavitManifest::for_checkpoint(&dir).unwrap();
    let g = &manifest.generation;
    // text → image ids (greedy, CFG 2) equal the reference's visual ids.
    let opts = GenerateOptions {
        n: 1,
        temperature: 0.0,
        llm_guidance: 2.0,
        ..Default::default()
    };
    let ids = llm.image_tokens(&g.t2i_prompt, &opts, &|| false).unwrap();
    let want: Vec<i64> = Vec::try_from(&expected["t2i_greedy_cfg_2"]).unwrap();
    let off = manifest.llm.visual_token_offset;
    assert_eq!(
        ids[0],
        want.into_iter().filter(|&i| i >= off).collect::<Vec<_>>()
    );
    // image → text: the caption of image 0 decodes the reference ids, streamed piece by piece.
    let n0 = expected["understanding_counts"].int64_value(&[0]);
    let e0 = expected["understanding_embeddings"].narrow(0, 0, n0);
    let copts = CaptionOptions {
        max_new_tokens: g.caption_max_new_tokens as usize,
        ..Default::default()
    };
    let mut streamed = String::new();
    let got = llm
        .caption(&e0, "", &copts, &mut |_, piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    let ids: Vec<i64> = Vec::try_from(&expected["caption_greedy_ids"]).unwrap();
    let ids: Vec<i64> = ids
        .into_iter()
        .take_while(|&i| i != manifest.llm.eos_id)
        .collect();
    let got: Vec<i64> = got
        .into_iter()
        .take_while(|&i| i != manifest.llm.eos_id)
        .collect();
    assert_eq!(got, ids);
    assert_eq!(streamed, llm.decode_text(&ids).unwrap());
    // Several images as one left-padded batch (`captions`): each equals its own caption, and
    // the first the reference.
    let counts: Vec<i64> = Vec::try_from(&expected["understanding_counts"]).unwrap();
    let mut at = 0;
    let prefixes: Vec<Tensor> = counts
        .iter()
        .map(|&n| {
            let e = expected["understanding_embeddings"].narrow(0, at, n);
            at += n;
            e
        })
        .collect();
    assert!(prefixes.len() >= 2);
    let strip = |v: &[i64]| -> Vec<i64> {
        v.iter()
            .copied()
            .take_while(|&i| i != manifest.llm.eos_id)
            .collect()
    };
    let batched = llm.captions(&prefixes, "", &copts, &|| false).unwrap();
    assert_eq!(batched.len(), prefixes.len());
    for (p, b) in prefixes.iter().zip(&batched) {
        let one = llm.caption(p, "", &copts, &mut |_, _| true).unwrap();
        assert_eq!(strip(b), strip(&one));
    }
    assert_eq!(strip(&batched[0]), ids);
    // A stop request ends the batch with `Cancelled`.
    let e = llm.captions(&prefixes, "", &copts, &|| true).unwrap_err();
    assert_eq!(e, lavit_runtime::stage::StageError::Cancelled);
}

#[test]
fn decode_loops_stop_within_one_token_and_stream_what_they_return() {
    use lavit_llm::generate::{generate_image_tokens_with, generate_text_with};
    use std::cell::Cell;
    let (_vs, m) = tiny_model(6);
    let v = tiny_vocab();
    let a = m.embed(&Tensor::from_slice(&[20i64, 25, 26, 27, 21]));
    let b = m.embed(&Tensor::from_slice(&[20i64, 30, 21]));
    let cfg = TextConfig {
        max_new_tokens: 8,
        min_new_tokens: 8,
        ..Default::default()
    };
    // Streaming sees every returned id, step by step, per stream.
    let want = generate_text(&m, &v, &[a.shallow_clone(), b.shallow_clone()], &cfg).unwrap();
    let mut seen: Vec<Vec<i64>> = vec![Vec::new(); 2];
    let got = generate_text_with(
        &m,
        &v,
        &[a.shallow_clone(), b.shallow_clone()],
        &cfg,
        &|| false,
        Some(&mut |ids: &[i64]| {
            for (s, &i) in seen.iter_mut().zip(ids) {
                s.push(i);
            }
            true
        }),
    )
    .unwrap();
    assert_eq!(got, want);
    for (s, w) in seen.iter().zip(&want) {
        assert_eq!(&s[..w.len()], &w[..]);
    }
    // should_stop answering true at call 3 stops there: exactly 3 calls, Cancelled.
    let calls = Cell::new(0);
    let stop = || {
        calls.set(calls.get() + 1);
        calls.get() >= 3
    };
    let e = generate_text_with(&m, &v, &[a.shallow_clone()], &cfg, &stop, None).unwrap_err();
    assert!(matches!(e, lavit_runtime::Error::Cancelled), "{e}");
    assert_eq!(calls.get(), 3);
    // a streaming callback answering false stops at once too
    let mut n = 0;
    let e = generate_text_with(
        &m,
        &v,
        &[a],
        &cfg,
        &|| false,
        Some(&mut |_: &[i64]| {
            n += 1;
            n < 2
        }),
    )
    .unwrap_err();
    assert!(matches!(e, lavit_runtime::Error::Cancelled));
    assert_eq!(n, 2);
    // streaming with beams is refused (beams reorder)
    let beams = TextConfig {
        num_beams: 2,
        ..cfg.clone()
    };
    assert!(
        generate_text_with(&m, &v, &[b], &beams, &|| false, Some(&mut |_: &[i64]| true)).is_err()
    );
    // image tokens: the same, once per token
    calls.set(0);
    let icfg = ImageTokenConfig {
        max_new_tokens: 10,
        min_new_tokens: 10,
        seed: Some(1),
        ..Default::default()
    };
    let e = generate_image_tokens_with(&m, &v, &[vec![3, 4]], &icfg, &stop).unwrap_err();
    assert!(matches!(e, lavit_runtime::Error::Cancelled));
    assert_eq!(calls.get(), 3);
    calls.set(-100);
    let full = generate_image_tokens_with(&m, &v, &[vec![3, 4]], &icfg, &stop).unwrap();
    assert_eq!(
        full,
        generate_image_tokens(&m, &v, &[vec![3, 4]], &icfg).unwrap()
    );
    assert_eq!(calls.get(), -100 + 10);
}

/// A language-model folder that ships `tokenizer.json` instead of `tokenizer.model` loads
/// through the same loader (read by the `tokenizers` crate); one with more pieces than the
/// manifest's text vocabulary is refused, naming the file.
#[test]
fn llm_folder_with_tokenizer_json_loads_through_the_same_loader() {
    let write_folder = |dir: &std::path::Path, words: usize| {
        let lm = dir.join("language_model");
        std::fs::create_dir_all(&lm).unwrap();
        std::fs::copy(
            fixture_dir().join("manifest.json"),
            dir.join("manifest.json"),
        )
        .unwrap();
        for e in std::fs::read_dir(fixture_dir().join("language_model")).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap() != "tokenizer.model" {
                std::fs::copy(&p, lm.join(p.file_name().unwrap())).unwrap();
            }
        }
        let mut vocab = serde_json::json!({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "cat": 4});
        for i in 0..words {
            vocab[format!("w{i}")] = (5 + i).into();
        }
        let tj = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(lm.join("tokenizer.json"), tj.to_string()).unwrap();
    };
    let tmp = tempfile::tempdir().unwrap();
    let ok = tmp.path().join("ok");
    write_folder(&ok, 0);
    let m = lavit_llm::LlmStageModel::load(&ok, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(m.tokenizer.encode("a cat"), vec![3, 4]);
    assert_eq!((m.tokenizer.bos_id(), m.tokenizer.eos_id()), (1, 2));
    assert!(m.tokenizer.decode(&[3, 4]).contains("cat"));
    let big = tmp.path().join("big");
    write_folder(&big, 300);
    let e = lavit_llm::LlmStageModel::load(&big, Device::Cpu, Kind::Float)
        .err()
        .expect("a tokenizer larger than the text vocabulary is refused")
        .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("pieces"), "{e}");
    // A FIFO in its place is refused by name, never read (it would block forever).
    let fifo = tmp.path().join("fifo");
    write_folder(&fifo, 0);
    let tj = fifo.join("language_model/tokenizer.json");
    std::fs::remove_file(&tj).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&tj)
        .status()
        .unwrap()
        .success());
    let e = lavit_llm::LlmStageModel::load(&fifo, Device::Cpu, Kind::Float)
        .err()
        .expect("a FIFO tokenizer.json is refused")
        .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("FIFO"), "{e}");
}

#[test]
fn a_request_gets_the_same_alone_or_batched_with_15_others() {
    let llm = lavit_llm::LlmStageModel::load(&fixture_dir(), Device::Cpu, Kind::Float).unwrap();
    let eq = batched_against_alone(&llm, 24);
    assert!(eq.max_score_diff < 1e-4, "{eq:?}");
    assert!(eq.sequences >= 20, "{eq:?}");
    assert!(
        eq.identical as f64 >= 0.99 * eq.sequences as f64,
        "fewer than 99 % identical: {eq:?}"
    );
}

/// The same on a trained checkpoint folder named by `LAVIT_EQUIVALENCE_CHECKPOINT` (the full
/// demo's, say; the quick demo's is checked in `demo::quick_demo_learns_and_its_checkpoint_is_served`).
/// By hand: `LAVIT_EQUIVALENCE_CHECKPOINT=DIR cargo test --test main -- --ignored
/// llm::a_request_gets_the_same_on_a_named_checkpoint --nocapture`.
#[test]
#[ignore = "needs a checkpoint folder in LAVIT_EQUIVALENCE_CHECKPOINT"]
fn a_request_gets_the_same_on_a_named_checkpoint() {
    let dir = std::env::var_os("LAVIT_EQUIVALENCE_CHECKPOINT")
        .expect("LAVIT_EQUIVALENCE_CHECKPOINT names a checkpoint folder");
    let llm = lavit_llm::LlmStageModel::load(std::path::Path::new(&dir), Device::Cpu, Kind::Float)
        .unwrap();
    let eq = batched_against_alone(&llm, 24);
    assert!(eq.max_score_diff < 1e-4, "{eq:?}");
}

/// The default running batch takes the largest request the front-ends accept: as many images
/// as `lavit generate --num-images` allows, each with its guidance row (64 used to refuse the
/// full demo's evaluation of 50 guided images).
#[test]
fn default_batching_takes_the_largest_guided_request() {
    use lavit_llm::batch::{Engine, EngineLimits};
    use lavit_runtime::stage::{Batching, MAX_IMAGES_PER_REQUEST};
    let (_vs, m) = tiny_model(21);
    let v = tiny_vocab();
    let _g = tch::no_grad_guard();
    let cfg = ImageTokenConfig {
        cfg_scale: 2.0,
        max_new_tokens: 2,
        min_new_tokens: 2,
        sampling: Sampling::greedy(),
        num_return_sequences: MAX_IMAGES_PER_REQUEST as i64,
        seed: Some(1),
    };
    let cond = m.embed(&Tensor::from_slice(&[3i64, 4, 5, v.image_start_id]));
    let uncond = m.embed(&Tensor::from_slice(&[v.image_start_id]));
    let mut e = Engine::new(EngineLimits::from_batching(&Batching::default(), 1024));
    e.add(0, cfg.group(&m, &cond, &uncond).unwrap())
        .expect("the default batch takes 64 guided images");
    // one more image is more than the default batch takes
    let over = ImageTokenConfig {
        num_return_sequences: MAX_IMAGES_PER_REQUEST as i64 + 1,
        ..cfg
    };
    let err = e
        .add(1, over.group(&m, &cond, &uncond).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("llm_max_seqs"), "{err}");
}

/// The KV pool is a budget: a request that could never fit is refused with the key to
/// change; requests beyond what is free wait (and run once blocks are freed), never more
/// blocks reserved than the pool has.
#[test]
fn kv_pool_full_waits_and_too_large_is_refused() {
    use lavit_llm::batch::{Engine, EngineLimits};
    let (_vs, m) = tiny_model(21);
    let v = tiny_vocab();
    let _g = tch::no_grad_guard();
    let cfg = ImageTokenConfig {
        cfg_scale: 2.0,
        max_new_tokens: 6,
        min_new_tokens: 6,
        sampling: Sampling::greedy(),
        num_return_sequences: 1,
        seed: Some(1),
    };
    // Blocks of 4 positions: the conditional row reads 3 ids + [IMG] and writes 6 → 10
    // positions, 3 blocks; the unconditional row [IMG] + 6 → 7, 2 blocks: 5 per request.
    let limits = EngineLimits {
        max_seqs: 64,
        max_prefill_tokens: 64,
        kv_blocks: 13,
        block_size: 4,
    };
    let cond = m.embed(&Tensor::from_slice(&[3i64, 4, 5, v.image_start_id]));
    let uncond = m.embed(&Tensor::from_slice(&[v.image_start_id]));
    let mut e = Engine::new(limits);
    for k in 0..3 {
        e.add(k, cfg.group(&m, &cond, &uncond).unwrap()).unwrap();
    }
    // Two fit (10 of 13 blocks); the third waits for one of them to finish.
    assert_eq!(e.plan(), vec![0, 1]);
    assert_eq!(e.kv_blocks(), (10, 13));
    assert_eq!(e.waiting(), 1);
    let mut finished = Vec::new();
    let mut most = 0;
    while !e.is_empty() {
        e.plan();
        most = most.max(e.kv_blocks().0);
        for (k, _) in e.step(&m, &v, &mut |_, _| {}).unwrap() {
            finished.push(k);
        }
    }
    assert_eq!(finished.len(), 3);
    assert!(most <= 13);
    assert_eq!(e.kv_blocks(), (0, 13));
    // 4 samples with guidance: 20 blocks, more than the pool.
    let big = ImageTokenConfig {
        num_return_sequences: 4,
        ..cfg.clone()
    };
    let err = e
        .add(9, big.group(&m, &cond, &uncond).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("kv_cache_mib") && err.contains("20"), "{err}");
    // More sequences than the running batch takes.
    let few = EngineLimits {
        max_seqs: 3,
        ..limits
    };
    let mut e = Engine::new(few);
    let err = e
        .add(1, big.group(&m, &cond, &uncond).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("llm_max_seqs"), "{err}");
}
