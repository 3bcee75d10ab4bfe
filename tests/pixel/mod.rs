//! Integration tests: pixel decoding (U-Nets, VAE, schedulers, LaVIT decoding, parity).

use crate::common::fixture_dir;
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

mod cli;
mod parity;
pub(crate) mod training;

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
