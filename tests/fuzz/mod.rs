//! Seeded mutation fuzzing of every reader of untrusted bytes (issue 14): the pickle/zip
//! reader, the safetensors and shard-index loader, the SentencePiece model reader and
//! normaliser, the manifest / HF / diffusers config validators, the image decoder front and
//! the HTTP request validators.
//!
//! Each target mutates real seeds (the tiny fixture's files, crafted ones) with a fixed
//! seed, so a run is reproducible; ≥ 10,000 cases per target (`LAVIT_FUZZ_CASES` raises it
//! for long runs, `LAVIT_FUZZ_SEED=k` starts every target on another stream). One `#[test]`
//! per target: the harness runs them in parallel, the set takes about as long as `torch_zip`. A case passes when the reader returns (Ok or Err) without a panic. A
//! panicking input is written to `target/fuzz-crashes/<target>/` and the test fails; such
//! files are then moved to `tests/data/fuzz/<target>/`, which [`fuzz_regressions_replay`]
//! replays forever. The `fuzz/` folder holds the same targets for `cargo fuzz` (long runs).

use crate::common::fixture_dir;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

mod loops;

/// xorshift64*: a small deterministic generator (no dependency, same stream everywhere).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One to four random mutations of `seed` (bit flips, interesting integers, insertions,
/// deletions, duplications, splices with another seed).
pub fn mutate(rng: &mut Rng, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = d.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = INTERESTING[rng.below(INTERESTING.len())] as u8;
            }
            2 if len >= 8 => {
                let w = [2usize, 4, 8][rng.below(3)];
                let i = rng.below(len - w + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                d[i..i + w].copy_from_slice(&v[..w]);
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i..i, bytes);
            }
            4 if len > 1 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                d.drain(i..i + n);
            }
            5 if len > 1 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = d[i..i + n].to_vec();
                let at = rng.below(len + 1);
                d.splice(at..at, chunk);
            }
            6 if !others.is_empty() => {
                let o = &others[rng.below(others.len())];
                if !o.is_empty() && len > 0 {
                    let (i, j) = (rng.below(len), rng.below(o.len()));
                    let n = 1 + rng.below((o.len() - j).min(256));
                    d.splice(i..(i + n).min(len), o[j..j + n].iter().copied());
                }
            }
            7 if len > 0 => {
                d.truncate(rng.below(len));
            }
            _ => {}
        }
    }
    d
}

/// How many cases per target (≥ 10,000; `LAVIT_FUZZ_CASES` for longer runs).
pub fn cases() -> usize {
    std::env::var("LAVIT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
        .max(10_000)
}

thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While alive, panics on this thread print nothing (the fuzz loop catches thousands); other
/// threads (tests running in parallel) keep the normal hook. The hook is installed once, so
/// parallel fuzz tests never swap it under each other.
struct QuietPanics;

impl QuietPanics {
    fn on() -> Self {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !QUIET.with(|q| q.get()) {
                    prev(info);
                }
            }));
        });
        QUIET.with(|q| q.set(true));
        QuietPanics
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        QUIET.with(|q| q.set(false));
    }
}

/// Run `n` mutated cases of `seeds` through `f`; a panic saves the input and fails.
/// Returns (cases, Ok results, Err results).
pub fn run_target(
    name: &str,
    seed: u64,
    seeds: &[Vec<u8>],
    n: usize,
    mut f: impl FnMut(&[u8]) -> bool,
) -> (usize, usize, usize) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let _quiet = QuietPanics::on();
    // `LAVIT_FUZZ_SEED` moves every target to another stream (long runs explore further).
    let seed = seed.wrapping_add(
        std::env::var("LAVIT_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            .wrapping_mul(1_000_003),
    );
    let mut rng = Rng::new(seed);
    let (mut ok, mut err) = (0, 0);
    let start = Instant::now();
    let mut crash: Option<(usize, Vec<u8>, String)> = None;
    for i in 0..n {
        // Every 10th case is an unmutated seed or a double mutation (deeper paths).
        let s = &seeds[rng.below(seeds.len())];
        let mut input = mutate(&mut rng, s, seeds);
        if i % 10 == 9 {
            input = mutate(&mut rng, &input, seeds);
        }
        match catch_unwind(AssertUnwindSafe(|| f(&input))) {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                crash = Some((i, input, msg));
                break;
            }
        }
    }
    drop(_quiet);
    if let Some((i, input, msg)) = crash {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/fuzz-crashes")
            .join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("seed{seed}-case{i}.bin"));
        std::fs::write(&f, &input).unwrap();
        panic!(
            "{name}: case {i} panicked ({msg}); input saved to {}",
            f.display()
        );
    }
    eprintln!(
        "fuzz {name}: {n} cases ({ok} accepted, {err} refused) in {:.1} s, 0 panics",
        start.elapsed().as_secs_f64()
    );
    (n, ok, err)
}

