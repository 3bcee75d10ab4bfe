//! `lavit serve` over HTTP on mock stages: endpoints, admission, disconnects, faults, drain,
//! validation, the cost budget, internal failures and the API key.

use super::*;

#[test]
fn http_endpoints_work_and_streaming_matches() {
    let s = server(2, 4, None, limits());
    assert_eq!(
        request(s.addr, "GET", "/ready", b"", &[]).status,
        503,
        "ready before warm-up"
    );
    ready(&s);
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    assert_eq!(request(s.addr, "GET", "/ready", b"", &[]).status, 200);
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "a red cat", "n": 2, "steps": 3, "seed": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let png = base64::engine::general_purpose::STANDARD
        .decode(data[0]["b64_json"].as_str().unwrap())
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));

    let img = png_b64(40, 30);
    let r = post(
        s.addr,
        "/v1/tokenize",
        &serde_json::json!({"images": [img.clone(), png_b64(28, 28)]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);

    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, true));
    assert_eq!(r.status, 200);
    let events: Vec<&str> = r
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", r.body);
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed.trim(), full);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_stage_latency_seconds_bucket{stage=\"llm\",le=\"+Inf\"}"),
        "{m}"
    );
    assert!(m.contains("lavit_http_responses_total{class=\"2xx\"}"));
    assert!(m.contains("lavit_queue_depth 0"));
    // Continuous batching: per-stage batch size, queue wait and step time, KV blocks.
    for family in [
        "lavit_stage_batch_size_bucket{stage=\"encoder\",le=\"1\"}",
        "lavit_stage_queue_wait_seconds_bucket{stage=\"llm\",le=\"+Inf\"}",
        "lavit_stage_step_seconds_sum{stage=\"decoder\"}",
        "lavit_kv_blocks_in_use 0",
        "lavit_kv_blocks_total",
    ] {
        assert!(m.contains(family), "{family}: {m}");
    }
    s.stop();
}

#[test]
fn admission_refuses_exactly_the_overflow_with_429() {
    let (n, q, extra) = (2, 3, 4);
    let gate = Gate::closed();
    let lim = Limits {
        warmup: false,
        ..limits()
    };
    let s = server(n, q, Some(gate.clone()), lim);
    ready(&s);
    let addr = s.addr;
    let threads: Vec<_> = (0..n + q + extra)
        .map(|i| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/images/generations",
                    &serde_json::json!({"prompt": format!("p{i}"), "steps": 2}),
                )
                .status
            })
        })
        .collect();
    let adm = s.state.pipe.graph().admission().clone();
    assert!(wait_until(20, || adm.rejected() == extra as u64
        && adm.admitted() == n + q));
    // While held: the queue and in-flight gauges say so.
    let m = request(addr, "GET", "/metrics", b"", &[]).body;
    assert!(m.contains(&format!("lavit_queue_depth {q}")), "{m}");
    assert!(m.contains(&format!("lavit_in_flight {n}")), "{m}");
    gate.open();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == 429).count(),
        extra,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|&&c| c == 200).count(),
        n + q,
        "{codes:?}"
    );
    let m = request(addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains(&format!(
            "lavit_http_responses_total{{class=\"429\"}} {extra}"
        )),
        "{m}"
    );
    assert!(m.contains(&format!("lavit_rejected_total {extra}")));
    s.stop();
}

