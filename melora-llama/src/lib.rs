#![warn(missing_docs)]
//! # melora-llama
//!
//! A Llama decoder generic over Burn backends whose projections take
//! melora's adapters; loaders for Hugging Face folders (safetensors) and GGUF
//! files; tokenizers; PEFT-format adapter files; tasks, training and
//! evaluation. The `melora` binary is the `melora-cli` crate's.
//!
//! Fine-tuning SmolLM2 with Me-LoRA and evaluating it with a Bayesian model
//! average, as a library (what `melora train` and `melora eval` do; needs
//! `melora fetch` first):
//!
//! ```no_run
//! use burn::backend::{ndarray::NdArray, Autodiff};
//! use burn::module::AutodiffModule;
//! use melora_llama::{assets::Assets, data::Split, eval::predict, train::*, Pretrained};
//!
//! let (assets, device) = (Assets::from_env(), Default::default());
//! let file = "experiments/smollm2-135m/arc-e-melora.json";
//! let config: TrainConfig = melora_llama::settings::Loader::file(Some(file.as_ref())).load()?;
//! let (base, tokenizer) = Pretrained::load::<Autodiff<NdArray>>(&config.model, &assets, &device)?;
//! let task = config.task_setup(tokenizer, &assets)?;
//! let (train, validation) = (task.split(Split::Train, None)?, task.split(Split::Validation, Some(100))?);
//! let data = TrainData { train: &train, validation: &validation, scorer: &task.scorer };
//! let run = RunDir { dir: "runs/library-example".into() };
//! Trainer::new(&config, &run).fit(base.clone(), &data, &device)?;
//! let model = melora_llama::weights::peft::load_adapter(base.valid(), &run.last(), &device)?.0;
//! let probs = predict(&model, &validation, &task.scorer, &config.eval_options(8, 0), &device, |_, _| {})?;
//! println!("{:?}", probs.metrics());
//! # Ok::<(), melora_llama::LlamaError>(())
//! ```
//!
//! Evaluating a run the way `melora eval` does (a single adapter, a deep
//! ensemble or a Laplace posterior alike; an adapter folder or the base
//! model through the other [`predict::Subject`]s):
//!
//! ```no_run
//! use burn::backend::{ndarray::NdArray, Autodiff};
//! use melora_llama::data::{Split, Task};
//! use melora_llama::predict::{Questions, Request, Silent, Subject};
//!
//! let request = Request::new(Subject::Run("runs/arc-e-melora-seed0".into()));
//! let questions = Questions::Split { split: Split::Test, max_examples: None };
//! let assets = melora_llama::assets::Assets::from_env();
//! let evaluation =
//!     request.predict::<Autodiff<NdArray>>(Task::ArcE, &questions, &assets, &Default::default(), &mut Silent)?;
//! print!("{}", melora_llama::report::markdown(&[evaluation.row]));
//! # Ok::<(), melora_llama::LlamaError>(())
//! ```
//!
//! Reference implementations read while writing it: transformers'
//! `modeling_llama.py`, candle's `llama.rs`, tracel-ai/models `llama-burn`.

pub mod assets;
pub mod data;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod laplace;
pub mod model;
pub mod posterior;
pub mod predict;
pub mod pretrained;
pub mod report;
pub mod settings;
pub mod task;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{LlamaError, Result};
pub use model::{Llama, LlamaConfig};
pub use pretrained::Pretrained;
pub use tokenizer::Tokenizer;
