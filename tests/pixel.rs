//! Integration tests: pixel decoding (U-Nets, VAE, schedulers, LaVIT decoding, parity).

use lavit::generate::{
    aspect_ratio_sizes, save_pngs, visual_ids_only, Condition, DecodeOptions, PixelDecoder,
    Resolution, ASPECT_RATIOS,
};
use lavit_decoder::schedulers::{
    DDIMScheduler, EulerDiscreteScheduler, Scheduler, SchedulerConfig,
};
use lavit_decoder::unet_2d_condition::{
    PerBlock, UNet2DConditionModel, UNet2DConditionModelConfig,
};
use tch::{nn, Device, Kind, Tensor};

use crate::common::fixture_dir;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn sd_config() -> SchedulerConfig {
    SchedulerConfig {
        beta_schedule: "scaled_linear".into(),
        beta_start: 0.00085,
        beta_end: 0.012,
        clip_sample: false,
        set_alpha_to_one: false,
        steps_offset: 1,
        ..Default::default()
    }
}

/// The fixture's pixel decoder at `res`, float32 on the CPU.
fn fixture_decoder(res: Resolution) -> PixelDecoder {
    PixelDecoder::load(&fixture_dir(), res, Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn alphas_cumprod_match_closed_form() {
    for schedule in ["linear", "scaled_linear"] {
        let cfg = SchedulerConfig {
            beta_schedule: schedule.into(),
            ..sd_config()
        };
        let s = DDIMScheduler::new(cfg.clone()).unwrap();
        let (b0, b1) = (cfg.beta_start, cfg.beta_end);
        let mut prod = 1.0f64;
        for t in 0..1000 {
            let f = t as f64 / 999.0;
            let beta = if schedule == "linear" {
                b0 + (b1 - b0) * f
            } else {
                (b0.sqrt() + (b1.sqrt() - b0.sqrt()) * f).powi(2)
            };
            prod *= 1.0 - beta;
            let ours = s.alphas_cumprod[t];
            assert!(
                (ours - prod).abs() <= 1e-4 * prod + 1e-7,
                "{schedule} t={t}: {ours} vs {prod}"
            );
        }
        assert_eq!(s.final_alpha_cumprod, s.alphas_cumprod[0]);
    }
    let one = DDIMScheduler::new(SchedulerConfig {
        set_alpha_to_one: true,
        ..sd_config()
    })
    .unwrap();
    assert_eq!(one.final_alpha_cumprod, 1.0);
}

#[test]
fn ddim_timestep_spacings() {
    let ts = |spacing: &str, offset: i64, n: usize| {
        let mut s = DDIMScheduler::new(SchedulerConfig {
            timestep_spacing: spacing.into(),
            steps_offset: offset,
            ..sd_config()
        })
        .unwrap();
        s.set_timesteps(n).unwrap();
        s.timesteps().iter().map(|&t| t as i64).collect::<Vec<_>>()
    };
    // leading: arange(n) * (T // n), reversed, + offset
    assert_eq!(ts("leading", 1, 5), vec![801, 601, 401, 201, 1]);
    assert_eq!(ts("leading", 0, 4), vec![750, 500, 250, 0]);
    // trailing: round(arange(T, 0, -T/n)) - 1
    assert_eq!(ts("trailing", 0, 5), vec![999, 799, 599, 399, 199]);
    // linspace(0, T-1, n), numpy rounding (half to even), reversed
    assert_eq!(ts("linspace", 0, 5), vec![999, 749, 500, 250, 0]);
    // a spacing that would leave the schedule is refused
    let mut s = DDIMScheduler::new(SchedulerConfig {
        steps_offset: 600,
        ..sd_config()
    })
    .unwrap();
    assert!(s.set_timesteps(2).is_err());
    assert!(s.set_timesteps(0).is_err());
}

/// With the model predicting the true noise (or velocity), one deterministic DDIM step
/// from add_noise(x0, ε, t) lands exactly on add_noise(x0, ε, t_prev).
#[test]
fn ddim_step_inverts_add_noise() {
    tch::manual_seed(0);
    let x0 = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let eps = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    for prediction in ["epsilon", "v_prediction"] {
        for alpha_one in [false, true] {
            let mut s = DDIMScheduler::new(SchedulerConfig {
                prediction_type: prediction.into(),
                set_alpha_to_one: alpha_one,
                ..sd_config()
            })
            .unwrap();
            s.set_timesteps(10).unwrap();
            let ts = s.timesteps().to_vec();
            let at = |t: f64| Tensor::from_slice(&[t as i64, t as i64]);
            for (i, &t) in ts.iter().enumerate() {
                let xt = s.add_noise(&x0, &eps, &at(t));
                let out = if prediction == "epsilon" {
                    eps.shallow_clone()
                } else {
                    s.get_velocity(&x0, &eps, &at(t))
                };
                let prev = s.step(&out, t, &xt).unwrap();
                let want = match ts.get(i + 1) {
                    Some(&tp) => s.add_noise(&x0, &eps, &at(tp)),
                    None => {
                        let a = s.final_alpha_cumprod;
                        &x0 * a.sqrt() + &eps * (1.0 - a).sqrt()
                    }
                };
                let d = max_diff(&prev, &want);
                assert!(d < 1e-4, "{prediction} alpha_one={alpha_one} t={t}: {d}");
            }
            if alpha_one {
                // the last step with ᾱ = 1 recovers x0
                let t = *ts.last().unwrap();
                let xt = s.add_noise(&x0, &eps, &at(t));
                let out = if prediction == "epsilon" {
                    eps.shallow_clone()
                } else {
                    s.get_velocity(&x0, &eps, &at(t))
                };
                assert!(max_diff(&s.step(&out, t, &xt).unwrap(), &x0) < 1e-4);
            }
        }
    }
}

#[test]
fn euler_step_inverts_add_noise() {
    tch::manual_seed(1);
    let x0 = Tensor::randn([1, 4, 4, 4], (Kind::Float, Device::Cpu));
    let eps = Tensor::randn([1, 4, 4, 4], (Kind::Float, Device::Cpu));
    let mut s = EulerDiscreteScheduler::new(sd_config()).unwrap();
    s.set_timesteps(8).unwrap();
    let ts = s.timesteps().to_vec();
    // integer timesteps with leading spacing: x_t = x0 + σ_t ε
    let at = |t: f64| Tensor::from_slice(&[t as i64]);
    let sigma0 =
        ((1.0 - s.alphas_cumprod[ts[0] as usize]) / s.alphas_cumprod[ts[0] as usize]).sqrt();
    assert!((s.init_noise_sigma() - (sigma0 * sigma0 + 1.0).sqrt()).abs() < 1e-4);
    for (i, &t) in ts.iter().enumerate() {
        let xt = s.add_noise(&x0, &eps, &at(t));
        let prev = s.step(&eps, t, &xt).unwrap();
        let want = match ts.get(i + 1) {
            Some(&tp) => s.add_noise(&x0, &eps, &at(tp)),
            None => x0.shallow_clone(),
        };
        assert!(max_diff(&prev, &want) < 1e-4, "t={t}");
    }
    // scale_model_input divides by sqrt(σ² + 1)
    let t = ts[3];
    let a = s.alphas_cumprod[t as usize];
    let sigma = ((1.0 - a) / a).sqrt();
    let scaled = s.scale_model_input(&x0, t);
    assert!(max_diff(&(scaled * (sigma * sigma + 1.0).sqrt()), &x0) < 1e-5);
}

fn tiny_unet(text_time: bool) -> (nn::VarStore, UNet2DConditionModel) {
    let mut cfg = UNet2DConditionModelConfig {
        block_out_channels: vec![16, 32],
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        layers_per_block: PerBlock::One(1),
        attention_head_dim: PerBlock::Many(vec![2, 4]),
        transformer_layers_per_block: PerBlock::Many(vec![1, 2]),
        norm_num_groups: 8,
        cross_attention_dim: 12,
        sample_size: Some(8),
        ..Default::default()
    };
    if text_time {
        cfg.addition_embed_type = Some("text_time".into());
        cfg.addition_time_embed_dim = Some(4);
        cfg.projection_class_embeddings_input_dim = Some(10 + 6 * 4);
        cfg.use_linear_projection = true;
    }
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), cfg).unwrap();
    (vs, unet)
}

