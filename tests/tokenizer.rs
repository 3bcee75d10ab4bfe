//! Integration tests: the dynamic visual tokenizer (issue 3).

use std::collections::BTreeMap;

use lavit::tokenizer::{LoadParts, UnderstandingHead, VisualTokenizer};
use lavit_decoder::feature_decoder::{FeatureDecoderConfig, HighresVQDecoder, VQDecoder};
use lavit_encoder::eva_vit::{EvaBackbone, EvaVitConfig};
use lavit_encoder::LaVITImageProcessor;
use lavit_quantizer::VectorQuantizer;
use lavit_runtime::checkpoint;
use lavit_runtime::manifest::LavitManifest;
use lavit_selector::SelectionMode;
use tch::{nn, Device, Kind, Tensor};

use crate::common::{fixture_dir, fixtures_root};

fn fixture_tokenizer(parts: LoadParts) -> VisualTokenizer {
    VisualTokenizer::from_checkpoint(&fixture_dir(), Device::Cpu, parts).expect("load fixture")
}

fn reference_images() -> Tensor {
    let sd = checkpoint::load_file(&fixture_dir().join("reference/expected.safetensors")).unwrap();
    sd["images"].shallow_clone()
}

#[test]
fn parity_rows_pass_on_fixture() {
    let dir = fixture_dir();
    let expected = checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let rows = lavit::parity::tokenizer::rows(&dir, &expected).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, lavit::parity::tokenizer::ROWS);
    for r in &rows {
        assert!(
            r.pass,
            "{}: max abs err {} ({})",
            r.name, r.max_abs_err, r.note
        );
    }
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

/// An exact keep/drop tie keeps the patch, as torch.argmax over [keep, drop] decides (the
/// first index): every tokenizer parity row matches torch's values on the tie variant (with
/// "keep where log p(keep) > log p(drop)" the ten rows from `keep_decisions` on failed).
#[test]
fn parity_rows_pass_on_a_fixture_with_exact_ties() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = tie_variant(tmp.path());
    let lp = &expected["predictor_log_probs"];
    let ties = lp.select(-1, 0).eq_tensor(&lp.select(-1, 1)); // (B, N)
    let n_ties = ties.sum(Kind::Int64).int64_value(&[]);
    assert!(n_ties > 0 && n_ties < ties.numel() as i64, "{n_ties} ties");
    let keep = expected["keep_decisions"].gt(0.5);
    assert_eq!(
        keep.masked_select(&ties).all().int64_value(&[]),
        1,
        "torch kept every tied patch"
    );
    // ours: the same exact ties, and every row as torch computed it
    let tok = VisualTokenizer::from_checkpoint(tmp.path(), Device::Cpu, LoadParts::tokenize_only())
        .unwrap();
    let (ours, _) = tok
        .select(
            &tok.encoder_features(&expected["images"]).unwrap(),
            SelectionMode::Argmax,
        )
        .unwrap();
    let ours_ties = ours.select(-1, 0).eq_tensor(&ours.select(-1, 1));
    assert!(
        ours_ties.equal(&ties),
        "the edited selector ties the same patches"
    );
    let rows = lavit::parity::tokenizer::rows(tmp.path(), &expected).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, lavit::parity::tokenizer::ROWS);
    for r in &rows {
        assert!(
            r.pass,
            "{}: max abs err {} ({})",
            r.name, r.max_abs_err, r.note
        );
    }
}

