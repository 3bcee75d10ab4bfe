//! `lavit tokenize --checkpoint DIR IMAGE...`: one JSON line per image with the token count
//! and the visual ids (LLM vocabulary, i.e. with `visual_token_offset`), through the
//! pipeline's tokenizer stages. Keep/drop decisions as the checkpoint's manifest says
//! (`tokenizer.selection`, `tokenizer.selection_seed`) unless `--selection` / `--seed` (or the
//! config's `[pipeline]` `selection` / `selection_seed`) override them — the same answer the
//! server and the library give for the same image and checkpoint. In Gumbel mode every image
//! draws the same noise from the seed, so an image's ids do not depend on the other images.

use std::path::PathBuf;

use lavit::pipeline::StageSet;

/// Arguments of `lavit tokenize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// LaVIT checkpoint folder (official layout).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// A config file whose `[plugins]` / `[pipeline]` sections name the plugin backbone /
    /// codebook, the placement and the selection (the serving config); without it, the
    /// built-in parts. The plugins named there are native code loaded into this process,
    /// trusted like any shared library.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Keep/drop decisions: `manifest` (the checkpoint's `tokenizer.selection`), `argmax`
    /// or `gumbel` (the official sampling). Default: the config's `pipeline.selection`,
    /// else `manifest`.
    #[arg(long, value_parser = ["manifest", "argmax", "gumbel"])]
    pub selection: Option<String>,
    /// Seed of the Gumbel noise. Default: the config's `pipeline.selection_seed`, else the
    /// manifest's `tokenizer.selection_seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Device of every stage: cpu, cuda, cuda:N (default: the config's placement, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Image files (PNG, JPEG, BMP, GIF).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let images = args
        .images
        .iter()
        .map(|p| super::read_image(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (pipe, rt) = super::one_shot(
        &args.checkpoint,
        args.config.as_deref(),
        args.device.as_deref(),
        StageSet::Tokenizer,
        |c| {
            if let Some(s) = &args.selection {
                c.selection = s.clone();
            }
            if let Some(seed) = args.seed {
                c.selection_seed = Some(seed);
            }
        },
    )?;
    let sel = pipe.info().selection;
    tracing::info!(
        selection = sel.selection.name(),
        seed = sel.seed,
        "tokenizing"
    );
    let ids = rt.block_on(pipe.tokenize(&images))?;
    for (path, ids) in args.images.iter().zip(ids) {
        let line = serde_json::json!({
            "image": path.display().to_string(),
            "count": ids.len(),
            "ids": ids,
        });
        println!("{line}");
    }
    Ok(())
}