// ------------------------------------------------------------------------- targets

/// The pickle reader: `data.pkl` bytes through the restricted unpickler.
pub fn pickle_target(data: &[u8]) -> bool {
    lavit_runtime::checkpoint::pickle::unpickle(data, Path::new("fuzz.pkl")).is_ok()
}

/// A whole `torch.save` zip through [`lavit_runtime::checkpoint::load_file`].
pub fn torch_zip_target(dir: &Path, data: &[u8]) -> bool {
    let p = dir.join("fuzz.bin");
    std::fs::write(&p, data).unwrap();
    lavit_runtime::checkpoint::load_file(&p).is_ok()
}

/// A safetensors file through [`lavit_runtime::checkpoint::load_file`].
pub fn safetensors_target(dir: &Path, data: &[u8]) -> bool {
    let p = dir.join("fuzz.safetensors");
    std::fs::write(&p, data).unwrap();
    lavit_runtime::checkpoint::load_file(&p).is_ok()
}

/// A shard index (beside two small shards) through [`lavit_runtime::checkpoint::load_sharded`].
pub fn index_target(dir: &Path, data: &[u8]) -> bool {
    let p = dir.join("model.safetensors.index.json");
    std::fs::write(&p, data).unwrap();
    lavit_runtime::checkpoint::load_sharded(&p).is_ok()
}

/// The SentencePiece reader, then the normaliser, encoder and decoder on text made of the
/// input's own bytes.
pub fn sentencepiece_target(data: &[u8]) -> bool {
    use lavit_llm::sentencepiece::SentencePiece;
    let Ok(sp) = SentencePiece::from_bytes(data) else {
        return false;
    };
    let text = String::from_utf8_lossy(&data[data.len().saturating_sub(48)..]).into_owned();
    for t in [
        text.as_str(),
        "café au lait",
        "  a  b ",
        "",
        "\u{2581}x\u{FFFD}é🙂",
    ] {
        let _ = sp.normalize(t);
        let ids = sp.encode(t);
        let _ = sp.encode_pieces(t);
        let _ = sp.decode(&ids);
    }
    let ids: Vec<i64> = data.iter().take(32).map(|&b| b as i64 - 8).collect();
    let _ = sp.decode(&ids);
    true
}

/// Which config a JSON input is read as.
#[derive(Clone, Copy, Debug)]
pub enum ConfigKind {
    Manifest,
    Llama,
    UNet,
    Vae,
    Scheduler,
}

/// A config file through its reader and validator (and, when accepted, what is computed
/// from it before a model is built).
pub fn config_target(dir: &Path, kind: ConfigKind, data: &[u8]) -> bool {
    use lavit_decoder::{AutoencoderKLConfig, SchedulerConfig, UNet2DConditionModelConfig};
    let p = dir.join(match kind {
        ConfigKind::Manifest => "manifest.json",
        _ => "config.json",
    });
    std::fs::write(&p, data).unwrap();
    match kind {
        ConfigKind::Manifest => match lavit_runtime::manifest::LavitManifest::for_checkpoint(dir) {
            Ok(m) => {
                let _ = m.min_params();
                let _ = m.check_context("fuzz", 512);
                true
            }
            Err(_) => false,
        },
        ConfigKind::Llama => match lavit_llm::config::LlamaConfig::from_json_file(&p) {
            Ok(c) => {
                let _ = lavit_llm::modeling_llama::LlamaForCausalLM::param_shapes(&c);
                true
            }
            Err(_) => false,
        },
        ConfigKind::UNet => match UNet2DConditionModelConfig::from_json_file(&p) {
            Ok(c) => {
                let _ = c.implied("fuzz");
                let _ = c.time_embed_dim();
                true
            }
            Err(_) => false,
        },
        ConfigKind::Vae => match AutoencoderKLConfig::from_json_file(&p) {
            Ok(c) => {
                let _ = c.implied();
                let _ = c.downscale();
                true
            }
            Err(_) => false,
        },
        ConfigKind::Scheduler => match SchedulerConfig::from_json_file(&p) {
            Ok(c) => {
                let Ok(mut s) = lavit_decoder::schedulers::from_config(&c, None) else {
                    return false;
                };
                let _ = s.set_timesteps(1 + data.len() % 50);
                true
            }
            Err(_) => false,
        },
    }
}

