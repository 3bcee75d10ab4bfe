//! Benchmark (criterion): one CFG-batched U-Net step (batch 2) on the CPU.
//!
//! Always: the tiny fixture's SD-1.5-shaped U-Net (`../shared/fixtures/tiny-lavit/
//! pixel_decoding/unet`) on seeded random inputs. With `LAVIT_UNET_BENCH_DIR` set to the folder
//! `benches/unet_step_reference.py` wrote (PyTorch eager + diffusers on the same configs and
//! weights), also its `tiny` and `mid` configs, each first checked against the diffusers output,
//! with PyTorch's own median time printed beside for comparison.
//!
//! ```text
//! cargo bench --bench unet_step                                  # the fixture's U-Net
//! .venv/bin/python benches/unet_step_reference.py /tmp/unet-bench --threads 2
//! LAVIT_UNET_BENCH_DIR=/tmp/unet-bench cargo bench --bench unet_step
//! ```
//! `LAVIT_BENCH_THREADS` sets libtorch's intra-op threads (default 2).

// A benchmark stops at the first failure: unwrap/expect (denied in library code) are fine here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use lavit_decoder::{AddedCond, UNet2DConditionModel};
use lavit_runtime::checkpoint;
use tch::{Device, Kind, Tensor};

fn fixture_unet() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/tiny-lavit/pixel_decoding/unet")
}

/// The fixture's U-Net on random inputs shaped by its config.
fn bench_fixture(c: &mut Criterion) {
    let dir = fixture_unet();
    if !dir.join("config.json").is_file() {
        eprintln!("unet_step: no fixture at {} — skipped", dir.display());
        return;
    }
    let (_vs, unet) = UNet2DConditionModel::from_pretrained(&dir, Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let cfg = &unet.config;
    let side = cfg.sample_size.unwrap_or(8);
    tch::manual_seed(0);
    let sample = Tensor::randn([2, cfg.in_channels, side, side], (Kind::Float, Device::Cpu));
    let timestep = Tensor::from(500i64);
    let cond = Tensor::randn([2, 16, cfg.cross_attention_dim], (Kind::Float, Device::Cpu));
    c.bench_function("unet_step/fixture", |b| {
        b.iter(|| {
            unet.forward(&sample, &timestep, &cond, None, None)
                .expect("U-Net forward")
        })
    });
}

/// The reference configs: output check against diffusers, then the timing.
fn bench_reference(c: &mut Criterion, dir: &Path) {
    let torch_ms: serde_json::Value = std::fs::read_to_string(dir.join("pytorch_ms.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for name in ["tiny", "mid"] {
        let d = dir.join(name);
        let (_vs, unet) = UNet2DConditionModel::from_pretrained(&d, Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        let io = checkpoint::load_file(&d.join("io.safetensors"))
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()));
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
                io.get("encoder_attention_mask"),
                added.as_ref(),
            )
            .expect("U-Net forward")
        };
        let err = (&run() - &io["out"]).abs().max().double_value(&[]);
        println!(
            "unet_step/{name}: max|err| vs diffusers {err:.2e}; PyTorch eager {} ms",
            torch_ms[name].as_f64().unwrap_or(f64::NAN)
        );
        assert!(err < 1e-3, "{name}: output differs from diffusers by {err}");
        c.bench_function(&format!("unet_step/{name}"), |b| b.iter(run));
    }
}

fn benches(c: &mut Criterion) {
    let threads = std::env::var("LAVIT_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    tch::set_num_threads(threads);
    let _g = tch::no_grad_guard();
    bench_fixture(c);
    if let Some(dir) = std::env::var_os("LAVIT_UNET_BENCH_DIR") {
        bench_reference(c, Path::new(&dir));
    }
}

criterion_group! {
    name = unet;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(unet);
