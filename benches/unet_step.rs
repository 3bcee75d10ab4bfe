//! Benchmark: ms per CFG-batched U-Net step (batch 2) on CPU, side by side with PyTorch eager
//! + diffusers on the same configs and weights, and an output check against diffusers.
//!
//! ```text
//! .venv/bin/python benches/unet_step_reference.py /tmp/unet-bench --threads 2
//! cargo bench --bench unet_step -- /tmp/unet-bench --threads 2
//! ```
//! The Python script writes each config as a diffusers folder with its inputs and output
//! (`io.safetensors`) and its own timing (`pytorch_ms.json`).

use std::path::PathBuf;
use std::time::Instant;

use lavit_decoder::{AddedCond, UNet2DConditionModel};
use lavit_runtime::checkpoint;
use tch::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.iter()
            .skip(1)
            .find(|a| !a.starts_with("--"))
            .ok_or_else(|| anyhow::anyhow!("usage: unet_step DIR [--threads N]"))?,
    );
    let threads: i32 = match args.iter().position(|a| a == "--threads") {
        Some(i) => args.get(i + 1).map_or(Ok(2), |s| s.parse())?,
        None => 2,
    };
    tch::set_num_threads(threads);
    let torch_ms: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pytorch_ms.json"))?)?;
    let _g = tch::no_grad_guard();
    println!("config  lavit-rs ms  pytorch ms  ratio  max|err| vs diffusers");
    for name in ["tiny", "mid"] {
        let d = dir.join(name);
        let (_vs, unet) = UNet2DConditionModel::from_pretrained(&d, Device::Cpu)?;
        let io = checkpoint::load_file(&d.join("io.safetensors"))?;
        let (te, ti) = (io.get("text_embeds"), io.get("time_ids"));
        let added = match (te, ti) {
            (Some(text_embeds), Some(time_ids)) => Some(AddedCond {
                text_embeds,
                time_ids,
            }),
            _ => None,
        };
        let run = || -> anyhow::Result<Tensor> {
            Ok(unet.forward(
                &io["sample"],
                &io["timestep"],
                &io["encoder_hidden_states"],
                io.get("encoder_attention_mask"),
                added.as_ref(),
            )?)
        };
        let out = run()?;
        let err = (&out - &io["out"]).abs().max().double_value(&[]);
        let n = if name == "mid" { 5 } else { 20 };
        let mut times = Vec::new();
        for _ in 0..n {
            let t0 = Instant::now();
            let _ = run()?;
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let ours = times[n / 2];
        let theirs = torch_ms[name].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:6}  {ours:11.2}  {theirs:10.2}  {:5.2}  {err:.2e}",
            ours / theirs
        );
    }
    Ok(())
}
