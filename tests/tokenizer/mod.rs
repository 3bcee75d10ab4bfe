//! Integration tests: the dynamic visual tokenizer (issue 3).

use crate::common::{fixture_dir, fixtures_root};
use lavit::tokenizer::{LoadParts, UnderstandingHead, VisualTokenizer};
use lavit_decoder::feature_decoder::{FeatureDecoderConfig, HighresVQDecoder, VQDecoder};
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_encoder::LaVITImageProcessor;
use lavit_quantizer::VectorQuantizer;
use lavit_runtime::checkpoint;
use lavit_runtime::manifest::LavitManifest;
use lavit_selector::SelectionMode;
use std::collections::BTreeMap;
use tch::{nn, Device, Kind, Tensor};

mod parity;
mod training;

fn fixture_tokenizer(parts: LoadParts) -> VisualTokenizer {
    VisualTokenizer::from_checkpoint(&fixture_dir(), Device::Cpu, parts).expect("load fixture")
}

fn reference_images() -> Tensor {
    let sd = checkpoint::load_file(&fixture_dir().join("reference/expected.safetensors")).unwrap();
    sd["images"].shallow_clone()
}

/// The shared fixture with its selector edited so that 143 of its 192 patches score an exact
/// keep/drop tie (`scripts/dev/tie_variant.py`, which also recomputed the tokenizer's
/// reference tensors on it with torch): `tests/data/tie-variant.safetensors` holds the edited
/// `token_predictor.*` tensors (as `variant.<key>`) and those rows. Written into `dir` as a
/// checkpoint folder (the fixture's other tokenizer files, `tokenizer_encoder` as
/// safetensors with the edit) → the expected tensors (the fixture's `images` and
/// `encoder_features`, the variant's rows).
fn tie_variant(dir: &std::path::Path) -> checkpoint::StateDict {
    let fixture = fixture_dir();
    let variant = checkpoint::load_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/tie-variant.safetensors"),
    )
    .unwrap();
    for f in [
        "manifest.json",
        "visual_tokenizer/eva_vitg_psz14.bin",
        "visual_tokenizer/tokenizer_decoder.bin",
        "visual_tokenizer/highres_tokenizer_decoder.bin",
        "language_model/visual_weight.bin",
    ] {
        let to = dir.join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture.join(f), to).unwrap();
    }
    let mut enc =
        checkpoint::load_path(&fixture.join("visual_tokenizer/tokenizer_encoder.bin")).unwrap();
    let mut expected = checkpoint::load_file(&fixture.join("reference/expected.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k == "images" || k == "encoder_features")
        .collect::<checkpoint::StateDict>();
    for (k, v) in variant {
        match k.strip_prefix("variant.") {
            Some(key) => {
                let old = enc.insert(key.to_string(), v).unwrap();
                assert_eq!(old.size(), enc[key].size(), "{key}");
            }
            None => {
                expected.insert(k, v);
            }
        }
    }
    checkpoint::save_safetensors(
        &dir.join("visual_tokenizer/tokenizer_encoder.safetensors"),
        &enc,
        None,
    )
    .unwrap();
    expected
}

type Shapes = BTreeMap<String, Vec<i64>>;

fn var_shapes(vs: &nn::VarStore, prefix: &str) -> Shapes {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.size()))
        .collect()
}

/// Names/shapes of the official file must equal ours for every non-block name and block 0,
/// and the official blocks must be exactly 0..depth-1, each with block 0's shapes.
fn check_against_official(file: &str, ours: &Shapes, block_prefix: &str, depth: i64) {
    let text = std::fs::read_to_string(fixtures_root().join("official-shapes.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let files = v["files"].as_object().unwrap();
    let (_, entry) = files
        .iter()
        .find(|(k, _)| k.starts_with(file))
        .unwrap_or_else(|| panic!("{file} not in official-shapes.json"));
    let official: Shapes = serde_json::from_value(entry.clone()).unwrap();
    let bp = format!("{block_prefix}blocks.");
    let mut seen_blocks = std::collections::BTreeSet::new();
    let mut official_rest = Shapes::new();
    for (k, shape) in &official {
        if let Some(rest) = k.strip_prefix(&bp) {
            let (idx, tail) = rest.split_once('.').unwrap();
            let idx: i64 = idx.parse().unwrap();
            seen_blocks.insert(idx);
            let ours_key = format!("{bp}0.{tail}");
            assert_eq!(
                ours.get(&ours_key),
                Some(shape),
                "{file}: {k} has shape {shape:?}, our block 0 {ours_key} differs"
            );
        } else {
            official_rest.insert(k.clone(), shape.clone());
        }
    }
    assert_eq!(
        seen_blocks.into_iter().collect::<Vec<_>>(),
        (0..depth).collect::<Vec<_>>(),
        "{file}: block indices"
    );
    let ours_rest: Shapes = ours
        .iter()
        .filter(|(k, _)| !k.starts_with(&bp))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        ours_rest, official_rest,
        "{file}: non-block names and shapes"
    );
    let ours_block0 = ours
        .keys()
        .filter(|k| k.starts_with(&format!("{bp}0.")))
        .count();
    let official_block0 = official
        .keys()
        .filter(|k| k.starts_with(&format!("{bp}0.")))
        .count();
    assert_eq!(ours_block0, official_block0, "{file}: names in block 0");
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

// ---- stage-1 training -------------------------------------------------------------

const PHOTOS: &str = "/usr/share/tuxpaint/stamps";

/// The fixture's sizes with `decoder_out_dim` = encoder width (needed to reconstruct the
/// encoder features), written as a manifest.json in `dir`.
pub(crate) fn tiny_training_manifest(dir: &std::path::Path) -> std::path::PathBuf {
    let mut m = LavitManifest::for_checkpoint(&fixture_dir()).unwrap();
    m.feature_decoder.decoder_out_dim = m.tokenizer.encoder_width;
    let p = dir.join("manifest.json");
    std::fs::write(&p, serde_json::to_vec(&m).unwrap()).unwrap();
    p
}

fn photos_available() -> bool {
    let ok = std::path::Path::new(PHOTOS).is_dir();
    if !ok {
        eprintln!("skipped: {PHOTOS} is missing (scripts/setup.sh --data installs it)");
    }
    ok
}

pub(crate) fn tiny_config(
    tmp: &std::path::Path,
    run: &str,
) -> lavit::train::tokenizer::TokenizerTrainConfig {
    lavit::train::tokenizer::TokenizerTrainConfig {
        data_dir: PHOTOS.into(),
        max_images: 32,
        manifest: Some(tiny_training_manifest(tmp)),
        out_dir: tmp.join(run),
        seed: 3,
        batch_size: 8,
        steps: 60,
        steps_no_quant: 30,
        lr: 2e-3,
        warmup_steps: 5,
        save_every: 30,
        ..Default::default()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Largest |a − b| over the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_kind(Kind::Float) - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[])
}
