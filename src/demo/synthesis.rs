//! The demo's measurement of multimodal synthesis (image and text parts → image, the official
//! `multimodal_synthesis`, through [`Pipeline::synthesize`]'s task): image-only prompts of
//! held-out photos drawn with the checkpoint's defaults and judged by the demo's judge (is
//! the drawing the photo's class?), and [photo, "a photo of a <other class>"] prompts, shown
//! as a picture grid with what the judge sees in each (no target).

use std::path::Path;

use anyhow::Context;
use lavit_runtime::actors::Input;
use lavit_runtime::messages::{GenerateOptions, Output, SynthesisPart, Task};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::data;
use super::judge::Judge;
use crate::pipeline::Pipeline;

/// What the measurement found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SynthesisFigures {
    /// Image-only prompts whose drawing the judge labels as the photo's class.
    pub image_only_accuracy: f64,
    /// Photos drawn from (image-only prompts).
    pub photos: usize,
    /// The LLM guidance they were drawn with (the checkpoint's synthesis default).
    pub llm_guidance: f64,
    /// [photo, "a photo of a <other class>"]: (photo's class, prompted class, judged class).
    pub image_text: Vec<(usize, usize, usize)>,
}

/// Requests in flight at once (within the pipeline's default admission).
const WAVE: usize = 16;

/// One drawing per prompt (its parts, the photo of each image part in `photos`), each request
/// on its own seed, `WAVE` at a time through the pipeline: the drawings (B, 3, S, S) in [0, 1].
fn draw(
    pipe: &Pipeline,
    rt: &tokio::runtime::Runtime,
    prompts: &[(Vec<SynthesisPart>, Tensor)],
    opts: &GenerateOptions,
) -> anyhow::Result<Tensor> {
    let mut out = Vec::with_capacity(prompts.len());
    for (w, wave) in prompts.chunks(WAVE).enumerate() {
        let runs = wave.iter().enumerate().map(|(i, (parts, x))| {
            let opts = GenerateOptions {
                n: 1,
                seed: opts.seed + (w * WAVE + i) as u64,
                ..opts.clone()
            };
            let task = Task::Synthesize {
                parts: parts.clone(),
                opts,
            };
            pipe.run(task, Input::Images(x.shallow_clone()))
        });
        for r in rt.block_on(futures::future::join_all(runs)) {
            match r.map_err(|e| anyhow::anyhow!("synthesis: {e}"))? {
                Output::Pixels { images, .. } => out.push(images),
                other => anyhow::bail!("synthesis answered {other:?}"),
            }
        }
    }
    Ok(Tensor::cat(&out, 0))
}

/// Draws from held-out `photos` ((B, 1, 28, 28) in [0, 1], classes `labels`) with the
/// checkpoint's defaults (`lavit generate --image`'s): every photo alone as the prompt, and
/// the first `image_text` photos followed by "a photo of a <another class>". Writes
/// `synthesis.png` (photo, drawing pairs) and `synthesis_text.png` into `report_dir`.
/// `llm_guidance` replaces the checkpoint's synthesis guidance when given.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    pipe: &Pipeline,
    rt: &tokio::runtime::Runtime,
    photos: &Tensor,
    labels: &[usize],
    judge: &Judge,
    image_text: usize,
    seed: u64,
    llm_guidance: Option<f64>,
    report_dir: &Path,
) -> anyhow::Result<SynthesisFigures> {
    let _g = tch::no_grad_guard();
    let info = pipe.info();
    let size = info.image_size;
    let opts = GenerateOptions {
        n: 1,
        seed,
        llm_guidance: llm_guidance.unwrap_or(info.synthesis.llm_guidance),
        ..info.generate_defaults.clone()
    };
    let x = data::to_model_input(photos, size); // (B, 3, S, S), CLIP-normalised
    let b = labels.len();
    anyhow::ensure!(
        x.size()[0] == b as i64,
        "{b} labels for {:?} photos",
        x.size()
    );
    let judged = |images: &Tensor| -> anyhow::Result<Vec<usize>> {
        let grey = data::from_pixel_space(&images.mean_dim(1, true, Kind::Float), size);
        judge.predict(&grey)
    };
    let shown = |idx: usize, drawn: &Tensor| -> Tensor {
        let n = idx.min(drawn.size()[0] as usize) as i64;
        let orig = data::to_pixel_space(&photos.narrow(0, 0, n), size).repeat([1, 3, 1, 1]);
        Tensor::stack(&[orig, drawn.narrow(0, 0, n)], 1).flatten(0, 1) // (2n, 3, S, S)
    };

    let alone: Vec<(Vec<SynthesisPart>, Tensor)> = (0..b as i64)
        .map(|i| (vec![SynthesisPart::Image], x.narrow(0, i, 1)))
        .collect();
    let drawn = draw(pipe, rt, &alone, &opts).context("image-only prompts")?;
    let pred = judged(&drawn)?;
    let hits = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    super::report::write_grid(&report_dir.join("synthesis.png"), &shown(40, &drawn), 10, 3)?;

    let k = image_text.min(b);
    let mixed: Vec<(Vec<SynthesisPart>, Tensor)> = (0..k)
        .map(|i| {
            let other = (labels[i] + 1 + i % 9) % 10;
            let parts = vec![
                SynthesisPart::Image,
                SynthesisPart::Text(data::caption(other, 0)),
            ];
            (parts, x.narrow(0, i as i64, 1))
        })
        .collect();
    let mut figures = SynthesisFigures {
        image_only_accuracy: hits as f64 / b.max(1) as f64,
        photos: b,
        llm_guidance: opts.llm_guidance,
        image_text: Vec::new(),
    };
    if k > 0 {
        let drawn = draw(pipe, rt, &mixed, &opts).context("image + text prompts")?;
        let pred = judged(&drawn)?;
        figures.image_text = (0..k)
            .map(|i| (labels[i], (labels[i] + 1 + i % 9) % 10, pred[i]))
            .collect();
        super::report::write_grid(
            &report_dir.join("synthesis_text.png"),
            &shown(k, &drawn),
            10,
            3,
        )?;
    }
    tracing::info!(
        "image → image (multimodal synthesis, image-only prompts, guidance {}): {hits}/{b} \
         judged the photo's class",
        opts.llm_guidance
    );
    Ok(figures)
}
