//! The HTTP request validators: a body read as each route's request and checked as the server
//! checks it before admission (generation options with the size rule and the cost budget, the
//! chat plan, the tokenize list), then every image it carries through the image front.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lavit::serve::validate::*;

fuzz_target!(|data: &[u8]| {
    let lim = lavit::serve::Limits {
        max_image_side: 256,
        max_image_pixels: 128 * 128,
        max_image_bytes: 64 << 10,
        ..Default::default()
    };
    let info = lavit::pipeline::ModelInfo {
        image_size: 28,
        default_size: (64, 64),
        size_multiple: 8,
        max_steps: usize::MAX,
        generate_defaults: Default::default(),
        selection: Default::default(),
        selection_note: None,
    };
    if let Ok(r) = parse_json::<GenerationRequest>(data) {
        if let Ok(o) = generation_options(&r, &lim, &info) {
            assert!(generation_cost(&o, 64) <= lim.max_request_cost);
        }
    }
    if let Ok(r) = parse_json::<ChatRequest>(data) {
        if let Ok(plan) = chat_plan(r, &lim) {
            let _ = decode_image("image", &plan.image, &lim);
        }
    }
    if let Ok(r) = parse_json::<TokenizeRequest>(data) {
        let _ = tokenize_selection(&r, info.selection);
        if let Ok(list) = tokenize_images(r, &lim) {
            for b in &list {
                let _ = decode_image("images", b, &lim);
            }
        }
    }
});
