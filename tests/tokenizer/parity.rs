//! The visual tokenizer against the official code: parity, ties, shapes, selection, image input.

use super::*;

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
