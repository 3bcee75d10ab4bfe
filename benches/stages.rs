//! Benchmark (a bench binary): every stage side by side with PyTorch eager on the same
//! computation, the same weights and the same thread count. `scripts/dev/bench_reference.py`
//! builds the reference modules (transformers, diffusers) at the tiny and mid sizes, saves
//! their folders, inputs and outputs, and times them; this binary loads the same folders with
//! lavit's loaders, checks its outputs against theirs, times the same computation, and prints
//! one line per measurement:
//!
//! ```text
//! bench NAME lavit_ms torch_ms ratio
//! ```
//!
//! Run through `scripts/bench.sh` (which runs both sides) or `scripts/gpu-bench.sh` (official
//! sizes, bf16, on a GPU), or by hand:
//! `cargo bench --bench stages -- DIR [--threads 2] [--only NAME-PREFIX] [--device cuda] [--dtype bf16]`.
//!
//! Cases: `tokenizer_b1` / `tokenizer_b8` (ViT → selector/merger → quantizer, arg-max
//! selection, 1 and 8 images, 64 at the official size; counts must be equal in float32),
//! `llm_prefill_b1` (a 64-token prompt), `llm_decode_b1` / `llm_decode_b2` (ms per new
//! token, greedy with the KV cache, 1 and 2 streams), `llm_decode_b1_SIZE_int8` / `_int4`
//! (the linear layers quantised, against PyTorch's float decoding), `llm_cfg_token` (ms per image token
//! with classifier-free guidance: lavit's one batch of 2 against PyTorch's two batch-1
//! forwards, as the official code runs it), `unet_cfg_step` (CFG batch of 2), `vae_decode`
//! (one latent, float32), `generate` (text → image end to end through `Pipeline::generate`
//! of a LaVIT folder, as `lavit serve` runs it; CPU float32 runs; the picture must match
//! PyTorch's within 2/255 per pixel value). Outputs: last-position prefill logits and U-Net/VAE outputs within
//! a tolerance (1e-3 in float32, 5 % of the largest reference value in bf16; the run stops
//! otherwise); decoded tokens are compared and the share that agrees is printed (argmax ties
//! may flip in the last bits).

// A benchmark stops at the first failure: unwrap/expect (denied in library code) are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use lavit_decoder::{AddedCond, AutoencoderKL, UNet2DConditionModel};
use lavit_llm::modeling_llama::{ForwardArgs, KvCache};
use lavit_llm::LlamaForCausalLM;
use lavit_runtime::checkpoint::{self, StateDict};
use lavit_runtime::manifest::QuantMode;
use tch::{Device, Kind, Tensor};

/// Where and in what one run measures, and what it compares against.
struct Ctx<'a> {
    dir: &'a Path,
    size: &'a str,
    torch: &'a serde_json::Value,
    device: Device,
    kind: Kind,
}

