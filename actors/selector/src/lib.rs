//! lavit-selector: LaVIT's token selector (`TokenPredictor`) and token merger
//! (`TokenMerger`, stored as `causal_encoder`), reference
//! `LaVIT/models/modeling_visual_tokenzier.py`, plus the keep/drop decision rules
//! (deterministic arg-max and seeded Gumbel-softmax with straight-through gradients);
//! [`stage`] is the SelectorMerger stage of the pipeline, [`projector`] the same stage as
//! stage-2 training runs it (only `vit_proj`).

pub mod projector;
pub mod selection;
pub mod stage;
pub mod token_merger;
pub mod token_predictor;

pub use projector::ProjectorStage;
pub use selection::{gumbel_softmax_hard, keep_argmax, keep_at_least, SelectionMode, MIN_KEPT};
pub use stage::{
    gather_kept, selector_loss, RatioScope, SelectorMergerStageModel, Stage1Loss, UnderstandingHead,
};
pub use token_merger::{TokenMerger, TokenMergerConfig};
pub use token_predictor::TokenPredictor;
