//! Parity rows of the pixel-decoder stages: both U-Nets, the VAE, DDIM and the two official
//! pixel-decoding procedures, recomputed from the reference inputs of
//! `reference/expected.safetensors` with the normal loading code.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use lavit_decoder::schedulers::{DDIMScheduler, Scheduler, SchedulerConfig};
use lavit_decoder::{AddedCond, AutoencoderKL, UNet2DConditionModel};
use lavit_runtime::checkpoint::StateDict;
use lavit_runtime::manifest::LavitManifest;
use lavit_runtime::parity::{compare, ParityRow};
use tch::{Device, Kind, Tensor};

use crate::generate::{Condition, DecodeOptions, PixelDecoder, Resolution};

/// The rows this group computes.
pub const ROWS: &[&str] = &[
    "unet_lowres_out",
    "unet_highres_out",
    "vae_decoded",
    "ddim_timesteps",
    "ddim_trajectory",
    "pixels_highres",
    "pixels_lowres",
];

/// Recompute this group's reference tensors from the checkpoint folder `dir`.
pub fn rows(dir: &Path, expected: &StateDict) -> Result<Vec<ParityRow>> {
    let _guard = tch::no_grad_guard();
    let manifest = LavitManifest::for_checkpoint(dir)?;
    let g = &manifest.generation;
    let get = |name: &str| -> Result<Tensor> {
        expected
            .get(name)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| anyhow!("reference input `{name}` missing"))
    };
    let mut out = Vec::new();
    let mut row = |name: &str, f: &dyn Fn() -> Result<Tensor>| {
        let Some(reference) = expected.get(name) else {
            return;
        };
        out.push(match f() {
            Ok(ours) => compare(name, &ours, reference),
            Err(e) => ParityRow {
                name: name.into(),
                max_abs_err: f64::INFINITY,
                pass: false,
                note: format!("{e:#}"),
            },
        });
    };
    let dev = Device::Cpu;
    let lowres_dir = dir.join(Resolution::Lowres.folder());
    let highres_dir = dir.join(Resolution::Highres.folder());

    row("unet_lowres_out", &|| {
        let (_vs, unet) =
            UNet2DConditionModel::from_pretrained(&lowres_dir.join("unet"), dev, Kind::Float)?;
        Ok(unet.forward(
            &get("initial_latents")?,
            &get("unet_timestep")?,
            &get("lowres_decoder_out")?,
            Some(&get("unet_lowres_mask")?),
            None,
        )?)
    });
    row("unet_highres_out", &|| {
        let (_vs, unet) =
            UNet2DConditionModel::from_pretrained(&highres_dir.join("unet"), dev, Kind::Float)?;
        let (te, ti) = (get("highres_pooled_embeds")?, get("unet_highres_time_ids")?);
        let added = AddedCond {
            text_embeds: &te,
            time_ids: &ti,
        };
        Ok(unet.forward(
            &get("initial_latents")?,
            &get("unet_timestep")?,
            &get("highres_prompt_embeds")?,
            None,
            Some(&added),
        )?)
    });
    row("vae_decoded", &|| {
        let (_vs, vae) = AutoencoderKL::from_pretrained(&highres_dir.join("vae"), dev)?;
        Ok(vae.decode(&(get("initial_latents")? / vae.config.scaling_factor))?)
    });
    let ddim = || -> Result<DDIMScheduler> {
        let p = lowres_dir.join("scheduler/scheduler_config.json");
        let cfg = SchedulerConfig::from_json_file(&p)?;
        let mut s = DDIMScheduler::new(cfg)?;
        s.set_timesteps(g.ddim_steps as usize)?;
        Ok(s)
    };
    row("ddim_timesteps", &|| {
        let s = ddim()?;
        let ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        Ok(Tensor::from_slice(&ts))
    });
    row("ddim_trajectory", &|| {
        // model output at step i = sin(sample · (i + 1))
        let mut s = ddim()?;
        let mut sample = get("initial_latents")?;
        let mut traj = Vec::new();
        for (i, t) in s.timesteps().to_vec().into_iter().enumerate() {
            let out = (&sample * (i as f64 + 1.0)).sin();
            sample = s.step(&out, t, &sample)?;
            traj.push(sample.shallow_clone());
        }
        Ok(Tensor::stack(&traj, 0))
    });
    row("pixels_highres", &|| {
        let dec = PixelDecoder::load(dir, Resolution::Highres, dev, Kind::Float)
            .with_context(|| format!("loading {}", highres_dir.display()))?;
        let cond = Condition::Highres {
            prompt_embeds: get("highres_prompt_embeds")?,
            pooled_embeds: get("highres_pooled_embeds")?,
        };
        let opts = DecodeOptions {
            steps: g.ddim_steps as usize,
            guidance: g.decoder_guidance,
            ..Default::default()
        };
        Ok(dec.decode_latents(
            &cond,
            get("initial_latents")?,
            &get("unet_highres_time_ids")?,
            &opts,
        )?)
    });
    row("pixels_lowres", &|| {
        let dec = PixelDecoder::load(dir, Resolution::Lowres, dev, Kind::Float)
            .with_context(|| format!("loading {}", lowres_dir.display()))?;
        let cond = Condition::Lowres {
            hidden: get("lowres_decoder_out")?,
        };
        let opts = DecodeOptions {
            steps: g.ddim_steps as usize,
            guidance: g.lowres_decoder_guidance,
            ..Default::default()
        };
        let unused = Tensor::zeros([cond.batch(), 6], (Kind::Float, dev));
        Ok(dec.decode_latents(&cond, get("initial_latents")?, &unused, &opts)?)
    });
    Ok(out)
}