#[test]
fn masked_cross_attention_ignores_masked_positions() {
    let _g = tch::no_grad_guard();
    let (_vs, unet) = tiny_unet(false);
    tch::manual_seed(3);
    let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let ctx = Tensor::randn([2, 6, 12], (Kind::Float, Device::Cpu));
    let mask = Tensor::from_slice(&[1i64, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 0]).view([2, 6]);
    let t = Tensor::from(500.0);
    let base = unet.forward(&x, &t, &ctx, Some(&mask), None).unwrap();
    // change only the masked positions: the output must not move
    let masked = mask.eq(0).unsqueeze(-1).to_kind(Kind::Float);
    let noise = Tensor::randn([2, 6, 12], (Kind::Float, Device::Cpu)) * 10.0;
    let ctx2 = &ctx + &noise * &masked;
    let out2 = unet.forward(&x, &t, &ctx2, Some(&mask), None).unwrap();
    assert!(max_diff(&base, &out2) < 1e-5, "{}", max_diff(&base, &out2));
    // without the mask the same change moves the output
    let a = unet.forward(&x, &t, &ctx, None, None).unwrap();
    let b = unet.forward(&x, &t, &ctx2, None, None).unwrap();
    assert!(max_diff(&a, &b) > 1e-3);
    // and changing a kept position moves the masked output too
    let kept = mask.unsqueeze(-1).to_kind(Kind::Float);
    let ctx3 = &ctx + &noise * &kept;
    let out3 = unet.forward(&x, &t, &ctx3, Some(&mask), None).unwrap();
    assert!(max_diff(&base, &out3) > 1e-3);
}

