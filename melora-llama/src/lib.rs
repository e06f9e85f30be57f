#![warn(missing_docs)]
//! # melora-llama
//!
//! A Llama decoder generic over Burn backends whose projections take
//! melora's adapters; loaders for Hugging Face folders (safetensors) and GGUF
//! files; tokenizers; PEFT-format adapter files; the `melora` binary.
//!
//! Reference implementations read while writing it: transformers'
//! `modeling_llama.py`, candle's `llama.rs`, tracel-ai/models `llama-burn`.

pub mod assets;
pub mod backend;
pub mod data;
pub mod error;
pub mod eval;
pub mod laplace;
pub mod model;
pub mod report;
pub mod settings;
pub mod study;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{LlamaError, Result};
pub use model::{Llama, LlamaConfig};
pub use tokenizer::Tokenizer;
pub use weights::pretrained::Pretrained;