/// The HTTP request validators: the body parsed and checked as each route's request (the
/// generation options with the size rule and cost budget, the chat plan, the tokenize list),
/// and every image it carries through the server's image front (base64, magic, header caps,
/// decode).
pub fn http_target(data: &[u8]) -> bool {
    use lavit::serve::validate::*;
    use std::sync::OnceLock;
    // Built once for the whole loop.
    static LIMITS: OnceLock<(lavit::serve::Limits, lavit::pipeline::ModelInfo)> = OnceLock::new();
    let (lim, info) = LIMITS.get_or_init(|| {
        let info = lavit::pipeline::ModelInfo {
            image_size: 28,
            default_size: (64, 64),
            size_multiple: 8,
            max_steps: 100,
            generate_defaults: Default::default(),
            selection: Default::default(),
            selection_note: None,
            synthesis: Default::default(),
        };
        (http_limits(), info)
    });
    let mut ok = false;
    if let Ok(r) = parse_json::<GenerationRequest>(data) {
        if let Ok(o) = generation_options(&r, lim, info) {
            assert!(
                generation_cost(&o, 64) <= lim.max_request_cost,
                "over budget: {o:?}"
            );
            assert!(
                o.width <= 128 && o.height <= 128,
                "size outside the rule: {o:?}"
            );
            ok = true;
        }
    }
    if let Ok(r) = parse_json::<ChatRequest>(data) {
        if let Ok(plan) = chat_plan(r, lim) {
            ok |= decode_image("image", &plan.image, lim).is_ok();
        }
    }
    // multipart/form-data (POST /v1/images/edits): the fields, the edit plan, its images.
    if let Ok(fields) = lavit::serve::multipart::parse(data, "lavitBOUNDARY") {
        if let Ok(plan) = lavit::serve::images_edits::edit_plan(&fields, lim, info) {
            assert!(!plan.images.is_empty() && plan.images.len() <= lim.max_images);
            for (i, b) in plan.images.iter().enumerate() {
                ok |= decode_image_bytes(&format!("image[{i}]"), b, lim).is_ok();
            }
        }
    }
    if let Ok(r) = parse_json::<TokenizeRequest>(data) {
        let _ = tokenize_selection(&r, info.selection);
        if let Ok(list) = tokenize_images(r, lim) {
            for (i, b) in list.iter().enumerate() {
                ok |= decode_image(&format!("images[{i}]"), b, lim).is_ok();
            }
        }
    }
    ok
}

/// Small caps, so that a mutated header never makes a case decode a big picture.
fn http_limits() -> lavit::serve::Limits {
    lavit::serve::Limits {
        max_image_side: 256,
        max_image_pixels: 128 * 128,
        max_image_bytes: 64 << 10,
        max_request_cost: 400.0,
        ..Default::default()
    }
}

/// The image decoder front: magic, size caps before decoding, decode, resize.
pub fn image_target(data: &[u8]) -> bool {
    image_target_with(&lavit_encoder::LaVITImageProcessor::new(32), data)
}

/// [`image_target`] with a processor built once for the whole loop.
pub fn image_target_with(p: &lavit_encoder::LaVITImageProcessor, data: &[u8]) -> bool {
    p.load_bytes(data).is_ok()
}

// ------------------------------------------------------------------------- seeds

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

/// `data.pkl` of every fixture `.bin` (real `torch.save` pickles) and the crafted bombs.
pub fn pickle_seeds() -> Vec<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    for f in torch_zip_seeds() {
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(f)).unwrap();
        let name = (0..z.len())
            .map(|i| z.name_for_index(i).unwrap().to_string())
            .find(|n| n.ends_with("data.pkl"))
            .unwrap();
        let mut b = Vec::new();
        z.by_name(&name).unwrap().read_to_end(&mut b).unwrap();
        out.push(b);
    }
    let mut p = crate::hostile::Pkl::new();
    p.op(b"}")
        .str("w")
        .tensor("0", 4, &[2, 2], &[2, 1])
        .op(b"s");
    out.push(p.end());
    out
}

