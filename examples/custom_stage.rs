//! Replacing one stage of the graph with your own implementation: here a quantizer that
//! keeps every position and hashes features to ids, wired between the (mock) selector and the
//! rest. Any stage can be swapped this way; stages never see actix — they implement a plain
//! trait and the runtime runs them on their own thread and device.
//!
//! ```text
//! cargo run --example custom_stage
//! ```

use lavit::pipeline::{ModelInfo, Pipeline};
use lavit_runtime::actors::GraphOptions;
use lavit_runtime::mock::{self, MockConfig};
use lavit_runtime::stage::{Placement, QuantizerStage, StageError, StageResult, Trainable};
use tch::{Kind, Tensor};

/// Sign-bit hashing of the first 8 feature channels → one of 256 ids, offset into the LLM
/// vocabulary like the real codebook.
struct SignHash {
    offset: i64,
}

impl Trainable for SignHash {}

impl QuantizerStage for SignHash {
    fn quantize(&mut self, merged: &Tensor, decisions: &Tensor) -> StageResult<Vec<Vec<i64>>> {
        let (b, _, c) = merged
            .size3()
            .map_err(|e| StageError::Invalid(e.to_string()))?;
        let bits = c.min(8);
        let weights = Tensor::from_slice(&(0..bits).map(|i| 1i64 << i).collect::<Vec<_>>())
            .to_device(merged.device());
        let codes = merged
            .narrow(2, 0, bits)
            .gt(0.0)
            .to_kind(Kind::Int64)
            .matmul(&weights); // (B, N)
        (0..b)
            .map(|i| {
                let keep = decisions.get(i).gt(0.5);
                let ids = codes.get(i).masked_select(&keep) + self.offset;
                Vec::<i64>::try_from(&ids).map_err(|e| StageError::Invalid(e.to_string()))
            })
            .collect()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let m = MockConfig::default();
    let mut builders = mock::builders(&m, None);
    // The builder runs on the stage's own thread with the device from the placement.
    builders.quantizer =
        Box::new(|_device| Ok(Box::new(SignHash { offset: 202 }) as Box<dyn QuantizerStage>));
    let info = ModelInfo {
        image_size: m.image_size,
        default_size: (16, 16),
        size_multiple: 1,
        max_steps: usize::MAX,
        generate_defaults: Default::default(),
        selection: Default::default(),
        selection_note: None,
        synthesis: Default::default(),
    };
    let pipe = Pipeline::from_builders(
        builders,
        info,
        &Placement::default(),
        GraphOptions::default(),
    )?;
    let img = image::DynamicImage::new_rgb8(28, 28);
    let ids = pipe.tokenize(&[img]).await?;
    println!(
        "{} ids from the custom quantizer: {:?}",
        ids[0].len(),
        ids[0]
    );
    Ok(())
}
