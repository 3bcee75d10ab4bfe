//! lavit-llm: the language model of LaVIT (Jin et al., "Unified Language-Vision Pretraining in
//! LLM with Dynamic Discrete Visual Tokenization", ICLR 2024; official code jy0205/LaVIT,
//! `LaVIT/models/lavit_for_generation.py` and `lavit_for_understanding.py`).
//!
//! - [`modeling_llama`]: HF `LlamaForCausalLM` in tch, with a batched KV cache.
//! - [`sentencepiece`]: `tokenizer.model` read in Rust; LLaMA's BPE encode/decode.
//! - [`hf_tokenizer`]: `tokenizer.json` folders (the `tokenizers` crate) behind the same surface.
//! - [`vocab`]: the unified vocabulary ([IMG], [/IMG], visual ids) and sequence batching.
//! - [`generate`]: image→text and text→image-token generation (CFG, eq. 7).
//! - [`lavit`]: [`LavitLlm`], the loaded `language_model/` with both tasks.

pub mod actor;
pub mod config;
pub mod generate;
pub mod hf_tokenizer;
pub mod lavit;
pub mod modeling_llama;
pub mod sentencepiece;
pub mod vocab;

pub use config::LlamaConfig;
pub use lavit::LavitLlm;
pub use modeling_llama::{ForwardArgs, KvCache, LlamaForCausalLM};
