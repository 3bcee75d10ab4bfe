//! The demo's evaluation through the assembled checkpoint's pipeline: captions, text →
//! image (judged and reranked), reconstructions, the selection measurement.

use super::*;

/// What the evaluation measured.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct EvalResult {
    /// Caption names the right class, on held-out images.
    pub caption_accuracy: f64,
    /// A few (label, caption) examples.
    pub caption_examples: Vec<(usize, String)>,
    /// Generated images (after reranking) the judge labels as the prompted class.
    pub t2i_accuracy: f64,
    /// The same over every candidate, before reranking: `lavit generate` with the
    /// checkpoint's defaults.
    #[serde(default)]
    pub t2i_accuracy_unranked: f64,
    /// Text → image with prompts phrased as training never phrased them (held-out
    /// templates; plurals, label names, capitals, article mistakes), `lavit generate`'s
    /// defaults, no reranking: judged right.
    #[serde(default)]
    pub t2i_held_out_accuracy: f64,
    /// (prompt, class, images judged right, images) of the held-out phrasings.
    #[serde(default)]
    pub t2i_held_out_prompts: Vec<(String, usize, usize, usize)>,
    /// Reconstructions of held-out images (image → tokens → pixel decoder) the judge labels as
    /// the original's class: what the decoder can draw from the tokens at best.
    pub reconstruction_accuracy: f64,
    /// Per class: (caption accuracy, t2i accuracy).
    pub per_class: Vec<(f64, f64)>,
    /// Held-out token counts per class.
    pub token_counts: Vec<Vec<i64>>,
    pub mean_kept_ratio: f64,
    /// What the selector keeps on the held-out photos, and where, with the checkpoint's
    /// default selection, through the pipeline.
    #[serde(default)]
    pub selection: crate::demo::selection::SelectionFigures,
    /// Multimodal synthesis from held-out photos ([`crate::demo::synthesis::measure`]).
    #[serde(default)]
    pub synthesis: crate::demo::synthesis::SynthesisFigures,
}