/// Small real `torch.save` zips: the fixture's smallest `.bin` files and crafted ones.
pub fn torch_zip_seeds() -> Vec<Vec<u8>> {
    let fx = fixture_dir();
    let mut out = vec![
        read(fx.join("pixel_decoding/uncond_embeddings.bin")),
        read(fx.join("language_model/visual_weight.bin")),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("s.bin");
    let mut k = crate::hostile::Pkl::new();
    k.op(b"}")
        .str("a")
        .tensor("0", 6, &[2, 3], &[3, 1])
        .op(b"s");
    k.str("b").tensor("0", 6, &[3], &[2]).op(b"s");
    let f: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    crate::hostile::write_torch_zip(&p, &k.end(), &[("0", f, false)]);
    out.push(read(&p));
    out.retain(|b| b.len() < 2 << 20);
    out
}

/// Small safetensors files (written by the runtime's own writer).
pub fn safetensors_seeds(dir: &Path) -> Vec<Vec<u8>> {
    use tch::{Kind, Tensor};
    let mut out = Vec::new();
    for (i, kinds) in [
        vec![Kind::Float],
        vec![Kind::Half, Kind::Int64],
        vec![Kind::BFloat16, Kind::Uint8, Kind::Float],
    ]
    .into_iter()
    .enumerate()
    {
        let mut sd = lavit_runtime::checkpoint::StateDict::new();
        for (j, k) in kinds.into_iter().enumerate() {
            let t = Tensor::arange((j as i64 + 2) * 3, (k, tch::Device::Cpu))
                .reshape([j as i64 + 2, 3]);
            sd.insert(format!("layer.{j}.weight"), t);
        }
        let p = dir.join(format!("seed{i}.safetensors"));
        lavit_runtime::checkpoint::save_safetensors(&p, &sd, None).unwrap();
        out.push(read(&p));
    }
    out
}

/// A folder with two small shards and its index seeds.
pub fn index_seeds(dir: &Path) -> Vec<Vec<u8>> {
    use tch::{Kind, Tensor};
    for (shard, keys) in [("a.safetensors", ["x", "y"]), ("b.safetensors", ["z", "w"])] {
        let mut sd = lavit_runtime::checkpoint::StateDict::new();
        for k in keys {
            sd.insert(
                k.to_string(),
                Tensor::ones([2], (Kind::Float, tch::Device::Cpu)),
            );
        }
        lavit_runtime::checkpoint::save_safetensors(&dir.join(shard), &sd, None).unwrap();
    }
    vec![
        br#"{"metadata":{},"weight_map":{"x":"a.safetensors","y":"a.safetensors","z":"b.safetensors","w":"b.safetensors"}}"#.to_vec(),
        br#"{"weight_map":{"x":"../a.safetensors","y":"/etc/passwd","z":"b.safetensors","x ":"a.safetensors"}}"#.to_vec(),
        read(fixture_dir().join("language_model/model.safetensors.index.json")),
    ]
}

/// The LLaMA-style test model and the crafted UTF-8-splitting one.
pub fn sentencepiece_seeds() -> Vec<Vec<u8>> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    vec![
        read(data.join("sp_llama_style.model")),
        read(data.join("hostile/sp_split_utf8.model")),
        read(fixture_dir().join("language_model/tokenizer.model")),
    ]
}

/// The fixture's config files of one kind.
pub fn config_seeds(kind: ConfigKind) -> Vec<Vec<u8>> {
    let fx = fixture_dir();
    let files: &[&str] = match kind {
        ConfigKind::Manifest => &["manifest.json"],
        ConfigKind::Llama => &["language_model/config.json"],
        ConfigKind::UNet => &[
            "pixel_decoding/unet/config.json",
            "highres_pixel_decoding/unet/config.json",
        ],
        ConfigKind::Vae => &[
            "pixel_decoding/vae/config.json",
            "highres_pixel_decoding/vae/config.json",
        ],
        ConfigKind::Scheduler => &[
            "pixel_decoding/scheduler/scheduler_config.json",
            "highres_pixel_decoding/scheduler/scheduler_config.json",
        ],
    };
    files.iter().map(|f| read(fx.join(f))).collect()
}

