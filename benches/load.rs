//! Benchmark (a bench binary, not criterion): load a Hugging Face LLaMA folder in bf16 on the
//! CPU with `LlamaForCausalLM::from_pretrained` and report the wall time and the peak RSS it
//! added, against the bytes of its safetensors files. `scripts/bench-load.sh` writes a
//! LLaMA-2-7B-shaped folder and runs this beside `transformers`' `from_pretrained`.
//!
//! ```text
//! cargo bench --bench llama_load -- DIR
//! ```
//! Prints one line: `lavit_load ms=<wall> peak_over_baseline=<bytes> weights=<bytes>
//! resident_after_load=<bytes>` (the peak after the load and one read of every weight; the
//! resident set the load itself added).

use std::path::PathBuf;
use std::time::Instant;

use lavit_llm::LlamaForCausalLM;
use tch::{Device, Kind};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; the folder is the first other argument.
    let Some(dir) = std::env::args().skip(1).find(|a| !a.starts_with("--")) else {
        eprintln!("usage: cargo bench --bench llama_load -- DIR (a Hugging Face LLaMA folder)");
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    let weights: u64 = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let base = status_bytes("VmRSS:");
    let t0 = Instant::now();
    let (vs, model) = LlamaForCausalLM::from_pretrained(&dir, Device::Cpu, Kind::BFloat16)?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let after_load = status_bytes("VmRSS:");
    // The weights may be views of the mapped files, read on first use: read every byte once
    // (as a forward pass would) so they count in the resident set, as the transformers side does.
    tch::no_grad(|| {
        for (_, v) in vs.variables() {
            let _ = v.view_dtype(Kind::Int16).max();
        }
    });
    let peak = status_bytes("VmHWM:");
    if model.kind() != Kind::BFloat16 {
        return Err(format!("loaded as {:?}, not bf16", model.kind()).into());
    }
    println!(
        "lavit_load ms={ms:.0} peak_over_baseline={} weights={weights} resident_after_load={}",
        peak.saturating_sub(base),
        after_load.saturating_sub(base)
    );
    Ok(())
}
