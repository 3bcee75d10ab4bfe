//! The demo's report: `OUT/report/index.html`, its PNGs and `metrics.json`.

use super::*;

/// Writes `OUT/report/index.html`, its PNGs and `metrics.json`.
pub(super) fn write_report(
    opts: &DemoOptions,
    data: &DemoData,
    summary: &DemoSummary,
    ev: &stages::EvalResult,
    eval_dir: &Path,
    curves: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let dir = opts.out.join("report");
    std::fs::create_dir_all(&dir)?;
    for png in ["reconstructions.png", "generated.png", "selection.png"] {
        std::fs::copy(eval_dir.join(png), dir.join(png))
            .with_context(|| format!("copying {png}"))?;
    }
    let pct = |v: f64| format!("{:.1} %", v * 100.0);
    let mut html = report::Html::default();
    html.p(&format!(
        "LaVIT trained from scratch on Fashion-MNIST: {} training images, {} held-out images (never trained on). Checkpoint folder: {}.",
        data.train.len(),
        data.eval.len(),
        summary.checkpoint.display()
    ));
    html.h2("Results");
    html.table(&[
        vec!["measure".into(), "value".into(), "target".into()],
        vec![
            "caption class accuracy (held-out)".into(),
            pct(summary.caption_accuracy),
            "≥ 90 %".into(),
        ],
        vec![
            "text→image accuracy (judged; best of the candidates by the stage-0 reranker)".into(),
            pct(summary.t2i_accuracy),
            String::new(),
        ],
        vec![
            format!(
                "text→image accuracy without reranking (all {} candidates per image: lavit generate with the checkpoint's defaults)",
                opts.config.eval.rerank_candidates
            ),
            pct(summary.t2i_accuracy_unranked),
            "≥ 85 %".into(),
        ],
        vec![
            "text→image accuracy with held-out phrasings (\"Ankle Boots\", \"a sandal\" → \"an sandal\", templates never trained on; no reranking)".into(),
            pct(summary.t2i_held_out_accuracy),
            "≥ 75 %".into(),
        ],
        vec![
            "reconstructions judged as the original's class (held-out)".into(),
            pct(summary.reconstruction_accuracy),
            String::new(),
        ],
        vec![
            format!(
                "image → image: held-out photos as image-only prompts (multimodal synthesis, the checkpoint's defaults; {} photos) judged as the photo's class",
                summary.synthesis.photos
            ),
            pct(summary.synthesis.image_only_accuracy),
            "≥ 80 %".into(),
        ],
        vec![
            "judge accuracy on real held-out images".into(),
            pct(summary.judge_accuracy),
            String::new(),
        ],
        vec![
            "stage-0 class head on frozen ViT features (held-out)".into(),
            pct(summary.stage0_accuracy),
            String::new(),
        ],
        vec![
            "mean kept ratio (ρ target 1/3)".into(),
            format!("{:.3}", summary.mean_kept_ratio),
            String::new(),
        ],
    ]);
    let mut rows = vec![vec![
        "class".to_string(),
        "mean tokens".into(),
        "caption acc".into(),
        "text→image acc".into(),
    ]];
    for c in 0..10 {
        rows.push(vec![
            data::CLASS_NAMES[c].into(),
            format!(
                "{:.1}",
                summary.mean_tokens_per_class.get(c).copied().unwrap_or(0.0)
            ),
            pct(ev.per_class[c].0),
            pct(ev.per_class[c].1),
        ]);
    }
    html.table(&rows);
    html.h2("What the selector keeps, and where");
    html.p("Held-out photos: as they are, then with the patches the selector keeps tinted and outlined and the dropped ones darkened (the checkpoint's default selection, through the pipeline, as lavit serve answers /v1/tokenize). A patch is on the garment when its mean pixel value is above 25/255.");
    html.img("selection.png", "kept patches");
    let sel_row = |name: &str, f: &selection::SelectionFigures| {
        vec![
            name.to_string(),
            format!("{:.3}", f.mean_kept_ratio),
            format!("{:.1} %", f.garment_share * 100.0),
            format!("{:.1} %", f.garment_share_chance * 100.0),
            format!("{:.2}", f.spearman_kept_garment),
            format!("{:.1} %", f.own_mask_share * 100.0),
            f.distinct_masks.to_string(),
        ]
    };
    html.table(&[
        vec![
            "selection".into(),
            "kept ratio".into(),
            "kept patches on the garment".into(),
            "… by chance".into(),
            "Spearman(kept count, garment patches)".into(),
            "images with a mask of their own".into(),
            "distinct masks".into(),
        ],
        sel_row("checkpoint default (pipeline)", &summary.selection),
        sel_row("arg-max", &summary.selection_modes.argmax),
        sel_row("sampled (Gumbel)", &summary.selection_modes.gumbel),
    ]);
    html.h2("Token count per class (held-out images, dynamic length)");
    let groups: Vec<(String, Vec<i64>)> = (0..10)
        .map(|c| (data::CLASS_NAMES[c].to_string(), ev.token_counts[c].clone()))
        .collect();
    html.raw(&report::svg_histograms(
        "kept visual tokens per image",
        &groups,
        5,
    ));
    html.h2("Reconstructions (image → tokens → feature decoder → U-Net)");
    html.p("Pairs: original, then its reconstruction.");
    html.img("reconstructions.png", "reconstructions");
    html.h2("Text → image");
    html.p(&format!(
        "One row per prompt \"{}\" … \"{}\"; the judge labels each image.",
        data::caption(0, 0),
        data::caption(9, 0)
    ));
    html.img("generated.png", "generated images");
    html.p("Prompts phrased as training never phrased them (held-out templates, with plurals, the data set's label names, capitals and article mistakes), lavit generate's defaults, every image judged:");
    let mut rows = vec![vec![
        "prompt".to_string(),
        "class".into(),
        "judged right".into(),
    ]];
    rows.extend(ev.t2i_held_out_prompts.iter().map(|(p, c, hits, n)| {
        vec![
            p.clone(),
            data::CLASS_NAMES[*c].to_string(),
            format!("{hits} / {n}"),
        ]
    }));
    html.table(&rows);
    if ev.synthesis.photos > 0 {
        let sy = &ev.synthesis;
        html.h2("Image → image (multimodal synthesis)");
        html.p(&format!(
            "Each held-out photo alone is the prompt (LaVIT's multimodal synthesis: its visual \
             tokens, then [IMG]; the checkpoint's defaults, LLM guidance {}): {} of {} \
             drawings are judged the photo's class. Pairs: photo, then its drawing.",
            sy.llm_guidance,
            (sy.image_only_accuracy * sy.photos as f64).round(),
            sy.photos
        ));
        html.img("synthesis.png", "drawings from image-only prompts");
        if !sy.image_text.is_empty() {
            html.p("[photo, \"a photo of a <another class>\"]: what the text does to the drawing (pairs: photo, drawing; no target).");
            html.img("synthesis_text.png", "drawings from image + text prompts");
            let mut rows = vec![vec![
                "photo".to_string(),
                "text".into(),
                "drawing judged".into(),
            ]];
            rows.extend(sy.image_text.iter().map(|&(p, t, j)| {
                vec![
                    data::CLASS_NAMES[p].to_string(),
                    data::caption(t, 0),
                    data::CLASS_NAMES[j.min(9)].to_string(),
                ]
            }));
            html.table(&rows);
        }
    }
    html.h2("Captions (held-out examples)");
    let mut rows = vec![vec!["true class".to_string(), "caption".into()]];
    rows.extend(
        ev.caption_examples
            .iter()
            .map(|(l, t)| vec![data::CLASS_NAMES[*l].to_string(), t.clone()]),
    );
    html.table(&rows);
    html.h2("Held-out images");
    let idx: Vec<usize> = (0..data.eval.len().min(40)).collect();
    report::write_grid(
        &dir.join("held_out.png"),
        &data.eval.batch_unit(&idx),
        10,
        2,
    )?;
    html.img("held_out.png", "held-out images");
    html.h2("Loss curves");
    for (i, (name, losses)) in curves.iter().enumerate() {
        let pts: Vec<(f64, f64)> = losses
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as f64, l))
            .collect();
        let w = (losses.len() / 30).max(1);
        let smooth = report::smooth(&pts, w);
        html.raw(&report::svg_lines(
            name,
            "step",
            &[report::Series {
                name: format!("moving average of {w}"),
                points: smooth.clone(),
            }],
            520.0,
            240.0,
        ));
        let png = format!("curve_{i}.png");
        let series = [(format!("moving average of {w}"), smooth)];
        let plot = lavit_runtime::train::LinePlot {
            title: name,
            x_label: "step",
            y_label: "loss",
            series: &series,
        };
        lavit_runtime::train::write_plot_png(&dir.join(&png), &plot, 520, 240)?;
    }
    html.h2("Timings");
    let mut rows = vec![vec![
        "stage".to_string(),
        "seconds (0 = resumed)".to_string(),
    ]];
    rows.extend(
        summary
            .seconds
            .iter()
            .map(|(n, s)| vec![n.clone(), format!("{s:.1}")]),
    );
    rows.push(vec![
        "whole run (stage 1b beside stage 2 + judge)".to_string(),
        format!("{:.1}", summary.wall_seconds),
    ]);
    html.table(&rows);
    html.h2("Machine");
    let mut rows = vec![vec!["what".to_string(), "value".into()]];
    rows.extend(summary.machine.rows().into_iter().map(|(k, v)| vec![k, v]));
    html.table(&rows);
    html.write(
        &dir.join("index.html"),
        "lavit demo: LaVIT trained on Fashion-MNIST",
    )?;
    lavit_runtime::checkpoint::atomic_write(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(summary)?.as_bytes(),
    )?;
    tracing::info!("report written to {}", dir.join("index.html").display());
    Ok(())
}
