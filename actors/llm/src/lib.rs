//! lavit-llm: the language model of LaVIT (Jin et al., "Unified Language-Vision Pretraining in
//! LLM with Dynamic Discrete Visual Tokenization", ICLR 2024; official code jy0205/LaVIT,
//! `LaVIT/models/lavit_for_generation.py` and `lavit_for_understanding.py`).
//!
//! - [`modeling_llama`]: HF `LlamaForCausalLM` in tch, with a batched KV cache.
//! - [`sentencepiece`]: `tokenizer.model` read in Rust; LLaMA's BPE encode/decode.
//! - [`hf_tokenizer`]: `tokenizer.json` folders (the `tokenizers` crate) behind the same surface.
//! - [`quantize`]: weight-only int8 / group-wise int4 linear layers (libtorch's packed kernels).
//! - [`vocab`]: the unified vocabulary ([IMG], [/IMG], visual ids) and sequence batching.
//! - [`batch`]: continuous batching: the running set of sequences, the paged KV pool.
//! - [`generate`]: image→text and text→image-token generation (CFG, eq. 7).
//! - [`stage`]: [`LlmStageModel`], the loaded `language_model/` as the pipeline's Llm stage
//!   (captions, image tokens) — the one loader of the model, with all its checks.
//! - [`train`]: stage-2 packing, loss and the training state the Llm stage holds.

pub mod batch;
pub mod config;
pub mod generate;
pub mod hf_tokenizer;
pub mod modeling_llama;
pub mod quantize;
pub mod regex_guard;
pub mod sentencepiece;
pub mod stage;
pub mod train;
pub mod vocab;

pub use config::LlamaConfig;
pub use modeling_llama::{ForwardArgs, KvCache, LlamaForCausalLM};
pub use stage::LlmStageModel;
