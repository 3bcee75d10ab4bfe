//! Parity rows of the llm stages (owned by the llm work): SentencePiece ids, LLaMA logits on
//! the reference inputs, greedy image-token generation with CFG (eq. 7) and greedy captioning.

use std::path::Path;

use anyhow::{Context, Result};
use lavit_llm::generate::{
    generate_image_tokens, generate_text, ImageTokenConfig, Sampling, TextConfig,
};
use lavit_llm::sentencepiece::SentencePiece;
use lavit_llm::vocab::UnifiedVocab;
use lavit_llm::{ForwardArgs, LlamaForCausalLM};
use lavit_runtime::checkpoint::StateDict;
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::parity::{compare, ParityRow};
use tch::{Device, Kind, Tensor};

/// `{:g}` of Python for the guidance scales (2.0 → "2", 1.5 → "1.5").
pub fn py_g(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn ids_tensor(v: &[i64]) -> Tensor {
    Tensor::from_slice(v)
}

fn get<'a>(expected: &'a StateDict, name: &str) -> Result<&'a Tensor> {
    expected
        .get(name)
        .with_context(|| format!("reference tensor `{name}` missing"))
}

fn missing_row(name: &str, why: String) -> ParityRow {
    ParityRow {
        name: name.into(),
        max_abs_err: f64::INFINITY,
        pass: false,
        note: why,
    }
}

/// Recompute this group's reference tensors from the checkpoint folder `dir`.
pub fn rows(dir: &Path, expected: &StateDict) -> Result<Vec<ParityRow>> {
    let _g = tch::no_grad_guard();
    let manifest = LavitManifest::for_checkpoint(dir)?;
    let vocab = UnifiedVocab::from(&manifest.llm);
    let gen = &manifest.generation;
    let lm_dir = dir.join("language_model");
    let mut rows = Vec::new();

    let sp = SentencePiece::from_file(&lm_dir.join("tokenizer.model"))?;
    let prompt = sp.encode(&gen.t2i_prompt);
    for (name, text) in [
        ("prompt_ids", &gen.t2i_prompt),
        ("prompt_text_ids_check", &gen.text_ids_check),
    ] {
        if let Some(r) = expected.get(name) {
            rows.push(compare(name, &ids_tensor(&sp.encode(text)), r));
        }
    }

    let (_vs, model) = LlamaForCausalLM::from_pretrained(&lm_dir, Device::Cpu, Kind::Float)?;

    if let (Some(seq), Some(r)) = (expected.get("mixed_sequence"), expected.get("mixed_logits")) {
        let logits = model.forward_ids(&seq.unsqueeze(0), &ForwardArgs::default(), None)?;
        rows.push(compare("mixed_logits", &logits.squeeze_dim(0), r));
    }
    if let (Some(e), Some(r)) = (
        expected.get("understanding_inputs_embeds"),
        expected.get("understanding_logits"),
    ) {
        let logits = model.forward_embeds(&e.unsqueeze(0), &ForwardArgs::default(), None)?;
        rows.push(compare("understanding_logits", &logits.squeeze_dim(0), r));
    }

    for &a in &gen.cfg_scales {
        let name = format!("t2i_greedy_cfg_{}", py_g(a));
        let Some(r) = expected.get(&name) else {
            rows.push(missing_row(&name, "no reference tensor".into()));
            continue;
        };
        let cfg = ImageTokenConfig {
            cfg_scale: a,
            max_new_tokens: gen.t2i_max_new_tokens,
            min_new_tokens: gen.t2i_min_new_tokens,
            sampling: Sampling::greedy(),
            num_return_sequences: 1,
            seed: None,
        };
        let out = generate_image_tokens(&model, &vocab, std::slice::from_ref(&prompt), &cfg)?;
        rows.push(compare(&name, &ids_tensor(&out[0]), r));
    }

    if let Some(r) = expected.get("caption_greedy_ids") {
        rows.push(caption_row(&model, &vocab, &manifest, expected, r)?);
    }
    Ok(rows)
}

/// Greedy caption of image 0 from [IMG] + its `understanding_embeddings` rows + [/IMG]; the
/// prefix itself must equal the start of `understanding_inputs_embeds`.
fn caption_row(
    model: &LlamaForCausalLM,
    vocab: &UnifiedVocab,
    manifest: &LavitManifest,
    expected: &StateDict,
    reference: &Tensor,
) -> Result<ParityRow> {
    let counts = get(expected, "understanding_counts")?;
    let emb = get(expected, "understanding_embeddings")?;
    let n0 = counts.int64_value(&[0]);
    let img = emb.narrow(0, 0, n0);
    let built = lavit_llm::vocab::build_sequence(
        model,
        vocab,
        &[lavit_llm::vocab::Segment::ImageEmbeds(img)],
    )?;
    let prefix = built.embeds;
    if let Some(full) = expected.get("understanding_inputs_embeds") {
        let check = compare("caption_prefix", &prefix, &full.narrow(0, 0, n0 + 2));
        if !check.pass {
            return Ok(missing_row(
                "caption_greedy_ids",
                format!(
                    "the [IMG] embeds [/IMG] prefix differs from understanding_inputs_embeds (max err {:.3e})",
                    check.max_abs_err
                ),
            ));
        }
    }
    let cfg = TextConfig {
        max_new_tokens: manifest.generation.caption_max_new_tokens,
        ..Default::default()
    };
    let mut ids = generate_text(model, vocab, &[prefix], &cfg)?.remove(0);
    if (ids.len() as i64) < cfg.max_new_tokens {
        ids.push(vocab.eos_id); // generation stopped on EOS, which the reference keeps
    }
    Ok(compare("caption_greedy_ids", &ids_tensor(&ids), reference))
}
