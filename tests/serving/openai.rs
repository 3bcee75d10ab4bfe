//! What OpenAI clients and the playground see, and one answer from the CLI, the server and
//! the library.

use super::*;

#[test]
fn openai_models_usage_streamed_usage_and_error_objects() {
    let s = server(2, 4, None, limits());
    ready(&s);
    let get = |p: &str| request(s.addr, "GET", p, b"", &[]);
    let v = json_of(&get("/v1/models"));
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "lavit");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["created"].as_u64().unwrap() > 1_600_000_000);
    let r = get("/v1/models/lavit");
    assert_eq!(r.status, 200);
    assert_eq!(json_of(&r)["id"], "lavit");
    let r = get("/v1/models/gpt-4o");
    assert_eq!(r.status, 404);
    let e = &json_of(&r)["error"];
    assert_eq!(
        (&e["type"], &e["param"], &e["code"]),
        (
            &"invalid_request_error".into(),
            &"model".into(),
            &"model_not_found".into()
        ),
        "{e}"
    );

    // Non-streamed usage: the mock LLM reads the image's prefix rows and one token per word.
    let img = png_b64(40, 30);
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, false));
    let v = json_of(&r);
    let u = &v["usage"];
    let completion = u["completion_tokens"].as_u64().unwrap();
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&completion), "{v}");
    assert!(prompt > 5, "{v}"); // image rows + "What is in the image?"
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert_eq!(v["model"], "lavit");
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(reason == "length", completion == 5, "{v}");

    // Streamed with include_usage: a role chunk, the tokens, a finish chunk, the usage chunk
    // with empty choices, [DONE]; every chunk carries `usage` (null but the last).
    let mut body = chat_body(&img, true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0, "{last}");
    assert_eq!(
        last["usage"], v["usage"],
        "streamed usage = non-streamed usage"
    );
    for c in &chunks[..chunks.len() - 1] {
        assert!(c["usage"].is_null(), "{c}");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["created"].is_u64() && c["model"] == "lavit", "{c}");
    }
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], reason);
    assert_eq!(chunks.len(), 2 + completion as usize + 1);
    // Without stream_options no usage key at all; stream_options without stream is a 400.
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, true));
    assert!(!r.body.contains("\"usage\""), "{}", r.body);
    let mut body = chat_body(&img, false);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = post(s.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 400);
    assert_eq!(json_of(&r)["error"]["param"], "stream_options");

    // Error objects: the field at fault in `param`, OpenAI's type and code.
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a", "guidance": -1}),
    );
    assert_eq!(r.status, 400);
    let e = &json_of(&r)["error"];
    assert_eq!(e["param"], "guidance", "{e}");
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "invalid_value");
    assert!(e["message"].as_str().unwrap().contains("guidance"));
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a", "model": "dall-e-3"}),
    );
    assert_eq!(r.status, 404);
    let r = post(s.addr, "/v1/chat/completions", &{
        let mut b = chat_body(&img, false);
        b["n"] = 2.into();
        b
    });
    assert_eq!(
        (r.status, &json_of(&r)["error"]["param"]),
        (400, &"n".into())
    );
    let r = get("/v1/nothing");
    assert_eq!(r.status, 404);
    assert_eq!(json_of(&r)["error"]["code"], "not_found");
    // Fault injection is off unless configured.
    let r = post(
        s.addr,
        "/admin/fault",
        &serde_json::json!({"stage": "llm", "fault": "error"}),
    );
    assert_eq!(r.status, 404);
    s.stop();
}

