//! Multimodal synthesis (image and text parts → image, the official `multimodal_synthesis`):
//! parity of the image tokens with the official logic on the fixture
//! (tests/data/synthesis-references.json, scripts/dev/synthesis_reference.py), the library
//! API's parts and bounds, and `POST /v1/images/edits`.

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use lavit::pipeline::{Part, Pipeline, PipelineConfig, StageSet, SynthesisInfo};
use lavit::serve::{self, Limits};
use lavit_runtime::actors::Input;
use lavit_runtime::messages::{GenerateOptions, Output, SynthesisPart, Task};
use lavit_runtime::mock::MockConfig;
use tch::Tensor;

use crate::common::fixture_dir;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The official logic's greedy image tokens with guidance for an [image, text], an [image]
/// and a [text, image, image] prompt (the fixture's images, its official visual ids), and the
/// same prompts through the pipeline: the tokenizer stages tokenize the images, the Llm
/// builds the token prompt (no [IMG]/[/IMG] around the image ids) and guides against [IMG]
/// alone. The ids the Decoder drew from must equal the reference's exactly.
#[test]
fn synthesis_reproduces_the_official_image_tokens_on_the_fixture() {
    let refs: serde_json::Value =
        serde_json::from_str(include_str!("data/synthesis-references.json")).unwrap();
    let dir = fixture_dir();
    let expected =
        lavit_runtime::checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let images = &expected["images"]; // (3, 3, S, S), CLIP-normalised
    let pipe = Pipeline::build(&PipelineConfig {
        checkpoint: Some(dir.clone()),
        stages: StageSet::Checkpoint,
        // The fixture's official visual ids were taken with arg-max selection.
        selection: "argmax".into(),
        ..PipelineConfig::default()
    })
    .unwrap();
    let (w, h) = pipe.info().default_size;
    let rt = rt();
    let cases = refs["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut parts = Vec::new();
        let mut index = Vec::new();
        for p in case["parts"].as_array().unwrap() {
            if let Some(i) = p.get("image") {
                parts.push(SynthesisPart::Image);
                index.push(i.as_i64().unwrap());
            } else {
                parts.push(SynthesisPart::Text(p["text"].as_str().unwrap().into()));
            }
        }
        let x = images.index_select(0, &Tensor::from_slice(&index));
        let opts = GenerateOptions {
            n: 1,
            temperature: 0.0,
            llm_guidance: case["llm_guidance"].as_f64().unwrap(),
            steps: 1,
            width: w,
            height: h,
            ..GenerateOptions::default()
        };
        let out = rt
            .block_on(
                pipe.graph()
                    .run(Task::Synthesize { parts, opts }, Input::Images(x)),
            )
            .unwrap();
        let Output::Pixels { ids, images } = out else {
            panic!("{name}: no pixels");
        };
        assert_eq!(images.size()[0], 1, "{name}");
        let want: Vec<i64> = case["image_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert!(!want.is_empty(), "{name}");
        assert_eq!(
            ids[0], want,
            "{name}: image tokens differ from the official logic's"
        );
    }
}

fn test_image(seed: u8) -> image::DynamicImage {
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([(x as u8).wrapping_mul(seed), (y as u8) ^ seed, 90 + seed])
    }))
}

fn mock_pipe() -> Pipeline {
    Pipeline::mock(&MockConfig::default(), None, &PipelineConfig::default()).unwrap()
}

