//! The demo's held-out set in the file formats `lavit eval` reads, so the standard metrics run
//! on the demo checkpoint: `lavit eval --checkpoint OUT/checkpoint --data OUT/eval-data`.
//!
//! - `images/NNNN.png`: the held-out photos (also the real images FID compares with);
//! - `captions.jsonl`: each photo with its class in every caption template as references;
//! - `vqa.jsonl`: "what is shown?" with the class name as the ten human answers;
//! - `prompts.jsonl`: the text→image prompt of each class (`label` = class index), as many
//!   rounds over the classes as asked;
//! - `judge.safetensors`: the independent judge, the default FID embedding.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use super::data::{caption, Split, CLASS_NAMES, SIDE, TEMPLATES};

/// The VQA question written for every held-out photo.
pub const QUESTION: &str = "What is shown in the picture?";

/// Writes the files into `dir` (created); `judge` is copied when given.
pub fn write(
    eval: &Split,
    prompts_per_class: usize,
    judge: Option<&Path>,
    dir: &Path,
) -> anyhow::Result<()> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let mut captions = Vec::new();
    let mut vqa = Vec::new();
    for i in 0..eval.len() {
        let name = format!("images/{i:04}.png");
        let img = image::GrayImage::from_raw(SIDE as u32, SIDE as u32, eval.image(i).to_vec())
            .context("held-out image size")?;
        img.save(dir.join(&name))
            .with_context(|| format!("writing {}", dir.join(&name).display()))?;
        let label = eval.labels[i] as usize;
        let refs: Vec<String> = (0..TEMPLATES.len()).map(|t| caption(label, t)).collect();
        writeln!(
            captions,
            "{}",
            serde_json::json!({"image": name, "captions": refs})
        )?;
        writeln!(
            vqa,
            "{}",
            serde_json::json!({"image": name, "question": QUESTION, "answers": vec![CLASS_NAMES[label]; 10]})
        )?;
    }
    let mut prompts = Vec::new();
    // class after class, round after round: the first k lines cover every class
    for _ in 0..prompts_per_class.max(1) {
        for c in 0..CLASS_NAMES.len() {
            writeln!(
                prompts,
                "{}",
                serde_json::json!({"prompt": caption(c, 0), "label": c})
            )?;
        }
    }
    let put = |name: &str, bytes: &[u8]| {
        lavit_runtime::checkpoint::atomic_write(&dir.join(name), bytes)
            .with_context(|| format!("writing {}", dir.join(name).display()))
    };
    put("captions.jsonl", &captions)?;
    put("vqa.jsonl", &vqa)?;
    put("prompts.jsonl", &prompts)?;
    if let Some(j) = judge {
        std::fs::copy(j, dir.join("judge.safetensors"))
            .with_context(|| format!("copying {}", j.display()))?;
    }
    Ok(())
}
