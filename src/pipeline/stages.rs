//! The real stages of a LaVIT checkpoint folder as [`lavit_runtime::stage`] implementations.

use std::path::Path;

use lavit_runtime::actors::StageBuilders;

use super::ModelInfo;

/// Builders for the five real stages of the checkpoint in `dir` (each loads its weights on its
/// own thread and device).
pub fn builders(dir: &Path) -> anyhow::Result<(StageBuilders, ModelInfo)> {
    anyhow::bail!(
        "{}: the model stages (tokenizer, LLM, pixel decoder) are not wired into the pipeline yet; \
         use `stages = \"mock\"` to run the serving machinery on mock stages",
        dir.display()
    )
}