/// The library API: the parts' order and images reach the Llm (the mock's ids follow its
/// prompt), a text-only prompt is text → image, the image count must match, and the
/// prompt's worst-case length is bounded by the language model's context before any work.
#[test]
fn library_parts_keep_their_order_and_prompts_are_bounded() {
    let pipe = mock_pipe();
    let rt = rt();
    let opts = GenerateOptions {
        n: 1,
        seed: 5,
        steps: 2,
        width: 16,
        height: 16,
        ..GenerateOptions::default()
    };
    let (a, b) = (test_image(3), test_image(11));
    let text = || Part::Text("it is running in the snow".into());
    let ids = |parts: &[Part]| {
        rt.block_on(pipe.synthesize(parts, opts.clone()))
            .unwrap()
            .ids
    };
    let image_text = ids(&[Part::Image(a.clone()), text()]);
    assert_eq!(
        image_text,
        ids(&[Part::Image(a.clone()), text()]),
        "deterministic"
    );
    assert_ne!(
        image_text,
        ids(&[text(), Part::Image(a.clone())]),
        "order matters"
    );
    assert_ne!(
        image_text,
        ids(&[Part::Image(b.clone()), text()]),
        "the image matters"
    );
    assert_ne!(
        ids(&[Part::Image(a.clone()), Part::Image(b.clone())]),
        ids(&[Part::Image(b.clone()), Part::Image(a.clone())]),
        "the images' order matters"
    );
    // Text alone is text → image.
    let alone = rt
        .block_on(pipe.generate_with_ids("it is running in the snow", opts.clone()))
        .unwrap()
        .ids;
    assert_eq!(ids(&[text()]), alone);
    assert!(rt
        .block_on(pipe.synthesize(&[Part::Text("  ".into())], opts.clone()))
        .is_err());
    // Two image parts, one image.
    let x = pipe.preprocess(std::slice::from_ref(&a));
    let task = Task::Synthesize {
        parts: vec![SynthesisPart::Image, SynthesisPart::Image],
        opts: opts.clone(),
    };
    let e = rt
        .block_on(pipe.graph().run(task, Input::Images(x)))
        .unwrap_err();
    assert!(e.to_string().contains("2 image parts"), "{e}");

    // The worst-case prompt: images × patches + text bytes + 1 per text + [IMG], plus the
    // image tokens to generate, within the context.
    let info = SynthesisInfo {
        llm_guidance: 5.0,
        tokens_per_image: 64,
        context: Some(200),
        max_new_tokens: 24,
    };
    let o = GenerateOptions::default();
    assert_eq!(info.check_prompt(2, &["abc"], &o), Ok(2 * 64 + 4 + 1));
    let e = info.check_prompt(3, &["abc"], &o).unwrap_err();
    assert!(e.contains("context of 200"), "{e}");
    let short = GenerateOptions {
        max_tokens: Some(1),
        ..o.clone()
    };
    assert!(info.check_prompt(2, &[&"x".repeat(60)], &short).is_ok());
    assert!(info.check_prompt(2, &[&"x".repeat(80)], &short).is_err());
}

// ------------------------------------------------------------------------------------------
// POST /v1/images/edits

struct Resp {
    status: u16,
    body: serde_json::Value,
}

/// A multipart/form-data body: (name, file name, bytes) per field.
fn form(fields: &[(&str, Option<&str>, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, file, data) in fields {
        b.extend_from_slice(b"--lavitBOUNDARY\r\n");
        match file {
            Some(f) => b.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: image/png\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"--lavitBOUNDARY--\r\n");
    b
}

fn post(addr: SocketAddr, content_type: &str, body: &[u8]) -> Resp {
    let r = crate::serving::request(
        addr,
        "POST",
        "/v1/images/edits",
        body,
        &[("Content-Type", content_type)],
    );
    Resp {
        status: r.status,
        body: serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
    }
}

fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn pngs_of(r: &Resp) -> Vec<Vec<u8>> {
    r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            base64::engine::general_purpose::STANDARD
                .decode(d["b64_json"].as_str().unwrap())
                .unwrap()
        })
        .collect()
}

const FORM: &str = "multipart/form-data; boundary=lavitBOUNDARY";

/// A form field: name, file name (file fields), bytes.
type FormField = (String, Option<String>, Vec<u8>);

