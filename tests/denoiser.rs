//! Integration tests: the pixel decoder's denoiser from a plugin. The example plugin
//! (plugins/conv-denoiser) is loaded as a dylib, trained a few steps by `lavit train decoder`,
//! and its export serves as the fixture checkpoint's lowres pixel decoder in the pipeline.

use std::path::{Path, PathBuf};

use lavit::pipeline::{Pipeline, PipelineConfig, StageSet};
use lavit_plugin_api::Denoiser;
use lavit_runtime::messages::GenerateOptions;
use lavit_runtime::plugin_host::{
    DenoiserManifest, PluginComponent, PluginsConfig, TokenizerPlugins,
};
use tch::{Device, Tensor};

use crate::common::fixture_dir;
use crate::plugins::dylib;

/// 16 images of 16² px: a coloured square (colour and position from the index) on white.
fn write_images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..16u32 {
        let colour =
            [[200, 30, 30], [30, 160, 40], [40, 60, 210], [220, 190, 20]][(i % 4) as usize];
        let (x0, y0) = ((i / 4) % 2 * 8, (i / 8) * 8);
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            if (x0..x0 + 8).contains(&x) && (y0..y0 + 8).contains(&y) {
                image::Rgb(colour)
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        img.save(dir.join(format!("img{i:02}.png"))).unwrap();
    }
}

