//! One options builder: `lavit generate`, `lavit eval`, the server and the library build
//! their text → image options through `ModelInfo::generate_options`, over the checkpoint's
//! recommended settings, under one set of checks.

use lavit::pipeline::{GenerateBudget, GenerateParams, ModelInfo};
use lavit::serve::validate::{generation_options, parse_json, GenerationRequest};
use lavit::serve::Limits;
use lavit_runtime::manifest::GenerationManifest;
use lavit_runtime::messages::GenerateOptions;

fn info(g: &GenerationManifest) -> ModelInfo {
    ModelInfo {
        image_size: 28,
        default_size: (64, 64),
        size_multiple: 8,
        max_steps: 100,
        generate_defaults: GenerateOptions::recommended(g, false, 64),
        selection: Default::default(),
        selection_note: None,
        synthesis: Default::default(),
    }
}

#[test]
fn defaults_come_from_the_manifest_and_the_official_ones_are_one_default() {
    // The official settings are GenerationManifest's defaults, in one place.
    let official = GenerateOptions::default();
    let g = GenerationManifest::default();
    assert_eq!(official.guidance, g.decoder_guidance);
    assert_eq!(official.llm_guidance, g.llm_guidance);
    assert_eq!(official.steps, g.ddim_steps as usize);
    assert_eq!(official.top_k, g.top_k as usize);
    assert_eq!(
        lavit_decoder::pixel_decoder::DecodeOptions::default().guidance,
        g.decoder_guidance
    );
    // A checkpoint's own recommendation wins, for the decoder it draws with.
    let own = GenerationManifest {
        decoder_guidance: 1.5,
        lowres_decoder_guidance: 2.5,
        ddim_steps: 10,
        lowres_ddim_steps: 12,
        llm_guidance: 1.5,
        top_k: 0,
        ..GenerationManifest::default()
    };
    let hi = GenerateOptions::recommended(&own, false, 64);
    let lo = GenerateOptions::recommended(&own, true, 32);
    assert_eq!((hi.guidance, hi.steps, hi.width), (1.5, 10, 64));
    assert_eq!((lo.guidance, lo.steps, lo.width), (2.5, 12, 32));
    assert_eq!((hi.llm_guidance, hi.top_k), (1.5, 0));
    // Nothing asked: exactly the checkpoint's recommendation at the native size.
    let i = info(&own);
    let built = i
        .generate_options(&GenerateParams::default(), &GenerateBudget::default())
        .unwrap();
    assert_eq!(built, i.generate_defaults);
}

#[test]
fn the_server_and_the_local_front_ends_build_the_same_options() {
    let i = info(&GenerationManifest {
        decoder_guidance: 1.5,
        ddim_steps: 10,
        ..GenerationManifest::default()
    });
    let body = br#"{"prompt": "a photo of a bag", "n": 2, "size": "32x48", "seed": 7,
                   "guidance": 3.0, "steps": 20}"#;
    let r: GenerationRequest = parse_json(body).unwrap();
    let served = generation_options(&r, &Limits::default(), &i).unwrap();
    let local = i
        .generate_options(
            &GenerateParams {
                n: Some(2),
                seed: Some(7),
                size: Some((32, 48)),
                guidance: Some(3.0),
                steps: Some(20),
                ..GenerateParams::default()
            },
            &GenerateBudget::default(),
        )
        .unwrap();
    assert_eq!(served, local);
    assert_eq!(
        (local.width, local.height, local.n, local.steps),
        (32, 48, 2, 20)
    );
    assert_eq!(local.llm_guidance, i.generate_defaults.llm_guidance);
}

#[test]
fn every_front_end_refuses_the_same_way_naming_the_field() {
    let i = info(&GenerationManifest::default());
    let budget = GenerateBudget {
        max_request_cost: 12.0,
        ..GenerateBudget::default()
    };
    for (params, needle, field) in [
        (
            GenerateParams {
                size: Some((12, 64)),
                ..Default::default()
            },
            "multiple of 8",
            Some("size"),
        ),
        (
            GenerateParams {
                size: Some((136, 64)),
                ..Default::default()
            },
            "native side is 64",
            Some("size"),
        ),
        (
            GenerateParams {
                steps: Some(101),
                ..Default::default()
            },
            "at most 100 steps",
            Some("steps"),
        ),
        (
            GenerateParams {
                guidance: Some(f64::NAN),
                ..Default::default()
            },
            "out of range",
            Some("guidance"),
        ),
        (
            GenerateParams {
                n: Some(0),
                ..Default::default()
            },
            "out of range",
            Some("n"),
        ),
        // 2 × 7 × 1 = 14 > 12: the budget, which no one field breaks.
        (
            GenerateParams {
                n: Some(2),
                steps: Some(7),
                ..Default::default()
            },
            "max_request_cost = 12",
            None,
        ),
    ] {
        let e = i.generate_options(&params, &budget).unwrap_err();
        assert!(e.message.contains(needle), "{params:?}: {}", e.message);
        assert_eq!(e.param, field, "{params:?}");
    }
    // The server's answer for the over-budget request is the same message, as a 400.
    let r: GenerationRequest = parse_json(br#"{"prompt": "x", "n": 2, "steps": 7}"#).unwrap();
    let lim = Limits {
        max_request_cost: 12.0,
        ..Limits::default()
    };
    let e = generation_options(&r, &lim, &i).unwrap_err();
    assert_eq!(e.status.as_u16(), 400);
    assert!(e.message.contains("max_request_cost = 12"), "{}", e.message);
}