#[test]
fn batched_cfg_equals_two_forwards() {
    let _g = tch::no_grad_guard();
    let (_vs, unet) = tiny_unet(true);
    tch::manual_seed(4);
    let x = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let cond = Tensor::randn([1, 5, 12], (Kind::Float, Device::Cpu));
    let pooled = Tensor::randn([1, 10], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[64.0f32, 64.0, 0.0, 0.0, 64.0, 64.0]).view([1, 6]);
    let t = Tensor::from(321.0);
    let fwd = |ehs: &Tensor, te: &Tensor, xin: &Tensor, ti: &Tensor| {
        let added = lavit_decoder::AddedCond {
            text_embeds: te,
            time_ids: ti,
        };
        unet.forward(xin, &t, ehs, None, Some(&added)).unwrap()
    };
    let uncond = fwd(&cond.zeros_like(), &pooled.zeros_like(), &x, &ids);
    let text = fwd(&cond, &pooled, &x, &ids);
    let batched = fwd(
        &Tensor::cat(&[cond.zeros_like(), cond.shallow_clone()], 0),
        &Tensor::cat(&[pooled.zeros_like(), pooled.shallow_clone()], 0),
        &Tensor::cat(&[&x, &x], 0),
        &Tensor::cat(&[&ids, &ids], 0),
    );
    let parts = batched.chunk(2, 0);
    assert!(max_diff(&parts[0], &uncond) < 1e-5);
    assert!(max_diff(&parts[1], &text) < 1e-5);
    assert!(max_diff(&uncond, &text) > 1e-4, "conditioning must matter");
    // missing added conditions are refused, not a panic
    assert!(unet.forward(&x, &t, &cond, None, None).is_err());
}