/// Numbers in JSON replaced by hostile ones: the byte mutator rarely makes valid JSON, this
/// reaches the validators.
pub fn mutate_json_numbers(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    const VALUES: [&str; 14] = [
        "0",
        "-1",
        "1",
        "3",
        "1e300",
        "-1e300",
        "1099511627776",
        "9223372036854775807",
        "-9223372036854775808",
        "65536",
        "0.5",
        "4097",
        "null",
        "[]",
    ];
    let text = String::from_utf8_lossy(seed);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let starts_number =
            c.is_ascii_digit() || (c == '-' && chars.peek().is_some_and(|d| d.is_ascii_digit()));
        if starts_number {
            let mut num = c.to_string();
            while let Some(&d) = chars.peek() {
                if d.is_ascii_digit() || matches!(d, '.' | 'e' | 'E' | '-' | '+') {
                    num.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            if rng.below(6) == 0 {
                out.push_str(VALUES[rng.below(VALUES.len())]);
            } else {
                out.push_str(&num);
            }
        } else {
            out.push(c);
        }
    }
    out.into_bytes()
}

/// PNG, JPEG, BMP and GIF encodings of a small picture.
pub fn image_seeds() -> Vec<Vec<u8>> {
    use image::ImageFormat;
    let img = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 15) as u8, 90])
    });
    [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Bmp,
        ImageFormat::Gif,
    ]
    .into_iter()
    .map(|f| {
        let mut c = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut c, f)
            .unwrap();
        c.into_inner()
    })
    .collect()
}

/// Request bodies of each route (a small PNG and GIF inline).
pub fn http_seeds() -> Vec<Vec<u8>> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let imgs = image_seeds();
    let (png, gif) = (b64(&imgs[0]), b64(&imgs[3]));
    [
        serde_json::json!({"prompt": "a red cat", "n": 2, "size": "64x128", "steps": 30,
                           "seed": 4, "guidance": 7.5, "llm_guidance": 3.0,
                           "response_format": "b64_json", "model": "lavit"}),
        serde_json::json!({"prompt": "x", "n": 4, "size": "128x128", "steps": 150}),
        serde_json::json!({"model": "lavit", "stream": true, "max_tokens": 5,
                           "stream_options": {"include_usage": true}, "temperature": 0.7,
                           "top_p": 0.9, "top_k": 40, "seed": 1,
                           "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in the image? café"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}}]}]}),
        serde_json::json!({"messages": [{"role": "system", "content": "be brief"},
                           {"role": "user", "content": [{"type": "image", "image": gif}]}]}),
        serde_json::json!({"images": [png, gif], "keep_mask": true}),
        serde_json::json!({"image": format!("data:image/gif;base64,{gif}")}),
    ]
    .iter()
    .map(|v| v.to_string().into_bytes())
    .chain([edit_seed(&imgs[0], &imgs[3])])
    .collect()
}

/// A multipart/form-data body of POST /v1/images/edits (boundary `lavitBOUNDARY`): two
/// images and the other fields.
fn edit_seed(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut field = |name: &str, file: Option<&str>, data: &[u8]| {
        out.extend_from_slice(b"--lavitBOUNDARY\r\n");
        let disp = match file {
            Some(f) => format!("form-data; name=\"{name}\"; filename=\"{f}\""),
            None => format!("form-data; name=\"{name}\""),
        };
        out.extend_from_slice(format!("Content-Disposition: {disp}\r\n\r\n").as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    };
    field("image[]", Some("a.png"), a);
    field("image[]", Some("b.gif"), b);
    field("prompt", None, b"It is running in the snow");
    field("n", None, b"2");
    field("size", None, b"64x64");
    field("response_format", None, b"b64_json");
    out.extend_from_slice(b"--lavitBOUNDARY--\r\n");
    out
}

// ------------------------------------------------------------------------- tests

/// A temp folder in memory when the machine has one (`/dev/shm`): the file targets write
/// one file per case, and a busy disk would dominate their time.
fn fast_tmp() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(t) = tempfile::tempdir_in(shm) {
            return t;
        }
    }
    tempfile::tempdir().unwrap()
}

// One #[test] per target, so that the harness runs them in parallel (the whole set finishes in
// about the time of the slowest target, `torch_zip`).

#[test]
fn fuzz_pickle_reader() {
    run_target("pickle", 1, &pickle_seeds(), cases(), pickle_target);
}

/// One config validator: half the cases hostile numbers in valid JSON, half raw byte
/// mutations.
fn fuzz_config(kind: ConfigKind, i: u64) {
    let tmp = fast_tmp();
    let seeds = config_seeds(kind);
    let mut rng = Rng::new(100 + i);
    let name = format!("config-{kind:?}").to_lowercase();
    run_target(&name, 6 + i, &seeds, cases(), |d| {
        let input = if rng.below(2) == 0 {
            let s = rng.below(seeds.len());
            mutate_json_numbers(&mut rng, &seeds[s])
        } else {
            d.to_vec()
        };
        config_target(tmp.path(), kind, &input)
    });
}