/// Evaluates the assembled checkpoint through the one inference path, a [`Pipeline`] of its
/// five stages (each loaded by its own stage loader, as `lavit serve` loads them), and writes
/// the report's image grids into `report_dir`. The judge and the reranker (stage 0's class
/// head on the checkpoint's frozen ViT) are the demo's own classifiers, not LaVIT inference.
pub fn evaluate(
    ckpt: &Path,
    cfg: &EvalConfig,
    eval: &Split,
    judge: &crate::demo::judge::Judge,
    reranker: &crate::demo::stage0::Heads,
    seed: u64,
    report_dir: &Path,
) -> anyhow::Result<EvalResult> {
    use crate::pipeline::{Pipeline, PipelineConfig, StageSet};
    use lavit_runtime::actors::Input;
    use lavit_runtime::messages::{CaptionOptions, GenerateOptions, Output, Task};
    let _g = tch::no_grad_guard();
    let m = LavitManifest::for_checkpoint(ckpt)?;
    let size = m.tokenizer.img_size;
    let pipe = Pipeline::build(&PipelineConfig {
        checkpoint: Some(ckpt.to_path_buf()),
        stages: StageSet::Checkpoint,
        pixel_decoding: "lowres".into(),
        ..PipelineConfig::default()
    })
    .with_context(|| format!("loading {}", ckpt.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let run = |task: Task, input: Input| -> anyhow::Result<Output> {
        let what = task.name();
        rt.block_on(pipe.run(task, input))
            .map_err(|e| anyhow::anyhow!("evaluation {what}: {e}"))
    };
    let tokenize = |x: Tensor| -> anyhow::Result<Vec<Vec<i64>>> {
        match run(Task::Tokenize, Input::Images(x))? {
            Output::VisualIds(ids) => Ok(ids),
            other => anyhow::bail!("tokenize answered {other:?}"),
        }
    };
    // ids and keep masks, as `/v1/tokenize` with `keep_mask` answers
    type IdsAndMasks = (Vec<Vec<i64>>, Vec<Vec<u8>>);
    let select = |x: Tensor| -> anyhow::Result<IdsAndMasks> {
        match run(Task::Select { selection: None }, Input::Images(x))? {
            Output::Selection { ids, keep } => Ok((
                ids,
                keep.iter()
                    .map(|row| row.iter().map(|&k| k as u8).collect())
                    .collect(),
            )),
            other => anyhow::bail!("select answered {other:?}"),
        }
    };
    let pixels_of = |out: Output| -> anyhow::Result<Tensor> {
        match out {
            // (b, 3, S, S) float32 in [0, 1]
            Output::Pixels { images, .. } => Ok(images),
            other => anyhow::bail!("expected images, got {other:?}"),
        }
    };
    // generated pixels (b, 3, S, S) in [0, 1] as the judge reads them: grey, (b, 1, 28, 28)
    let judge_input =
        |images: &Tensor| data::from_pixel_space(&images.mean_dim(1, true, Kind::Float), size);
    let mut res = EvalResult {
        token_counts: vec![Vec::new(); 10],
        per_class: vec![(0.0, 0.0); 10],
        ..Default::default()
    };

    // Captions + token counts on every held-out image, 64 images per request (the Llm stage
    // decodes a request's captions as one batch).
    let copts = CaptionOptions {
        max_new_tokens: m.generation.caption_max_new_tokens.max(1) as usize,
        ..CaptionOptions::default()
    };
    let all: Vec<usize> = (0..eval.len()).collect();
    let mut ok = [0usize; 10];
    let n_class = eval.class_counts();
    let bar = crate::demo::progress::Progress::new("eval caption", eval.len().div_ceil(64) as u64);
    let mut kept_total = 0i64;
    let mut masks = Vec::with_capacity(eval.len());
    for chunk in all.chunks(64) {
        let x = to_model_input(&eval.batch_unit(chunk), size);
        let (ids, keep) = select(x.shallow_clone())?;
        masks.extend(keep);
        let texts = rt
            .block_on(pipe.captions(x, "", copts.clone()))
            .map_err(|e| anyhow::anyhow!("evaluation captions: {e}"))?;
        anyhow::ensure!(
            ids.len() == chunk.len() && texts.len() == chunk.len(),
            "{} images gave {} token lists and {} captions",
            chunk.len(),
            ids.len(),
            texts.len()
        );
        for ((&i, v), text) in chunk.iter().zip(&ids).zip(texts) {
            let label = eval.labels[i] as usize;
            let n = v.len() as i64;
            res.token_counts[label].push(n);
            kept_total += n;
            if data::class_of_caption(&text) == Some(label) {
                ok[label] += 1;
            }
            if res.caption_examples.len() < 20 && i % 7 == 0 {
                res.caption_examples.push((label, text));
            }
        }
        bar.tick(String::new());
    }
    bar.finish();
    res.mean_kept_ratio =
        kept_total as f64 / (eval.len() as f64 * m.tokenizer.num_patches() as f64);
    res.caption_accuracy = ok.iter().sum::<usize>() as f64 / eval.len().max(1) as f64;
    let garment = crate::demo::selection::split_garment(eval, m.tokenizer.patch_size as usize);
    res.selection = crate::demo::selection::figures(&masks, &garment);
    crate::demo::selection::write_kept_grid(
        &report_dir.join("selection.png"),
        eval,
        &masks,
        m.tokenizer.patch_size as usize,
        3,
    )?;

    // Reconstructions: image → tokens → feature decoder → U-Net, judged; the first two of
    // each class go into the grid next to their originals.
    let per = cfg.reconstructions_per_class.max(2);
    let pick: Vec<usize> = (0..10)
        .flat_map(|c| {
            eval.labels
                .iter()
                .enumerate()
                .filter(move |(_, l)| **l as usize == c)
                .take(per)
                .map(|(i, _)| i)
        })
        .collect();
    // an image whose selector kept no patch has nothing to decode: it counts as wrong and is
    // left out of the grid
    let all_ids = tokenize(to_model_input(&eval.batch_unit(&pick), size))?;
    let kept_pick: Vec<usize> = pick
        .iter()
        .zip(&all_ids)
        .filter(|(_, v)| !v.is_empty())
        .map(|(&i, _)| i)
        .collect();
    anyhow::ensure!(
        !kept_pick.is_empty(),
        "the tokenizer kept no token of any held-out image"
    );
    let (width, height) = pipe.info().default_size;
    let decode = GenerateOptions {
        steps: cfg.ddim_steps,
        guidance: cfg.decoder_guidance,
        seed,
        width,
        height,
        ..GenerateOptions::default()
    };
    let mut rec = Vec::new();
    let bar = crate::demo::progress::Progress::new(
        "eval reconstruct",
        kept_pick.len().div_ceil(50) as u64,
    );
    for chunk in kept_pick.chunks(50) {
        let x = to_model_input(&eval.batch_unit(chunk), size);
        let task = Task::Reconstruct {
            opts: decode.clone(),
        };
        rec.push(pixels_of(run(task, Input::Images(x))?)?);
        bar.tick(String::new());
    }
    bar.finish();
    let rec = Tensor::cat(&rec, 0);
    let pred = judge.predict(&judge_input(&rec))?;
    let hits = kept_pick
        .iter()
        .zip(&pred)
        .filter(|(&i, &p)| eval.labels[i] as usize == p)
        .count();
    res.reconstruction_accuracy = hits as f64 / pick.len().max(1) as f64;
    tracing::info!(
        "reconstructions judged as the original's class: {:.1} %",
        res.reconstruction_accuracy * 100.0
    );
    let grid_rows: Vec<i64> = kept_pick
        .iter()
        .enumerate()
        .filter(|(j, &i)| {
            let c = eval.labels[i];
            kept_pick[..*j]
                .iter()
                .filter(|&&k| eval.labels[k] == c)
                .count()
                < 2
        })
        .map(|(j, _)| j as i64)
        .collect();
    let shown: Vec<usize> = grid_rows.iter().map(|&j| kept_pick[j as usize]).collect();
    let orig = to_pixel_space(&eval.batch_unit(&shown), size).repeat([1, 3, 1, 1]);
    let rec_shown = rec.index_select(0, &Tensor::from_slice(&grid_rows));
    let both = Tensor::stack(&[orig, rec_shown], 1).flatten(0, 1); // (2B, 3, S, S)
    crate::demo::report::write_grid(&report_dir.join("reconstructions.png"), &both, 8, 3)?;

    // Text → image: per class prompt, LLM tokens with CFG → feature decoder → U-Net; k
    // candidates per image reranked by stage 0's class head on the frozen ViT; judged.
    let eva = lavit_encoder::stage::load_eva(ckpt, Device::Cpu, Kind::Float)?;
    let k = cfg.rerank_candidates.max(1);
    let gen = GenerateOptions {
        n: (cfg.images_per_class.max(1) * k) as usize,
        llm_guidance: cfg.llm_guidance,
        top_k: cfg.top_k.max(0) as usize,
        temperature: cfg.temperature,
        top_p: 1.0,
        max_tokens: Some(m.generation.t2i_max_new_tokens.max(1) as usize),
        min_tokens: Some(m.generation.t2i_min_new_tokens.max(0) as usize),
        ..decode.clone()
    };
    let mut grids = Vec::new();
    let (mut t2i_ok, mut unranked_ok) = (0usize, 0usize);
    let bar = crate::demo::progress::Progress::new("eval generate", 10);
    for c in 0..10 {
        let prompt = caption(c, 0);
        let task = Task::Generate { opts: gen.clone() };
        let images = pixels_of(run(task, Input::Prompt(prompt.clone()))?)?; // (n·k, 3, S, S)
        let unit = judge_input(&images); // (n·k, 1, 28, 28)
        let pred = judge.predict(&unit)?;
        unranked_ok += pred.iter().filter(|&&p| p == c).count();
        // the reranker sees the images as the tokenizer does (its frozen ViT + stage-0 head)
        let feats = eva.patch_features(&to_model_input(&unit, size))?;
        let score = reranker
            .class_logits(&feats)
            .log_softmax(-1, Kind::Float)
            .select(1, c as i64)
            .view([-1, k]); // (n, k)
        let best = score.argmax(1, false)
            + Tensor::arange(cfg.images_per_class, (Kind::Int64, Device::Cpu)) * k; // (n,)
        let best_v = Vec::<i64>::try_from(&best)?;
        let hits = best_v.iter().filter(|&&i| pred[i as usize] == c).count();
        t2i_ok += hits;
        res.per_class[c] = (
            ok[c] as f64 / n_class[c].max(1) as f64,
            hits as f64 / best_v.len().max(1) as f64,
        );
        grids.push(images.index_select(0, &best));
        bar.tick(format!("{prompt}: {hits}/{}", best_v.len()));
    }
    bar.finish();
    // Held-out phrasings: two per class, `lavit generate`'s defaults, every image judged.
    let plain = GenerateOptions {
        n: cfg.images_per_class.max(1) as usize,
        ..gen.clone()
    };
    let bar = crate::demo::progress::Progress::new("eval held-out phrasings", 20);
    let (mut held_ok, mut held_n) = (0usize, 0usize);
    for c in 0..10 {
        for v in 0..2u64 {
            let prompt = data::held_out_prompt(c, 2 * c as u64 + v);
            let task = Task::Generate {
                opts: plain.clone(),
            };
            let images = pixels_of(run(task, Input::Prompt(prompt.clone()))?)?;
            let pred = judge.predict(&judge_input(&images))?;
            let hits = pred.iter().filter(|&&p| p == c).count();
            held_ok += hits;
            held_n += pred.len();
            bar.tick(format!("{prompt}: {hits}/{}", pred.len()));
            res.t2i_held_out_prompts.push((prompt, c, hits, pred.len()));
        }
    }
    bar.finish();
    res.t2i_held_out_accuracy = held_ok as f64 / held_n.max(1) as f64;
    tracing::info!(
        "text → image with held-out phrasings (lavit generate's defaults): {:.1} %",
        res.t2i_held_out_accuracy * 100.0
    );
    res.t2i_accuracy = t2i_ok as f64 / (10 * cfg.images_per_class).max(1) as f64;
    res.t2i_accuracy_unranked = unranked_ok as f64 / (10 * cfg.images_per_class * k).max(1) as f64;
    let grid = Tensor::cat(&grids, 0);
    crate::demo::report::write_grid(
        &report_dir.join("generated.png"),
        &grid,
        cfg.images_per_class as usize,
        3,
    )?;
    // Image → image: held-out photos as prompts (multimodal synthesis), the checkpoint's
    // defaults, judged.
    if cfg.synthesis_photos > 0 {
        let idx: Vec<usize> = (0..eval.len().min(cfg.synthesis_photos)).collect();
        let labels: Vec<usize> = idx.iter().map(|&i| eval.labels[i] as usize).collect();
        res.synthesis = crate::demo::synthesis::measure(
            &pipe,
            &rt,
            &eval.batch_unit(&idx),
            &labels,
            judge,
            cfg.synthesis_with_text,
            seed,
            None,
            report_dir,
        )?;
    }
    Ok(res)
}
