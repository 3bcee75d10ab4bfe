//! `lavit train decoder` on real images: the loss falls, resume is exact.

use std::path::PathBuf;

use lavit::train::decoder::{load_image_folder, train, DecoderTrainConfig, PatchConditioner};
use lavit_decoder::unet_2d_condition::PerBlock;
use lavit_runtime::train::{hash_state_dict, latest, load};

use super::{Condition, DecodeOptions, PixelDecoder, Resolution};
use tch::Device;

/// Real photos: the Debian tuxpaint-stamps-default package (`scripts/setup.sh --data`).
fn stamps() -> PathBuf {
    let p = std::env::var_os("LAVIT_STAMPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/tuxpaint/stamps"));
    assert!(
        p.is_dir(),
        "{} missing: run scripts/setup.sh --data (or set LAVIT_STAMPS)",
        p.display()
    );
    p
}

pub(crate) fn config(out: &std::path::Path, steps: usize) -> DecoderTrainConfig {
    let mut cfg = DecoderTrainConfig {
        out_dir: out.to_path_buf(),
        ..Default::default()
    };
    cfg.unet.block_out_channels = vec![16, 32];
    cfg.unet.attention_head_dim = PerBlock::One(2);
    cfg.unet.cross_attention_dim = 16;
    cfg.condition.dim = 16;
    cfg.train.steps = steps;
    cfg.train.batch_size = 8;
    cfg.train.lr = 2e-3;
    cfg.train.warmup_steps = 5;
    cfg.train.log_every = 5;
    cfg.train.save_every = 1000;
    cfg.train.sample_steps = 4;
    cfg.train.sample_count = 4;
    cfg.train.progress = false;
    cfg
}

#[test]
fn decoder_training_lowers_denoising_loss_on_real_photos() {
    let (images, _) = load_image_folder(&stamps(), 16, 32).unwrap();
    assert_eq!(images.size()[1..], [3, 16, 16]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 30);
    let cond = PatchConditioner::new(3, 16, 4, 16, 1, Device::Cpu).unwrap();
    let s = train(&cfg, &images, &cond).unwrap();
    assert!(
        s.eval_loss_end < 0.8 * s.eval_loss_start,
        "eval loss {} → {}",
        s.eval_loss_start,
        s.eval_loss_end
    );
    assert!(s.train_loss_last < s.train_loss_first);
    // the exported EMA U-Net loads as a diffusers folder, and a grid was written
    let (_vs, unet) = lavit_decoder::UNet2DConditionModel::from_pretrained(
        &s.exported_unet,
        Device::Cpu,
        tch::Kind::Float,
    )
    .unwrap();
    assert_eq!(unet.config.cross_attention_dim, 16);
    // the run folder is a pixel-space decoder that `PixelDecoder` loads and samples from
    let dec = PixelDecoder::load_folder(
        dir.path(),
        Resolution::Lowres,
        Device::Cpu,
        tch::Kind::Float,
    )
    .unwrap();
    assert!(dec.vae.is_none() && dec.uncond_embeddings.is_none());
    assert_eq!(dec.native_size(), (32, 32));
    let cond = Condition::Lowres {
        hidden: lavit::train::decoder::Conditioner::condition(&cond, &images.narrow(0, 0, 2))
            .unwrap(),
    };
    let opts = DecodeOptions {
        steps: 3,
        guidance: 2.0,
        height: Some(16),
        width: Some(16),
        seed: Some(0),
        ..Default::default()
    };
    assert_eq!(dec.decode(&cond, &opts).unwrap().size(), vec![2, 3, 16, 16]);
    let grid = image::open(s.sample_grids.last().unwrap()).unwrap();
    assert_eq!((grid.width(), grid.height()), (4 * 16, 2 * 16));
    assert!(std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .contains("\"loss\""));
}

/// Each run is its own `lavit train decoder` process: libtorch's generator is global, so
/// runs in test threads of one process would draw from each other's stream.
#[test]
fn decoder_training_resumes_exactly() {
    let toml = |out: &std::path::Path, stop_after: usize| {
        format!(
            "out_dir = {out:?}\n[data]\nimages = {:?}\nimage_size = 16\nmax_images = 12\n\
             [condition]\ndim = 16\n\
             [unet]\nin_channels = 3\nout_channels = 3\nlayers_per_block = 1\nblock_out_channels = [16, 32]\nattention_head_dim = 2\ncross_attention_dim = 16\n\
             down_block_types = [\"DownBlock2D\", \"CrossAttnDownBlock2D\"]\n\
             up_block_types = [\"CrossAttnUpBlock2D\", \"UpBlock2D\"]\nnorm_num_groups = 8\n\
             [train]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 2\nsave_every = 1000\n\
             sample_steps = 2\nsample_count = 2\nprogress = false\nstop_after = {stop_after}\n",
            stamps()
        )
    };
    let run = |cfg: String, dir: &std::path::Path| {
        let p = dir.join("cfg.toml");
        std::fs::write(&p, cfg).unwrap();
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_lavit"))
            .args(["train", "decoder", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let straight = tempfile::tempdir().unwrap();
    let resumed = tempfile::tempdir().unwrap();
    let (s_out, r_out) = (straight.path().join("run"), resumed.path().join("run"));
    run(toml(&s_out, 0), straight.path());
    run(toml(&r_out, 2), resumed.path());
    let ck = |d: &std::path::Path| load(&latest(&d.join("checkpoints")).unwrap().unwrap()).unwrap();
    assert_eq!(ck(&r_out).state.step, 2);
    run(toml(&r_out, 0), resumed.path());

    let (mut a, mut b) = (ck(&s_out), ck(&r_out));
    assert_eq!((a.state.step, b.state.step), (4, 4));
    for part in ["model", "optimizer", "ema"] {
        let (pa, pb) = (a.take(part).unwrap(), b.take(part).unwrap());
        assert_eq!(
            hash_state_dict(&pa).unwrap(),
            hash_state_dict(&pb).unwrap(),
            "{part} differs after resume"
        );
    }
    // the metrics log continues exactly: one line per step
    let lines = std::fs::read_to_string(r_out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
}

#[test]
fn bad_training_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(&p, "[train]\nsteps = \"many\"\n").unwrap();
    let err = format!("{:#}", DecoderTrainConfig::from_toml_file(&p).unwrap_err());
    assert!(err.contains("bad.toml") && err.contains("steps"), "{err}");
    std::fs::write(&p, "[train]\nstepz = 3\n").unwrap();
    let err = format!("{:#}", DecoderTrainConfig::from_toml_file(&p).unwrap_err());
    assert!(err.contains("stepz"), "{err}");
    std::fs::write(&p, "[condition]\ndim = 7\n").unwrap();
    let err = format!("{:#}", DecoderTrainConfig::from_toml_file(&p).unwrap_err());
    assert!(err.contains("cross_attention_dim"), "{err}");
}
