//! Opening a model by name: a preset, a Hugging Face folder or a GGUF file.

use crate::assets::Assets;
use crate::error::{LlamaError, Result};
use crate::model::config::LlamaConfig;
use crate::model::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::gguf::GgufSource;
use crate::weights::safetensors::{pickle_refusal, SafetensorsSource};
use crate::weights::{build, LoadReport, RandomSource, WeightSource};
use burn::tensor::backend::Backend;
use std::path::Path;

/// The model a command uses when none is named: the preset `melora fetch`
/// downloads.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// A model's configuration, weights and tokenizer, not yet built.
pub struct Pretrained {
    /// The architecture.
    pub config: LlamaConfig,
    /// The weights.
    pub source: Box<dyn WeightSource>,
    /// The tokenizer, when the model comes with one.
    pub tokenizer: Option<Tokenizer>,
    /// What was opened, for messages.
    pub description: String,
    /// Random presets draw their matrices on the device: the backend's
    /// generator is seeded with this before the build.
    pub device_seed: Option<u64>,
}

impl Pretrained {
    /// Opens `model`:
    /// - `smollm2-135m`: the fetched GGUF (`melora fetch` first);
    /// - `llama2-7b`, `llama2-13b`, `llama3.1-8b`: the architecture with random weights
    ///   (for benchmarks; no tokenizer);
    /// - a folder: Hugging Face `config.json` + safetensors (+ `tokenizer.json`);
    /// - a `.gguf` file.
    ///
    /// PyTorch pickles (`.bin`, `.pt`) are refused.
    pub fn open(model: &str, assets: &Assets) -> Result<Self> {
        if model.eq_ignore_ascii_case(DEFAULT_MODEL) {
            let path = assets.smollm2_gguf();
            if !path.is_file() {
                return Err(LlamaError::Unavailable(format!(
                    "SmolLM2-135M is not in {}: run `melora fetch` first (or set MELORA_HOME)",
                    assets.home.display()
                )));
            }
            return Self::open_gguf(&path);
        }
        if let Some(config) = LlamaConfig::preset(model) {
            let source = Box::new(RandomSource::new(&config, 0).on_device());
            let description = format!("{model} (random weights)");
            return Ok(Self {
                config,
                source,
                tokenizer: None,
                description,
                device_seed: Some(0),
            });
        }
        let path = Path::new(model);
        if path.is_dir() {
            let config = LlamaConfig::from_hf_json(&path.join("config.json"))?;
            let source = Box::new(SafetensorsSource::open(path)?);
            let tokenizer_path = path.join("tokenizer.json");
            let tokenizer = if tokenizer_path.is_file() {
                Some(Tokenizer::from_file(&tokenizer_path)?)
            } else {
                None
            };
            return Ok(Self {
                config,
                source,
                tokenizer,
                description: path.display().to_string(),
                device_seed: None,
            });
        }
        if path.is_file() {
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            return match ext.as_str() {
                "gguf" => Self::open_gguf(path),
                "bin" | "pt" | "pth" | "ckpt" | "pkl" => Err(pickle_refusal(path)),
                _ => Err(LlamaError::format(
                    path,
                    "unknown model file type: expected a .gguf file or a Hugging Face folder",
                )),
            };
        }
        Err(LlamaError::Config(format!(
            "model {model:?} is not a preset (smollm2-135m, llama2-7b, llama2-13b, llama3.1-8b), a folder or a file"
        )))
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let source = GgufSource::open(path)?;
        let config = source.config()?;
        let tokenizer = Tokenizer::from_gguf(source.gguf(), path)?;
        Ok(Self {
            config,
            source: Box::new(source),
            tokenizer: Some(tokenizer),
            description: path.display().to_string(),
            device_seed: None,
        })
    }

    /// Builds the model on `device` (every weight frozen).
    pub fn build<B: Backend>(mut self, device: &B::Device) -> Result<(Llama<B>, Option<Tokenizer>, LoadReport)> {
        if let Some(seed) = self.device_seed {
            B::seed(device, seed);
        }
        let (model, report) = build(&self.config, self.source.as_mut(), device)?;
        Ok((model, self.tokenizer, report))
    }

    /// Opens and builds `model` with its tokenizer, the set-up of every
    /// command that reads text: an error when the model comes without one.
    pub fn load<B: Backend>(model: &str, assets: &Assets, device: &B::Device) -> Result<(Llama<B>, Tokenizer)> {
        let (built, tokenizer, _) = Self::open(model, assets)?.build::<B>(device)?;
        let tokenizer = tokenizer.ok_or_else(|| LlamaError::Unavailable(format!("{model} comes with no tokenizer")))?;
        Ok((built, tokenizer))
    }
}
