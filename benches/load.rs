//! Benchmark (a bench binary, not criterion): real-size loads in bf16 on the CPU, with the
//! wall time and the peak RSS they add against the bytes of the weight files.
//!
//! ```text
//! cargo bench --bench load -- llama DIR      # a Hugging Face LLaMA folder, from_pretrained
//! cargo bench --bench load -- pipeline DIR   # a LaVIT checkpoint folder, the whole Pipeline
//! ```
//! `scripts/bench-load.sh` writes the folders (random weights) and runs the LLaMA beside
//! `transformers`' `from_pretrained`. Prints one line: `lavit_load ms=<wall>
//! peak_over_baseline=<bytes> weights=<bytes> resident_after_load=<bytes>` (the peak after
//! the load and one use of every weight; the resident set the load itself added).

use std::path::PathBuf;
use std::time::Instant;

use lavit::pipeline::messages::{CaptionOptions, GenerateOptions};
use lavit::pipeline::{Pipeline, PipelineConfig};
use lavit_llm::LlamaForCausalLM;
use tch::{Device, Kind};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A `/proc/self/status` field in bytes (Linux), 0 elsewhere.
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of the weight files (`.safetensors`, `.bin`) under `dir`, recursively, but those
/// `skip` names.
fn weight_bytes(dir: &std::path::Path, skip: &dyn Fn(&std::path::Path) -> bool) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let (p, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            if skip(&p) {
                0
            } else if p.is_dir() {
                weight_bytes(&p, skip)
            } else if name.ends_with(".safetensors") || name.ends_with(".bin") {
                e.metadata().map_or(0, |m| m.len())
            } else {
                0
            }
        })
        .sum()
}

/// The load's wall milliseconds and the resident set after it.
type Loaded = (f64, u64);

/// `LlamaForCausalLM::from_pretrained` in bf16, then one read of every weight.
fn llama(dir: &std::path::Path) -> Res<Loaded> {
    let t0 = Instant::now();
    let (vs, model) = LlamaForCausalLM::from_pretrained(dir, Device::Cpu, Kind::BFloat16)?;
    let loaded = (t0.elapsed().as_secs_f64() * 1000.0, status_bytes("VmRSS:"));
    // The weights may be views of the mapped files, read on first use: read every byte once
    // (as a forward pass would) so they count in the resident set, as the transformers side does.
    tch::no_grad(|| {
        for (_, v) in vs.variables() {
            let _ = v.view_dtype(Kind::Int16).max();
        }
    });
    if model.kind() != Kind::BFloat16 {
        return Err(format!("loaded as {:?}, not bf16", model.kind()).into());
    }
    Ok(loaded)
}

/// The whole pipeline (`dtype = "bf16"`, every stage), as `lavit serve` builds it; then one
/// request of each kind, which uses every weight: tokenize and caption a photo (EVA, selector
/// and merger, quantizer, the understanding head, the LLM), and generate an image at a
/// small size in one step (the LLM, the feature decoder, the U-Net, the VAE).
fn pipeline(dir: &std::path::Path) -> Res<Loaded> {
    let cfg = PipelineConfig {
        checkpoint: Some(dir.to_path_buf()),
        dtype: "bf16".into(),
        ..PipelineConfig::default()
    };
    let t0 = Instant::now();
    let pipe = Pipeline::build(&cfg)?;
    let loaded = (t0.elapsed().as_secs_f64() * 1000.0, status_bytes("VmRSS:"));
    let info = pipe.info().clone();
    let size = info.image_size as u32;
    let photo = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([(x * 255 / size) as u8, (y * 255 / size) as u8, 128])
    }));
    let side = info.size_multiple.max(256).div_ceil(info.size_multiple) * info.size_multiple;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let ids = pipe.tokenize(std::slice::from_ref(&photo)).await?;
        let caption = CaptionOptions {
            max_new_tokens: 2,
            ..Default::default()
        };
        let text = pipe.caption(&photo, "", caption).await?;
        let opts = GenerateOptions {
            steps: 1,
            width: side,
            height: side,
            min_tokens: Some(1),
            max_tokens: Some(2),
            ..info.generate_defaults.clone()
        };
        let images = pipe.generate("a photo", opts).await?;
        eprintln!(
            "tokenize: {} tokens; caption: {text:?}; generate: {}x{}",
            ids[0].len(),
            images[0].width(),
            images[0].height()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    Ok(loaded)
}

fn main() -> Res<()> {
    // `cargo bench` passes `--bench`; then the mode and the folder.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (run, dir): (fn(&std::path::Path) -> Res<Loaded>, _) = match args.as_slice() {
        [m, d] if m == "llama" => (llama, PathBuf::from(d)),
        [m, d] if m == "pipeline" => (pipeline, PathBuf::from(d)),
        _ => {
            eprintln!("usage: cargo bench --bench load -- llama|pipeline DIR");
            return Ok(());
        }
    };
    // A highres pipeline reads neither the lowres feature decoder nor the lowres folder.
    let highres = dir.join("highres_pixel_decoding").is_dir();
    let lowres_only = |p: &std::path::Path| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        highres
            && name.is_some_and(|n| n.starts_with("tokenizer_decoder.") || n == "pixel_decoding")
    };
    let weights = weight_bytes(&dir, &lowres_only);
    let base = status_bytes("VmRSS:");
    let (ms, after_load) = run(&dir)?;
    let peak = status_bytes("VmHWM:");
    println!(
        "lavit_load ms={ms:.0} peak_over_baseline={} weights={weights} resident_after_load={}",
        peak.saturating_sub(base),
        after_load.saturating_sub(base)
    );
    Ok(())
}
