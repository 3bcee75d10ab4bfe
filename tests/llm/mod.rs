//! Integration tests: llm (LLaMA, SentencePiece, unified vocabulary, generation, parity).

use crate::common::fixture_dir;
use lavit_llm::generate::{
    generate_image_tokens, generate_text, pick, top_k_filter, top_p_filter, ImageTokenConfig,
    SampleRng, Sampling, TextConfig,
};
use lavit_llm::sentencepiece::SentencePiece;
use lavit_llm::vocab::{left_pad_embeds, left_pad_ids, UnifiedVocab};
use lavit_llm::{ForwardArgs, KvCache, LlamaConfig, LlamaForCausalLM};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

mod model;
mod stage;
pub(crate) mod stage2;

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A tiny unified vocabulary: 20 text ids, [IMG] 20, [/IMG] 21, 16 visual ids.
pub(crate) fn tiny_vocab() -> UnifiedVocab {
    UnifiedVocab {
        text_vocab_size: 20,
        image_start_id: 20,
        image_end_id: 21,
        visual_token_offset: 22,
        vocab_size: 38,
        bos_id: 1,
        eos_id: 2,
    }
}

pub(crate) fn tiny_model(seed: i64) -> (nn::VarStore, LlamaForCausalLM) {
    tch::manual_seed(seed);
    let cfg = LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        ..LlamaConfig::tiny(tiny_vocab().vocab_size)
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let m = LlamaForCausalLM::new(vs.root(), &cfg);
    (vs, m)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Reference CFG loop: cond and uncond as separate, uncached, unpadded forwards (eq. 7).
fn cfg_reference(
    m: &LlamaForCausalLM,
    v: &UnifiedVocab,
    prompt: &[i64],
    a: f64,
    min: i64,
    max: i64,
) -> Vec<i64> {
    let mut cond: Vec<i64> = prompt.to_vec();
    cond.push(v.image_start_id);
    let mut unc = vec![v.image_start_id];
    let mut out = Vec::new();
    for step in 0..max {
        let last = |s: &[i64]| {
            let l = m
                .forward_ids(
                    &Tensor::from_slice(s).view([1, -1]),
                    &ForwardArgs::default(),
                    None,
                )
                .unwrap();
            l.get(0)
                .get(s.len() as i64 - 1)
                .log_softmax(-1, Kind::Float)
        };
        let (c, u) = (last(&cond), last(&unc));
        let g = &u + (&c - &u) * a;
        let scores: Vec<f32> = Vec::try_from(&g).unwrap();
        let mut best = (f32::NEG_INFINITY, -1);
        for (i, &s) in scores.iter().enumerate() {
            let i = i as i64;
            let ok = v.is_visual(i) || (i == v.image_end_id && step >= min);
            if ok && s > best.0 {
                best = (s, i);
            }
        }
        out.push(best.1);
        if best.1 == v.image_end_id {
            break;
        }
        cond.push(best.1);
        unc.push(best.1);
    }
    out
}

// ------------------------------------------------------------------------------------------
// Continuous batching: a request gets what it gets alone.

/// What [`batched_against_alone`] found.
#[derive(Debug)]
pub(crate) struct Equivalence {
    /// Id sequences compared (one per sample / caption) and those identical.
    pub sequences: usize,
    pub identical: usize,
    /// The largest difference of a pick's scores between the two runs, over the picks made
    /// from the same prefix (every pick of an identical sequence; up to the first differing
    /// pick of the others).
    pub max_score_diff: f64,
}

/// 16 requests with fixed seeds on `llm` in float32 (image tokens sampled and greedy under
/// guidance; captions greedy, sampled and with a repetition penalty; one with beams), run
/// each alone in its own engine and all together in one engine, joining in three waves
/// between steps, with prompts prefilled in chunks of 5 positions beside the decodes. Prints
/// every sequence that differs (with the top-2 margin of its differing pick: a near-tie)
/// and the share of identical sequences.
pub(crate) fn batched_against_alone(llm: &lavit_llm::LlmStageModel, max_new: i64) -> Equivalence {
    use lavit_llm::batch::{Engine, EngineLimits, Group};
    use lavit_llm::vocab::{build_sequence, Segment};
    let _g = tch::no_grad_guard();
    let (m, v) = (&llm.model, &llm.vocab);
    let embed = |ids: &[i64]| m.embed(&Tensor::from_slice(ids));
    let img = v.image_start_id;
    let words = [
        "a photo of a cat",
        "a red shirt",
        "two dogs",
        "a sneaker on grass",
    ];
    let prompt = |i: usize| {
        let mut ids = llm.tokenizer.encode(words[i % words.len()]);
        ids.push(img);
        embed(&ids)
    };
    // Stand-in image embeddings (the LLM reads any (T, H) rows between [IMG] and [/IMG]).
    let prefix = |i: usize| {
        let ids: Vec<i64> = (0..(5 + i as i64 % 7))
            .map(|j| (j * 7 + i as i64 * 13) % v.text_vocab_size)
            .collect();
        let e = embed(&ids) * 0.5;
        build_sequence(m, v, &[Segment::ImageEmbeds(e)])
            .unwrap()
            .embeds
    };
    let sampled = |t: f64, k: i64, p: f64| Sampling {
        do_sample: true,
        temperature: t,
        top_k: k,
        top_p: p,
    };
    let unlimited = EngineLimits::unbounded();
    let make = |i: usize| -> Group {
        let image = |sampling: Sampling, n: i64, cfg_scale: f64| {
            let c = ImageTokenConfig {
                cfg_scale,
                max_new_tokens: max_new,
                min_new_tokens: 2,
                sampling,
                num_return_sequences: n,
                seed: Some(100 + i as u64),
            };
            c.group(m, &prompt(i), &embed(&[img])).unwrap()
        };
        let text = |sampling: Sampling, beams: i64, penalty: f64, prompts: usize| {
            let c = TextConfig {
                max_new_tokens: max_new,
                min_new_tokens: 1,
                sampling,
                num_beams: beams,
                repetition_penalty: penalty,
                seed: Some(200 + i as u64),
                ..TextConfig::default()
            };
            let p: Vec<Tensor> = (0..prompts).map(|j| prefix(i + j)).collect();
            c.group(m, &p, false).unwrap()
        };
        match i {
            0..=3 => image(
                sampled(1.0, 50, 1.0),
                1 + (i as i64 % 2),
                2.0 + i as f64 * 0.5,
            ),
            4 | 5 => image(sampled(0.9, 20, 0.95), 2, 3.0),
            6 | 7 => image(Sampling::greedy(), 1, 2.0),
            8..=10 => text(Sampling::greedy(), 1, 1.0, 1 + i % 2),
            11..=13 => text(sampled(0.8, 20, 0.9), 1, 1.0, 1),
            14 => text(Sampling::greedy(), 1, 1.3, 2),
            _ => text(Sampling::greedy(), 3, 1.0, 1),
        }
    };
    let n = 16;
    // Alone: each request in an engine of its own.
    let mut alone: Vec<Group> = Vec::new();
    for i in 0..n {
        let mut e = Engine::new(EngineLimits {
            max_seqs: 64,
            kv_blocks: 4096,
            ..unlimited
        });
        e.trace(true);
        e.add(i as u64, make(i)).unwrap();
        while !e.is_empty() {
            e.plan();
            e.step(m, v, &mut |_, _| {}).unwrap();
        }
        alone.push(e.take_traced(i as u64).unwrap());
    }
    // Batched: one engine, requests joining in three waves, prompts prefilled 5 positions a step.
    let mut e = Engine::new(EngineLimits {
        max_seqs: 64,
        max_prefill_tokens: 5,
        kv_blocks: 4096,
        block_size: 4,
    });
    e.trace(true);
    let mut steps = 0;
    let mut next = 0;
    while next < n || !e.is_empty() {
        let wave = match steps {
            0 => 8,
            2 => 12,
            5 => n,
            _ => next,
        };
        while next < wave.min(n) {
            e.add(next as u64, make(next)).unwrap();
            next += 1;
        }
        e.plan();
        e.step(m, v, &mut |_, _| {}).unwrap();
        steps += 1;
        if steps > 10_000 {
            panic!("the batched run does not end");
        }
    }
    let batched: Vec<Group> = (0..n).map(|i| e.take_traced(i as u64).unwrap()).collect();
    let mut out = Equivalence {
        sequences: 0,
        identical: 0,
        max_score_diff: 0.0,
    };
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        for (row, (ia, ib)) in a.generated().iter().zip(b.generated()).enumerate() {
            out.sequences += 1;
            let first_diff = ia.iter().zip(ib).position(|(x, y)| x != y);
            let same = first_diff.is_none() && ia.len() == ib.len();
            out.identical += same as usize;
            let (sa, sb) = (&a.scores[row], &b.scores[row]);
            let upto = first_diff.map_or(sa.len().min(sb.len()), |d| d + 1);
            for k in 0..upto.min(sa.len()).min(sb.len()) {
                out.max_score_diff = out.max_score_diff.max(max_diff(&sa[k], &sb[k]));
            }
            if let Some(d) = first_diff {
                let (top, _) = sa[d].topk(2, -1, true, true);
                let margin = top.double_value(&[0]) - top.double_value(&[1]);
                println!(
                    "request {i} row {row}: differs at pick {d} ({} vs {}), top-2 margin of its scores {margin:.2e}",
                    ia[d], ib[d]
                );
            }
        }
    }
    println!(
        "continuous batching: {}/{} sequences identical ({:.1} %), max score difference {:.2e}",
        out.identical,
        out.sequences,
        100.0 * out.identical as f64 / out.sequences as f64,
        out.max_score_diff
    );
    out
}