impl Ctx<'_> {
    /// Timed calls per measurement (the PyTorch side takes the same count).
    fn runs(&self) -> usize {
        match self.size {
            "tiny" => 20,
            "mid" => 8,
            _ => 5,
        }
    }

    /// Best of `runs` timed calls after one warm-up, in ms (the least disturbed by other
    /// processes on a shared machine; the PyTorch side takes the same statistic).
    fn best_ms(&self, mut f: impl FnMut()) -> f64 {
        f();
        sync(self.device);
        (0..self.runs())
            .map(|_| {
                let t0 = Instant::now();
                f();
                sync(self.device);
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// A case's io.safetensors on this run's device.
    fn io(&self, d: &Path) -> StateDict {
        checkpoint::load_file(&d.join("io.safetensors"))
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .into_iter()
            .map(|(k, v)| (k, v.to_device(self.device)))
            .collect()
    }

    /// Reports how far lavit's output is from the reference's; beyond `tol` that fails a
    /// computation run in float32 (`kind`), while one in bf16 (other kernels, other rounding of
    /// the same computation: near-ties in sampling and keep decisions can go either way)
    /// prints it and goes on.
    fn agree(&self, what: &str, err: f64, tol: f64, kind: Kind) {
        println!("check {what}: max|err| {err:.2e} (tolerance {tol:.2e})");
        if err >= tol {
            assert!(
                kind != Kind::Float,
                "{what}: differs from the reference by {err} (> {tol})"
            );
            println!("check {what}: beyond the tolerance in {kind:?}, reported only");
        }
    }

    /// The largest |ours − reference| accepted: 1e-3 in float32, 5 % of the reference's
    /// largest magnitude in bf16 (8 mantissa bits).
    fn tolerance(&self, reference: &Tensor, kind: Kind) -> f64 {
        match kind {
            Kind::Float => 1e-3,
            _ => 0.05 * reference.abs().max().double_value(&[]),
        }
    }
}

/// Wait for the device's queued work (timings of CUDA calls end there).
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

fn line(name: &str, ours: f64, torch: &serde_json::Value) {
    let theirs = torch[name].as_f64().unwrap_or(f64::NAN);
    println!("bench {name} {ours:.3} {theirs:.3} {:.2}", ours / theirs);
}

const NEW: usize = 32;

/// One stage's measurements at one size.
type Case = fn(&Ctx);

/// Prefill `ids`, then NEW greedy tokens with the KV cache: (tokens, ms of the NEW − 1 steps).
fn greedy(m: &LlamaForCausalLM, ids: &Tensor) -> (Tensor, f64) {
    let mut cache = KvCache::new();
    let args = ForwardArgs::default();
    let mut next = m
        .forward_last(&m.embed(ids), &args, Some(&mut cache))
        .unwrap_or_else(|e| panic!("{e}"))
        .argmax(-1, true);
    let mut toks = vec![next.shallow_clone()];
    let t0 = Instant::now();
    for _ in 1..NEW {
        next = m
            .forward_last(&m.embed(&next), &args, Some(&mut cache))
            .unwrap_or_else(|e| panic!("{e}"))
            .argmax(-1, true);
        toks.push(next.shallow_clone());
    }
    sync(m.device());
    (Tensor::cat(&toks, 1), t0.elapsed().as_secs_f64() * 1000.0)
}

/// NEW image tokens with classifier-free guidance (scale 4) as lavit's generate runs it: the
/// conditional and the unconditional stream (the two rows of `ids`) in one batch, the guided
/// token fed to both. Ms of the NEW − 1 steps after the prompt.
fn cfg_batched(m: &LlamaForCausalLM, ids: &Tensor) -> f64 {
    let mut cache = KvCache::new();
    let args = ForwardArgs::default();
    let guided = |logits: Tensor| {
        let lsm = logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float);
        let (cond, uncond) = (lsm.get(0), lsm.get(1));
        (&uncond + (cond - &uncond) * 4.0)
            .argmax(-1, false)
            .view([1, 1])
            .repeat([2, 1])
    };
    let mut next = guided(
        m.forward_last(&m.embed(ids), &args, Some(&mut cache))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    sync(m.device());
    let t0 = Instant::now();
    for _ in 1..NEW {
        next = guided(
            m.forward_last(&m.embed(&next), &args, Some(&mut cache))
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    sync(m.device());
    t0.elapsed().as_secs_f64() * 1000.0
}

fn llm(c: &Ctx) {
    let (size, torch) = (c.size, c.torch);
    let d = c.dir.join(format!("llm_{size}"));
    let (_vs, m) = LlamaForCausalLM::from_pretrained(&d, c.device, c.kind)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    let io = c.io(&d);
    let ids1 = &io["ids_b1"];
    let logits = m
        .forward_last(&m.embed(ids1), &ForwardArgs::default(), None)
        .unwrap_or_else(|e| panic!("{e}"));
    let err = max_err(&logits, &io["prefill_logits"]);
    let tol = c.tolerance(&io["prefill_logits"], c.kind);
    c.agree(
        &format!("llm_{size} prefill logits vs transformers"),
        err,
        tol,
        c.kind,
    );
    let ms = c.best_ms(|| {
        let _ = m
            .forward_ids(ids1, &ForwardArgs::default(), None)
            .unwrap_or_else(|e| panic!("{e}"));
    });
    line(&format!("llm_prefill_b1_{size}"), ms, torch);
    for b in ["b1", "b2"] {
        let ids = &io[&format!("ids_{b}")];
        let (toks, _) = greedy(&m, ids);
        let want = &io[&format!("tokens_{b}")];
        let agree = toks.eq_tensor(want).to_kind(Kind::Float).mean(Kind::Float);
        let best = (0..5)
            .map(|_| greedy(&m, ids).1)
            .fold(f64::INFINITY, f64::min);
        println!(
            "check llm_{size} {b}: prefill logits max|err| {err:.1e}; greedy tokens agree {:.0} %",
            100.0 * agree.double_value(&[])
        );
        line(
            &format!("llm_decode_{b}_{size}"),
            best / (NEW - 1) as f64,
            torch,
        );
    }
    let best = (0..3)
        .map(|_| cfg_batched(&m, &io["ids_b2"]))
        .fold(f64::INFINITY, f64::min);
    line(
        &format!("llm_cfg_token_{size}"),
        best / (NEW - 1) as f64,
        torch,
    );
    llm_quantized(c, &d, ids1);
}

/// Batch-1 decoding with the linear layers quantised (int8; int4 where the shapes allow a
/// group size), against PyTorch eager decoding of the float model (`llm_decode_b1_SIZE`):
/// `bench llm_decode_b1_SIZE_int8 lavit_ms torch_ms ratio`, and a check line with the share
/// of greedy tokens equal to the float model's.
fn llm_quantized(c: &Ctx, d: &Path, ids1: &Tensor) {
    let size = c.size;
    let (vs, float) = LlamaForCausalLM::from_pretrained(d, c.device, c.kind).unwrap();
    let (want, _) = greedy(&float, ids1);
    drop((vs, float));
    let cfg = lavit_llm::LlamaConfig::from_json_file(&d.join("config.json")).unwrap();
    let group = [128, 64, 32].into_iter().find(|g| {
        let ok = |n: i64, k: i64| {
            lavit_llm::quantize::unsupported(QuantMode::Int4 { group_size: *g }, n, k).is_none()
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_dim(),
            cfg.kv_heads() * cfg.head_dim(),
        );
        ok(q, h) && ok(kv, h) && ok(h, q) && ok(i, h) && ok(h, i)
    });
    let mut modes = vec![("int8", QuantMode::Int8)];
    if let Some(g) = group {
        modes.push(("int4", QuantMode::Int4 { group_size: g }));
    }
    for (name, mode) in modes {
        // A kernel this device lacks ends this line, not the run (the U-Net and VAE follow).
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_quantized(c, d, ids1, &want, name, mode)
        }));
        if run.is_err() {
            println!("check llm_{size} b1 {mode}: failed on {:?}", c.device);
        }
    }
}

fn decode_quantized(c: &Ctx, d: &Path, ids1: &Tensor, want: &Tensor, name: &str, mode: QuantMode) {
    let size = c.size;
    let (vs, mut m) = LlamaForCausalLM::from_pretrained(d, c.device, c.kind).unwrap();
    m.quantize(&vs, mode).unwrap();
    let (toks, _) = greedy(&m, ids1);
    let agree = toks.eq_tensor(want).to_kind(Kind::Float).mean(Kind::Float);
    println!(
        "check llm_{size} b1 {mode}: greedy tokens agree with float {:.0} %",
        100.0 * agree.double_value(&[])
    );
    let best = (0..5)
        .map(|_| greedy(&m, ids1).1)
        .fold(f64::INFINITY, f64::min);
    let ours = best / (NEW - 1) as f64;
    let theirs = c.torch[format!("llm_decode_b1_{size}")]
        .as_f64()
        .unwrap_or(f64::NAN);
    println!(
        "bench llm_decode_b1_{size}_{name} {ours:.3} {theirs:.3} {:.2}",
        ours / theirs
    );
}

fn unet(c: &Ctx) {
    unet_named(c, c.size);
    // the official size has LaVIT's second (lowres, SD-1.5-shaped) U-Net as well
    let sd15 = format!("{}_sd15", c.size);
    if c.dir.join(format!("unet_{sd15}")).is_dir() {
        unet_named(c, &sd15);
    }
}

fn unet_named(c: &Ctx, size: &str) {
    let d = c.dir.join(format!("unet_{size}"));
    let (_vs, unet) = UNet2DConditionModel::from_pretrained(&d, c.device, c.kind)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    let io = c.io(&d);
    let added = match (io.get("text_embeds"), io.get("time_ids")) {
        (Some(text_embeds), Some(time_ids)) => Some(AddedCond {
            text_embeds,
            time_ids,
        }),
        _ => None,
    };
    let run = || {
        unet.forward(
            &io["sample"],
            &io["timestep"],
            &io["encoder_hidden_states"],
            None,
            added.as_ref(),
        )
        .expect("U-Net forward")
    };
    let err = max_err(&run(), &io["out"]);
    let tol = c.tolerance(&io["out"], c.kind);
    c.agree(&format!("unet_{size} vs diffusers"), err, tol, c.kind);
    let ms = c.best_ms(|| {
        let _ = run();
    });
    line(&format!("unet_cfg_step_{size}"), ms, c.torch);
}

/// The VAE in float32 in any run (the official pipeline upcasts it, as lavit does).
fn vae(c: &Ctx) {
    let size = c.size;
    let d = c.dir.join(format!("vae_{size}"));
    let (_vs, vae) = AutoencoderKL::from_pretrained(&d, c.device)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    let io = c.io(&d);
    let err = max_err(
        &vae.decode(&io["latent"]).unwrap_or_else(|e| panic!("{e}")),
        &io["out"],
    );
    // float32 in every run: always held to its tolerance
    let tol = c.tolerance(&io["out"], Kind::Float);
    c.agree(&format!("vae_{size} vs diffusers"), err, tol, Kind::Float);
    let ms = c.best_ms(|| {
        let _ = vae.decode(&io["latent"]);
    });
    line(&format!("vae_decode_{size}"), ms, c.torch);
}

fn tokenizer(c: &Ctx) {
    use lavit::tokenizer::{LoadParts, VisualTokenizer};
    use lavit_selector::SelectionMode;
    let size = c.size;
    let d = c.dir.join(format!("tokenizer_{size}"));
    let parts = LoadParts {
        kind: c.kind,
        ..LoadParts::tokenize_only()
    };
    let tok = VisualTokenizer::from_checkpoint(&d, c.device, parts)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    let io = c.io(&d);
    let mut batches: Vec<i64> = io
        .keys()
        .filter_map(|k| k.strip_prefix("images_b")?.parse().ok())
        .collect();
    batches.sort();
    for b in batches.iter().map(|b| format!("b{b}")) {
        let images = &io[&format!("images_{b}")];
        let got = tok
            .tokenize_with(images, SelectionMode::Argmax)
            .expect("tokenize");
        let counts: Vec<i64> = Vec::try_from(&io[&format!("token_counts_{b}")]).unwrap();
        let ids: Vec<i64> = Vec::try_from(&io[&format!("token_ids_{b}")]).unwrap();
        let flat: Vec<i64> = got.ids.concat();
        let same = flat.iter().zip(&ids).filter(|(a, b)| a == b).count();
        println!(
            "check tokenizer_{size} {b}: counts equal {}; ids agree {same}/{}",
            got.counts == counts,
            ids.len()
        );
        // bf16 moves keep/drop margins and nearest codes by more than float32's last bits
        if c.kind == Kind::Float {
            assert_eq!(
                got.counts, counts,
                "tokenizer_{size} {b}: token counts differ"
            );
        }
        let ms = c.best_ms(|| {
            let _ = tok.tokenize_with(images, SelectionMode::Argmax);
        });
        line(&format!("tokenizer_{b}_{size}"), ms, c.torch);
    }
}

/// Text → image end to end: `Pipeline::generate` of OUT/lavit_<size> (the whole stage graph,
/// as `lavit serve` runs it) with the settings PyTorch's side used (`generate.json`), greedy
/// image tokens, the picture compared with PyTorch's.
fn generate(c: &Ctx) {
    use lavit::pipeline::messages::GenerateOptions;
    use lavit::pipeline::{Pipeline, PipelineConfig};
    let size = c.size;
    let d = c.dir.join(format!("lavit_{size}"));
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("generate.json")).unwrap()).unwrap();
    let num = |k: &str| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("generate.json: no {k}"))
    };
    let cfg = PipelineConfig {
        checkpoint: Some(d.clone()),
        ..PipelineConfig::default()
    };
    let pipe = Pipeline::build(&cfg).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    let side = num("side") as usize;
    let opts = GenerateOptions {
        steps: num("steps") as usize,
        width: side,
        height: side,
        llm_guidance: num("llm_guidance"),
        guidance: num("guidance"),
        top_k: 1,
        min_tokens: Some(num("tokens") as usize),
        max_tokens: Some(num("tokens") as usize),
        seed: num("seed") as u64,
        ..pipe.info().generate_defaults.clone()
    };
    let prompt = p["prompt"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let run = || {
        rt.block_on(pipe.generate(&prompt, opts.clone()))
            .expect("generate")
    };
    let img = &run()[0];
    let ours = Tensor::from_slice(img.as_raw())
        .view([side as i64, side as i64, 3])
        .permute([2, 0, 1])
        .to_kind(Kind::Float)
        / 255.0;
    let io = c.io(&d);
    let err = max_err(&ours, &io["pixels"].get(0));
    c.agree(
        &format!("generate_{size} picture vs PyTorch"),
        err,
        2.0 / 255.0 + 1e-6,
        c.kind,
    );
    let runs = num("runs") as usize;
    let best = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            let _ = run();
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .fold(f64::INFINITY, f64::min);
    line(&format!("generate_{size}"), best, c.torch);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // `cargo bench` passes `--bench`; the folder is the first other argument that is no value.
    let values: Vec<String> = ["--threads", "--only", "--device", "--dtype"]
        .iter()
        .filter_map(|k| opt(k))
        .collect();
    let Some(dir) = args
        .iter()
        .find(|a| !a.starts_with("--") && !values.contains(a))
    else {
        eprintln!("usage: cargo bench --bench stages -- DIR [--threads N] [--only PREFIX] [--device cpu|cuda] [--dtype f32|bf16] (DIR from scripts/dev/bench_reference.py)");
        return;
    };
    let dir = Path::new(dir);
    let threads = opt("--threads").and_then(|t| t.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    let only = opt("--only").unwrap_or_default();
    let device = match opt("--device").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some(d) => lavit_runtime::device::parse_device(d).expect("--device"),
    };
    let kind = match opt("--dtype").as_deref() {
        None | Some("f32") => Kind::Float,
        Some("bf16") => Kind::BFloat16,
        Some(other) => panic!("--dtype {other}: f32 or bf16"),
    };
    let torch: serde_json::Value = std::fs::read_to_string(dir.join("torch_ms.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_else(|| {
            panic!(
                "{}: no torch_ms.json (run scripts/dev/bench_reference.py)",
                dir.display()
            )
        });
    let _g = tch::no_grad_guard();
    for size in ["tiny", "mid", "official"] {
        if !dir.join(format!("llm_{size}")).is_dir() {
            continue;
        }
        let has = |name: &str| dir.join(format!("{name}_{size}")).is_dir();
        let cases: [(&str, Case); 4] = [
            ("tokenizer", tokenizer),
            ("llm", llm),
            ("unet", unet),
            ("vae", vae),
        ];
        let c = Ctx {
            dir,
            size,
            torch: &torch,
            device,
            kind,
        };
        for (name, run) in cases {
            if has(name) && (name.starts_with(only.as_str()) || only.starts_with(name)) {
                run(&c);
            }
        }
        if has("lavit") && "generate".starts_with(only.as_str()) {
            generate(&c);
        }
    }
}