/// The fixture's lowres condition width (its `VQDecoder` output = its U-Net's
/// cross-attention width).
fn fixture_cond_dim() -> i64 {
    let text =
        std::fs::read_to_string(fixture_dir().join("pixel_decoding/unet/config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cross_attention_dim"].as_i64().unwrap()
}

fn plugins(denoiser_config: serde_json::Value) -> PluginsConfig {
    PluginsConfig {
        load: vec![dylib("lavit-plugin-conv-denoiser")],
        denoiser: Some(PluginComponent {
            plugin: "conv-denoiser".into(),
            weights: None,
            config: denoiser_config,
        }),
        ..Default::default()
    }
}

/// The fixture checkpoint with `pixel` as its lowres pixel-decoding folder (the other parts
/// linked, not copied).
fn checkpoint_with_pixel_folder(root: &Path, pixel: &Path) -> PathBuf {
    let dir = root.join("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    for part in ["manifest.json", "language_model", "visual_tokenizer"] {
        std::os::unix::fs::symlink(
            fixture_dir().join(part).canonicalize().unwrap(),
            dir.join(part),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink(pixel, dir.join("pixel_decoding")).unwrap();
    dir
}

/// `lavit train decoder` trains the conv-denoiser plugin (loss down), exports it as a
/// pixel-decoding folder (`denoiser.safetensors` + `denoiser.json` + `scheduler/`), the host
/// loads the exported weights, and the pipeline generates with it from the fixture's LLM
/// tokens (the same seed gives the same pixels); without `[plugins.denoiser]` the pipeline
/// refuses that folder naming the plugin.
#[test]
fn conv_denoiser_plugin_trains_saves_loads_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    write_images(&tmp.path().join("images"));
    let dim = fixture_cond_dim();
    let lib = dylib("lavit-plugin-conv-denoiser");
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("decoder.toml");
    std::fs::write(
        &cfg,
        format!(
            "out_dir = {run:?}\n\
             [data]\nimages = \"images\"\nimage_size = 16\n\
             [condition]\ngrid = 4\ndim = {dim}\n\
             [train]\nsteps = 40\nbatch_size = 8\nlr = 2e-3\nwarmup_steps = 5\nlog_every = 5\n\
             save_every = 20\nsample_steps = 2\nsample_count = 2\nprogress = false\n\
             [plugins]\nload = [{lib:?}]\n\
             [plugins.denoiser]\nplugin = \"conv-denoiser\"\n\
             config = {{ in_channels = 3, cross_attention_dim = {dim}, sample_size = 16, width = 32, depth = 2 }}\n"
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lavit"))
        .current_dir(tmp.path()) // data.images is relative to the working folder
        .args(["train", "decoder", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = |k: &str| summary[k].as_f64().unwrap();
    assert_eq!(summary["steps"], 40);
    eprintln!(
        "conv-denoiser, 40 steps: eval loss {:.4} → {:.4}, train loss {:.4} → {:.4}",
        f("eval_loss_start"),
        f("eval_loss_end"),
        f("train_loss_first"),
        f("train_loss_last")
    );
    assert!(
        f("eval_loss_end") < 0.8 * f("eval_loss_start"),
        "eval loss {} → {}",
        f("eval_loss_start"),
        f("eval_loss_end")
    );
    assert!(
        f("train_loss_last") < f("train_loss_first"),
        "train loss {} → {}",
        f("train_loss_first"),
        f("train_loss_last")
    );

    // Saved: the export names the plugin and its geometry; checkpoints hold model/ema/optimizer.
    let weights = run.join("denoiser.safetensors");
    assert_eq!(
        summary["exported_unet"].as_str().unwrap(),
        weights.to_str().unwrap()
    );
    let m = DenoiserManifest::read(&run).unwrap().unwrap();
    assert_eq!(m.plugin, "conv-denoiser");
    assert_eq!(
        (
            m.in_channels,
            m.cross_attention_dim,
            m.sample_size,
            m.size_multiple
        ),
        (3, dim, 16, 1)
    );
    assert!(run.join("scheduler/scheduler_config.json").is_file());
    assert!(!run.join("unet").exists());
    let ck = lavit_runtime::train::latest(&run.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert!(ck.ends_with("step-00000040"), "{}", ck.display());

    // Loaded: the host builds the plugin from the folder (config from denoiser.json, weights
    // from denoiser.safetensors) with exactly the exported EMA weights.
    let loaded = TokenizerPlugins::load(&plugins(serde_json::json!({})))
        .unwrap()
        .denoiser(Some(&run), Device::Cpu)
        .unwrap()
        .unwrap();
    let file: std::collections::BTreeMap<String, Tensor> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .collect();
    let sd = loaded.state_dict().unwrap();
    assert_eq!(sd.len(), file.len());
    for (k, v) in &sd {
        assert!(v.equal(&file[k]), "{k}");
    }

    // Generated through the pipeline: the fixture's LLM and feature decoder, this denoiser.
    let ckpt = checkpoint_with_pixel_folder(tmp.path(), &run);
    let pcfg = |plugins: PluginsConfig| PipelineConfig {
        checkpoint: Some(ckpt.clone()),
        stages: StageSet::Generation,
        pixel_decoding: "lowres".into(),
        plugins,
        ..PipelineConfig::default()
    };
    let e = Pipeline::build(&pcfg(PluginsConfig::default()))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("conv-denoiser") && e.contains("[plugins.denoiser]"),
        "{e}"
    );
    let pipe = Pipeline::build(&pcfg(plugins(serde_json::json!({})))).unwrap();
    assert_eq!(pipe.info().default_size, (16, 16));
    let opts = GenerateOptions {
        n: 1,
        llm_guidance: 2.0,
        temperature: 0.0,
        steps: 4,
        seed: 3,
        width: 16,
        height: 16,
        ..GenerateOptions::default()
    };
    let manifest = lavit_runtime::manifest::LavitManifest::for_checkpoint(&ckpt).unwrap();
    let prompt = &manifest.generation.t2i_prompt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = rt
        .block_on(pipe.generate_with_ids(prompt, opts.clone()))
        .unwrap();
    assert_eq!((a.images[0].width(), a.images[0].height()), (16, 16));
    assert!(!a.ids[0].is_empty());
    let b = rt.block_on(pipe.generate_with_ids(prompt, opts)).unwrap();
    assert_eq!(a.images[0].as_raw(), b.images[0].as_raw());
    // Sizes the denoiser cannot take are refused before any work.
    let bad = GenerateOptions {
        width: 0,
        ..GenerateOptions::default()
    };
    assert!(rt.block_on(pipe.generate(prompt, bad)).is_err());
}

/// A folder whose `denoiser.json` names another plugin than the config is refused naming both.
#[test]
fn a_denoiser_folder_of_another_plugin_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = DenoiserManifest {
        plugin: "tiny-dit".into(),
        config: serde_json::json!({}),
        in_channels: 3,
        cross_attention_dim: 8,
        sample_size: 16,
        size_multiple: 2,
    };
    std::fs::write(
        tmp.path().join("denoiser.json"),
        serde_json::to_string(&m).unwrap(),
    )
    .unwrap();
    let e = TokenizerPlugins::load(&plugins(serde_json::json!({})))
        .unwrap()
        .denoiser(Some(tmp.path()), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tiny-dit") && e.contains("conv-denoiser"), "{e}");
    std::fs::write(
        tmp.path().join("denoiser.json"),
        "{\"plugin\": \"x\", \"in_channels\": 0, \"cross_attention_dim\": 8, \"sample_size\": 16, \"size_multiple\": 1}",
    )
    .unwrap();
    let e = DenoiserManifest::read(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("in_channels") && e.contains("denoiser.json"),
        "{e}"
    );
}