#[test]
fn client_disconnect_cancels_and_frees_the_slot() {
    let s = server(
        1,
        0,
        None,
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    let g = s.state.pipe.graph();
    let body = serde_json::json!({"prompt": "long", "steps": 50_000_000}).to_string();
    let mut sock = TcpStream::connect(s.addr).unwrap();
    write!(
        sock,
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    assert!(wait_until(20, || g
        .in_flight()
        .iter()
        .any(
            |e| e.progress.load(std::sync::atomic::Ordering::SeqCst) > 10
        )));
    let entry = g.in_flight().pop().unwrap();
    drop(sock); // the client goes away
    assert!(
        wait_until(10, || g.admission().admitted() == 0),
        "slot not freed after disconnect"
    );
    assert!(entry.cancel.is_cancelled());
    let done = entry.progress.load(std::sync::atomic::Ordering::SeqCst);
    assert!(done < 50_000_000);
    assert_eq!(
        g.shared().metrics[StageKind::Decoder.index()]
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // The freed slot serves the next request.
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "short", "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    s.stop();
}

#[test]
fn forced_stage_error_and_panic_give_500_then_recovery_or_unhealthy() {
    let s = server(
        2,
        2,
        None,
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    let g = s.state.pipe.graph();
    let gen = || {
        post(
            s.addr,
            "/v1/images/generations",
            &serde_json::json!({"prompt": "x", "steps": 2}),
        )
    };
    g.inject_fault(StageKind::Decoder, Fault::Error);
    let r = gen();
    assert_eq!(r.status, 500);
    assert!(r.body.contains("injected error"), "{}", r.body);
    g.inject_fault(StageKind::Llm, Fault::Panic);
    let r = gen();
    assert_eq!(r.status, 500);
    assert!(r.body.contains("panicked"), "{}", r.body);
    // Recovery: the stage keeps serving, and stays ready.
    assert_eq!(gen().status, 200);
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    assert_eq!(request(s.addr, "GET", "/ready", b"", &[]).status, 200);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(m.contains("lavit_healthy 1"), "{m}");
    assert!(m.contains("lavit_stage_up{stage=\"llm\"} 1"), "{m}");
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"panic\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"stage\"} 1"),
        "{m}"
    );
    // Policy limit: 3 panics in a row → the stage exits, health and readiness fail.
    for _ in 0..3 {
        g.inject_fault(StageKind::Llm, Fault::Panic);
        assert_eq!(gen().status, 500);
    }
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 503);
    let r = request(s.addr, "GET", "/ready", b"", &[]);
    assert_eq!(r.status, 503);
    // /ready says why: unhealthy, and which stage exited how.
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("unhealthy"), "{v}");
    assert_eq!(v["exited"]["llm"], "Panicked", "{v}");
    assert_eq!(gen().status, 503);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_stage_panics_total{stage=\"llm\"} 4"),
        "{m}"
    );
    assert!(m.contains("lavit_healthy 0"), "{m}");
    assert!(m.contains("lavit_stage_up{stage=\"llm\"} 0"), "{m}");
    assert!(m.contains("lavit_stage_up{stage=\"decoder\"} 1"), "{m}");
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"panic\"} 4"),
        "{m}"
    );
    // The request after the death reached a stage that is gone.
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"stage_down\"} 1"),
        "{m}"
    );
    // 5 × 500 (1 error, 4 panics) + 3 × 503 (the request after the death, /health, /ready).
    assert!(
        m.contains("lavit_http_responses_total{class=\"5xx\"} 8"),
        "{m}"
    );
    s.stop();
}

#[test]
fn drain_finishes_in_flight_and_refuses_new() {
    let gate = Gate::closed();
    let s = server(
        2,
        2,
        Some(gate.clone()),
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    let addr = s.addr;
    let inflight: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/images/generations",
                    &serde_json::json!({"prompt": "x", "steps": 3}),
                )
                .status
            })
        })
        .collect();
    let adm = s.state.pipe.graph().admission().clone();
    assert!(wait_until(20, || adm.admitted() == 2));
    let rt = rt();
    let s = Arc::new(s);
    let s2 = s.clone();
    let drain = std::thread::spawn(move || rt.block_on(s2.drain(Duration::from_secs(20))));
    assert!(wait_until(10, || adm.is_draining()));
    let r = post(
        addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "late", "steps": 3}),
    );
    assert_eq!(r.status, 503, "{}", r.body);
    gate.open();
    for t in inflight {
        assert_eq!(t.join().unwrap(), 200);
    }
    assert!(
        drain.join().unwrap(),
        "drain did not finish the admitted requests"
    );
    if let Ok(s) = Arc::try_unwrap(s) {
        s.join();
    }
}