/// A selector whose last layer gives keep and drop the same weights ties every patch: arg-max
/// selection keeps them all (torch.argmax's first index).
#[test]
fn a_selector_that_ties_everywhere_keeps_every_patch() {
    let mut tok = fixture_tokenizer(LoadParts::tokenize_only());
    let images = reference_images();
    let last = tok.selector.token_predictor.out_conv.last().unwrap();
    tch::no_grad(|| {
        last.ws.get(0).copy_(&last.ws.get(1));
        if let Some(b) = &last.bs {
            b.get(0).copy_(&b.get(1));
        }
    });
    tok.selection = SelectionMode::Argmax;
    let out = tok.tokenize(&images).unwrap();
    let n = tok.manifest.tokenizer.num_patches();
    assert_eq!(out.counts, vec![n; 3]);
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

#[test]
fn official_preset_builds_the_official_names_and_shapes() {
    let official = LavitManifest::official();
    let mut m = official.clone();
    // Full width, one block each (the full model does not fit a CI machine's memory).
    m.tokenizer.encoder_depth = 1;
    m.tokenizer.merger_depth = 1;
    m.feature_decoder.depth = 1;
    let dev = Device::Cpu;
    let t = &m.tokenizer;

    let eva = EvaBackbone::new(&EvaVitConfig::from_manifest(t), dev);
    check_against_official(
        "visual_tokenizer/eva_vitg_psz14.bin",
        &var_shapes(&eva.vs, ""),
        "",
        official.tokenizer.encoder_depth,
    );

    let cb = VectorQuantizer::new(t.n_code, t.code_dim, dev);
    let tok = VisualTokenizer::with_parts(&m, dev, Box::new(eva), Box::new(cb)).unwrap();
    let mut enc = var_shapes(&tok.selector.vs, "");
    enc.extend(var_shapes(&tok.quantizer.vs, ""));
    enc.insert(
        "quantize.embedding.weight".into(),
        vec![t.n_code, t.code_dim],
    );
    check_against_official(
        "visual_tokenizer/tokenizer_encoder.bin",
        &enc,
        "causal_encoder.",
        official.tokenizer.merger_depth,
    );

    let und = UnderstandingHead::new(&m, dev);
    check_against_official(
        "language_model/visual_weight.bin",
        &var_shapes(&und.vs, ""),
        "causal_encoder.",
        official.tokenizer.merger_depth,
    );

    let dcfg = FeatureDecoderConfig::from_manifest(&m.feature_decoder);
    let vs = nn::VarStore::new(dev);
    let _d = VQDecoder::new(vs.root(), &dcfg);
    check_against_official(
        "visual_tokenizer/tokenizer_decoder.bin",
        &var_shapes(&vs, ""),
        "",
        official.feature_decoder.depth,
    );
    let vs = nn::VarStore::new(dev);
    let _d = HighresVQDecoder::new(vs.root(), &dcfg);
    check_against_official(
        "visual_tokenizer/highres_tokenizer_decoder.bin",
        &var_shapes(&vs, ""),
        "",
        official.feature_decoder.depth,
    );
}

#[test]
fn shapes_and_offsets_of_tokenize() {
    let tok = fixture_tokenizer(LoadParts::all());
    let images = reference_images();
    let out = tok.tokenize(&images).unwrap();
    let m = &tok.manifest;
    assert_eq!(out.counts.len(), 3);
    for (n, ids) in out.counts.iter().zip(&out.ids) {
        assert_eq!(*n as usize, ids.len());
        assert!(*n <= m.tokenizer.num_patches());
        let off = m.llm.visual_token_offset;
        assert!(ids
            .iter()
            .all(|&i| i >= off && i < off + m.tokenizer.n_code));
    }
    let lowres = tok.decode_lowres(&out.ids).unwrap();
    assert_eq!(
        lowres.size(),
        [
            3,
            m.feature_decoder.num_patches,
            m.feature_decoder.lowres_unet_proj
        ]
    );
    // A text id is refused, not looked up.
    assert!(tok.decode_lowres(&[vec![5]]).is_err());
}

#[test]
fn decoder_batching_with_different_counts_equals_one_by_one() {
    let tok = fixture_tokenizer(LoadParts::all());
    let out = tok.tokenize(&reference_images()).unwrap();
    let mut ids = out.ids.clone();
    let half = ids[1].len() / 2;
    ids[1].truncate(half); // make the counts differ for sure
    let (p_all, pooled_all) = tok.decode_highres(&ids).unwrap();
    let low_all = tok.decode_lowres(&ids).unwrap();
    for (i, one) in ids.iter().enumerate() {
        let (p, pooled) = tok.decode_highres(std::slice::from_ref(one)).unwrap();
        let low = tok.decode_lowres(std::slice::from_ref(one)).unwrap();
        let i = i as i64;
        assert!(p_all.get(i).allclose(&p.get(0), 1e-4, 1e-5, false));
        assert!(pooled_all
            .get(i)
            .allclose(&pooled.get(0), 1e-4, 1e-5, false));
        assert!(low_all.get(i).allclose(&low.get(0), 1e-4, 1e-5, false));
    }
}

#[test]
fn kept_ratio_responds_to_the_selector() {
    let tok = fixture_tokenizer(LoadParts::tokenize_only());
    let images = reference_images();
    let base: i64 = tok.tokenize(&images).unwrap().counts.iter().sum();
    let bias = tok.selector.token_predictor.out_conv[2]
        .bs
        .as_ref()
        .unwrap()
        .shallow_clone();
    let orig = bias.copy();
    let n = 3 * tok.manifest.tokenizer.num_patches();
    tch::no_grad(|| {
        bias.shallow_clone()
            .copy_(&Tensor::from_slice(&[30.0f32, -30.0]))
    });
    let all: i64 = tok.tokenize(&images).unwrap().counts.iter().sum();
    tch::no_grad(|| {
        bias.shallow_clone()
            .copy_(&Tensor::from_slice(&[-30.0f32, 30.0]))
    });
    let none: i64 = tok.tokenize(&images).unwrap().counts.iter().sum();
    tch::no_grad(|| bias.shallow_clone().copy_(&orig));
    assert_eq!(all, n);
    // every image keeps at least its best patch, whatever the selector scores
    assert_eq!(none, 3 * lavit_selector::MIN_KEPT);
    assert!(base > 0 && base < n, "fixture keeps {base} of {n}");
}

#[test]
fn argmax_is_deterministic_and_gumbel_is_seeded() {
    let tok = fixture_tokenizer(LoadParts::tokenize_only());
    let images = reference_images();
    let a = tok.tokenize_with(&images, SelectionMode::Argmax).unwrap();
    let b = tok.tokenize_with(&images, SelectionMode::Argmax).unwrap();
    assert_eq!(a, b);
    let g = |seed| {
        tok.tokenize_with(&images, SelectionMode::Gumbel { seed, tau: 1.0 })
            .unwrap()
    };
    assert_eq!(g(7), g(7));
    let distinct: std::collections::BTreeSet<Vec<i64>> = (0..4).map(|s| g(s).counts).collect();
    assert!(distinct.len() > 1, "Gumbel sampling ignores its seed");
}

#[test]
fn gradients_reach_the_selector_through_straight_through_decisions() {
    let m = LavitManifest::for_checkpoint(&fixture_dir()).unwrap();
    let tok = VisualTokenizer::new_random(&m, Device::Cpu).unwrap();
    let images = reference_images();
    let feats = tok.encoder_features(&images).unwrap().detach();
    let (lp, dec) = tok
        .select(&feats, SelectionMode::Gumbel { seed: 1, tau: 1.0 })
        .unwrap();
    assert!(dec.requires_grad());
    let vals: Vec<f32> = Vec::try_from(dec.detach().flatten(0, -1)).unwrap();
    assert!(vals
        .iter()
        .all(|v| (*v - 0.0).abs() < 1e-6 || (*v - 1.0).abs() < 1e-6));
    let merged = tok.selector.causal_encoder.forward(&feats, &dec).unwrap();
    let loss = merged.square().mean(Kind::Float) + (dec.mean(Kind::Float) - 0.3).square();
    let _ = lp;
    loss.backward();
    for lin in &tok.selector.token_predictor.out_conv {
        let g = lin.ws.grad();
        assert!(g.defined());
        assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}

#[test]
fn a_tensor_of_the_wrong_rank_is_an_error_naming_the_contract_not_a_panic() {
    let m = LavitManifest::for_checkpoint(&fixture_dir()).unwrap();
    let tok = VisualTokenizer::new_random(&m, Device::Cpu).unwrap();
    let feats = tok.encoder_features(&reference_images()).unwrap();
    let flat = feats.flatten(0, 1); // (B·N, C): rank 2 where (B, N, C) is expected
    let e = tok
        .select(&flat, SelectionMode::Argmax)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 3"), "{e}");
    let (_, dec) = tok.select(&feats, SelectionMode::Argmax).unwrap();
    let e = tok
        .selector
        .causal_encoder
        .forward(&flat, &dec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, N, C]") && e.contains("rank 3"), "{e}");
    // Decisions of the wrong rank reach the causal attention's policy check.
    let e = tok
        .selector
        .causal_encoder
        .forward(&feats, &dec.unsqueeze(-1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("policy [B, N]"), "{e}");
}

#[test]
fn image_input_refuses_bombs_and_garbage() {
    let p = LaVITImageProcessor::new(112);
    // A PNG header that claims 100000 x 100000 pixels (no data): refused from the header.
    let mut png = vec![0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(b"IHDR");
    png.extend_from_slice(&ihdr);
    let crc = crc32(&[b"IHDR".as_slice(), &ihdr].concat());
    png.extend_from_slice(&crc.to_be_bytes());
    // One tiny IDAT chunk, so the header parse reaches the image data.
    let idat = [0x78u8, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01];
    png.extend_from_slice(&(idat.len() as u32).to_be_bytes());
    png.extend_from_slice(b"IDAT");
    png.extend_from_slice(&idat);
    png.extend_from_slice(&crc32(&[b"IDAT".as_slice(), &idat].concat()).to_be_bytes());
    let e = p.load_bytes(&png).unwrap_err().to_string();
    assert!(e.contains("over the limit"), "{e}");
    assert!(p.load_bytes(b"not an image").is_err());
    assert!(p.load_bytes(&png[..12]).is_err());
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

#[test]
fn preprocessing_resizes_like_pil_on_simple_cases() {
    // The fixture's source photos (scikit-image's astronaut/coffee/chelsea) are not on this
    // machine, so the reference `images` cannot be recomputed from files; these cases pin
    // the properties of Pillow's bicubic resampler instead.
    let p = LaVITImageProcessor::new(4);
    // A constant image stays constant under any resize (normalised weights).
    let img = image::RgbImage::from_pixel(13, 9, image::Rgb([200, 100, 50]));
    let t = p.preprocess(&img);
    assert_eq!(t.size(), [3, 4, 4]);
    let want = [(200.0 / 255.0 - 0.48145466) / 0.26862954];
    let got = t.get(0).flatten(0, -1);
    assert!(got.allclose(
        &Tensor::from_slice(&want)
            .to_kind(Kind::Float)
            .expand([16], false),
        1e-5,
        1e-6,
        false
    ));
    // Same size: identity.
    let mut px = Vec::new();
    for i in 0..4 * 4 * 3 {
        px.push((i * 5) as u8);
    }
    let same = lavit_encoder::image_processor::pil_resize_bicubic(&px, 4, 4, 4, 4);
    assert_eq!(same, px);
    // Upscaling 1-D ramp keeps it monotone.
    let ramp: Vec<u8> = (0..8u8).flat_map(|i| [i * 30; 3]).collect();
    let up = lavit_encoder::image_processor::pil_resize_bicubic(&ramp, 8, 1, 16, 1);
    let r: Vec<u8> = up.chunks(3).map(|c| c[0]).collect();
    assert!(r.windows(2).all(|w| w[0] <= w[1]), "{r:?}");
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

#[test]
fn stage1_training_on_real_photos_lowers_the_loss_and_uses_the_codebook() {
    if !photos_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tiny_config(tmp.path(), "run");
    let r = lavit::train::tokenizer::train(&cfg).unwrap();
    assert_eq!(r.steps, 60);
    let rec = r.series("rec_loss");
    let first = mean(&rec[..5]);
    let last = mean(&rec[rec.len() - 5..]);
    eprintln!("stage-1: rec loss {first:.4} -> {last:.4}, loss {:?} -> {:?}, kept {:?}, usage {:?}, ppl {:?}",
        r.series("loss").first(), r.series("loss").last(), r.series("kept").last(),
        r.series("usage").last(), r.series("perplexity").last());
    assert!(
        last < 0.8 * first,
        "reconstruction loss did not fall: {first} -> {last}"
    );
    let usage = r.series("usage");
    let ppl = r.series("perplexity");
    assert!(*usage.last().unwrap() >= 0.03, "codebook usage {usage:?}");
    assert!(*ppl.last().unwrap() >= 4.0, "codebook perplexity {ppl:?}");
    // The exported folder loads with the normal loader and tokenizes.
    let dir = r.export_dir.as_ref().unwrap();
    let parts = LoadParts {
        lowres_decoder: true,
        ..LoadParts::tokenize_only()
    };
    let tok = VisualTokenizer::from_checkpoint(dir, Device::Cpu, parts).unwrap();
    let imgs = tok
        .load_images(&[std::path::PathBuf::from(PHOTOS)
            .join("animals")
            .read_dir()
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir())
            .and_then(|d| {
                d.read_dir()
                    .unwrap()
                    .flatten()
                    .map(|e| e.path())
                    .find(|p| p.extension().is_some_and(|e| e == "png"))
            })
            .unwrap()])
        .unwrap();
    let out = tok.tokenize(&imgs).unwrap();
    assert_eq!(out.counts[0] as usize, out.ids[0].len());
    assert_eq!(tok.decode_lowres(&out.ids).unwrap().size()[0], 1);
    let sampled = tok
        .tokenize_with(&imgs, SelectionMode::Gumbel { seed: 0, tau: 1.0 })
        .unwrap();
    assert!(sampled.counts[0] > 0);
    eprintln!(
        "exported tokenizer: {} tokens (arg-max), {} (Gumbel)",
        out.counts[0], sampled.counts[0]
    );
}

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

/// Largest |a − b| over the largest |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_kind(Kind::Float) - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[])
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