/// The OpenAI-shaped edits endpoint on the mock stages: one or several images (`image`,
/// `image[]`), with or without text, `n`; the same request gives the same pictures, another
/// image order other ones; bad input is a 4xx naming the field, before any model work.
#[test]
fn images_edits_endpoint_draws_from_images_and_text_and_refuses_bad_forms() {
    let pipe = Arc::new(mock_pipe());
    let lim = Limits {
        bind: "127.0.0.1:0".into(),
        warmup: false,
        max_images: 3,
        max_image_bytes: 64 << 10,
        ..Limits::default()
    };
    let s = serve::spawn(pipe, lim).unwrap();
    rt().block_on(serve::mark_ready(&s)).unwrap();
    let (a, b) = (png(&test_image(3)), png(&test_image(11)));
    let field = |n: &str, v: &str| (n.to_string(), None::<String>, v.as_bytes().to_vec());
    let send = |fields: Vec<FormField>| {
        let f: Vec<(&str, Option<&str>, Vec<u8>)> = fields
            .iter()
            .map(|(n, f, d)| (n.as_str(), f.as_deref(), d.clone()))
            .collect();
        post(s.addr, FORM, &form(&f))
    };
    let img = |name: &str, d: &[u8]| (name.to_string(), Some("x.png".to_string()), d.to_vec());

    let r = send(vec![
        img("image", &a),
        field("prompt", "It is running in the snow"),
        field("n", "2"),
        field("seed", "4"),
        field("steps", "2"),
        field("response_format", "b64_json"),
        field("model", "lavit"),
    ]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["created"].as_u64().is_some());
    let first = pngs_of(&r);
    assert_eq!(first.len(), 2);
    let again = send(vec![
        img("image", &a),
        field("prompt", "It is running in the snow"),
        field("n", "2"),
        field("seed", "4"),
        field("steps", "2"),
    ]);
    assert_eq!(
        pngs_of(&again),
        first,
        "the same request draws the same pictures"
    );
    let ab = send(vec![
        img("image[]", &a),
        img("image[]", &b),
        field("seed", "4"),
    ]);
    let ba = send(vec![
        img("image[]", &b),
        img("image[]", &a),
        field("seed", "4"),
    ]);
    assert_eq!((ab.status, ba.status), (200, 200), "{}", ab.body);
    assert_ne!(
        pngs_of(&ab),
        pngs_of(&ba),
        "the images' order reaches the prompt"
    );

    // Bad input: 4xx naming the field.
    let cases: Vec<(Vec<FormField>, u16, &str)> = vec![
        (vec![field("prompt", "no image")], 400, "image"),
        (
            vec![
                img("image", &a),
                img("image", &a),
                img("image", &a),
                img("image", &a),
            ],
            400,
            "image",
        ),
        (vec![img("image", &a), img("mask", &a)], 400, "mask"),
        (
            vec![img("image", &a), field("style", "vivid")],
            400,
            "style",
        ),
        (vec![img("image", &a), field("n", "two")], 400, "n"),
        (vec![img("image", &a), field("n", "50")], 400, "n"),
        (
            vec![img("image", &a), field("n", "1"), field("n", "1")],
            400,
            "n",
        ),
        (vec![img("image", &a), field("size", "7x7")], 400, "size"),
        (
            vec![img("image", &a), field("response_format", "url")],
            400,
            "response_format",
        ),
        (
            vec![img("image", &a), field("prompt", &"x".repeat(5000))],
            400,
            "prompt",
        ),
        (vec![img("image", &a[..60])], 400, "image[0]"),
        (vec![img("image", b"GIF89a not really")], 400, "image[0]"),
        (vec![img("image", &vec![0u8; 70 << 10])], 413, "image[0]"),
        (
            vec![img("image", &a), field("model", "dall-e-2")],
            404,
            "model",
        ),
    ];
    for (fields, status, param) in cases {
        let names: Vec<String> = fields.iter().map(|f| f.0.clone()).collect();
        let r = send(fields);
        assert_eq!(r.status, status, "{names:?}: {}", r.body);
        assert_eq!(r.body["error"]["param"], param, "{names:?}: {}", r.body);
        assert!(r.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(post(s.addr, "application/json", b"{}").status, 415);
    assert_eq!(post(s.addr, "multipart/form-data", b"x").status, 400);
    assert_eq!(post(s.addr, FORM, b"--lavitBOUNDARY\r\nbroken").status, 400);
    s.stop();
}

/// `lavit generate --image`: the parts follow the command line's order (an image before the
/// text and after it draw different pictures, the same order the same one), an image-only
/// prompt works, and a missing or excess image is refused before any model is loaded.
#[test]
fn cli_generate_takes_image_parts_in_command_line_order() {
    let dir = tempfile::tempdir().unwrap();
    let photo = dir.path().join("photo.png");
    std::fs::write(&photo, png(&test_image(7))).unwrap();
    let fixture = fixture_dir();
    let run = |args: &[&str], out: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lavit"))
            .arg("generate")
            .arg("--checkpoint")
            .arg(&fixture)
            .args(["--steps", "1", "--seed", "1", "-o"])
            .arg(dir.path().join(out))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let p = photo.to_str().unwrap();
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    let (ok, out, err) = run(&["--image", p, "It is running in the snow"], "a.png");
    assert!(ok && out.contains("image tokens"), "{out}{err}");
    let (ok, _, err) = run(&["It is running in the snow", "--image", p], "b.png");
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["--image", p, "It is running in the snow"], "c.png");
    assert!(ok, "{err}");
    assert_ne!(
        read("a.png"),
        read("b.png"),
        "[image, text] and [text, image] differ"
    );
    assert_eq!(
        read("a.png"),
        read("c.png"),
        "the same order draws the same"
    );
    let (ok, _, err) = run(&["--image", p], "d.png");
    assert!(ok, "image-only: {err}");
    let (ok, _, err) = run(&["--image", "/nonexistent/x.png", "text"], "e.png");
    assert!(!ok && err.contains("--image /nonexistent/x.png"), "{err}");
    let mut many = Vec::new();
    for _ in 0..9 {
        many.extend(["--image", p]);
    }
    let (ok, _, err) = run(&many, "f.png");
    assert!(!ok && err.contains("at most 8"), "{err}");
    assert!(!err.contains("loading"), "refused before loading: {err}");
}