#[test]
fn malformed_requests_get_4xx_never_5xx() {
    let lim = Limits {
        warmup: false,
        body_limit_bytes: 200_000,
        max_image_pixels: 64 * 64,
        max_image_side: 512,
        max_prompt_chars: 100,
        ..limits()
    };
    let s = server(2, 2, None, lim);
    ready(&s);
    let png = png_b64(32, 32);
    let raw_png = base64::engine::general_purpose::STANDARD
        .decode(&png)
        .unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // A PNG whose header claims 100000 x 100000 pixels (a decompression bomb's header).
    let mut bomb = raw_png.clone();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let big_png = png_b64(100, 100); // 10000 pixels > 64*64
    let img = |s: String| serde_json::json!({ "image": s });
    let chat_img = |s: &str| chat_body(s, false);
    let gen = "/v1/images/generations";
    let cases: Vec<(&str, &str, Vec<u8>)> = vec![
        ("empty body", gen, b"".to_vec()),
        ("not JSON", gen, b"{prompt:".to_vec()),
        ("NaN literal", gen, br#"{"prompt":"a","guidance":NaN}"#.to_vec()),
        ("huge number", gen, br#"{"prompt":"a","guidance":1e999}"#.to_vec()),
        ("negative n", gen, br#"{"prompt":"a","n":-1}"#.to_vec()),
        ("zero n", gen, br#"{"prompt":"a","n":0}"#.to_vec()),
        ("huge n", gen, br#"{"prompt":"a","n":100000}"#.to_vec()),
        ("zero steps", gen, br#"{"prompt":"a","steps":0}"#.to_vec()),
        ("negative guidance", gen, br#"{"prompt":"a","guidance":-1}"#.to_vec()),
        ("huge guidance", gen, br#"{"prompt":"a","guidance":1e300}"#.to_vec()),
        ("string guidance", gen, br#"{"prompt":"a","guidance":"NaN"}"#.to_vec()),
        ("missing prompt", gen, br#"{"n":1}"#.to_vec()),
        ("empty prompt", gen, br#"{"prompt":"   "}"#.to_vec()),
        ("long prompt", gen, format!(r#"{{"prompt":"{}"}}"#, "a".repeat(101)).into_bytes()),
        ("bad size", gen, br#"{"prompt":"a","size":"big"}"#.to_vec()),
        ("odd size", gen, br#"{"prompt":"a","size":"7x7"}"#.to_vec()),
        ("huge size", gen, br#"{"prompt":"a","size":"99999x99999"}"#.to_vec()),
        ("url format", gen, br#"{"prompt":"a","response_format":"url"}"#.to_vec()),
        ("body over the cap", gen, format!(r#"{{"prompt":"{}"}}"#, "a".repeat(300_000)).into_bytes()),
        ("bad base64", "/v1/tokenize", img("!!!not base64!!!".into()).to_string().into_bytes()),
        ("wrong magic", "/v1/tokenize", img(b64(b"GIF00000000000000000000")).to_string().into_bytes()),
        ("text as image", "/v1/tokenize", img(b64(b"hello, world, this is not an image")).to_string().into_bytes()),
        ("truncated PNG", "/v1/tokenize", img(b64(&raw_png[..raw_png.len() / 2])).to_string().into_bytes()),
        ("header only PNG", "/v1/tokenize", img(b64(&raw_png[..20])).to_string().into_bytes()),
        ("bomb header", "/v1/tokenize", img(b64(&bomb)).to_string().into_bytes()),
        ("too many pixels", "/v1/tokenize", img(big_png).to_string().into_bytes()),
        ("empty image", "/v1/tokenize", img(String::new()).to_string().into_bytes()),
        ("no image", "/v1/tokenize", b"{}".to_vec()),
        ("empty list", "/v1/tokenize", br#"{"images":[]}"#.to_vec()),
        ("remote url", "/v1/tokenize", img("https://example.com/a.png".into()).to_string().into_bytes()),
        ("chat no messages", "/v1/chat/completions", br#"{"messages":[]}"#.to_vec()),
        ("chat no image", "/v1/chat/completions", br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        ("chat bad part", "/v1/chat/completions", br#"{"messages":[{"role":"user","content":[{"type":"audio"}]}]}"#.to_vec()),
        ("chat zero tokens", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["max_tokens"] = 0.into();
            v.to_string().into_bytes()
        }),
        ("chat huge tokens", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["max_tokens"] = 10_000_000.into();
            v.to_string().into_bytes()
        }),
        ("chat top_p 2", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["top_p"] = 2.0.into();
            v.to_string().into_bytes()
        }),
        ("chat negative temperature", "/v1/chat/completions", {
            let mut v = chat_img(&png);
            v["temperature"] = (-0.5).into();
            v.to_string().into_bytes()
        }),
        ("chat truncated image", "/v1/chat/completions", chat_img(&b64(&raw_png[..40])).to_string().into_bytes()),
        ("chat data url not base64", "/v1/chat/completions", br#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png,abc"}}]}]}"#.to_vec()),
        ("unknown route", "/v1/nothing", b"{}".to_vec()),
    ];
    for (name, path, body) in &cases {
        let r = request(s.addr, "POST", path, body, &[]);
        assert!(
            (400..500).contains(&r.status),
            "{name}: got {} {}",
            r.status,
            r.body
        );
        if r.status != 413 && r.status != 404 {
            assert!(
                r.body.contains("message"),
                "{name}: no message in {}",
                r.body
            );
        }
    }
    // The server is still fine and nothing leaked.
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    assert_eq!(s.state.pipe.graph().admission().admitted(), 0);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_http_responses_total{class=\"5xx\"} 0"),
        "{m}"
    );
    // Client mistakes are never counted as the server's failures.
    for k in serve::metrics::INTERNAL_KINDS {
        assert!(
            m.contains(&format!("lavit_internal_errors_total{{kind=\"{k}\"}} 0")),
            "{k}: {m}"
        );
    }
    s.stop();
}

/// The LLM stage's processed count and the stage records: both stay at zero while requests
/// are refused before admission.
fn llm_work(s: &RunningServer) -> (u64, usize) {
    let g = s.state.pipe.graph();
    let llm = g.shared().metrics[StageKind::Llm.index()]
        .processed
        .load(std::sync::atomic::Ordering::SeqCst);
    (llm, g.records().len())
}

#[test]
fn cost_budget_and_native_geometry_are_checked_before_the_llm() {
    // The mock decoder's native side is 16: sizes are multiples of 8 up to 32, and a cost
    // unit is one 16x16 diffusion step.
    let s = server(
        2,
        2,
        None,
        Limits {
            warmup: false,
            max_request_cost: 12.0,
            ..limits()
        },
    );
    ready(&s);
    let gen = |body: serde_json::Value| post(s.addr, "/v1/images/generations", &body);
    let refused = [
        // 2 × 7 × 1 = 14 > 12
        (
            serde_json::json!({"prompt": "x", "n": 2, "steps": 7}),
            "max_request_cost",
        ),
        // 1 × 4 × (32×32 / 16²) = 16 > 12
        (
            serde_json::json!({"prompt": "x", "steps": 4, "size": "32x32"}),
            "max_request_cost",
        ),
        // Over twice the native side, though under max_image_side.
        (
            serde_json::json!({"prompt": "x", "steps": 1, "size": "40x16"}),
            "native side is 16",
        ),
        // Not a multiple of 8.
        (
            serde_json::json!({"prompt": "x", "steps": 1, "size": "12x16"}),
            "multiple of 8",
        ),
    ];
    for (body, needle) in &refused {
        let r = gen(body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.body.contains(needle), "{body}: {}", r.body);
    }
    // Nothing reached the stages: no LLM pass, no stage record, no admission.
    assert_eq!(llm_work(&s), (0, 0));
    assert_eq!(s.state.pipe.graph().admission().rejected(), 0);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_stage_processed_total{stage=\"llm\"} 0"),
        "{m}"
    );
    // At the budget exactly: served. 1 × 3 × (32×32 / 16²) = 12.
    let r = gen(serde_json::json!({"prompt": "x", "steps": 3, "size": "32x32"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(llm_work(&s).0, 1);
    s.stop();
}

#[test]
fn request_cost_budget_is_a_validated_config_key() {
    use lavit_runtime::config::Validate;
    let cfg = serve::ServeConfig::default();
    assert_eq!(cfg.server.max_request_cost, 200.0);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let mut c = cfg.clone();
        c.server.max_request_cost = bad;
        let e = c.validate("serve.toml").unwrap_err().to_string();
        assert!(e.contains("server.max_request_cost"), "{e}");
    }
    // configs/serve.toml sets it (the documented default).
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("configs/serve.toml")).unwrap();
    assert!(text.contains("max_request_cost = 200.0"), "{text}");
}

#[test]
fn internal_failures_are_500s_counted_by_kind() {
    use lavit::serve::ApiError;
    use lavit_runtime::Error;
    let torch = tch::Tensor::zeros([2], (Kind::Float, Device::Cpu))
        .f_reshape([3])
        .unwrap_err();
    let cases = [
        (
            Error::io("weights.bin", std::io::Error::other("disk gone")),
            "io",
        ),
        (
            Error::Torch {
                context: "attention".into(),
                source: torch,
            },
            "libtorch",
        ),
        (
            Error::Plugin {
                part: "backbone",
                name: "convnet".into(),
                msg: "returned rank 3".into(),
            },
            "plugin",
        ),
        (Error::ckpt("x.bin", "torn"), "stage"),
    ];
    for (e, kind) in cases {
        let a = ApiError::from(StageError::from_error(StageKind::Encoder, e));
        assert_eq!(a.status.as_u16(), 500, "{kind}: {}", a.message);
        assert_eq!(a.internal, Some(kind));
    }
    // A client's mistake found inside a stage stays a 400 and is not counted.
    let a = ApiError::from(StageError::from_error(
        StageKind::Llm,
        Error::invalid("prompt too long for the context"),
    ));
    assert_eq!((a.status.as_u16(), a.internal), (400, None));
    let a = ApiError::from(StageError::Busy("full".into()));
    assert_eq!((a.status.as_u16(), a.internal), (429, None));

    // Over HTTP: an injected stage error is a 500 counted as `stage`; image work ran on the
    // blocking pool.
    let s = server(
        2,
        2,
        None,
        Limits {
            warmup: false,
            ..limits()
        },
    );
    ready(&s);
    s.state
        .pipe
        .graph()
        .inject_fault(StageKind::Encoder, Fault::Error);
    let img = png_b64(20, 20);
    let r = post(s.addr, "/v1/tokenize", &serde_json::json!({ "image": img }));
    assert_eq!(r.status, 500, "{}", r.body);
    let r = post(s.addr, "/v1/chat/completions", &chat_body(&img, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(
        s.addr,
        "/v1/images/generations",
        &serde_json::json!({"prompt": "x", "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let m = request(s.addr, "GET", "/metrics", b"", &[]).body;
    assert!(
        m.contains("lavit_internal_errors_total{kind=\"stage\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("lavit_blocking_jobs_total{job=\"image_decode\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("lavit_blocking_jobs_total{job=\"png_encode\"} 1"),
        "{m}"
    );
    assert_eq!(s.state.metrics.internal_count("stage"), 1);
    s.stop();
}

#[test]
fn api_key_is_required_when_configured() {
    let var = "LAVIT_TEST_SERVING_API_KEY";
    std::env::set_var(var, "sekrit");
    let s = server(
        1,
        1,
        None,
        Limits {
            warmup: false,
            api_key_env: Some(var.into()),
            ..limits()
        },
    );
    ready(&s);
    let body = serde_json::json!({"prompt": "x", "steps": 1}).to_string();
    let gen = "/v1/images/generations";
    assert_eq!(
        request(s.addr, "POST", gen, body.as_bytes(), &[]).status,
        401
    );
    assert_eq!(
        request(
            s.addr,
            "POST",
            gen,
            body.as_bytes(),
            &[("Authorization", "Bearer wrong!")]
        )
        .status,
        401
    );
    assert_eq!(
        request(
            s.addr,
            "POST",
            gen,
            body.as_bytes(),
            &[("Authorization", "Bearer sekrit")]
        )
        .status,
        200
    );
    assert_eq!(request(s.addr, "GET", "/health", b"", &[]).status, 200);
    s.stop();
}

// ------------------------------------------------------------------------------------------
// Real stages (the fixture's models) through the actors == direct calls.