/// The lowres decoding loop (one batched CFG forward per step, negative condition built
/// from uncond_embeddings with masks) equals a hand-written loop of two separate forwards.
#[test]
fn lowres_decoding_equals_two_forward_loop() {
    let _g = tch::no_grad_guard();
    let dec = fixture_decoder(Resolution::Lowres);
    tch::manual_seed(5);
    // The hand-written loop below runs the fixture's U-Net itself, loaded on its own.
    let (_vs, unet) = UNet2DConditionModel::from_pretrained(
        &fixture_dir().join("pixel_decoding/unet"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let (b, n, c) = (2, 7, dec.denoiser.cross_attention_dim());
    assert_eq!(c, unet.config.cross_attention_dim);
    let hidden = Tensor::randn([b, n, c], (Kind::Float, Device::Cpu));
    let latents = Tensor::randn([b, 4, 8, 8], (Kind::Float, Device::Cpu));
    let opts = DecodeOptions {
        steps: 3,
        guidance: 5.0,
        ..Default::default()
    };
    let cond = Condition::Lowres {
        hidden: hidden.shallow_clone(),
    };
    let ours = dec
        .decode_latents(
            &cond,
            latents.shallow_clone(),
            &Tensor::zeros([b, 6], (Kind::Float, Device::Cpu)),
            &opts,
        )
        .unwrap();

    let uncond = dec.uncond_embeddings.as_ref().unwrap();
    let lu = uncond.size()[0];
    let neg = Tensor::zeros([b, n, c], (Kind::Float, Device::Cpu));
    for i in 0..b {
        neg.get(i).narrow(0, 0, lu).copy_(uncond);
    }
    let mut neg_mask = vec![0i64; (b * n) as usize];
    for i in 0..b {
        for j in 0..lu {
            neg_mask[(i * n + j) as usize] = 1;
        }
    }
    let neg_mask = Tensor::from_slice(&neg_mask).view([b, n]);
    let pos_mask = Tensor::ones([b, n], (Kind::Int64, Device::Cpu));
    let mut s = DDIMScheduler::new(dec.scheduler_config.clone()).unwrap();
    s.set_timesteps(3).unwrap();
    let mut x = latents;
    for t in s.timesteps().to_vec() {
        let tt = Tensor::from(t);
        let u = unet.forward(&x, &tt, &neg, Some(&neg_mask), None).unwrap();
        let c = unet
            .forward(&x, &tt, &hidden, Some(&pos_mask), None)
            .unwrap();
        let eps = &u + (c - &u) * 5.0;
        x = s.step(&eps, t, &x).unwrap();
    }
    let want = dec.vae_decode(&x);
    assert!(max_diff(&ours, &want) < 1e-5, "{}", max_diff(&ours, &want));
}

#[test]
fn aspect_ratio_sizes_are_valid() {
    // At the official native size, the table comes back unchanged and every side is a
    // multiple of 64 (VAE 8 × three U-Net downsamplings).
    let official = aspect_ratio_sizes(1024, 64);
    assert_eq!(official.len(), ASPECT_RATIOS.len());
    for ((name, (h, w)), (name2, size2)) in official.iter().zip(ASPECT_RATIOS) {
        assert_eq!((name, (*h, *w)), (name2, *size2));
        assert_eq!(h % 64, 0);
        assert_eq!(w % 64, 0);
        let (a, b) = name.split_once(':').unwrap();
        let want = a.parse::<f64>().unwrap() / b.parse::<f64>().unwrap();
        let got = *w as f64 / *h as f64;
        assert!((got / want - 1.0).abs() < 0.05, "{name}: {w}x{h}");
        let area = (h * w) as f64 / (1024.0 * 1024.0);
        assert!((area - 1.0).abs() < 0.05, "{name}: area {area}");
    }
    assert!(ASPECT_RATIOS.iter().any(|(n, _)| *n == "16:9"));

    // On the fixture decoder every offered size passes validation and decodes to that size.
    let dec = fixture_decoder(Resolution::Highres);
    let sizes = dec.aspect_ratio_sizes();
    for (_, (h, w)) in &sizes {
        dec.validate_size(*h, *w).unwrap();
    }
    let (_, (h, w)) = sizes.iter().find(|(n, _)| *n == "4:3").unwrap();
    assert!(w > h);
    let cond = Condition::Highres {
        prompt_embeds: Tensor::randn([1, 5, 80], (Kind::Float, Device::Cpu)),
        pooled_embeds: Tensor::randn([1, 48], (Kind::Float, Device::Cpu)),
    };
    let opts = DecodeOptions {
        steps: 2,
        height: Some(*h),
        width: Some(*w),
        seed: Some(1),
        ..Default::default()
    };
    let img = dec.decode(&cond, &opts).unwrap();
    assert_eq!(img.size(), vec![1, 3, *h, *w]);
    // an invalid size is a clear error
    let bad = DecodeOptions {
        height: Some(h + 1),
        ..opts
    };
    let err = dec.decode(&cond, &bad).unwrap_err().to_string();
    assert!(err.contains("multiples"), "{err}");
}

#[test]
fn seeded_decoding_is_reproducible_and_writes_png() {
    let dec = fixture_decoder(Resolution::Highres);
    tch::manual_seed(9);
    let cond = || Condition::Highres {
        prompt_embeds: Tensor::ones([2, 4, 80], (Kind::Float, Device::Cpu)),
        pooled_embeds: Tensor::ones([2, 48], (Kind::Float, Device::Cpu)),
    };
    let opts = DecodeOptions {
        steps: 2,
        seed: Some(42),
        ..Default::default()
    };
    let a = dec.decode(&cond(), &opts).unwrap();
    let b = dec.decode(&cond(), &opts).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    assert!(a.min().double_value(&[]) >= 0.0 && a.max().double_value(&[]) <= 1.0);
    let dir = tempfile::tempdir().unwrap();
    let paths = save_pngs(&a, &dir.path().join("out.png")).unwrap();
    assert_eq!(paths.len(), 2);
    let img = image::open(&paths[1]).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (16, 16));
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let cfg = UNet2DConditionModelConfig {
        down_block_types: vec!["SimpleCrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "UpBlock2D".into()],
        block_out_channels: vec![32, 64],
        ..Default::default()
    };
    let err = cfg.validate("test.json").unwrap_err().to_string();
    assert!(
        err.contains("down_block_types") && err.contains("SimpleCrossAttnDownBlock2D"),
        "{err}"
    );
    let cfg = UNet2DConditionModelConfig {
        attention_head_dim: PerBlock::Many(vec![8, 8, 8]),
        ..Default::default()
    };
    let err = cfg.validate("test.json").unwrap_err().to_string();
    assert!(err.contains("attention_head_dim"), "{err}");
    let err = SchedulerConfig::from_json_file(&fixture_dir().join("nonexistent.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("nonexistent.json"), "{err}");
}

#[test]
fn parity_rows_pass_on_fixture() {
    let dir = fixture_dir();
    let expected =
        lavit_runtime::checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let rows = lavit::parity::pixel::rows(&dir, &expected).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, lavit::parity::pixel::ROWS);
    for r in &rows {
        assert!(r.pass, "{}: {} {}", r.name, r.max_abs_err, r.note);
    }
}

pub(crate) mod training {
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
        let ck =
            |d: &std::path::Path| load(&latest(&d.join("checkpoints")).unwrap().unwrap()).unwrap();
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
}

/// Prompt → LLM image tokens (CFG) → feature decoder → U-Net → VAE on the fixture, through
/// the pipeline with either pixel decoder: the Decoder stage draws from exactly the visual
/// ids the LLM produced (greedy = the reference), and a fixed seed draws the same pixels.
#[test]
fn text_to_image_runs_llm_tokens_through_the_pixel_decoder() {
    use lavit::pipeline::{Pipeline, PipelineConfig, StageSet};
    use lavit_runtime::messages::GenerateOptions;
    let dir = fixture_dir();
    let manifest = lavit_runtime::manifest::LavitManifest::for_checkpoint(&dir).unwrap();
    let reference =
        lavit_runtime::checkpoint::load_file(&dir.join("reference/expected.safetensors")).unwrap();
    let want: Vec<i64> = Vec::try_from(&reference["t2i_greedy_cfg_2"]).unwrap();
    let want = visual_ids_only(&want, manifest.llm.visual_token_offset);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for decoder in ["highres", "lowres"] {
        let pipe = Pipeline::build(&PipelineConfig {
            checkpoint: Some(dir.clone()),
            stages: StageSet::Generation,
            pixel_decoding: decoder.into(),
            ..PipelineConfig::default()
        })
        .unwrap();
        let (w, h) = pipe.info().default_size;
        let opts = GenerateOptions {
            n: 1,
            llm_guidance: 2.0,
            temperature: 0.0,
            steps: 2,
            seed: 3,
            width: w,
            height: h,
            ..GenerateOptions::default()
        };
        let prompt = &manifest.generation.t2i_prompt;
        let a = rt
            .block_on(pipe.generate_with_ids(prompt, opts.clone()))
            .unwrap();
        assert_eq!(a.ids, vec![want.clone()], "{decoder}");
        assert_eq!(
            (a.images[0].width(), a.images[0].height()),
            (w as u32, h as u32)
        );
        let b = rt.block_on(pipe.generate_with_ids(prompt, opts)).unwrap();
        assert_eq!(a.images[0].as_raw(), b.images[0].as_raw(), "{decoder}");
    }
}

mod cli {
    use std::process::Command;

    use crate::common::fixture_dir;

    fn lavit() -> Command {
        Command::new(env!("CARGO_BIN_EXE_lavit"))
    }

    fn png_size(p: &std::path::Path) -> (u32, u32) {
        let img = image::open(p).unwrap();
        (img.width(), img.height())
    }

    #[test]
    fn generate_and_reconstruct_write_pngs_from_the_fixture() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("gen.png");
        let o = lavit()
            .args(["generate", "--checkpoint"])
            .arg(fixture_dir())
            .args([
                "a photo of a cat",
                "--steps",
                "3",
                "--seed",
                "1",
                "--num-images",
                "2",
            ])
            .args(["--ratio", "4:3", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // 4:3 at the fixture's 16 px native size, rounded to multiples of 4
        assert_eq!(png_size(&dir.path().join("gen-0.png")), (20, 16));
        assert_eq!(png_size(&dir.path().join("gen-1.png")), (20, 16));

        let out = dir.path().join("low.png");
        let o = lavit()
            .args(["generate", "--checkpoint"])
            .arg(fixture_dir())
            .args(["a cat", "--steps", "2", "--pixel-decoding", "lowres", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_size(&out), (16, 16));

        // reconstruct a real photo (written as PNG from the fixture's own image tensor)
        let photo = dir.path().join("photo.png");
        let reference = lavit_runtime::checkpoint::load_file(
            &fixture_dir().join("reference/expected.safetensors"),
        )
        .unwrap();
        let mean =
            tch::Tensor::from_slice(&[0.48145466f64, 0.4578275, 0.40821073]).view([1, 3, 1, 1]);
        let std =
            tch::Tensor::from_slice(&[0.26862954f64, 0.26130258, 0.27577711]).view([1, 3, 1, 1]);
        let img = (&reference["images"].narrow(0, 0, 1) * std.to_kind(tch::Kind::Float)
            + mean.to_kind(tch::Kind::Float))
        .clamp(0.0, 1.0);
        lavit::generate::save_pngs(&img, &photo).unwrap();
        let out = dir.path().join("rec.png");
        let o = lavit()
            .args(["reconstruct", "--checkpoint"])
            .arg(fixture_dir())
            .arg(&photo)
            .args(["--steps", "2", "--seed", "0", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_size(&out), (16, 16));
        assert!(String::from_utf8_lossy(&o.stdout).contains("visual tokens"));
    }

    #[test]
    fn bad_generate_and_reconstruct_inputs_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let not_image = dir.path().join("x.png");
        std::fs::write(&not_image, b"not a png").unwrap();
        let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
            (
                vec![
                    "generate".into(),
                    "--checkpoint".into(),
                    fixture_dir().into(),
                    "x".into(),
                    "--width".into(),
                    "15".into(),
                ],
                "multiples",
            ),
            (
                vec![
                    "generate".into(),
                    "--checkpoint".into(),
                    fixture_dir().into(),
                    "x".into(),
                    "--ratio".into(),
                    "5:1".into(),
                ],
                "--ratio",
            ),
            (
                vec![
                    "generate".into(),
                    "--checkpoint".into(),
                    dir.path().into(),
                    "x".into(),
                ],
                "tokenizer_encoder",
            ),
            (
                vec![
                    "reconstruct".into(),
                    "--checkpoint".into(),
                    fixture_dir().into(),
                    not_image.clone().into(),
                ],
                "x.png",
            ),
        ];
        for (args, want) in cases {
            let o = lavit()
                .args(&args)
                .args(["-o", dir.path().join("o.png").to_str().unwrap()])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{args:?} succeeded");
            assert!(err.contains(want), "{args:?}: {err}");
            assert!(!err.contains("panicked"), "{args:?}: {err}");
        }
    }
}

#[test]
fn seeded_gaussian_is_per_seed_and_standard_normal() {
    use lavit::generate::seeded_gaussian;
    let a = seeded_gaussian(3, &[2, 4, 64, 64]);
    // libtorch's global generator does not enter: reseeding it changes nothing
    tch::manual_seed(123);
    assert!(a.equal(&seeded_gaussian(3, &[2, 4, 64, 64])));
    assert!(!a.equal(&seeded_gaussian(4, &[2, 4, 64, 64])));
    assert_eq!(a.size(), vec![2, 4, 64, 64]);
    let mean = a.mean(Kind::Float).double_value(&[]);
    let std = a.std(true).double_value(&[]);
    assert!(
        mean.abs() < 0.02 && (std - 1.0).abs() < 0.02,
        "{mean} {std}"
    );
    // an odd count is filled too
    assert_eq!(seeded_gaussian(1, &[3, 5]).size(), vec![3, 5]);
}