#[test]
fn tokenize_keep_mask_matches_the_token_counts() {
    let s = server(2, 4, None, limits());
    ready(&s);
    let imgs = [png_b64(40, 30), png_b64(28, 28), png_b64(64, 20)];
    let r = post(
        s.addr,
        "/v1/tokenize",
        &serde_json::json!({"images": imgs, "keep_mask": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json_of(&r);
    let plain = json_of(&post(
        s.addr,
        "/v1/tokenize",
        &serde_json::json!({ "images": imgs }),
    ));
    assert_eq!(
        v["tokens"], plain["tokens"],
        "the mask does not change the ids"
    );
    assert!(plain.get("keep").is_none());
    // Mock: 28 px images, patch 7 → a 4 × 4 grid.
    assert_eq!(v["grid"], serde_json::json!([4, 4]));
    assert_eq!(v["patches"], 16);
    let mut kept_all = Vec::new();
    for i in 0..3 {
        let keep = v["keep"][i].as_array().unwrap();
        assert_eq!(keep.len(), 16);
        assert_eq!(keep[0], 1, "the mock selector always keeps the first patch");
        let kept = keep.iter().filter(|k| k.as_u64() == Some(1)).count();
        assert_eq!(kept as u64, v["counts"][i].as_u64().unwrap());
        assert_eq!(kept, v["tokens"][i].as_array().unwrap().len());
        kept_all.push(kept);
    }
    assert!(
        kept_all.iter().any(|&k| k < 16),
        "some patches dropped: {kept_all:?}"
    );
    s.stop();
}

#[test]
fn api_key_from_the_config_and_its_environment_override() {
    let var = "LAVIT_TEST_SERVING_API_KEY_OVERRIDE";
    std::env::remove_var(var);
    let lim = Limits {
        warmup: false,
        api_key: Some("from-config".into()),
        api_key_env: Some(var.into()),
        ..limits()
    };
    assert_eq!(lim.effective_api_key().as_deref(), Some("from-config"));
    let s = server(1, 1, None, lim.clone());
    ready(&s);
    let auth = |k: &str| format!("Bearer {k}");
    let models = |h: &[(&str, &str)]| request(s.addr, "GET", "/v1/models", b"", h).status;
    assert_eq!(models(&[]), 401);
    assert_eq!(models(&[("Authorization", &auth("nope"))]), 401);
    assert_eq!(models(&[("Authorization", &auth("from-config"))]), 200);
    // Health, metrics and the playground page stay open; the page learns a key is needed.
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    let info = json_of(&request(s.addr, "GET", "/playground/info", b"", &[]));
    assert_eq!(info["api_key_required"], true);
    s.stop();
    std::env::set_var(var, "from-env");
    assert_eq!(lim.effective_api_key().as_deref(), Some("from-env"));
    std::env::set_var(var, "");
    assert_eq!(lim.effective_api_key().as_deref(), Some("from-config"));
    std::env::remove_var(var);
}

#[test]
fn playground_page_and_assets_are_served_from_the_binary() {
    let s = server(1, 1, None, limits());
    let r = request(s.addr, "GET", "/", b"", &[]);
    assert_eq!(r.status, 200);
    assert!(r.body.contains("LaVIT playground"), "{}", r.body);
    assert!(
        !r.body.contains("http://") && !r.body.contains("https://"),
        "no CDN"
    );
    for (p, needle) in [
        ("/static/app.js", "/v1/tokenize"),
        ("/static/style.css", ".token-card"),
    ] {
        let r = request(s.addr, "GET", p, b"", &[]);
        assert_eq!(r.status, 200, "{p}");
        assert!(r.body.contains(needle), "{p}");
    }
    let info = json_of(&request(s.addr, "GET", "/playground/info", b"", &[]));
    assert_eq!(info["model"], "lavit");
    assert_eq!(info["api_key_required"], false);
    s.stop();
    // Off when configured so.
    let s = server(
        1,
        1,
        None,
        Limits {
            playground: false,
            ..limits()
        },
    );
    assert_eq!(request(s.addr, "GET", "/", b"", &[]).status, 404);
    s.stop();
}

#[test]
fn fault_injection_hook_gives_a_500_with_an_error_object() {
    let s = server(
        1,
        1,
        None,
        Limits {
            warmup: false,
            fault_injection: true,
            ..limits()
        },
    );
    ready(&s);
    let r = post(
        s.addr,
        "/admin/fault",
        &serde_json::json!({"stage": "decoder", "fault": "error"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "x", "steps": 1}),
    );
    assert_eq!(r.status, 500);
    let e = &json_of(&r)["error"];
    assert_eq!(
        (&e["type"], &e["code"]),
        (&"server_error".into(), &"internal_error".into())
    );
    let r = post(
        s.addr,
        "/admin/fault",
        &serde_json::json!({"stage": "nowhere", "fault": "error"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        s.state.metrics.http_count("5xx"),
        1,
        "one 500 counted by the prometheus counter"
    );
    s.stop();
}

#[test]
fn generation_options_follow_the_decoder_geometry() {
    use lavit::serve::validate::{generation_options, GenerationRequest};
    // A decoder of native side 64, sides in multiples of 16, a scheduler of 50 steps.
    let info = lavit::pipeline::ModelInfo {
        image_size: 28,
        default_size: (64, 64),
        size_multiple: 16,
        max_steps: 50,
        generate_defaults: Default::default(),
        selection: Default::default(),
        selection_note: None,
        synthesis: Default::default(),
    };
    let lim = Limits::default();
    let check = |body: serde_json::Value| {
        let r: GenerationRequest = serde_json::from_value(body).unwrap();
        generation_options(&r, &lim, &info)
    };
    let o = check(serde_json::json!({"prompt": "x", "size": "128x16", "steps": 50})).unwrap();
    assert_eq!((o.width, o.height, o.steps), (128, 16, 50));
    for (body, needle) in [
        (
            serde_json::json!({"prompt": "x", "steps": 51}),
            "at most 50 steps",
        ),
        (
            serde_json::json!({"prompt": "x", "size": "40x64"}),
            "multiple of 16",
        ),
        (
            serde_json::json!({"prompt": "x", "size": "144x64"}),
            "[16, 128]",
        ),
        // 4 × 50 × (128×128 / 64²) = 800 > 200
        (
            serde_json::json!({"prompt": "x", "n": 4, "steps": 50, "size": "128x128"}),
            "server.max_request_cost = 200",
        ),
    ] {
        let e = check(body.clone()).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{body}");
        assert!(e.message.contains(needle), "{body}: {}", e.message);
    }
    // The fixture's scheduler: 1000 training timesteps.
    let g = lavit_decoder::stage::DecoderGeometry::read(
        &crate::common::fixture_dir(),
        lavit_decoder::pixel_decoder::Resolution::Lowres,
    )
    .unwrap();
    assert_eq!(g.max_steps, 1000);
}

/// Per image the `ids` of `lavit tokenize`'s JSON lines.
fn cli_tokenize(
    dir: &std::path::Path,
    images: &[std::path::PathBuf],
    extra: &[&str],
) -> Vec<Vec<i64>> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lavit"))
        .args(["tokenize", "--checkpoint"])
        .arg(dir)
        .args(extra)
        .args(images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::from_value(v["ids"].clone()).unwrap()
        })
        .collect()
}

fn tokens_of(r: &Resp) -> Vec<Vec<i64>> {
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    serde_json::from_value(v["tokens"].clone()).unwrap()
}

/// One answer per front-end: `lavit tokenize` (run as a process), `/v1/tokenize` (the server
/// on 127.0.0.1, also with the keep mask) and the library's `VisualTokenizer::tokenize` give
/// the same ids for the same images and checkpoint, in both manifest modes (the fixture's
/// `argmax`, and a copy whose manifest says `gumbel` with `selection_seed` 3). In Gumbel mode
/// tokenizing [a, b, c] equals tokenizing each alone; the request and the CLI flags override
/// the manifest the same way.
#[test]
fn cli_server_and_library_give_the_same_ids_in_both_manifest_modes() {
    use lavit::pipeline::StageSet;
    use lavit::tokenizer::{LoadParts, VisualTokenizer};
    let fixture = crate::common::fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let imgs = tmp.path().join("imgs");
    crate::common::write_images(&imgs, 3);
    let paths: Vec<std::path::PathBuf> = (0..3)
        .map(|i| imgs.join(format!("img{i:02}.png")))
        .collect();
    let b64: Vec<String> = paths
        .iter()
        .map(|p| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap()))
        .collect();
    // The fixture's tokenizer with a manifest that samples.
    let gumbel = tmp.path().join("gumbel");
    std::fs::create_dir_all(gumbel.join("visual_tokenizer")).unwrap();
    for f in ["eva_vitg_psz14.bin", "tokenizer_encoder.bin"] {
        let p = std::path::Path::new("visual_tokenizer").join(f);
        std::fs::copy(fixture.join(&p), gumbel.join(&p)).unwrap();
    }
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("manifest.json")).unwrap())
            .unwrap();
    m["tokenizer"]["selection"] = "gumbel".into();
    m["tokenizer"]["selection_seed"] = 3.into();
    m["tokenizer"]["selection_note"] = "a test".into();
    std::fs::write(gumbel.join("manifest.json"), m.to_string()).unwrap();

    let mut per_mode = Vec::new();
    for (dir, mode, seed) in [(&fixture, "argmax", 0), (&gumbel, "gumbel", 3)] {
        let cli = cli_tokenize(dir, &paths, &[]);
        assert_eq!(cli.len(), 3);
        let pipe = Pipeline::build(&PipelineConfig {
            checkpoint: Some(dir.to_path_buf()),
            stages: StageSet::Tokenizer,
            ..pcfg(2, 8)
        })
        .unwrap();
        let s = serve::spawn(Arc::new(pipe), limits()).unwrap();
        ready(&s);
        let r = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64 }),
        );
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(
            v["selection"],
            serde_json::json!({"selection": mode, "seed": seed})
        );
        let served = tokens_of(&r);
        assert_eq!(
            served, cli,
            "{mode}: the server and `lavit tokenize` differ"
        );
        let masked = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64, "keep_mask": true }),
        );
        assert_eq!(tokens_of(&masked), cli, "{mode}: with the keep mask");
        // Each image alone: the same ids (its Gumbel noise depends on the seed only).
        for (i, one) in b64.iter().enumerate() {
            let r = post(s.addr, "/v1/tokenize", &serde_json::json!({ "image": one }));
            assert_eq!(
                tokens_of(&r),
                vec![cli[i].clone()],
                "{mode}: image {i} alone"
            );
        }
        assert_eq!(
            cli_tokenize(dir, &paths[2..], &[])[0],
            cli[2],
            "{mode}: the CLI on one image"
        );
        // The library.
        let tok =
            VisualTokenizer::from_checkpoint(dir, Device::Cpu, LoadParts::tokenize_only()).unwrap();
        let lib = tok.tokenize(&tok.load_images(&paths).unwrap()).unwrap();
        assert_eq!(lib.ids, cli, "{mode}: the library");
        // Overrides: the request's fields and the CLI's flags, the same way.
        let other = if mode == "argmax" { "gumbel" } else { "argmax" };
        let r = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64, "selection": other, "seed": 5 }),
        );
        let overridden = tokens_of(&r);
        assert_eq!(
            overridden,
            cli_tokenize(dir, &paths, &["--selection", other, "--seed", "5"]),
            "{mode}: overridden to {other}"
        );
        let r = post(
            s.addr,
            "/v1/tokenize",
            &serde_json::json!({ "images": b64, "selection": "sampled" }),
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(r.body.contains("selection"), "{}", r.body);
        s.stop();
        per_mode.push((cli, overridden));
    }
    // The manifest's mode is what each front-end used: the gumbel copy's default equals the
    // fixture overridden to gumbel with seed 3 … and differs from arg-max.
    let (argmax, _) = &per_mode[0];
    let (gumbel_ids, _) = &per_mode[1];
    assert_ne!(argmax, gumbel_ids, "Gumbel sampling changed nothing");
    assert_eq!(
        &cli_tokenize(&fixture, &paths, &["--selection", "gumbel", "--seed", "3"]),
        gumbel_ids
    );
}
