//! Embedding LaVIT in your own tokio application: build the pipeline (five stage actors, each
//! on its own thread and device), then tokenize, caption, generate and synthesize (image + text
//! → image) concurrently.
//!
//! ```text
//! cargo run --example pipeline                                   # mock stages, no weights
//! cargo run --example pipeline -- configs/serve.toml CHECKPOINT  # the real models
//! ```

use std::sync::Arc;

use lavit::pipeline::messages::{CaptionOptions, GenerateOptions};
use lavit::pipeline::{Part, Pipeline, PipelineConfig, StageSet};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match args.first() {
        Some(path) => {
            let mut cfg = PipelineConfig::from_file(path.as_ref())?;
            if let Some(ckpt) = args.get(1) {
                cfg.checkpoint = Some(ckpt.into());
            }
            cfg
        }
        None => PipelineConfig {
            stages: StageSet::Mock,
            ..PipelineConfig::default()
        },
    };
    // Building loads every stage's weights on its own thread; it blocks, so do it off the
    // async executor.
    let pipe = Arc::new(tokio::task::spawn_blocking(move || Pipeline::build(&cfg)).await??);
    let size = pipe.info().image_size as u32;
    let photo = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([(x * 255 / size) as u8, (y * 255 / size) as u8, 128])
    }));

    // Three different requests in flight at once: the encoder, the LLM and the decoder work on
    // different requests at the same time.
    let (p1, p2, p3) = (pipe.clone(), pipe.clone(), pipe.clone());
    let (img1, img2) = (photo.clone(), photo.clone());
    let tokens = tokio::spawn(async move { p1.tokenize(&[img1]).await });
    let caption = tokio::spawn(async move {
        p2.caption(&img2, "What is in the picture?", CaptionOptions::default())
            .await
    });
    let drawing = tokio::spawn(async move {
        let (width, height) = p3.info().default_size;
        let opts = GenerateOptions {
            steps: 4,
            width,
            height,
            ..GenerateOptions::default()
        };
        p3.generate("a photo of a cat", opts).await
    });

    // Image + text → image (LaVIT's multimodal synthesis, the official inference example's
    // [photo, "It is running in the snow"]): the photo is tokenized by the tokenizer stages,
    // its visual ids and the text make the LLM's prompt, in the order of the parts.
    let p4 = pipe.clone();
    let img3 = photo.clone();
    let synthesis = tokio::spawn(async move {
        let (width, height) = p4.info().default_size;
        let opts = GenerateOptions {
            steps: 4,
            width,
            height,
            // The checkpoint's guidance for synthesis (official 5.0).
            llm_guidance: p4.info().synthesis.llm_guidance,
            ..GenerateOptions::default()
        };
        let parts = [
            Part::Image(img3),
            Part::Text("It is running in the snow".into()),
        ];
        p4.synthesize(&parts, opts).await
    });

    let ids = tokens.await??;
    println!("tokenize: {} visual tokens: {:?}", ids[0].len(), ids[0]);
    println!("caption:  {}", caption.await??);
    let images = drawing.await??;
    let out = std::env::temp_dir().join("lavit-example.png");
    images[0].save(&out)?;
    println!(
        "generate: {}x{} → {}",
        images[0].width(),
        images[0].height(),
        out.display()
    );

    let drawn = synthesis.await??;
    let out = std::env::temp_dir().join("lavit-example-synthesis.png");
    drawn.images[0].save(&out)?;
    println!(
        "synthesize: [image, text] → {} image tokens → {}",
        drawn.ids[0].len(),
        out.display()
    );

    // Per-stage timeline of what just ran (the stages' own start/end records).
    let t0 = pipe.graph().records().iter().map(|r| r.start).min();
    for r in pipe.graph().records() {
        let since = |t: std::time::Instant| t0.map_or(0.0, |t0| (t - t0).as_secs_f64() * 1e3);
        println!(
            "  request {:>2} {:<16} {:>8.2} → {:>8.2} ms",
            r.request,
            r.stage.name(),
            since(r.start),
            since(r.end)
        );
    }
    Ok(())
}
